"""
Evaluate a checkpoint on long held-out conversations, in constant memory.

    python data.py synthetic --hours 3 --min_minutes 90 --max_minutes 90 --seed 1 --out heldout.bin
    python evaluate.py --ckpt runs/train --data heldout.bin --out eval.json --plots figs/

Three measurements, all streamed: a conversation goes through the model in chunks with the state
carried, as in streaming training and in use, and each chunk's logits are reduced to a few sums and
dropped. Nothing the size of a whole conversation is ever held, so memory is the same for one minute
and for ninety.

1. Loss by minute. The training objective (model.loss_fn: semantic codebook weighted up) of every
   frame, summed into one bucket per minute of the conversation. A model that forgets who is
   speaking, or drifts, shows a loss that climbs with the minute. The same over the speech frames
   alone (the recall events left out) too: the events are easier than speech and data.py places
   more of them early in a conversation, so only this one compares like with like between minutes.
2. Recall. The synthetic conversations hold recall events (data.py): a value pattern of 8 frames (or --value_frames) of
   uniformly random codes (from all 2048 per codebook, or a fixed set of --pattern_codes A) is said
   once, and again up to an hour later after the same key. Loss and top-1 accuracy on the second
   saying's semantic codes (the first codebook: with --tied_patterns the others follow from it, so
   they would score without any memory), bucketed by the distance since the first, measure
   long-range memory. Chance is
   1/A (accuracy) and ln A nats (loss): nothing before the first saying predicts it, and the first
   saying itself is reported as that control. A
   distance within the model's attention window can be solved by one attention layer. Stacked, the
   layers reach n_layers x (window - 1) + 1 frames back, passing what they saw along through the
   frames in between; only a distance beyond that reach needs a memory that outlives the windows
   (TTT). Each bucket says which side of the window it is on; the totals include beyond the reach.
3. Generation. generate.generate makes one long conversation from nothing, one frame at a time;
   per minute we measure code entropy, repetition of whole frames, silence share, overlap and
   turn-taking rate, and the same statistics of the held-out data. A model that goes off the rails
   drifts away from the data: babble (entropy up), loops (repetition up), collapse into silence,
   one speaker only (no turns). The data's spread (5-95% of its minutes) says how far is too far:
   the last generated minute is checked against it.

Output: a JSON file of every number, a printed table, and with --plots the figures (matplotlib).
"""
import argparse
import json
import math
import os
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F

from codes import CodesFile, CodesFormatError
from data import CUE_LEN, KEY_LEN, load_events, pattern_codes, window
from generate import FrameStep, Sampler, generate, peak_memory_mb
from model import SpeechLM, default_device, state_bytes

FRAME_RATE = 12.5
FRAMES_PER_MINUTE = 750
# recall distance buckets in seconds: inside a 20 s window (250 frames), inside Moshi's 4 min
# context (3000 frames), and beyond both; data.py draws distances log-uniform from 10 s to 1 h
DIST_EDGES_S = (0, 20, 60, 240, 900, math.inf)
DIST_LABELS = ("<20 s", "20 s-1 min", "1-4 min", "4-15 min", "15-60 min")
STATS = ("entropy", "repeat", "silence", "overlap", "turns")

# -----------------------------------------------------------------------------
# 1 + 2: loss by minute and recall, one streamed pass


def chunk(f, convs, start, T, delays, initial):
    """Frames start..start+T of each conversation, delayed as train.py feeds them: x [B, T, C]
    int64, and live [B, T], False past the end of a conversation (padded with initial tokens)."""
    x = np.broadcast_to(np.asarray(initial, np.int64), (len(convs), T, len(initial))).copy()
    live = np.zeros((len(convs), T), bool)
    for r, c in enumerate(convs):
        m = min(T, int(f.lengths[c]) - start)
        if m > 0:
            x[r, :m] = window(f.conversation(c), start, m, delays, initial)
            live[r, :m] = True
    return x, live


def recall_entries(f, events, convs, cfg):
    """Every semantic value code of every recall event of these conversations, as rows (row, input
    position, audio column, saying), sorted by position. Saying 2e is event e's first mention (the control),
    2e+1 its recall. Delays: column c of frame t is the target at input position t + delay[c]."""
    dl = cfg.col_delays()[cfg.n_text:]
    K = cfg.n_codebooks
    rows = []
    for e, (conv, s, first, recall, vlen) in enumerate(events):
        r, audio = convs.index(conv), f.audio(conv)
        # the events name the recall's stream only; the first mention is the stream saying the same value
        s1 = [k for k in range(f.n_streams) if np.array_equal(audio[first:first + vlen, k], audio[recall:recall + vlen, s])]
        for say, start, st in ((2 * e, first, s1[:1]), (2 * e + 1, recall, [s])):
            for i in range(vlen):
                for a in [k * K for k in st]:                   # the stream's semantic codebook
                    p = start + i + dl[a]
                    if p < len(audio):
                        rows.append((r, p, a, say))
    out = np.array(rows, np.int64).reshape(-1, 4)
    return out[np.argsort(out[:, 1], kind="stable")]


def event_spans(events, convs, pad):
    """Rows (batch row, first frame, end frame) of every mention of every recall event: its cue, key
    and value, and pad frames after, where delayed columns still carry them."""
    spans = [(convs.index(conv), v - CUE_LEN - KEY_LEN, v + vlen + pad)
             for conv, _, first, recall, vlen in events for v in (first, recall)]
    return np.array(spans, np.int64).reshape(-1, 3)


