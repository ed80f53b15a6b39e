"""
A diagnostic: how far would a TTT model's recall reach if its fast weights were written only where
the patterns are? The evaluation's loss pass (evaluate.stream_eval) with each TTT layer's per-token
learning rate multiplied by --scale on every frame outside the recall events (cue, key, value and the
delayed columns after them, of first mentions and recalls alike), the events' frames as trained. The
frames outside are the ones a model cannot tell from speech without being told: scale 1 is the model
as it is, scale 0 writes nothing but the patterns. Printed for each scale: recall accuracy by
distance since the first mention, beyond the stacked windows' reach, and the speech-frame loss at the
start and the end of the conversations (what the speech loses when it is not written).

    python scripts/oracle_writes.py --data heldout.bin --ckpt runs/ttt_linear --scale 1,0.3,0.1,0
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from evaluate import (FRAMES_PER_MINUTE, check_fits, event_spans, minute_losses, recall_data, recall_table,  # noqa: E402
                      stream_eval)
from model import SpeechLM  # noqa: E402


def scaled_writes(model, f, events, convs, scale, chunk_len=750):
    """stream_eval of conversations convs with the TTT layers' learning rates times `scale` outside the
    events' spans (evaluate.event_spans); the model is left as it was."""
    layers = [b.ttt.layer for b in model.layers if b.ttt is not None]
    if not layers:
        raise ValueError("the model has no TTT layer")
    spans = event_spans(events, list(convs), max(model.cfg.col_delays()))
    n = int(f.lengths[convs].max())
    mult = torch.full((len(convs), n), float(scale))
    for r, lo, hi in spans:
        mult[r, max(lo, 0):hi] = 1.0
    at = {"start": 0}

    def track(mod, args):   # each loss-pass chunk: where it starts
        if at.get("T") is not None:
            at["start"] += at["T"]
        at["T"] = args[0].shape[1]

    def wrap(inner_inputs):
        def scaled(x, i):
            q, k, v, lr, tau = inner_inputs(x, i)
            m = mult[:, at["start"]:at["start"] + x.shape[1]].to(lr.device, lr.dtype)
            return q, k, v, lr * m[:, None, :], tau
        return scaled

    hook = model.register_forward_pre_hook(track)
    for t in layers:
        t.inner_inputs = wrap(t.inner_inputs)
    try:
        return stream_eval(model, f, events, list(convs), chunk_len)
    finally:
        hook.remove()
        for t in layers:
            del t.inner_inputs   # back to the class's method


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="held-out codes file with recall events (data.py synthetic)")
    ap.add_argument("--ckpt", action="append", required=True, help="a checkpoint with TTT layers; repeat")
    ap.add_argument("--scale", default="1,0.3,0.1,0",
                    help="comma-separated multipliers of the learning rate outside the events (1: as trained)")
    ap.add_argument("--ttt_half_life_s", type=float, default=None,
                    help="evaluate with this half-life of the fast weights, seconds, in place of the model's own "
                         "(as evaluate.py --ttt_half_life_s; 0: never forget)")
    ap.add_argument("--conversations", type=int, default=0, help="the first N conversations (0: all)")
    a = ap.parse_args(argv)
    if a.ttt_half_life_s is not None and not a.ttt_half_life_s >= 0:
        ap.error(f"--ttt_half_life_s must be 0 (never forget) or a number of seconds, not {a.ttt_half_life_s}")
    try:
        scales = [float(s) for s in a.scale.split(",") if s.strip()]
    except ValueError:
        ap.error(f"--scale takes numbers separated by commas, not {a.scale!r}")
    if not scales or not all(s >= 0 for s in scales):
        ap.error(f"--scale needs multipliers of 0 or more, not {a.scale!r}")
    torch.set_num_threads(min(8, os.cpu_count() or 1))
    try:
        f, convs, events = recall_data(a.data, a.conversations)
    except ValueError as e:
        sys.exit(str(e))
    out = {}
    for path in a.ckpt:
        model = SpeechLM.from_checkpoint(path).eval()
        if not any(b.ttt is not None for b in model.layers):
            sys.exit(f"{path} has no TTT layer: no fast weights to write into")
        if a.ttt_half_life_s is not None:   # (replaces learnt half-lives, if the model has them)
            model.set_ttt_half_life(a.ttt_half_life_s * FRAMES_PER_MINUTE / 60)
        cfg = model.cfg
        try:
            check_fits(cfg, f, a.data)
        except ValueError as e:
            sys.exit(f"{path}: {e}")
        reach = cfg.n_layers * (cfg.window - 1) + 1
        rows = []
        for s in scales:
            r = scaled_writes(model, f, events, convs, s)
            rec = recall_table(events, r["say_ce"], r["say_hit"], r["say_n"], cfg.window, reach)
            speech = minute_losses(r["ce_speech"], r["n_speech"], cfg)["loss"]
            rows.append(dict(scale=s, buckets=[(b["label"], b["accuracy"]) for b in rec["buckets"]],
                             beyond_reach=rec["beyond_reach"]["accuracy"],
                             speech_first5=float(np.mean(speech[:5])), speech_last5=float(np.mean(speech[-5:]))))
        out[path] = rows
        labels = [lab for lab, _ in rows[0]["buckets"]]
        hl = "" if a.ttt_half_life_s is None else f", a half-life of {a.ttt_half_life_s:g} s"
        print(f"{path}{hl}: {len(convs)} conversations; recall accuracy by distance, learning rate outside the "
              "events times the scale")
        print("| scale | " + " | ".join(labels) + " | beyond reach | speech loss min 1-5 / last 5 |")
        print("|---:|" + "---:|" * (len(labels) + 2))
        for row in rows:
            acc = " | ".join("-" if v is None else f"{v:.3f}" for _, v in row["buckets"])
            br = "-" if row["beyond_reach"] is None else f"{row['beyond_reach']:.3f}"
            print(f"| {row['scale']:g} | {acc} | {br} | {row['speech_first5']:.3f} / {row['speech_last5']:.3f} |")
        print()
    return out


if __name__ == "__main__":
    main()
