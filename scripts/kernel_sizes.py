"""
How big TTT-Linear's Triton kernels compile for an H100 (sm_90), without a GPU (Triton ships ptxas):
PTX instructions and shared memory of each kernel, with the official update (DECAY off) and with
fast weights that forget (DECAY on), and with a forget gate (gate: each mini-batch's decays read
from a table of its own). Run it in two checkouts to see what a change did to the
compiled code.

    python scripts/kernel_sizes.py            # b = 16
    python scripts/kernel_sizes.py --b 64
"""
import argparse
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ttt  # noqa: E402

INTS = ("T", "NMS", "NCS", "H", "M0", "M1", "J0", "J1")


def sizes(kern, consts, warps):
    """[(DECAY, PTX instructions, shared bytes)] of one kernel, as the layer launches it; DECAY None
    (the kernel has no decay), False, True, or "gate" (with a forget gate: each mini-batch's decays)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    names, out = kern.arg_names, []
    decays = (None,) if "DECAY" not in names else (False, True, "gate") if "PER_MB" in names else (False, True)
    for decay in decays:
        kc = consts if decay is None else {**consts, "DECAY": bool(decay)}
        if "PER_MB" in names:
            kc["PER_MB"] = decay == "gate"
        sig = {n: "constexpr" if n in kc else "i32" if n in INTS else "*i64" if n == "i_ptr"
               else "fp32" if n == "gam" else "*fp32" for n in names}   # (gam: the scalar decay of older code)
        src = ASTSource(fn=kern, signature=sig, constexprs={(names.index(n),): v for n, v in kc.items()})
        c = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": 3})
        n = sum(1 for line in c.asm["ptx"].splitlines()
                if re.match(r"^\s+[a-z@]", line) and not line.strip().startswith((".", "//")))
        out.append((decay, n, c.metadata.shared))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--b", type=int, default=16, help="mini-batch size (16 or 64)")
    a = ap.parse_args(argv)
    if ttt.triton is None:
        sys.exit("triton is not installed")
    b, w = a.b, 8 if a.b * 64 <= 1024 else 4
    kernels = [("_ttt_linear_fwd_kernel", dict(SEG=16, SAVE=True, STAGES=ttt.TRITON_FWD["stages"]), ttt.TRITON_FWD["num_warps"]),
               ("_ttt_linear_bwd_kernel", dict(SEG=16), w),
               ("_ttt_linear_scan_kernel", dict(STAGES=ttt.TRITON_FWD["stages"]), ttt.TRITON_FWD["num_warps"]),
               ("_ttt_linear_bwd_walk_kernel", dict(STAGES=ttt.TRITON_FWD["stages"]), 4),
               ("_ttt_linear_bwd_par_kernel", dict(HAS_G=True), w)]
    print(f"TTT-Linear's kernels for sm_90, head width 64, b = {b}\n")
    print("| kernel | DECAY | PTX instructions | shared memory, bytes |\n|---|---|---:|---:|")
    for name, extra, warps in kernels:
        for decay, n, shared in sizes(getattr(ttt, name), dict(D=64, BS=b, DOT=ttt.TRITON_DOT, **extra), warps):
            label = "-" if decay is None else decay if decay == "gate" else "on" if decay else "off"
            print(f"| {name} | {label} | {n} | {shared} |", flush=True)


if __name__ == "__main__":
    main()
