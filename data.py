"""
Data for training: a synthetic long-conversation generator, the text stream (time-aligned
sentencepiece tokens, Moshi's "inner monologue"), and batch sampling from codes files.

    python data.py synthetic --hours 20 --out synth.bin      # two-speaker conversations, 10-90 min
    python data.py synthetic --hours 2 --text --out synth_text.bin   # ... with a text stream per speaker
    python data.py synthetic --hours 2000 --workers 16 --out big.bin # in 16 processes (parts of their own seeds)
    python data.py align conv.bin --transcripts words/ --spm tokenizer_spm_32k_3.model --out conv_text.bin

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
With --text, each speaker also says words of a small made-up language (see `_language`): words
follow a bigram grammar, a word's semantic codes depend on the word, and a text stream per speaker
holds the words' sentencepiece pieces, laid out as `align` lays out real transcripts. The
tokenizer, trained on that language, is written beside the codes file (OUT.spm.model).
"""
import argparse
import functools
import io
import heapq
import json
import math
import os
import re
import shutil
import sys
import time
from typing import NamedTuple

import numpy as np

from codes import MAX_CARDINALITY, CodesFile, CodesWriter

FRAME_RATE = 12.5
CARD = 2048
CUE_LEN, KEY_LEN, VALUE_LEN = 2, 2, 8       # frames of a recall event's parts


def _voice(rng, K, card, palette=48, codes=None):
    """A speaker's code statistics: per-codebook palettes with Zipf weights, a Markov successor
    table on the semantic codebook and a semantic -> acoustic mapping. codes [K, S] (optional): the
    codes speech may use, per codebook (else any of card)."""
    if codes is None:
        pal = np.stack([rng.choice(card, palette, replace=False) for _ in range(K)])  # [K, P]
    else:
        pal = np.stack([c[rng.choice(len(c), palette, replace=False)] for c in codes])
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


def synth_conversation(rng, n_frames, K=8, card=CARD, silence=None, cues=None, events_per_min=0.25,
                       lang=None, trng=None, near_share=0.0, near_max_s=40.0, alphabet=None,
                       value_frames=VALUE_LEN, quiz=False, same_speaker=False, tie=None, speech_codes=None,
                       near_min_s=2.0, quiz_spacing_s=0.0, split_patterns=False):
    """One two-speaker conversation: codes [n_frames, 2, K] and its recall events as rows
    (stream, first_value_start, recall_value_start). A share `near_share` of the events comes back
    2 s to `near_max_s` after the first mention, anywhere in the conversation: short enough to
    fall inside one training chunk, so a model gets a gradient for storing the pattern; the others
    come back 10 s to an hour later. alphabet [K, A] (optional) restricts keys and values to A codes
    per codebook (uniformly drawn): codes common enough that a model can learn to copy them.
    value_frames: the length of a value pattern.
    quiz: a recall drill instead: events back to back from the start, each recalled as soon as its
    gap has passed (a share near_share of them near_min_s to near_max_s later, the others as the far
    events), so nearly half of the frames are recalled values (about a quarter at most with random
    places). same_speaker: the recall comes from the speaker of the first mention (else either
    speaker, drawn anew). tie [K, A] (optional): a pattern's codebook k is tie[k] of its semantic
    code (see _pattern); split_patterns: keys from the first half of those codes, values from the
    second (see _pattern). speech_codes [K, S] (optional): the codes the speakers' voices draw from
    (see _voice). With lang (a `Language`) the speakers also say its words, drawn from trng, and a
    third value lists them: per stream, (start frame, frames, word index) rows. rng draws the same
    numbers with or without words."""
    silence = silence if silence is not None else np.zeros(K, np.int64)
    codes = np.broadcast_to(silence, (n_frames, 2, K)).copy()
    voices = [_voice(rng, K, card, codes=speech_codes) for _ in range(2)]
    t, spk = int(rng.integers(0, 25)), int(rng.integers(0, 2))
    turns = []                                                    # (start, frames, stream), for words
    while t < n_frames:                                           # turns
        n = int(rng.uniform(1.5, 12.0) * FRAME_RATE)
        n = min(n, n_frames - t)
        codes[t:t + n, spk] = _speak(rng, voices[spk], n)
        turns.append((t, n, spk))
        if n > 40 and rng.random() < 0.3:                         # a backchannel from the listener
            b = int(rng.integers(4, 10))
            s = t + int(rng.integers(10, n - b))
            codes[s:s + b, 1 - spk] = _speak(rng, voices[1 - spk], b)
            turns.append((s, b, 1 - spk))
        t += n + int(rng.uniform(0.2, 1.5) * FRAME_RATE)          # pause
        spk = 1 - spk if rng.random() < 0.85 else spk
    # recall events: cue + key + value, then later recall cue + key + same value
    events = []
    span = CUE_LEN + KEY_LEN + value_frames
    n_ev = max(1, int(n_frames / FRAME_RATE / 60 * events_per_min))
    minutes = n_frames / FRAME_RATE / 60
    busy = np.zeros(n_frames, bool)
    if quiz:
        events = _quiz(rng, codes, busy, span, n_frames, near_share, (near_min_s, near_max_s), alphabet, card,
                       value_frames, cues, silence, same_speaker, tie, quiz_spacing_s, split_patterns)
        n_ev = 0
    for _ in range(n_ev * 4):
        if len(events) == n_ev:
            break
        if near_share > 0 and rng.random() < near_share:              # near: 2 s to near_max_s
            first = int(rng.integers(0, max(1, n_frames - 2 * span - int(near_max_s * FRAME_RATE))))
            gap = int(rng.uniform(2.0, near_max_s) * FRAME_RATE)
            gap = max(gap, span)
            if first + gap + span >= n_frames:
                continue
        else:
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
        key, value = _pattern(rng, alphabet, card, value_frames, K, tie, split_patterns)
        s1, s2 = int(rng.integers(0, 2)), int(rng.integers(0, 2))
        s2 = s1 if same_speaker else s2
        for start, s, cue in ((first, s1, cues[0]), (second, s2, cues[1])):
            codes[start:start + span, s] = np.concatenate([cue, key, value])
            codes[start:start + span, 1 - s] = silence
        events.append((s2, first + CUE_LEN + KEY_LEN, second + CUE_LEN + KEY_LEN))
    if lang is None:
        return codes, events
    return codes, events, _say_words(trng, lang, codes, voices, turns, busy)


