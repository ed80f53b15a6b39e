"""
Multi-query associative recall (MQAR, Arora et al. 2023) as a codes file that train.py and
evaluate.py read: the recall toy's task (scripts/recall_toy.py --mqar) through the real pipeline.

    python scripts/mqar_codes.py --out runs/mqar/train.bin --sequences 45000 --seed 0
    python scripts/mqar_codes.py --out runs/mqar/heldout.bin --sequences 200 --seed 1

Each sequence is one "conversation" of one stream and one codebook: `pairs` key-value pairs open
it (keys from the codes 0..A/2-1, values from A/2..A-1), then every key comes back once, followed by
its value, at a random place past `start`; the rest is noise from the codes A..2A-1. The events
file lists each recalled value, so `train.py --recall_weight` can weigh them and evaluate.py scores
their recall by distance.

Two switches move the task toward data.py's recall drills, one difference at a time: keys of
several frames (`--key_frames 2`, as the drills' keys) and keys and values drawn from the same
codes (`--shared_codes`, as the drills' patterns).
"""
import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from codes import CodesWriter  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="codes file to write (and OUT.events.json)")
    ap.add_argument("--sequences", type=int, default=1000)
    ap.add_argument("--seq_len", type=int, default=257, help="frames a sequence (train.py --seq_len 256 reads 257)")
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--alphabet", type=int, default=256, help="codes of keys and values (half each); the noise has as many")
    ap.add_argument("--start", type=int, default=47,
                    help="first frame where keys come back (default: past two 16-frame windows' reach from the last pair)")
    ap.add_argument("--streams", type=int, default=1,
                    help="streams a frame; the task is on stream 0, the others hold one constant code (a silent speaker)")
    ap.add_argument("--key_frames", type=int, default=1, help="frames a key (each drawn on its own); a value is one frame")
    ap.add_argument("--shared_codes", action="store_true",
                    help="keys and values both from the codes 0..A-1 (default: keys from the first half, values from the second)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    T, P, A, K = a.seq_len, a.pairs, a.alphabet, a.key_frames
    L = K + 1                           # frames a pair
    slots = (T - a.start) // L
    if not (2 <= A and 2 * A <= 2048 and P <= A // 2 and P <= slots and a.start >= L * P and K >= 1):
        ap.error(f"need key_frames >= 1, pairs <= alphabet/2, pairs <= (seq_len - start)/(key_frames + 1) = {slots}, "
                 f"start >= (key_frames + 1) pairs and 2 alphabet <= 2048")
    rng = np.random.default_rng(a.seed)
    keys, values, noise = np.arange(A // 2), np.arange(A // 2, A), np.arange(A, 2 * A)
    if a.shared_codes:
        keys = values = np.arange(A)
    events = []
    with CodesWriter(a.out, n_streams=a.streams, n_codebooks=1, cardinality=2048, frame_rate=12.5) as w:
        for c in range(a.sequences):
            x = noise[rng.integers(0, A, T)]
            if K == 1:                  # (the draws of the original task, kept for its files)
                k = rng.permutation(keys)[:P, None]
            else:
                k = keys[rng.integers(0, len(keys), (P, K))]
            v = values[rng.integers(0, len(values), P)]
            back = a.start + L * rng.permutation(slots)[:P]
            for i in range(P):
                x[L * i:L * i + K], x[L * i + K] = k[i], v[i]
                x[back[i]:back[i] + K], x[back[i] + K] = k[i], v[i]
                events.append((c, 0, L * i + K, int(back[i]) + K, 1))
            frames = np.full((T, a.streams, 1), 2047)
            frames[:, 0, 0] = x
            w.add(frames)
    with open(a.out + ".events.json", "w") as f:
        json.dump({"columns": ["conversation", "stream", "first_value_start", "recall_value_start", "value_len"],
                   "value_codes": len(values), "events": events}, f)   # value_codes: evaluate.py's chance is 1/that
    print(f"wrote {a.sequences} sequences of {T} frames, {len(events)} recalls, to {a.out}")


if __name__ == "__main__":
    main()
