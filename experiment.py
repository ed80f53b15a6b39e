"""
The long-conversation experiment: can a streaming speech model stay coherent for 90 minutes when its
long-term memory is a TTT layer instead of an ever-growing KV cache?

    python experiment.py --scale gpu --out runs/exp        # two models side by side on one H100: 8 min at 6000 steps
    python experiment.py --scale cpu-test --out /tmp/exp   # the whole pipeline in seconds (the tests)
    python experiment.py --scale gpu-beyond --out runs/gb --variants window,ttt_linear,ttt_linear_all
    python experiment.py --scale gpu-reach --out runs/gr --dtype float32   # README's figures: 4 GPUs, 8 min
    python experiment.py --scale gpu-reach --out runs/grs --dtype float32 --variants window,ttt_linear \
        --seeds 1337,7,11,23 --gen_minutes 0      # how much the result depends on the seed: 8 runs
    python experiment.py --scale gpu-reach --out runs/grl --dtype float32 --variants window,ttt_linear \
        --seeds 7,11 --train_hours 400 --steps 2000 --gen_minutes 0   # 4x the streaming data, 1.8 passes
    python experiment.py --scale gpu-reach --out runs/grt --dtype float32 --variants ttt_linear \
        --seeds 7,11 --train_hours 400 --steps 2000 --stream_ttt_base_lr 0.25 --gen_minutes 0
                                                  # the streaming phase at a quarter of the inner step
    python experiment.py --scale gpu-reach --out runs/grf600 --dtype float32 --variants ttt_linear \
        --seeds 7,11 --train_hours 400 --steps 2000 --stream_ttt_half_life_s 600 --gen_minutes 0
                                                  # the streaming phase with fast weights that forget
    python experiment.py --scale gpu-reach --out runs/gll --dtype float32 --variants ttt_linear \
        --seeds 7,11 --train_hours 400 --steps 2000 --stream_ttt_half_life_s 20 --stream_ttt_half_life_max_s 1200
                                                  # ... at learnt rates, a half-life per head and feature
    python experiment.py --scale gpu-reach --out runs/glg --dtype float32 --variants ttt_linear \
        --seeds 7,11 --train_hours 400 --steps 2000 --stream_ttt_half_life_s 20 --stream_ttt_half_life_max_s 1200 \
        --stream_ttt_forget_gate                  # ... and a forget gate from the input

The models, trained in streaming mode with the same budget (steps, batch, seq_len, learning-rate
schedule, seed) on the same synthetic conversations:

    window       attention over a short window (20 s at the gpu scale) and nothing else
    ttt_linear   the same + TTT-Linear in the top layers: a memory of constant size
    ttt_mlp      the same + TTT-MLP
    long_window  attention over a long window (4 min, Moshi's context), as a reference: its cache
                 is 12x the short one, and it still forgets everything older than 4 minutes
    ttt_linear_all  ttt_linear with TTT-Linear in every layer

The gpu-beyond scale trains the same models on recall drills that resemble associative recall,
with half of their recalls beyond the window (see SCALES["gpu-beyond"]); gpu-sparse, on such drills
with shorter values and speech between the events, so that fewer patterns are held at once;
gpu-whole, on drills laid out as the toy runs found they must be for the lookup to form; gpu-reach,
the same drills with the toy's model and a 20 s window, the scale of README's figures.

Then each is evaluated (evaluate.py) on held-out 90-minute conversations of another seed: loss by
minute, recall accuracy by distance, and the statistics of a 90-minute generation against the real
data's. Everything goes under --out:

    data/train.bin, data/heldout.bin      the synthetic codes (+ .events.json: the recall events)
    data/drills_heldout.bin               held-out recall drills like the training ones
    runs/NAME/                            train.py's run folder, train.log, train_losses.json,
                                          eval.json (every number), eval.log, drills_eval.json;
                                          warmup/ (the drills warm-up's run folder, evals.json)
    summary.md, results.json              the comparison table and all results in one file
    loss_by_minute.png, recall_by_distance.png, generation.png

Runs are train.py and evaluate.py, called in this process (--parallel 1) or as subprocesses, several
at a time, spread over the GPUs there are (CUDA_VISIBLE_DEVICES, round robin). A finished training
(its train_losses.json) is not redone; --stages picks what to (re)do.
"""
import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from evaluate import FRAMES_PER_MINUTE, fmt_seconds

HERE = os.path.dirname(os.path.abspath(__file__))

# Every number of a scale is here; the variants differ only in the lines of VARIANTS below.
SCALES = {
    # The test suite runs all of it in seconds on a CPU: the numbers mean nothing, the plumbing is checked.
    "cpu-test": dict(
        train_hours=0.25, train_minutes=(1.0, 3.0),     # conversations of 1-3 minutes
        heldout=(2, 2.0),                                # 2 held-out conversations of 2 minutes
        drills_heldout=(0.05, 1.0),                      # hours, minutes each
        recall=dict(events_per_min=6.0, near_share=0.75, near_max_s=10.0, pattern_codes=64, value_frames=12,
                    tied_patterns=True, split_patterns=True),
        train_quiz=dict(quiz_share=0.5, quiz_max_s=4.0),
        warmup_drills=dict(steps=0, hours=0.1, minutes=(1.0, 2.0), quiz_max_s=4.0),
        n_codebooks=2,
        model=dict(preset="tiny", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, window=16, n_ttt=1,
                   ttt_heads=4, ttt_mini_batch=16, depth_dim=32, depth_layers=1, depth_heads=2, silence="data"),
        long_window=64,
        train=dict(seq_len=16, batch_size=2, max_steps=3, lr=3e-3, min_lr=3e-4, warmup=1, device="cpu",
                   dtype="float32", log_interval=1),
        eval=dict(chunk=128, batch=2, gen_minutes=0.05, gen_budget_s=0, device="cpu"),
    ),
    # The real run, on one H100 (the variants side by side) or several. 8 layers of 512 (25M backbone
    # parameters; 60M with the per-codebook embeddings and heads), windows of 20 s and 4 min, TTT in
    # the top 2 layers (8 heads of 64, mini-batch 16: the Triton path for TTT-Linear; TTT-MLP's
    # inner loop runs one compiled mini-batch at a time and is the slowest to train); no block in
    # the depth decoder (with one, the recall forms later: scripts/recall_pilot.py). Each step is
    # 16 rows x 512 frames (41 s): every row walks whole conversations with its state carried.
    # Recall events (data.py): 8 a minute asked (about 5 fit), values of 32 frames (2.6 s), keys and
    # values drawn from 1024 codes per codebook (chance 1/1024: with 64, a code recurs so often in
    # a window that copying by content is ambiguous, and the pilot learnt only drills with a fixed
    # gap), a pattern coming back from the speaker who said it, its acoustic codes following from
    # its semantic ones as in speech (tied_patterns: with 8 codebooks drawn on their own, the pilot
    # stays at chance through 8000 steps). Three in four come back 2-30 s later, inside one
    # training chunk, so storing a pattern gets a gradient (from 20 s on, beyond the window, only
    # TTT can serve it); the others 10 s to 60 min later, for the evaluation out to 90 minutes.
    # Nine in ten training conversations are recall drills (events back to back: 43% of their
    # frames are recalled values, every one 2-10 s after its first mention, a varying number of
    # other events in between, so that they are answerable inside a window and only a lookup by
    # content answers them); the held-out conversations are ordinary ones. 200 hours (about five
    # passes in 6000 steps) hold too many values to learn by heart (with 60 hours the training
    # loss fell far below the held-out loss; a CPU pilot on 3 hours learnt the training values,
    # not the task).
    # Generating 90 minutes for four models does not fit the time: generation stops at the first
    # whole minute after gen_budget_s and the summary says how far it got (--gen_budget_s 0 runs
    # all 90 minutes).
    "gpu": dict(
        train_hours=200.0, train_minutes=(10.0, 90.0),
        recall=dict(events_per_min=8.0, near_share=0.75, near_max_s=30.0, pattern_codes=1024, value_frames=32,
                    same_speaker=True, tied_patterns=True),
        train_quiz=dict(quiz_share=0.9, quiz_max_s=10.0),
        # --warmup_drills N: N steps on drills alone (2-4 minute conversations, 20 hours) first
        warmup_drills=dict(steps=0, hours=20.0, minutes=(2.0, 4.0), quiz_max_s=10.0),
        heldout=(4, 90.0),
        drills_heldout=(0.4, 4.0),
        n_codebooks=8,
        model=dict(preset="small", dim=512, n_layers=8, n_heads=8, n_kv_heads=4, hidden=1408, window=250,
                   n_ttt=2, ttt_heads=8, ttt_mini_batch=16, depth_dim=256, depth_layers=0, depth_heads=4),
        long_window=3000,
        train=dict(seq_len=512, batch_size=16, max_steps=4000, lr=1e-3, min_lr=1e-4, warmup=100,
                   log_interval=100, eval_interval=500),   # a checkpoint every 500 steps: Ctrl-C, then resume
        eval=dict(chunk=512, batch=4, gen_minutes=90.0, gen_budget_s=20),
    ),
}

