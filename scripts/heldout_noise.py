"""
How much of a loss-by-minute curve is the held-out conversations' own: the speech-frame loss by
minute (evaluate.py's, recall events left out) of one checkpoint on each group of --group
conversations of a held-out file, and on all of them together. Give it a window model: it remembers
nothing past its window, so its loss moves from minute to minute only with the data. Where the groups
disagree as much as a model's rise over the conversation, that rise cannot be read on so few
conversations.

    python data.py synthetic --out heldout32.bin --hours 48.000001 --min_minutes 90 --max_minutes 90 --seed 1 ...
    python scripts/heldout_noise.py --ckpt runs/window --data heldout32.bin --group 4

Per group and for all: the loss at minute 4 and at the last minute, the means of the first and the
last --block minutes, and the spread of the --block-minute means (highest - lowest). Then the data's
spread of the generation statistics (evaluate.py's, 5-95% of the minutes) over the first group and
over all, the range a generation is read against.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from codes import CodesFile  # noqa: E402
from data import load_events  # noqa: E402
from evaluate import STATS, check_fits, minute_losses, most_common_frame, reference_stats, stream_eval  # noqa: E402
from model import SpeechLM, default_device  # noqa: E402


def group_losses(model, f, events, group, chunk=512, device="cpu"):
    """Speech-frame loss by minute of each group of `group` consecutive conversations of codes file f,
    and of all of them (every frame weighted alike, not a mean of the groups)."""
    sums = []
    for i in range(0, len(f), group):
        convs = list(range(i, min(i + group, len(f))))
        r = stream_eval(model, f, events[np.isin(events[:, 0], convs)] if len(events) else events, convs, chunk, device)
        sums.append((r["ce_speech"], r["n_speech"]))
    n_min = min(len(c) for c, _ in sums)   # the minutes every group has
    groups = [minute_losses(c[:n_min], n[:n_min], model.cfg)["loss"] for c, n in sums]
    every = minute_losses(sum(c[:n_min] for c, _ in sums), sum(n[:n_min] for _, n in sums), model.cfg)["loss"]
    return groups, every


def describe(x, block=5):
    """Minute 4 (or the last, if shorter), the last minute, the first and last `block`-minute means, and
    the spread of the block means (None with fewer than two blocks)."""
    x = np.asarray(x, dtype=np.float64)
    blocks = [x[i:i + block].mean() for i in range(0, len(x) - block + 1, block)]
    return dict(minute4=float(x[min(3, len(x) - 1)]), last=float(x[-1]), first_block=float(x[:block].mean()),
                last_block=float(x[-block:].mean()),
                blocks_spread=float(max(blocks) - min(blocks)) if len(blocks) > 1 else None)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="a checkpoint (a window model: the control)")
    ap.add_argument("--data", required=True, help="held-out codes file of several long conversations")
    ap.add_argument("--group", type=int, default=4, help="conversations a group (the experiment's held-out count)")
    ap.add_argument("--block", type=int, default=5, help="minutes a block")
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--device", default="")
    a = ap.parse_args(argv)
    if a.group < 1 or a.block < 1:
        ap.error(f"--group and --block must be >= 1, not {a.group} and {a.block}")
    try:
        device = default_device(a.device)
        model = SpeechLM.from_checkpoint(a.ckpt, device=device).eval()
        f = CodesFile(a.data)
        check_fits(model.cfg, f, a.data)
    except (ValueError, OSError) as e:
        ap.error(str(e))
    groups, every = group_losses(model, f, load_events(a.data), a.group, a.chunk, device)
    rows = [(f"conversations {i * a.group}-{min((i + 1) * a.group, len(f)) - 1}", g) for i, g in enumerate(groups)]
    rows.append((f"all {len(f)}", every))
    b = a.block
    print(f"| conversations | minute 4 | minute {len(every)} | min 1-{b} | last {b} | last {b} - min 1-{b} | "
          f"minute {len(every)} - minute 4 | spread of {b}-minute means |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    out = {}
    for name, x in rows:
        d = out[name] = {**describe(x, b), "loss": list(map(float, x))}
        spread = "-" if d["blocks_spread"] is None else f"{d['blocks_spread']:.3f}"
        print(f"| {name} | {d['minute4']:.3f} | {d['last']:.3f} | {d['first_block']:.3f} | {d['last_block']:.3f} | "
              f"{d['last_block'] - d['first_block']:+.3f} | {d['last'] - d['minute4']:+.3f} | {spread} |")
    if len(groups) > 1:
        print(f"\nstandard deviation of a minute's loss across the groups (mean over minutes): "
              f"{np.std(np.array(groups), axis=0, ddof=1).mean():.4f}")
    silence = most_common_frame(f)
    first, every_conv = list(range(min(a.group, len(f)))), list(range(len(f)))
    spreads = {k: reference_stats(f, c, silence)["spread"] for k, c in ((rows[0][0], first), (rows[-1][0], every_conv))}
    print("\nthe data's spread of the generation statistics (5-95% of the minutes):")
    for k in STATS:
        print(f"  {k}: " + " | ".join(f"{name} {lo:.4g}-{hi:.4g}" for name, (lo, hi) in ((n, s[k]) for n, s in spreads.items())))
    out["spread"] = spreads
    return out


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
