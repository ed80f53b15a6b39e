"""
Our TTTLinear and TTTMLP against the official layers of ttt-lm-pytorch (test-time-training/
ttt-lm-pytorch, its ttt.py), with the same weights loaded by name:

    git clone https://github.com/test-time-training/ttt-lm-pytorch
    python scripts/ttt_official_parity.py ttt-lm-pytorch/ttt.py

The official file imports transformers (a test extra here). For each layer type, dtype, mini-batch
size b and a length that is a multiple of b and one that is not, prints the relative difference of
our outputs (one call, and one token a call) and of the gradients of a loss with respect to W1, the
q projection and the token-index offsets. Every parameter is moved off its initial value first, so
that each one counts. Both make their RoPE tables in float32 whatever the layer's dtype, in
slightly different ways, which bounds the float64 agreement near 1e-8.
"""
import argparse
import importlib.util
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ttt  # noqa: E402


def load_official(path):
    spec = importlib.util.spec_from_file_location("ttt_lm_pytorch_official", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def compare(path, kinds=("linear", "mlp"), dtypes=(torch.float64, torch.float32), bs=(4, 16), width=256, heads=4):
    """Rows (kind, dtype, b, L, out, streaming out, grad W1, grad q_proj, grad token_idx): relative differences."""
    off = load_official(path)
    rel = lambda a, r: ((a - r).norm() / r.norm()).item()
    rows = []
    torch.manual_seed(0)
    for kind in kinds:
        for dtype in dtypes:
            for b in bs:
                cfg = off.TTTConfig(hidden_size=width, num_attention_heads=heads, mini_batch_size=b, use_gate=True,
                                    ttt_layer_type=kind, ttt_base_lr=1.0, rope_theta=10000.0)
                theirs = (off.TTTLinear if kind == "linear" else off.TTTMLP)(cfg, layer_idx=0)
                mine = (ttt.TTTLinear if kind == "linear" else ttt.TTTMLP)(width, heads, mini_batch=b, gate=True)
                with torch.no_grad():
                    for p in theirs.parameters():
                        p.add_(0.05 * torch.randn_like(p))
                mine.load_state_dict(theirs.state_dict(), strict=True)   # the same names and shapes
                theirs, mine = theirs.to(dtype), mine.to(dtype)
                for L in (4 * b, 4 * b + b // 2 + 1):
                    x = torch.randn(2, L, width, dtype=dtype)
                    y_ref = theirs(x, position_ids=torch.arange(L)[None].expand(2, L))
                    y, _ = mine(x)
                    ys, st = [], None
                    for t in range(L):   # the streaming form: one token a call
                        yt, st = mine(x[:, t:t + 1], st)
                        ys.append(yt)
                    g_ref = torch.autograd.grad(y_ref.square().sum(),
                                                [theirs.W1, theirs.q_proj.weight, theirs.learnable_token_idx])
                    g = torch.autograd.grad(y.square().sum(), [mine.W1, mine.q_proj.weight, mine.learnable_token_idx])
                    rows.append((kind, str(dtype).split(".")[1], b, L, rel(y, y_ref), rel(torch.cat(ys, 1), y_ref),
                                 *(rel(a, r) for a, r in zip(g, g_ref))))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("official", help="path to ttt-lm-pytorch's ttt.py")
    a = ap.parse_args(argv)
    if not os.path.isfile(a.official):
        sys.exit(f"error: {a.official} is not a file; give the path of ttt-lm-pytorch's ttt.py")
    print("| layer | dtype | b | tokens | output | one token a call | grad W1 | grad q_proj | grad token offsets |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in compare(a.official):
        print("| " + " | ".join(str(v) for v in r[:4]) + " | " + " | ".join(f"{v:.1e}" for v in r[4:]) + " |",
              flush=True)


if __name__ == "__main__":
    main()
