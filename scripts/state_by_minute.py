"""
Where a TTT model's loss goes over a long conversation, and where its fast weights go: for each
checkpoint, the held-out loss on the speech frames (recall events left out) by minute, and for each
TTT layer where its fast weights are against their learnt start. A model without TTT (--n_ttt 0)
trained the same way is the control: its state is the same at every minute, so its loss shows what
the data does.

Per minute:
- speech loss: with everything carried from the conversation's start;
- fresh memory: the same minute with the TTT layers' state reset to their learnt start at the
  minute's first frame (attention cache and positions carried). Carried minus fresh is what the
  memory of the earlier minutes does to this one: a rise in the first and not in the second is the
  memory's doing;
per TTT layer, at the minute's end:
- W1 moved: ||W1 - W1_start|| / ||W1_start||;
- all moved: the same over all fast weights together (biases included), the unit of
  train.py --ttt_update_penalty;
- turned: 1 - cos between the fast weights' offset from their start (all of them, per head) now and
  at the end of the first block: 0 while they move along one direction, up to 2 when reversed
  (heads whose offset is zero have no direction: left out; n/a when all are).

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


def _offsets(s, starts):
    """The fast weights' offsets from their start per row and head [B, H, n] (all of them, flattened)."""
    return torch.cat([(w - w0).flatten(2) for w, w0 in zip(s.params, starts)], dim=2)


def _loss_sums(model, x, state, speech):
    """Speech-frame cross-entropy sums and counts per codebook for frames x, and the new state."""
    cfg = model.cfg
    logits, state = model(x, state)
    target = x[..., cfg.n_text:]
    loss = F.cross_entropy(logits.audio.float().flatten(0, 2), target.flatten(), reduction="none",
                           ignore_index=cfg.cardinality).view(target.shape)
    valid = ((target != cfg.cardinality) & speech[..., None]).float()
    return (loss * valid).sum((0, 1)).cpu().numpy(), valid.sum((0, 1)).cpu().numpy(), state