def _pattern(rng, alphabet, card, value_frames, K, tie=None, split=False):
    """A recall event's key [KEY_LEN, K] and value [value_frames, K]: any code, or from alphabet [K, A].
    With tie [K, A or card] each frame draws only its semantic code; codebook k is then tie[k] of it
    (tie[0] is the identity), as speech's acoustic codes follow its semantic ones. split: keys draw
    from the first half of the codes (or of the alphabet), values from the second, as in
    associative-recall tasks (MQAR), so a frame's code tells whether it is a key or a value."""
    if split:
        n = tie.shape[1] if tie is not None else alphabet.shape[1] if alphabet is not None else card
        h = n // 2
        if tie is not None:
            i = np.concatenate([rng.integers(0, h, KEY_LEN), rng.integers(h, n, value_frames)])
            codes = tie[:, i].T if alphabet is None else alphabet[np.arange(K), tie[:, i].T]
        else:
            i = np.concatenate([rng.integers(0, h, (KEY_LEN, K)), rng.integers(h, n, (value_frames, K))])
            codes = i if alphabet is None else alphabet[np.arange(K), i]
        return codes[:KEY_LEN], codes[KEY_LEN:]
    if tie is not None:
        idx = tie[:, rng.integers(0, tie.shape[1], size=KEY_LEN + value_frames)].T         # [n, K]
        codes = idx if alphabet is None else alphabet[np.arange(K), idx]
        return codes[:KEY_LEN], codes[KEY_LEN:]
    if alphabet is None:
        return rng.integers(0, card, size=(KEY_LEN, K)), rng.integers(0, card, size=(value_frames, K))
    A = alphabet.shape[1]
    return (alphabet[np.arange(K), rng.integers(0, A, size=(KEY_LEN, K))],
            alphabet[np.arange(K), rng.integers(0, A, size=(value_frames, K))])


def _quiz(rng, codes, busy, span, n_frames, near_share, near_gaps, alphabet, card, value_frames, cues, silence,
          same_speaker, tie=None, spacing_s=0.0, split=False):
    """Fill a conversation with recall events, back to back or spacing_s of speech apart on average
    (see synth_conversation's quiz)."""
    K = codes.shape[2]
    events, due, said = [], [], {}
    t = 0
    while t + span <= n_frames:
        if due and due[0][0] <= t:                         # a pattern whose gap has passed comes back
            _, first = heapq.heappop(due)
            key, value, s1 = said.pop(first)
            s, cue = int(rng.integers(0, 2)), cues[1]
            s = s1 if same_speaker else s
            events.append((s, first + CUE_LEN + KEY_LEN, t + CUE_LEN + KEY_LEN))
        else:                                              # a new pattern
            key, value = _pattern(rng, alphabet, card, value_frames, K, tie, split)
            s, cue = int(rng.integers(0, 2)), cues[0]
            near = near_share > 0 and rng.random() < near_share
            gap = rng.uniform(*near_gaps) if near else np.exp(rng.uniform(np.log(10.0), np.log(3600.0)))
            heapq.heappush(due, (t + max(int(gap * FRAME_RATE), span), t))
            said[t] = key, value, s
        codes[t:t + span, s] = np.concatenate([cue, key, value])
        codes[t:t + span, 1 - s] = silence
        busy[t:t + span] = True
        t += span
        if spacing_s > 0:   # the speech laid down under the events shows through until the next one
            t += int(rng.exponential(spacing_s) * FRAME_RATE)
    return events


# -----------------------------------------------------------------------------
# The synthetic language of `synthetic --text`

SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
NEXT_P = (0.6, 0.3, 0.1)   # grammar: probabilities of a word's three successors


class Language(NamedTuple):
    words: list          # n made-up words of 1-3 syllables
    length: np.ndarray   # [n] frames a word lasts (3-6: "several frames each")
    sound: list          # per word, [length] semantic palette entries: how it sounds in any voice
    succ: np.ndarray     # [n, 3] bigram grammar: the likely next words, with probabilities NEXT_P
    spm: bytes           # a sentencepiece BPE model trained on the words


def _language(n_words=300, vocab_size=256):
    """The made-up language of --text. Fixed (its own seed) like the cue words, so every
    conversation, and every file made with the same sizes, speaks the same language."""
    import sentencepiece
    g = np.random.default_rng(4321)
    words, seen = [], set()
    while len(words) < n_words:
        w = "".join(g.choice(SYLLABLES, int(g.integers(1, 4))))
        if w not in seen:
            seen.add(w)
            words.append(w)
    length = np.array([2 + (len(w) // 2) + int(g.integers(0, 2)) for w in words])
    sound = [g.integers(0, 48, size=n) for n in length]   # 48: _voice's palette size
    succ = g.integers(0, n_words, size=(n_words, len(NEXT_P)))
    # BPE on the word list in a fixed order with one thread: the same model bytes every time, in
    # tens of milliseconds. Ids 0-3 are reserved as in Moshi's tokenizer (unk, bos, eos, pad), so
    # TEXT_EOP and TEXT_PAD are never a piece of a word.
    buf = io.BytesIO()
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(words), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
            character_coverage=1.0, normalization_rule_name="identity", unk_id=0, bos_id=1, eos_id=2, pad_id=3,
            num_threads=1, minloglevel=2)
    except RuntimeError as e:
        raise ValueError(f"cannot train a {vocab_size}-piece tokenizer on {n_words} words ({e}); "
                         "lower --text_vocab or raise --text_words") from None
    return Language(words, length, sound, succ, buf.getvalue())


def _runs(mask):
    """(start, end) of each run of True in a bool array."""
    d = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.nonzero(d == 1)[0], np.nonzero(d == -1)[0]))