def speech_frames(spans, live, start):
    """live [B, T] (frames start.. of each row) with the frames inside event_spans turned off: the
    speech frames. The events' density changes along a conversation (data.py puts the far events'
    first mentions in its first 20 minutes), so the loss on these frames alone is the one to compare
    between minutes."""
    out = live.copy()
    T = live.shape[1]
    for r, lo, hi in spans[(spans[:, 2] > start) & (spans[:, 1] < start + T)]:
        out[r, max(lo - start, 0):max(hi - start, 0)] = False
    return out


@torch.no_grad()
def stream_eval(model, f, events, convs, chunk_len=256, device="cpu", autocast=None, quiet=True):
    """Feed conversations convs of codes file f (one batch row each) through the model in chunks
    of chunk_len frames with the state carried. events: load_events rows of these conversations.
    Returns per-minute sums [minutes, audio columns] of cross-entropy and counts (over all frames,
    and over the speech frames alone: speech_frames), per-saying sums of cross-entropy, hits and
    counts, and the state size in bytes."""
    cfg = model.cfg
    nt, A = cfg.n_text, cfg.n_audio
    autocast = autocast or nullcontext()
    lengths = [int(f.lengths[c]) for c in convs]
    n_min = math.ceil(max(lengths) / FRAMES_PER_MINUTE)
    ce_min, n_min_cnt = np.zeros((n_min, A)), np.zeros((n_min, A))
    ce_sp, n_sp = np.zeros((n_min, A)), np.zeros((n_min, A))
    spans = event_spans(events, list(convs), max(cfg.col_delays()))
    entries = recall_entries(f, events, list(convs), cfg)
    say_ce, say_hit, say_n = (np.zeros(2 * len(events)) for _ in range(3))
    state = model.init_state(len(convs), device)
    t0 = time.time()
    # forget gates (ttt.py's add_forget_gate): the exponent s each gated layer gives the mini-batches' ends
    gated = [b.ttt.layer for b in model.layers if b.ttt is not None and b.ttt.layer.gates()]
    seen, gates = {}, [[] for _ in gated]   # gates[j]: per chunk, (s [rows, H, ends], live, speech [rows, ends])
    hooks = [t.register_forward_pre_hook(lambda mod, args, j=j: seen.__setitem__(j, mod.forget_gate(args[0])))
             for j, t in enumerate(gated)]
    try:
        for start in range(0, max(lengths), chunk_len):
            T = min(chunk_len, max(lengths) - start)
            x, live = chunk(f, convs, start, T, cfg.col_delays(), cfg.col_cards())
            speech = torch.from_numpy(speech_frames(spans, live, start)).to(device)
            x, live = torch.from_numpy(x).to(device), torch.from_numpy(live).to(device)
            with autocast:
                logits, state = model(x, state)
            for j, t in enumerate(gated):   # the gate at the tokens that end a mini-batch, and where they are
                ends = torch.nonzero((start + torch.arange(T, device=device)) % t.mini_batch == t.mini_batch - 1)[:, 0]
                ok = live[:, ends]
                gates[j].append((seen[j][:, :, ends].float().cpu(), ok.cpu(), ((speech[:, ends] > 0) & ok).cpu()))
            logits = logits.audio.float()                                           # [B, T, A, V]
            target = x[..., nt:]                                                    # [B, T, A]
            ce = F.cross_entropy(logits.flatten(0, 2), target.flatten(), reduction="none",
                                 ignore_index=cfg.cardinality).view(target.shape)   # [B, T, A]
            valid = ((target != cfg.cardinality) & live[..., None]).float()
            minute = (start + np.arange(T)) // FRAMES_PER_MINUTE
            np.add.at(ce_min, minute, (ce * valid).sum(0).cpu().numpy())           # rows share positions
            np.add.at(n_min_cnt, minute, valid.sum(0).cpu().numpy())
            valid = valid * speech[..., None]
            np.add.at(ce_sp, minute, (ce * valid).sum(0).cpu().numpy())
            np.add.at(n_sp, minute, valid.sum(0).cpu().numpy())
            lo, hi = np.searchsorted(entries[:, 1], [start, start + T])
            if hi > lo:                                                             # recall codes in this chunk
                r, p, a, say = (torch.from_numpy(v).to(device) for v in entries[lo:hi].T)
                hit = logits[r, p - start, a].argmax(-1) == target[r, p - start, a]
                np.add.at(say_ce, entries[lo:hi, 3], ce[r, p - start, a].cpu().numpy())
                np.add.at(say_hit, entries[lo:hi, 3], hit.float().cpu().numpy())
                np.add.at(say_n, entries[lo:hi, 3], 1)
            del logits, ce
            if not quiet and (start // chunk_len) % 50 == 0:
                print(f"\r  loss pass: minute {start / FRAMES_PER_MINUTE:.0f} of {n_min}, {time.time() - t0:.0f}s",
                      end="", file=sys.stderr, flush=True)
    finally:
        for h in hooks:
            h.remove()
    if not quiet:
        print(file=sys.stderr)
    return dict(ce_min=ce_min, n_min=n_min_cnt, ce_speech=ce_sp, n_speech=n_sp, say_ce=say_ce, say_hit=say_hit,
                say_n=say_n, state_bytes=state_bytes(state), forget_gates=gates)


def gate_stats(gated, gates):
    """gates: per gated TTT layer, stream_eval's forget_gates (of all its calls, concatenated).
    Per gated TTT layer: the forget gate's exponent s at the ends of mini-batches of live frames, its
    quantiles (all heads), its mean where the frame is speech and where it is not (recall events), and the
    half-lives it makes of the layer's (fixed or median learnt) half-life, seconds."""
    out = []
    for t, chunks in zip(gated, gates):
        s = torch.cat([c[0].permute(0, 2, 1)[c[1]] for c in chunks])              # [ends, H]
        sp = torch.cat([c[2][c[1]] for c in chunks])                               # [ends]
        hl = t.half_lives()
        hl = float(hl.median()) if hl is not None else t.mini_batch / -math.log2(t.decay)
        q = torch.quantile(s.flatten().double(), torch.tensor([.01, .1, .5, .9, .99], dtype=torch.float64)).tolist()
        out.append(dict(quantiles=[.01, .1, .5, .9, .99], s=q, mean_speech=float(s[sp].mean()) if sp.any() else None,
                        mean_other=float(s[~sp].mean()) if (~sp).any() else None, half_life_s=hl * 60 / FRAMES_PER_MINUTE,
                        note="decay ** s each mini-batch: the half-life divided by s"))
    return out


def minute_losses(ce_min, n_min, cfg):
    """Per-minute loss as model.loss_fn weighs it (semantic codebook x semantic_weight), and the
    plain mean cross-entropy of the semantic and of the acoustic codebooks."""
    per_col = ce_min / np.maximum(n_min, 1)                                     # [minutes, A]
    w = np.ones(cfg.n_audio)
    w[::cfg.n_codebooks] = cfg.semantic_weight
    K = cfg.n_codebooks
    sem = per_col[:, ::K].mean(1)
    ac = np.delete(per_col, np.s_[::K], axis=1).mean(1) if K > 1 else np.full(len(per_col), np.nan)
    return dict(minute=list(range(1, len(per_col) + 1)), loss=(per_col @ w / w.sum()).tolist(),
                semantic=sem.tolist(), acoustic=ac.tolist(), frames=(n_min[:, 0]).astype(int).tolist())


def recall_table(events, say_ce, say_hit, say_n, window_frames, reach_frames=None):
    """Recall loss and accuracy by distance bucket; the within- and beyond-window totals, and beyond the
    stacked layers' reach (reach_frames; default: the window); the first mentions (unpredictable: the
    chance control); and one row per event."""
    dist = (events[:, 3] - events[:, 2]) / FRAME_RATE if len(events) else np.zeros(0)   # seconds
    rec = slice(1, None, 2)

    def agg(mask, which=rec):
        n = say_n[which][mask].sum()
        return dict(events=int(mask.sum()), codes=int(n),
                    loss=float(say_ce[which][mask].sum() / n) if n else None,
                    accuracy=float(say_hit[which][mask].sum() / n) if n else None)
    buckets = []
    for lo, hi, label in zip(DIST_EDGES_S[:-1], DIST_EDGES_S[1:], DIST_LABELS):
        m = (dist >= lo) & (dist < hi)
        where = "within" if hi * FRAME_RATE <= window_frames else "beyond" if lo * FRAME_RATE >= window_frames else "straddles"
        buckets.append(dict(label=label, lo_s=lo, hi_s=None if math.isinf(hi) else hi, window=where, **agg(m)))
    inside = dist * FRAME_RATE < window_frames
    per_event = [[round(float(d), 2), float(c / max(n, 1)), float(h / max(n, 1))]
                 for d, c, h, n in zip(dist, say_ce[rec], say_hit[rec], say_n[rec])]
    far = dist * FRAME_RATE > (reach_frames or window_frames)
    return dict(buckets=buckets, within_window=agg(inside), beyond_window=agg(~inside), beyond_reach=agg(far),
                reach_frames=int(reach_frames or window_frames),
                first_mention=agg(np.ones(len(events), bool), slice(0, None, 2)),
                per_event_columns=["distance_s", "loss", "accuracy"], per_event=per_event)

# -----------------------------------------------------------------------------
# 3: statistics of a stream of frames, per minute (generated and real alike)


class FrameStats:
    """Per-minute statistics of one conversation fed in order as audio frames [n, S, K]:
    entropy   mean over codebooks of the entropy (bits) of the minute's codes, both streams pooled
    repeat    share of a stream's non-silent frames equal to its previous frame (loops)
    silence   share of stream frames that are the silence frame
    overlap   share of frames where two or more streams speak at once
    turns     changes of the sole speaker per minute (pauses and overlaps do not end a turn)
    A last partial minute is reported too, its turns scaled to a full minute."""

    def __init__(self, silence, bucket=FRAMES_PER_MINUTE):
        self.silence, self.bucket = np.asarray(silence), bucket
        self.pending, self.prev, self.last = np.zeros((0, 0, 0), np.int64), None, -1
        self.out = {k: [] for k in STATS}

    def add(self, frames):
        frames = np.asarray(frames)
        self.pending = frames if not self.pending.size else np.concatenate([self.pending, frames])
        while len(self.pending) >= self.bucket:
            self._minute(self.pending[:self.bucket])
            self.pending = self.pending[self.bucket:]

    def close(self):
        if len(self.pending):
            self._minute(self.pending)
            self.pending = self.pending[:0]
        return self.out

    def _minute(self, x):
        n, S, K = x.shape
        silent = (x == self.silence).all(-1)                                   # [n, S]
        prev = np.concatenate([x[:1] if self.prev is None else self.prev[None], x[:-1]])
        same = (x == prev).all(-1) & ~silent
        if self.prev is None:
            same[0] = False
        speaking = ~silent
        sole = speaking.sum(1) == 1
        who = speaking.argmax(1)[sole]                                          # the sole speaker, in order
        if self.last >= 0:
            who = np.concatenate([[self.last], who])
        H = []
        for k in range(K):
            _, cnt = np.unique(x[:, :, k], return_counts=True)
            p = cnt / cnt.sum()
            H.append(float(-(p * np.log2(p)).sum()))
        self.out["entropy"].append(float(np.mean(H)))
        self.out["repeat"].append(float(same.sum() / max(1, speaking.sum())))
        self.out["silence"].append(float(silent.mean()))
        self.out["overlap"].append(float((speaking.sum(1) > 1).mean()))
        self.out["turns"].append(float((who[1:] != who[:-1]).sum() * FRAMES_PER_MINUTE / n))
        self.prev, self.last = x[-1], (int(who[-1]) if len(who) else self.last)


def most_common_frame(f, conv=0):
    """The most frequent single-stream frame of a conversation: the silence frame of the synthetic
    data (data.py draws one fixed silence frame), roughly silence for real codec data."""
    a = np.asarray(f.audio(conv)).reshape(-1, f.n_codebooks)
    rows, cnt = np.unique(a, axis=0, return_counts=True)
    return rows[cnt.argmax()].astype(np.int64)


SPREAD = (5, 95)   # percentiles over every whole minute of every held-out conversation


def reference_stats(f, convs, silence):
    """FrameStats of real conversations, averaged per minute over those that reach it, and their
    spread: the SPREAD percentiles of each statistic over every whole minute of every conversation."""
    per = []
    for c in convs:
        s = FrameStats(silence)
        a = f.audio(c)
        for t in range(0, len(a), FRAMES_PER_MINUTE):
            s.add(np.asarray(a[t:t + FRAMES_PER_MINUTE], np.int64))
        per.append(s.close())
    n = max(len(p["entropy"]) for p in per)
    out = {"minute": list(range(1, n + 1))}
    for k in STATS:
        out[k] = [float(np.mean([p[k][m] for p in per if len(p[k]) > m])) for m in range(n)]
    whole = [int(f.lengths[c]) // FRAMES_PER_MINUTE for c in convs]   # a partial last minute is left out,
    whole = whole if sum(whole) else [1] * len(convs)                  # unless there is nothing else
    out["spread"] = {k: np.percentile([x for p, w in zip(per, whole) for x in p[k][:w]], SPREAD).tolist()
                     for k in STATS}
    out["spread_percentiles"] = list(SPREAD)
    return out


def within_spread(g, ref, minute=-1):
    """For each statistic, whether a generated minute (the last by default) lies inside the data's spread.
    The first minute tells a sampler or model that is off from the start from one that drifts off."""
    return {k: bool(ref["spread"][k][0] <= g[k][minute] <= ref["spread"][k][1]) for k in STATS}


class _OutOfTime(Exception):
    pass


@torch.inference_mode()
def generation_stats(model, minutes, silence, device="cpu", seed=0, temp=0.8, top_k=250, budget_s=0.0,
                     cuda_graph=False, quiet=True, top_p=1.0):
    """Generate `minutes` of conversation with generate.generate (from nothing, batch 1) and return
    its per-minute FrameStats, stopping early, at the last whole minute, if budget_s seconds pass.
    Only the current minute's frames are kept."""
    cfg = model.cfg
    S, K, nt = cfg.n_streams, cfg.n_codebooks, cfg.n_text
    n_frames = max(1, round(minutes * FRAMES_PER_MINUTE))
    stats, buf, made = FrameStats(silence), [], [0]
    t0 = time.time()

    def flush():
        if buf:
            stats.add(torch.stack(buf).cpu().numpy().reshape(-1, S, K))
            made[0] += len(buf)
            buf.clear()

    def on_frame(frame, logp):
        buf.append(frame[0, nt:])
        if len(buf) == FRAMES_PER_MINUTE:
            flush()                                       # one host sync a minute
            if not quiet:
                el = time.time() - t0
                print(f"\r  generation: minute {made[0] // FRAMES_PER_MINUTE} of {minutes:g}, "
                      f"{made[0] / el:.0f} frames/s", end="", file=sys.stderr, flush=True)
            if budget_s and time.time() - t0 > budget_s:
                raise _OutOfTime

    def run(graph):
        torch.manual_seed(seed)
        g = None if graph else torch.Generator(device).manual_seed(seed)   # graphs use the default generator
        sampler = Sampler(cfg, temp=temp, top_k=top_k, top_p=top_p, generator=g)
        step = FrameStep(model, sampler, 1, device, cuda_graph=graph)
        try:
            generate(model, n_frames, sampler, 1, on_frame=on_frame, device=device, step=step)
            flush()
        except _OutOfTime:
            pass

    note = None
    try:
        run(cuda_graph)
    except Exception as e:  # a CUDA graph that cannot be captured: say so, and generate without one
        if not cuda_graph or made[0]:
            raise
        note = f"CUDA graph capture failed ({type(e).__name__}: {e}); generated without it"
        print(f"warning: {note}", file=sys.stderr)
        buf.clear()
        cuda_graph = False
        t0 = time.time()
        run(False)
    if not quiet:
        print(file=sys.stderr)
    el = time.time() - t0
    out = stats.close()
    return dict(minutes_requested=minutes, minutes_done=made[0] / FRAMES_PER_MINUTE, frames=made[0],
                frames_per_s=made[0] / max(el, 1e-9), seconds=el, temp=temp, top_k=top_k, top_p=top_p, seed=seed,
                cuda_graph=cuda_graph, note=note, minute=list(range(1, len(out["entropy"]) + 1)), **out)

# -----------------------------------------------------------------------------
# The whole evaluation of one checkpoint


def recall_data(data_path, conversations=0):
    """A held-out codes file with recall events: (CodesFile, the first `conversations` conversations'
    indices (0: all), their events); ValueError when the file has no events."""
    f, events = CodesFile(data_path), load_events(data_path)
    if not len(events):
        raise ValueError(f"{data_path} has no recall events (no {data_path}.events.json): give a file data.py "
                         "synthetic wrote with events")
    convs = list(range(len(f)))[:conversations or None]
    return f, convs, events[np.isin(events[:, 0], convs)]


def check_fits(cfg, f, data_path):
    """ValueError unless codes file f (read from data_path) holds frames the model of config cfg takes."""
    want = {k: getattr(cfg, k) for k in ("n_streams", "n_codebooks", "cardinality", "n_text")}
    have = {k: getattr(f, k) for k in want}
    if want != have:
        raise ValueError(f"{data_path!r} holds frames of {have}; the model takes {want}")


def evaluate(model, data_path, conversations=0, chunk_len=256, batch=16, gen_minutes=90.0, gen_budget_s=0.0,
             temp=0.8, top_k=250, seed=0, device="cpu", dtype="float32", cuda_graph=False, quiet=True):
    """Every number of this file for one model on one held-out codes file (and its .events.json),
    as a JSON-ready dict."""
    cfg, device = model.cfg, torch.device(device)
    f = CodesFile(data_path)
    check_fits(cfg, f, data_path)
    convs = list(range(len(f)))[:conversations or None]
    events = load_events(data_path)
    n_codes = min(pattern_codes(data_path) or cfg.cardinality, cfg.cardinality)
    events = events[np.isin(events[:, 0], convs)] if len(events) else events
    if not len(events):
        print(f"warning: {data_path!r} has no recall events ({data_path}.events.json): recall is not measured",
              file=sys.stderr)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()
    t0 = time.time()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # the loss pass, `batch` conversations at a time (one row each)
    ce_min, n_min = np.zeros((0, cfg.n_audio)), np.zeros((0, cfg.n_audio))
    ce_sp, n_sp = ce_min, n_min
    say = {k: np.zeros(2 * len(events)) for k in ("say_ce", "say_hit", "say_n")}
    gated = [b.ttt.layer for b in model.layers if b.ttt is not None and b.ttt.layer.gates()]
    gates = [[] for _ in gated]
    for i in range(0, len(convs), batch):
        group = convs[i:i + batch]
        mine = np.isin(events[:, 0], group) if len(events) else np.zeros(0, bool)
        r = stream_eval(model, f, events[mine], group, chunk_len, device, autocast, quiet)
        ce_min = _pad_add(ce_min, r["ce_min"])
        n_min = _pad_add(n_min, r["n_min"])
        ce_sp, n_sp = _pad_add(ce_sp, r["ce_speech"]), _pad_add(n_sp, r["n_speech"])
        for k in say:
            say[k][np.repeat(mine, 2)] = r[k]
        for g, more in zip(gates, r["forget_gates"]):
            g.extend(more)
        state_b = r["state_bytes"]
    t_loss = time.time() - t0
    mem_loss = peak_memory_mb(device)
    silence = most_common_frame(f, convs[0])
    out = dict(
        checkpoint=None, data=os.path.abspath(data_path), conversations=len(convs),
        minutes=float(f.lengths[convs].sum() / FRAMES_PER_MINUTE),
        model=dict(window=cfg.window, n_ttt=cfg.n_ttt, ttt_type=cfg.ttt_type if cfg.n_ttt else None,
                   params=model.num_params(), dim=cfg.dim, n_layers=cfg.n_layers),
        chance=dict(accuracy=1.0 / n_codes, loss=math.log(n_codes),
                    note=f"recall values are uniformly random among {n_codes} codes per codebook: chance "
                         f"top-1 accuracy 1/{n_codes}, chance loss ln {n_codes}"),
        loss_by_minute=dict(minute_losses(ce_min, n_min, cfg),
                            speech=minute_losses(ce_sp, n_sp, cfg)["loss"],
                            speech_frames=n_sp[:, 0].astype(int).tolist()),
        recall=recall_table(events, say["say_ce"], say["say_hit"], say["say_n"], cfg.window,
                            cfg.n_layers * (cfg.window - 1) + 1),
        memory=dict(state_bytes=state_b, device=str(device),
                    peak_mb_loss_pass=mem_loss if device.type == "cuda" else None,
                    note="the carried state (attention caches of `window` slots + TTT fast weights) per "
                         "conversation; it does not grow with the conversation"),
        reference=dict(silence_frame=silence.tolist(), **reference_stats(f, convs, silence)),
        timing=dict(loss_pass_s=t_loss),
    )
    if gated:
        out["forget_gates"] = gate_stats(gated, gates)
    if gen_minutes > 0:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        out["generation"] = generation_stats(model, gen_minutes, silence, device, seed, temp, top_k, gen_budget_s,
                                             cuda_graph, quiet)
        if out["generation"]["minute"]:
            out["generation"]["first_minute_within_spread"] = within_spread(out["generation"], out["reference"], 0)
            out["generation"]["last_minute_within_spread"] = within_spread(out["generation"], out["reference"])
        if device.type == "cuda":
            out["memory"]["peak_mb_generation"] = peak_memory_mb(device)
    return out


def _pad_add(a, b):
    """a + b for per-minute arrays [minutes, A] of different lengths."""
    n = max(len(a), len(b))
    out = np.zeros((n, a.shape[1]))
    out[:len(a)] += a
    out[:len(b)] += b
    return out


def print_table(name, r):
    """A short text summary of one evaluation."""
    lm = r["loss_by_minute"]
    n = len(lm["loss"])
    pick = sorted({0, min(n - 1, 4), n // 2, n - 1})
    print(f"{name}: window {r['model']['window']} frames ({r['model']['window'] / FRAME_RATE:g} s), "
          f"TTT {r['model']['ttt_type'] or 'none'}; state {r['memory']['state_bytes'] / 2**20:.2f} MiB per conversation")
    print("  loss by minute:  " + "  ".join(f"min {lm['minute'][i]}: {lm['loss'][i]:.3f}" for i in pick))
    if "speech" in lm:   # (older result files lack it)
        print("  speech frames:   " + "  ".join(f"min {lm['minute'][i]}: {lm['speech'][i]:.3f}" for i in pick))
    ch = r["chance"]
    print(f"  recall (chance: accuracy {ch['accuracy']:.2g}, loss {ch['loss']:.2f})")
    print(f"    {'distance':<12}{'window':<10}{'events':>7}{'loss':>8}{'accuracy':>10}")
    rows = [(b["label"], b["window"], b) for b in r["recall"]["buckets"]]
    rows += [("in window", "", r["recall"]["within_window"]), ("beyond", "", r["recall"]["beyond_window"])]
    if "beyond_reach" in r["recall"]:  # (older result files lack it)
        rows += [(f"> {r['recall']['reach_frames'] / FRAME_RATE:g} s", "reach", r["recall"]["beyond_reach"])]
    rows += [("1st mention", "control", r["recall"]["first_mention"])]
    for label, where, b in rows:
        loss = f"{b['loss']:.3f}" if b["loss"] is not None else "-"
        acc = f"{b['accuracy']:.4f}" if b["accuracy"] is not None else "-"
        print(f"    {label:<12}{where:<10}{b['events']:>7}{loss:>8}{acc:>10}")
    for line in describe_gates(r.get("forget_gates", [])):
        print("  " + line)
    g = r.get("generation")
    if g and g["minute"]:
        ref = r["reference"]
        print(f"  generation: {g['minutes_done']:.3g} of {g['minutes_requested']:g} min at "
              f"{g['frames_per_s']:.0f} frames/s (temp {g['temp']}, top-k {g['top_k']}); generated | real data")
        for i in sorted({0, len(g["minute"]) // 2, len(g["minute"]) - 1}):
            j = min(i, len(ref["minute"]) - 1)
            print(f"    minute {g['minute'][i]:>3}: " + "  ".join(
                f"{k} {g[k][i]:.3g} | {ref[k][j]:.3g}" for k in STATS))
        for which in ("first", "last"):
            if f"{which}_minute_within_spread" in g:   # (older result files lack them)
                lo, hi = ref["spread_percentiles"]
                print(f"    {which} minute within the data's {lo}-{hi}% spread: " + "  ".join(
                    f"{k} {'yes' if v else 'no'} ({ref['spread'][k][0]:.3g}-{ref['spread'][k][1]:.3g})"
                    for k, v in g[f"{which}_minute_within_spread"].items()))

# -----------------------------------------------------------------------------
# Figures: one model or several side by side


def plot(results, out_dir):
    """Write loss_by_minute.png, recall_by_distance.png and generation.png for results
    {name: evaluate() dict}. Returns the paths written, or [] without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib; the numbers are in the JSON)",
              file=sys.stderr)
        return []
    os.makedirs(out_dir, exist_ok=True)
    paths = []

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, (name, r) in enumerate(results.items()):
        lm = r["loss_by_minute"]
        marker = "." if len(lm["minute"]) < 20 else None
        ax.plot(lm["minute"], lm["loss"], marker=marker, color=f"C{i}", label=name)
        if "speech" in lm:
            ax.plot(lm["minute"], lm["speech"], marker=marker, color=f"C{i}", ls=":", lw=1)
    ax.set(xlabel="minute of the conversation", ylabel="loss (training objective)",
           title="Held-out loss by position in the conversation (dotted: speech frames alone)")
    ax.grid(alpha=0.3)
    ax.legend()
    paths.append(_save(fig, out_dir, "loss_by_minute.png"))

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = list(DIST_LABELS)
    width = 0.8 / max(1, len(results))
    any_r = next(iter(results.values()))
    ch = any_r["chance"]
    losses = [ch["loss"]]
    for j, (name, r) in enumerate(results.items()):
        b = r["recall"]["buckets"]
        xs = np.arange(len(labels)) + (j - (len(results) - 1) / 2) * width
        for ax, key in zip(axes, ("accuracy", "loss")):
            vals = [np.nan if x[key] is None else x[key] for x in b]
            bars = ax.bar(xs, vals, width, label=f"{name} (window {fmt_seconds(r['model']['window'] / FRAME_RATE)})")
        losses += [x["loss"] for x in b if x["loss"] is not None]
        fm = r["recall"]["first_mention"]["loss"]
        if fm is not None:    # the control: the same model on the first mentions, which nothing predicts
            axes[1].axhline(fm, color=bars.patches[0].get_facecolor(), ls=":", lw=1.5)
            losses.append(fm)
    axes[0].axhline(ch["accuracy"], color="k", ls="--", lw=1, label=f"chance 1/{round(1 / ch['accuracy'])}")
    axes[0].set_yscale("log")
    axes[0].set_ylim(ch["accuracy"] / 3, 1.0)
    axes[1].axhline(ch["loss"], color="k", ls="--", lw=1)
    axes[1].set_ylim(max(0.0, min(losses) - 1.0), max(losses) + 0.5)
    axes[1].set_title(f"dashed: chance (ln {round(1 / ch['accuracy'])}); dotted: each model on the first mentions",
                      fontsize=9)
    counts = [b["events"] for b in any_r["recall"]["buckets"]]
    for ax, key in zip(axes, ("top-1 accuracy on the recalled codes", "loss on the recalled codes")):
        ax.set_xticks(np.arange(len(labels)), [f"{x}\n{n} events" for x, n in zip(labels, counts)])
        ax.set(xlabel="distance since the pattern was first heard", ylabel=key)
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=8)
    fig.suptitle("Recall by distance since the first mention")
    paths.append(_save(fig, out_dir, "recall_by_distance.png"))

    if any(r.get("generation") for r in results.values()):
        fig, axes = plt.subplots(2, 3, figsize=(13, 7))
        ref = any_r["reference"]
        n = max(len(r["generation"]["minute"]) for r in results.values() if r.get("generation"))
        units = dict(entropy="bits", repeat="share of speech frames", silence="share of stream frames",
                     overlap="share of frames", turns="per minute")
        for ax, k in zip(axes.flat, STATS):
            for name, r in results.items():
                g = r.get("generation")
                if g and g["minute"]:
                    ax.plot(g["minute"], g[k], ".-" if n < 20 else "-", label=name)
            ax.plot(ref["minute"][:max(n, 1)], ref[k][:max(n, 1)], "k.--" if n < 20 else "k--", label="held-out data")
            if "spread" in ref:
                ax.axhspan(*ref["spread"][k], color="k", alpha=0.08, lw=0,
                           label="data, {}-{}% of minutes".format(*ref["spread_percentiles"]))
            ax.set(xlabel="minute", ylabel=units[k], title=k)
            ax.grid(alpha=0.3)
        axes.flat[-1].axis("off")
        axes.flat[-1].legend(*axes.flat[0].get_legend_handles_labels(), loc="center")
        fig.suptitle("Generated conversation vs real data, per minute")
        paths.append(_save(fig, out_dir, "generation.png"))
    return paths


def fmt_seconds(s):
    return f"{s:g} s" if s < 60 else f"{s / 60:g} min"


def _save(fig, out_dir, name):
    path = os.path.join(out_dir, name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return path

# -----------------------------------------------------------------------------


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="model checkpoint (.safetensors or a train.py run folder)")
    ap.add_argument("--data", required=True, help="held-out codes file (its recall events: DATA.events.json)")
    ap.add_argument("--out", default="", help="JSON to write (default: eval.json beside the checkpoint)")
    ap.add_argument("--plots", default="", help="folder for the figures (needs matplotlib; default: none)")
    ap.add_argument("--conversations", type=int, default=0, help="evaluate the first N conversations (0: all)")
    ap.add_argument("--chunk", type=int, default=256, help="frames per forward call (any split gives the same result)")
    ap.add_argument("--batch", type=int, default=16, help="conversations fed at once, one batch row each")
    ap.add_argument("--gen_minutes", type=float, default=90.0, help="length of the generated conversation (0: skip)")
    ap.add_argument("--gen_budget_s", type=float, default=0.0,
                    help="stop generating at the first whole minute after this many seconds (0: no limit)")
    ap.add_argument("--temp", type=float, default=0.8, help="sampling temperature (generate.py's default)")
    ap.add_argument("--top_k", type=int, default=250, help="sampling top-k (generate.py's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="", help="cuda, mps or cpu (default: the best there is)")
    ap.add_argument("--dtype", default="", help="bfloat16 (autocast) or float32; default: bfloat16 on CUDA")
    ap.add_argument("--cuda_graph", type=lambda s: s.lower() in ("1", "true", "yes"), default=None, metavar="BOOL",
                    help="generate with the frame step captured as a CUDA graph (default: on CUDA)")
    ap.add_argument("--ttt_lr_scale", type=float, default=1.0,
                    help="multiply the TTT layers' inner learning rate by this at evaluation (default 1: as "
                         "trained; 0: fast weights that never move); docs/experiment "
                         "measures what smaller steps do to the loss, the recall and the generations")
    ap.add_argument("--ttt_half_life_s", type=float, default=None,
                    help="evaluate with fast weights that fade toward their learnt start with this half-life, "
                         "seconds (model.py's ttt_half_life; 0: never forget; default: as trained)")
    ap.add_argument("--quiet", action="store_true")
    return ap.parse_args(argv)


def learnt_half_lives(model):
    """Each TTT layer's learnt half-lives in seconds, float64 CPU tensors [heads, features]; [] if none."""
    return [b.ttt.layer.half_lives().double().cpu() * 60 / FRAMES_PER_MINUTE
            for b in model.layers if b.ttt is not None and b.ttt.layer.log_half_life is not None]


def describe_gates(stats):
    """One line a gated TTT layer: the forget gate's s and the half-lives it makes (evaluate's forget_gates)."""
    out = []
    for i, g in enumerate(stats):
        s, hl = g["s"], g["half_life_s"]
        mean = lambda v: f"{v:.3g}" if v is not None else "-"
        out.append(f"TTT layer {i + 1}: forget gate s 1% {s[0]:.3g}, 10% {s[1]:.3g}, median {s[2]:.3g}, 90% {s[3]:.3g}, "
                   f"99% {s[4]:.3g} (half-life {hl:.3g} s / s: {hl / s[3]:.3g}-{hl / s[1]:.3g} s for 10-90%); "
                   f"mean on speech {mean(g['mean_speech'])}, elsewhere {mean(g['mean_other'])}")
    return out


def describe_half_lives(learnt):
    """One line a TTT layer: the spread of its learnt half-lives."""
    lines = []
    for i, h in enumerate(learnt):
        q = torch.quantile(h.flatten(), torch.tensor([0, .1, .5, .9, 1.], dtype=torch.float64))
        lines.append(f"TTT layer {i + 1}: learnt half-lives, s: min {q[0]:.3g}, 10% {q[1]:.3g}, median {q[2]:.3g}, "
                     f"90% {q[3]:.3g}, max {q[4]:.3g}")
    return "\n".join(lines)


def main(argv=None):
    a = parse_args(argv)
    try:
        return run(a)
    except (ValueError, FileNotFoundError, CodesFormatError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def run(a):
    device = default_device(a.device)
    dtype = a.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    if dtype not in ("bfloat16", "float32"):
        raise ValueError(f"--dtype must be bfloat16 or float32, not {dtype!r}")
    if a.chunk < 1 or a.batch < 1:
        raise ValueError("--chunk and --batch must be at least 1")
    if not (a.gen_minutes >= 0 and a.gen_budget_s >= 0 and a.conversations >= 0):
        raise ValueError(f"--gen_minutes, --gen_budget_s and --conversations must be 0 or more (0: skip, no limit, "
                         f"all); got {a.gen_minutes}, {a.gen_budget_s} and {a.conversations}")
    if not (a.temp >= 0 and a.top_k >= 0):
        raise ValueError(f"--temp and --top_k must be 0 or more (0: greedy, off); got {a.temp} and {a.top_k}")
    if not a.ttt_lr_scale >= 0:
        raise ValueError(f"--ttt_lr_scale must be 0 or more (1: as trained), not {a.ttt_lr_scale}")
    if a.ttt_half_life_s is not None and not a.ttt_half_life_s >= 0:
        raise ValueError(f"--ttt_half_life_s must be 0 (never forget) or a number of seconds, not {a.ttt_half_life_s}")
    cuda_graph = device.type == "cuda" if a.cuda_graph is None else a.cuda_graph
    if cuda_graph and device.type != "cuda":
        raise ValueError("--cuda_graph needs a CUDA device")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    model = SpeechLM.from_checkpoint(a.ckpt, device=device).eval()
    ttt_flags = [f"--{k} {v:g}" for k, v in (("ttt_lr_scale", a.ttt_lr_scale), ("ttt_half_life_s", a.ttt_half_life_s))
                 if v not in (1, None)]
    if ttt_flags and not any(b.ttt is not None for b in model.layers):
        raise ValueError(f"{' '.join(ttt_flags)}: {a.ckpt!r} has no TTT layer")
    if a.ttt_lr_scale != 1:
        model.set_ttt_base_lr(model.cfg.ttt_base_lr * a.ttt_lr_scale)
    if a.ttt_half_life_s is not None:   # (replaces learnt half-lives, if the model has them)
        model.set_ttt_half_life(a.ttt_half_life_s * FRAMES_PER_MINUTE / 60)
    out_path = a.out or os.path.join(a.ckpt if os.path.isdir(a.ckpt) else os.path.dirname(a.ckpt), "eval.json")
    r = evaluate(model, a.data, a.conversations, a.chunk, a.batch, a.gen_minutes, a.gen_budget_s, a.temp, a.top_k,
                 a.seed, device, dtype, cuda_graph, a.quiet)
    r["checkpoint"] = os.path.abspath(a.ckpt)
    r["ttt_lr_scale"] = a.ttt_lr_scale
    r["ttt_half_life_s"] = model.cfg.ttt_half_life * 60 / FRAMES_PER_MINUTE   # 0: never forget
    learnt = learnt_half_lives(model)
    if learnt:   # learnt half-lives, seconds, per TTT layer [heads][features]
        r["ttt_half_life_s"] = None
        r["ttt_learnt_half_lives_s"] = [h.tolist() for h in learnt]
        print(describe_half_lives(learnt))
    tmp = out_path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(r, fh, indent=1)
    os.replace(tmp, out_path)
    print_table(os.path.basename(os.path.normpath(a.ckpt)), r)
    print(f"wrote {out_path}")
    if a.plots:
        for p in plot({os.path.basename(os.path.normpath(a.ckpt)): r}, a.plots):
            print(f"wrote {p}")
    return r


if __name__ == "__main__":
    main()
