"""
Speed of the TTT layers: chunked forward and forward+backward at 64k tokens per batch, and the
per-token streaming step. Prints markdown tables.

    python bench/ttt.py                 # on a GPU (H100 figures in README), a few minutes
    python bench/ttt.py --quick         # tiny sizes on the CPU: checks that every row runs
    python bench/ttt.py --no-compile    # skip the torch.compile rows (each compile takes ~30 s)
    python bench/ttt.py --only decay    # TTT-Linear with fast weights that forget, against without

Chunked rows, each at 16 heads of 64, T in {2k, 8k, 32k} with batch 64k / T, b in {16, 64}:
  loop      the official dual form, one Python iteration per mini-batch (ttt-lm-pytorch
            TTTLinear.ttt / TTTMLP.ttt, written out again below): the baseline
  torch     ttt.py's PyTorch reference path (also one iteration per mini-batch, plus the carried
            sums and the mid-mini-batch starts the official code lacks)
  compile   the same loop with each whole mini-batch torch.compile'd (TTT-MLP's fast path)
  triton    ttt.py's Triton kernels: one launch per call each way (TTT-Linear: passes for few, long
            sequences; "ckpt 1": the fast weights of every mini-batch kept for backward)
  sdpa      causal attention of the same width, q, k, v [B, 16, T, 64] bf16 (kind-independent)
  fla       flash-linear-attention's chunk_ttt_linear when it imports (see fla_row for how its
            semantics differ)
Tokens/s count the tokens of the batch (64k) per second; peak memory includes the inputs.
"""
import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ttt  # noqa: E402

# -----------------------------------------------------------------------------
# The baseline: the official per-mini-batch loop (dual form, T a multiple of b, fresh state)


def _ln(z, w, b, eps=1e-6):
    mu = z.mean(-1, keepdim=True)
    sd = torch.sqrt(z.var(-1, keepdim=True, unbiased=False) + eps)
    return (z - mu) / sd * w + b


def _ln_l2_bwd(z, target, w, b, eps=1e-6):
    d = z.shape[-1]
    mu = z.mean(-1, keepdim=True)
    sd = torch.sqrt(z.var(-1, keepdim=True, unbiased=False) + eps)
    xh = (z - mu) / sd
    g = (w * xh + b - target) * w
    return (d * g - g.sum(-1, keepdim=True) - xh * (g * xh).sum(-1, keepdim=True)) / (d * sd)


def loop_linear(q, k, v, lr, tau, ln_w, ln_b, b, W1, b1):
    """Upstream's scan over mini-batches of compute_mini_batch (dual form); q, k, v [B,H,T,d]."""
    B, H, T, d = q.shape
    N = T // b
    q, k, v = (x.to(W1.dtype).reshape(B, H, N, b, d) for x in (q, k, v))
    eta = tau[:, None] * lr.reshape(B, H, N, 1, b)            # [B,H,N,b,b] tau_i lr_j
    w, bb = ln_w[:, None], ln_b[:, None]                       # [H,1,d]
    outs = []
    for n in range(N):
        X1, XV, XQ, e = k[:, :, n], v[:, :, n], q[:, :, n], eta[:, :, n]
        grad = _ln_l2_bwd(X1 @ W1 + b1, XV - X1, w, bb)
        attn = torch.tril(XQ @ X1.transpose(-2, -1))
        b1_bar = b1 - torch.tril(e) @ grad
        Z1 = XQ @ W1 - (e * attn) @ grad + b1_bar
        last = e[:, :, -1, :, None]                            # [B,H,b,1]
        W1 = W1 - (last * X1).transpose(-2, -1) @ grad
        b1 = b1 - (last * grad).sum(-2, keepdim=True)
        outs.append(XQ + _ln(Z1, w, bb))
    return torch.stack(outs, 2).reshape(B, H, T, d)