def _say_words(rng, lang, codes, voices, turns, busy):
    """Fill the speakers' turns (not the recall events) with words: a bigram chain per speaker,
    0-2 frames apart, each word's frames made its sound in the speaker's voice (semantic entry
    from the word, acoustic entries from the semantic one, as _speak maps them), so text and
    audio agree. Returns per stream a sorted list of (start frame, frames, word index)."""
    K = codes.shape[2]
    said = [[], []]
    last = [int(x) for x in rng.integers(0, len(lang.words), size=2)]
    for start, n, s in turns:
        pal, _, _, amap = voices[s]
        for a, b in _runs(~busy[start:start + n]):
            t, end = start + a + int(rng.integers(0, 3)), start + b
            while True:
                w = int(lang.succ[last[s], rng.choice(len(NEXT_P), p=NEXT_P)])
                L = int(lang.length[w])
                if t + L > end:
                    break
                idx = lang.sound[w]                                           # [L]
                codes[t:t + L, s, 0] = pal[0, idx]
                codes[t:t + L, s, 1:] = pal[np.arange(1, K)[None, :], amap[1:, idx].T]
                said[s].append((t, L, w))
                last[s] = w
                t += L + int(rng.integers(0, 3))
    return [sorted(x) for x in said]


def synthetic(out, hours=20.0, min_minutes=10.0, max_minutes=90.0, n_codebooks=8, seed=0, quiet=False,
              text=False, text_words=300, text_vocab=256, events_per_min=0.25, near_share=0.0,
              near_max_s=40.0, pattern_codes=0, value_frames=VALUE_LEN, quiz_share=0.0, same_speaker=False,
              quiz_max_s=0.0, tied_patterns=False, quiz_min_s=2.0, reserve_patterns=False, quiz_spacing_s=0.0,
              split_patterns=False):
    """Write `hours` of synthetic conversations to `out` (codes file) and their recall events to
    out + '.events.json'. text=True adds a text stream per speaker: the words of a made-up
    language of `text_words` words, tokenized by a `text_vocab`-piece sentencepiece model written
    to out + '.spm.model'. quiz_share: the share of conversations that are recall drills (see
    synth_conversation), all their events coming back quiz_min_s to quiz_max_s later (quiz_max_s 0:
    their near events 2 s to near_max_s, the others 10 s to an hour, as in ordinary conversations);
    same_speaker: see synth_conversation. tied_patterns: a pattern's acoustic codes follow from its
    semantic ones through one fixed table (see _pattern), else each is drawn on its own.
    reserve_patterns: the pattern_codes codes of keys and values are theirs alone (speech, silence
    and cues use the others), so a pattern's codes never turn up in the speech around it.
    quiz_spacing_s: mean seconds of speech between a drill's events (0: back to back).
    split_patterns: keys from one half of the pattern codes, values from the other. Returns
    the number of conversations."""
    rng = np.random.default_rng(seed)
    # shared across conversations, like a language: the silence frame and the two cue words
    g = np.random.default_rng(1234)
    silence = g.integers(0, CARD, size=n_codebooks)
    cues = g.integers(0, CARD, size=(2, CUE_LEN, n_codebooks))
    # keys and values: any code, or (pattern_codes > 0) one of a fixed set of that many per codebook
    alphabet = speech_codes = None
    if reserve_patterns:   # not the silence's or the cues' codes, and the speech gets the rest
        free = [np.setdiff1d(np.arange(CARD), [silence[k], *cues[:, :, k].ravel()]) for k in range(n_codebooks)]
        alphabet = np.stack([g.choice(f, pattern_codes, replace=False) for f in free])
        speech_codes = np.stack([np.setdiff1d(np.arange(CARD), a) for a in alphabet])
    elif pattern_codes:
        alphabet = np.stack([g.choice(CARD, pattern_codes, replace=False) for _ in range(n_codebooks)])
    tie = None
    if tied_patterns:
        tie = g.integers(0, pattern_codes or CARD, size=(n_codebooks, pattern_codes or CARD))
        tie[0] = np.arange(pattern_codes or CARD)
    total = int(hours * 3600 * FRAME_RATE)
    done, n, t0, events = 0, 0, time.time(), []
    lang = tok = trng = None
    text_meta = {}
    if text:
        lang = _language(text_words, text_vocab)
        tok = Tokenizer(proto=lang.spm)
        trng = np.random.default_rng([seed, 1])   # its own generator: rng draws what it draws without text
        text_meta = dict(n_text=2, text_cardinality=tok.n)
    with CodesWriter(out, n_streams=2, n_codebooks=n_codebooks, cardinality=CARD, frame_rate=FRAME_RATE,
                     **text_meta) as w:
        while done < total:
            F = int(rng.uniform(min_minutes, max_minutes) * 60 * FRAME_RATE)
            F = max(min(F, total - done), 1)
            quiz = quiz_share > 0 and rng.random() < quiz_share
            own = quiz and quiz_max_s > 0    # the drills' own gaps: every event back quiz_min_s to quiz_max_s later
            gaps, near = ((quiz_min_s, quiz_max_s), 1.0) if own else ((2.0, near_max_s), near_share)
            kw = dict(near_share=near, near_min_s=gaps[0], near_max_s=gaps[1], alphabet=alphabet,
                      value_frames=value_frames, quiz=quiz, same_speaker=same_speaker, tie=tie,
                      speech_codes=speech_codes, quiz_spacing_s=quiz_spacing_s, split_patterns=split_patterns)
            if lang is None:
                c, ev = synth_conversation(rng, F, n_codebooks, CARD, silence, cues, events_per_min, **kw)
            else:
                c, ev, said = synth_conversation(rng, F, n_codebooks, CARD, silence, cues, events_per_min,
                                                 lang=lang, trng=trng, **kw)
                cols = [text_tokens([(t / FRAME_RATE, (t + L) / FRAME_RATE, lang.words[x], None) for t, L, x in said[s]],
                                    tok, F, FRAME_RATE, where=f"{out} conversation {n} stream {s}") for s in range(2)]
                c = np.concatenate([np.stack(cols, 1), c.reshape(F, -1)], 1)
            w.add(c)
            events += [(n, s, a, b, value_frames) for s, a, b in ev]
            done += F
            n += 1
            if not quiet:
                el = time.time() - t0
                print(f"\r{done / total:6.1%}  {done / FRAME_RATE / 3600:.1f} of {hours:g} h, "
                      f"{n} conversations, {el:.0f}s", end="", file=sys.stderr, flush=True)
    tmp = out + ".events.json.tmp"
    with open(tmp, "w") as f:
        head = {"columns": ["conversation", "stream", "first_value_start", "recall_value_start", "value_len"]}
        if pattern_codes:  # (absent: values drawn from all CARD codes)
            head["pattern_codes"] = pattern_codes
        if reserve_patterns:
            head["reserved_patterns"] = True
        if split_patterns:   # values from one half of the codes: chance is 1 / this
            head["value_codes"] = (pattern_codes or CARD) // 2
        head["silence"] = silence.tolist()   # the silence frame (train.py --silence data)
        json.dump({**head, "events": events}, f)
    os.replace(tmp, out + ".events.json")
    if lang is not None:
        _write_atomic(out + ".spm.model", lang.spm)
    if not quiet:
        print(file=sys.stderr)
    return n


