"""
Data for training: a synthetic long-conversation generator, and batch sampling from codes files.

    python data.py synthetic --hours 20 --out synth.bin      # two-speaker conversations, 10-90 min

The synthetic conversations are built so that memory matters and can be measured:
- two speakers take turns, with pauses, backchannels and silence (a fixed "silence" frame);
- each speaker's voice is a set of code statistics drawn when the conversation starts and kept to
  its end (a palette per codebook, a Markov chain on the semantic codebook, acoustic codebooks
  that depend on the semantic one), so the first minute of a speaker predicts the ninetieth;
- recall events: a speaker says a cue, a key and a value pattern early on; later, up to an hour
  later, a cue of another kind and the same key come back, followed by the same value. Only a
  model that remembers the first mention can predict the value at the recall, so loss on these
  frames, by distance since the first mention, measures long-range memory. Their positions are
  written beside the codes file (OUT.events.json).
"""
import argparse
import json
import os
import sys
import time

import numpy as np

from codes import CodesWriter

FRAME_RATE = 12.5
CARD = 2048
CUE_LEN, KEY_LEN, VALUE_LEN = 2, 2, 8       # frames of a recall event's parts


def _voice(rng, K, card, palette=48):
    """A speaker's code statistics: per-codebook palettes with Zipf weights, a Markov successor
    table on the semantic codebook and a semantic -> acoustic mapping."""
    pal = np.stack([rng.choice(card, palette, replace=False) for _ in range(K)])     # [K, P]
    w = 1.0 / np.arange(1, palette + 1) ** 0.8
    w = w / w.sum()
    succ = rng.integers(0, palette, size=(palette, 3))                                # likely next semantic entries
    amap = rng.integers(0, palette, size=(K, palette))                                # acoustic entry given semantic
    return pal, w, succ, amap


def _speak(rng, voice, n):
    """n frames of one speaker talking: [n, K] codes."""
    pal, w, succ, amap = voice
    K, P = pal.shape
    sem = np.empty(n, np.int64)
    sem[0] = rng.choice(P, p=w)
    jump = rng.random(n) < 0.3
    fresh = rng.choice(P, size=n, p=w)
    pick = rng.integers(0, 3, size=n)
    for t in range(1, n):   # semantic: mostly one of 3 successors of the previous entry
        sem[t] = fresh[t] if jump[t] else succ[sem[t - 1], pick[t]]
    idx = amap[:, sem].T                                                               # [n, K] palette entries
    noise = rng.random((n, K)) < 0.25
    idx = np.where(noise, rng.choice(P, size=(n, K), p=w), idx)
    idx[:, 0] = sem
    return pal[np.arange(K)[None, :], idx]


def synth_conversation(rng, n_frames, K=8, card=CARD, silence=None, cues=None, events_per_min=0.25):
    """One two-speaker conversation: codes [n_frames, 2, K] and its recall events as rows
    (stream, first_value_start, recall_value_start)."""
    silence = silence if silence is not None else np.zeros(K, np.int64)
    codes = np.broadcast_to(silence, (n_frames, 2, K)).copy()
    voices = [_voice(rng, K, card) for _ in range(2)]
    t, spk = int(rng.integers(0, 25)), int(rng.integers(0, 2))
    while t < n_frames:                                           # turns
        n = int(rng.uniform(1.5, 12.0) * FRAME_RATE)
        n = min(n, n_frames - t)
        codes[t:t + n, spk] = _speak(rng, voices[spk], n)
        if n > 40 and rng.random() < 0.3:                         # a backchannel from the listener
            b = int(rng.integers(4, 10))
            s = t + int(rng.integers(10, n - b))
            codes[s:s + b, 1 - spk] = _speak(rng, voices[1 - spk], b)
        t += n + int(rng.uniform(0.2, 1.5) * FRAME_RATE)          # pause
        spk = 1 - spk if rng.random() < 0.85 else spk
    # recall events: cue + key + value, then later recall cue + key + same value
    events = []
    span = CUE_LEN + KEY_LEN + VALUE_LEN
    n_ev = max(1, int(n_frames / FRAME_RATE / 60 * events_per_min))
    minutes = n_frames / FRAME_RATE / 60
    busy = np.zeros(n_frames, bool)
    for _ in range(n_ev * 4):
        if len(events) == n_ev:
            break
        lo = min(0.5, 0.1 * minutes)
        first = int(rng.uniform(lo, max(lo, min(20.0, 0.4 * minutes))) * 60 * FRAME_RATE)
        max_gap = min(60.0 * 60, (n_frames - first - span - 1) / FRAME_RATE)
        if max_gap < 20:
            continue
        gap = int(np.exp(rng.uniform(np.log(10.0), np.log(max_gap))) * FRAME_RATE)  # log-uniform, 10 s to 1 h
        second = first + gap
        if busy[first:first + span].any() or busy[second:second + span].any():
            continue
        busy[first:first + span] = busy[second:second + span] = True
        key = rng.integers(0, card, size=(KEY_LEN, K))
        value = rng.integers(0, card, size=(VALUE_LEN, K))
        s1, s2 = int(rng.integers(0, 2)), int(rng.integers(0, 2))
        for start, s, cue in ((first, s1, cues[0]), (second, s2, cues[1])):
            codes[start:start + span, s] = np.concatenate([cue, key, value])
            codes[start:start + span, 1 - s] = silence
        events.append((s2, first + CUE_LEN + KEY_LEN, second + CUE_LEN + KEY_LEN))
    return codes, events


