"""
How much each TTT layer writes into its fast weights, by the kind of frame: the per-token inner
learning-rate gate sigmoid(w . x + c) (ttt.py's lr_gate, the lr without base_lr / d; 1 writes at the full step,
0 writes nothing), and where the layer has one the forget gate's exponent s, averaged per head over
the frames of each kind of the held-out conversations:

    cue / key / value     the frames of a recall event's first mention (the pattern to store)
    recall cue / key / value   the same frames when the pattern comes back
    other                 every other frame (speech and silence)

A layer that stores patterns selectively writes more on the first mentions' values than elsewhere;
one that writes every frame alike fills its fast weights with speech between a pattern and its recall.
A gate says how large a step a frame may take, not how far it moves the fast weights: a frame the fast
weights already predict has a small inner gradient. For TTT-Linear the script also reports each frame's
step, ||tau_last lr_t g_t|| / ||W_0||: the size of its term in the update at its mini-batch's end (g_t the
inner gradient at the mini-batch's starting weights, W_0 the learnt start, W1 and b1 together).

    python scripts/write_rates.py --data heldout.bin --ckpt runs/ttt_linear --minutes 10
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from data import CUE_LEN, KEY_LEN  # noqa: E402
from evaluate import FRAMES_PER_MINUTE, check_fits, chunk, recall_data  # noqa: E402
from model import SpeechLM  # noqa: E402
from ttt import _ln_l2_grad  # noqa: E402

KINDS = ("cue", "key", "value", "recall cue", "recall key", "recall value", "other")


def frame_kinds(events, convs, start, T):
    """[B, T] int: the index in KINDS of each frame start..start+T of each row (conversation convs[row])."""
    out = np.full((len(convs), T), len(KINDS) - 1, np.int64)
    for conv, _, first, recall, vlen in events:
        if conv not in convs:
            continue
        r = convs.index(conv)
        for base, v in ((0, first), (3, recall)):   # v: the value's first frame
            for kind, lo, hi in ((0, v - CUE_LEN - KEY_LEN, v - KEY_LEN), (1, v - KEY_LEN, v), (2, v, v + vlen)):
                lo, hi = max(lo - start, 0), min(hi - start, T)
                if lo < hi:
                    out[r, lo:hi] = base + kind
    return out


@torch.no_grad()
def token_steps(layer, x, state):
    """Each token's step [B, H, T] for a TTT-Linear layer's call over x [B, T, dim] from state (None:
    fresh): ||tau_last lr_t g_t|| / ||W_0||, g_t = (k_t^T dz_t, dz_t) the inner gradient at the weights its
    mini-batch starts from, its norm ||dz_t|| sqrt(||k_t||^2 + 1). The layer is run again piece by piece
    (up to each mini-batch's end) on the PyTorch path to know those weights."""
    if layer.kind != "linear":
        raise ValueError("token steps are written out for TTT-Linear only")
    B, T, _ = x.shape
    b = layer.mini_batch
    state = layer.init_state(B, device=x.device) if state is None else state
    q, k, v, lr, tau = layer.inner_inputs(x, state.i)
    gate = layer.forget_gate(x)
    dt = state.params[0].dtype
    q, k, v, lr, tau = (t.to(dt) for t in (q, k, v, lr, tau))
    ln_w, ln_b = (w.to(dt)[:, None] for w in (layer.ttt_norm_weight, layer.ttt_norm_bias))   # [H, 1, d]
    size = torch.sqrt(sum(w.to(dt).square().sum((-2, -1)) for w in layer.fast_weights()))  # [H]
    steps, t = [], 0
    while t < T:
        n = min(b - int(state.i), T - t)
        W1, b1 = state.params
        piece = slice(t, t + n)
        dz = _ln_l2_grad(k[:, :, piece] @ W1 + b1, v[:, :, piece] - k[:, :, piece], ln_w, ln_b)   # [B,H,n,d]
        g = dz.norm(dim=-1) * torch.sqrt(k[:, :, piece].square().sum(-1) + 1)                      # [B,H,n]
        steps.append(tau[-1] * lr[:, :, piece] * g / size[:, None])
        _, state = layer._inner(q[:, :, piece], k[:, :, piece], v[:, :, piece], lr[:, :, piece], tau, state,
                                "torch", None if gate is None else gate[:, :, piece])
        t += n
    return torch.cat(steps, -1)


@torch.no_grad()
def write_rates(model, f, convs, events, minutes, chunk_len=750):
    """Per TTT layer: dict gate -> [len(KINDS), H] mean over frames of each kind (NaN where none), for
    gate in "lr" (the learning-rate gate), for a gated layer "forget" (its exponent s), and for TTT-Linear
    "step" (token_steps); and the frame count of each kind."""
    cfg = model.cfg
    layers = [b.ttt.layer for b in model.layers if b.ttt is not None]
    if not layers:
        raise ValueError("the model has no TTT layer")
    seen = {}
    hooks = [t.register_forward_pre_hook(lambda mod, args, j=j: seen.__setitem__(j, args))
             for j, t in enumerate(layers)]
    gates = lambda t: ("lr",) + (("forget",) if t.gates() else ()) + (("step",) if t.kind == "linear" else ())
    sums = [{g: np.zeros((len(KINDS), t.n_heads)) for g in gates(t)} for t in layers]
    counts = np.zeros(len(KINDS))
    state = model.init_state(len(convs))
    n = min(int(f.lengths[convs].max()), round(minutes * FRAMES_PER_MINUTE))
    try:
        for start in range(0, n, chunk_len):
            T = min(chunk_len, n - start)
            x, live = chunk(f, convs, start, T, cfg.col_delays(), cfg.col_cards())
            _, state = model(torch.from_numpy(x), state)
            kinds = np.where(live, frame_kinds(events, convs, start, T), -1)
            onehot = torch.from_numpy(np.stack([kinds == k for k in range(len(KINDS))]).astype(np.float64))  # [K, B, T]
            counts += onehot.sum((1, 2)).numpy()
            for j, t in enumerate(layers):
                xs, before = seen[j]
                gate = t.lr_gate(xs).double()                                       # [B, H, T]
                sums[j]["lr"] += torch.einsum("kbt,bht->kh", onehot, gate).numpy()
                if "forget" in sums[j]:
                    sums[j]["forget"] += torch.einsum("kbt,bht->kh", onehot, t.forget_gate(xs).double()).numpy()
                if "step" in sums[j]:
                    sums[j]["step"] += torch.einsum("kbt,bht->kh", onehot, token_steps(t, xs, before).double()).numpy()
    finally:
        for h in hooks:
            h.remove()
    with np.errstate(invalid="ignore", divide="ignore"):
        return [{g: s / counts[:, None] for g, s in d.items()} for d in sums], counts


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="held-out codes file with recall events (data.py synthetic)")
    ap.add_argument("--ckpt", action="append", required=True, help="a checkpoint (run folder or .safetensors); repeat")
    ap.add_argument("--minutes", type=float, default=10, help="the first this many minutes of each conversation")
    ap.add_argument("--conversations", type=int, default=0, help="the first N conversations (0: all)")
    a = ap.parse_args(argv)
    if not a.minutes > 0:
        ap.error(f"--minutes must be more than 0, not {a.minutes}")
    torch.set_num_threads(min(8, os.cpu_count() or 1))
    try:
        f, convs, events = recall_data(a.data, a.conversations)
    except ValueError as e:
        sys.exit(str(e))
    out = {}
    for path in a.ckpt:
        model = SpeechLM.from_checkpoint(path).eval()
        if not any(b.ttt is not None for b in model.layers):
            sys.exit(f"{path} has no TTT layer: no fast weights to write into")
        try:
            check_fits(model.cfg, f, a.data)
        except ValueError as e:
            sys.exit(f"{path}: {e}")
        rates, counts = write_rates(model, f, convs, events, a.minutes)
        out[path] = dict(rates=[{g: v.tolist() for g, v in d.items()} for d in rates], counts=counts.tolist())
        print(f"{path}: {len(convs)} conversations, their first {a.minutes:g} minutes; mean over the frames of "
              "each kind, heads separated by /")
        print("| TTT layer | gate | " + " | ".join(f"{k} ({int(c)})" for k, c in zip(KINDS, counts)) + " |")
        print("|---|---|" + "---:|" * len(KINDS))
        for j, d in enumerate(rates):
            for g, v in d.items():
                print(f"| {j + 1} | {dict(lr='learning rate', forget='forget s', step='step')[g]} | "
                      + " | ".join(" / ".join(f"{x:.3g}" if g == "step" else f"{x:.3f}" for x in row) for row in v) + " |")
        print()
    return out


if __name__ == "__main__":
    main()
