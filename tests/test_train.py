import contextlib
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import train
from codes import CodesFile, write_codes
from data import StreamSampler, synthetic, window
from model import SpeechLM, default_device
from model import loss_fn as train_loss_fn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    p = str(tmp_path_factory.mktemp("data") / "s.bin")
    synthetic(p, hours=0.3, min_minutes=1.0, max_minutes=3.0, n_codebooks=2, seed=0, quiet=True)
    return p


def _args(data, out, mode, **kw):
    a = dict(data=data, out_dir=str(out), mode=mode, preset="tiny", seq_len=16, batch_size=2, max_steps=8,
             eval_interval=0, log_interval=100, warmup=2, lr=3e-3, device="cpu", dtype="float32")
    a.update(kw)
    return [f"--{k}={v}" for k, v in a.items()]


@pytest.mark.parametrize("mode", ["streaming", "minibatch"])
def test_resume_is_exact(synth, tmp_path, mode):
    straight = train.main(_args(synth, tmp_path / "a", mode, grad_accum=2))
    first = train.main(_args(synth, tmp_path / "b", mode, grad_accum=2, stop_at=4))
    second = train.main(_args(synth, tmp_path / "b", mode, grad_accum=2))
    assert len(first) == 4 and len(second) == 8   # a resumed run returns every step's loss since step 1
    np.testing.assert_allclose(second, straight, rtol=1e-6, atol=0)
    np.testing.assert_allclose(first, second[:4], rtol=0, atol=0)
    m = SpeechLM.from_checkpoint(tmp_path / "b" / "model.safetensors")  # the exported weights load
    assert m.cfg.n_codebooks == 2



def test_evaluations_are_kept_across_a_resume(tmp_path):
    # out_dir/evals.json: every evaluation of the run, a resumed run's included, with the recall where the data
    # have recall events; the same as a run straight through
    import json
    p = str(tmp_path / "r.bin")
    synthetic(p, hours=0.3, min_minutes=1, max_minutes=2, n_codebooks=2, seed=4, quiet=True, events_per_min=6,
              near_share=1.0, near_max_s=4.0, value_frames=4)
    kw = dict(seq_len=64, batch_size=2, eval_interval=2, eval_batches=2)
    train.main(_args(p, tmp_path / "a", "minibatch", **kw))
    train.main(_args(p, tmp_path / "b", "minibatch", stop_at=5, **kw))
    train.main(_args(p, tmp_path / "b", "minibatch", **kw))
    straight, resumed = (json.load(open(tmp_path / d / "evals.json")) for d in "ab")
    assert [e["step"] for e in resumed] == [2, 4, 6, 8] and resumed == straight
    assert all(e["val_recall_codes"] > 0 and 0 <= e["val_recall"] <= 1 for e in resumed)
    assert abs(resumed[-1]["val_loss"] - straight[-1]["val_loss"]) < 1e-6


def test_training_recall_is_measured_on_training_windows(tmp_path, monkeypatch, capsys):
    # beside the held-out recall, the same on fixed windows of the training conversations ("train_recall"):
    # far above the held-out one, the values were learnt by heart
    p = str(tmp_path / "r.bin")
    synthetic(p, hours=0.3, min_minutes=1, max_minutes=2, n_codebooks=2, seed=4, quiet=True, events_per_min=6,
              near_share=1.0, near_max_s=4.0, value_frames=4)
    seen, inner = [], train.evaluate

    def spy(model, raw, sampler, *a):
        out = inner(model, raw, sampler, *a)
        seen.append(({c for c, _ in sampler.last}, out[1]))
        return out
    monkeypatch.setattr(train, "evaluate", spy)
    train.main(_args(p, tmp_path / "a", "minibatch", seq_len=128, batch_size=2, eval_interval=2, eval_batches=6,
                     max_steps=2, val_conversations=3))
    (held, rec), (fit, fit_rec) = seen
    n = len(CodesFile(p))
    assert held <= set(range(n - 3, n)) and fit <= set(range(n - 3)) and fit_rec["val_recall_codes"] > 0
    assert rec["val_recall_codes"] > 0
    assert f"train recall {fit_rec['val_recall']:.3f}" in capsys.readouterr().out


