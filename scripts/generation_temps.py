"""
How the sampler decides where a generation starts, and whether a model drifts from there: one model's
generations from nothing at several temperatures, each read against the spread of held-out
conversations, minute by minute (evaluate.py's statistics: code entropy, repeated frames, silence share,
overlap, turns a minute).

    python scripts/generation_temps.py --ckpt runs/exp/runs/ttt_linear_seed7 --data runs/exp/data/heldout.bin \
        --temps 0.7,0.8,0.9,1.0 --minutes 10        # which temperature starts inside the spread
    python scripts/generation_temps.py --ckpt ... --data ... --temps 0.8 --minutes 90   # and stays there?

A temperature at which the first minutes lie inside the data's spread separates the two questions of
the experiment's generation goal: is the sampler right from the start, and does the model drift away
over 90 minutes. No top-k unless --top_k; --top_ps tries top-p values too, each with each temperature.
Prints a table (markdown) and writes --out (JSON) if given.
"""
import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from codes import CodesFile  # noqa: E402
from evaluate import STATS, generation_stats, most_common_frame, reference_stats  # noqa: E402
from model import SpeechLM, default_device  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="a model.safetensors or a run folder written by train.py")
    ap.add_argument("--data", required=True, help="held-out codes file: the spread to read the generations against")
    ap.add_argument("--temps", default="0.8,0.9,1.0", help="temperatures, comma-separated")
    ap.add_argument("--top_k", type=int, default=0, help="0: off")
    ap.add_argument("--top_ps", default="1", help="top-p values, comma-separated (1: off); each with each temperature")
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--first", type=int, default=5, help="minutes averaged at the start (and at the end)")
    ap.add_argument("--device", default="")
    ap.add_argument("--out", default="", help="write every minute's statistics here (JSON)")
    a = ap.parse_args(argv)
    try:
        a.temps = [float(t) for t in a.temps.split(",") if t.strip()]
        a.top_ps = [float(t) for t in a.top_ps.split(",") if t.strip()]
    except ValueError:
        ap.error(f"--temps and --top_ps take numbers separated by commas, not {a.temps!r} and {a.top_ps!r}")
    if (not a.temps or min(a.temps) < 0 or not a.top_ps or not all(0 < p <= 1 for p in a.top_ps)
            or not a.minutes > 0 or a.top_k < 0 or a.first < 1):
        ap.error("need temperatures >= 0, top-p in (0, 1], --minutes > 0, --top_k >= 0 and --first >= 1")
    return a


def outside(g, spread, lo, hi):
    """The statistics whose mean over generated minutes lo..hi-1 lies outside the data's spread."""
    return [k for k in STATS if not spread[k][0] <= float(np.mean(g[k][lo:hi])) <= spread[k][1]]


def main(argv=None):
    a = parse_args(argv)
    device = default_device(a.device)
    model = SpeechLM.from_checkpoint(a.ckpt, device=device).eval()
    f = CodesFile(a.data)
    convs = list(range(len(f)))
    silence = most_common_frame(f, convs[0])
    ref = reference_stats(f, convs, silence)
    spread = ref["spread"]
    n = a.first
    print(f"{os.path.normpath(a.ckpt)}; {a.data}: {len(convs)} conversations, spread ({ref['spread_percentiles'][0]}-"
          f"{ref['spread_percentiles'][1]}% of minutes): " + ", ".join(f"{k} {spread[k][0]:.3g}-{spread[k][1]:.3g}"
                                                                      for k in STATS) + "\n")
    print(f"| temperature | top-k | top-p | minutes | " + " | ".join(f"{k}: first {n} / last {n}" for k in STATS)
          + f" | outside the spread, first {n} / last {n} minutes |")
    print("|---|---|---|---|" + "---|" * (len(STATS) + 1))
    runs = {}
    for p in a.top_ps:
        for t in a.temps:
            g = generation_stats(model, a.minutes, silence, device, a.seed, t, a.top_k, top_p=p)
            m = len(g["minute"])
            runs[str(t) if len(a.top_ps) == 1 else f"{t}, top-p {p}"] = g
            cells = [f"{np.mean(g[k][:n]):.3g} / {np.mean(g[k][max(0, m - n):]):.3g}" for k in STATS]
            off = [", ".join(outside(g, spread, lo, hi)) or "none" for lo, hi in ((0, n), (max(0, m - n), m))]
            print(f"| {t:g} | {a.top_k or 'off'} | {p:g} | {m} | " + " | ".join(cells) + f" | {off[0]} / {off[1]} |",
                  flush=True)
    if a.out:
        with open(a.out, "w") as fh:
            json.dump({"ckpt": a.ckpt, "data": a.data, "top_k": a.top_k, "seed": a.seed, "reference": ref,
                       "generations": runs}, fh, indent=1)
    return runs


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
