"""The text stream: alignment round trip and Moshi's layout, the synthetic language, the model's
text wiring, a tiny model learning the text, and generate.py --text_out."""
import hashlib
import json
import math
import os
import shutil
import struct
import subprocess
import time
from collections import deque
from contextlib import contextmanager

import numpy as np
import pytest
import torch

import data
import generate
import train
from codes import CodesFile, write_codes
from data import TEXT_EOP, TEXT_PAD, Tokenizer, TranscriptError, text_tokens, words_from_text
from model import Config, SpeechLM, loss_fn

torch.set_num_threads(2)
FR = 12.5


@contextmanager
def one_thread():
    """The tiny model's matrices are too small to share out, and on a CPU that other jobs also
    use, two threads wait on each other: one thread trains it ~20x faster there."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="module")
def lang():
    return data._language(32, 64)


@pytest.fixture(scope="module")
def tok(lang):
    return Tokenizer(proto=lang.spm)


@pytest.fixture(scope="module")
def spm_file(lang, tmp_path_factory):
    p = tmp_path_factory.mktemp("spm") / "t.model"
    p.write_bytes(lang.spm)
    return str(p)


def _w(a, b, word, line=None):
    return (a, b, word, line)


# -----------------------------------------------------------------------------
# Layout and round trip


def kyutai_stream(words, tok, T, pad=TEXT_PAD, eop=TEXT_EOP):
    """kyutai-labs/moshi-finetune, finetune/data/interleaver.py, Interleaver.build_token_stream
    with keep_and_shift=True and in_word_padding = text_padding, ported without torch: the
    reference our layout must equal."""
    al = [(tok.encode(w), (a, b)) for a, b, w, _ in words]
    text = [pad] * T
    i, queue, last_word_end = 0, deque(), -1
    for t in range(T):
        while i < len(al) and al[i][1][0] * FR < t + 1:
            queue.extend(al[i][0])
            last_word_end = int(al[i][1][1] * FR)
            i += 1
        if queue:
            if t > 0 and text[t - 1] == pad:
                text[t - 1] = eop
            text[t] = queue.popleft()
        elif t <= last_word_end:
            text[t] = pad
    return np.array(text)


def test_round_trip_and_layout(lang, tok):
    ws = lang.words
    multi = next(w for w in ws if len(tok.encode(w)) >= 3)          # a word of 3+ pieces
    one = [w for w in ws if len(tok.encode(w)) == 1]                 # words of one piece
    words = [
        _w(0.00, 0.30, ws[0]),           # at frame 0: no end-of-padding before it
        _w(0.30, 0.50, multi),           # right after: no padding between, so no end-of-padding
        # silence between turns (2 s), then two words shorter than a frame, both in frame 40
        _w(3.21, 3.23, one[0]),
        _w(3.23, 3.25, one[1]),
        _w(3.60, 4.00, ws[3]),           # starts exactly on frame 45
        _w(7.90, 8.00, multi),           # in the last frame of a 100-frame conversation
    ]
    F = 100
    x = text_tokens(words, tok, F)
    n = [len(tok.encode(w)) for *_, w, _ in words]
    # where each word goes: its start frame, or just after the pieces of the word before
    starts, free = [], 0
    for (a, *_), k in zip(words, n):
        t = max(int(math.floor(a * FR + 1e-6)), free)
        starts.append(t)
        free = t + k
    assert starts[:2] == [0, 3] and starts[2:5] == [40, 41, 45] and starts[5] == 98
    got = words_from_text(x, tok)
    want = [(t, w) for t, (*_, w, _) in zip(starts, words)]
    assert got[:-1] == want[:-1]
    assert got[-1] == (98, tok.decode(tok.encode(multi)[:2]))    # two of its pieces fit: the rest is cut
    # Moshi's layout: end-of-padding exactly in the padding frame before a word, padding elsewhere
    for t, k in zip(starts, n):
        np.testing.assert_array_equal(x[t:t + k], tok.encode(words[starts.index(t)][2])[:F - t])
    eop = set(np.nonzero(x == TEXT_EOP)[0].tolist())
    assert eop == {t - 1 for t in starts if t > 0 and t - 1 not in
                   {u for s, k in zip(starts, n) for u in range(s, s + k)}}
    assert starts[1] - 1 not in eop and starts[3] - 1 not in eop   # back-to-back words
    assert np.all(x[starts[1] + n[1]:39] == TEXT_PAD) and x[39] == TEXT_EOP   # silence between turns
    np.testing.assert_array_equal(x, kyutai_stream(words, tok, F))
    with pytest.raises(TranscriptError, match="overlap"):                # which the interleaver would queue
        text_tokens([_w(0.0, 0.5, ws[0]), _w(0.4, 0.6, ws[1], 7)], tok, F)


def test_layout_matches_moshi_finetune_on_random_transcripts(lang, tok):
    rng = np.random.default_rng(0)
    for trial in range(30):
        F = int(rng.integers(20, 200))
        words, t = [], float(rng.uniform(0, 1))
        while True:
            d = float(rng.choice([rng.uniform(0.005, 0.08), rng.uniform(0.08, 0.8)]))   # some shorter than a frame
            if t + d > F / FR:
                break
            words.append(_w(t, t + d, lang.words[int(rng.integers(len(lang.words)))]))
            t += d + float(rng.choice([0.0, rng.uniform(0, 0.3), rng.uniform(0.5, 3.0)]))
        x = text_tokens(words, tok, F)
        np.testing.assert_array_equal(x, kyutai_stream(words, tok, F), err_msg=f"trial {trial}")
        got = words_from_text(x, tok)
        said = [w for *_, w, _ in words]
        assert [w for _, w in got[:-1]] == said[:len(got) - 1]          # every word, in order, the last
        assert said[len(got) - 1].startswith(got[-1][1])                # maybe cut by the conversation's end
        assert len(got) == len(said) or x[-1] != TEXT_PAD
        assert all(a < b for (a, _), (b, _) in zip(got, got[1:]))
        assert all(t >= math.floor(w[0] * FR) for (t, _), w in zip(got, words))


# -----------------------------------------------------------------------------
# python data.py align


def _codes(path, lens=(60, 90), S=2, K=2):
    rng = np.random.default_rng(1)
    convs = [rng.integers(0, 2048, (n, S, K)) for n in lens]
    write_codes(path, convs, n_streams=S, n_codebooks=K)
    return convs


def _transcript(path, rows):
    path.write_text("".join(f"{a} {b} {w}\n" for a, b, w in rows))


def test_align_cli(lang, tok, spm_file, tmp_path, capsys):
    convs = _codes(tmp_path / "c.bin")
    d = tmp_path / "words"
    d.mkdir()
    ws = lang.words
    rows = {(0, 0): [(0.5, 0.9, ws[5]), (0.9, 1.3, ws[6])], (0, 1): [(2.0, 2.4, ws[7])],
            (1, 0): [(0.0, 0.2, ws[8])], (1, 1): [(6.0, 7.1, ws[9])]}
    for (i, s), r in rows.items():
        _transcript(d / f"{i}.{s}.txt", r)
    (d / "notes.md").write_text("other files are left alone")
    out = str(tmp_path / "t.bin")
    data.main(["align", str(tmp_path / "c.bin"), "--transcripts", str(d), "--spm", spm_file, "--out", out])
    assert "5 words" in capsys.readouterr().out
    f = CodesFile(out)
    assert f.n_text == 2 and f.text_cardinality == tok.n == 64 and len(f) == 2
    assert open(out + ".spm.model", "rb").read() == lang.spm
    for (i, s), r in rows.items():
        np.testing.assert_array_equal(f.audio(i), convs[i])
        assert words_from_text(f.text(i)[:, s], tok) == [(int(a * FR), w) for a, _, w in r]
    # one text stream for the main speaker (Moshi's inner monologue)
    data.main(["align", str(tmp_path / "c.bin"), "--transcripts", str(d), "--spm", spm_file, "--out", out,
               "--main", "1"])
    f = CodesFile(out)
    assert f.n_text == 1 and words_from_text(f.text(1)[:, 0], tok) == [(75, ws[9])]
    # missing transcripts, when allowed, leave padding
    os.remove(d / "1.1.txt")
    data.main(["align", str(tmp_path / "c.bin"), "--transcripts", str(d), "--spm", spm_file, "--out", out,
               "--allow_missing"])
    assert np.all(CodesFile(out).text(1)[:, 1] == TEXT_PAD)


@pytest.mark.skipif(not (shutil.which("jq") and shutil.which("awk")), reason="needs jq and awk")
def test_help_conversions_work(tmp_path):
    # the one-liners of `python data.py align --help`, run on small files of each format
    (tmp_path / "words").mkdir()
    samples = {
        "segments": {"segments": [{"words": [{"word": " ba", "start": 0.5, "end": 0.9, "score": 0.9},
                                             {"word": "2024"}, {"word": "ke,", "start": 0.0, "end": 0.2}]}]},
        "alignments": {"alignments": [[" ba", [0.5, 0.9], "SPEAKER_MAIN"], ["ke,", [0.0, 0.2], "SPEAKER_MAIN"]]},
    }
    lines = [x.strip() for x in data.ALIGN_HELP.splitlines() if x.strip().startswith(("jq ", "awk "))]
    assert len(lines) == 3
    for cmd in lines:
        key = next((k for k in samples if f".{k}[]" in cmd), None)
        if key:
            (tmp_path / "a.json").write_text(json.dumps(samples[key]))
        else:
            (tmp_path / "a.csv").write_text("Begin,End,Label,Type,Speaker\n0.5,0.9,ba,words,s\n"
                                            "0.5,0.6,B,phones,s\n0.0,0.2,ke,words,s\n")
        subprocess.run(cmd, shell=True, cwd=tmp_path, check=True)
        got = data.read_words(str(tmp_path / "words" / "0.0.txt"))
        assert [(a, b, w) for a, b, w, _ in got] == [(0.5, 0.9, "ba"), (0.0, 0.2, "ke" + ("," if key else ""))], cmd


def _align_err(capsys, args):
    with pytest.raises(SystemExit) as e:
        data.main(["align"] + [str(a) for a in args])
    assert e.value.code == 2
    return capsys.readouterr().err


def test_align_bad_inputs(lang, spm_file, tmp_path, capsys):
    _codes(tmp_path / "c.bin", lens=(60,), S=1)                          # 60 frames: 4.8 s
    d = tmp_path / "w"
    d.mkdir()
    t = d / "0.0.txt"
    args = [tmp_path / "c.bin", "--transcripts", d, "--spm", spm_file, "--out", tmp_path / "o.bin"]
    ws = lang.words

    t.write_text(f"0.1 0.5 {ws[0]}\n0.4 0.9 {ws[1]}\n")                   # overlapping words
    msg = _align_err(capsys, args)
    assert f"{t}:2:" in msg and "overlap" in msg
    t.write_text(f"0.1 0.5 {ws[0]}\n\n# a comment\n4.9 5.0 {ws[1]}\n")     # past the audio
    msg = _align_err(capsys, args)
    assert f"{t}:4:" in msg and "past the end of the audio" in msg
    t.write_text(f"4.7 6.0 {ws[1]}\n")                                    # ends well past it
    assert "past the end of the audio" in _align_err(capsys, args)
    for bad in ["0.1,0.5,word", "0.1 0.5", "0.1 0.5 two words", "start end word", "0.5 0.1 word", "nan 1 word"]:
        t.write_text(f"0.0 0.1 {ws[0]}\n{bad}\n")                          # unknown word formats
        msg = _align_err(capsys, args)
        assert f"{t}:2:" in msg and ("expected `start end word`" in msg or "0 <= start <= end" in msg), bad
    t.write_bytes(b"\xff\xfe0 1 x\n")
    assert "not UTF-8" in _align_err(capsys, args)
    t.write_text("0.1 0.5 hello\n")                                       # letters the tokenizer lacks
    msg = _align_err(capsys, args)
    assert f"{t}:1:" in msg and "does not know" in msg
    t.write_text(f"0.1 0.5 {ws[0]}\n")
    # a vocabulary larger than 16-bit codes can hold: the trained model plus 65,536 more pieces
    # (a serialised ModelProto with extra `pieces` entries appended: protobuf concatenates them)
    def piece(s):
        inner = b"\x0a" + bytes([len(s)]) + s.encode() + b"\x15" + struct.pack("<f", -1.0)
        return b"\x0a" + bytes([len(inner)]) + inner
    big = tmp_path / "big.model"
    big.write_bytes(lang.spm + b"".join(piece(f"x{i}") for i in range(65536)))
    msg = _align_err(capsys, args[:-3] + [big, "--out", tmp_path / "o.bin"])
    assert "65600 pieces" in msg and "16 bits" in msg
    (tmp_path / "junk.model").write_bytes(b"not a model")
    assert "not a sentencepiece model" in _align_err(capsys, args[:-3] + [tmp_path / "junk.model", "--out", "x"])
    assert "does not exist" in _align_err(capsys, args[:-3] + [tmp_path / "none.model", "--out", "x"])
    # transcripts that match no conversation, or none at all
    (d / "3.0.txt").write_text("")
    assert "conversations 0..0 and streams 0..0" in _align_err(capsys, args)
    os.remove(d / "3.0.txt")
    (d / "first.txt").write_text("")
    assert "<conversation>.<stream>.txt" in _align_err(capsys, args)
    os.remove(d / "first.txt")
    os.remove(t)
    msg = _align_err(capsys, args)
    assert "has no 0.0.txt" in msg and "--allow_missing" in msg
    assert "streams 0..0" in _align_err(capsys, args + ["--main", "1"])
    assert not os.path.exists(tmp_path / "o.bin")                     # nothing half-written


# -----------------------------------------------------------------------------
# python data.py synthetic --text


def test_synthetic_audio_only_output_unchanged(tmp_path):
    # the audio-only path draws exactly what it drew before the text stream existed: these
    # digests are of the files data.py wrote before --text was added
    p = str(tmp_path / "a.bin")
    data.synthetic(p, hours=0.1, min_minutes=2.5, max_minutes=3.5, n_codebooks=2, seed=5, quiet=True)
    sha = lambda q: hashlib.sha256(open(q, "rb").read()).hexdigest()
    assert sha(p) == "dbeda38e08d8e5152e872c470fda4c745839c112c2445a1f7ac89ef56d73e100"
    with open(p + ".events.json") as f:   # the same events; the silence frame is listed since
        ev = json.load(f)
    assert ev.pop("silence") == np.random.default_rng(1234).integers(0, 2048, 2).tolist()
    assert hashlib.sha256(json.dumps(ev).encode()).hexdigest() == "27a4d7350ff6149ea6d9a985c3e5dd5b2741fc1d80e159cdfa80e3808acdf8ef"
    assert not os.path.exists(p + ".spm.model")


def test_synthetic_in_parts(tmp_path):
    # data.py synthetic --workers N: the parts, each made from its own seed drawn from --seed, joined in
    # order, their events' conversation numbers shifted; the same again gives the same file; no part is left
    kw = dict(min_minutes=1, max_minutes=2, n_codebooks=2, events_per_min=6, quiz_share=0.5, quiz_max_s=20)
    out, again = str(tmp_path / "w.bin"), str(tmp_path / "again.bin")
    n = data.synthetic_in_parts(out, 3, hours=0.3, seed=7, quiet=True, **kw)
    data.synthetic_in_parts(again, 3, hours=0.3, seed=7, quiet=True, **kw)
    seeds = np.random.SeedSequence(7).generate_state(3)
    parts = [str(tmp_path / f"p{i}.bin") for i in range(3)]
    for q, sd in zip(parts, seeds):
        data.synthetic(q, hours=0.3 / 3, seed=int(sd), quiet=True, **kw)
    joined, pieces = CodesFile(out), [CodesFile(q) for q in parts]
    assert n == len(joined) == sum(map(len, pieces))
    convs = [f.conversation(i) for f in pieces for i in range(len(f))]
    for i, c in enumerate(convs):
        np.testing.assert_array_equal(joined.conversation(i), c)
    offsets = np.cumsum([0] + [len(f) for f in pieces])
    want = np.concatenate([data.load_events(q) + [o, 0, 0, 0, 0] for q, o in zip(parts, offsets)])
    np.testing.assert_array_equal(data.load_events(out), want)
    assert len(want) > 10 and data.silence_frame(out) == data.silence_frame(parts[0])
    assert open(out, "rb").read() == open(again, "rb").read()
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(q) + e for q in [out, again, *parts]
                                                  for e in ("", ".events.json"))


def test_synthetic_text(tmp_path, lang):
    a, b = str(tmp_path / "a.bin"), str(tmp_path / "b.bin")
    kw = dict(hours=0.1, min_minutes=2.5, max_minutes=3.5, n_codebooks=2, seed=5, quiet=True)
    data.synthetic(a, **kw)
    data.synthetic(b, **kw, text=True, text_words=32, text_vocab=64)
    fa, fb = CodesFile(a), CodesFile(b)
    assert fb.n_text == 2 and fb.text_cardinality == 64
    assert open(b + ".spm.model", "rb").read() == lang.spm                # deterministic tokenizer
    assert open(a + ".events.json").read() == open(b + ".events.json").read()
    tok = Tokenizer(b + ".spm.model")
    index = {w: i for i, w in enumerate(lang.words)}
    silence = np.random.default_rng(1234).integers(0, 2048, size=2)      # synthetic()'s silence frame
    n_words = pairs = 0
    for i in range(len(fb)):
        changed = (fa.audio(i) != fb.audio(i)).any(-1)                    # [F, S]: frames that became words
        for s in range(2):
            words = words_from_text(fb.text(i)[:, s], tok)
            n_words += len(words)
            spans, sound = np.zeros(len(changed), bool), {}
            for (t, w), (u, v) in zip(words, words[1:] + [(None, None)]):
                L = int(lang.length[index[w]])
                spans[t:t + L] = True
                frames = fb.audio(i)[t:t + L, s]                          # [L, K]
                assert not (frames == silence).all(-1).any()              # words only while speaking
                # the word decides its audio: every time this speaker says it, the same frames
                np.testing.assert_array_equal(sound.setdefault(w, frames), frames)
                if u is not None:
                    assert u >= t + L                                     # one word at a time,
                    assert index[v] in lang.succ[index[w]]                # in the bigram grammar
                    pairs += 1
            assert not (changed[:, s] & ~spans).any()                     # audio changed only in words
            assert len({f.tobytes() for f in sound.values()}) == len(sound)   # words sound different
        np.testing.assert_array_equal(fa.audio(i)[~changed.any(1)], fb.audio(i)[~changed.any(1)])
    assert n_words > 300 and pairs > 300


# -----------------------------------------------------------------------------
# The model's text stream (model.py): verified, not changed


def test_model_text_wiring():
    torch.manual_seed(0)
    cfg = Config.preset("tiny", n_streams=2, n_codebooks=2, cardinality=64, n_text=2, text_cardinality=20,
                        text_weight=2.5)
    m = SpeechLM(cfg).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randint(0, 20, (2, 6, 2), generator=g), torch.randint(0, 64, (2, 6, 4), generator=g)], -1)
    with torch.no_grad():
        lx = m(x)[0]
        # the text of frame 2 is part of frame 2's embedding: it changes every prediction of frame 3
        # on, and within frame 2 only the columns after it (depth order: text, then audio)
        y = x.clone()
        y[:, 2, 1] = (x[:, 2, 1] + 1) % 20
        ly = m(y)[0]
        assert torch.equal(lx.text[:, :2], ly.text[:, :2]) and torch.equal(lx.text[:, 2], ly.text[:, 2])
        assert torch.equal(lx.audio[:, :2], ly.audio[:, :2]) and not torch.allclose(lx.audio[:, 2], ly.audio[:, 2])
        assert not torch.allclose(lx.text[:, 3], ly.text[:, 3]) and not torch.allclose(lx.audio[:, 3], ly.audio[:, 3])
        # the text of a frame is predicted before its audio: audio changes leave it alone
        z = x.clone()
        z[:, 4, 2:] = (x[:, 4, 2:] + 1) % 64
        assert torch.equal(m(z)[0].text[:, :5], lx.text[:, :5])
    # the loss adds text_weight x the text cross-entropy to the audio term
    loss, parts = loss_fn(lx, x, cfg)
    ce = torch.nn.functional.cross_entropy(lx.text.flatten(0, 2), x[..., :2].flatten())
    audio_only, _ = loss_fn(lx, x, Config(**{**cfg.__dict__, "text_weight": 0.0}))
    torch.testing.assert_close(parts["text"], ce)
    torch.testing.assert_close(loss, audio_only + 2.5 * ce)


# -----------------------------------------------------------------------------
# A tiny model learns the text; generate.py writes what it says


def _unigram_entropy(tokens):
    p = np.bincount(np.asarray(tokens).ravel()) / np.size(tokens)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained on synthetic conversations with text (train.py, as a user runs it)."""
    d = tmp_path_factory.mktemp("run")
    p = str(d / "s.bin")
    data.synthetic(p, hours=0.4, min_minutes=1.0, max_minutes=2.0, n_codebooks=1, seed=0, quiet=True,
                   text=True, text_words=32, text_vocab=64)
    t0 = time.time()
    args = dict(data=p, out_dir=str(d / "ck"), mode="minibatch", preset="tiny", seq_len=32, batch_size=8,
                max_steps=STEPS, lr=1e-2, warmup=20, text_weight=3.0, eval_interval=0, eval_batches=1,
                log_interval=1000, val_conversations=2, device="cpu", dtype="float32")
    with one_thread():
        train.main([f"--{k}={v}" for k, v in args.items()])
    return p, str(d / "ck"), time.time() - t0


