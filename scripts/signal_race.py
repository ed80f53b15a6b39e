"""Why train.py and generate.py put their signal handlers back at every step.

The first time Triton compiles a kernel, its compiler (LLVM) installs a SIGTERM handler of its own in
front of Python's, with SA_RESETHAND: as it runs, the action goes back to the default (die). It then
hands the signal on to Python's handler. `timeout` sends SIGTERM to the process and then to its process
group, microseconds apart, so the second can land in that window and kill the run before it writes its
checkpoint. This script shows it: each child installs a Python handler, compiles one small kernel (for
an H100's target: no GPU is needed), optionally installs its handler again, and gets two SIGTERMs back
to back. Needs triton (pip install triton).

    python scripts/signal_race.py --runs 8
"""
import argparse
import ctypes
import os
import signal
import subprocess
import sys
import tempfile
import time


def child(again):
    got = []
    signal.signal(signal.SIGTERM, lambda s, f: got.append(s))
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget

    @triton.jit
    def double(x, y, n, B: tl.constexpr):
        o = tl.arange(0, B)
        tl.store(y + o, tl.load(x + o, mask=o < n) * 2, mask=o < n)
    src = triton.compiler.ASTSource(fn=double, signature={"x": "*fp32", "y": "*fp32", "n": "i32"},
                                    constexprs={"B": 128})
    triton.compile(src, target=GPUTarget("cuda", 90, 32))
    if again:
        signal.signal(signal.SIGTERM, lambda s, f: got.append(s))
    sa = ctypes.create_string_buffer(152)          # struct sigaction (x86-64 Linux): sa_flags at byte 136
    ctypes.CDLL(None).sigaction(signal.SIGTERM, None, sa)
    print(f"flags {int.from_bytes(sa.raw[136:140], 'little'):#x}", flush=True)
    t = time.time()
    while time.time() - t < 3:                     # busy, as a training step is; then report
        pass
    sys.exit(0 if got else 3)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=8)
    ap.add_argument("--child", choices=["once", "again"])
    a = ap.parse_args()
    if a.child:
        return child(a.child == "again")
    print("| handler put back after compiling | killed by the second SIGTERM | handled | sa_flags after compiling |")
    print("|---|---:|---:|---|")
    for mode in ("once", "again"):
        killed = handled = 0
        flags = set()
        for _ in range(a.runs):
            with tempfile.TemporaryDirectory() as cache:   # a cold cache: the compiler runs every time
                p = subprocess.Popen([sys.executable, __file__, "--child", mode], stdout=subprocess.PIPE, text=True,
                                     env={**os.environ, "TRITON_CACHE_DIR": cache})
                flags.add(p.stdout.readline().split()[-1])
                time.sleep(0.2)
                os.kill(p.pid, signal.SIGTERM)             # as `timeout` does: the process, then its group
                os.kill(p.pid, signal.SIGTERM)
                p.wait()
                killed += p.returncode == -signal.SIGTERM
                handled += p.returncode == 0
        print(f"| {'yes' if mode == 'again' else 'no'} | {killed} of {a.runs} | {handled} | {', '.join(sorted(flags))} |")


if __name__ == "__main__":
    main()