# The gpu scale's models on drills built as associative recall is (scripts/recall_toy.py --mqar, where
# TTT-Linear learnt a lookup beyond the windows' reach): the patterns' 1024 codes per codebook are
# theirs alone (the speech uses the other 1024: on the toy, keys that also turn up in the noise left a
# weak lookup), and the drills' recalls come back 2-40 s later, half of them beyond the 20 s window.
# Training chunks of 1024 frames (82 s), so that most of those have their first mention in the same
# chunk (a gradient for storing it). The drills warm-up (mini-batch, float32) on these drills, then
# streaming training on the conversations, nine in ten of them such drills. The warm-up's drills are
# 600 hours, so that 4000 steps see each about once: with 20 hours the models learnt the training
# drills' values by heart (training loss 1.1-1.3, held-out drills at chance with loss 10.5). With 600
# hours no model left the loss plateau in 3500 steps: no lookup, within the window or beyond it
# (docs/experiment/summary_beyond.md).
SCALES["gpu-beyond"] = dict(
    SCALES["gpu"],
    recall={**SCALES["gpu"]["recall"], "reserve_patterns": True},
    train_quiz=dict(quiz_share=0.9, quiz_min_s=2.0, quiz_max_s=40.0),
    warmup_drills=dict(steps=4000, hours=600.0, minutes=(2.0, 4.0), quiz_min_s=2.0, quiz_max_s=40.0),
    train={**SCALES["gpu"]["train"], "seq_len": 1024, "batch_size": 8, "max_steps": 400, "warmup": 50},
)

# gpu-beyond's drills with fewer patterns to hold at once, as associative recall has them: values of 4
# frames instead of 32, and 3 s of speech on average between the events instead of none. Over a 40 s
# gap gpu-beyond's drills bring about 500 frames of patterns, every one a new pair to store, against
# the 8 x 64 x 64 fast weights of a TTT-Linear layer; these bring about 70. The recalled values are 4%
# of the frames, and the speech codes around them are mostly unpredictable: on the associative-recall
# toy such a loss hid the recall's gradient, and a loss on the recalls alone found the lookup. So the
# warm-up weighs the recalled frames 100 times the others (about 80% of its loss); the streaming
# training after it has the plain loss. On 2 H200s no model learnt the lookup in 3000 warm-up steps,
# with the plain loss or the weighted one, with the 20 s window or a 1.28 s one
# (docs/experiment/summary_sparse.md).
SCALES["gpu-sparse"] = dict(
    SCALES["gpu-beyond"],
    recall={**SCALES["gpu-beyond"]["recall"], "value_frames": 4},
    train_quiz={**SCALES["gpu-beyond"]["train_quiz"], "quiz_spacing_s": 3.0},
    warmup_drills={**SCALES["gpu-beyond"]["warmup_drills"], "quiz_spacing_s": 3.0, "recall_weight": 100.0},
)

# What the toy runs found the drills need (docs/experiment/notes.md, "What the drills need"): the
# toy's model (2 layers of 128) learnt the drills' lookup beyond its windows' reach only with all
# four of: every warm-up conversation one training window long (its first mentions and their
# recalls in the same window, the TTT state fresh at its start); a silent stream that adds nothing
# to the frame's input (train.py --silence data); the speech kept in the loss, the recalls weighted
# 10-100 times (not 10000); and, sooner, keys and values from separate halves of the pattern codes.
# Values of one frame from 128 codes (chance 1/128), 1 s of speech between the events. Not run at
# this scale; its warm-up with these models stayed at chance for 2500 steps (gpu-reach below).
SCALES["gpu-whole"] = dict(
    SCALES["gpu-sparse"],
    recall={**SCALES["gpu-sparse"]["recall"], "value_frames": 1, "pattern_codes": 256, "split_patterns": True},
    train_quiz={**SCALES["gpu-sparse"]["train_quiz"], "quiz_spacing_s": 1.0},
    warmup_drills={**SCALES["gpu-sparse"]["warmup_drills"], "quiz_spacing_s": 1.0, "recall_weight": 100.0,
                   "minutes": (1025.5 / 750, 1025.5 / 750)},    # seq_len + 1 frames: one training window each
    model={**SCALES["gpu-sparse"]["model"], "silence": "data"},
)

# The scale at which the experiment's lookup beyond the windows' reach was first seen
# (scripts/drill_ladder.sh, group reach): gpu-whole's drills and 8 codebooks with the toy's model, 2
# layers of 128 (TTT in both: the top layers of a 2-layer model), a 20 s window (250 frames; the two
# windows stacked reach 40 s) and chunks of 16 x 1024 frames. The warm-up's drill conversations are
# one chunk long (1025 frames, 25 recalls each, half of them 20-52 s after the first mention); the
# held-out drills are the same, of another seed. With 8 layers of 512 the same warm-up had not left
# chance after 2500 steps; with a 16-frame window (1.28 s) the toy's model stays at chance on these
# longer gaps.
SCALES["gpu-reach"] = dict(
    SCALES["gpu-whole"],
    train_hours=100.0,
    warmup_drills={**SCALES["gpu-whole"]["warmup_drills"], "steps": 5000, "hours": 220.0},
    drills_heldout=(2.0, 1025.5 / 750),
    # 32 held-out conversations (the earlier runs had 4, these 32's first 4): over groups of 4 a window
    # model's loss moved from minute 4 to minute 90 by -0.12 to +0.14 with the data alone, over all 32
    # by +0.03 (scripts/heldout_noise.py; docs/experiment/notes.md)
    heldout=(32, 90.0),
    model=dict(preset="demo", dim=128, n_layers=2, n_heads=4, n_kv_heads=2, hidden=384, window=250, n_ttt=2,
               ttt_heads=2, ttt_mini_batch=16, depth_layers=0, silence="data"),
    train={**SCALES["gpu-whole"]["train"], "batch_size": 16, "max_steps": 600},
    eval={**SCALES["gpu-whole"]["eval"], "dtype": "float32", "batch": 16},
)