@torch.no_grad()
def by_minute(model, f, convs, events, ref_minute=1):
    """For the rows of convs, by minute: the speech-frame loss carried and with fresh memory
    [minutes] each, and per TTT layer [layers, minutes] W1's and all fast weights' relative distance
    from their start and their offset's turn since minute ref_minute (1-based), at each minute's end."""
    cfg = model.cfg
    n = int(f.lengths[convs].max())
    minutes = -(-n // FRAMES_PER_MINUTE)
    ce, cnt = np.zeros((minutes, cfg.n_audio)), np.zeros((minutes, cfg.n_audio))
    ce_fresh = np.zeros((minutes, cfg.n_audio))
    device = next(model.parameters()).device
    state = model.init_state(len(convs), device)
    starts = [s.params for s in state.ttt]
    size_w1 = [w[0].flatten(2).norm(dim=2) for w in starts]                              # [B, H]
    size_all = [torch.cat([w.flatten(2) for w in ws], 2).norm(dim=2) for ws in starts]
    moved, moved_all, turned = (np.zeros((len(starts), minutes)) for _ in range(3))
    ref = [None] * len(starts)
    spans = event_spans(events[np.isin(events[:, 0], convs)], list(convs), max(cfg.col_delays()))
    for m in range(minutes):
        start, T = m * FRAMES_PER_MINUTE, min(FRAMES_PER_MINUTE, n - m * FRAMES_PER_MINUTE)
        x, live = chunk(f, convs, start, T, cfg.col_delays(), cfg.col_cards())
        speech = torch.from_numpy(speech_frames(spans, live, start)).to(device)
        x = torch.from_numpy(x).to(device)
        if starts:   # the same minute from a fresh memory (its place in the mini-batch kept); the carried state untouched
            fresh = tuple(s._replace(params=p, grads=tuple(torch.zeros_like(w) for w in p)) for s, p in zip(state.ttt, starts))
            ce_fresh[m] = _loss_sums(model, x, state._replace(ttt=fresh), speech)[0]
        ce[m], cnt[m], state = _loss_sums(model, x, state, speech)
        for j, (s, w0) in enumerate(zip(state.ttt, starts)):
            off = _offsets(s, w0)
            moved[j, m] = ((s.params[0] - w0[0]).flatten(2).norm(dim=2) / size_w1[j]).mean().item()
            moved_all[j, m] = (off.norm(dim=2) / size_all[j]).mean().item()
            if m + 1 == ref_minute:
                ref[j] = off
            if ref[j] is not None:   # heads whose offset is zero, now or then, have no direction: left out
                sizes = off.norm(dim=2) * ref[j].norm(dim=2)
                cos = (off * ref[j]).sum(2) / torch.where(sizes > 0, sizes, torch.nan)
                turned[j, m] = (1 - cos).nanmean().item()
    loss = np.array(minute_losses(ce, cnt, cfg)["loss"])
    loss_fresh = np.array(minute_losses(ce_fresh, cnt, cfg)["loss"]) if starts else loss
    return dict(loss=loss, fresh=loss_fresh, moved=moved, moved_all=moved_all, turned=turned)


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
    """main's work, for its parsed arguments: print a table for each checkpoint, return
    {name: dict(loss, fresh, moved, moved_all, turned)} (lists by minute; per TTT layer for the last three)."""
    torch.set_num_threads(min(8, os.cpu_count() or 1))
    f = CodesFile(a.data)
    convs = list(range(len(f)))[:a.conversations or None]
    events = load_events(a.data)
    blocks = [tuple(int(v) for v in b.split("-")) for b in a.blocks.split(",")]
    print(f"{len(convs)} conversations of {a.data}. Losses: the mean over a block's minutes; the fast weights: "
          f"at its last minute; turned: since minute {blocks[0][1]}\n")
    out = {}
    for path in a.ckpt:
        model = SpeechLM.from_checkpoint(path, device=device).eval()
        try:
            check_fits(model.cfg, f, a.data)
        except ValueError as e:
            sys.exit(f"{path}: {e}")
        r = by_minute(model, f, convs, events, ref_minute=blocks[0][1])
        if len(r["loss"]) < blocks[-1][1]:
            sys.exit(f"{a.data}: {len(r['loss'])} minutes, fewer than --blocks asks for")
        name = os.path.basename(os.path.normpath(path)).removesuffix(".safetensors")
        if name == "model":   # run/model.safetensors: the run's name
            name = os.path.basename(os.path.dirname(os.path.abspath(path)))
        if name in out:   # runs of the same name from different experiments: the path as given
            name = path
        out[name] = {k: v.tolist() for k, v in r.items()}
        if learnt_half_lives(model):
            print(f"{name}:\n{describe_half_lives(learnt_half_lives(model))}\n")
        layers = len(r["moved"])
        cols = ["minutes", "speech loss", "fresh memory", "carried - fresh"]
        cols += [f"TTT layer {j + 1}: W1 / all moved, turned" for j in range(layers)]
        print(f"{name}\n\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
        for lo, hi in blocks:
            loss, fresh = r["loss"][lo - 1:hi].mean(), r["fresh"][lo - 1:hi].mean()
            row = [f"{lo}-{hi}", f"{loss:.3f}"] + ([f"{fresh:.3f}", f"{loss - fresh:+.3f}"] if layers else ["", ""])
            row += [f"{r['moved'][j, hi - 1]:.3f} / {r['moved_all'][j, hi - 1]:.3f}, "
                    + ("n/a" if np.isnan(r["turned"][j, hi - 1]) else f"{r['turned'][j, hi - 1]:.3f}") for j in range(layers)]
            print("| " + " | ".join(row) + " |")
        print()
    return out


if __name__ == "__main__":
    main()