STEPS = 600


def test_tiny_model_learns_text(trained):
    p, ck, secs = trained
    f = CodesFile(p)
    n_val = 2
    H = _unigram_entropy(np.concatenate([f.text(i) for i in range(len(f) - n_val)]))
    m = SpeechLM.from_checkpoint(ck).eval()
    tl = []
    with torch.no_grad(), one_thread():
        for i in range(len(f) - n_val, len(f)):                             # held-out conversations
            x = torch.from_numpy(np.asarray(f.conversation(i), np.int64))[None]
            tl.append(loss_fn(m(x)[0], x, m.cfg)[1]["text"].item())
    loss = float(np.mean(tl))
    print(f"\ntext stream: unigram entropy {H:.3f} nats/frame; tiny model after {STEPS} steps "
          f"({secs:.0f} s): held-out text loss {loss:.3f} ({loss / H:.0%} of it)")
    assert loss < 0.6 * H
    # train.py put the data's tokenizer beside the checkpoint, for generate.py
    assert open(os.path.join(ck, "tokenizer.model"), "rb").read() == open(p + ".spm.model", "rb").read()


def _read_transcript(path):
    rows = [line.rstrip("\n").split("\t") for line in open(path, encoding="utf-8")]
    return [(round(float(r[0]) * FR), int(r[1]), r[2]) for r in rows]