def synthetic_in_parts(out, workers, hours=20.0, seed=0, quiet=False, **kw):
    """`synthetic` in `workers` processes, for hundreds of hours: part i is hours / workers of it from a
    seed of its own (drawn from `seed`), and the parts are joined in order into `out`, their events (and
    tokenizer) with them. The same arguments give the same file; it is not the file of one process with
    that seed. Returns the number of conversations."""
    from concurrent.futures import ProcessPoolExecutor
    seeds = [int(v) for v in np.random.SeedSequence(seed).generate_state(workers)]
    parts = [f"{out}.part{i}.{os.getpid()}" for i in range(workers)]
    t0 = time.time()
    try:
        with ProcessPoolExecutor(workers) as ex:
            jobs = [ex.submit(synthetic, p, hours / workers, seed=s, quiet=True, **kw) for p, s in zip(parts, seeds)]
            for j in jobs:
                j.result()
        if not quiet:
            print(f"{workers} parts made in {time.time() - t0:.0f}s; joining them", file=sys.stderr, flush=True)
        files = [CodesFile(p, check_codes=False) for p in parts]
        n, events = 0, []
        with CodesWriter(out, **files[0].meta()) as w:
            for p, f in zip(parts, files):
                for i in range(len(f)):
                    w.add(f.conversation(i))
                with open(p + ".events.json") as fh:
                    head = json.load(fh)   # the same in every part but for the events
                events += [[c + n, *rest] for c, *rest in head.pop("events")]
                n += len(f)
        _write_atomic(out + ".events.json", json.dumps({**head, "events": events}).encode())
        if kw.get("text"):
            os.replace(parts[0] + ".spm.model", out + ".spm.model")
    finally:
        for p in parts:
            for q in (p, p + ".events.json", p + ".spm.model"):
                if os.path.exists(q):
                    os.remove(q)
    return n


def pattern_codes(path):
    """How many codes per codebook the recall values of a synthetic codes file are drawn from
    (uniformly): chance accuracy on them is 1 / that. None when the file has no events."""
    p = path + ".events.json"
    if not os.path.exists(p):
        return None
    with open(p) as f:
        head = json.load(f)
    return int(head.get("value_codes", head.get("pattern_codes", CARD)))


def silence_frame(path):
    """The silence frame (one code per codebook) that data.py synthetic wrote beside a codes file,
    for train.py --silence data."""
    p = path + ".events.json"
    if os.path.exists(p):
        with open(p) as f:
            sil = json.load(f).get("silence")
        if sil is not None:
            return tuple(int(c) for c in sil)
    raise ValueError(f"{p} lists no silence frame (files of python data.py synthetic do); give the codes "
                     "instead, one per codebook: --silence 2005,17,...")


def load_events(path):
    """Recall events of a synthetic codes file as an int64 array [N, 5] (see `synthetic`)."""
    p = path + ".events.json"
    if not os.path.exists(p):
        return np.zeros((0, 5), np.int64)
    with open(p) as f:
        return np.array(json.load(f)["events"], dtype=np.int64).reshape(-1, 5)


# -----------------------------------------------------------------------------
# The text stream: time-aligned sentencepiece tokens, one column per speaker (or for one speaker)
#
# Moshi's layout (kyutai-labs/moshi-finetune, finetune/data/interleaver.py, build_token_stream):
# the frames hold the padding token except where a word is spelt; a word's pieces go in the frames
# from the one where the word starts (the frame t with start * 12.5 in [t, t + 1)), one a frame;
# the padding frame just before a word becomes the end-of-padding token, so the model announces a
# word one frame ahead. Ids from moshi/models/lm.py (existing_text_padding_id = 3,
# existing_text_end_padding_id = 0). Where a word starts before the previous one's pieces are all
# placed (words shorter than their pieces), its pieces queue after them: the interleaver's
# keep_and_shift=True (its default, False, drops the rest of the earlier word), so no word is lost.
# Pieces that would run past the conversation's end are cut, as there. Unlike it, a word of zero
# duration is kept: aligners give those to real, very short words.

