"""
What a training chunk tells a learnt half-life: the gradient of each chunk's loss with respect to each
TTT layer's log-half-lives, chunk after chunk of held-out conversations, the state carried between
chunks and not differentiated through (as train.py's streaming mode does). Per half-life, the mean
gradient over the chunks against its spread (signal to noise: how consistently a chunk asks for a
longer or a shorter half-life), by where the half-life stands.

    python scripts/half_life_gradients.py --ckpt runs/exp/runs/ttt_linear_seed7 --data runs/exp/data/heldout.bin

A model with learnt half-lives (model.py's ttt_half_life_max) only. Prints a table (markdown).
"""
import argparse
import math
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from codes import CodesFile  # noqa: E402
from data import StreamSampler  # noqa: E402
from model import SpeechLM, default_device, detach_state, loss_fn  # noqa: E402

FRAME_RATE = 12.5


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--data", required=True, help="codes file of long conversations")
    ap.add_argument("--chunk", type=int, default=1024, help="frames a chunk (the training seq_len)")
    ap.add_argument("--chunks", type=int, default=60, help="chunks a row")
    ap.add_argument("--batch", type=int, default=4, help="rows (conversations at a time)")
    ap.add_argument("--groups", type=int, default=4, help="groups of half-lives, by size")
    ap.add_argument("--device", default="")
    a = ap.parse_args(argv)
    if a.chunk < 1 or a.chunks < 2 or a.batch < 1 or a.groups < 1:
        ap.error("need --chunk >= 1, --chunks >= 2, --batch >= 1 and --groups >= 1")
    return a


def chunk_gradients(model, f, chunk, chunks, batch, device):
    """[chunks, layers, H, n] gradients of each chunk's loss (all rows) with respect to log_half_life."""
    layers = [b.ttt.layer for b in model.layers if b.ttt is not None and b.ttt.layer.log_half_life is not None]
    if not layers:
        raise ValueError("the model has no learnt half-lives (model.py's ttt_half_life_max)")
    cfg = model.cfg
    sampler = StreamSampler(f, list(range(len(f))), chunk, batch, cfg.col_delays(), cfg.col_cards(), seed=0)
    state, out = None, []
    for _ in range(chunks):
        x, reset = sampler.next()
        x = torch.from_numpy(x).to(device)
        state = model.init_state(batch, device) if state is None else model.reset_rows(
            state, torch.from_numpy(reset).to(device))
        logits, new = model(x, state)
        loss, _ = loss_fn(logits, x, cfg)
        hls = [t.log_half_life for t in layers]   # (unused when no mini-batch of the chunk completes before its end)
        grads = torch.autograd.grad(loss, hls, allow_unused=True)
        out.append(torch.stack([torch.zeros_like(h) if g is None else g for g, h in zip(grads, hls)]).detach().double().cpu())
        state = detach_state(new)
    return torch.stack(out), [t.half_lives().double().cpu() for t in layers]


def main(argv=None):
    a = parse_args(argv)
    device = default_device(a.device)
    model = SpeechLM.from_checkpoint(a.ckpt, device=device).train()
    f = CodesFile(a.data)
    g, hl = chunk_gradients(model, f, a.chunk, a.chunks, a.batch, device)   # [N, L, H, n], [L][H, n]
    mean, std = g.mean(0), g.std(0)
    snr = (mean.abs() / std.clamp_min(1e-30)).numpy()                         # [L, H, n]
    mag = g.abs().mean(0).numpy()
    hl_s = torch.stack(hl).numpy() / FRAME_RATE
    print(f"{os.path.normpath(a.ckpt)}: {a.chunks} chunks of {a.chunk} frames ({a.chunk / FRAME_RATE:.0f} s), "
          f"{a.batch} rows, {a.data}\n")
    print("| TTT layer | half-lives, s | features | mean abs gradient | signal / noise: median | 90% | "
          "chunks asking longer |")
    print("|---|---|---:|---:|---:|---:|---:|")
    rows = []
    for i in range(hl_s.shape[0]):
        order = np.argsort(hl_s[i].ravel())
        for grp in np.array_split(order, a.groups):
            h, s, m = hl_s[i].ravel()[grp], snr[i].ravel()[grp], mag[i].ravel()[grp]
            longer = (g[:, i].reshape(g.shape[0], -1)[:, grp] < 0).double().mean().item()   # descent lengthens
            rows.append(dict(layer=i + 1, lo=float(h.min()), hi=float(h.max()), n=len(grp), mag=float(m.mean()),
                             snr_median=float(np.median(s)), snr_90=float(np.percentile(s, 90)), longer=longer))
            r = rows[-1]
            print(f"| {r['layer']} | {r['lo']:.3g}-{r['hi']:.3g} | {r['n']} | {r['mag']:.3g} | {r['snr_median']:.3g} | "
                  f"{r['snr_90']:.3g} | {r['longer']:.2f} |", flush=True)
    print(f"\n(signal / noise: |mean| / standard deviation of a half-life's gradient over the chunks; noise "
          f"alone gives about 0.8 / sqrt({a.chunks}) = {0.8 / math.sqrt(a.chunks):.2f})")
    return rows


if __name__ == "__main__":
    main()