# name -> model overrides on top of the scale's model; "long" stands for the scale's long window
VARIANTS = {
    "window": dict(n_ttt=0),                       # (a) short-window attention only
    "ttt_linear": dict(ttt_type="linear"),         # (b) + TTT-Linear in the top n_ttt layers
    "ttt_mlp": dict(ttt_type="mlp"),               # (c) + TTT-MLP
    "long_window": dict(n_ttt=0, window="long"),   # (d) reference: attention over the long window
    "ttt_linear_all": dict(ttt_type="linear", n_ttt="all"),   # (b) with TTT-Linear in every layer, as in the toy
    # (b) with 4 times the fast weights: 4 times the TTT heads, each as wide as before (model.py's
    # ttt_head_dim), so that a memory wider than the model holds more (not run by default)
    "ttt_linear_x4": dict(ttt_type="linear", ttt_memory=4),
}
DEFAULT_VARIANTS = tuple(v for v in VARIANTS if v != "ttt_linear_x4")   # what --variants runs by default
SEED = 1337
HELDOUT_SEED = 1     # the training data uses seed 0: held-out voices, keys and values are new


def print_flush(*a):
    print(*a, flush=True)


# -----------------------------------------------------------------------------
# 1. data


def make_data(sc, out):
    """The training set and the held-out set of long conversations, via data.py's CLI."""
    os.makedirs(os.path.join(out, "data"), exist_ok=True)
    train_path, held_path = os.path.join(out, "data", "train.bin"), os.path.join(out, "data", "heldout.bin")
    n, minutes = sc["heldout"]
    lo, hi = sc["train_minutes"]
    recall = [f"--{k}={v}" for k, v in sc.get("recall", {}).items()]   # density and shape of the recall events
    quiz = [f"--{k}={v}" for k, v in sc.get("train_quiz", {}).items()]   # recall drills: training data only
    cmds = [[sys.executable, "data.py", "synthetic", "--out", train_path, "--hours", str(sc["train_hours"]),
             "--min_minutes", str(lo), "--max_minutes", str(hi), "--n_codebooks", str(sc["n_codebooks"]),
             "--seed", "0", *recall, *quiz],
            [sys.executable, "data.py", "synthetic", "--out", held_path, "--hours", f"{n * minutes / 60 + 1e-6:.7g}",
             "--min_minutes", str(minutes), "--max_minutes", str(minutes), "--n_codebooks", str(sc["n_codebooks"]),
             "--seed", str(HELDOUT_SEED), *recall]]
    if quiz:   # held-out drills: has a model learnt the drills at all, whatever it does on ordinary speech?
        d_hours, d_minutes = sc["drills_heldout"]
        cmds.append([sys.executable, "data.py", "synthetic", "--out", drills_path(out), "--hours", str(d_hours),
                     "--min_minutes", str(d_minutes), "--max_minutes", str(d_minutes), "--n_codebooks",
                     str(sc["n_codebooks"]), "--seed", str(HELDOUT_SEED), *recall,
                     *[f"--{k}={v}" for k, v in {**sc["train_quiz"], "quiz_share": 1.0}.items()]])
    wd = sc.get("warmup_drills", {})
    if wd.get("steps"):   # phase 1's data: drills alone, in short conversations, a seed of their own
        lo_w, hi_w = wd["minutes"]
        workers = math.ceil(wd["hours"] / 600)   # thousands of hours: one process each 600 (the scales' own: one)
        cmds.append([sys.executable, "data.py", "synthetic", "--out", drills_train_path(out), "--hours", str(wd["hours"]),
                     "--min_minutes", str(lo_w), "--max_minutes", str(hi_w), "--n_codebooks", str(sc["n_codebooks"]),
                     "--seed", "2", *recall, "--quiz_share=1.0",
                     *[f"--{k}={wd[k]}" for k in ("quiz_min_s", "quiz_max_s", "quiz_spacing_s") if k in wd],
                     *(["--workers", str(workers)] if workers > 1 else [])])
    procs, log = [], open(os.path.join(out, "data", "data.log"), "w")
    for cmd in cmds:   # data.py needs numpy only: two quick subprocesses, side by side
        print_flush("$ " + " ".join(cmd[1:]))
        procs.append(subprocess.Popen(cmd, cwd=HERE, stdout=log, stderr=log))
    with log:
        if any(p.wait() for p in procs):
            raise RuntimeError(f"data.py failed: see {log.name}")
    import codes
    lens = codes.CodesFile(held_path, check_codes=False).lengths
    if len(lens) != n or (lens != round(minutes * 750)).any():
        raise RuntimeError(f"{held_path}: expected {n} conversations of {minutes:g} minutes, got {len(lens)}")
    return train_path, held_path


# -----------------------------------------------------------------------------
# 2. + 3. train and evaluate each variant