TEXT_PAD = 3   # "no text in this frame"
TEXT_EOP = 0   # "a word starts in the next frame"
WORD_START = "\u2581"   # sentencepiece's word-boundary mark, the first character of a word's first piece

ALIGN_HELP = r"""
Add a text stream to a codes file: each speaker's words, as sentencepiece pieces placed in the
frames where the words are said (Moshi's layout: padding elsewhere, end-of-padding the frame before
a word).

Transcripts: a folder with one file per conversation and speaker, named
<conversation>.<stream>.txt: conversation i is the i-th conversation of the codes file (the i-th
audio file `python mimi.py encode` took, in its order), stream s its speaker (channel s of a stereo
file). Each file has one `start end word` line per word, times in seconds from the start of the
conversation, a word without spaces; blank lines and lines starting with # are skipped:

    0.48 0.80 hello
    0.80 1.12 there

Common aligner outputs convert in a line of shell:

    # WhisperX JSON (segments[].words[] with word/start/end; words it could not align have no times)
    jq -r '.segments[].words[] | select(.start) | "\(.start) \(.end) \(.word | gsub("\\s"; ""))"' a.json > words/0.0.txt
    # moshi-finetune's annotate.py JSON ({"alignments": [[word, [start, end], speaker], ...]})
    jq -r '.alignments[] | "\(.[1][0]) \(.[1][1]) \(.[0] | gsub("\\s"; ""))"' a.json > words/0.0.txt
    # Montreal Forced Aligner CSV (Begin,End,Label,Type,Speaker)
    awk -F, 'NR > 1 && $4 == "words" && $3 != "" {print $1, $2, $3}' a.csv > words/0.0.txt

The sentencepiece model (Moshi's tokenizer_spm_32k_3.model, or your own) is copied beside the
output as OUT.spm.model, where train.py finds it.
"""


class TranscriptError(ValueError):
    """A transcript (or the tokenizer for one) cannot be laid out as a text stream."""


class Tokenizer:
    """A sentencepiece model and what the text stream needs of it: which ids are not pieces of
    a word (control, unknown, padding, end of padding) and which pieces start a word."""

    def __init__(self, path=None, proto=None):
        import sentencepiece
        try:
            self.sp = (sentencepiece.SentencePieceProcessor(model_proto=proto) if proto is not None
                       else sentencepiece.SentencePieceProcessor(model_file=str(path)))
        except (OSError, RuntimeError) as e:
            if path is not None and not os.path.isfile(path):
                raise FileNotFoundError(f"tokenizer {str(path)!r} does not exist") from None
            raise TranscriptError(f"{str(path)!r} is not a sentencepiece model ({e}); give the .model "
                                  "file the text was (or will be) tokenized with") from None
        self.path, self.n = path, self.sp.get_piece_size()
        if self.n > MAX_CARDINALITY:
            raise TranscriptError(f"tokenizer {str(path)!r} has {self.n} pieces; the codes format stores a text "
                                  f"token in 16 bits (at most {MAX_CARDINALITY} pieces): use a smaller vocabulary")
        if self.n <= max(TEXT_PAD, TEXT_EOP):
            raise TranscriptError(f"tokenizer {str(path)!r} has {self.n} pieces: too few to hold the padding "
                                  f"({TEXT_PAD}) and end-of-padding ({TEXT_EOP}) ids")
        ids = range(self.n)
        self.starts_word = np.array([self.sp.id_to_piece(i).startswith(WORD_START) for i in ids])
        self.special = np.array([self.sp.is_control(i) or self.sp.is_unknown(i) for i in ids])
        self.special[[TEXT_PAD, TEXT_EOP]] = True

    def encode(self, word):
        return self.sp.encode(word)

    def decode(self, ids):
        return self.sp.decode(ids).strip()