def synthetic(out, hours=20.0, min_minutes=10.0, max_minutes=90.0, n_codebooks=8, seed=0, quiet=False):
    """Write `hours` of synthetic conversations to `out` (codes file) and their recall events to
    out + '.events.json'. Returns the number of conversations."""
    rng = np.random.default_rng(seed)
    # shared across conversations, like a language: the silence frame and the two cue words
    g = np.random.default_rng(1234)
    silence = g.integers(0, CARD, size=n_codebooks)
    cues = g.integers(0, CARD, size=(2, CUE_LEN, n_codebooks))
    total = int(hours * 3600 * FRAME_RATE)
    done, n, t0, events = 0, 0, time.time(), []
    with CodesWriter(out, n_streams=2, n_codebooks=n_codebooks, cardinality=CARD, frame_rate=FRAME_RATE) as w:
        while done < total:
            F = int(rng.uniform(min_minutes, max_minutes) * 60 * FRAME_RATE)
            F = max(min(F, total - done), 1)
            c, ev = synth_conversation(rng, F, n_codebooks, CARD, silence, cues)
            w.add(c)
            events += [(n, s, a, b, VALUE_LEN) for s, a, b in ev]
            done += F
            n += 1
            if not quiet:
                el = time.time() - t0
                print(f"\r{done / total:6.1%}  {done / FRAME_RATE / 3600:.1f} of {hours:g} h, "
                      f"{n} conversations, {el:.0f}s", end="", file=sys.stderr, flush=True)
    tmp = out + ".events.json.tmp"
    with open(tmp, "w") as f:
        json.dump({"columns": ["conversation", "stream", "first_value_start", "recall_value_start", "value_len"],
                   "events": events}, f)
    os.replace(tmp, out + ".events.json")
    if not quiet:
        print(file=sys.stderr)
    return n


def load_events(path):
    """Recall events of a synthetic codes file as an int64 array [N, 5] (see `synthetic`)."""
    p = path + ".events.json"
    if not os.path.exists(p):
        return np.zeros((0, 5), np.int64)
    with open(p) as f:
        return np.array(json.load(f)["events"], dtype=np.int64).reshape(-1, 5)


# -----------------------------------------------------------------------------
# Batches for training (train.py): windows of frames, with the model's per-column delays applied


def window(conv, start, T, delays, initial):
    """Frames start..start+T of a conversation [F, C], column c delayed by delays[c] frames:
    out[t, c] = conv[start + t - delays[c], c], or initial[c] before the conversation starts."""
    C = conv.shape[1]
    idx = start + np.arange(T)[:, None] - np.asarray(delays)[None, :]          # [T, C]
    out = np.asarray(conv[np.clip(idx, 0, None), np.arange(C)[None, :]], dtype=np.int64)
    return np.where(idx < 0, np.asarray(initial)[None, :], out)