def loop_mlp(q, k, v, lr, tau, ln_w, ln_b, b, W1, b1, W2, b2):
    """Upstream TTTMLP.ttt's dual form, one Python iteration per mini-batch."""
    B, H, T, d = q.shape
    N = T // b
    q, k, v = (x.to(W1.dtype).reshape(B, H, N, b, d) for x in (q, k, v))
    eta = tau[:, None] * lr.reshape(B, H, N, 1, b)
    w, bb = ln_w[:, None], ln_b[:, None]
    gelu = lambda x: F.gelu(x, approximate="tanh")
    outs = []
    for n in range(N):
        X1, XV, XQ, e = k[:, :, n], v[:, :, n], q[:, :, n], eta[:, :, n]
        Z1 = X1 @ W1 + b1
        X2 = gelu(Z1)
        g2 = _ln_l2_bwd(X2 @ W2 + b2, XV - X1, w, bb)
        g1 = g2 @ W2.transpose(-2, -1) * ttt._gelu_grad(Z1)
        Z1b = XQ @ W1 - (e * torch.tril(XQ @ X1.transpose(-2, -1))) @ g1 + b1 - torch.tril(e) @ g1
        X2b = gelu(Z1b)
        Z2b = X2b @ W2 - (e * torch.tril(X2b @ X2.transpose(-2, -1))) @ g2 + b2 - torch.tril(e) @ g2
        last = e[:, :, -1, :, None]
        W1 = W1 - (last * X1).transpose(-2, -1) @ g1
        b1 = b1 - (last * g1).sum(-2, keepdim=True)
        W2 = W2 - (last * X2).transpose(-2, -1) @ g2
        b2 = b2 - (last * g2).sum(-2, keepdim=True)
        outs.append(XQ + _ln(Z2b, w, bb))
    return torch.stack(outs, 2).reshape(B, H, T, d)

# -----------------------------------------------------------------------------
# Timing


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def measure(fn, dev, warm=None, min_time=0.5, max_reps=20):
    """Seconds per call and peak bytes allocated. warm: a cheaper call that warms the same
    kernels (for the Python loops, whose full warm-up would double the bench's run time)."""
    (warm or fn)()
    sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if dev.type == "cuda" else 0
    n, t0 = 0, time.perf_counter()
    while n < max_reps and (n == 0 or time.perf_counter() - t0 < min_time):
        fn()
        sync(dev)
        n += 1
    dt = (time.perf_counter() - t0) / n
    peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else 0
    return dt, max(peak, base)


def inputs(kind, B, H, T, d, b, dev, grad):
    """q, k, v bf16 (as the projections give them under autocast), lr, tau, inner LN, and the
    learnable initial fast weights [H, ...] (leaves, so that backward reaches them)."""
    g = torch.Generator(device=dev).manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, device=dev)
    q, k, v = (r(B, H, T, d).to(torch.bfloat16) for _ in range(3))
    lr = torch.rand(B, H, T, generator=g, device=dev) / d
    tau = 1.0 / torch.arange(1, b + 1, device=dev, dtype=torch.float32)
    ln_w, ln_b = torch.ones(H, d, device=dev), torch.zeros(H, d, device=dev)
    m = 4 * d
    shapes = [(d, d), (1, d)] if kind == "linear" else [(d, m), (1, m), (m, d), (1, d)]
    W = [0.02 * r(H, *s) if s[0] > 1 else torch.zeros(H, *s, device=dev) for s in shapes]
    xs = [q, k, v, lr, tau, ln_w, ln_b, *W]
    for x in xs:
        x.requires_grad_(grad)
    return xs


