"""DDP and FSDP2 through torchrun, on the CPU (gloo): the sharded run must train exactly like the
replicated one (same initial weights on every rank, same data, same losses)."""
import os
import re
import subprocess
import sys

import pytest

from data import synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _losses(tmp_path, data, name, *extra, procs=2):
    launch = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
              str(29500 + os.getpid() % 1000)] if procs == 2 else []
    cmd = [sys.executable, *launch, os.path.join(ROOT, "train.py"), "--data", data, "--preset", "tiny",
           "--seq_len", "32", "--batch_size", "2", "--max_steps", "4", "--eval_interval", "0", "--log_interval", "1",
           "--warmup", "2", "--device", "cpu", "--out_dir", str(tmp_path / name), *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    return [float(x) for x in re.findall(r"^step \d+/\d+ .*?\| loss ([0-9.]+)", r.stdout, re.M)]


def test_ddp_and_fsdp_train_alike(tmp_path):
    data = str(tmp_path / "s.bin")
    synthetic(data, hours=0.3, min_minutes=1.0, max_minutes=3.0, n_codebooks=2, seed=0, quiet=True)
    ddp = _losses(tmp_path, data, "ddp")
    fsdp = _losses(tmp_path, data, "fsdp", "--fsdp", "true")
    assert len(ddp) == 4 and ddp[-1] < ddp[0]
    assert fsdp == pytest.approx(ddp, rel=1e-4)


def test_fsdp_mixed_precision_keeps_ttt_state_float32(tmp_path):
    # FSDP's bf16 policy must not cast the carried state into the blocks (the model refuses a
    # bf16 TTT state with a clear error, so this run fails if it does)
    data = str(tmp_path / "s.bin")
    synthetic(data, hours=0.3, min_minutes=1.0, max_minutes=3.0, n_codebooks=2, seed=0, quiet=True)
    losses = _losses(tmp_path, data, "bf16", "--fsdp", "true", "--dtype", "bfloat16", "--ttt_mini_batch", "16")
    assert len(losses) == 4


@pytest.mark.parametrize("fsdp", ["false", "true"])
def test_two_ranks_equal_one_with_accumulation(tmp_path, fsdp):
    # mini-batch mode at equal global batch: 2 ranks x 2 rows and 1 process x 2 rows x 2 micro-batches
    # draw the same windows, so they give the same losses
    data = str(tmp_path / "s.bin")
    synthetic(data, hours=0.3, min_minutes=1.0, max_minutes=3.0, n_codebooks=2, seed=0, quiet=True)
    two = _losses(tmp_path, data, "two", "--mode", "minibatch", "--fsdp", fsdp)
    one = _losses(tmp_path, data, "one", "--mode", "minibatch", "--grad_accum", "2", procs=1)
    assert len(two) == 4 and two == pytest.approx(one, rel=1e-4)