def model_args(sc, name):
    m = {**sc["model"], **VARIANTS[name]}
    if m.get("window") == "long":
        m["window"] = sc["long_window"]
    if m.get("n_ttt") == "all":
        m["n_ttt"] = m["n_layers"]
    if "ttt_memory" in m:   # k times the heads, each keeping the scale's head width
        heads = m.get("ttt_heads") or max(1, m["dim"] // 64)
        m["ttt_head_dim"], m["ttt_heads"] = m["dim"] // heads, heads * m.pop("ttt_memory")
    return m


def train_argv(sc, name, train_path, run_dir, seed=None):
    a = {"data": train_path, "out_dir": run_dir, "mode": sc.get("mode", "streaming"), "eval_interval": 0,
         "seed": sc.get("seed", SEED) if seed is None else seed,
         **sc["train"], **model_args(sc, name)}
    if sc.get("stream_ttt_base_lr") and a.get("n_ttt"):   # the inner step of this phase alone
        a["ttt_base_lr"] = sc["stream_ttt_base_lr"]
    if sc.get("stream_ttt_half_life_s") and a.get("n_ttt"):   # forgetting in this phase alone, in frames
        a["ttt_half_life"] = sc["stream_ttt_half_life_s"] * FRAMES_PER_MINUTE / 60
        if sc.get("stream_ttt_half_life_max_s"):   # learnt half-lives, starting log-spaced in this range
            a["ttt_half_life_max"] = sc["stream_ttt_half_life_max_s"] * FRAMES_PER_MINUTE / 60
            if sc.get("stream_ttt_half_life_lr_mult", 1) != 1:   # and their own step size
                a["ttt_half_life_lr_mult"] = sc["stream_ttt_half_life_lr_mult"]
        if sc.get("stream_ttt_forget_gate"):   # the input scales each mini-batch's decay
            a["ttt_forget_gate"] = True
    if sc.get("stream_ttt_write_penalty") and a.get("n_ttt"):   # smaller learning-rate gates, this phase alone
        a["ttt_write_penalty"] = sc["stream_ttt_write_penalty"]
    if sc.get("stream_ttt_update_penalty") and a.get("n_ttt"):   # smaller moves of the fast weights, this phase alone
        a["ttt_update_penalty"] = sc["stream_ttt_update_penalty"]
        if sc.get("stream_ttt_update_penalty_power", 1) != 1:
            a["ttt_update_penalty_power"] = sc["stream_ttt_update_penalty_power"]
    return [f"--{k}={v}" for k, v in a.items()]


def warmup_argv(sc, name, drills_train, warm_dir, seed=None):
    """Phase 1 (--warmup_drills): the same model on drills alone, in mini-batch mode, float32 and a
    constant learning rate, the setting in which the lookup formed soonest (scripts/recall_factors.sh)."""
    t = {**sc["train"], "max_steps": sc["warmup_drills"]["steps"], "min_lr": sc["train"]["lr"],
         "warmup": min(50, sc["train"]["warmup"]), "dtype": "float32",
         "recall_weight": sc["warmup_drills"].get("recall_weight", 1.0)}
    a = {"data": drills_train, "out_dir": warm_dir, "mode": "minibatch",
         "seed": sc.get("seed", SEED) if seed is None else seed, **t,
         **model_args(sc, name)}
    return [f"--{k}={v}" for k, v in a.items()]


def drills_train_path(out):
    return os.path.join(out, "data", "drills_train.bin")


def drills_path(out):
    return os.path.join(out, "data", "drills_heldout.bin")


def eval_argv(sc, run_dir, held_path, out="eval.json", generate=True):
    a = {"ckpt": run_dir, "data": held_path, "out": os.path.join(run_dir, out), **sc["eval"]}
    if not generate:
        a["gen_minutes"] = 0
    return [f"--{k}={v}" for k, v in a.items()] + ["--quiet"]


def run_job(script, argv, log, gpu, in_process, threads, result_json=None):
    """Run train.py or evaluate.py with argv, its output in log: in this process, or as a
    subprocess on one GPU. For train.py the step losses are written to result_json."""
    with open(log, "w") as fh:
        if in_process:
            fh.write(f"$ python {script}.py {' '.join(argv)}\n\n")
            fh.flush()
            mod = __import__(script)
            try:
                with contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
                    out = mod.main(argv)
                rc = 0
            except SystemExit as e:   # train.py and evaluate.py exit(2) with a message on bad input
                rc = e.code or 1
            if rc == 0 and result_json:
                _write_json(result_json, out)
        else:
            if result_json:   # train.main returns the step losses: keep them
                code = ("import json, os, sys, train; losses = train.main(sys.argv[2:]); "
                        "json.dump(losses, open(sys.argv[1] + '.tmp', 'w')); os.replace(sys.argv[1] + '.tmp', sys.argv[1])")
                cmd = [sys.executable, "-c", code, result_json, *argv]
            else:
                cmd = [sys.executable, f"{script}.py", *argv]
            env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(threads))
            if gpu is not None:
                env["CUDA_VISIBLE_DEVICES"] = gpu
            fh.write("$ " + " ".join(cmd) + "\n\n")
            fh.flush()
            rc = subprocess.run(cmd, cwd=HERE, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode
    if rc:
        with open(log) as fh:
            tail = "".join(fh.readlines()[-15:])
        raise RuntimeError(f"{script}.py failed (exit {rc}); the end of {log}:\n{tail}")


def run_label(name, seed, seeds):
    """A run's folder under runs/ and its row in the tables: the variant, and its seed when there are several."""
    return name if len(seeds) == 1 else f"{name}_seed{seed}"


def pipeline(name, sc, a, train_path, held_path, gpu, in_process, seed=None):
    """Train one variant (unless done) and evaluate it: with one seed in runs/NAME, with several in
    runs/NAME_seedS."""
    seed = a.seeds[0] if seed is None else seed
    label = run_label(name, seed, a.seeds)
    run_dir = os.path.join(a.out, "runs", label)
    os.makedirs(run_dir, exist_ok=True)
    where = "in this process" if in_process else f"on GPU {gpu}" if gpu is not None else "in a subprocess"
    if "train" in a.stages:
        wd = sc.get("warmup_drills", {})
        if wd.get("steps"):   # phase 1: the drills alone, until the lookup forms; phase 2 starts from it
            warm_dir = os.path.join(run_dir, "warmup")
            if not _train_phase(f"{label}: drills warm-up", warmup_argv(sc, name, drills_train_path(a.out), warm_dir,
                                                                         seed), warm_dir, wd["steps"], gpu, in_process, a):
                return False
            extra = [f"--init_from={os.path.join(warm_dir, 'model.safetensors')}"]
        else:
            extra = []
        if not _train_phase(label, train_argv(sc, name, train_path, run_dir, seed) + extra, run_dir,
                            sc["train"]["max_steps"], gpu, in_process, a):
            return False
    if "eval" in a.stages:
        t0 = time.time()
        print_flush(f"[{label}] evaluating {where}; log {os.path.join(run_dir, 'eval.log')}")
        run_job("evaluate", eval_argv(sc, run_dir, held_path), os.path.join(run_dir, "eval.log"), gpu, in_process,
                a.threads)
        if os.path.exists(drills_path(a.out)):
            run_job("evaluate", eval_argv(sc, run_dir, drills_path(a.out), "drills_eval.json", generate=False),
                    os.path.join(run_dir, "drills_eval.log"), gpu, in_process, a.threads)
        print_flush(f"[{label}] evaluated in {_fmt(time.time() - t0)}")
    return True


def _train_phase(label, argv, run_dir, steps, gpu, in_process, a):
    """train.py with argv into run_dir, unless its losses are complete; False when interrupted."""
    os.makedirs(run_dir, exist_ok=True)
    losses_path = os.path.join(run_dir, "train_losses.json")
    if _done(losses_path, steps):
        print_flush(f"[{label}] already trained ({losses_path}); delete it to train again")
        return True
    where = "in this process" if in_process else f"on GPU {gpu}" if gpu is not None else "in a subprocess"
    t0 = time.time()
    print_flush(f"[{label}] training {where}; log {os.path.join(run_dir, 'train.log')}")
    run_job("train", argv, os.path.join(run_dir, "train.log"), gpu, in_process, a.threads, losses_path)
    if not _done(losses_path, steps):   # interrupted (Ctrl-C): checkpoint kept
        with open(losses_path) as fh:
            n = len(json.load(fh))
        print_flush(f"[{label}] stopped at step {n} of {steps}; the same command resumes from its checkpoint")
        return False
    if not a.keep_optimizer:  # the resumable checkpoint (model + AdamW state): not needed once done
        for f in os.listdir(run_dir):
            if f.startswith("ckpt") and f.endswith(".pt"):
                os.remove(os.path.join(run_dir, f))
    with open(losses_path) as fh:
        last = json.load(fh)[-1]
    print_flush(f"[{label}] trained in {_fmt(time.time() - t0)}, last step loss {last:.4f}")
    return True


def _done(path, steps):
    try:
        with open(path) as fh:
            return len(json.load(fh)) == steps
    except (OSError, ValueError):
        return False


def _write_json(path, obj):
    with open(path + ".tmp", "w") as fh:
        json.dump(obj, fh, indent=1)
    os.replace(path + ".tmp", path)


def _fmt(s):
    return f"{int(s) // 60}m{int(s) % 60:02d}s"


# -----------------------------------------------------------------------------
# 4. report


def report(a, runs):
    """summary.md, results.json and the figures from the runs' eval.json files; runs: (variant, seed)."""
    import evaluate
    results, losses, seeds = {}, {}, getattr(a, "seeds", [SEED])
    for variant, seed in runs:
        name = run_label(variant, seed, seeds)
        p = os.path.join(a.out, "runs", name, "eval.json")
        if not os.path.exists(p):
            print_flush(f"[{name}] no {p}: left out of the report")
            continue
        with open(p) as fh:
            results[name] = json.load(fh)
        dp = os.path.join(a.out, "runs", name, "drills_eval.json")
        if os.path.exists(dp):
            with open(dp) as fh:
                results[name]["drills_recall"] = json.load(fh)["recall"]
        wp = os.path.join(a.out, "runs", name, "warmup", "evals.json")   # train.py's evaluations in the warm-up
        if os.path.exists(wp):
            with open(wp) as fh:
                results[name]["warmup_evals"] = json.load(fh)
        lp = os.path.join(a.out, "runs", name, "train_losses.json")
        if os.path.exists(lp):
            with open(lp) as fh:
                losses[name] = json.load(fh)
    if not results:
        raise RuntimeError("nothing to report: no evaluation finished")
    _write_json(os.path.join(a.out, "results.json"), {"scale": a.scale, "seeds": seeds, "train_losses": losses,
                                                       "eval": results})
    md = summary(a, results, losses)
    if len(seeds) > 1:
        md += seeds_summary(results, [(v, s) for v, s in runs if run_label(v, s, seeds) in results], seeds)
    with open(os.path.join(a.out, "summary.md"), "w") as fh:
        fh.write(md)
    print_flush("\n" + md)
    for p in evaluate.plot(results, a.out):
        print_flush(f"wrote {p}")


def summary(a, results, losses):
    """The markdown tables of the comparison."""
    any_r = next(iter(results.values()))
    ch = any_r["chance"]
    held = f"{any_r['conversations']} held-out conversations, {any_r['minutes'] / any_r['conversations']:.0f} minutes each"
    out = [f"# Long-conversation experiment (scale `{a.scale}`)", "",
           f"{held}. Loss: the training objective (model.loss_fn). Recall: top-1 accuracy on the "
           f"recalled values' semantic codes; chance {ch['accuracy']:.2g} (1/{round(1 / ch['accuracy'])}), chance loss "
           f"{ch['loss']:.2f}. In/beyond window: distance since the first mention shorter/longer than "
           "the model's own attention window; beyond reach: farther back than its stacked windows reach "
           "(layers x (window - 1) + 1 frames), where only a memory can help. Drills: held-out recall drills like the training ones "
           "(recall in / beyond the window / beyond the reach), to tell a model that learnt no lookup from one whose lookup does not "
           "carry over to ordinary speech.", "",
           "| model | window | TTT | state / conversation | last train loss | loss min 1-5 | loss last 5 min "
           "| speech frames: loss min 1-5 / last 5 "
           "| recall in window: acc. / loss | recall beyond window: acc. / loss | recall beyond reach: acc. (reach) "
           "| 1st mentions: loss (control) | drills: recall in / beyond window / beyond reach |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        lm = r["loss_by_minute"]["loss"]
        rc = r["recall"]
        w = r["model"]["window"]
        tl = losses.get(name)
        out.append(f"| {name} | {w} ({fmt_seconds(w / 12.5)}) | {r['model']['ttt_type'] or '-'} | "
                   f"{r['memory']['state_bytes'] / 2**20:.2f} MiB | {(f'{tl[-1]:.3f}' if tl else '-')} | "
                   f"{_mean(lm[:5]):.3f} | {_mean(lm[-5:]):.3f} | {_speech(r['loss_by_minute'])} | "
                   f"{_acc(rc['within_window'])} / "
                   f"{_num(rc['within_window']['loss'])} | {_acc(rc['beyond_window'])} / "
                   f"{_num(rc['beyond_window']['loss'])} | " +
                   (f"{_acc(rc['beyond_reach'])} ({fmt_seconds(rc['reach_frames'] / 12.5)})" if "beyond_reach" in rc
                    else "-") + f" | {_num(rc['first_mention']['loss'])} | " +
                   (" / ".join(_acc(r["drills_recall"][k]) for k in ("within_window", "beyond_window", "beyond_reach")
                               if k in r["drills_recall"]) if "drills_recall" in r else "-") + " |")
    out += paired_speech(results)
    labels = [b["label"] for b in any_r["recall"]["buckets"]]
    out += ["", "Recall accuracy by distance since the pattern was first heard (events; * = within the "
            "model's window):", "",
            "| model | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for name, r in results.items():
        cells = [f"{_acc(b)}{'*' if b['window'] == 'within' else ''} ({b['events']})" for b in r["recall"]["buckets"]]
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    warm = {n: [e for e in r.get("warmup_evals", []) if "val_recall" in e] for n, r in results.items()}
    warm = {n: w for n, w in warm.items() if w}
    if warm:
        out += ["", "Drills warm-up: recall on held-out drill windows at train.py's evaluations (step: accuracy over "
                "all recalls, and in brackets over those beyond the attention window of their first mention; at most "
                "ten, evenly spaced), the first step at which the recall beyond the window reached 0.5, and the "
                "same recall on windows of the training drills at the last evaluation (far above the held-out one: "
                "values learnt by heart). The lookup forms as a jump:", "",
                "| model | recall during the warm-up | first step at 0.5 beyond the window | training drills, last |",
                "|---|---|---|---|"]
        num = lambda v: "-" if v is None else f"{v:.3f}"
        for name, w in warm.items():
            shown = [w[i] for i in sorted({round(j * (len(w) - 1) / 9) for j in range(10)})] if len(w) > 10 else w
            first = next((e["step"] for e in w if (e.get("val_recall_beyond") or 0) >= 0.5), None)
            out.append(f"| {name} | " + ", ".join(f"{e['step']}: {e['val_recall']:.3f} ({num(e.get('val_recall_beyond'))})"
                                                  for e in shown) + f" | {first if first is not None else 'not reached'} | "
                       f"{num(w[-1].get('train_recall'))} |")
    gens = {n: r["generation"] for n, r in results.items() if r.get("generation") and r["generation"]["minute"]}
    if gens:
        ref = any_r["reference"]
        g0 = next(iter(gens.values()))
        out += ["", f"Generation from nothing (temperature {g0['temp']}, top-k {g0['top_k']}), statistics of "
                "the first and the last generated minute; `data` is the held-out conversations' average:", "",
                "| model | minutes | frames/s | " + " | ".join(f"{k} first / last" for k in ("entropy", "repeat",
                                                                                     "silence", "overlap", "turns"))
                + " | first / last minute outside the data's spread |",
                "|---|---|---|" + "---|" * 6]
        for name, g in gens.items():
            cells = [f"{g[k][0]:.3g} / {g[k][-1]:.3g}" for k in ("entropy", "repeat", "silence", "overlap", "turns")]
            outside = " / ".join("-" if g.get(f"{w}_minute_within_spread") is None else
                                 ", ".join(k for k, v in g[f"{w}_minute_within_spread"].items() if not v) or "none"
                                 for w in ("first", "last"))
            out.append(f"| {name} | {g['minutes_done']:.3g} of {g['minutes_requested']:g} | {g['frames_per_s']:.0f} | "
                       + " | ".join(cells) + f" | {outside} |")
        n = max(len(g["minute"]) for g in gens.values())
        cells = [f"{ref[k][0]:.3g} / {ref[k][min(n, len(ref[k])) - 1]:.3g}" for k in ("entropy", "repeat", "silence",
                                                                                        "overlap", "turns")]
        spread = ref.get("spread")
        out.append("| data | | | " + " | ".join(cells) + " | " + (
            "spread ({}-{}% of minutes): ".format(*ref["spread_percentiles"])
            + ", ".join(f"{k} {spread[k][0]:.3g}-{spread[k][1]:.3g}" for k in spread) if spread else "") + " |")
    gates = {n: r["forget_gates"] for n, r in results.items() if r.get("forget_gates")}
    if gates:
        out += ["", "Forget gates (decay ** s each mini-batch, s at the mini-batches' ends of the held-out "
                "conversations; the half-life is the fixed one or the median learnt one, divided by s):", "",
                "| model | TTT layer | s: 1% | 10% | median | 90% | 99% | mean on speech | elsewhere | half-life, s |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        fmt = lambda v: f"{v:.3g}" if v is not None else "-"
        for name, layers in gates.items():
            for i, g in enumerate(layers):
                out.append(f"| {name} | {i + 1} | " + " | ".join(fmt(v) for v in g["s"])
                           + f" | {fmt(g['mean_speech'])} | {fmt(g['mean_other'])} | {g['half_life_s']:.3g} |")
    learnt = {n: r["ttt_learnt_half_lives_s"] for n, r in results.items() if r.get("ttt_learnt_half_lives_s")}
    if learnt:
        out += ["", "Learnt half-lives of the fast weights, seconds (each TTT layer's, over its heads and features):", "",
                "| model | TTT layer | min | 10% | median | 90% | max |", "|---|---|---|---|---|---|---|"]
        for name, layers in learnt.items():
            for i, h in enumerate(layers):
                qs = np.percentile(np.asarray(h, dtype=np.float64).ravel(), [0, 10, 50, 90, 100])
                out.append(f"| {name} | {i + 1} | " + " | ".join(f"{v:.3g}" for v in qs) + " |")
    figures = "loss_by_minute.png, recall_by_distance.png" + (", generation.png" if gens else "")
    out += ["", f"Figures: {figures}. Every number: results.json.", ""]
    return "\n".join(out)


# the figures whose spread over seeds the summary shows: (column, value of one run's eval.json or None)
SEED_FIGURES = [
    ("recall in window", lambda r: r["recall"]["within_window"]["accuracy"]),
    ("recall beyond window", lambda r: r["recall"]["beyond_window"]["accuracy"]),
    ("recall beyond reach", lambda r: r["recall"].get("beyond_reach", {}).get("accuracy")),
    ("drills: recall beyond reach", lambda r: r.get("drills_recall", {}).get("beyond_reach", {}).get("accuracy")),
    ("loss min 1-5", lambda r: _mean(r["loss_by_minute"]["loss"][:5])),
    ("loss last 5 min", lambda r: _mean(r["loss_by_minute"]["loss"][-5:])),
    ("speech frames: loss last 5 min - min 1-5", lambda r: (_mean(r["loss_by_minute"]["speech"][-5:])
                                                            - _mean(r["loss_by_minute"]["speech"][:5]))
     if r["loss_by_minute"].get("speech") else None),
]


def seeds_summary(results, runs, seeds):
    """Each variant over the seeds: the mean of each figure, its lowest and highest, and each seed's value."""
    out = ["", f"Over {len(seeds)} seeds ({', '.join(map(str, seeds))}: train.py's initial weights and batches; the "
           "data are the same): mean (lowest - highest), then each seed's value in that order.", "",
           "| model | " + " | ".join(c for c, _ in SEED_FIGURES) + " |", "|---|" + "---|" * len(SEED_FIGURES)]
    for variant in dict.fromkeys(v for v, _ in runs):
        mine = [results[run_label(v, s, seeds)] for v, s in runs if v == variant]
        cells = []
        for _, f in SEED_FIGURES:
            xs = [f(r) for r in mine]
            have = [x for x in xs if x is not None]
            each = ", ".join("-" if x is None else f"{x:.3f}" for x in xs)
            cells.append(f"{_mean(have):.3f} ({min(have):.3f} - {max(have):.3f}); {each}" if have else "-")
        out.append(f"| {variant} ({len(mine)} seeds) | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def window_partner(name, results):
    """The window model trained with the same seed as run `name` (same held-out frames), or None."""
    if name.startswith("window"):
        return None
    variant = max((v for v in VARIANTS if name.startswith(v)), key=len, default=None)
    partner = "window" + name[len(variant):] if variant else None
    return partner if partner in results else None


def paired_speech(results):
    """Markdown lines: the speech-frame loss at minutes 4 and 90 (or the last) and over the first and last
    five minutes, and each model's difference from the window model of its seed, which cancels the held-out
    data's own changes from minute to minute; [] without a window model or speech losses."""
    rows = [(n, window_partner(n, results)) for n in results]
    rows = [(n, w) for n, w in rows if w and results[n]["loss_by_minute"].get("speech")]
    if not rows:
        return []
    sp = {n: np.asarray(r["loss_by_minute"]["speech"], dtype=np.float64) for n, r in results.items()
          if r["loss_by_minute"].get("speech")}
    n_min = min(len(v) for v in sp.values())
    m4, last = min(3, n_min - 1), n_min - 1
    pick = lambda x: (x[m4], x[last], x[:5].mean(), x[n_min - 5:n_min].mean() if n_min >= 5 else x[-1:].mean())
    out = ["", f"Speech-frame loss along the conversation, and each model's difference from the window model of its "
           "seed on the same frames (negative: lower). The window model remembers nothing past its window, so its "
           "own changes from minute to minute are the held-out data's; `blocks` is the spread of its 5-minute means "
           "(highest - lowest). The difference cancels them:", "",
           f"| model | minute {m4 + 1} | minute {last + 1} | min 1-5 | last 5 | - window: minute {m4 + 1} | "
           f"minute {last + 1} | min 1-5 | last 5 | last 5 - min 1-5 |", "|---|---|---|---|---|---|---|---|---|---|"]
    for w in dict.fromkeys(w for _, w in rows):
        x = sp[w][:n_min]
        blocks = [x[i:i + 5].mean() for i in range(0, n_min - 4, 5)]
        out.append(f"| {w} | " + " | ".join(f"{v:.3f}" for v in pick(x))
                   + (f" | blocks: {max(blocks) - min(blocks):.3f}" if blocks else " | -") + " | | | | |")
        for n in (n for n, ww in rows if ww == w):
            y = sp[n][:n_min]
            d = pick(y - x)
            out.append(f"| {n} | " + " | ".join(f"{v:.3f}" for v in pick(y)) + " | "
                       + " | ".join(f"{v:+.3f}" for v in d) + f" | {d[3] - d[2]:+.3f} |")
    return out


def _speech(lm):
    sp = lm.get("speech")   # (older result files lack it)
    return f"{_mean(sp[:5]):.3f} / {_mean(sp[-5:]):.3f}" if sp else "-"


def _mean(x):
    return sum(x) / max(1, len(x))


def _acc(b):
    return "-" if b["accuracy"] is None else f"{b['accuracy']:.3f}"


def _num(x):
    return "-" if x is None else f"{x:.2f}"


# -----------------------------------------------------------------------------


def assign_gpus(runs, variants, seeds, gpus):
    """{(variant, seed): GPU or None}: round robin over the GPUs, a variant's seeds one after another,
    variants in the order given. With 2 GPUs the slowest variant (ttt_mlp) shares its GPU with the
    fastest (window), and with several seeds each GPU gets a mix of variants, not one variant's every
    run (which would leave the GPUs of the fast variant idle while the others finish)."""
    order = sorted(runs, key=lambda r: (variants.index(r[0]), seeds.index(r[1])))
    return {r: (gpus[i % len(gpus)] if gpus else None) for i, r in enumerate(order)}


def gpu_list():
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES names them."""
    vis = os.environ.get("CUDA_VISIBLE_DEVICES")
    if vis is not None:
        return [g for g in vis.split(",") if g.strip()]
    try:
        import torch
        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:
        return []


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=list(SCALES), default="gpu", help="size of everything (default gpu)")
    ap.add_argument("--out", default="runs/experiment", help="folder for data, runs, figures and summary")
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                    help=f"comma-separated, of: {', '.join(VARIANTS)} (default: {', '.join(DEFAULT_VARIANTS)})")
    ap.add_argument("--stages", default="data,train,eval,report", help="comma-separated, of: data, train, eval, report")
    ap.add_argument("--parallel", type=int, default=0,
                    help="variants run at once, as subprocesses spread over the GPUs (0: all variants on CUDA, "
                         "1 on CPU; 1 runs in this process)")
    ap.add_argument("--steps", type=int, default=0, help="override the scale's training steps")
    ap.add_argument("--train_hours", type=float, default=0,
                    help="override the scale's hours of training conversations (more steps on the same hours "
                         "repeat them: the models learn the training conversations' patterns by heart)")
    ap.add_argument("--ttt_base_lr", type=float, default=0,
                    help="override the TTT layers' base inner learning rate (model.py's ttt_base_lr, default 1.0)")
    ap.add_argument("--stream_ttt_base_lr", type=float, default=0,
                    help="the TTT layers' base inner learning rate in the streaming phase alone (the drills "
                         "warm-up keeps the scale's, or --ttt_base_lr); the evaluation uses it too")
    ap.add_argument("--stream_ttt_half_life_s", type=float, default=0,
                    help="in the streaming phase alone, fast weights that fade toward their learnt start with this "
                         "half-life, seconds (model.py's ttt_half_life; default 0: they never forget, as the "
                         "official layer); the evaluation uses it too")
    ap.add_argument("--stream_ttt_half_life_max_s", type=float, default=0,
                    help="with --stream_ttt_half_life_s: learnt half-lives instead (model.py's ttt_half_life_max), "
                         "one per head and feature, starting log-spaced from --stream_ttt_half_life_s to this, seconds")
    ap.add_argument("--stream_ttt_half_life_lr_mult", type=float, default=1,
                    help="with --stream_ttt_half_life_max_s: the learnt half-lives' learning rate over the other "
                         "weights' (train.py --ttt_half_life_lr_mult; default 1)")
    ap.add_argument("--stream_ttt_forget_gate", action="store_true",
                    help="with --stream_ttt_half_life_s: a forget gate from the input scales each mini-batch's decay "
                         "(model.py's ttt_forget_gate; new weights that start as no gate)")
    ap.add_argument("--stream_ttt_write_penalty", type=float, default=0,
                    help="the streaming phase's train.py --ttt_write_penalty: loss weight of the TTT layers' mean "
                         "learning-rate gate (0: none; docs/experiment/reach/forget/writes.md: it lowers the gate "
                         "more than what the fast weights take in)")
    ap.add_argument("--stream_ttt_update_penalty", type=float, default=0,
                    help="the streaming phase's train.py --ttt_update_penalty: loss weight of how far each training "
                         "window moves the TTT fast weights beyond forgetting, over their learnt start's size (0: none)")
    ap.add_argument("--stream_ttt_update_penalty_power", type=float, default=1,
                    help="with --stream_ttt_update_penalty: the move to this power (train.py --ttt_update_penalty_power; "
                         "default 1; with 2 the pull fades with the move, but grows with it too: U 10 switched "
                         "the memory off, docs/experiment/reach/forget/writes.md)")
    ap.add_argument("--depth_layers", type=int, default=-1,
                    help="override the scale's depth decoder blocks (0: each codebook from a projection of the "
                         "backbone output and the previous codebook's embedding)")
    ap.add_argument("--window", type=int, default=0,
                    help="override the scale's short attention window, frames (12.5 a second)")
    ap.add_argument("--mode", choices=["streaming", "minibatch"], default="streaming",
                    help="train.py's mode (default streaming: state carried through whole conversations)")
    ap.add_argument("--dtype", choices=["", "bfloat16", "float32"], default="",
                    help="train.py's dtype (default: bfloat16 on a GPU; float32 with TF32 products learnt the "
                         "drills sooner in a GPU comparison, see docs/experiment)")
    ap.add_argument("--min_lr", type=float, default=-1,
                    help="override the scale's final learning rate (the scale's --lr: a constant rate)")
    ap.add_argument("--warmup_drills", type=int, default=-1,
                    help="train each variant first for this many steps on drills alone (mini-batch mode, "
                         "float32, constant learning rate), then the scale's training starts from it")
    ap.add_argument("--warmup_drills_hours", type=float, default=0,
                    help="override the scale's hours of drills for --warmup_drills (the scale's 220 hours are seen 19 "
                         "times in 11,500 steps; 4,400 hours once); made in one process for each 600 hours")
    ap.add_argument("--warmup_recall_weight", type=float, default=-1,
                    help="override the warm-up's loss weight of the recalled values' frames against 1 for the others "
                         "(train.py --recall_weight)")
    ap.add_argument("--quiz_max_s", type=float, default=-1,
                    help="override the scale's drill gaps: every drill event comes back 2 s to this many seconds "
                         "later (longer than the window: only a memory beyond it can answer some)")
    ap.add_argument("--quiz_share", type=float, default=-1,
                    help="override the share of the training conversations that are recall drills (the rest are "
                         "ordinary conversations like the held-out ones; the warm-up's drills stay)")
    ap.add_argument("--seed", type=int, default=SEED, help=f"train.py's seed (initial weights, batches; default {SEED}): "
                    "the data stay the same")
    ap.add_argument("--seeds", default="",
                    help="comma-separated seeds: every variant is trained and evaluated once per seed (runs/NAME_seedS), "
                         "on the same data, and the summary adds each variant's spread over the seeds")
    ap.add_argument("--gen_minutes", type=float, default=-1, help="override the scale's generation length (0: none)")
    ap.add_argument("--temp", type=float, default=-1,
                    help="override the generation's sampling temperature (default: generate.py's 0.8; 1 with "
                         "--top_k 0 samples the model's own distribution)")
    ap.add_argument("--top_k", type=int, default=-1, help="override the generation's top-k (default 250; 0: off)")
    ap.add_argument("--gen_budget_s", type=float, default=-1,
                    help="override the scale's time limit on generation, seconds (0: none)")
    ap.add_argument("--keep_optimizer", action="store_true",
                    help="keep train.py's resumable ckpt.pt (model + AdamW state) after a finished training")
    a = ap.parse_args(argv)
    a.variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    a.stages = [s.strip() for s in a.stages.split(",") if s.strip()]
    bad = [v for v in a.variants if v not in VARIANTS] + [s for s in a.stages if s not in ("data", "train", "eval", "report")]
    if a.ttt_base_lr < 0 or a.stream_ttt_base_lr < 0:
        ap.error(f"--ttt_base_lr and --stream_ttt_base_lr must be > 0, not {a.ttt_base_lr} and {a.stream_ttt_base_lr}")
    if not a.stream_ttt_half_life_s >= 0:
        ap.error(f"--stream_ttt_half_life_s must be a number of seconds (0: never forget), not {a.stream_ttt_half_life_s}")
    if a.stream_ttt_half_life_max_s and not 0 < a.stream_ttt_half_life_s <= a.stream_ttt_half_life_max_s < float("inf"):
        ap.error("--stream_ttt_half_life_max_s needs 0 < --stream_ttt_half_life_s <= --stream_ttt_half_life_max_s, "
                 f"not {a.stream_ttt_half_life_s} and {a.stream_ttt_half_life_max_s}")
    if a.stream_ttt_half_life_lr_mult != 1 and not (a.stream_ttt_half_life_lr_mult > 0 and a.stream_ttt_half_life_max_s):
        ap.error("--stream_ttt_half_life_lr_mult is the learnt half-lives' step size: it needs a number > 0 and "
                 f"--stream_ttt_half_life_max_s, not {a.stream_ttt_half_life_lr_mult} and {a.stream_ttt_half_life_max_s}")
    if a.stream_ttt_forget_gate and not a.stream_ttt_half_life_s:
        ap.error("--stream_ttt_forget_gate scales how fast the fast weights forget: give --stream_ttt_half_life_s too")
    if a.quiz_share != -1 and not 0 <= a.quiz_share <= 1:
        ap.error(f"--quiz_share is a share of the training conversations, from 0 to 1, not {a.quiz_share}")
    if not a.stream_ttt_write_penalty >= 0:
        ap.error(f"--stream_ttt_write_penalty must be 0 (none) or more, not {a.stream_ttt_write_penalty}")
    if not a.stream_ttt_update_penalty >= 0:
        ap.error(f"--stream_ttt_update_penalty must be 0 (none) or more, not {a.stream_ttt_update_penalty}")
    if a.stream_ttt_update_penalty_power != 1 and not (a.stream_ttt_update_penalty_power > 0 and a.stream_ttt_update_penalty):
        ap.error("--stream_ttt_update_penalty_power needs a power > 0 and --stream_ttt_update_penalty")
    if a.train_hours < 0:
        ap.error(f"--train_hours must be > 0, not {a.train_hours}")
    if a.warmup_drills_hours < 0:
        ap.error(f"--warmup_drills_hours must be > 0, not {a.warmup_drills_hours}")
    if bad or not a.variants:
        ap.error(f"unknown variant or stage: {', '.join(bad) or '(none given)'}")
    try:
        a.seeds = [int(x) for x in a.seeds.split(",") if x.strip()] or [a.seed]
    except ValueError:
        ap.error(f"--seeds takes integers separated by commas, not {a.seeds!r}")
    if len(set(a.seeds)) != len(a.seeds):
        ap.error(f"--seeds repeats a seed: {a.seeds}")
    return a


def main(argv=None):
    a = parse_args(argv)
    sc = json.loads(json.dumps(SCALES[a.scale]))      # a copy to override
    if a.steps:
        sc["train"]["max_steps"] = a.steps
        sc["train"]["warmup"] = min(sc["train"]["warmup"], a.steps)
    if a.ttt_base_lr:
        sc["model"]["ttt_base_lr"] = a.ttt_base_lr
    if a.stream_ttt_base_lr:
        sc["stream_ttt_base_lr"] = a.stream_ttt_base_lr
    if a.stream_ttt_half_life_s:
        sc["stream_ttt_half_life_s"] = a.stream_ttt_half_life_s
    if a.stream_ttt_half_life_max_s:
        sc["stream_ttt_half_life_max_s"] = a.stream_ttt_half_life_max_s
    if a.stream_ttt_forget_gate:
        sc["stream_ttt_forget_gate"] = True
    if a.stream_ttt_half_life_lr_mult != 1:
        sc["stream_ttt_half_life_lr_mult"] = a.stream_ttt_half_life_lr_mult
    if a.stream_ttt_write_penalty:
        sc["stream_ttt_write_penalty"] = a.stream_ttt_write_penalty
    if a.stream_ttt_update_penalty:
        sc["stream_ttt_update_penalty"] = a.stream_ttt_update_penalty
    if a.stream_ttt_update_penalty_power != 1:
        sc["stream_ttt_update_penalty_power"] = a.stream_ttt_update_penalty_power
    if a.train_hours:
        sc["train_hours"] = a.train_hours
    if a.depth_layers >= 0:
        sc["model"]["depth_layers"] = a.depth_layers
    if a.window:
        sc["model"]["window"] = a.window
    sc["mode"] = a.mode
    if a.dtype:
        sc["train"]["dtype"] = a.dtype
    if a.warmup_drills >= 0:
        sc["warmup_drills"]["steps"] = a.warmup_drills
    if a.warmup_drills_hours:
        sc["warmup_drills"]["hours"] = a.warmup_drills_hours
    if a.warmup_recall_weight >= 0:
        sc["warmup_drills"]["recall_weight"] = a.warmup_recall_weight
    if a.min_lr >= 0:
        sc["train"]["min_lr"] = a.min_lr
    if a.quiz_max_s >= 0:
        sc["train_quiz"]["quiz_max_s"] = a.quiz_max_s
    if a.quiz_share >= 0:
        sc["train_quiz"]["quiz_share"] = a.quiz_share
    sc["seed"] = a.seeds[0]
    if a.gen_minutes >= 0:
        sc["eval"]["gen_minutes"] = a.gen_minutes
    if a.gen_budget_s >= 0:
        sc["eval"]["gen_budget_s"] = a.gen_budget_s
    if a.temp >= 0:
        sc["eval"]["temp"] = a.temp
    if a.top_k >= 0:
        sc["eval"]["top_k"] = a.top_k
    os.makedirs(a.out, exist_ok=True)
    t0 = time.time()
    if "data" in a.stages:
        train_path, held_path = make_data(sc, a.out)
        print_flush(f"data: {_fmt(time.time() - t0)}")
    else:
        train_path, held_path = (os.path.join(a.out, "data", n) for n in ("train.bin", "heldout.bin"))
    _write_json(os.path.join(a.out, "config.json"), {"scale": a.scale, "variants": {n: model_args(sc, n) for n in a.variants},
                                                      **{k: v for k, v in sc.items() if k != "model"}})

    failed = []
    if "train" in a.stages or "eval" in a.stages:
        on_cpu = sc["train"].get("device") == "cpu"
        gpus = [] if on_cpu else gpu_list()
        runs = [(n, s) for s in a.seeds for n in a.variants]   # (variant, seed), a seed's variants together
        parallel = a.parallel or (len(runs) if gpus else 1)
        in_process = parallel == 1 and len(gpus) <= 1
        a.threads = max(1, (os.cpu_count() or 1) // parallel)   # CPU threads of each subprocess
        gpu_of = assign_gpus(runs, a.variants, a.seeds, gpus)
        lock = threading.Lock()

        def job(run):
            name, seed = run
            try:
                if not pipeline(name, sc, a, train_path, held_path, gpu_of[run], in_process, seed):
                    with lock:
                        stopped.append(run)
            except Exception as e:
                with lock:
                    failed.append(run)
                print_flush(f"[{run_label(name, seed, a.seeds)}] FAILED: {e}")
        stopped = []
        if in_process:
            for r in runs:
                job(r)
                if stopped:
                    break
        else:
            pool = ThreadPoolExecutor(parallel)
            futures = [pool.submit(job, r) for r in runs]
            try:
                for f in futures:
                    f.result()
            except KeyboardInterrupt:   # the trainings got the signal too: each finishes its step and checkpoints
                print_flush("interrupted: waiting for the trainings to write their checkpoints")
                for f in futures:
                    f.cancel()
                stopped.append("interrupted")
            pool.shutdown(wait=True)
        if stopped:
            sys.exit("stopped before the end of training: run the same command again to resume")
        print_flush(f"runs: {_fmt(time.time() - t0)} so far")
    if "report" in a.stages:
        report(a, [(n, s) for s in a.seeds for n in a.variants if (n, s) not in failed])
    print_flush(f"done in {_fmt(time.time() - t0)}: {a.out}")
    if failed:
        sys.exit(f"failed: {', '.join(run_label(n, s, a.seeds) for n, s in failed)} "
                 f"(see their logs under {os.path.join(a.out, 'runs')})")


if __name__ == "__main__":
    main()