def run_impl(impl, kind, xs, b, checkpoint_group=16, host_pos=False, decay=1.0, gate=None):
    q, k, v, lr, tau, ln_w, ln_b, *W = xs
    B = q.shape[0]
    Wb = [w[None].expand(B, *w.shape) for w in W]               # broadcast to the batch
    if impl.endswith(" + gate"):  # a forget gate, a leaf [B, H, T] as one computed from the input would be
        s = (2 * torch.rand(q.shape[:3], device=q.device, generator=torch.Generator(q.device).manual_seed(3)))
        return run_impl(impl[:-len(" + gate")], kind, xs, b, checkpoint_group, host_pos, decay,
                        s.requires_grad_(q.requires_grad))
    if impl.endswith(", decay 0.9"):  # fast weights that forget, toward the initial ones
        return run_impl(impl[:-len(", decay 0.9")], kind, xs, b, checkpoint_group, host_pos, 0.9, gate)
    if impl.endswith(", learnt decays"):  # one decay per head and feature, a leaf as a learnt one would be
        g = torch.linspace(0.5, 0.999, W[0].shape[-1], device=q.device).expand(W[0].shape[0], 1, -1)
        g = g.clone().requires_grad_(q.requires_grad)
        return run_impl(impl[:-len(", learnt decays")], kind, xs, b, checkpoint_group, host_pos, (g,) * len(W), gate)
    if impl == "loop":
        return (loop_linear if kind == "linear" else loop_mlp)(q, k, v, lr, tau, ln_w, ln_b, b, *Wb)
    if impl == "triton, ckpt 1":  # fast weights kept at every mini-batch for backward, none recomputed
        return run_impl("triton", kind, xs, b, 1, host_pos)
    if impl == "triton, tf32":  # TTT-MLP's kernels with single tf32 products instead of tf32x3
        keep = dict(ttt.TRITON_MLP)
        ttt.TRITON_MLP["dot"] = "tf32"
        try:
            return run_impl("triton", kind, xs, b, checkpoint_group, host_pos)
        finally:
            ttt.TRITON_MLP.update(keep)
    if impl == "triton 1-pass":  # the Triton forward without its two-pass form
        keep = dict(ttt.TRITON_TWO_PASS)
        ttt.TRITON_TWO_PASS["rows"] = 0
        try:
            return run_impl("triton", kind, xs, b, checkpoint_group, host_pos)
        finally:
            ttt.TRITON_TWO_PASS.update(keep)
    fn = ttt.ttt_linear if kind == "linear" else ttt.ttt_mlp
    # host_pos: the position inside the mini-batch lives on the host, so the call never syncs (a CUDA graph)
    state = ttt.TTTState(tuple(w.contiguous() for w in Wb), tuple(torch.zeros_like(w) for w in Wb),
                         torch.zeros((), dtype=torch.int64, device="cpu" if host_pos else q.device))
    forget = dict(decay=decay, anchor=W, forget_gate=gate) if isinstance(decay, tuple) or decay != 1.0 else {}
    return fn(q, k, v, lr, tau, ln_w, ln_b, b, state, impl=impl, checkpoint_group=checkpoint_group, **forget)[0]


def graphed_row(kind, B, H, T, d, b, dev, impl="compile"):
    """The whole chunked call replayed as CUDA graphs (fixed shapes, as in training with a fixed
    seq_len): forward captured with torch.cuda.graph, forward+backward with
    torch.cuda.make_graphed_callables. No gradient checkpointing (its recompute stays eager)."""
    res = {}
    for mode in ("fwd", "fwd+bwd"):
        grad = mode == "fwd+bwd"
        xs = inputs(kind, B, H, T, d, b, dev, grad)
        f = lambda *a: run_impl(impl, kind, list(a), b, checkpoint_group=0, host_pos=True)
        if grad:
            g = torch.cuda.make_graphed_callables(f, tuple(xs), num_warmup_iters=2)

            def call():
                g(*xs).float().sum().backward()
        else:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s), torch.no_grad():
                f(*xs)
                f(*xs)
            torch.cuda.current_stream().wait_stream(s)
            gr = torch.cuda.CUDAGraph()
            with torch.no_grad(), torch.cuda.graph(gr):
                f(*xs)
            call = gr.replay
        res[mode] = measure(call, dev)
        del call
        torch.cuda.empty_cache()
    return res