def test_generate_transcript(trained, tmp_path, capsys):
    _, ck, _ = trained
    tok = Tokenizer(os.path.join(ck, "tokenizer.model"))
    out, txt = tmp_path / "g.bin", tmp_path / "t.txt"
    with one_thread():
        generate.main(["--ckpt", ck, "--minutes", "0.6", "--codes_out", str(out), "--text_out", str(txt),
                       "--mimi", "", "--quiet", "--seed", "1"])
    assert f"transcript: {txt}" in capsys.readouterr().out
    rows = _read_transcript(txt)
    f = CodesFile(out)
    # every word, with the frame of its first piece in the codes written beside it
    want = sorted((t, s, w) for s in range(f.n_text) for t, w in words_from_text(f.text(0)[:, s], tok))
    assert rows == want and len(rows) > 20
    assert all(a[0] <= b[0] for a, b in zip(rows, rows[1:]))             # in order of time
    x = f.text(0)
    for t, s, w in rows:       # its first piece: a word start, or a piece after padding
        assert not tok.special[x[t, s]] and (tok.starts_word[x[t, s]] or t == 0 or tok.special[x[t - 1, s]])
    # the model speaks the language it was trained on (a 20-second model: in part)
    vocab = set(data._language(32, 64).words)
    assert np.mean([w in vocab for _, _, w in rows]) > 0.1