def test_streaming_state_crosses_steps_and_resets(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    lens = [40, 70, 33, 48, 20]
    p = str(tmp_path / "c.bin")
    write_codes(p, [rng.integers(0, 2048, (n, 2, 2)) for n in lens], n_streams=2, n_codebooks=2)
    seen = []
    orig = SpeechLM.forward

    def spy(self, codes, state=None, keep_state=True):
        if self.training:
            seen.append((state.pos.clone(), state.kpos.max(1).values.clone()))
        return orig(self, codes, state, keep_state)
    monkeypatch.setattr(SpeechLM, "forward", spy)
    train.main(_args(p, tmp_path / "r", "streaming", max_steps=12, val_conversations=1, batch_size=2))
    # each row: positions 0, 16, 32, ... within its conversation, back to 0 when a new one starts
    pos = torch.stack([s[0] for s in seen])        # [steps, rows]
    kmax = torch.stack([s[1] for s in seen])
    for r in range(2):
        p_r = pos[:, r].tolist()
        assert p_r[0] == 0
        for a, b in zip(p_r, p_r[1:]):
            assert b == a + 16 or b == 0
        assert 0 in p_r[1:], "a row never moved to its next conversation"
        assert any(x > 0 for x in p_r)
        # the cache holds the frames of earlier steps of the same conversation, never of another
        for t in range(len(p_r)):
            assert kmax[t, r] == (p_r[t] - 1 if p_r[t] > 0 else -1)


def test_stream_sampler_walks_whole_conversations(tmp_path):
    rng = np.random.default_rng(1)
    lens = [33, 50, 16]
    p = str(tmp_path / "c.bin")
    convs = [rng.integers(0, 2048, (n, 1, 2)) for n in lens]
    write_codes(p, convs, n_streams=1, n_codebooks=2)
    from codes import CodesFile
    f = CodesFile(p)
    s = StreamSampler(f, np.arange(3), 16, 1, (0, 1), (2048, 2048), seed=0)
    got = []
    for _ in range(6):
        x, reset = s.next()
        got.append((s.rows[0][0], s.rows[0][1] - 16, bool(reset[0]), x[0]))
    for c, start, reset, x in got:
        assert reset == (start == 0)
        np.testing.assert_array_equal(x, window(f.conversation(c), start, 16, (0, 1), (2048, 2048)))
    # delayed column: first frame of a conversation is the initial token, later it is the previous frame
    c, start, _, x = got[0]
    assert x[0, 1] == 2048 and x[1, 1] == f.conversation(c)[0, 1]


def _err(capsys, argv):
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def test_bad_inputs(synth, tmp_path, capsys):
    assert "does not exist" in _err(capsys, _args(str(tmp_path / "none.bin"), tmp_path / "o", "minibatch"))
    (tmp_path / "junk.bin").write_bytes(b"CONVCODE" + b"\0" * 200)
    assert "error:" in _err(capsys, _args(str(tmp_path / "junk.bin"), tmp_path / "o", "minibatch"))
    assert "longer than every conversation" in _err(capsys, _args(synth, tmp_path / "o", "minibatch", seq_len=10**6))
    assert "is not a checkpoint" in _err(capsys, _args(synth, tmp_path / "o", "minibatch", init_from=str(tmp_path)))
    # a checkpoint trained on 2 codebooks cannot start a run on a file with 3
    train.main(_args(synth, tmp_path / "m", "minibatch", max_steps=1))
    p3 = str(tmp_path / "three.bin")
    write_codes(p3, [np.zeros((100, 2, 3), np.int64)] * 2, n_streams=2, n_codebooks=3)
    msg = _err(capsys, _args(p3, tmp_path / "o2", "minibatch", init_from=str(tmp_path / "m")))
    assert "takes frames of" in msg and "'n_codebooks': 2" in msg
    # settings of the model that the checkpoint fixes: the same value is fine, another one is an error
    # (it used to be ignored without a word)
    window = SpeechLM.from_checkpoint(str(tmp_path / "m")).cfg.window
    train.main(_args(synth, tmp_path / "m2", "minibatch", max_steps=1, init_from=str(tmp_path / "m"), window=window))
    msg = _err(capsys, _args(synth, tmp_path / "o3", "minibatch", init_from=str(tmp_path / "m"), window=window + 1,
                             silence="1,2"))
    assert f"window={window}" in msg and f"window={window + 1}" in msg and "drop --window --silence" in msg
    assert "multiple of the TTT mini-batch" in _err(capsys, _args(synth, tmp_path / "o", "streaming", seq_len=15))
    # numbers out of range: an error that names the option, not a failure inside the first step
    for k, v, msg in [("batch_size", 0, "--batch_size must be at least 1, not 0"),
                      ("max_steps", -1, "--max_steps must be at least 1"),
                      ("grad_accum", 0, "--grad_accum must be at least 1"),
                      ("lr", 0, "--lr must be > 0"), ("warmup", -5, "--warmup must be 0 or more"),
                      ("beta2", 1.5, "--beta2 must be in [0, 1)")]:
        assert msg in _err(capsys, _args(synth, tmp_path / "o", "minibatch", **{k: v})), k
    with pytest.raises(SystemExit):
        train.main(_args(synth, tmp_path / "o", "minibatch", compile="maybe"))
    assert "'maybe' is not true or false" in capsys.readouterr().err


def test_nonfinite_loss_stops_and_keeps_checkpoint(synth, tmp_path, capsys, monkeypatch):
    train.main(_args(synth, tmp_path / "n", "minibatch", max_steps=4, stop_at=2))
    before = (tmp_path / "n" / "ckpt.pt").read_bytes()
    orig = train.loss_fn

    def bad(*a, **k):
        loss, parts = orig(*a, **k)
        return loss * float("nan"), parts
    monkeypatch.setattr(train, "loss_fn", bad)
    assert "loss is nan at step 3" in _err(capsys, _args(synth, tmp_path / "n", "minibatch", max_steps=4))
    assert (tmp_path / "n" / "ckpt.pt").read_bytes() == before


@pytest.mark.parametrize("script", ["train.py", "generate.py", "evaluate.py", "experiment.py", "mimi.py",
                                    "data.py", "bench/lm.py", "bench/ttt.py", "bench/mimi.py",
                                    "scripts/recall_toy.py", "scripts/recall_pilot.py",
                                    "scripts/ttt_memory.py"])
def test_help_works(script):
    # every command's --help prints its options (a stray % in a help string used to break train.py's)
    r = subprocess.run([sys.executable, os.path.join(ROOT, script), "--help"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "usage:" in r.stdout


@pytest.mark.parametrize("memory", ["ttt", "linear_attention", "delta", "softmax_attention_rope"])
def test_recall_toy_branches(memory, capsys):
    # the toy's controls really take the TTT branch's place (and train a step)
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import recall_toy
    from model import GatedTTT
    from ttt import TTTLinear
    model = recall_toy.main(["--steps", "1", "--seq_len", "32", "--events", "1", "--value", "4", "--batch", "2",
                             "--dim", "64", "--window", "8", "--n_ttt", "2", "--memory", memory, "--ttt_conv", "2"])
    branches = [m.layer for m in model.modules() if isinstance(m, GatedTTT)]
    want = TTTLinear if memory == "ttt" else recall_toy.LinearAttention
    assert len(branches) == 2 and all(isinstance(b, want) for b in branches)
    assert all(isinstance(b.q_proj, recall_toy.ProjConv) for b in branches)
    assert "step     0" in capsys.readouterr().out



def test_recall_toy_pool(capsys, monkeypatch):
    # --pool N: N batches made once, step t trains on batch t mod N; each report also gives the recall on a
    # fresh batch (made then, not trained on)
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import recall_toy
    seen, inner = [], recall_toy.predict

    def spy(model, x, *a, **k):
        if torch.is_grad_enabled():
            seen.append(x.clone())
        return inner(model, x, *a, **k)
    monkeypatch.setattr(recall_toy, "predict", spy)
    recall_toy.main(["--steps", "3", "--seq_len", "32", "--events", "1", "--value", "4", "--batch", "2", "--dim", "64",
                     "--pool", "2"])
    assert len(seen) == 4 and torch.equal(seen[0], seen[2]) and torch.equal(seen[1], seen[3])
    assert not torch.equal(seen[0], seen[1])
    assert capsys.readouterr().out.count("| fresh batch ") == 2   # steps 0 and 3


def test_recall_toy_wider_memory(capsys):
    # --ttt_memory k: k times the TTT heads, each as wide as without it
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import recall_toy
    from model import GatedTTT
    shapes = []
    for k in (1, 4):
        model = recall_toy.main(["--steps", "1", "--seq_len", "32", "--batch", "2", "--dim", "128", "--window", "8",
                                 "--n_ttt", "1", "--mqar", "2", "--ttt_memory", str(k)])
        shapes += [tuple(m.layer.W1.shape) for m in model.modules() if isinstance(m, GatedTTT)]
    assert shapes == [(2, 64, 64), (8, 64, 64)]


def test_recall_toy_shift_and_alphabet(capsys):
    # --ttt_shift: the branch's keys come from the token before; --alphabet sets the chance level
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import recall_toy
    from model import GatedTTT
    p = torch.nn.Linear(4, 3)
    x = torch.randn(2, 5, 4)
    y = recall_toy.ShiftProj(p)(x)
    assert torch.equal(y[:, 0], torch.zeros(2, 3)) and torch.allclose(y[:, 1:], p(x)[:, :-1])
    model = recall_toy.main(["--steps", "1", "--seq_len", "32", "--events", "1", "--value", "4", "--batch", "2",
                             "--dim", "64", "--window", "8", "--n_ttt", "1", "--ttt_shift", "--alphabet", "100"])
    branches = [m.layer for m in model.modules() if isinstance(m, GatedTTT)]
    assert len(branches) == 1 and isinstance(branches[0].k_proj, recall_toy.ShiftProj)
    assert not isinstance(branches[0].q_proj, recall_toy.ShiftProj)
    assert "(chance 0.010)" in capsys.readouterr().out
    # --first_at_start: one event, its first mention at token 0; --ttt_no_rope leaves ttt.py as it was
    import ttt
    rope = ttt._rope
    g = torch.Generator().manual_seed(0)
    alphabet, cues = torch.arange(100, 164), torch.tensor([[1, 2], [3, 4]])
    for _ in range(5):
        x, dist = recall_toy.batch(g, alphabet, cues, 3, 48, 1, 4, first_at_start=True)
        assert torch.equal(x[:, :2], cues[0].expand(3, 2))
        assert set(dist[dist > 0].tolist()) <= {8, 16, 24, 32, 40}
    recall_toy.main(["--steps", "0", "--seq_len", "32", "--events", "1", "--value", "4", "--batch", "2",
                     "--dim", "64", "--window", "8", "--n_ttt", "1", "--ttt_no_rope"])
    assert ttt._rope is rope
    # --adjacent: the recall right after the first mention (distance = one event's span), anywhere
    for _ in range(5):
        x, dist = recall_toy.batch(g, alphabet, cues, 3, 48, 1, 4, adjacent=True)
        assert set(dist[dist > 0].tolist()) == {8}
    capsys.readouterr()
    recall_toy.main(["--steps", "0", "--seq_len", "48", "--events", "1", "--value", "4", "--batch", "2",
                     "--dim", "64", "--window", "4", "--n_ttt", "1", "--adjacent_steps", "1", "--by_distance"])
    assert "[8: " in capsys.readouterr().out
    # --separate_noise: tokens outside events from their own alphabet
    noise = torch.arange(500, 564)
    x, dist = recall_toy.batch(g, alphabet, cues, 3, 48, 1, 4, noise_alphabet=noise)
    event = torch.zeros_like(x, dtype=torch.bool)
    for b in range(3):
        r = int((dist[b] > 0).nonzero()[0]) - 4                                # the recall's cue
        for s in (r, r - int(dist[b, r + 4])):
            event[b, s:s + 8] = True
    assert torch.isin(x[~event], noise).all() and not torch.isin(x[event], noise).any()
    # --ttt_norm_qk: each head's q and k of length sqrt(head size)
    p = torch.nn.Linear(6, 8)
    y = recall_toy.NormProj(p, 2)(torch.randn(3, 5, 6)).view(3, 5, 2, 4)
    assert torch.allclose(y.norm(dim=-1), torch.full((3, 5, 2), 2.0))


def test_recall_toy_gaps_and_write_gate():
    # --gaps: the recall 1 to MAX event slots after the first mention; --ttt_lr_bias: the write gate's bias
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import recall_toy
    from ttt import _TTTLayer
    g = torch.Generator().manual_seed(0)
    alphabet, cues = torch.arange(100, 164), torch.tensor([[1, 2], [3, 4]])
    seen = set()
    for _ in range(20):   # span 8 (cue 2, key 2, value 4): 48 tokens are 6 slots
        x, dist = recall_toy.batch(g, alphabet, cues, 4, 48, 1, 4, max_gap=2)
        seen |= set(dist[dist > 0].tolist())
    assert seen == {8, 16}
    model = recall_toy.main(["--steps", "0", "--seq_len", "48", "--events", "1", "--value", "4", "--batch", "2",
                             "--dim", "64", "--window", "4", "--n_ttt", "1", "--gaps", "2:1", "--ttt_lr_bias", "-3"])
    (layer,) = [m for m in model.modules() if isinstance(m, _TTTLayer)]
    assert (layer.learnable_ttt_lr_bias.detach() + 3.0).abs().max() < 0.01   # one optimizer step from -3


def test_recall_toy_quiet_train(monkeypatch):
    # --quiet_train: every training forward runs inside quiet_between, with that batch's distances
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import contextlib
    import recall_toy
    seen = []

    @contextlib.contextmanager
    def spy(model, dist):
        seen.append(dist.clone())
        yield
    monkeypatch.setattr(recall_toy, "quiet_between", spy)
    recall_toy.main(["--steps", "2", "--seq_len", "48", "--events", "1", "--value", "4", "--batch", "2",
                     "--dim", "64", "--window", "4", "--n_ttt", "1", "--quiet_train"])
    assert len(seen) == 3 and all(d.shape == (2, 49) and (d > 0).any() for d in seen)
    with pytest.raises(SystemExit):
        recall_toy.main(["--steps", "0", "--seq_len", "48", "--events", "2", "--value", "4", "--n_ttt", "1",
                         "--quiet_train"])


def test_recall_toy_quiet_probe(capsys):
    # --quiet_probe: the TTT layers' learning rate is zero exactly between the first mention and the recall
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import recall_toy
    from ttt import _TTTLayer
    g = torch.Generator().manual_seed(0)
    alphabet, cues = torch.arange(100, 164), torch.tensor([[1, 2], [3, 4]])
    x, dist = recall_toy.batch(g, alphabet, cues, 3, 48, 1, 4, max_gap=3)   # span 8
    model = recall_toy.main(["--steps", "0", "--seq_len", "48", "--events", "1", "--value", "4", "--batch", "2",
                             "--dim", "64", "--window", "4", "--n_ttt", "1", "--gaps", "3:1", "--by_distance",
                             "--quiet_probe"])
    assert " quiet [" in capsys.readouterr().out
    (layer,) = [m for m in model.modules() if isinstance(m, _TTTLayer)]
    bias = layer.learnable_ttt_lr_bias
    with recall_toy.quiet_between(model, dist):
        inside = layer.learnable_ttt_lr_bias
        assert inside.shape == (3, bias.shape[0], 48)
        for b in range(3):
            v0 = int((dist[b] > 0).nonzero()[0])
            recall, first = v0 - 4, v0 - 4 - int(dist[b, v0])
            quiet = (inside[b, 0] < -1e3).nonzero()[:, 0].tolist()
            assert quiet == list(range(first + 8, recall)), (quiet, first, recall)
    assert layer.learnable_ttt_lr_bias is bias


def test_recall_toy_mqar(capsys):
    # --mqar: the pairs open the sequence, each key comes back once after `start` followed by its value,
    # dist points back at that value; training and the held-out read (chunked with the state carried,
    # and in one piece) run for the text and the speech path
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import recall_toy
    g = torch.Generator().manual_seed(0)
    alphabet, noise = torch.arange(100, 164), torch.arange(500, 564)
    for fill in (None, noise):
        x, dist = recall_toy.mqar_batch(g, alphabet, 4, 90, 6, 30, fill)
        for b in range(4):
            keys, values = x[b, 0:12:2], x[b, 1:12:2]
            assert len(set(keys.tolist())) == 6 and set(keys.tolist()) <= set(range(100, 132))
            assert set(values.tolist()) <= set(range(132, 164))
            at = (dist[b] > 0).nonzero()[:, 0]                              # the recalled values
            assert len(at) == 6 and at.min() >= 31
            assert torch.equal(x[b, at - dist[b, at]], x[b, at])             # dist points back at the same value
            assert torch.equal(x[b, at - dist[b, at] - 1], x[b, at - 1])     # ... after the same key
            rest = torch.ones(91, dtype=torch.bool)
            rest[:12], rest[at], rest[at - 1] = False, False, False
            assert set(x[b, rest].tolist()) <= ({0} if fill is None else set(noise.tolist()))
    # values of 3 tokens: each pair is k v v v, comes back whole at a multiple of 4 after `start`
    x, dist = recall_toy.mqar_batch(g, alphabet, 4, 90, 5, 30, noise, value=3)
    for b in range(4):
        starts = ((dist[b] > 0) & (dist[b].roll(1) == 0)).nonzero()[:, 0]     # the recalls' first value tokens
        assert len(starts) == 5 and ((starts - 1 - 30) % 4 == 0).all()
        for p in starts.tolist():
            src = p - int(dist[b, p])
            assert (dist[b, p:p + 3] == dist[b, p]).all() and torch.equal(x[b, p - 1:p + 3], x[b, src - 1:src + 3])
            assert src - 1 in range(0, 20, 4)                                  # the pair opened the sequence
    assert recall_toy.by_bucket(torch.tensor([1, 0, 1, 1]), torch.tensor([0, 20, 40, 100]), 16) == \
        "16-31: 0.00 (1), 32-63: 1.00 (1), 64-127: 1.00 (1)"
    for extra in ([], ["--frames", "--codebooks", "2", "--semantic_weight", "10"],
                  ["--memory", "linear_attention"], ["--mqar_full_loss", "--mqar_fill_from_pairs"],
                  ["--mqar_value", "2", "--mqar_start", "15", "--emb_lr_scale", "8", "--emb_init_scale", "0.5"]):
        recall_toy.main(["--mqar", "4", "--steps", "1", "--seq_len", "48", "--batch", "2", "--dim", "64",
                         "--window", "4", "--n_ttt", "1", "--separate_noise", "--by_distance", "--eval_lens",
                         "300"] + extra)
        out = capsys.readouterr().out
        assert "recalled from token 15 on" in out and "held-out, 300 tokens: recall accuracy by distance 8-15: " in out
        assert "held-out, 300 tokens, by the order the keys come back: 1: " in out and ", 4: " in out
        assert ("write rates" in out) == (extra[:1] != ["--memory"])
    # the order the keys come back: a reader right at the first key back only scores 1 there, 0 after

    for value in (1, 3):
        def first_only(model, x, state, K, S):
            right = torch.zeros(x.shape[0], x.shape[1] - 1, dtype=torch.bool)
            for b in range(x.shape[0]):
                back = [p for p in range(40, x.shape[1] - 1) if x[b, p] in x[b, 0:4 * (1 + value):1 + value]]
                right[b, back[0]:back[0] + value] = True                       # all of the first value back
            guess = torch.where(right, x[:, 1:], torch.zeros_like(x[:, 1:]))
            return torch.nn.functional.one_hot(guess, 2048).float(), None, state
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(recall_toy, "predict", first_only)
            by_distance, by_order = recall_toy.mqar_eval(None, g, alphabet, noise, 200, 4, 40, 7, "cpu", False, 0, 1,
                                                         value)
        assert by_order == "1: 1.00, 2: 0.00, 3: 0.00, 4: 0.00"
    # --max_minutes: training stops once the time is up (here at once, after step 0), then the read runs
    recall_toy.main(["--mqar", "4", "--steps", "50", "--max_minutes", "1e-9", "--seq_len", "48", "--batch", "2",
                     "--dim", "64", "--window", "4", "--n_ttt", "1", "--eval_lens", "64"])
    out = capsys.readouterr().out
    assert "step     0 " in out and "step     1 " not in out and "held-out, 64 tokens" in out


def test_recall_toy_speech_path_sees_every_token():
    # the speech path predicts token t + 1 from tokens 0..t, as the text path does: the first token is
    # the frame before the second (it was once dropped, so the first key of every MQAR sequence was
    # never seen); chunked with the state carried it gives the logits of one pass
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import recall_toy
    from model import Config, SpeechLM
    torch.manual_seed(0)
    cfg = Config.preset("demo", n_streams=1, n_codebooks=3, window=8, dim=64, n_layers=2, n_heads=2, n_kv_heads=1, hidden=128,
                        n_ttt=1, ttt_heads=1, ttt_mini_batch=4, depth_layers=0)
    model = SpeechLM(cfg).eval()
    x = torch.randint(0, 100, (2, 21))
    y = x.clone()
    y[:, 0] = (x[:, 0] + 1) % 100
    with torch.no_grad():
        lx, (lg, frames), _ = recall_toy.predict(model, x, None, 3)
        ly = recall_toy.predict(model, y, None, 3)[0]
        assert lx.shape == (2, 20, cfg.cardinality) and torch.equal(frames[..., 0], x[:, 1:])
        assert not torch.allclose(lx[:, 0], ly[:, 0], atol=1e-3)        # the first token is seen
        state, parts = None, []
        for i in range(0, 20, 7):
            lg_i, _, state = recall_toy.predict(model, x[:, i:min(i + 7, 20) + 1], state, 3)
            parts.append(lg_i)
        torch.testing.assert_close(torch.cat(parts, 1), lx, atol=1e-4, rtol=1e-4)


def test_recall_frames_mark_the_recalled_values(tmp_path):
    # RecallFrames.mask marks, in a delayed training window, exactly the columns and frames that hold
    # a recalled value (checked against a plain loop over the events), and only for its stream
    from codes import CodesFile
    from data import RecallFrames, load_events
    p = str(tmp_path / "r.bin")
    synthetic(p, hours=0.2, min_minutes=2, max_minutes=3, n_codebooks=3, seed=4, quiet=True, events_per_min=6,
              near_share=1.0, near_max_s=8.0, value_frames=5, quiz_share=0.5)
    f, ev = CodesFile(p), load_events(p)
    rf = RecallFrames(p, f)
    delays = (0, 1, 2) * 2
    T, K, hits = 64, 3, 0
    rng = np.random.default_rng(0)
    for _ in range(40):
        c = int(rng.integers(0, len(f)))
        start = int(rng.integers(0, f.lengths[c] - T + 1))
        m = rf.mask(c, start, T, delays)                                   # [T, 6]
        want = np.zeros((T, 2 * K), bool)
        for cc, s, _, second, L in ev.tolist():
            if cc != c:
                continue
            for k in range(K):
                col = s * K + k
                for t in range(T):
                    want[t, col] |= second <= start + t - delays[col] < second + L
        np.testing.assert_array_equal(m, want)
        hits += int(m.sum())
    assert hits > 100
    # the marked codes are the recalled values' codes, taken from the window as training takes it
    c, s, _, second, L = ev[0].tolist()
    start = max(0, second - 10)
    x = window(f.conversation(c), start, T, delays, (2048,) * 6)
    m = rf.mask(c, start, T, delays)
    for k in range(K):
        np.testing.assert_array_equal(x[m[:, s * K + k], s * K + k], f.audio(c)[second:second + L, s, k])
    # a file without events cannot be weighted: a clear message
    q = str(tmp_path / "q.bin")
    write_codes(q, [np.zeros((50, 2, 3), np.int64)], n_streams=2, n_codebooks=3)
    with pytest.raises(ValueError, match="no recall events"):
        RecallFrames(q, CodesFile(q))


def test_validation_recall(tmp_path):
    # train.evaluate on a file with recall events: the top-1 accuracy on the semantic codes of the recalled
    # values heard inside each held-out window (the drills' lookup, printed while training), over all of them
    # and apart within the attention window of their first mention and beyond it. Checked with a stand-in
    # model right exactly where a plain loop over the events puts those codes, or everywhere else
    from types import SimpleNamespace
    import torch.nn.functional as F
    from codes import CodesFile
    from data import CUE_LEN, KEY_LEN, RecallFrames, WindowSampler, load_events
    from model import Config, Logits
    p = str(tmp_path / "r.bin")
    synthetic(p, hours=0.2, min_minutes=2, max_minutes=3, n_codebooks=3, seed=4, quiet=True, events_per_min=6,
              near_share=1.0, near_max_s=8.0, value_frames=5, quiz_share=0.5)
    f, ev = CodesFile(p), load_events(p)
    cfg = Config.preset("tiny", n_codebooks=3, delays=(0, 1, 2), window=32)
    delays, K, T = cfg.col_delays(), 3, 128
    sampler = WindowSampler(f, np.arange(len(f)), T, 4, delays, cfg.col_cards(), 0)

    def recalled(heard, far=None):   # [B, T, audio columns]: the recalled values' semantic codes
        m = np.zeros((len(sampler.last), T, cfg.n_audio), bool)
        for r, (c, start) in enumerate(sampler.last):
            for cc, s, first, second, L in ev.tolist():
                if cc == c and (first - CUE_LEN - KEY_LEN >= start) == heard and far in (None, second - first >= 32):
                    for t in range(T):
                        m[r, t, s * K] |= second <= start + t - delays[s * K] < second + L
        return torch.from_numpy(m)

    class Stub(torch.nn.Module):
        def __init__(self, right):
            super().__init__()
            self.right, self.counts = right, []

        def forward(self, x, state, keep_state=False):
            tgt = x[..., cfg.n_text:]
            right = self.right()
            self.counts.append([int(recalled(*k).sum()) for k in ((True,), (False,), (True, False), (True, True))])
            pred = torch.where(right, tgt, (tgt + 1) % cfg.cardinality)
            return Logits(None, F.one_hot(pred, cfg.cardinality + 1)[..., :cfg.cardinality].float() * 20), None

    rf, tc, nc = RecallFrames(p, f), SimpleNamespace(eval_batches=6), contextlib.nullcontext()
    only = Stub(lambda: recalled(True))
    _, rec = train.evaluate(only, only, sampler, tc, cfg, "cpu", nc, rf)
    heard, unheard, near, far = map(sum, zip(*only.counts))
    assert unheard > 50 and near > 20 and far > 20 and near + far == heard
    assert rec == {"val_recall": 1.0, "val_recall_codes": heard, "val_recall_within": 1.0, "val_recall_within_codes": near,
                   "val_recall_beyond": 1.0, "val_recall_beyond_codes": far}
    for right, want in ((lambda: ~recalled(True), (0.0, 0.0, 0.0)), (lambda: recalled(False), (0.0, 0.0, 0.0)),
                        (lambda: recalled(True, False), (near / heard, 1.0, 0.0)),
                        (lambda: recalled(True, True), (far / heard, 0.0, 1.0))):
        _, rec = train.evaluate(Stub(right), only, sampler, tc, cfg, "cpu", nc, rf)
        assert (rec["val_recall"], rec["val_recall_within"], rec["val_recall_beyond"]) == pytest.approx(want)
        assert rec["val_recall_codes"] == heard
    assert train.evaluate(only, only, sampler, tc, cfg, "cpu", nc)[1] == {}
    assert "within the attention window 1.000, beyond it -" in train._recall_text(
        {"val_recall": 1.0, "val_recall_codes": 3, "val_recall_within": 1.0, "val_recall_beyond": None})


def test_recall_weight_weighs_the_recalled_frames(tmp_path, monkeypatch, capsys):
    # --recall_weight W: train.py hands the loss the recalled values' targets weighted W (where they
    # are: test_recall_frames_mark_the_recalled_values; what the weight does: test_loss_weight)
    import model as model_mod
    p = str(tmp_path / "r.bin")
    synthetic(p, hours=0.3, min_minutes=2, max_minutes=3, n_codebooks=2, seed=4, quiet=True, events_per_min=6,
              near_share=1.0, near_max_s=8.0, value_frames=6, quiz_share=1.0)
    seen = []
    orig = model_mod.loss_fn

    def spy(logits, codes, cfg, reduce=True, weight=None):
        seen.append(weight)
        return orig(logits, codes, cfg, reduce, weight)
    monkeypatch.setattr(train, "loss_fn", spy)
    plain = train.main(_args(p, tmp_path / "a", "minibatch", seq_len=64, batch_size=4, max_steps=3))
    assert len(seen) >= 3 and all(x is None for x in seen)   # 3 steps, then the validation (plain loss)
    seen.clear()
    heavy = train.main(_args(p, tmp_path / "b", "minibatch", seq_len=64, batch_size=4, max_steps=3,
                             recall_weight=50))
    w = torch.stack([x for x in seen if x is not None])        # [steps, B, T, n_audio]
    assert len(w) == 3 and w.shape[1:] == (4, 64, 4)
    assert set(w.unique().tolist()) == {1.0, 50.0} and 0.05 < (w == 50).float().mean() < 0.5
    assert heavy != plain
    assert "must be > 0" in _err(capsys, _args(p, tmp_path / "c", "minibatch", recall_weight=0))
    q = str(tmp_path / "q.bin")
    write_codes(q, [np.zeros((100, 2, 2), np.int64)] * 3, n_streams=2, n_codebooks=2)
    assert "no recall events" in _err(capsys, _args(q, tmp_path / "d", "minibatch", recall_weight=5))


def test_ttt_write_penalty(synth, tmp_path, monkeypatch, capsys):
    # --ttt_write_penalty P: the loss gains P x the TTT layers' mean learning-rate gate of the step's forward,
    # and training with it lowers the gate
    import ttt
    seen = []
    orig = ttt._TTTLayer.lr_gate

    def spy(self, x):
        g = orig(self, x)
        seen.append(g.detach().mean().item())
        return g
    monkeypatch.setattr(ttt._TTTLayer, "lr_gate", spy)
    plain = train.main(_args(synth, tmp_path / "a", "streaming", max_steps=1))
    first, n_plain = seen[0], len(seen)   # the step's forward (inner_inputs' call), then the validation's
    seen.clear()
    pen = train.main(_args(synth, tmp_path / "b", "streaming", max_steps=1, ttt_write_penalty=2.0))
    assert len(seen) == 2 * n_plain and seen[0] == seen[1] == first   # each forward: the penalty's call, then inner_inputs'
    assert pen[0] - plain[0] == pytest.approx(2.0 * first, rel=1e-4)
    monkeypatch.setattr(ttt._TTTLayer, "lr_gate", orig)
    bias = {}
    for name, p in (("plain", 0.0), ("pen", 5.0)):
        train.main(_args(synth, tmp_path / name, "streaming", max_steps=8, lr=0.03, ttt_write_penalty=p))
        m = SpeechLM.from_checkpoint(tmp_path / name / "model.safetensors")
        bias[name] = float(m.layers[-1].ttt.layer.learnable_ttt_lr_bias.detach().mean())
    assert bias["pen"] < bias["plain"] - 0.05, bias
    assert "needs a weight > 0" in _err(capsys, _args(synth, tmp_path / "c", "streaming", ttt_write_penalty=-1))
    assert "with TTT layers" in _err(capsys, _args(synth, tmp_path / "d", "streaming", n_ttt=0, ttt_write_penalty=1))


def test_ttt_update_penalty(synth, tmp_path, monkeypatch, capsys):
    # --ttt_update_penalty U: the loss gains U x the TTT layers' mean move of the fast weights in the step's
    # forward (ttt.py written), and training with it makes the moves smaller
    import ttt
    seen = []
    orig = ttt._TTTLayer.written

    carried = []

    def spy(self, x, before, after):
        w = orig(self, x, before, after)
        seen.append(w.detach())
        carried.append(before is not None and bool((before.params[0] != self.W1).any()))
        return w
    monkeypatch.setattr(ttt._TTTLayer, "written", spy)
    plain = train.main(_args(synth, tmp_path / "a", "streaming", max_steps=1))
    assert not seen   # no penalty, no hook
    pen = train.main(_args(synth, tmp_path / "b", "streaming", max_steps=2, ttt_update_penalty=2.0))
    n_ttt = sum(b.ttt is not None for b in SpeechLM.from_checkpoint(tmp_path / "b" / "model.safetensors").layers)
    first = sum(w.mean().item() for w in seen[:n_ttt]) / n_ttt   # the step's forward, then the validation's
    assert first > 0.01 and pen[0] - plain[0] == pytest.approx(2.0 * first, rel=1e-4)
    assert not any(carried[:n_ttt]) and all(carried[n_ttt:2 * n_ttt])   # the second step: from the carried state
    seen.clear()   # --ttt_update_penalty_power 2: the squares' mean
    sq = train.main(_args(synth, tmp_path / "e", "streaming", max_steps=1, ttt_update_penalty=2.0, ttt_update_penalty_power=2))
    second = sum(w.square().mean().item() for w in seen[:n_ttt]) / n_ttt
    assert abs(second - first ** 2) > 1e-3 and sq[0] - plain[0] == pytest.approx(2.0 * second, rel=1e-4)
    moves = {}
    for name, u in (("plain", 0.0), ("pen", 3.0)):
        train.main(_args(synth, tmp_path / name, "streaming", max_steps=8, lr=0.03, ttt_update_penalty=u))
        m = SpeechLM.from_checkpoint(tmp_path / name / "model.safetensors").eval()
        seen.clear()
        t = [b.ttt.layer for b in m.layers if b.ttt is not None]
        x = torch.randn(2, 32, m.cfg.dim)
        with torch.no_grad():
            moves[name] = float(sum(layer.written(x, None, layer(x)[1]).mean() for layer in t))
    assert moves["pen"] < 0.7 * moves["plain"], moves
    assert "needs a weight > 0" in _err(capsys, _args(synth, tmp_path / "c", "streaming", ttt_update_penalty=-1))
    assert "with TTT layers" in _err(capsys, _args(synth, tmp_path / "d", "streaming", n_ttt=0, ttt_update_penalty=1))
    assert "must be > 0" in _err(capsys, _args(synth, tmp_path / "f", "streaming", ttt_update_penalty=1, ttt_update_penalty_power=0))


def test_half_life_lr_mult(synth, tmp_path, capsys):
    # --ttt_half_life_lr_mult M: the learnt half-lives take steps M times the others' learning rate; the
    # other weights' first step is unchanged
    base = dict(max_steps=1, warmup=1, ttt_half_life=8, ttt_half_life_max=200)
    models = {}
    for mult, lr in ((1, 1e-30), (1, 3e-3), (10, 3e-3)):   # lr 1e-30: the initial weights
        train.main(_args(synth, tmp_path / f"{mult}_{lr}", "streaming", ttt_half_life_lr_mult=mult, lr=lr, min_lr=0, **base))
        models[mult, lr] = SpeechLM.from_checkpoint(tmp_path / f"{mult}_{lr}" / "model.safetensors").state_dict()
    start, models = models[1, 1e-30], {1: models[1, 3e-3], 10: models[10, 3e-3]}
    names = [n for n in start if n.endswith("log_half_life")]
    assert names
    for n in start:
        if n in names:
            d1, d10 = models[1][n] - start[n], models[10][n] - start[n]
            assert d1.abs().max() > 0
            torch.testing.assert_close(d10, 10 * d1, rtol=1e-4, atol=1e-7)
        else:
            torch.testing.assert_close(models[10][n], models[1][n], rtol=0, atol=0)
    assert "learnt half-lives" in _err(capsys, _args(synth, tmp_path / "c", "streaming", ttt_half_life_lr_mult=5))
    assert "number > 0" in _err(capsys, _args(synth, tmp_path / "d", "streaming", ttt_half_life_lr_mult=0, **base))


def test_mqar_codes_file(tmp_path):
    # scripts/mqar_codes.py: each listed recall is its key's value, after the same key, past `start`
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import mqar_codes
    from codes import CodesFile
    from data import load_events
    p = str(tmp_path / "m.bin")
    mqar_codes.main(["--out", p, "--sequences", "20", "--seed", "3"])
    f, ev = CodesFile(p), load_events(p)
    assert len(f) == 20 and len(ev) == 20 * 8 and (f.lengths == 257).all()
    for c, s, first, second, L in ev.tolist():
        x = f.audio(c)[:, 0, 0]
        assert x[first] == x[second] and 128 <= x[first] < 256          # the value, from the values' codes
        assert x[first - 1] == x[second - 1] and x[first - 1] < 128     # after the same key
        assert second - 1 >= 47 and first <= 15
    keys = [[f.audio(c)[2 * i, 0, 0] for i in range(8)] for c in range(20)]
    assert all(len(set(k)) == 8 for k in keys)                          # a sequence's keys differ
    q = str(tmp_path / "m2.bin")                                        # a second, silent stream
    mqar_codes.main(["--out", q, "--sequences", "20", "--seed", "3", "--streams", "2"])
    g = CodesFile(q)
    assert all(np.array_equal(g.audio(c)[:, 0], f.audio(c)[:, 0]) and (g.audio(c)[:, 1] == 2047).all() for c in range(20))
    r = str(tmp_path / "m3.bin")        # keys of two frames; keys and values from the same 256 codes
    mqar_codes.main(["--out", r, "--sequences", "20", "--seed", "3", "--key_frames", "2", "--shared_codes"])
    h, ev = CodesFile(r), load_events(r)
    assert len(ev) == 20 * 8
    both = set()
    for c, s, first, second, L in ev.tolist():
        x = h.audio(c)[:, 0, 0]
        assert x[first] == x[second] and (x[first - 2:first] == x[second - 2:second]).all()
        assert (first - 2) % 3 == 0 and first <= 23 and second - 2 >= 47
        both |= {("k", int(k)) for k in x[first - 2:first]} | {("v", int(x[first]))}
    keys, values = {k for t, k in both if t == "k"}, {v for t, v in both if t == "v"}
    assert max(keys | values) < 256 and keys & values                  # shared codes: some code is both


def test_silence_from_the_data(synth, tmp_path, capsys):
    # --silence data: the silence frame data.py wrote beside the codes file goes into the model's config;
    # codes given by hand too; a file without one, or codes that do not fit, give a clear error
    import json
    sil = json.load(open(synth + ".events.json"))["silence"]
    assert len(sil) == 2
    train.main(_args(synth, tmp_path / "a", "minibatch", max_steps=1, silence="data"))
    ck = torch.load(tmp_path / "a" / "ckpt.pt", map_location="cpu", weights_only=False)
    assert list(ck["model_config"]["silence"]) == sil
    assert list(SpeechLM.from_checkpoint(str(tmp_path / "a")).cfg.silence) == sil
    train.main(_args(synth, tmp_path / "b", "minibatch", max_steps=1, silence="3,4"))
    assert list(torch.load(tmp_path / "b" / "ckpt.pt", map_location="cpu", weights_only=False)["model_config"]["silence"]) == [3, 4]
    p = str(tmp_path / "plain.bin")
    write_codes(p, [np.zeros((100, 2, 2), np.int64)] * 2, n_streams=2, n_codebooks=2)
    assert "lists no silence frame" in _err(capsys, _args(p, tmp_path / "o", "minibatch", silence="data"))
    assert "one code in" in _err(capsys, _args(synth, tmp_path / "o", "minibatch", silence="3"))
    assert "codes separated by commas" in _err(capsys, _args(synth, tmp_path / "o", "minibatch", silence="x,y"))


def test_device_choice(monkeypatch, tmp_path, capsys):
    # a bare "cuda" gets this process's index (torch.cuda.set_device refuses a device without one)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert default_device("cuda", 3) == torch.device("cuda", 3)
    assert default_device("cuda:1", 3) == torch.device("cuda", 1)
    assert default_device("cpu", 3) == torch.device("cpu")
    assert default_device("", 2) == torch.device("cuda", 2)
    with pytest.raises(ValueError, match="there are 4 CUDA device"):
        default_device("cuda:4")
    # a device torch cannot use here is a clear error, before any data is read
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="torch sees no CUDA device here"):
        default_device("cuda", 0)
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        default_device("gpu")
    assert "torch sees no CUDA device here" in _err(capsys, ["--data", "missing.bin", "--device", "cuda",
                                                             "--out_dir", str(tmp_path / "o")])


def _train_until_stepping(cmd, env=None):
    """Start train.py and return it once it reports its second step (its signal handlers are in)."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    out = []
    for line in p.stdout:
        out.append(line)
        if line.startswith("step 2/"):
            return p, out
    p.wait()
    raise AssertionError("train.py ended before its second step:\n" + "".join(out)[-3000:])


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_signal_stops_with_a_checkpoint(synth, tmp_path, sig):
    # Ctrl-C, or SIGTERM from a scheduler: finish the step, write a checkpoint, exit cleanly; the run resumes
    out_dir = tmp_path / "run"
    cmd = [sys.executable, "train.py", *_args(synth, out_dir, "streaming", max_steps=100000, log_interval=1)]
    p, out = _train_until_stepping(cmd)
    p.send_signal(getattr(signal, sig))
    rest, _ = p.communicate(timeout=120)
    text = "".join(out) + rest
    assert p.returncode == 0, text[-3000:]
    assert "writing a checkpoint" in text
    step = torch.load(out_dir / "ckpt.pt", weights_only=False)["step"]
    assert 2 <= step < 100000 and f"done: step {step}" in text
    resumed = train.main(_args(synth, out_dir, "streaming", max_steps=step + 1))
    assert len(resumed) == step + 1


def _signals_at(step, kills, gap=0.0):
    """A loss function that, on its `step`-th call, sends this process `kills` SIGTERMs, `gap` s apart."""
    calls = [0]

    def loss(*a, **k):
        calls[0] += 1
        if calls[0] == step:
            for i in range(kills):
                time.sleep(gap if i else 0)
                os.kill(os.getpid(), signal.SIGTERM)
        return train_loss_fn(*a, **k)
    return loss


def test_a_signal_delivered_twice_is_one_request(synth, tmp_path, monkeypatch):
    # `timeout` sends SIGTERM to the run and then to its process group, so the run gets it twice, microseconds
    # apart: one request to stop after the step with a checkpoint, not a second one to abort. Again a second
    # or more after the first, it aborts.
    monkeypatch.setattr(train, "loss_fn", _signals_at(2, kills=2))
    try:
        losses = train.main(_args(synth, tmp_path / "a", "minibatch", max_steps=100000))
    except KeyboardInterrupt:
        pytest.fail("a signal delivered twice aborted the run")
    assert len(losses) == 2 and torch.load(tmp_path / "a" / "ckpt.pt", weights_only=False)["step"] == 2
    monkeypatch.setattr(train, "loss_fn", _signals_at(2, kills=2, gap=1.1))
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(KeyboardInterrupt):
            train.main(_args(synth, tmp_path / "b", "minibatch", max_steps=100000))
    finally:   # an abort leaves train.py's handlers in place: this process goes on
        for s, h in saved.items():
            signal.signal(s, h)


def test_a_signal_after_a_compiler_took_the_handler(synth, tmp_path):
    # The first time Triton compiles a kernel, its compiler (LLVM) puts its own SIGTERM handler in front of
    # train.py's, one that resets to the default action as it runs. Here the first step's loss resets the
    # action behind Python's back, as that would; a SIGTERM at step 3 must still end with a checkpoint.
    out_dir = tmp_path / "run"
    code = f"""
import ctypes, os, signal, sys, time
sys.path.insert(0, {ROOT!r})
import train
libc = ctypes.CDLL(None)
libc.signal.argtypes, libc.signal.restype = [ctypes.c_int, ctypes.c_void_p], ctypes.c_void_p
calls, loss_fn = [0], train.loss_fn
def loss(*a, **k):
    calls[0] += 1
    if calls[0] == 1:
        libc.signal(signal.SIGTERM, 0)      # SIG_DFL
    if calls[0] == 3:
        os.kill(os.getpid(), signal.SIGTERM)
    return loss_fn(*a, **k)
train.loss_fn = loss
print("steps", len(train.main({_args(synth, out_dir, "minibatch", max_steps=100000)!r})))
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, (p.returncode, (p.stdout + p.stderr)[-3000:])
    assert "steps 3" in p.stdout and torch.load(out_dir / "ckpt.pt", weights_only=False)["step"] == 3


def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(synth, tmp_path):
    # torchrun on the CPU: SIGTERM to rank 1 alone. Every rank must stop after the same step, or the
    # checkpoint's barrier would wait forever.
    out_dir = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(29600 + os.getpid() % 1000), "train.py",
           *_args(synth, out_dir, "streaming", max_steps=100000, log_interval=1)]
    p, out = _train_until_stepping(cmd)
    with open(f"/proc/{p.pid}/task/{p.pid}/children") as fh:
        kids = [int(x) for x in fh.read().split()]
    rank1 = [k for k in kids if b"RANK=1\0" in open(f"/proc/{k}/environ", "rb").read()]
    assert len(rank1) == 1, kids
    os.kill(rank1[0], signal.SIGTERM)
    try:
        rest, _ = p.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        for pid in [p.pid, *kids]:   # leave no rank running
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        raise AssertionError("the ranks did not stop together: " + "".join(out)[-2000:])
    text = "".join(out) + rest
    assert p.returncode == 0, text[-3000:]
    assert "rank 1: SIGTERM" in text
    step = torch.load(out_dir / "ckpt.pt", weights_only=False)["step"]
    assert 2 <= step < 100000 and f"done: step {step}" in text


def test_grad_clip_zero_is_no_clipping(synth, tmp_path):
    # --grad_clip 0 turns clipping off (it used to scale every gradient to zero: a run that learnt nothing)
    train.main(_args(synth, tmp_path / "a", "minibatch", max_steps=3, grad_clip=0))
    train.main(_args(synth, tmp_path / "b", "minibatch", max_steps=3, grad_clip=1e9))
    train.main(_args(synth, tmp_path / "c", "minibatch", max_steps=3, grad_clip=1e-9))
    a, b, c = (SpeechLM.from_checkpoint(str(tmp_path / n)).state_dict() for n in "abc")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_init_from_with_learnt_half_lives(synth, tmp_path):
    # a model trained with one half-life goes on with learnt ones (as experiment.py's streaming phase): the
    # new parameters start log-spaced, train (no weight decay on them) and are kept; resuming keeps them too
    train.main(_args(synth, tmp_path / "m", "streaming", max_steps=1, ttt_half_life=4))
    kw = dict(max_steps=3, init_from=str(tmp_path / "m"), ttt_half_life=4, ttt_half_life_max=400)
    train.main(_args(synth, tmp_path / "l", "streaming", **kw))
    m = SpeechLM.from_checkpoint(tmp_path / "l" / "model.safetensors")
    assert m.cfg.ttt_half_life_range() == (4, 400)
    layers = [b.ttt.layer for b in m.layers if b.ttt is not None]
    assert layers
    fresh = SpeechLM.from_checkpoint(tmp_path / "m" / "model.safetensors").set_ttt_half_life(4, 400)
    for t, f in zip(layers, (b.ttt.layer for b in fresh.layers if b.ttt is not None)):
        moved = (t.log_half_life - f.log_half_life).abs()
        assert moved.max() > 1e-4, "the learnt half-lives did not train"
    assert train.main(_args(synth, tmp_path / "l", "streaming", **{**kw, "max_steps": 4}))   # resumes
    # and with a forget gate: its new weights train too
    train.main(_args(synth, tmp_path / "g", "streaming", **kw, ttt_forget_gate=True))
    g = SpeechLM.from_checkpoint(tmp_path / "g" / "model.safetensors")
    assert g.cfg.ttt_forget_gate
    for t in (b.ttt.layer for b in g.layers if b.ttt is not None):
        assert t.forget_weight.abs().max() > 1e-6, "the forget gate did not train"
