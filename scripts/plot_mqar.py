"""
Recall accuracy by distance from the logs of scripts/recall_mqar.sh (scripts/recall_toy.py --mqar
--eval_lens ...), one line a log, the held-out reads of every length pooled by distance bucket:

    python scripts/plot_mqar.py runs/mqar/*.log --out runs/mqar/recall_by_distance.png

Prints the pooled table; the figure needs matplotlib.
"""
import argparse
import os
import re
import sys

LINE = re.compile(r"^held-out, (\d+) tokens: recall accuracy by distance (.*)$")
BUCKET = re.compile(r"(\d+)-(\d+): ([\d.]+) \((\d+)\)")


def pooled(path):
    """{(lo, hi): [hits, n]} over every held-out read in a log (hits rebuilt from the printed accuracy)."""
    out = {}
    with open(path) as f:
        for line in f:
            m = LINE.match(line.strip())
            for lo, hi, acc, n in BUCKET.findall(m.group(2)) if m else []:
                s = out.setdefault((int(lo), int(hi)), [0.0, 0])
                s[0] += float(acc) * int(n)
                s[1] += int(n)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("logs", nargs="+")
    ap.add_argument("--out", default="", help="PNG to write (needs matplotlib)")
    ap.add_argument("--chance", type=float, default=1 / 128, help="the chance level to draw (default 1/128)")
    a = ap.parse_args(argv)
    curves = {os.path.splitext(os.path.basename(p))[0]: pooled(p) for p in a.logs}
    curves = {k: v for k, v in curves.items() if v}
    if not curves:
        sys.exit("no held-out reads in these logs (run scripts/recall_toy.py with --mqar and --eval_lens)")
    buckets = sorted({b for c in curves.values() for b in c})
    print("distance | " + " | ".join(curves))
    for b in buckets:
        cells = [f"{c[b][0] / c[b][1]:.2f} ({c[b][1]})" if b in c else "-" for c in curves.values()]
        print(f"{b[0]}-{b[1]} | " + " | ".join(cells))
    if a.out:
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            sys.exit("matplotlib is not installed: no figure (pip install matplotlib); the table is above")
        fig, ax = plt.subplots(figsize=(7, 4))
        for name, c in curves.items():
            bs = sorted(c)
            ax.plot([(lo * hi) ** 0.5 for lo, hi in bs], [c[b][0] / c[b][1] for b in bs], marker="o", label=name)
        ax.axhline(a.chance, color="gray", ls=":", label="chance")
        ax.axvline(256, color="gray", ls="--", lw=0.8)
        ax.text(256, 1.02, " training length", fontsize=8, color="gray")
        ax.set_xscale("log")
        ax.set_ylim(-0.02, 1.08)
        ax.set_xlabel("distance since the pair was written (tokens)")
        ax.set_ylabel("recall accuracy")
        ax.legend(fontsize=7, loc="center left")
        fig.tight_layout()
        fig.savefig(a.out, dpi=110)
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
