"""The long-conversation experiment (experiment.py, evaluate.py): the whole pipeline at a tiny scale,
evaluation memory that does not grow with the conversation, and the measurements on known inputs."""
import json
import math
import os
import shutil
import weakref

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import evaluate
import experiment
import ttt
from codes import CodesFile
from data import StreamSampler, load_events, synthetic
from model import Config, SpeechLM, detach_state, loss_fn


@pytest.fixture
def one_thread():
    # tiny models on a shared 2-core machine: one thread avoids waiting on the other's barrier
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_experiment_runs_end_to_end(tmp_path, one_thread):
    out = str(tmp_path / "exp")
    experiment.main(["--scale", "cpu-test", "--out", out])
    sc = experiment.SCALES["cpu-test"]
    with open(os.path.join(out, "results.json")) as f:
        res = json.load(f)
    assert set(res["eval"]) == set(experiment.DEFAULT_VARIANTS)
    n_conv, minutes = sc["heldout"]
    for name, r in res["eval"].items():
        losses = res["train_losses"][name]
        assert len(losses) == sc["train"]["max_steps"] and all(math.isfinite(x) for x in losses)
        lm = r["loss_by_minute"]
        assert lm["minute"] == list(range(1, int(minutes) + 1))
        assert all(math.isfinite(x) and 0 < x < 20 for x in lm["loss"])
        assert sum(lm["frames"]) == n_conv * minutes * evaluate.FRAMES_PER_MINUTE
        A = sc["recall"]["pattern_codes"] // (2 if sc["recall"].get("split_patterns") else 1)   # values drawn from A codes
        assert r["chance"]["accuracy"] == 1 / A and r["chance"]["loss"] == pytest.approx(math.log(A))
        rc = r["recall"]
        assert [b["label"] for b in rc["buckets"]] == list(evaluate.DIST_LABELS)
        assert {"within_window", "beyond_window", "first_mention"} <= set(rc)
        n_ev = len(load_events(os.path.join(out, "data", "heldout.bin")))
        assert sum(b["events"] for b in rc["buckets"]) == n_ev == len(rc["per_event"]) > 0
        assert rc["first_mention"]["codes"] == rc["within_window"]["codes"] + rc["beyond_window"]["codes"]
        assert math.isfinite(rc["first_mention"]["loss"])
        g = r["generation"]
        assert g["frames"] == round(sc["eval"]["gen_minutes"] * 750) and len(g["minute"]) == 1
        for k in evaluate.STATS:
            assert math.isfinite(g[k][0]) and len(r["reference"][k]) == minutes
        assert g["last_minute_within_spread"] == evaluate.within_spread(g, r["reference"])
        assert g["first_minute_within_spread"] == evaluate.within_spread(g, r["reference"], 0)
        assert len(lm["speech"]) == minutes and sum(lm["speech_frames"]) < sum(lm["frames"])
        # the most common frame of a stream is data.py's silence frame (drawn first from rng 1234)
        assert r["reference"]["silence_frame"] == np.random.default_rng(1234).integers(0, 2048, 2).tolist()
        assert r["model"]["window"] == (sc["long_window"] if name == "long_window" else sc["model"]["window"])
        assert r["model"]["n_ttt"] == {"window": 0, "long_window": 0, "ttt_linear_all": 2}.get(name, 1)
        d = r["drills_recall"]   # held-out drills, recall only
        assert sum(b["events"] for b in d["buckets"]) == len(load_events(os.path.join(out, "data", "drills_heldout.bin"))) > 0
    assert res["eval"]["long_window"]["drills_recall"]["within_window"]["codes"] > 0
    mem = {n: r["memory"]["state_bytes"] for n, r in res["eval"].items()}
    assert mem["window"] < mem["ttt_linear"] < mem["ttt_mlp"] and mem["window"] < mem["long_window"]
    # --silence data reached the models: the silence frame that data.py wrote beside the training file
    with open(os.path.join(out, "data", "train.bin.events.json")) as f:
        sil = tuple(json.load(f)["silence"])
    assert len(sil) == sc["n_codebooks"] and SpeechLM.from_checkpoint(os.path.join(out, "runs", "ttt_linear")).cfg.silence == sil
    with open(os.path.join(out, "summary.md")) as f:
        md = f.read()
    assert all(f"| {n} |" in md for n in experiment.DEFAULT_VARIANTS) and f"1/{A}" in md
    assert "drills: recall in / beyond window / beyond reach" in md and "speech frames: loss min 1-5 / last 5" in md
    d = res["eval"]["ttt_linear"]["drills_recall"]
    assert " / ".join(f"{d[k]['accuracy']:.3f}" if d[k]["accuracy"] is not None else "-"
                      for k in ("within_window", "beyond_window", "beyond_reach")) + " |" in md
    assert "first / last minute outside the data's spread" in md and "spread (5-95% of minutes)" in md
    g = res["eval"]["ttt_linear"]["generation"]
    cells = [", ".join(k for k, v in g[f"{w}_minute_within_spread"].items() if not v) or "none" for w in ("first", "last")]
    assert f"| {cells[0]} / {cells[1]} |" in md
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    for p in ("loss_by_minute.png", "recall_by_distance.png", "generation.png"):
        assert os.path.getsize(os.path.join(out, p)) > 1000


def test_drills_warmup_phase(tmp_path, one_thread):
    # --warmup_drills N: N steps on a drills file of its own (mini-batch, float32, constant lr), then
    # the scale's training starts from those weights
    out = str(tmp_path / "exp")
    args = ["--scale", "cpu-test", "--variants", "window", "--stages", "data,train"]
    experiment.main(args + ["--out", out, "--warmup_drills", "2"])
    warm = os.path.join(out, "runs", "window", "warmup")
    with open(os.path.join(warm, "train_losses.json")) as f:
        assert len(json.load(f)) == 2
    events = load_events(experiment.drills_train_path(out))   # drills: due 2 s to quiz_max_s later
    assert len(events) > 10
    assert np.median(events[:, 3] - events[:, 2]) <= experiment.SCALES["cpu-test"]["warmup_drills"]["quiz_max_s"] * 12.5
    with open(os.path.join(warm, "train.log")) as f:
        argv = f.readline()
    assert "--mode=minibatch" in argv and "--dtype=float32" in argv and "--min_lr=0.003" in argv
    # phase 2 starts from the warm-up's weights: its first loss differs from a fresh start's
    fresh = str(tmp_path / "fresh")
    experiment.main(args + ["--out", fresh])
    with open(os.path.join(out, "runs", "window", "train_losses.json")) as f, \
            open(os.path.join(fresh, "runs", "window", "train_losses.json")) as g:
        assert abs(json.load(f)[0] - json.load(g)[0]) > 1e-3


def test_drills_hours(tmp_path, monkeypatch):
    # --warmup_drills_hours H: the warm-up's drills file holds H hours, made in one process for each 600 hours
    # (the scales' own, up to 600 hours, in one: the same files as before)
    cmds = []

    class Done:
        def __init__(self, cmd, **kw):
            cmds.append(cmd)

        def wait(self):
            return 0
    monkeypatch.setattr(experiment.subprocess, "Popen", Done)
    drills = lambda: next(c for c in cmds if experiment.drills_train_path(out) in c)
    out = str(tmp_path / "exp")
    for hours, workers in ((None, None), (4400, "8"), (600, None)):
        cmds.clear()
        extra = ["--warmup_drills_hours", str(hours)] if hours else []
        with pytest.raises(FileNotFoundError):   # (no data was made: the check of the held-out file fails)
            experiment.main(["--scale", "gpu-reach", "--out", out, "--stages", "data", *extra])
        c = drills()
        assert c[c.index("--hours") + 1] == str(float(hours or experiment.SCALES["gpu-reach"]["warmup_drills"]["hours"]))
        assert (c[c.index("--workers") + 1] if "--workers" in c else None) == workers
    with pytest.raises(SystemExit):
        experiment.main(["--scale", "gpu-reach", "--out", out, "--warmup_drills_hours", "-1"])


class PeakTensorBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages alive at once among those made inside the block (CPU has no
    max_memory_allocated): each op's outputs are counted until their last tensor is freed."""

    def __init__(self):
        super().__init__()
        self.live, self.now, self.peak = {}, 0, 0

    def _free(self, key):
        entry = self.live[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.now -= entry[0]
            del self.live[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes():
                st = t.untyped_storage()
                key = st.data_ptr()
                if key in self.live:
                    self.live[key][1] += 1
                else:
                    self.live[key] = [st.nbytes(), 1]
                    self.now += st.nbytes()
                    self.peak = max(self.peak, self.now)
                weakref.finalize(t, self._free, key)
        return out


def _tiny(**kw):
    torch.manual_seed(0)
    cfg = Config.preset("tiny", **{**dict(n_codebooks=2, delays=(0, 1), ttt_mini_batch=16), **kw})
    return SpeechLM(cfg).eval()


def test_evaluation_memory_does_not_grow_with_the_conversation(tmp_path, one_thread):
    m = _tiny(ttt_type="mlp")      # the larger TTT state; with delays and a cache of W = 16 slots
    peaks, states = [], []
    for minutes, seed in ((1, 1), (3, 2)):
        p = str(tmp_path / f"c{minutes}.bin")
        synthetic(p, hours=minutes / 60, min_minutes=minutes, max_minutes=minutes, n_codebooks=2, seed=seed, quiet=True)
        f = CodesFile(p)
        assert len(f) == 1 and f.lengths[0] == minutes * 750
        with PeakTensorBytes() as meter:
            r = evaluate.stream_eval(m, f, load_events(p), [0], chunk_len=64)
        peaks.append(meter.peak)
        states.append(r["state_bytes"])
        assert r["n_min"].shape[0] == minutes
    one_chunk_logits = 64 * m.cfg.n_audio * m.cfg.cardinality * 4
    assert peaks[0] > one_chunk_logits          # the meter does see the evaluation's tensors
    assert states[0] == states[1]
    assert peaks[1] <= 1.02 * peaks[0], f"peak tensor bytes grew with the conversation: {peaks}"


def test_recall_entries_point_at_the_value_codes(tmp_path):
    # with delays and both streams: every entry's target in the delayed input is the value's
    # semantic code (the other codebooks are not measured: tied patterns would score without memory)
    p = str(tmp_path / "h.bin")
    synthetic(p, hours=0.1, min_minutes=3, max_minutes=3, n_codebooks=3, seed=3, quiet=True)
    f, events = CodesFile(p), load_events(p)
    cfg = Config.preset("tiny", n_codebooks=3, delays=(0, 1, 2))
    convs = list(range(len(f)))
    e = evaluate.recall_entries(f, events, convs, cfg)
    x, live = evaluate.chunk(f, convs, 0, int(f.lengths.max()), cfg.col_delays(), cfg.col_cards())
    assert live[e[:, 0], e[:, 1]].all()
    K = cfg.n_codebooks
    for say in (0, 1):                                         # first mentions, then recalls
        mine = e[e[:, 3] % 2 == say]
        ev = events[mine[:, 3] // 2]
        assert len(mine) == len(events) * 8 and (mine[:, 2] % K == 0).all()   # 8 frames, semantic codebook
        start = ev[:, 2 + say]
        frame = mine[:, 1] - np.array(cfg.col_delays())[mine[:, 2]]
        i = frame - start
        assert ((0 <= i) & (i < 8)).all()
        recalled = np.stack([np.asarray(f.audio(c))[s + j, st] for c, st, s, j in
                             zip(ev[:, 0], ev[:, 1], ev[:, 3], i)])                     # [N, K]
        assert (x[mine[:, 0], mine[:, 1], mine[:, 2]] == recalled[np.arange(len(mine)), mine[:, 2] % K]).all()


def test_recall_table_buckets_and_window_sides():
    ev = np.array([[0, 0, 0, d, 8] for d in (125, 600, 2000, 5000, 20000, 44000)])   # distances in frames
    n = np.full(12, 8.0)
    hit = np.tile([0.0, 4.0], 6)                                                     # recalls right half the time
    for w, within in ((250, ["within"] + ["beyond"] * 4), (3000, ["within"] * 3 + ["beyond"] * 2)):
        t = evaluate.recall_table(ev, np.ones(12), hit, n, w)
        assert [b["window"] for b in t["buckets"]] == within
        assert [b["events"] for b in t["buckets"]] == [1, 1, 1, 1, 2]
        assert t["within_window"]["events"] == within.count("within")
        assert t["within_window"]["accuracy"] == 0.5 and t["first_mention"]["accuracy"] == 0.0
        assert t["beyond_reach"]["events"] == t["beyond_window"]["events"]    # no reach given: the window
    t = evaluate.recall_table(ev, np.ones(12), hit, n, 250, reach_frames=3 * 249 + 1)   # three layers
    assert t["beyond_window"]["events"] == 5 and t["beyond_reach"]["events"] == 4 and t["reach_frames"] == 748


def test_frame_stats_on_a_known_conversation():
    sil = np.array([7, 7])
    S0 = np.array([[1, 2], [3, 4], [5, 6], [3, 4], [8, 9]])   # speaker codes, no repeats
    f = []
    f += [[a, sil] for a in S0]                        # speaker 0, 5 frames
    f += [[sil, sil]] * 3                              # pause
    f += [[sil, a] for a in S0] + [[sil, S0[-1]]]      # speaker 1, 6 frames, the last a repeat
    f += [[S0[0], S0[1]]] * 2                          # both at once (overlap), repeated
    f += [[sil, S0[2]]]                                # speaker 1 goes on: not a new turn
    f += [[S0[3], sil]] * 3                            # speaker 0: a turn, 2 repeats
    x = np.array(f)                                    # [n, 2 streams, 2 codebooks]
    n = len(x)
    s = evaluate.FrameStats(sil, bucket=n)
    s.add(x)
    r = s.close()
    speaking = 5 + 6 + 4 + 1 + 3
    assert r["silence"] == [pytest.approx(1 - speaking / (2 * n))]
    assert r["overlap"] == [pytest.approx(2 / n)]
    assert r["repeat"] == [pytest.approx((1 + 2 + 2) / speaking)]
    assert r["turns"] == [pytest.approx(2 * 750 / n)]
    # fed in pieces across bucket edges: the same numbers, carried across (prev frame, last speaker)
    for bucket in (4, 7):
        a, b = evaluate.FrameStats(sil, bucket), evaluate.FrameStats(sil, bucket)
        a.add(x)
        for i in range(0, n, 3):
            b.add(x[i:i + 3])
        ra, rb = a.close(), b.close()
        assert ra == rb and len(ra["turns"]) == math.ceil(n / bucket)
        assert sum(t * min(bucket, n - i * bucket) / 750 for i, t in enumerate(ra["turns"])) == pytest.approx(2)


def test_near_events_and_pattern_codes(tmp_path):
    # --near_share 1: every recall within near_max_s; --pattern_codes A: keys and values from A codes
    # per codebook, the same set in every conversation, and the events file says so (chance = 1/A)
    p = str(tmp_path / "n.bin")
    synthetic(p, hours=0.3, min_minutes=3, max_minutes=3, n_codebooks=2, seed=4, quiet=True, events_per_min=6,
              near_share=1.0, near_max_s=15.0, pattern_codes=16)
    f, events = CodesFile(p), load_events(p)
    assert len(events) >= 6 * 3 * len(f) // 2
    gap = events[:, 3] - events[:, 2]
    assert (gap >= 12).all() and (gap <= 15.0 * 12.5).all()
    from data import KEY_LEN, pattern_codes
    assert pattern_codes(p) == 16
    used = [set(), set()]
    for c, s, first, second, L in events:
        a = np.asarray(f.audio(int(c)))
        # the events name the recall's stream; the first mention may be in either
        s1 = [k for k in range(2) if (a[first:first + L, k] == a[second:second + L, s]).all()]
        assert s1, "the value does not come back"
        for start, st in ((first, s1[0]), (second, s)):
            span = a[start - KEY_LEN:start + L, st]                      # key + value frames [KEY_LEN + L, K]
            for k in range(2):
                used[k].update(span[:, k].tolist())
    assert all(len(u) <= 16 for u in used) and all(len(u) >= 8 for u in used)
    # the default: values from all 2048 codes, events 10 s to an hour apart
    q = str(tmp_path / "d.bin")
    synthetic(q, hours=0.2, min_minutes=12, max_minutes=12, n_codebooks=2, seed=4, quiet=True, events_per_min=2)
    ev = load_events(q)
    assert pattern_codes(q) == 2048 and ((ev[:, 3] - ev[:, 2]) >= 10 * 12.5 - 1).all()


def test_quiz_conversations(tmp_path):
    # --quiz_share 1: every conversation a recall drill, events back to back: nearly half of the
    # frames are recalled values, each recall comes after its gap (and no earlier than the next span)
    from data import CUE_LEN, KEY_LEN
    L = 8
    p = str(tmp_path / "q.bin")
    synthetic(p, hours=0.2, min_minutes=3, max_minutes=3, n_codebooks=2, seed=5, quiet=True,
              near_share=1.0, near_max_s=6.0, pattern_codes=16, value_frames=L, quiz_share=1.0)
    f, events = CodesFile(p), load_events(p)
    span = CUE_LEN + KEY_LEN + L
    share = len(events) * L / f.lengths.sum()
    assert 0.9 * L / (2 * span) <= share <= L / (2 * span)
    gap = events[:, 3] - events[:, 2]
    assert (gap >= max(span, 2 * 12.5)).all() and np.median(gap) <= 6.0 * 12.5    # due at 2-6 s, later when others are due first
    for c, s, first, second, _ in events:
        a = np.asarray(f.audio(int(c)))
        assert (a[second - KEY_LEN:second + L, s] == [a[first - KEY_LEN:first + L, k] for k in range(2)]).all(-1).all(-1).any()
    # --quiz_max_s: the drills' own (shorter) gaps; ordinary conversations keep near_max_s
    q = str(tmp_path / "q2.bin")
    synthetic(q, hours=0.2, min_minutes=3, max_minutes=3, n_codebooks=2, seed=5, quiet=True, near_share=1.0,
              near_max_s=20.0, pattern_codes=16, value_frames=L, quiz_share=1.0, quiz_max_s=3.0)
    r = str(tmp_path / "q3.bin")
    synthetic(r, hours=0.2, min_minutes=3, max_minutes=3, n_codebooks=2, seed=5, quiet=True, near_share=1.0,
              near_max_s=20.0, pattern_codes=16, value_frames=L, quiz_share=1.0)
    short, long = (np.median(load_events(x)[:, 3] - load_events(x)[:, 2]) for x in (q, r))
    assert short <= 3.0 * 12.5 < 8 * 12.5 < long
    # with their own gaps, every event of a drill comes back within them, whatever near_share says
    synthetic(q, hours=0.2, min_minutes=3, max_minutes=3, n_codebooks=2, seed=5, quiet=True, near_share=0.5,
              near_max_s=20.0, pattern_codes=16, value_frames=L, quiz_share=1.0, quiz_max_s=3.0)
    ev = load_events(q)
    assert len(ev) > 20 and (ev[:, 3] - ev[:, 2]).max() <= 8 * 12.5


def test_reserved_patterns_and_drill_gaps(tmp_path):
    # --reserve_patterns: the keys' and values' codes occur only in the patterns, never in the speech,
    # the silence or the cues; --quiz_min_s: every drill event comes back no sooner than that
    from data import CUE_LEN, KEY_LEN
    L, A = 8, 64
    p = str(tmp_path / "r.bin")
    synthetic(p, hours=0.3, min_minutes=3, max_minutes=3, n_codebooks=2, seed=6, quiet=True, events_per_min=6,
              near_share=0.5, pattern_codes=A, value_frames=L, quiz_share=0.5, quiz_min_s=8.0, quiz_max_s=12.0,
              reserve_patterns=True, tied_patterns=True)
    f, events = CodesFile(p), load_events(p)
    in_pattern = [np.zeros(f.lengths[c], bool) for c in range(len(f))]   # [frames] per conversation and stream
    in_pattern = [[m.copy(), m.copy()] for m in in_pattern]
    pattern_codes = [set(), set()]
    for c, s, first, second, _ in events:
        a = np.asarray(f.audio(int(c)))
        for start in (first, second):
            st = [k for k in range(2) if (a[start - KEY_LEN:start + L, k] == a[second - KEY_LEN:second + L, s]).all()]
            assert st, "the pattern is not where the events file says"
            in_pattern[c][st[0]][start - KEY_LEN:start + L] = True
            for k in range(2):
                pattern_codes[k].update(a[start - KEY_LEN:start + L, st[0], k].tolist())
    other = [set(), set()]   # in ordinary conversations (a drill's last patterns may never come back)
    drills = {c for c in range(len(f)) if (events[:, 0] == c).sum() > 30}
    for c in set(range(len(f))) - drills:
        a = np.asarray(f.audio(c))
        for s in range(2):
            for k in range(2):
                other[k].update(a[~in_pattern[c][s], s, k].tolist())
    assert all(len(u) > A // 2 for u in pattern_codes) and all(len(o) > 100 for o in other)
    assert not (pattern_codes[0] & other[0]) and not (pattern_codes[1] & other[1])
    # drills (events back to back) come back 8-12 s later, ordinary conversations' near events from 2 s
    gap = (events[:, 3] - events[:, 2]) / 12.5
    drill = np.isin(events[:, 0], list(drills))
    assert drill.any() and (~drill).any()
    assert (gap[drill] >= 8.0 - 1 / 12.5).all() and np.median(gap[drill]) <= 12.0
    assert (gap[~drill] < 8.0).any()
    # without --reserve_patterns the speech shares the patterns' codes
    q = str(tmp_path / "s.bin")
    synthetic(q, hours=0.3, min_minutes=3, max_minutes=3, n_codebooks=2, seed=6, quiet=True, events_per_min=6,
              near_share=0.5, pattern_codes=A, value_frames=L)
    speech = set(np.asarray(CodesFile(q).audio(0))[:, :, 0].ravel().tolist())
    assert len(speech & pattern_codes_of(q, 0)) > 0


def pattern_codes_of(path, k):
    f, events = CodesFile(path), load_events(path)
    return {int(x) for c, s, _, second, L in events for x in np.asarray(f.audio(int(c)))[second:second + L, s, k]}


def test_tied_patterns(tmp_path):
    # --tied_patterns: a pattern's acoustic codes are a fixed function of its semantic code (one table
    # for the whole file); untied, the same semantic code comes with other acoustic codes
    L = 8
    for tied in (True, False):
        p = str(tmp_path / f"t{tied}.bin")
        synthetic(p, hours=0.2, min_minutes=3, max_minutes=3, n_codebooks=4, seed=5, quiet=True, near_share=1.0,
                  near_max_s=6.0, pattern_codes=16, value_frames=L, quiz_share=1.0, tied_patterns=tied)
        f, events = CodesFile(p), load_events(p)
        seen = {}
        for c, s, first, second, _ in events:
            for frame in np.asarray(f.audio(int(c)))[second:second + L, s]:   # [K], the recalled value
                seen.setdefault(int(frame[0]), set()).add(tuple(int(x) for x in frame[1:]))
        assert len(seen) == 16
        assert all(len(v) == 1 for v in seen.values()) == tied


def test_recall_pilot_runs(tmp_path, capsys):
    # scripts/recall_pilot.py: trains on a drills file and reports recall accuracy (chance-level here:
    # two steps), training and held-out, from windows that hold recalled frames
    import importlib.util
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("recall_pilot", os.path.join(root, "scripts", "recall_pilot.py"))
    pilot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pilot)
    for name, seed in (("d.bin", 0), ("h.bin", 1)):
        synthetic(str(tmp_path / name), hours=0.1, min_minutes=2, max_minutes=2, n_codebooks=1, seed=seed, quiet=True,
                  near_share=1.0, near_max_s=3.0, pattern_codes=16, value_frames=4, quiz_share=1.0, same_speaker=True)
    pilot.main(["--data", str(tmp_path / "d.bin"), "--held", str(tmp_path / "h.bin"), "--steps", "2", "--every", "2",
                "--seq_len", "32", "--batch", "2", "--dim", "64", "--layers", "1"])
    out = capsys.readouterr().out
    assert "recalled" in out and "recall accuracy: training" in out
    acc = [float(x.split()[0].rstrip(",")) for x in out.split("training ")[1:]]
    assert all(0 <= a <= 1 for a in acc)


def test_drill_spacing(tmp_path):
    # --quiz_spacing_s: the speech goes on between a drill's events, that many seconds on average;
    # without it the events follow each other back to back
    from data import CUE_LEN, KEY_LEN
    L = 4
    span = CUE_LEN + KEY_LEN + L
    for spacing in (0.0, 3.0):
        p = str(tmp_path / f"s{spacing}.bin")
        synthetic(p, hours=0.5, min_minutes=3, max_minutes=3, n_codebooks=2, seed=3, quiet=True, value_frames=L,
                  quiz_share=1.0, quiz_min_s=2.0, quiz_max_s=20.0, quiz_spacing_s=spacing)
        f, events = CodesFile(p), load_events(p)
        gaps, speech = [], []
        for c in range(len(f)):
            ev = events[events[:, 0] == c]
            starts = np.unique(np.concatenate([ev[:, 2], ev[:, 3]])) - CUE_LEN - KEY_LEN   # every event's first frame
            gaps += (np.diff(starts) - span).tolist()
            a = np.asarray(f.audio(c))
            for s0, s1 in zip(starts, starts[1:]):   # 1 s or more between: speech, not one silent frame repeated
                if s1 - s0 - span >= 12:
                    speech.append(len(np.unique(a[s0 + span:s1].reshape(s1 - s0 - span, -1), axis=0)) > 1)
        gaps = np.array(gaps) / 12.5   # (a pattern that never comes back, near a drill's end, is not listed)
        if spacing == 0:
            assert np.median(gaps) == 0 and (gaps == 0).mean() > 0.9
        else:
            assert 2.5 < gaps.mean() < 3.8 and 1.6 < np.median(gaps) < 2.8   # exponential: median 3 ln 2 = 2.1
            assert len(speech) > 50 and all(speech)


def test_split_patterns(tmp_path):
    # split_patterns: keys draw from one half of the pattern codes and values from the other, in the
    # drills and in scattered events, with and without tied codebooks; without it both use all of them
    from data import KEY_LEN, pattern_codes
    for tied in (False, True):
        for split in (False, True):
            p = str(tmp_path / f"t{tied}{split}.bin")
            synthetic(p, hours=0.3, min_minutes=3, max_minutes=3, n_codebooks=2, seed=5, quiet=True, value_frames=2,
                      pattern_codes=64, reserve_patterns=True, tied_patterns=tied, split_patterns=split,
                      quiz_share=0.5, quiz_min_s=2.0, quiz_max_s=10.0, events_per_min=2, same_speaker=True)
            f, events = CodesFile(p), load_events(p)
            keys, values = set(), set()
            for c, s, first, recall, L in events:
                a = np.asarray(f.audio(c))[:, s, 0]       # the semantic codebook
                for t in (first, recall):
                    keys.update(a[t - KEY_LEN:t].tolist())
                    values.update(a[t:t + L].tolist())
            assert len(events) > 100 and len(keys) > 20 and len(values) > 20
            assert (not keys & values) == split, (tied, split, len(keys & values))
            assert pattern_codes(p) == (32 if split else 64)              # what the values draw from: chance 1/that


def test_seed_reaches_both_training_phases():
    sc = json.loads(json.dumps(experiment.SCALES["gpu-reach"]))
    for want, seed in ((experiment.SEED, None), (7, 7)):
        if seed is not None:
            sc["seed"] = experiment.parse_args(["--seed", str(seed)]).seed
        for argv in (experiment.warmup_argv(sc, "ttt_linear", "d.bin", "w"),
                     experiment.train_argv(sc, "ttt_linear", "t.bin", "r")):
            assert [x for x in argv if x.startswith("--seed=")] == [f"--seed={want}"]


def test_several_seeds(tmp_path, one_thread):
    # --seeds: each variant trained once per seed on the same data, its own run folder and rows, and a
    # table of each variant's spread over the seeds
    out = str(tmp_path / "exp")
    experiment.main(["--scale", "cpu-test", "--out", out, "--variants", "window,ttt_linear", "--seeds", "3,5",
                     "--gen_minutes", "0"])
    with open(os.path.join(out, "results.json")) as f:
        res = json.load(f)
    labels = ["window_seed3", "ttt_linear_seed3", "window_seed5", "ttt_linear_seed5"]
    assert res["seeds"] == [3, 5] and list(res["eval"]) == labels
    for lab in labels:   # each run trained with its own seed: another initial model
        with open(os.path.join(out, "runs", lab, "train.log")) as f:
            assert f"--seed={lab[-1]}" in f.readline()
    w3, w5 = (SpeechLM.from_checkpoint(os.path.join(out, "runs", f"window_seed{s}")).state_dict() for s in (3, 5))
    assert any(not torch.equal(w3[k], w5[k]) for k in w3)
    with open(os.path.join(out, "summary.md")) as f:
        md = f.read()
    assert all(f"| {lab} |" in md for lab in labels) and "Over 2 seeds (3, 5" in md
    for v in ("window", "ttt_linear"):
        row = next(line for line in md.splitlines() if line.startswith(f"| {v} (2 seeds) |"))
        xs = [float(np.mean(res["eval"][f"{v}_seed{s}"]["loss_by_minute"]["loss"][:5])) for s in (3, 5)]
        col = 1 + [c for c, _ in experiment.SEED_FIGURES].index("loss min 1-5")
        cell = row.split(" | ")[col]
        assert cell == f"{sum(xs) / 2:.3f} ({min(xs):.3f} - {max(xs):.3f}); {xs[0]:.3f}, {xs[1]:.3f}", cell
    with pytest.raises(SystemExit):
        experiment.parse_args(["--seeds", "1,1"])


def test_generation_sampling_reaches_the_evaluation(tmp_path, one_thread):
    # --temp / --top_k: the experiment's generations can sample the models' own distribution
    out = str(tmp_path / "exp")
    experiment.main(["--scale", "cpu-test", "--out", out, "--variants", "window", "--temp", "1.0", "--top_k", "0"])
    with open(os.path.join(out, "runs", "window", "eval.json")) as f:
        g = json.load(f)["generation"]
    assert (g["temp"], g["top_k"]) == (1.0, 0) and g["frames"] > 0


def test_speech_frames_leave_out_every_event(tmp_path, one_thread):
    p = str(tmp_path / "s.bin")
    synthetic(p, hours=3 / 60, min_minutes=3, max_minutes=3, n_codebooks=2, seed=4, quiet=True,
              events_per_min=6.0, near_share=0.75, near_max_s=10.0)
    f, events = CodesFile(p), load_events(p)
    L = int(f.lengths[0])
    assert len(events) >= 10
    want = np.ones(L, bool)        # by hand: cue (2 frames), key (2) and value of both mentions, 1 frame after
    for _, _, first, recall, vlen in events:
        for v in (first, recall):
            want[v - 4:v + vlen + 1] = False
    spans = evaluate.event_spans(events, [0], pad=1)
    got = np.concatenate([evaluate.speech_frames(spans, np.ones((1, min(7, L - s)), bool), s)[0]
                          for s in range(0, L, 7)])   # chunks of 7 frames: spans cross their edges
    np.testing.assert_array_equal(got, want)
    # the loss pass counts those frames alone in its speech sums (column 0 has no delay)
    m = _tiny()
    r = evaluate.stream_eval(m, f, events, [0], chunk_len=64)
    assert r["n_speech"][:, 0].sum() == want.sum() < r["n_min"][:, 0].sum()
    assert (r["ce_speech"] <= r["ce_min"] + 1e-9).all()


def test_forget_gate_statistics(tmp_path, one_thread):
    # evaluate's forget-gate report: the exponents at the mini-batches' ends, chunked as the loss pass goes,
    # equal those of one pass over the whole conversation, split by speech and elsewhere as speech_frames does
    p = str(tmp_path / "h.bin")
    synthetic(p, hours=2 / 60, min_minutes=2, max_minutes=2, n_codebooks=2, seed=6, quiet=True, events_per_min=4.0)
    m = _tiny(ttt_half_life=40, ttt_forget_gate=True)
    with torch.no_grad():
        for b in m.layers:
            if b.ttt is not None:
                b.ttt.layer.forget_weight.normal_(0, 1.0)
    f, events = CodesFile(p), load_events(p)
    L = int(f.lengths[0])
    r = evaluate.stream_eval(m, f, events, [0], chunk_len=40)   # chunks that start mid-mini-batch
    got = evaluate.gate_stats([b.ttt.layer for b in m.layers if b.ttt is not None], r["forget_gates"])
    assert len(got) == m.cfg.n_ttt
    seen = {}
    hooks = [b.ttt.layer.register_forward_pre_hook(lambda mod, a, j=j: seen.__setitem__(j, mod.forget_gate(a[0])))
             for j, b in enumerate(blk for blk in m.layers if blk.ttt is not None)]
    x, live = evaluate.chunk(f, [0], 0, L, m.cfg.col_delays(), m.cfg.col_cards())
    with torch.no_grad():
        m(torch.from_numpy(x), m.init_state(1))
    for h in hooks:
        h.remove()
    speech = evaluate.speech_frames(evaluate.event_spans(events, [0], max(m.cfg.col_delays())), live, 0)[0]
    ends = np.arange(15, L, 16)
    for j, g in enumerate(got):
        s = seen[j][0][:, ends].numpy()                                  # [H, ends]
        want = np.quantile(s.ravel(), [.01, .1, .5, .9, .99])
        np.testing.assert_allclose(g["s"], want, rtol=1e-5)
        np.testing.assert_allclose(g["mean_speech"], s[:, speech[ends]].mean(), rtol=1e-5)
        np.testing.assert_allclose(g["mean_other"], s[:, ~speech[ends]].mean(), rtol=1e-5)
        assert want[0] < 0.5 < 2 < want[-1]   # the gate depends on the input here
        assert abs(g["half_life_s"] - 40 / 12.5) < 1e-9


def _script(name):
    """A module of scripts/ (they are not a package)."""
    import importlib.util
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location(name, os.path.join(root, "scripts", name + ".py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_state_by_minute_script(tmp_path, one_thread, capsys):
    # scripts/state_by_minute.py: its speech loss by minute is evaluate.py's, and it sees the fast
    # weights move (a model without TTT has none to report)
    sbm = _script("state_by_minute")
    p = str(tmp_path / "h.bin")
    synthetic(p, hours=2 / 60, min_minutes=2, max_minutes=2, n_codebooks=2, seed=5, quiet=True, events_per_min=4.0)
    ttt, window = _tiny(ttt_base_lr=10.0), _tiny(n_ttt=0)
    for name, m in (("ttt", ttt), ("window", window)):
        m.save(str(tmp_path / f"{name}.safetensors"))
    out = sbm.main(["--data", p, "--ckpt", str(tmp_path / "ttt.safetensors"), "--ckpt",
                    str(tmp_path / "window.safetensors"), "--blocks", "1-1,2-2"])
    assert "| 2-2 |" in capsys.readouterr().out
    f, events = CodesFile(p), load_events(p)
    r = evaluate.stream_eval(ttt, f, events, [0], chunk_len=64)
    want = evaluate.minute_losses(r["ce_speech"], r["n_speech"], ttt.cfg)["loss"]
    np.testing.assert_allclose(out["ttt"]["loss"], want, rtol=1e-5)
    moved = np.array(out["ttt"]["moved"])
    assert moved.shape == (ttt.cfg.n_ttt, 2) and (moved > 0).all() and (moved[:, 1] > moved[:, 0]).all()
    assert (np.array(out["ttt"]["moved_all"]) >= moved * 0.5).all()
    turned = np.array(out["ttt"]["turned"])
    assert (abs(turned[:, 0]) < 1e-6).all() and (turned[:, 1] > 1e-4).all()    # since the first block's end (minute 1)
    # the first minute starts fresh anyway; the second differs from a memory reset at its start
    assert out["ttt"]["fresh"][0] == pytest.approx(out["ttt"]["loss"][0], rel=1e-6)
    assert abs(out["ttt"]["fresh"][1] - out["ttt"]["loss"][1]) > 2e-5   # float32 noise: about 1e-6
    assert out["window"]["moved"] == [] and out["window"]["fresh"] == out["window"]["loss"]
    # fast weights that never move: a reset changes nothing, so long as it keeps the place in the mini-batch
    still = _tiny(ttt_base_lr=0.0)
    still.save(str(tmp_path / "still.safetensors"))
    got = sbm.main(["--data", p, "--ckpt", str(tmp_path / "still.safetensors"), "--blocks", "1-1,2-2"])["still"]
    np.testing.assert_allclose(got["fresh"], got["loss"], rtol=1e-6)
    assert max(got["moved"][0]) < 1e-6
    # the second minute's fresh loss, made here: the state after minute 1 with its TTT part reset
    cfg, T = ttt.cfg, evaluate.FRAMES_PER_MINUTE
    (x1, _), (x2, live2) = (evaluate.chunk(f, [0], s, T, cfg.col_delays(), cfg.col_cards()) for s in (0, T))
    spans = evaluate.event_spans(events[events[:, 0] == 0], [0], max(cfg.col_delays()))
    speech = torch.from_numpy(evaluate.speech_frames(spans, live2, T))
    with torch.no_grad():
        state = ttt(torch.from_numpy(x1), ttt.init_state(1))[1]
        reset = state._replace(ttt=tuple(s._replace(params=z.params, grads=z.grads)
                                         for s, z in zip(state.ttt, ttt.init_state(1).ttt)))
        ce, cnt, _ = sbm._loss_sums(ttt, torch.from_numpy(x2), reset, speech)
    assert evaluate.minute_losses(ce[None], cnt[None], cfg)["loss"][0] == pytest.approx(out["ttt"]["fresh"][1], rel=1e-6)
    twice = sbm.main(["--data", p, "--ckpt", str(tmp_path / "ttt.safetensors"), "--ckpt", str(tmp_path / "ttt.safetensors"),
                      "--blocks", "1-1"])   # two checkpoints of one name: the second under its path
    assert list(twice) == ["ttt", str(tmp_path / "ttt.safetensors")] and twice["ttt"] == twice[str(tmp_path / "ttt.safetensors")]
    with pytest.raises(SystemExit):
        sbm.main(["--data", p, "--ckpt", str(tmp_path / "ttt.safetensors"), "--device", "nodevice"])


def test_heldout_noise_script(tmp_path, one_thread, capsys):
    # scripts/heldout_noise.py: each group's loss by minute is evaluate.py's on those conversations alone,
    # and "all" weighs every frame alike (evaluate.py's over all of them), not the groups' mean
    hn = _script("heldout_noise")
    p = str(tmp_path / "h.bin")
    synthetic(p, hours=6 / 60, min_minutes=2, max_minutes=2, n_codebooks=2, seed=5, quiet=True, events_per_min=4.0)
    m = _tiny(n_ttt=0)
    m.save(str(tmp_path / "w.safetensors"))
    out = hn.main(["--ckpt", str(tmp_path / "w.safetensors"), "--data", p, "--group", "2", "--block", "1", "--chunk", "64"])
    assert list(out) == ["conversations 0-1", "conversations 2-2", "all 3", "spread"]
    f, events = CodesFile(p), load_events(p)
    for name, convs in (("conversations 0-1", [0, 1]), ("conversations 2-2", [2]), ("all 3", [0, 1, 2])):
        r = evaluate.stream_eval(m, f, events[np.isin(events[:, 0], convs)], convs, chunk_len=64)
        want = evaluate.minute_losses(r["ce_speech"], r["n_speech"], m.cfg)["loss"]
        np.testing.assert_allclose(out[name]["loss"], want, rtol=1e-5)
    groups = np.array([out["conversations 0-1"]["loss"], out["conversations 2-2"]["loss"]])
    assert np.abs(np.array(out["all 3"]["loss"]) - groups.mean(0)).max() > 1e-4   # 2 rows against 1
    d = out["all 3"]
    assert d["last"] == d["loss"][-1] and d["minute4"] == d["loss"][-1]   # 2 minutes: minute 4 is the last
    assert d["blocks_spread"] == pytest.approx(abs(d["loss"][1] - d["loss"][0]))
    assert "| all 3 |" in capsys.readouterr().out
    sil = evaluate.most_common_frame(f)
    assert out["spread"]["conversations 0-1"] == evaluate.reference_stats(f, [0, 1], sil)["spread"]
    assert out["spread"]["all 3"] == evaluate.reference_stats(f, [0, 1, 2], sil)["spread"]
    with pytest.raises(SystemExit):
        hn.main(["--ckpt", str(tmp_path / "w.safetensors"), "--data", p, "--group", "0"])
    with pytest.raises(SystemExit):
        hn.main(["--ckpt", str(tmp_path / "nothing.safetensors"), "--data", p])


def test_reference_spread_and_within_spread(tmp_path):
    # the spread is taken over every whole minute of every conversation, a partial last minute left out
    p = str(tmp_path / "r.bin")
    synthetic(p, hours=5.5 / 60, min_minutes=2.5, max_minutes=3.0, n_codebooks=2, seed=6, quiet=True)
    f = CodesFile(p)
    convs = list(range(len(f)))
    sil = evaluate.most_common_frame(f)
    ref = evaluate.reference_stats(f, convs, sil)
    whole = []
    for c in convs:
        st = evaluate.FrameStats(sil)
        st.add(np.asarray(f.audio(c), np.int64))
        got = st.close()
        assert len(got["turns"]) == math.ceil(f.lengths[c] / 750)
        whole.append({k: v[:int(f.lengths[c]) // 750] for k, v in got.items()})
    assert any(f.lengths[c] % 750 for c in convs)    # some conversation ends in a partial minute
    for k in evaluate.STATS:
        want = np.percentile([x for w in whole for x in w[k]], evaluate.SPREAD)
        np.testing.assert_allclose(ref["spread"][k], want, rtol=1e-12)
    lo, hi = ref["spread"]["turns"]
    g = {k: [ref["spread"][k][0]] for k in evaluate.STATS}
    assert all(evaluate.within_spread(g, ref).values())          # the bounds are inside
    g["turns"] = [hi + 1e-6]
    assert evaluate.within_spread(g, ref) == {**{k: True for k in evaluate.STATS}, "turns": False}
    # a generation inside at its first minute and outside at its last: the two checks tell them apart
    g = {k: [ref["spread"][k][0], ref["spread"][k][1]] for k in evaluate.STATS}
    g["turns"] = [lo, hi + 1]
    assert all(evaluate.within_spread(g, ref, 0).values())
    assert evaluate.within_spread(g, ref) == {**{k: True for k in evaluate.STATS}, "turns": False}


def test_evaluate_bad_inputs(tmp_path, capsys):
    # each a clear error that names the option, before the model or the data is read
    p = str(tmp_path / "c.bin")
    synthetic(p, hours=0.5 / 60, min_minutes=0.5, max_minutes=0.5, n_codebooks=2, seed=1, quiet=True)
    ck = str(tmp_path / "m.safetensors")
    _tiny().save(ck)
    base = ["--ckpt", ck, "--data", p, "--device", "cpu", "--quiet", "--out", str(tmp_path / "e.json")]
    for extra, msg in [(["--gen_minutes", "-1"], "--gen_minutes, --gen_budget_s and --conversations must be 0 or more"),
                       (["--gen_budget_s", "-5"], "must be 0 or more"),
                       (["--temp", "-0.5"], "--temp and --top_k must be 0 or more"),
                       (["--top_k", "-1"], "--temp and --top_k must be 0 or more"),
                       (["--chunk", "0"], "--chunk and --batch must be at least 1"),
                       (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "gpu"],
                        "torch sees no CUDA device" if not torch.cuda.is_available() else "unknown device")]:
        with pytest.raises(SystemExit) as e:
            evaluate.main(base + extra)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err, (extra, err)
    assert not os.path.exists(tmp_path / "e.json")


def test_ttt_lr_scale(tmp_path, capsys):
    # evaluate.py --ttt_lr_scale: the TTT layers' inner steps scaled at evaluation; 1 is the model as trained
    p = str(tmp_path / "c.bin")
    synthetic(p, hours=1 / 60, min_minutes=1, max_minutes=1, n_codebooks=2, seed=1, quiet=True)
    ck = str(tmp_path / "m.safetensors")
    m = _tiny()
    assert any(b.ttt is not None for b in m.layers)
    m.save(ck)
    base = ["--ckpt", ck, "--data", p, "--device", "cpu", "--quiet", "--gen_minutes", "0"]
    loss = {}
    for s in ("1", "0.25", "0"):
        out = str(tmp_path / f"e{s}.json")
        evaluate.main(base + ["--out", out] + (["--ttt_lr_scale", s] if s != "1" else []))
        with open(out) as f:
            r = json.load(f)
        assert r["ttt_lr_scale"] == float(s)
        loss[s] = r["loss_by_minute"]["loss"][0]
    assert len(set(loss.values())) == 3, loss
    # scale 0: the fast weights stay at their start, as a model whose every TTT call gets a fresh state
    m0 = _tiny()
    for b in m0.layers:
        if b.ttt is not None:
            b.ttt.layer.base_lr = 0.0
    f = CodesFile(p)
    x = torch.from_numpy(evaluate.chunk(f, [0], 0, 40, m0.cfg.col_delays(), m0.cfg.col_cards())[0])
    with torch.no_grad():
        st = m0.init_state(1)
        _, st = m0(x[:, :20], st)
        for s_new, s_old in zip(m0.init_state(1).ttt, st.ttt):
            assert torch.equal(s_new.params[0], s_old.params[0])
    for extra, msg in [(["--ttt_lr_scale", "-1"], "--ttt_lr_scale must be 0 or more")]:
        with pytest.raises(SystemExit):
            evaluate.main(base + ["--out", str(tmp_path / "x.json")] + extra)
        assert msg in capsys.readouterr().err
    _refused_without_ttt(tmp_path, p, capsys, ["--ttt_lr_scale", "0.5"])


def _refused_without_ttt(tmp_path, data, capsys, flag):
    ck = str(tmp_path / "w.safetensors")
    _tiny(n_ttt=0).save(ck)
    with pytest.raises(SystemExit):
        evaluate.main(["--ckpt", ck, "--data", data, "--device", "cpu", "--quiet", "--gen_minutes", "0",
                       "--out", str(tmp_path / "y.json"), *flag])
    err = capsys.readouterr().err
    assert f"{' '.join(flag)}: " in err and "has no TTT layer" in err, err


def test_ttt_half_life_at_evaluation(tmp_path, capsys):
    # evaluate.py --ttt_half_life_s: fast weights that forget, on a model trained without; 0 is never
    p = str(tmp_path / "c.bin")
    synthetic(p, hours=1 / 60, min_minutes=1, max_minutes=1, n_codebooks=2, seed=1, quiet=True)
    ck = str(tmp_path / "m.safetensors")
    _tiny().save(ck)
    base = ["--ckpt", ck, "--data", p, "--device", "cpu", "--quiet", "--gen_minutes", "0"]
    loss = {}
    for s in (None, "0", "3", "0.5"):
        out = str(tmp_path / f"e{s}.json")
        evaluate.main(base + ["--out", out] + (["--ttt_half_life_s", s] if s is not None else []))
        with open(out) as f:
            r = json.load(f)
        assert r["ttt_half_life_s"] == float(s or 0)
        loss[s] = r["loss_by_minute"]["loss"][0]
    assert loss[None] == loss["0"] and len({loss["0"], loss["3"], loss["0.5"]}) == 3, loss
    with pytest.raises(SystemExit):
        evaluate.main(base + ["--out", str(tmp_path / "x.json"), "--ttt_half_life_s", "-1"])
    assert "--ttt_half_life_s must be 0" in capsys.readouterr().err
    _refused_without_ttt(tmp_path, p, capsys, ["--ttt_half_life_s", "5"])
    # a model with learnt half-lives: the results hold them, one list a TTT layer [heads][features], in seconds
    m = _tiny().set_ttt_half_life(2, 200)
    m.save(ck)
    out = str(tmp_path / "learnt.json")
    capsys.readouterr()
    evaluate.main(base + ["--out", out])
    with open(out) as f:
        r = json.load(f)
    hl = [torch.tensor(h) for h in r["ttt_learnt_half_lives_s"]]
    want = [b.ttt.layer.half_lives() * 60 / 750 for b in m.layers if b.ttt is not None]
    assert r["ttt_half_life_s"] is None and len(hl) == len(want) >= 1
    assert all(h.shape == w.shape and (h - w).abs().max() < 1e-4 for h, w in zip(hl, want))
    assert "TTT layer 1: learnt half-lives, s: min 0.16, " in capsys.readouterr().out


def test_gpu_assignment_mixes_variants():
    runs = [(v, s) for s in (1, 2, 3, 4) for v in ("window", "ttt_linear")]
    g = experiment.assign_gpus(runs, ["window", "ttt_linear"], [1, 2, 3, 4], ["0", "1", "2", "3"])
    for gpu in "0123":   # each GPU one run of each variant
        assert sorted(v for (v, _), x in g.items() if x == gpu) == ["ttt_linear", "window"]
    # one seed, 2 GPUs: the slowest variant shares its GPU with the fastest
    v3 = ["window", "ttt_linear", "ttt_mlp"]
    g = experiment.assign_gpus([(v, 0) for v in v3], v3, [0], ["0", "1"])
    assert g[("ttt_mlp", 0)] == g[("window", 0)] != g[("ttt_linear", 0)]
    assert set(experiment.assign_gpus(runs, ["window", "ttt_linear"], [1, 2, 3, 4], []).values()) == {None}


def test_scale_overrides_reach_the_runs(tmp_path, one_thread):
    # --train_hours and --ttt_base_lr: the training data's size and the model's inner learning rate
    out = str(tmp_path / "exp")
    experiment.main(["--scale", "cpu-test", "--out", out, "--variants", "ttt_linear", "--train_hours", "0.1",
                     "--ttt_base_lr", "0.25", "--gen_minutes", "0", "--quiz_share", "0"])
    f = CodesFile(os.path.join(out, "data", "train.bin"))
    hours = f.lengths.sum() / 12.5 / 3600
    assert 0.09 < hours < 0.12, hours      # the scale's own is 0.25
    # --quiz_share 0: no drills (events back to back) among the training conversations, only the
    # scale's 6 events a minute; the held-out drills stay drills
    per_min = np.bincount(load_events(os.path.join(out, "data", "train.bin"))[:, 0], minlength=len(f)) / (f.lengths / 750)
    assert per_min.max() < 12, per_min
    assert len(load_events(experiment.drills_path(out))) / (CodesFile(experiment.drills_path(out)).lengths.sum() / 750) > 12
    assert SpeechLM.from_checkpoint(os.path.join(out, "runs", "ttt_linear")).cfg.ttt_base_lr == 0.25
    for bad in (["--train_hours", "-1"], ["--ttt_base_lr", "-0.5"], ["--quiz_share", "1.5"], ["--quiz_share", "-0.2"]):
        with pytest.raises(SystemExit):
            experiment.parse_args(bad)


def _warm_up_then_stream(tmp_path, variants, *flags):
    """cpu-test with the drills warm-up and the given streaming-phase flags: the output folder, the TTT
    run's folder, and its warm-up's and final models."""
    out = str(tmp_path / "exp")
    experiment.main(["--scale", "cpu-test", "--out", out, "--variants", variants, "--warmup_drills", "2",
                     *flags, "--gen_minutes", "0"])
    run = os.path.join(out, "runs", "ttt_linear")
    return out, run, *(SpeechLM.from_checkpoint(p) for p in (os.path.join(run, "warmup"), run))


def test_learnt_half_lives_in_the_streaming_phase(tmp_path, one_thread):
    # --stream_ttt_half_life_max_s: the warm-up without forgetting, the streaming phase with learnt half-lives
    # (new weights, made from the warm-up's model), evaluated with them; the summary shows them. With
    # --stream_ttt_forget_gate, a forget gate too, whose exponents the evaluation reports
    out, run, warm, final = _warm_up_then_stream(tmp_path, "ttt_linear", "--stream_ttt_half_life_s", "2",
                                                 "--stream_ttt_half_life_max_s", "60", "--stream_ttt_forget_gate",
                                                 "--stream_ttt_half_life_lr_mult", "4")
    with open(os.path.join(run, "train.log")) as fh:   # their own step size, in this phase alone
        assert "--ttt_half_life_lr_mult=4.0" in fh.readline()
    with open(os.path.join(run, "warmup", "train.log")) as fh:
        assert "lr_mult" not in fh.readline()
    assert warm.cfg.ttt_half_life_max == 0 and final.cfg.ttt_half_life_range() == (25, 750)
    assert all(b.ttt.layer.log_half_life is None and b.ttt.layer.forget_weight is None
               for b in warm.layers if b.ttt is not None)
    assert final.cfg.ttt_forget_gate and all(b.ttt.layer.gates() for b in final.layers if b.ttt is not None)
    with open(os.path.join(run, "eval.json")) as fh:
        r = json.load(fh)
    hl = r["ttt_learnt_half_lives_s"]
    assert len(hl) == final.cfg.n_ttt and 1.5 < min(min(min(h) for h in layer) for layer in hl) < 2.5
    gates = r["forget_gates"]   # a new gate starts at s = 1 (cpu-test's one mini-batch a step gives it no gradient)
    assert len(gates) == final.cfg.n_ttt
    for g, blk in zip(gates, [b for b in final.layers if b.ttt is not None]):
        assert g["s"] == [1.0] * 5 and g["mean_speech"] == 1.0
        assert abs(g["half_life_s"] - float(blk.ttt.layer.half_lives().median()) / 12.5) < 1e-6   # the median learnt one
    with open(os.path.join(out, "summary.md")) as fh:
        text = fh.read()
    assert "Learnt half-lives of the fast weights" in text and "| ttt_linear | 1 |" in text
    assert "Forget gates" in text
    # the warm-up's evaluations reach results.json (cpu-test's 16-frame windows hold no whole drill: no recall
    # to show, no table); with a recall at each of 12 evaluations the summary shows ten, the first and the last
    # among them, and the first step at 0.5
    with open(os.path.join(out, "results.json")) as fh:
        res = json.load(fh)
    assert [e["step"] for e in res["eval"]["ttt_linear"]["warmup_evals"]] == [2]
    assert "Drills warm-up" not in text
    res["eval"]["ttt_linear"]["warmup_evals"] = [{"step": 100 * i, "val_loss": 3.0, "val_recall": 0.1 * i,
                                                  "val_recall_codes": 50, "val_recall_beyond": 0.05 * i}
                                                 for i in range(1, 13)]
    res["eval"]["ttt_linear"]["warmup_evals"][-1]["train_recall"] = 0.975
    text = experiment.summary(experiment.parse_args(["--scale", "cpu-test"]), res["eval"], res["train_losses"])
    row = next(r for r in text.splitlines() if r.startswith("| ttt_linear | 100: "))
    assert row.count(": ") == 10 and "100: 0.100 (0.050)" in row and "1200: 1.200 (0.600)" in row
    assert row.endswith("| 1000 | 0.975 |")   # the first step at 0.5 beyond the window; the training drills
    for bad in (["--stream_ttt_forget_gate"], ["--stream_ttt_half_life_s", "2", "--stream_ttt_half_life_lr_mult", "3"],
                ["--stream_ttt_half_life_s", "2", "--stream_ttt_half_life_max_s", "60", "--stream_ttt_half_life_lr_mult", "-1"]):
        with pytest.raises(SystemExit):
            experiment.parse_args(bad)


def test_streaming_phase_inner_step(tmp_path, one_thread):
    # --stream_ttt_base_lr: the drills warm-up at the model's inner step, the streaming phase (and so the
    # evaluated model) at another; a model without TTT trains as before
    out, run, warm, final = _warm_up_then_stream(tmp_path, "window,ttt_linear", "--stream_ttt_base_lr", "0.3",
                                                 "--stream_ttt_half_life_s", "2", "--stream_ttt_write_penalty", "0.5",
                                                 "--stream_ttt_update_penalty", "0.2", "--stream_ttt_update_penalty_power", "2")
    # --stream_ttt_write_penalty: the streaming phase of the TTT model alone
    logs = {k: open(os.path.join(out, "runs", *k.split("/"), "train.log")).read()
            for k in ("ttt_linear", "ttt_linear/warmup", "window")}
    assert "--ttt_write_penalty=0.5" in logs["ttt_linear"] and " writ " in logs["ttt_linear"]
    assert "ttt_write_penalty" not in logs["ttt_linear/warmup"] + logs["window"]
    assert "--ttt_update_penalty=0.2" in logs["ttt_linear"] and " upda " in logs["ttt_linear"]   # and --stream_ttt_update_penalty
    assert "--ttt_update_penalty_power=2.0" in logs["ttt_linear"]
    assert "ttt_update_penalty" not in logs["ttt_linear/warmup"] + logs["window"]
    assert warm.cfg.ttt_base_lr == 1.0 and final.cfg.ttt_base_lr == 0.3
    assert all(b.ttt.layer.base_lr == 0.3 for b in final.layers if b.ttt is not None)
    # --stream_ttt_half_life_s: forgetting in the streaming phase alone, 2 s = 25 frames
    assert warm.cfg.ttt_half_life == 0 and final.cfg.ttt_half_life == 25
    assert all(b.ttt.layer.decay == 1.0 for b in warm.layers if b.ttt is not None)
    assert all(abs(b.ttt.layer.decay - 0.5 ** (16 / 25)) < 1e-12 for b in final.layers if b.ttt is not None)
    with open(os.path.join(run, "eval.json")) as fh:
        assert json.load(fh)["ttt_half_life_s"] == 2.0
    for bad in (["--stream_ttt_half_life_s", "-3"], ["--stream_ttt_write_penalty", "-1"], ["--stream_ttt_update_penalty", "-1"],
                ["--stream_ttt_update_penalty_power", "2"], ["--stream_ttt_update_penalty", "1", "--stream_ttt_update_penalty_power", "0"]):
        with pytest.raises(SystemExit):
            experiment.parse_args(bad)
    for bad in (["--stream_ttt_half_life_max_s", "60"], ["--stream_ttt_half_life_s", "90", "--stream_ttt_half_life_max_s", "60"]):
        with pytest.raises(SystemExit):
            experiment.parse_args(bad)
    assert os.path.exists(os.path.join(out, "runs", "window", "eval.json"))
    m = SpeechLM.from_checkpoint(os.path.join(out, "runs", "window"))
    with pytest.raises(ValueError, match="no TTT layer"):
        m.set_ttt_base_lr(0.5)
    with pytest.raises(ValueError, match="0 or more"):
        final.set_ttt_base_lr(-1)


def test_paired_speech_cancels_the_data(tmp_path):
    # each model against the window model of its seed: the held-out data's minute-to-minute changes (shared by
    # both) cancel, a model's own drift stays; models without a window partner are left out
    rng = np.random.default_rng(0)
    data = 3.7 + 0.05 * rng.standard_normal(90)               # the data's difficulty by minute
    drift = np.linspace(0, 0.3, 90)                            # a model whose loss rises over 90 minutes
    mk = lambda sp: {"loss_by_minute": {"speech": list(sp)}}
    results = {"window_seed7": mk(data), "ttt_linear_seed7": mk(data - 0.1 + drift), "ttt_mlp_seed7": mk(data - 0.2),
               "ttt_linear_seed11": mk(data)}   # (no window model of seed 11)
    lines = experiment.paired_speech(results)
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in lines if line.startswith("| ") and "seed" in line}
    assert set(rows) == {"window_seed7", "ttt_linear_seed7", "ttt_mlp_seed7"}
    lin = [float(c.strip(" |")) for c in rows["ttt_linear_seed7"]]
    np.testing.assert_allclose(lin[4:8], [-0.1 + drift[3], -0.1 + 0.3, -0.1 + drift[:5].mean(), -0.1 + drift[85:].mean()],
                               atol=6e-4)
    np.testing.assert_allclose(lin[8], drift[85:].mean() - drift[:5].mean(), atol=1e-3)
    np.testing.assert_allclose([float(c.strip(" |")) for c in rows["ttt_mlp_seed7"]][4:9], [-0.2] * 4 + [0.0], atol=6e-4)
    blocks = [data[i:i + 5].mean() for i in range(0, 90, 5)]
    assert rows["window_seed7"][4] == f"blocks: {max(blocks) - min(blocks):.3f}"
    assert experiment.paired_speech({"window": mk(data)}) == [] and experiment.window_partner("window", results) is None


def test_generation_temps_script(tmp_path, one_thread, capsys):
    # scripts/generation_temps.py: a generation per temperature, read against the held-out data's spread
    # (evaluate.py's), and what lies outside it in the first and last minutes
    gt = _script("generation_temps")
    p = str(tmp_path / "h.bin")
    synthetic(p, hours=2 / 60, min_minutes=2, max_minutes=2, n_codebooks=2, seed=5, quiet=True)
    m = _tiny()
    m.save(str(tmp_path / "m.safetensors"))
    out = str(tmp_path / "g.json")
    runs = gt.main(["--ckpt", str(tmp_path / "m.safetensors"), "--data", p, "--temps", "0.5,1", "--minutes", "2",
                    "--first", "1", "--out", out])
    text = capsys.readouterr().out
    assert set(runs) == {"0.5", "1.0"} and all(len(g["minute"]) == 2 for g in runs.values())
    assert "| 0.5 | off | 1 | 2 |" in text and "| 1 | off | 1 | 2 |" in text
    with open(out) as fh:
        saved = json.load(fh)
    f = CodesFile(p)
    ref = evaluate.reference_stats(f, [0], evaluate.most_common_frame(f, 0))
    assert saved["reference"]["spread"] == ref["spread"]
    g = {k: [0.0, 1.0] for k in evaluate.STATS}          # the mean of minutes lo..hi-1 against the spread
    spread = {k: [0.4, 0.6] for k in evaluate.STATS}
    assert gt.outside(g, spread, 0, 2) == [] and gt.outside(g, spread, 0, 1) == list(evaluate.STATS)
    runs = gt.main(["--ckpt", str(tmp_path / "m.safetensors"), "--data", p, "--temps", "1", "--top_ps", "0.5,1",
                    "--minutes", "1"])   # top-p, each with each temperature: a narrower sampler, lower entropy
    assert set(runs) == {"1.0, top-p 0.5", "1.0, top-p 1.0"}
    assert runs["1.0, top-p 0.5"]["entropy"][0] < runs["1.0, top-p 1.0"]["entropy"][0]
    for bad in (["--temps", "a,b"], ["--minutes", "0"], ["--temps", "-1"], ["--top_ps", "0"], ["--top_ps", "1.5"]):
        with pytest.raises(SystemExit):
            gt.parse_args(["--ckpt", "x", "--data", "y", *bad])


def test_half_life_gradients_script(tmp_path, one_thread, capsys):
    # scripts/half_life_gradients.py: each chunk's gradient with respect to the log-half-lives, the state
    # carried between chunks and not differentiated through; a model without learnt half-lives is refused
    hg = _script("half_life_gradients")
    p = str(tmp_path / "h.bin")
    synthetic(p, hours=2 / 60, min_minutes=1, max_minutes=1, n_codebooks=2, seed=5, quiet=True)
    m = _tiny(ttt_half_life=8, ttt_half_life_max=80)
    f = CodesFile(p)
    g, hl = hg.chunk_gradients(m, f, 40, 3, 2, "cpu")
    assert g.shape == (3, m.cfg.n_ttt, *hl[0].shape) and torch.isfinite(g).all() and g.abs().max() > 0
    layers = [b.ttt.layer for b in m.layers if b.ttt is not None]
    sampler = StreamSampler(f, list(range(len(f))), 40, 2, m.cfg.col_delays(), m.cfg.col_cards(), seed=0)
    x0, _ = sampler.next()
    x1, _ = sampler.next()
    _, st = m(torch.from_numpy(x0), m.init_state(2))        # chunk 2 by hand: from chunk 1's state, detached
    x1 = torch.from_numpy(x1)
    loss, _ = loss_fn(m(x1, detach_state(st))[0], x1, m.cfg)
    want = torch.autograd.grad(loss, [t.log_half_life for t in layers])
    for got, w in zip(g[1], want):
        torch.testing.assert_close(got, w.double(), rtol=1e-5, atol=1e-9)
    m.save(str(tmp_path / "m.safetensors"))
    rows = hg.main(["--ckpt", str(tmp_path / "m.safetensors"), "--data", p, "--chunk", "40", "--chunks", "3",
                    "--batch", "2", "--groups", "2"])
    assert len(rows) == 2 * m.cfg.n_ttt and all(r["n"] > 0 for r in rows)
    _tiny().save(str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="no learnt half-lives"):
        hg.main(["--ckpt", str(tmp_path / "plain.safetensors"), "--data", p, "--chunk", "16", "--chunks", "2"])


@pytest.mark.parametrize("gate", [False, True])
def test_token_steps_are_the_inner_gradients(gate):
    # write_rates.token_steps: ||tau_last lr_t g_t|| / ||W_0|| with g_t the inner gradient (autograd here) at
    # the weights its mini-batch starts from, for a call that starts mid-mini-batch; TTT-MLP refused
    wr = _script("write_rates")
    torch.manual_seed(4)
    b, D, H = 4, 16, 2
    layer = ttt.TTTLinear(D, H, mini_batch=b, decay=0.8, forget_gate=gate).double()
    with torch.no_grad():
        layer.learnable_token_idx.normal_(0, 0.1)
        layer.b1.normal_(0, 0.1)   # (0 at the start: its share of the size would go unchecked)
        if gate:
            layer.forget_weight.normal_(0, 0.5)
    x = torch.randn(2, 13, D, dtype=torch.float64)
    _, st = layer(x[:, :2])   # position 2 of a mini-batch
    got = wr.token_steps(layer, x[:, 2:], st)
    q, k, v, lr, tau = layer.inner_inputs(x[:, 2:], st.i)
    size = torch.sqrt(layer.W1.square().sum((-2, -1)) + layer.b1.square().sum((-2, -1)))
    want, state, t = torch.zeros_like(got), st, 0
    for n in (2, 4, 4, 1):   # up to each mini-batch's end
        W1, b1 = state.params
        for i in range(t, t + n):
            for r in range(2):
                for h in range(H):
                    w, c = W1[r, h].clone().requires_grad_(), b1[r, h].clone().requires_grad_()
                    z = k[r, h, i] @ w + c[0]
                    loss = 0.5 * (torch.nn.functional.layer_norm(z, (D // H,), eps=ttt.LN_EPS) * layer.ttt_norm_weight[h]
                                  + layer.ttt_norm_bias[h] - (v[r, h, i] - k[r, h, i])).square().sum()
                    gw, gc = torch.autograd.grad(loss, (w, c))
                    want[r, h, i] = tau[-1] * lr[r, h, i] * torch.sqrt(gw.square().sum() + gc.square().sum()) / size[h]
        _, state = layer(x[:, 2 + t:2 + t + n], state)
        t += n
    assert (got - want).abs().max().item() < 1e-10 and got.min() > 0
    with pytest.raises(ValueError, match="TTT-Linear only"):
        wr.token_steps(ttt.TTTMLP(D, H, mini_batch=b), x.float(), None)


def test_write_rates_script(tmp_path, one_thread, capsys):
    # scripts/write_rates.py: the learning-rate gate and the forget gate's s, averaged by kind of frame,
    # chunked with the state carried over two conversations of different lengths, equal a pass over
    # each whole conversation read with masks made here from the events file
    wr = _script("write_rates")
    p = str(tmp_path / "h.bin")
    synthetic(p, hours=3 / 60, min_minutes=1, max_minutes=2, n_codebooks=2, seed=10, quiet=True, events_per_min=6.0,
              value_frames=3)
    m = _tiny(ttt_half_life=40, ttt_forget_gate=True, ttt_base_lr=0.5)
    with torch.no_grad():
        for b in m.layers:
            if b.ttt is not None:
                b.ttt.layer.forget_weight.normal_(0, 1.0)
                b.ttt.layer.learnable_ttt_lr_weight.normal_(0, 0.5)
    f, events = CodesFile(p), load_events(p)
    assert len(f) == 2 and f.lengths[1] < 1.5 * 750 < f.lengths[0]
    rates, counts = wr.write_rates(m, f, [0, 1], events, minutes=1.5, chunk_len=40)   # chunks that start mid-mini-batch
    n = round(1.5 * 750)
    layers = [b.ttt.layer for b in m.layers if b.ttt is not None]
    kinds, xs, steps = [], [[] for _ in layers], [[] for _ in layers]
    for c in (0, 1):
        L = min(int(f.lengths[c]), n)
        seen = {}
        hooks = [t.register_forward_pre_hook(lambda mod, a, j=j: seen.__setitem__(j, a[0])) for j, t in enumerate(layers)]
        x, _ = evaluate.chunk(f, [c], 0, L, m.cfg.col_delays(), m.cfg.col_cards())
        with torch.no_grad():
            m(torch.from_numpy(x), m.init_state(1))
        for h in hooks:
            h.remove()
        for j, t in enumerate(layers):
            xs[j].append(seen[j][0].double())
            steps[j].append(wr.token_steps(t, seen[j], None)[0].t().double())   # the whole conversation from a fresh state
        kind = np.full(int(f.lengths[c]), 6)
        for _, _, first, recall, vlen in events[events[:, 0] == c]:   # cue, key, value frames of each mention
            for base, v in ((0, first), (3, recall)):
                kind[v - 4:v - 2], kind[v - 2:v], kind[v:v + vlen] = base, base + 1, base + 2
        kinds.append(kind[:L])
    kind = np.concatenate(kinds)
    np.testing.assert_array_equal(counts, [(kind == k).sum() for k in range(7)])
    assert counts[2] > 0 and counts[5] > 0
    for j, t in enumerate(layers):
        x = torch.cat(xs[j])
        with torch.no_grad():
            lr = torch.sigmoid(x @ t.learnable_ttt_lr_weight[:, 0].double().t() + t.learnable_ttt_lr_bias.double().view(-1))
            s = torch.nn.functional.softplus(x @ t.forget_weight.double().t() + t.forget_bias.double()) / np.log(2)
        for k in range(7):   # [H] each
            np.testing.assert_allclose(rates[j]["lr"][k], lr[kind == k].mean(0).numpy(), rtol=1e-5)
            np.testing.assert_allclose(rates[j]["forget"][k], s[kind == k].mean(0).numpy(), rtol=1e-5)
            np.testing.assert_allclose(rates[j]["step"][k], torch.cat(steps[j])[kind == k].mean(0).numpy(), rtol=1e-4)
        assert np.ptp(rates[j]["lr"][:, 0]) > 0.01   # the kinds differ here
    m.save(str(tmp_path / "gated.safetensors"))
    out = wr.main(["--data", p, "--ckpt", str(tmp_path / "gated.safetensors"), "--minutes", "1"])
    text = capsys.readouterr().out
    assert "| 1 | learning rate |" in text and "| 1 | forget s |" in text and "| 1 | step |" in text and len(out) == 1
    with pytest.raises(SystemExit):
        wr.main(["--data", p, "--ckpt", "x", "--minutes", "0"])
    q = str(tmp_path / "plain.bin")   # the same frames without their events file: nothing to sort them by
    shutil.copy(p, q)
    with pytest.raises(SystemExit, match="no recall events"):
        wr.main(["--data", q, "--ckpt", str(tmp_path / "gated.safetensors")])
    with pytest.raises(SystemExit, match="holds frames of"):   # a model of other frames
        _tiny(n_codebooks=4, delays=(0, 1, 1, 1)).save(str(tmp_path / "k4.safetensors"))
        wr.main(["--data", p, "--ckpt", str(tmp_path / "k4.safetensors")])
    _tiny(n_ttt=0).save(str(tmp_path / "window.safetensors"))
    with pytest.raises(SystemExit, match="no TTT layer"):
        wr.main(["--data", p, "--ckpt", str(tmp_path / "window.safetensors")])


def test_oracle_writes_script(tmp_path, one_thread, capsys):
    # scripts/oracle_writes.py: the loss pass with the TTT learning rates scaled outside the recall events,
    # chunked mid-mini-batch over two conversations of different lengths, equals one pass over each whole
    # conversation with the learning rates scaled by a mask made here; scale 1 is the evaluation itself
    ow = _script("oracle_writes")
    p = str(tmp_path / "h.bin")
    synthetic(p, hours=3 / 60, min_minutes=1, max_minutes=2, n_codebooks=2, seed=10, quiet=True, events_per_min=6.0,
              value_frames=3)
    m = _tiny(ttt_base_lr=3.0)
    f, events = CodesFile(p), load_events(p)
    cfg, nt = m.cfg, m.cfg.n_text
    plain = evaluate.stream_eval(m, f, events, [0, 1], chunk_len=40)
    same = ow.scaled_writes(m, f, events, [0, 1], 1.0, chunk_len=40)
    for k in ("ce_min", "say_ce", "say_hit"):
        np.testing.assert_array_equal(same[k], plain[k])
    got = ow.scaled_writes(m, f, events, [0, 1], 0.25, chunk_len=40)
    assert all("inner_inputs" not in vars(b.ttt.layer) for b in m.layers if b.ttt is not None)   # left as it was
    pad = max(cfg.col_delays())
    want = np.zeros_like(got["ce_min"])
    for c in (0, 1):
        L = int(f.lengths[c])
        mask = torch.full((1, L), 0.25)
        for _, _, first, recall, vlen in events[events[:, 0] == c]:
            for v in (first, recall):   # cue (2), key (2), value, and the delayed columns after it
                mask[0, v - 4:v + vlen + pad] = 1.0
        def masked(orig, mask=mask):
            def inner_inputs(x, i):
                q, k, v, lr, tau = orig(x, i)
                return q, k, v, lr * mask[:, None, :x.shape[1]], tau
            return inner_inputs
        for b in m.layers:
            if b.ttt is not None:
                b.ttt.layer.inner_inputs = masked(b.ttt.layer.inner_inputs)
        x, _ = evaluate.chunk(f, [c], 0, L, cfg.col_delays(), cfg.col_cards())
        x = torch.from_numpy(x)
        with torch.no_grad():
            logits, _ = m(x, m.init_state(1))
        for b in m.layers:
            if b.ttt is not None:
                del b.ttt.layer.inner_inputs
        target = x[0, :, nt:]
        ce = torch.nn.functional.cross_entropy(logits.audio[0].float().flatten(0, 1), target.flatten(), reduction="none",
                                               ignore_index=cfg.cardinality).view(target.shape)
        ce = ce * (target != cfg.cardinality)
        np.add.at(want, np.arange(L) // 750, ce.numpy())
    np.testing.assert_allclose(got["ce_min"], want, rtol=1e-5)
    assert np.abs(got["ce_min"] - plain["ce_min"]).max() > 1e-3   # the scale changes the losses here
    m.save(str(tmp_path / "ttt.safetensors"))
    out = ow.main(["--data", p, "--ckpt", str(tmp_path / "ttt.safetensors"), "--scale", "1,0"])
    rows = out[str(tmp_path / "ttt.safetensors")]
    assert [r["scale"] for r in rows] == [1.0, 0.0] and "| 0 |" in capsys.readouterr().out
    out = ow.main(["--data", p, "--ckpt", str(tmp_path / "ttt.safetensors"), "--scale", "1", "--ttt_half_life_s", "3"])
    assert out[str(tmp_path / "ttt.safetensors")][0] != rows[0] and "a half-life of 3 s" in capsys.readouterr().out
    for bad in (["--scale", "-1"], ["--scale", "a"], ["--ttt_half_life_s", "-2"]):
        with pytest.raises(SystemExit):
            ow.main(["--data", p, "--ckpt", "x", *bad])
    _tiny(n_ttt=0).save(str(tmp_path / "window.safetensors"))
    with pytest.raises(SystemExit, match="no TTT layer"):
        ow.main(["--data", p, "--ckpt", str(tmp_path / "window.safetensors")])


def test_wider_memory_variant(tmp_path, one_thread):
    # ttt_linear_x4: 4 times the TTT heads, each of the scale's head width, so 4 times the fast weights in
    # a model of the same width; trained by the scale's command like the others (not a default variant)
    assert "ttt_linear_x4" not in experiment.DEFAULT_VARIANTS
    m = experiment.model_args(experiment.SCALES["gpu-reach"], "ttt_linear_x4")
    assert (m["dim"], m["ttt_heads"], m["ttt_head_dim"]) == (128, 8, 64)
    out = str(tmp_path / "exp")
    experiment.main(["--scale", "cpu-test", "--variants", "ttt_linear,ttt_linear_x4", "--stages", "data,train",
                     "--out", out])
    shapes = {}
    for v in ("ttt_linear", "ttt_linear_x4"):
        sd = load_file(os.path.join(out, "runs", v, "model.safetensors"))
        shapes[v] = [tuple(t.shape) for k, t in sorted(sd.items()) if k.endswith("ttt.layer.W1")]
    H, d = shapes["ttt_linear"][0][0], shapes["ttt_linear"][0][1]
    assert shapes["ttt_linear_x4"] == [(4 * H, d, d)] * len(shapes["ttt_linear"])