def read_words(path):
    """Word timings of one transcript file (`start end word` lines, seconds) as a list of
    (start, end, word, line number). Raises TranscriptError naming the file and line."""
    out = []
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError:
        raise TranscriptError(f"{path}: not UTF-8 text; a transcript has `start end word` lines") from None
    for i, line in enumerate(lines, 1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        parts = s.split()
        try:
            if len(parts) != 3:
                raise ValueError
            a, b = float(parts[0]), float(parts[1])
        except ValueError:
            raise TranscriptError(f"{path}:{i}: expected `start end word` (seconds, seconds, one word without "
                                  f"spaces), got {s[:80]!r}; see `python data.py align --help` for converting "
                                  "aligner output") from None
        if not (math.isfinite(a) and math.isfinite(b) and 0 <= a <= b):
            raise TranscriptError(f"{path}:{i}: times must satisfy 0 <= start <= end, got {s[:80]!r}")
        out.append((a, b, parts[2], i))
    return out


def text_tokens(words, tok, n_frames, frame_rate=FRAME_RATE, where="transcript", stats=None):
    """One text stream [n_frames] int64 from one speaker's words [(start s, end s, word, line)],
    in Moshi's layout (see above). Words must not overlap and must lie within the audio.
    stats (a dict), when given, counts words, pieces, shifted words and cut pieces."""
    F = n_frames
    out = np.full(F, TEXT_PAD, np.int64)
    free, prev_end = 0, 0.0                       # first frame not holding a piece; end of the last word
    st = {"words": 0, "pieces": 0, "shifted": 0, "cut": 0}
    for a, b, word, line in words:
        at = f"{where}:{line}" if line is not None else where
        if a < prev_end - 1e-6:
            raise TranscriptError(f"{at}: {word!r} starts at {a:.3f} s, before the previous word ends "
                                  f"({prev_end:.3f} s): one speaker's words must be in order and must not "
                                  "overlap (clip each word's end to the next word's start)")
        t0 = int(math.floor(a * frame_rate + 1e-6))   # the frame t with a * rate in [t, t + 1)
        if t0 >= F or b > (F + 1) / frame_rate:       # one frame of slack for the aligner's rounding
            raise TranscriptError(f"{at}: {word!r} at {a:.2f}-{b:.2f} s is past the end of the audio "
                                  f"({F / frame_rate:.2f} s, {F} frames): is this the transcript of another "
                                  "conversation or speaker?")
        ids = tok.encode(word)
        if not ids or not tok.starts_word[ids[0]]:
            raise TranscriptError(f"{at}: the tokenizer does not mark the start of {word!r} with "
                                  f"{WORD_START!r}: use a sentencepiece model trained with add_dummy_prefix "
                                  "(the default), as Moshi's")
        bad = [i for i in ids if tok.special[i]]
        if bad:
            raise TranscriptError(f"{at}: {word!r} encodes to id {bad[0]} ({tok.sp.id_to_piece(bad[0])!r}): "
                                  "it holds characters the tokenizer does not know, and the text stream keeps "
                                  f"ids {TEXT_EOP} and {TEXT_PAD} for end of padding and padding; remove or "
                                  "spell out those characters")
        t = max(t0, free)
        if t > 0 and out[t - 1] == TEXT_PAD:
            out[t - 1] = TEXT_EOP
        n = max(0, min(len(ids), F - t))
        out[t:t + n] = ids[:n]
        free, prev_end = t + n, b
        st["words"] += 1
        st["pieces"] += n
        st["shifted"] += t > t0
        st["cut"] += len(ids) - n
    if stats is not None:
        for k, v in st.items():
            stats[k] = stats.get(k, 0) + v
    return out


class TextDecoder:
    """The inverse of `text_tokens`, one frame at a time: push(token) returns the word that this
    frame's token finishes, as (start frame, word), or None. A word runs from a piece that starts
    with the word-boundary mark (as Moshi's server prints its text) to the next padding, end of
    padding or word start, so it is known one frame after its last piece; finish() returns the
    last one. Pieces after padding without the mark start a word of their own."""

    def __init__(self, tok):
        self.tok, self.t, self.ids, self.start = tok, 0, [], None

    def push(self, token):
        token = int(token)
        special = token >= self.tok.n or self.tok.special[token]
        out = self.finish() if self.ids and (special or self.tok.starts_word[token]) else None
        if not special:
            if not self.ids:
                self.start = self.t
            self.ids.append(token)
        self.t += 1
        return out

    def finish(self):
        if not self.ids:
            return None
        ids, self.ids = self.ids, []
        word = self.tok.decode(ids)
        return (self.start, word) if word else None


def words_from_text(tokens, tok):
    """A text stream [frames] -> its words as a list of (start frame, word): the inverse of
    text_tokens (pieces joined, padding dropped)."""
    d = TextDecoder(tok)
    out = [w for w in (d.push(x) for x in np.asarray(tokens).tolist()) if w]
    last = d.finish()
    return out + [last] if last else out


def _write_atomic(path, data):
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _transcript_files(folder, n_conv, n_streams, codes_path):
    """{(conversation, stream): path} of the <conversation>.<stream>.txt files in folder."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"transcripts folder {folder!r} does not exist")
    out = {}
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".txt"):
            continue
        m = re.fullmatch(r"(\d+)\.(\d+)\.txt", name)
        p = os.path.join(folder, name)
        if not m:
            raise TranscriptError(f"{p}: name transcripts <conversation>.<stream>.txt (e.g. 0.1.txt: conversation "
                                  "0, stream 1)")
        i, s = int(m[1]), int(m[2])
        if i >= n_conv or s >= n_streams:
            raise TranscriptError(f"{p}: {codes_path!r} has conversations 0..{n_conv - 1} and streams "
                                  f"0..{n_streams - 1}")
        if (i, s) in out:
            raise TranscriptError(f"{p} and {out[i, s]} are both conversation {i}, stream {s}")
        out[i, s] = p
    return out


def align(codes, transcripts, spm, out, main=None, allow_missing=False):
    """Write `out`: the codes file `codes` with a text stream from the transcripts folder (see
    ALIGN_HELP), one text column per audio stream, or one for stream `main`, tokenized by the
    sentencepiece model `spm`, which is copied to out + '.spm.model'. A text stream already in
    `codes` is replaced. Returns the counts of words, pieces, shifted words and cut pieces."""
    tok = Tokenizer(spm)
    f = CodesFile(codes)
    if main is not None and not 0 <= main < f.n_streams:
        raise ValueError(f"--main {main}: {codes!r} has streams 0..{f.n_streams - 1}")
    streams = list(range(f.n_streams)) if main is None else [main]
    files = _transcript_files(transcripts, len(f), f.n_streams, codes)
    missing = [f"{i}.{s}.txt" for i in range(len(f)) for s in streams if (i, s) not in files]
    if missing and not allow_missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise TranscriptError(f"{transcripts!r} has no {', '.join(missing[:5])}{more}; add them or pass "
                              "--allow_missing to leave those text streams as padding")
    stats = {"words": 0, "pieces": 0, "shifted": 0, "cut": 0}
    meta = {**f.meta(), "n_text": len(streams), "text_cardinality": tok.n}
    with CodesWriter(out, **meta) as w:
        for i in range(len(f)):
            audio = f.audio(i)                                                   # [F, S, K]
            text = np.full((len(audio), len(streams)), TEXT_PAD, np.int64)
            for j, s in enumerate(streams):
                if (i, s) in files:
                    p = files[i, s]
                    text[:, j] = text_tokens(read_words(p), tok, len(audio), f.frame_rate, p, stats)
            w.add(np.concatenate([text, audio.reshape(len(audio), -1)], 1))
    if not (os.path.exists(out + ".spm.model") and os.path.samefile(spm, out + ".spm.model")):
        with open(spm, "rb") as src:
            _write_atomic(out + ".spm.model", src.read())
    if os.path.exists(codes + ".events.json") and os.path.abspath(codes) != os.path.abspath(out):
        shutil.copyfile(codes + ".events.json", out + ".events.json")   # recall events of a synthetic file
    return stats


# -----------------------------------------------------------------------------
# Batches for training (train.py): windows of frames, with the model's per-column delays applied


def window(conv, start, T, delays, initial):
    """Frames start..start+T of a conversation [F, C], column c delayed by delays[c] frames:
    out[t, c] = conv[start + t - delays[c], c], or initial[c] before the conversation starts."""
    C = conv.shape[1]
    idx = start + np.arange(T)[:, None] - np.asarray(delays)[None, :]          # [T, C]
    out = np.asarray(conv[np.clip(idx, 0, None), np.arange(C)[None, :]], dtype=np.int64)
    return np.where(idx < 0, np.asarray(initial)[None, :], out)


def _long_enough(f, convs, T):
    """The conversations of at least T frames (a chunk never splices two conversations)."""
    lens = f.lengths[convs]
    if not (lens >= T).any():
        raise ValueError(f"seq_len {T} is longer than every conversation (longest {lens.max() if len(lens) else 0} "
                         "frames); lower --seq_len")
    return np.asarray(convs)[lens >= T]


class RecallFrames:
    """Where a synthetic codes file's recalled values are (its events file), as a mask over the
    columns of a training window: True at the audio columns of the stream that recalls a value, in
    the value's frames (each column shifted by its delay, as `window` shifts the codes)."""

    def __init__(self, path, f):
        ev = load_events(path)
        if not len(ev):
            raise ValueError(f"{path}.events.json is missing or lists no recall events: the recall weight needs a "
                             "codes file written by `python data.py synthetic` with recall events")
        self.by_conv = {}
        for c, s, first, second, L in ev.tolist():
            self.by_conv.setdefault(c, []).append((s, first, second, L))
        self.f = f
        self.col_stream = np.r_[np.full(f.n_text, -1), np.repeat(np.arange(f.n_streams), f.n_codebooks)]   # [C]

    def mask(self, c, start, T, delays, heard_from=None, gaps=(0, math.inf)):
        """[T, C] bool for frames start..start+T of conversation c. heard_from: only the events whose
        first mention (cue and key included) starts at or after this frame (a window's own first
        frame: the values it can know). gaps (lo, hi): only the events recalled lo <= frames < hi
        after their first mention."""
        n = int(self.f.lengths[c])
        recalled = np.zeros((n, self.f.n_streams), bool)
        for s, first, a, L in self.by_conv.get(int(c), ()):
            if (heard_from is None or first - CUE_LEN - KEY_LEN >= heard_from) and gaps[0] <= a - first < gaps[1]:
                recalled[a:a + L, s] = True
        idx = start + np.arange(T)[:, None] - np.asarray(delays)[None, :]
        hit = recalled[np.clip(idx, 0, n - 1), np.clip(self.col_stream, 0, None)[None, :]]
        return hit & (idx >= 0) & (self.col_stream >= 0)[None, :]


class WindowSampler:
    """Mini-batch mode: random windows of T frames inside conversations, each drawn with
    probability proportional to its number of windows. After next(), `last` lists each row's
    (conversation, first frame)."""

    def __init__(self, f, convs, T, batch, delays, initial, seed):
        self.f, self.T, self.B, self.delays, self.initial = f, T, batch, delays, initial
        self.convs = _long_enough(f, convs, T)
        n = f.lengths[self.convs] - T + 1
        self.p = n / n.sum()
        self.rng = np.random.default_rng(seed)

    def next(self):
        cs = self.rng.choice(self.convs, size=self.B, p=self.p)
        starts = [int(self.rng.integers(0, self.f.lengths[c] - self.T + 1)) for c in cs]
        self.last = [(int(c), s) for c, s in zip(cs, starts)]
        x = np.stack([window(self.f.conversation(c), s, self.T, self.delays, self.initial) for c, s in zip(cs, starts)])
        return x, np.ones(self.B, bool)

    def state_dict(self):
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, d):
        self.rng.bit_generator.state = d["rng"]