def test_generate_transcript_survives_an_interrupt(trained, tmp_path, monkeypatch):
    _, ck, _ = trained
    tok = Tokenizer(os.path.join(ck, "tokenizer.model"))
    orig = generate.generate

    def interrupted(model, n_frames, sampler, batch, prompt, mode, on_frame, *a, **k):
        seen = [0]

        def cb(frame, logp):
            seen[0] += 1
            if seen[0] == 180:
                raise KeyboardInterrupt
            on_frame(frame, logp)
        return orig(model, n_frames, sampler, batch, prompt, mode, cb, *a, **k)
    monkeypatch.setattr(generate, "generate", interrupted)
    out, txt = tmp_path / "g.bin", tmp_path / "t.txt"
    with one_thread():
        n = generate.main(["--ckpt", ck, "--minutes", "1", "--codes_out", str(out), "--text_out", str(txt),
                           "--mimi", "", "--quiet"])
    f = CodesFile(out)
    assert n == f.n_frames == 179
    want = sorted((t, s, w) for s in range(f.n_text) for t, w in words_from_text(f.text(0)[:, s], tok))
    assert _read_transcript(txt) == want and len(want) > 5


def _gen_err(capsys, argv):
    with pytest.raises(SystemExit) as e:
        generate.main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def test_text_out_errors(trained, tmp_path, capsys):
    _, ck, _ = trained
    base = ["--minutes", "0.1", "--codes_out", str(tmp_path / "x.bin"), "--text_out", str(tmp_path / "t.txt"),
            "--quiet"]
    audio_only = tmp_path / "a" / "model.safetensors"
    audio_only.parent.mkdir()
    SpeechLM(Config.preset("tiny", n_streams=2, n_codebooks=1, cardinality=64)).save(audio_only)
    assert "has no text stream" in _gen_err(capsys, ["--ckpt", str(audio_only)] + base)
    bare = tmp_path / "b"
    bare.mkdir()
    m = SpeechLM.from_checkpoint(ck)
    m.save(bare / "model.safetensors")
    msg = _gen_err(capsys, ["--ckpt", str(bare / "model.safetensors")] + base)
    assert "tokenizer" in msg and "tokenizer.model" in msg
    (bare / "tokenizer.model").write_bytes(data._language(32, 48).spm)     # another model's tokenizer
    assert "48 pieces but the model's text stream has 64" in _gen_err(capsys, ["--ckpt", str(bare)] + base)
    msg = _gen_err(capsys, ["--ckpt", ck] + base[:-3] + ["--text_out", str(tmp_path / "no" / "t.txt"), "--quiet"])
    assert "cannot write transcript" in msg
