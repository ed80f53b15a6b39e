"""
Long-run drift of a TTT layer's streaming state: 67,500 token-by-token updates (90 minutes of
frames at 12.5 Hz), float32 state vs a bf16 state, both against a float64 run.

    python scripts/ttt_drift.py                      # TTT-Linear, 1024 wide, 16 heads of 64, b=16
    python scripts/ttt_drift.py --kind mlp --minutes 10 --device cuda

The layer's projections, RoPE and learning-rate gate run once under bf16 autocast (as in training
and generation); every variant gets those same q, k, v, lr, so the table isolates the inner loop:
  float64  reference, chunked form (equal to the streaming form, tests/test_ttt.py)
  float32  our state, streaming form (T = 1 per call), as generate.py runs it
  bf16     the same streaming calls with the fast weights and sums held in bf16 (what keeping the
           state in the autocast dtype would give)
Inputs are random smooth signals (sums of slow sinusoids plus noise), so the fast weights keep
moving for the whole run. Errors are over the 750 frames of the minute that ends at each mark:
out = ||f - f64|| / ||f64|| for the inner model's output f = out - q, W = ||W1 - W1_64|| / ||W1_64||
for the fast weights at the mark; moved = ||W1 - W1(0)|| / ||W1(0)|| in the float64 run.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ttt  # noqa: E402

FRAME_RATE = 12.5  # Hz, Mimi frames
FRAMES_PER_MINUTE = int(60 * FRAME_RATE)


def smooth_inputs(n, dim, seed, device, start=0, n_waves=32):
    """x_t [n, dim] for frames start..start+n: slow sinusoids (periods 2 s to 30 min) with random
    directions plus white noise, RMS about 1. Deterministic in (seed, frame), so made in pieces."""
    g = torch.Generator().manual_seed(seed)
    period = torch.exp(torch.empty(n_waves).uniform_(torch.log(torch.tensor(25.0)).item(),
                                                     torch.log(torch.tensor(22500.0)).item(),
                                                     generator=g))    # [n_waves] frames
    phase = torch.rand(n_waves, generator=g) * 2 * torch.pi
    amp = torch.randn(n_waves, dim, generator=g, dtype=torch.float64) / n_waves ** 0.5
    t = torch.arange(start, start + n, dtype=torch.float64)[:, None]
    waves = torch.sin(2 * torch.pi * t / period.double() + phase.double())  # [n, n_waves]
    noise = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed * 1_000_003 + start),
                        dtype=torch.float64)
    return (waves @ amp + 0.5 * noise).float().to(device)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kind", choices=["linear", "mlp"], default="linear")
    ap.add_argument("--dim", type=int, default=1024, help="layer width")
    ap.add_argument("--heads", type=int, default=16, help="heads (head width = dim / heads)")
    ap.add_argument("--mini-batch", type=int, default=16)
    ap.add_argument("--minutes", type=float, default=90, help="run length; 90 = 67,500 frames")
    ap.add_argument("--marks", default="1,10,45,90", help="minutes at which to report")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    dev = torch.device(args.device)
    steps = int(args.minutes * FRAMES_PER_MINUTE)
    marks = [float(m) for m in args.marks.split(",") if float(m) <= args.minutes]
    mark_end = {int(m * FRAMES_PER_MINUTE): m for m in marks}
    windows = [(e - FRAMES_PER_MINUTE, e) for e in mark_end]
    cls = ttt.TTTLinear if args.kind == "linear" else ttt.TTTMLP
    layer = cls(args.dim, args.heads, mini_batch=args.mini_batch).to(dev).eval()
    fn, b = layer.inner, args.mini_batch
    lnw, lnb = layer.ttt_norm_weight.detach(), layer.ttt_norm_bias.detach()
    print(f"TTT-{args.kind}: width {args.dim}, {args.heads} heads of {args.dim // args.heads}, "
          f"b={b}, {steps} streaming steps on {dev}", flush=True)

    # q, k, v, lr for the whole run, under bf16 autocast, in chunks (aligned to mini-batches)
    t0 = time.time()
    chunk = 64 * b
    inputs = []
    with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16):
        for s in range(0, steps, chunk):
            x = smooth_inputs(min(chunk, steps - s), args.dim, args.seed, dev, start=s)[None]
            q, k, v, lr, tau = layer.inner_inputs(x, torch.tensor(s % b, device=dev))
            inputs.append([t.float() for t in (q, k, v, lr)])
    q, k, v, lr = (torch.cat(ts, 2) for ts in zip(*inputs))
    tau = tau.float()
    print(f"  projections: {time.time() - t0:.0f} s", flush=True)

    def run(dtype, streaming):
        """Inner loop over the whole run in the given state dtype; outputs in the windows and the
        fast weights at each mark."""
        # one thread: a streaming step is many tiny ops, and idle OpenMP threads spinning at each
        # op's barrier make a shared CPU crawl
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        state = layer.init_state(1, device=dev)
        state = ttt.TTTState(*[tuple(t.detach().to(dtype) for t in ts) for ts in state[:2]],
                             state.i)
        W0 = state.params[0].double()
        outs, Ws = {w: [] for w in windows}, {}
        # streaming: one frame per call; chunked: cut also at the marks, to read W there
        cuts = range(steps + 1) if streaming else sorted({*range(0, steps, chunk), *mark_end, steps})
        t0 = time.time()
        with torch.no_grad():
            for s, e in zip(cuts[:-1], cuts[1:]):
                out, state = fn(q[:, :, s:e].to(dtype), k[:, :, s:e].to(dtype),
                                v[:, :, s:e].to(dtype), lr[:, :, s:e].to(dtype), tau.to(dtype),
                                lnw.to(dtype), lnb.to(dtype), b, state)
                for w in windows:
                    lo, hi = max(w[0], s), min(w[1], e)
                    if lo < hi:
                        outs[w].append((out[:, :, lo - s:hi - s] - q[:, :, lo:hi].to(dtype))
                                       .double())
                if e in mark_end:
                    Ws[e] = state.params[0].double()
        torch.set_num_threads(threads)
        print(f"  {dtype} {'streaming' if streaming else 'chunked'}: {time.time() - t0:.0f} s",
              flush=True)
        return {w: torch.cat(o, 2) for w, o in outs.items()}, Ws, W0

    ref_out, ref_W, W0 = run(torch.float64, streaming=False)
    rows = {name: run(dt, streaming=True) for name, dt in (("float32", torch.float32),
                                                           ("bf16", torch.bfloat16))}
    rel = lambda a, r: ((a - r).norm() / r.norm()).item()
    print()
    print("| minute | frames | float32 state: out | float32: W | bf16 state: out | bf16: W "
          "| W moved |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for w in windows:
        e = w[1]
        cells = []
        for name in ("float32", "bf16"):
            outs, Ws, _ = rows[name]
            cells += [f"{rel(outs[w], ref_out[w]):.1e}", f"{rel(Ws[e], ref_W[e]):.1e}"]
        print(f"| {mark_end[e]:g} | {e} | " + " | ".join(cells)
              + f" | {rel(ref_W[e], W0):.2f} |")


if __name__ == "__main__":
    main()
