"""
How long does one TTT layer keep a single association? The inner loop alone (ttt.ttt_linear /
ttt.ttt_mlp, float64, one head of d = 64, mini-batch b = 16, the layers' initial inner weights and
token weights tau_i = 1/(i+1)): write one pair (k*, v*) once, then N other pairs, then read the
memory at k* and check that what comes back, f(k*) - as the inner loss trains it, an estimate of
v* - k* - is closer (cosine) to v* - k* than to v - k* for every other value v of a 256-value
alphabet (chance 1/256). Keys and values have entries of standard deviation --scale (the layer's
projections set it in a model); every token has the same inner learning rate, given as base_lr, which
the layer turns into base_lr * sigmoid(gate) / d (here the gate's largest value, 1).

    python scripts/ttt_memory.py                 # a table: accuracy by base_lr and N, both inner models

This is what a model has to work with when it stores a pattern once and reads it back minutes later:
a fact about the layer, not about training.
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ttt  # noqa: E402


def probe(kind, base_lr, n_after, scale, trials, d=64, b=16, alphabet=256, seed=0):
    """Top-1 retrieval accuracy of the first of 1 + n_after associations written in order; of the last
    one; and of a key never written (a control: chance)."""
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    H, T = 1, 1 + n_after
    keys = torch.randn(trials, H, T + 1, d, generator=g, dtype=f64) * scale   # the last one: never written
    vals = torch.randn(alphabet, d, generator=g, dtype=f64) * scale
    idx = torch.randint(0, alphabet, (trials, T + 1), generator=g)
    v = vals[idx][:, None]                                                     # [B, H, T + 1, d]
    lr = torch.full((trials, H, T), base_lr / d, dtype=f64)
    tau = 1.0 / torch.arange(1, b + 1, dtype=f64)
    ln_w, ln_b = torch.ones(H, d, dtype=f64), torch.zeros(H, d, dtype=f64)
    m = d if kind == "linear" else 4 * d
    shapes = [(d, d), (1, d)] if kind == "linear" else [(d, m), (1, m), (m, d), (1, d)]
    params = tuple((torch.randn(trials, H, *s, generator=g, dtype=f64) * 0.02) if s[0] != 1
                   else torch.zeros(trials, H, *s, dtype=f64) for s in shapes)
    state = ttt.TTTState(params, tuple(torch.zeros_like(p) for p in params), torch.zeros((), dtype=torch.int64))
    fn = ttt.ttt_linear if kind == "linear" else ttt.ttt_mlp
    _, state = fn(keys[:, :, :T], keys[:, :, :T], v[:, :, :T], lr, tau, ln_w, ln_b, b, state)  # write T pairs
    accs = []
    for t in (0, T - 1, T):   # read with the learning rate at 0: reading writes nothing
        kq = keys[:, :, t:t + 1]
        out, _ = fn(kq, kq, v[:, :, t:t + 1], torch.zeros(trials, H, 1, dtype=f64), tau, ln_w, ln_b, b, state)
        r = (out - kq)[:, 0, 0]                                                # f(k): [B, d]
        cands = vals[None] - kq[:, 0]                                          # v - k [B, alphabet, d]
        best = F.cosine_similarity(r[:, None], cands, dim=-1).argmax(-1)
        accs.append((best == idx[:, t]).double().mean().item())
    return accs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=256)
    ap.add_argument("--scale", type=float, default=1.0, help="standard deviation of key and value entries")
    ap.add_argument("--base_lr", type=float, nargs="+", default=[1.0, 10.0, 100.0])
    ap.add_argument("--after", type=int, nargs="+", default=[0, 15, 63, 255, 1023])
    ap.add_argument("--kinds", nargs="+", default=["linear", "mlp"])
    a = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"one head of 64, b = 16, key and value entries of std {a.scale:g}, {a.trials} trials, chance 1/256\n")
    print("Each cell: the first pair / the last pair / a key never written (control).\n")
    print("| inner model | base_lr | " + " | ".join(f"{n} pairs after the first" for n in a.after) + " |")
    print("|---|---:|" + "---:|" * len(a.after))
    for kind in a.kinds:
        for lr in a.base_lr:
            cells = [" / ".join(f"{x:.2f}" for x in probe(kind, lr, n, a.scale, a.trials)) for n in a.after]
            print(f"| TTT-{kind.upper() if kind == 'mlp' else 'Linear'} | {lr:g} | " + " | ".join(cells) + " |",
                  flush=True)


if __name__ == "__main__":
    main()