class StreamSampler:
    """Streaming mode: each of B rows walks one conversation in consecutive chunks of T frames;
    when its conversation has fewer than T frames left, the row takes the next conversation of a
    shuffled order (its state is then reset by the caller: `reset` is True for that row). After
    next(), `last` lists each row's (conversation, first frame)."""

    def __init__(self, f, convs, T, batch, delays, initial, seed, rank=0, world=1):
        self.f, self.T, self.B, self.delays, self.initial = f, T, batch, delays, initial
        self.convs = _long_enough(f, convs, T)
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
        self.last = [(c, s) for c, s in self.rows]
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
    s.add_argument("--workers", type=int, default=1,
                   help="make it in this many processes, each a part from a seed of its own drawn from --seed "
                        "(a different file from one process's)")
    s.add_argument("--events_per_min", type=float, default=0.25, help="recall events per minute of conversation")
    s.add_argument("--near_share", type=float, default=0.0,
                   help="share of recall events that come back 2 s to --near_max_s later (the rest: 10 s to 1 h)")
    s.add_argument("--near_max_s", type=float, default=40.0, help="longest gap of a near recall event, seconds")
    s.add_argument("--pattern_codes", type=int, default=0,
                   help="draw recall keys and values from this many codes per codebook (0: all %d)" % CARD)
    s.add_argument("--value_frames", type=int, default=VALUE_LEN, help="frames of a recall event's value pattern")
    s.add_argument("--quiz_max_s", type=float, default=0.0,
                   help="the drills' own gaps: every event of a drill comes back --quiz_min_s to this many seconds "
                        "later (0: as in ordinary conversations, --near_share and --near_max_s); short enough to "
                        "fall inside the attention window, the drills teach copying")
    s.add_argument("--quiz_min_s", type=float, default=2.0,
                   help="the shortest gap of a drill's events with --quiz_max_s, seconds (beyond the attention "
                        "window: only a longer memory answers them)")
    s.add_argument("--quiz_spacing_s", type=float, default=0.0,
                   help="mean seconds of speech between a drill's events (default 0: back to back); fewer "
                        "patterns to hold at once, as in associative-recall tasks with noise between the pairs")
    s.add_argument("--reserve_patterns", type=lambda v: v.lower() in ("1", "true", "yes"), default=False,
                   help="true: the --pattern_codes codes of keys and values occur nowhere else (the speech, the "
                        "silence and the cues use the other codes)")
    s.add_argument("--split_patterns", type=lambda v: v.lower() in ("1", "true", "yes"), default=False,
                   help="true: keys draw from one half of the pattern codes and values from the other, as in "
                        "associative-recall tasks (default: both from all of them, so a key and a value look alike)")
    s.add_argument("--same_speaker", type=lambda v: v.lower() in ("1", "true", "yes"), default=False,
                   help="true: a pattern comes back from the speaker who said it first (default: either speaker)")
    s.add_argument("--tied_patterns", type=lambda v: v.lower() in ("1", "true", "yes"), default=False,
                   help="true: a recall pattern's acoustic codes follow from its semantic codes through one "
                        "fixed table, as in speech (default: each codebook drawn on its own)")
    s.add_argument("--quiz_share", type=float, default=0.0,
                   help="share of conversations that are recall drills: events back to back, nearly half the "
                        "frames recalled (a model learns to recall from these; scattered events are too rare)")
    s.add_argument("--text", action="store_true", help="add a text stream per speaker (and OUT.spm.model)")
    s.add_argument("--text_words", type=int, default=300, help="words in the made-up language of --text")
    s.add_argument("--text_vocab", type=int, default=256, help="sentencepiece pieces for --text")
    al = sub.add_parser("align", help="add a time-aligned text stream (sentencepiece) to a codes file",
                        description=ALIGN_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    al.add_argument("codes", help="codes file (python mimi.py encode)")
    al.add_argument("--transcripts", required=True, help="folder of <conversation>.<stream>.txt word timings")
    al.add_argument("--spm", required=True, help="sentencepiece model, e.g. Moshi's tokenizer_spm_32k_3.model")
    al.add_argument("--out", required=True, help="codes file to write (with its text stream)")
    al.add_argument("--main", type=int, default=None, metavar="STREAM",
                    help="one text stream, for this speaker's words (Moshi's inner monologue; other "
                         "streams' transcripts are ignored); default: one text stream per audio stream")
    al.add_argument("--allow_missing", action="store_true",
                    help="leave the text of a conversation and stream without a transcript as padding")
    a = ap.parse_args(argv)
    try:
        return _run(ap, a)
    except (ValueError, OSError) as e:   # bad inputs: the message says what to do, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def _run(ap, a):
    if a.cmd == "synthetic":
        if not a.hours > 0 or not 0 < a.min_minutes <= a.max_minutes:
            ap.error("need hours > 0 and 0 < min_minutes <= max_minutes")
        if not 0 <= a.near_share <= 1 or not a.near_max_s >= 2:
            ap.error("need 0 <= near_share <= 1 and near_max_s >= 2 (seconds)")
        if not 0 <= a.quiz_share <= 1 or not (a.quiz_max_s == 0 or a.quiz_max_s >= a.quiz_min_s >= 2):
            ap.error("need 0 <= quiz_share <= 1, and quiz_max_s 0 or quiz_max_s >= quiz_min_s >= 2 (seconds)")
        if a.value_frames < 1 or a.quiz_spacing_s < 0:
            ap.error("need value_frames >= 1 and quiz_spacing_s >= 0")
        if not 0 <= a.pattern_codes <= CARD:
            ap.error(f"need 0 <= pattern_codes <= {CARD}")
        if a.reserve_patterns and not 0 < a.pattern_codes <= CARD - 64:
            ap.error(f"--reserve_patterns needs 0 < pattern_codes <= {CARD - 64}: the speech needs codes of its own")
        if a.workers < 1:
            ap.error("need workers >= 1")
        make = synthetic if a.workers == 1 else functools.partial(synthetic_in_parts, workers=a.workers)
        n = make(a.out, hours=a.hours, min_minutes=a.min_minutes, max_minutes=a.max_minutes,
                 n_codebooks=a.n_codebooks, seed=a.seed, text=a.text, text_words=a.text_words,
                 text_vocab=a.text_vocab, events_per_min=a.events_per_min,
                 near_share=a.near_share, near_max_s=a.near_max_s, pattern_codes=a.pattern_codes,
                 value_frames=a.value_frames, quiz_share=a.quiz_share,
                 same_speaker=a.same_speaker, quiz_max_s=a.quiz_max_s, tied_patterns=a.tied_patterns,
                 quiz_min_s=a.quiz_min_s, reserve_patterns=a.reserve_patterns,
                 quiz_spacing_s=a.quiz_spacing_s, split_patterns=a.split_patterns)
        print(f"wrote {n} conversations to {a.out}" + (f" (tokenizer: {a.out}.spm.model)" if a.text else ""))
    elif a.cmd == "align":
        st = align(a.codes, a.transcripts, a.spm, a.out, a.main, a.allow_missing)
        print(f"wrote {a.out}: {st['words']} words, {st['pieces']} pieces; tokenizer {a.out}.spm.model")
        if st["shifted"]:
            print(f"note: {st['shifted']} words start a frame or more after their time, behind the pieces of "
                  "the word before (words shorter than their pieces)")
        if st["cut"]:
            print(f"note: {st['cut']} pieces ran past the end of their conversation and were cut")


if __name__ == "__main__":
    main()
