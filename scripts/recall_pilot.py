"""
Does a model learn the recall events of a codes file? Trains a fresh model on random windows of
a synthetic codes file (data.py synthetic) and prints, every --every steps, the share of frames that
are answerable recalls (a recalled value frame whose first mention is inside the same window) and
the top-1 accuracy on their semantic codebook: over the training batches since the last print, and
over every whole window of a held-out file (chance 1/64 with --pattern_codes 64).
A quick check of a data layout before a long run; minibatch windows, fresh state, float32, CPU or --device cuda.

    python data.py synthetic --out drills.bin --hours 40 --min_minutes 2 --max_minutes 4 \
        --n_codebooks 1 --events_per_min 8 --near_share 1 --near_max_s 2 --pattern_codes 64 \
        --value_frames 32 --quiz_share 1 --same_speaker true
    python data.py synthetic --out drills_held.bin --hours 0.2 --min_minutes 4 --max_minutes 4 --seed 1 \
        --n_codebooks 1 --events_per_min 8 --near_share 1 --near_max_s 2 --pattern_codes 64 \
        --value_frames 32 --quiz_share 1 --same_speaker true
    python scripts/recall_pilot.py --data drills.bin --held drills_held.bin --layers 2 --seq_len 128 \
        --batch 16 --depth_layers 0 --steps 1000

On a 2-core CPU: with --near_max_s 2 (each recall right after its first mention) 26% of the frames
are answerable recalls, and held-out accuracy jumps from chance to 39% at step 300 and 100% at
step 400. Such drills can be answered by copying from a fixed distance back. With --near_max_s 10
(recalls 2-10 s later, other events in between: a lookup by content; --seq_len 256) the model stays at
chance through step 1000 with --pattern_codes 64 (a code recurs every few frames), and reaches
0.69 at step 1000 with --pattern_codes 1024 (chance 1/1024). On an H100 (--device cuda
--every 500): 8 codebooks drawn on their own (64 codes, right after), chance through step 8000;
8 codebooks with --tied_patterns true (the acoustic codes follow from the semantic one, as in
speech), 0.44 at step 1000 and 1.000 from 6000; tied, 1024 codes, --near_max_s 10: 0.34 at step
2000 with --layers 2 --dim 128 --seq_len 256, and 0.30 at step 3000 with --layers 8 --dim 512
--seq_len 512 (the gpu scale's shape). A depth decoder block slows the jump: with --depth_layers
2 the tied drills' jump starts only at step 1500 (CPU, held-out 0.059).

    python data.py synthetic --out t0.bin --hours 20 --min_minutes 2 --max_minutes 4 --n_codebooks 8 \
        --events_per_min 8 --near_share 1 --near_max_s 10 --pattern_codes 1024 --value_frames 32 \
        --quiz_share 1 --same_speaker true --tied_patterns true
    (t1.bin: the same with --hours 0.2 --min_minutes 4 --seed 1)
    python scripts/recall_pilot.py --data t0.bin --held t1.bin --layers 8 --dim 512 --seq_len 512 \
        --batch 16 --depth_layers 0 --device cuda --steps 4000 --every 500
"""
import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data as D  # noqa: E402
from codes import CodesFile  # noqa: E402
from model import Config, SpeechLM, loss_fn  # noqa: E402


def recall_masks(f, events):
    """conversation -> int [frames, streams]: at the recalled value frames, where the first mention
    (its key) starts; -1 elsewhere."""
    masks = {}
    for conv, s, first, rec, vl in events:
        m = masks.setdefault(int(conv), np.full((f.lengths[conv], f.n_streams), -1, np.int64))
        m[rec:rec + vl, s] = first - D.KEY_LEN
    return masks


def answerable(masks, c, start, T, n_streams):
    """bool [T, streams]: recalled frames of the window whose first mention is inside it."""
    m = masks.get(int(c))
    return np.zeros((T, n_streams), bool) if m is None else m[start:start + T] >= start


def hits(logits, x, mask, K):
    """(correct, total) top-1 on the semantic codebook of each stream where mask [B, T, S]."""
    h = n = 0
    for s in range(mask.shape[-1]):
        m = mask[..., s]
        h += (logits.audio[:, :, s * K].argmax(-1)[m] == x[:, :, s * K][m]).sum().item()
        n += m.sum().item()
    return h, n


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--held", required=True)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--seq_len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--depth_layers", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (float32 either way)")
    a = ap.parse_args(argv)
    dev = torch.device(a.device)
    torch.manual_seed(a.seed)
    f, hf = CodesFile(a.data, check_codes=False), CodesFile(a.held, check_codes=False)
    masks, held_masks = recall_masks(f, D.load_events(a.data)), recall_masks(hf, D.load_events(a.held))
    K = f.n_codebooks
    cfg = Config.preset("demo", n_codebooks=K, dim=a.dim, n_layers=a.layers, n_heads=a.dim // 32,
                        n_kv_heads=a.dim // 64, hidden=3 * a.dim, window=a.seq_len, n_ttt=0, depth_layers=a.depth_layers)
    model = SpeechLM(cfg).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.1, betas=(0.9, 0.95))
    delays, initial = cfg.col_delays(), cfg.col_cards()
    rng = np.random.default_rng(a.seed)
    share = np.mean([(m >= 0).any(1).mean() for m in masks.values()]) if masks else 0.0
    print(f"{len(masks)} conversations with events, {share:.0%} of their frames recalled", flush=True)
    t0, h, n, lsum, seen = time.time(), 0, 0, 0.0, 0
    for step in range(1, a.steps + 1):
        cs = rng.choice(len(f.lengths), size=a.batch)
        st = [int(rng.integers(0, f.lengths[c] - a.seq_len + 1)) for c in cs]
        x = torch.from_numpy(np.stack([D.window(f.conversation(c), s, a.seq_len, delays, initial)
                                       for c, s in zip(cs, st)])).to(dev)
        mk = torch.from_numpy(np.stack([answerable(masks, c, s, a.seq_len, f.n_streams) for c, s in zip(cs, st)])).to(dev)
        seen += a.batch * a.seq_len
        for g in opt.param_groups:
            g["lr"] = a.lr * min(1.0, step / 50)
        logits, _ = model(x)
        loss, _ = loss_fn(logits, x, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            dh, dn = hits(logits, x, mk, K)
        h, n, lsum = h + dh, n + dn, lsum + loss.item()
        if step % a.every == 0:
            hh = hn = 0
            with torch.no_grad():
                for c in range(len(hf.lengths)):
                    for s in range(0, hf.lengths[c] - a.seq_len + 1, a.seq_len):
                        xx = torch.from_numpy(D.window(hf.conversation(c), s, a.seq_len, delays, initial))[None].to(dev)
                        m = torch.from_numpy(answerable(held_masks, c, s, a.seq_len, hf.n_streams))[None].to(dev)
                        if m.any():
                            dh, dn = hits(model(xx)[0], xx, m, K)
                            hh, hn = hh + dh, hn + dn
            print(f"step {step:5d} | loss {lsum / a.every:.3f} | answerable recalled frames {n / seen:.0%} | "
                  f"recall accuracy: training {h / max(n, 1):.3f}, held-out {hh / max(hn, 1):.3f} | "
                  f"{time.time() - t0:.0f}s", flush=True)
            h, n, lsum, seen = 0, 0, 0.0, 0


if __name__ == "__main__":
    main()
