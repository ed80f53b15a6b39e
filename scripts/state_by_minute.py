"""
Where a TTT model's loss goes over a long conversation, and where its fast weights go: for each
checkpoint, the held-out loss on the speech frames (recall events left out) by minute, and for each
TTT layer how far its fast weights W1 have moved from their learnt start, ||W1 - W1_start|| /
||W1_start||, averaged over the conversations. A model without TTT (--n_ttt 0) trained the same way
is the control: its state is the same at every minute, so its loss shows what the data does.

    python data.py synthetic --hours 3.000001 --min_minutes 90 --max_minutes 90 --seed 1 \\
        --events_per_min 0 --out plain.bin
    python scripts/state_by_minute.py --data plain.bin --ckpt demo --ckpt runs/window
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from codes import CodesFile  # noqa: E402
from data import load_events  # noqa: E402
from evaluate import (FRAMES_PER_MINUTE, check_fits, chunk, describe_half_lives, event_spans, learnt_half_lives,  # noqa: E402
                      minute_losses, speech_frames)
from model import SpeechLM, default_device  # noqa: E402


@torch.no_grad()
def by_minute(model, f, convs, events):
    """Speech-frame loss per minute [minutes] and, per TTT layer, the fast weights' relative distance
    from their start at the end of each minute [minutes] (both over the rows of convs)."""
    cfg = model.cfg
    n = int(f.lengths[convs].max())
    minutes = -(-n // FRAMES_PER_MINUTE)
    ce, cnt = np.zeros((minutes, cfg.n_audio)), np.zeros((minutes, cfg.n_audio))
    device = next(model.parameters()).device
    state = model.init_state(len(convs), device)
    start_w = [s.params[0].clone() for s in state.ttt]
    moved = np.zeros((len(start_w), minutes))
    spans = event_spans(events[np.isin(events[:, 0], convs)], list(convs), max(cfg.col_delays()))
    for m in range(minutes):
        start, T = m * FRAMES_PER_MINUTE, min(FRAMES_PER_MINUTE, n - m * FRAMES_PER_MINUTE)
        x, live = chunk(f, convs, start, T, cfg.col_delays(), cfg.col_cards())
        speech = torch.from_numpy(speech_frames(spans, live, start)).to(device)
        x = torch.from_numpy(x).to(device)
        logits, state = model(x, state)
        target = x[..., cfg.n_text:]
        loss = F.cross_entropy(logits.audio.float().flatten(0, 2), target.flatten(), reduction="none",
                               ignore_index=cfg.cardinality).view(target.shape)
        valid = ((target != cfg.cardinality) & speech[..., None]).float()
        ce[m], cnt[m] = (loss * valid).sum((0, 1)).cpu().numpy(), valid.sum((0, 1)).cpu().numpy()
        for j, (s, w0) in enumerate(zip(state.ttt, start_w)):
            d = (s.params[0] - w0).flatten(1).norm(dim=1) / w0.flatten(1).norm(dim=1)
            moved[j, m] = d.mean().item()
    return np.array(minute_losses(ce, cnt, cfg)["loss"]), moved


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="held-out codes file (data.py synthetic)")
    ap.add_argument("--ckpt", action="append", required=True, help="a checkpoint (run folder or .safetensors); repeat")
    ap.add_argument("--conversations", type=int, default=0, help="the first N conversations (0: all)")
    ap.add_argument("--device", default="", help="cpu, cuda, ... (default: cuda where there is one)")
    ap.add_argument("--blocks", default="1-5,6-20,21-45,46-85,86-90",
                    help="minute ranges to average over, comma-separated (1-based, inclusive)")
    a = ap.parse_args(argv)
    try:
        device = default_device(a.device)
    except ValueError as e:
        ap.error(str(e))
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32 or device.type == "cuda"
    try:
        return tables(a, device)
    finally:   # a caller's later work (a test suite's) keeps its own setting
        torch.backends.cuda.matmul.allow_tf32 = tf32


def tables(a, device):
    """main's work, for its parsed arguments: print the tables, return {name: dict(loss, moved)}."""
    torch.set_num_threads(min(8, os.cpu_count() or 1))
    f = CodesFile(a.data)
    convs = list(range(len(f)))[:a.conversations or None]
    events = load_events(a.data)
    blocks = [tuple(int(v) for v in b.split("-")) for b in a.blocks.split(",")]
    cols, rows = ["minutes"], [[f"{lo}-{hi}"] for lo, hi in blocks]
    out = {}
    for path in a.ckpt:
        model = SpeechLM.from_checkpoint(path, device=device).eval()
        try:
            check_fits(model.cfg, f, a.data)
        except ValueError as e:
            sys.exit(f"{path}: {e}")
        loss, moved = by_minute(model, f, convs, events)
        if len(loss) < blocks[-1][1]:
            sys.exit(f"{a.data}: {len(loss)} minutes, fewer than --blocks asks for")
        name = os.path.basename(os.path.normpath(path)).removesuffix(".safetensors")
        if name == "model":   # run/model.safetensors: the run's name
            name = os.path.basename(os.path.dirname(os.path.abspath(path)))
        if name in out:   # runs of the same name from different experiments: the path as given
            name = path
        out[name] = dict(loss=loss.tolist(), moved=moved.tolist())
        if learnt_half_lives(model):
            print(f"{name}:\n{describe_half_lives(learnt_half_lives(model))}\n")
        cols.append(f"{name}: speech loss")
        cols += [f"{name}: TTT layer {j + 1} moved" for j in range(len(moved))]
        for r, (lo, hi) in zip(rows, blocks):
            r.append(f"{loss[lo - 1:hi].mean():.3f}")
            r += [f"{mv[hi - 1]:.3f}" for mv in moved]   # at the block's last minute
    print(f"{len(convs)} conversations of {a.data}; speech loss: mean over the minutes; moved: "
          f"||W1 - W1_start|| / ||W1_start|| at the block's last minute\n")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(r) + " |")
    return out


if __name__ == "__main__":
    main()