def graph_table(tokens, H, d, Ts, bs, dev):
    """TTT-MLP: the per-mini-batch loop against the same call (each mini-batch compiled) as CUDA graphs."""
    print(f"\n## TTT-MLP as CUDA graphs: {tokens} tokens per batch, {H} heads of {d}; Mtok/s (peak GiB)\n")
    print("| b | impl | " + " | ".join(f"T={T} fwd | T={T} fwd+bwd" for T in Ts) + " |")
    print("|---:|---|" + "---:|---:|" * len(Ts))
    fmt = lambda r: f"{tokens / r[0] / 1e6:.3g} ({r[1] / 2 ** 30:.2f})"
    res = {}
    for b in bs:
        for impl in ("loop", "compile+graph"):
            cells = []
            for T in Ts:
                try:
                    r = (chunked_row("loop", "mlp", tokens // T, H, T, d, b, dev) if impl == "loop"
                         else graphed_row("mlp", tokens // T, H, T, d, b, dev))
                    res[b, impl, T] = r
                    cells += [fmt(r["fwd"]), fmt(r["fwd+bwd"])]
                except Exception as e:
                    cells += [f"failed: {e.__class__.__name__}: {str(e)[:80]}", ""]
                torch.cuda.empty_cache()
            print(f"| {b} | {impl} | " + " | ".join(cells) + " |", flush=True)
        cells = []
        for T in Ts:
            a, g = res.get((b, "loop", T)), res.get((b, "compile+graph", T))
            cells += [f"{a[m][0] / g[m][0]:.3g}x" if a and g else "-" for m in ("fwd", "fwd+bwd")]
        print(f"| {b} | speed-up | " + " | ".join(cells) + " |", flush=True)


def chunked_row(impl, kind, B, H, T, d, b, dev, fwd_only=False):
    slow = impl.split(",")[0] in ("loop", "torch", "compile")
    res = {}
    for mode in ("fwd",) if fwd_only else ("fwd", "fwd+bwd"):
        grad = mode == "fwd+bwd"
        xs = inputs(kind, B, H, T, d, b, dev, grad)
        short = [x[:, :, :4 * b] for x in xs[:4]] + xs[4:]  # q, k, v, lr cut to 4 mini-batches
        if impl.startswith("compile"):  # compile afresh in the warm-up: rows that share the compiled
            torch._dynamo.reset()        # mini-batch (decays, grad modes, batch sizes) would run out of recompiles
            ttt._COMPILED.clear()

        def call(xs=xs):
            with torch.set_grad_enabled(grad):
                out = run_impl(impl, kind, xs, b)
                if grad:
                    out.float().sum().backward()

        res[mode] = measure(call, dev, warm=(lambda: call(short)) if slow else None,
                            max_reps=1 if slow else 20)
    return res


def sdpa_row(B, H, T, d, dev):
    res = {}
    for mode in ("fwd", "fwd+bwd"):
        grad = mode == "fwd+bwd"
        q, k, v = (torch.randn(B, H, T, d, device=dev, dtype=torch.bfloat16, requires_grad=grad)
                   for _ in range(3))

        def call():
            with torch.set_grad_enabled(grad):
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                if grad:
                    o.float().sum().backward()

        res[mode] = measure(call, dev)
    return res


def fla_row(B, H, T, d, b, dev):
    """flash-linear-attention's chunk_ttt_linear, if installed. Its semantics differ from the
    official layer (and ours): one learning rate per token, eta_i [B, T, H, 1], scales row i of the
    dual form instead of tau_i * lr_j; q is scaled by 1/sqrt(d); the residual adds the inner
    output to its own LayerNorm (o + LN(o)) instead of q + LN(o); a last partial mini-batch is
    padded, and there are no carried gradient sums, so a call cannot stop inside a mini-batch.
    Its speed is comparable, its numbers are not."""
    try:
        from fla.ops.ttt import chunk_ttt_linear
    except ImportError as e:
        return f"not installed ({e.__class__.__name__}: `pip install flash-linear-attention`)"
    res = {}
    try:
        for mode in ("fwd", "fwd+bwd"):
            grad = mode == "fwd+bwd"
            q, k, v = (torch.randn(B, T, H, d, device=dev, dtype=torch.bfloat16, requires_grad=grad)
                       for _ in range(3))
            w = torch.ones(H, d, device=dev, requires_grad=grad)
            bb = torch.zeros(H, d, device=dev, requires_grad=grad)
            eta = torch.full((B, T, H, 1), 1.0 / d, device=dev, dtype=torch.bfloat16)

            def call():
                with torch.set_grad_enabled(grad):
                    o = chunk_ttt_linear(q, k, v, w, bb, eta, chunk_size=b)[0]
                    if grad:
                        o.float().sum().backward()

            res[mode] = measure(call, dev)
    except Exception as e:  # an API drift between fla versions should not sink the bench
        return f"failed: {e.__class__.__name__}: {str(e)[:80]}"
    return res

# -----------------------------------------------------------------------------
# Streaming: one layer with its projections, one token per call


def streaming(kind, dim, H, b, batch, dev, mode, steps):
    """Microseconds per token step of one layer (bf16 autocast, state carried). mode: "eager",
    "graph" (the step captured in a CUDA graph), "compile+graph" (torch.compile, then captured)."""
    cls = ttt.TTTLinear if kind == "linear" else ttt.TTTMLP
    layer = cls(dim, H, mini_batch=b).to(dev).eval()
    x = torch.randn(batch, 1, dim, device=dev)
    state = ttt.detach_state(layer.init_state(batch, device=dev))
    step = torch.compile(layer, fullgraph=True, dynamic=False) if "compile" in mode else layer
    amp = lambda: torch.autocast(dev.type, dtype=torch.bfloat16, cache_enabled=False)

    def advance(st):  # one token, the new state written back into the old one's buffers
        y, new = step(x, st)
        for dst, src in zip(st.params + st.grads + (st.i,), new.params + new.grads + (new.i,)):
            dst.copy_(src)
        return y

    with torch.no_grad(), amp():
        for _ in range(3):  # warm up (and compile) outside any graph
            advance(state)
        sync(dev)
        if "graph" in mode:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                advance(state)
            run = graph.replay
        else:
            run = lambda: advance(state)
        run()
        sync(dev)
        t0 = time.perf_counter()
        for _ in range(steps):
            run()
        sync(dev)
    return (time.perf_counter() - t0) / steps * 1e6


def streaming_table(modes, dim, H, batches, dev, steps):
    print(f"\n## Streaming step: one layer ({dim} wide, {H} heads of {dim // H}, b=16) with its "
          "projections, bf16 autocast; microseconds per token\n")
    print("| kind | batch | " + " | ".join(modes) + " |")
    print("|---|---:|" + "---:|" * len(modes))
    for kind in ("linear", "mlp"):
        for batch in batches:
            cells = []
            for mode in modes:
                try:
                    cells.append(f"{streaming(kind, dim, H, 16, batch, dev, mode, steps):.0f}")
                except Exception as e:  # report, and go on with the other rows
                    cells.append(f"failed: {e.__class__.__name__}: {str(e)[:60]}")
            print(f"| {kind} | {batch} | " + " | ".join(cells) + " |", flush=True)


def tune(tokens, H, d, Ts, dev):
    """Mtok/s of the Triton TTT-Linear forward (b = 16) for each launch setting of the kernel, then
    forward+backward for each number of warps and pipelining stages of the backward kernel (b = 16
    and 64)."""
    print(f"\n## Triton forward launch settings, TTT-Linear b=16, {tokens} tokens; Mtok/s\n")
    print("| warps | stages | " + " | ".join(f"T={T}" for T in Ts) + " |")
    print("|---:|---:|" + "---:|" * len(Ts))
    keep = dict(ttt.TRITON_FWD)
    for warps in (4, 8, 16):
        for stages in (1, 2, 3):
            ttt.TRITON_FWD.update(num_warps=warps, stages=stages)
            cells = []
            for T in Ts:
                try:
                    r = chunked_row("triton", "linear", tokens // T, H, T, d, 16, dev, fwd_only=True)
                    cells.append(f"{tokens / r['fwd'][0] / 1e6:.3g}")
                except Exception as e:
                    cells.append(f"failed: {e.__class__.__name__}: {str(e)[:60]}")
            print(f"| {warps} | {stages} | " + " | ".join(cells) + " |", flush=True)
    ttt.TRITON_FWD.update(keep)
    print(f"\n## Triton backward launch settings, TTT-Linear, {tokens} tokens; forward+backward Mtok/s\n")
    print("| warps | stages | " + " | ".join(f"b={b}, T={T}" for b in (16, 64) for T in Ts) + " |")
    print("|---:|---:|" + "---:|" * (2 * len(Ts)))
    keep = dict(ttt.TRITON_BWD)
    for warps in (4, 8):
        for stages in (1, 2, 3):
            ttt.TRITON_BWD.update(num_warps=warps, num_stages=stages)
            cells = []
            for b in (16, 64):
                for T in Ts:
                    try:
                        r = chunked_row("triton", "linear", tokens // T, H, T, d, b, dev)
                        cells.append(f"{tokens / r['fwd+bwd'][0] / 1e6:.3g}")
                    except Exception as e:
                        cells.append(f"failed: {e.__class__.__name__}: {str(e)[:60]}")
            print(f"| {warps} | {stages} | " + " | ".join(cells) + " |", flush=True)
    ttt.TRITON_BWD.update(keep)


# (hidden units a chunk, forward warps, backward warps, products) tried by --only tune_mlp
MLP_SETTINGS = [(32, 4, 4, "tf32x3"), (32, 4, 8, "tf32x3"), (16, 4, 4, "tf32x3"), (64, 4, 4, "tf32x3"),
                (32, 4, 4, "tf32")]


def tune_mlp(tokens, H, d, Ts, dev):
    """Mtok/s of the Triton TTT-MLP forward and forward+backward for each chunk of hidden units
    and number of warps (b = 16 and 64)."""
    print(f"\n## Triton TTT-MLP launch settings, {tokens} tokens; Mtok/s forward / forward+backward\n")
    print("| hidden chunk | fwd warps | bwd warps | products | " + " | ".join(f"b={b}, T={T}" for b in (16, 64) for T in Ts) + " |")
    print("|---:|---:|---:|---|" + "---:|" * (2 * len(Ts)))
    keep = dict(ttt.TRITON_MLP)
    for hc, fw, bw, dot in MLP_SETTINGS:
        ttt.TRITON_MLP.update(hc=hc, fwd_warps=fw, bwd_warps=bw, dot=dot)
        cells = []
        for b in (16, 64):
            for T in Ts:
                try:
                    r = chunked_row("triton", "mlp", tokens // T, H, T, d, b, dev)
                    cells.append(f"{tokens / r['fwd'][0] / 1e6:.3g} / {tokens / r['fwd+bwd'][0] / 1e6:.3g}")
                except Exception as e:
                    cells.append(f"failed: {e.__class__.__name__}: {str(e)[:60]}")
                torch.cuda.empty_cache()
        print(f"| {hc} | {fw} | {bw} | {dot} | " + " | ".join(cells) + " |", flush=True)
    ttt.TRITON_MLP.update(keep)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, runs on the CPU")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--only", choices=["streaming", "chunked", "tune", "tune_mlp", "graph", "decay"], default=None,
                    help="just the streaming-step table (every mode), just the chunked tables, a "
                         "sweep of the Triton kernels' launch settings (TTT-Linear, or TTT-MLP), or TTT-MLP's loop against "
                         "the same call as CUDA graphs (CUDA), or TTT-Linear with fast weights that forget")
    ap.add_argument("--T", type=int, nargs="+", default=None, help="sequence lengths (default 2048 8192 32768)")
    ap.add_argument("--kinds", nargs="+", choices=["linear", "mlp"], default=["linear", "mlp"],
                    help="inner models of the chunked table (default both)")
    ap.add_argument("--skip", nargs="*", default=[], help="chunked rows to leave out, e.g. torch")
    args = ap.parse_args()
    dev = torch.device(args.device)
    if args.quick:
        torch.set_num_threads(1)  # tiny ops: spinning OpenMP threads only slow a shared CPU down
        tokens, H, d, Ts, bs, dim, batches = 128, 2, 16, [32, 64], [16], 64, [1, 2]
    else:
        tokens, H, d, Ts, bs, dim, batches = 65536, 16, 64, [2048, 8192, 32768], [16, 64], 1024, [1, 64]
    Ts = args.T or Ts
    fast = dev.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    print(f"# TTT bench on {name}, torch {torch.__version__}"
          + (f", triton {ttt.triton.__version__}" if ttt.triton is not None else ", no triton"))
    steps = 20 if args.quick else 200
    modes = ["eager"] + (["graph"] if dev.type == "cuda" else [])
    if args.only == "streaming":
        if dev.type == "cuda" and not args.no_compile:
            modes.append("compile+graph")
        streaming_table(modes, dim, H, batches, dev, steps)
        return
    if args.only == "tune":
        tune(tokens, H, d, Ts, dev)
        return
    if args.only == "tune_mlp":
        tune_mlp(tokens, H, d, Ts, dev)
        return
    if args.only == "graph":
        graph_table(tokens, H, d, Ts, bs, dev)
        return
    if args.only == "decay":
        decay_table(tokens, H, d, Ts, bs, dev, fast, not args.no_compile, args.skip)
        return
    if args.only is None:
        streaming_table(modes, dim, H, batches, dev, steps)

    print(f"\n## Chunked: {tokens} tokens per batch, {H} heads of {d}; Mtok/s (peak GiB)\n")
    print("| kind | b | impl | " + " | ".join(f"T={T} fwd | T={T} fwd+bwd" for T in Ts) + " |")
    print("|---|---:|---|" + "---:|---:|" * len(Ts))
    fmt = lambda r: f"{tokens / r[0] / 1e6:.3g} ({r[1] / 2 ** 30:.2f})"
    cells_of = lambda r: [fmt(r["fwd"]), fmt(r["fwd+bwd"])] if isinstance(r, dict) else [r, ""]
    results = {}
    for kind in args.kinds:
        for b in bs:
            impls = ["loop", "torch"]
            if fast and ttt.triton_supported(kind, d, b):  # (TTT-MLP's kernel has no two-pass form)
                impls += (["triton 1-pass", "triton", "triton, ckpt 1"] if kind == "linear"
                          else ["triton", "triton, tf32"])
            for impl in [i for i in impls if i not in args.skip]:
                cells = []
                for T in Ts:
                    try:
                        r = chunked_row(impl, kind, tokens // T, H, T, d, b, dev)
                        results[kind, b, impl, T] = r
                    except Exception as e:  # report, and go on with the other rows
                        r = f"failed: {e.__class__.__name__}: {str(e)[:80]}"
                    cells += cells_of(r)
                    if dev.type == "cuda":
                        torch.cuda.empty_cache()
                print(f"| {kind} | {b} | {impl} | " + " | ".join(cells) + " |", flush=True)
            if kind == "linear":
                cells = []
                for T in Ts:
                    cells += cells_of(fla_row(tokens // T, H, T, d, b, dev) if dev.type == "cuda"
                                      else "needs CUDA")
                print(f"| linear | {b} | fla | " + " | ".join(cells) + " |", flush=True)
    cells = []
    for T in Ts:
        results["sdpa", T] = sdpa_row(tokens // T, H, T, d, dev)
        cells += cells_of(results["sdpa", T])
    print("| attention | - | sdpa causal | " + " | ".join(cells) + " |", flush=True)

    speedups(results, Ts, [(kind, b) for kind in args.kinds for b in bs])

    if dev.type == "cuda" and not args.no_compile:  # last: each compile takes tens of seconds
        print("\n## TTT-MLP's fast path: the loop with each mini-batch torch.compile'd "
              "(compile time excluded); Mtok/s (peak GiB)\n")
        print("| kind | b | impl | " + " | ".join(f"T={T} fwd | T={T} fwd+bwd" for T in Ts) + " |")
        print("|---|---:|---|" + "---:|---:|" * len(Ts))
        for b in bs:
            cells = []
            for T in Ts:
                try:
                    r = chunked_row("compile", "mlp", tokens // T, H, T, d, b, dev)
                    results["mlp", b, "compile", T] = r
                except Exception as e:
                    r = f"failed: {e.__class__.__name__}: {str(e)[:80]}"
                cells += cells_of(r)
            print(f"| mlp | {b} | compile | " + " | ".join(cells) + " |", flush=True)
        speedups(results, Ts, [("mlp", b) for b in bs])
        if args.only is None:
            streaming_table(["compile+graph"], dim, H, batches, dev, steps)


def decay_table(tokens, H, d, Ts, bs, dev, fast, compile_rows, skip=()):
    """TTT-Linear with fast weights that forget (one decay, or learnt decays, one per head and
    feature, with their gradients) against the official update, side by side."""
    print(f"\n## TTT-Linear, fast weights that forget: {tokens} tokens per batch, {H} heads of {d}; "
          "Mtok/s (peak GiB)\n")
    print("| b | impl | " + " | ".join(f"T={T} fwd | T={T} fwd+bwd" for T in Ts) + " |")
    print("|---:|---|" + "---:|---:|" * len(Ts))
    fmt = lambda r: f"{tokens / r[0] / 1e6:.3g} ({r[1] / 2 ** 30:.2f})"
    for b in bs:
        impls = ["torch", "torch, decay 0.9", "torch, learnt decays", "torch, learnt decays + gate"]
        if compile_rows and dev.type == "cuda":
            impls = ["compile", "compile, decay 0.9", "compile, learnt decays"]
        if fast and ttt.triton_supported("linear", d, b):
            impls = ["triton", "triton, decay 0.9", "triton, learnt decays", "triton, learnt decays + gate"] + impls
        for impl in [i for i in impls if i.split(",")[0] not in skip]:   # (--skip torch: no eager rows)
            cells = []
            for T in Ts:
                try:
                    r = chunked_row(impl, "linear", tokens // T, H, T, d, b, dev)
                    cells += [fmt(r["fwd"]), fmt(r["fwd+bwd"])]
                except Exception as e:  # report, and go on with the other rows
                    cells += [f"failed: {e.__class__.__name__}: {str(e)[:80]}", ""]
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
            print(f"| {b} | {impl} | " + " | ".join(cells) + " |", flush=True)


def speedups(results, Ts, rows):
    print("\n## Speed-ups of the fastest ttt.py path (fwd / fwd+bwd)\n")
    print("| kind | b | path | " + " | ".join(f"T={T} vs loop | T={T} vs sdpa" for T in Ts) + " |")
    print("|---|---:|---|" + "---:|---:|" * len(Ts))
    x = lambda a, r, m: f"{r[m][0] / a[m][0]:.3g}"
    for kind, b in rows:
        have = [i for i in ("triton", "triton, ckpt 1", "triton, tf32", "compile", "torch")
                if all((kind, b, i, T) in results for T in Ts)]
        if not have or not all((kind, b, "loop", T) in results for T in Ts):
            continue
        for impl in [i for i in have if i.startswith("triton")] or have[:1]:
            cells = []
            for T in Ts:
                ours, loop, sd = results[kind, b, impl, T], results[kind, b, "loop", T], results["sdpa", T]
                cells += [f"{x(ours, loop, 'fwd')} / {x(ours, loop, 'fwd+bwd')}",
                          f"{x(ours, sd, 'fwd')} / {x(ours, sd, 'fwd+bwd')}"]
            print(f"| {kind} | {b} | {impl} | " + " | ".join(cells) + " |", flush=True)

if __name__ == "__main__":
    main()
