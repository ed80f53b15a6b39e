"""
Memory over a 90-minute streaming run: one frame at a time through the model (backbone with its
windowed cache and TTT state, depth decoder), printing resident memory and the state's size at
minutes 1, 10, 45 and 90. Nothing may grow with the length of the conversation.

    python scripts/memory_flat.py                     # demo preset, 90 minutes, this CPU
    python scripts/memory_flat.py --minutes 5 --preset tiny
"""
import argparse
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from model import Config, SpeechLM, state_bytes  # noqa: E402


def rss_mb():
    with open("/proc/self/statm") as f:   # current resident set, not the high-water mark
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--minutes", type=float, default=90.0)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    m = SpeechLM(Config.preset(a.preset)).eval()
    cfg = m.cfg
    n = int(a.minutes * 60 * 12.5)
    marks = {int(x * 60 * 12.5): x for x in (1, 10, 45, 90) if x <= a.minutes}
    marks[n] = a.minutes
    g = torch.Generator().manual_seed(0)
    cards = torch.tensor(cfg.col_cards())
    state = m.init_state(1)
    rows, t0 = [], time.time()
    with torch.inference_mode():
        for t in range(1, n + 1):
            x = (torch.rand(1, 1, cfg.n_cols, generator=g) * cards).long()
            _, state = m(x, state)
            if t in marks:
                rows.append((marks[t], t, rss_mb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                             state_bytes(state) / 2**20, time.time() - t0))
                print(f"minute {marks[t]:g}: frame {t}, RSS {rows[-1][2]:.1f} MB, peak {rows[-1][3]:.1f} MB, "
                      f"state {rows[-1][4]:.3f} MB, {rows[-1][5]:.0f} s", flush=True)
    print(f"\n{a.preset} preset, {m.num_params() / 1e6:.1f}M parameters, window {cfg.window} frames, "
          f"{cfg.n_ttt} TTT layers; one frame at a time\n")
    print("| minute | frames | RSS MB | peak RSS MB | state MB |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]:g} | {r[1]} | {r[2]:.1f} | {r[3]:.1f} | {r[4]:.3f} |")
    first, last = rows[0], rows[-1]
    print(f"\npeak RSS from minute {first[0]:g} to minute {last[0]:g}: {(last[3] - first[3]) / first[3]:+.2%}; "
          f"state size {'unchanged' if first[4] == last[4] else 'CHANGED'}")


if __name__ == "__main__":
    main()