class WindowSampler:
    """Mini-batch mode: random windows of T frames inside conversations, each drawn with
    probability proportional to its number of windows."""

    def __init__(self, f, convs, T, batch, delays, initial, seed):
        self.f, self.T, self.B, self.delays, self.initial = f, T, batch, delays, initial
        lens = f.lengths[convs]
        self.convs = np.asarray(convs)[lens >= T]
        if len(self.convs) == 0:
            raise ValueError(f"seq_len {T} is longer than every conversation (longest {lens.max() if len(lens) else 0} "
                             "frames); lower --seq_len")
        n = f.lengths[self.convs] - T + 1
        self.p = n / n.sum()
        self.rng = np.random.default_rng(seed)

    def next(self):
        cs = self.rng.choice(self.convs, size=self.B, p=self.p)
        starts = [int(self.rng.integers(0, self.f.lengths[c] - self.T + 1)) for c in cs]
        x = np.stack([window(self.f.conversation(c), s, self.T, self.delays, self.initial) for c, s in zip(cs, starts)])
        return x, np.ones(self.B, bool)

    def state_dict(self):
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, d):
        self.rng.bit_generator.state = d["rng"]


class StreamSampler:
    """Streaming mode: each of B rows walks one conversation in consecutive chunks of T frames;
    when its conversation has fewer than T frames left, the row takes the next conversation of a
    shuffled order (its state is then reset by the caller: `reset` is True for that row)."""

    def __init__(self, f, convs, T, batch, delays, initial, seed, rank=0, world=1):
        self.f, self.T, self.B, self.delays, self.initial = f, T, batch, delays, initial
        lens = f.lengths[convs]
        self.convs = np.asarray(convs)[lens >= T]
        if len(self.convs) == 0:
            raise ValueError(f"seq_len {T} is longer than every conversation (longest {lens.max() if len(lens) else 0} "
                             "frames); lower --seq_len")
        self.rng = np.random.default_rng(seed)   # same on every rank: one order, dealt out by rank
        self.rank, self.world = rank, world
        self.order, self.cursor, self.epoch = self._shuffle(), rank, 0
        self.rows = [self._take() for _ in range(batch)]   # [conversation, next start]

    def _shuffle(self):
        return self.rng.permutation(self.convs)

    def _take(self):
        if self.cursor >= len(self.order):
            self.order, self.cursor, self.epoch = self._shuffle(), self.rank % max(1, len(self.convs)), self.epoch + 1
        c = int(self.order[self.cursor % len(self.order)])
        self.cursor += self.world
        return [c, 0]

    def next(self):
        reset = np.zeros(self.B, bool)
        for i, row in enumerate(self.rows):
            if row[1] + self.T > self.f.lengths[row[0]]:
                self.rows[i] = row = self._take()
            reset[i] = row[1] == 0
        x = np.stack([window(self.f.conversation(c), s, self.T, self.delays, self.initial) for c, s in self.rows])
        for row in self.rows:
            row[1] += self.T
        return x, reset

    def state_dict(self):
        return {"rng": self.rng.bit_generator.state, "order": self.order.tolist(), "cursor": self.cursor,
                "epoch": self.epoch, "rows": [list(r) for r in self.rows]}

    def load_state_dict(self, d):
        self.rng.bit_generator.state = d["rng"]
        self.order, self.cursor, self.epoch = np.array(d["order"]), d["cursor"], d["epoch"]
        self.rows = [list(r) for r in d["rows"]]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("synthetic", help="write synthetic two-speaker conversations")
    s.add_argument("--out", required=True, help="codes file to write")
    s.add_argument("--hours", type=float, default=20.0, help="total length")
    s.add_argument("--min_minutes", type=float, default=10.0, help="shortest conversation")
    s.add_argument("--max_minutes", type=float, default=90.0, help="longest conversation")
    s.add_argument("--n_codebooks", type=int, default=8, help="codebooks per stream")
    s.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if a.cmd == "synthetic":
        if not a.hours > 0 or not 0 < a.min_minutes <= a.max_minutes:
            ap.error("need hours > 0 and 0 < min_minutes <= max_minutes")
        n = synthetic(a.out, a.hours, a.min_minutes, a.max_minutes, a.n_codebooks, a.seed)
        print(f"wrote {n} conversations to {a.out}")


if __name__ == "__main__":
    main()
