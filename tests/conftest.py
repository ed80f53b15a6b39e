import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def pytest_collection_modifyitems(config, items):
    import torch
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def run_interpreted():
    """Run a check script in a fresh process under Triton's CPU interpreter (the script imports
    `interpreted` first); the script must exit 0 and print `expect`."""
    pytest.importorskip("triton")
    import subprocess

    def run(check, expect):
        r = subprocess.run([sys.executable, "-c", check, ROOT], capture_output=True, text=True,
                           timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stdout + r.stderr
        assert expect in r.stdout, r.stdout
    return run
