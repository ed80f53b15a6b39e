"""
TTT-Linear and TTT-MLP layers (Sun et al. 2024, "Learning to (Learn at Test Time): RNNs with
Expressive Hidden States", arXiv:2407.04620), exact in chunked and in streaming form.

A TTT layer's hidden state is a small model f(.; W) (a linear map or a 2-layer MLP, per head) that is
trained by gradient descent on a self-supervised loss while the sequence is read. With mini-batch
size b and position i = t mod b inside the mini-batch (DESIGN.md, "TTT layer"):

    loss_j = 1/2 || f(k_j; W) - (v_j - k_j) ||^2          g_j = grad of loss_j at W_start
    out_i  = q_i + f(q_i; W_start - tau_i * sum_{j<=i} lr_j g_j)
    after a full mini-batch: W_start <- W_start - tau_{b-1} * sum_{j<b} lr_j g_j
    (option, not in the official layer: fast weights that forget, decay < 1, also
     W_start <- ... - (1 - decay) (W_start - W_0), toward the learnt start W_0; the decay may be
     one number or, learnt, one per head and output feature; and a forget gate may scale it per
     mini-batch from the input: decay ** s_t)

The state carried between calls is (W_start, the running sum sum_j lr_j g_j, i), all float32, so
a call may begin and end anywhere inside a mini-batch and any split of a sequence into calls gives
the same result as one call.

    ttt_linear / ttt_mlp     pure functions of the inner loop, plain PyTorch (the reference):
                             a chunked dual form for T > 1, a per-token primal form for T = 1
    Triton kernels           a fast path for TTT-Linear and TTT-MLP on the GPU (forward and
                             backward), tested against the reference
    TTTLinear / TTTMLP       the layer of ttt-lm-pytorch (projections, RoPE, learning-rate gate,
                             post-norm, output gate) around the pure functions

Shapes: B batch, H heads, T tokens, d head width, b mini-batch size, n tokens of one mini-batch.
"""
import functools
import math
import warnings
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the PyTorch path below is complete on its own
    triton = None

LN_EPS = 1e-6  # inner LayerNorm and post-norm, as ln_fwd and post_norm in ttt-lm-pytorch
GELU_C = math.sqrt(2.0 / math.pi)  # tanh approximation of gelu, as upstream (matches the JAX code)


class TTTState(NamedTuple):
    """What a TTT layer carries between calls; a tree of tensors (detach, torch.where, copy, size).

    params: fast weights at the start of the current mini-batch, each [B, H, ...]
            (TTT-Linear: W1 [B,H,d,d], b1 [B,H,1,d]; TTT-MLP: W1 [B,H,d,4d], b1, W2 [B,H,4d,d], b2)
    grads:  running sums sum_{j<i} lr_j g_j over the tokens of the current mini-batch seen so far,
            same shapes as params (zero when i == 0, in every state this code makes)
    i:      int64 [], position inside the current mini-batch (shared by all batch rows)
    """
    params: tuple
    grads: tuple
    i: torch.Tensor


def detach_state(state: TTTState) -> TTTState:
    """Cut the autograd history of a state (truncated backprop between training windows)."""
    return TTTState(tuple(p.detach() for p in state.params), tuple(g.detach() for g in state.grads),
                    state.i.detach())

# -----------------------------------------------------------------------------
# Inner-loop math shared by both inner models


def _ln(z, w, b):
    """Per-head LayerNorm: z [..., d], w and b [H, 1, d]."""
    return F.layer_norm(z, z.shape[-1:], eps=LN_EPS) * w + b


def _ln_l2_grad(z, target, w, b):
    """d/dz of 1/2 || LN(z) - target ||^2, written out (upstream ln_fused_l2_bwd) so that the inner
    gradient is an ordinary forward computation that outer autograd differentiates through."""
    mu = z.mean(-1, keepdim=True)                                   # [..., 1]
    sd = torch.sqrt(z.var(-1, keepdim=True, unbiased=False) + LN_EPS)  # [..., 1]
    xh = (z - mu) / sd                                              # [..., d] normalised z
    gxh = (w * xh + b - target) * w                                 # [..., d] d loss / d xh
    # LayerNorm backward: remove the parts of gxh along 1 and along xh, then undo the scale
    return (gxh - gxh.mean(-1, keepdim=True) - xh * (gxh * xh).mean(-1, keepdim=True)) / sd


def _gelu(x):
    return F.gelu(x, approximate="tanh")


def _gelu_grad(x):
    """d gelu_tanh(x) / dx with the exact constants (upstream gelu_bwd rounds them to 8 digits)."""
    t = torch.tanh(GELU_C * (x + 0.044715 * x ** 3))
    return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * GELU_C * (1 + 3 * 0.044715 * x * x)

# -----------------------------------------------------------------------------
# TTT-Linear: f(x; W) = LN(x W1 + b1)


def _linear_minibatch(params, grads, q, k, v, lr, tau, ln_w, ln_b):
    """Dual form over n tokens that lie in one mini-batch (paper Sec. 2.5, upstream TTTLinear.ttt).

    params: W1 [B,H,d,d], b1 [B,H,1,d] at the mini-batch start; grads: the running sums of the
    tokens of this mini-batch already seen, or None at its start; q/k/v [B,H,n,d]; lr [B,H,n];
    tau [n] (positions of these tokens). Returns out [B,H,n,d] and the sums extended by these tokens.
    """
    W1, b1 = params
    z1 = k @ W1 + b1                                      # [B,H,n,d] f's pre-norm at W_start
    gz1 = _ln_l2_grad(z1, v - k, ln_w, ln_b)              # [B,H,n,d] d loss_j / d z1_j
    # g_j = (k_j^T gz1_j, gz1_j), so q_i (W1 - tau_i sum_j lr_j g_j) needs only q_i.k_j: the dual form
    eta = tau[:, None] * lr[..., None, :]                 # [B,H,n,n] tau_i lr_j
    att = torch.tril(q @ k.transpose(-2, -1) + 1)         # [B,H,n,n] j <= i; +1 is the bias's share
    z1q = q @ W1 + b1 - (eta * att) @ gz1                 # [B,H,n,d]
    GW1 = (lr[..., None] * k).transpose(-2, -1) @ gz1     # [B,H,d,d] sum_j lr_j g_j of these tokens
    Gb1 = (lr[..., None] * gz1).sum(-2, keepdim=True)     # [B,H,1,d]
    if grads is not None:  # sums carried in from an earlier call that stopped inside the mini-batch
        z1q = z1q - tau[:, None] * (q @ grads[0] + grads[1])  # [B,H,n,d]
        GW1, Gb1 = GW1 + grads[0], Gb1 + grads[1]
    out = q + _ln(z1q, ln_w, ln_b)                        # [B,H,n,d]
    return out, (GW1, Gb1)


def _linear_token(params, grads, tau_i, q, k, v, lr, ln_w, ln_b):
    """Primal form for one token: materialise W_i = W_start - tau_i G_i and apply it.

    q/k/v [B,H,1,d]; lr [B,H,1]; tau_i [1]. Returns out, the extended sums and W_i.
    """
    W1, b1 = params
    GW1, Gb1 = grads
    z1 = k @ W1 + b1                                        # [B,H,1,d]
    gz1 = _ln_l2_grad(z1, v - k, ln_w, ln_b)                # [B,H,1,d]
    GW1 = GW1 + lr[..., None] * k.transpose(-2, -1) @ gz1   # [B,H,d,d] + lr_i k_i^T gz1_i
    Gb1 = Gb1 + lr[..., None] * gz1                         # [B,H,1,d]
    W1i, b1i = W1 - tau_i * GW1, b1 - tau_i * Gb1           # [B,H,d,d], [B,H,1,d]
    out = q + _ln(q @ W1i + b1i, ln_w, ln_b)                # [B,H,1,d]
    return out, (GW1, Gb1), (W1i, b1i)

# -----------------------------------------------------------------------------
# TTT-MLP: f(x; W) = LN(gelu(x W1 + b1) W2 + b2), hidden width 4d


def _mlp_minibatch(params, grads, q, k, v, lr, tau, ln_w, ln_b):
    """Dual form of TTT-MLP over n tokens in one mini-batch (upstream TTTMLP.ttt); as
    _linear_minibatch, with W1 [B,H,d,4d], b1 [B,H,1,4d], W2 [B,H,4d,d], b2 [B,H,1,d]."""
    W1, b1, W2, b2 = params
    z1 = k @ W1 + b1                                      # [B,H,n,4d]
    x2 = _gelu(z1)                                        # [B,H,n,4d]
    z2 = x2 @ W2 + b2                                     # [B,H,n,d]
    gz2 = _ln_l2_grad(z2, v - k, ln_w, ln_b)              # [B,H,n,d] d loss_j / d z2_j
    gz1 = (gz2 @ W2.transpose(-2, -1)) * _gelu_grad(z1)   # [B,H,n,4d] d loss_j / d z1_j
    eta = tau[:, None] * lr[..., None, :]                 # [B,H,n,n] tau_i lr_j
    att1 = torch.tril(q @ k.transpose(-2, -1) + 1)        # [B,H,n,n]
    z1q = q @ W1 + b1 - (eta * att1) @ gz1                # [B,H,n,4d]
    if grads is not None:  # sums carried in from an earlier call that stopped inside the mini-batch
        z1q = z1q - tau[:, None] * (q @ grads[0] + grads[1])
    x2q = _gelu(z1q)                                      # [B,H,n,4d]
    att2 = torch.tril(x2q @ x2.transpose(-2, -1) + 1)     # [B,H,n,n] layer 2 sees x2q against x2
    z2q = x2q @ W2 + b2 - (eta * att2) @ gz2              # [B,H,n,d]
    if grads is not None:
        z2q = z2q - tau[:, None] * (x2q @ grads[2] + grads[3])
    out = q + _ln(z2q, ln_w, ln_b)                        # [B,H,n,d]
    lr_ = lr[..., None]                                   # [B,H,n,1]
    new = ((lr_ * k).transpose(-2, -1) @ gz1,             # [B,H,d,4d] sum_j lr_j g_j of these tokens
           (lr_ * gz1).sum(-2, keepdim=True),             # [B,H,1,4d]
           (lr_ * x2).transpose(-2, -1) @ gz2,            # [B,H,4d,d]
           (lr_ * gz2).sum(-2, keepdim=True))             # [B,H,1,d]
    if grads is not None:
        new = tuple(G + g for G, g in zip(grads, new))
    return out, new


def _mlp_token(params, grads, tau_i, q, k, v, lr, ln_w, ln_b):
    """Primal form of TTT-MLP for one token (see _linear_token)."""
    W1, b1, W2, b2 = params
    z1 = k @ W1 + b1                                      # [B,H,1,4d]
    x2 = _gelu(z1)                                        # [B,H,1,4d]
    gz2 = _ln_l2_grad(x2 @ W2 + b2, v - k, ln_w, ln_b)    # [B,H,1,d]
    gz1 = (gz2 @ W2.transpose(-2, -1)) * _gelu_grad(z1)   # [B,H,1,4d]
    lr_ = lr[..., None]                                   # [B,H,1,1]
    g = (k.transpose(-2, -1) @ gz1, gz1, x2.transpose(-2, -1) @ gz2, gz2)  # g_i, shapes of params
    grads = tuple(G + lr_ * gi for G, gi in zip(grads, g))
    W1i, b1i, W2i, b2i = (p - tau_i * G for p, G in zip(params, grads))
    out = q + _ln(_gelu(q @ W1i + b1i) @ W2i + b2i, ln_w, ln_b)  # [B,H,1,d]
    return out, grads, (W1i, b1i, W2i, b2i)

# -----------------------------------------------------------------------------
# Driving the inner loop over a call: chunked (T > 1) and streaming (T = 1)


def _forgets(decay):
    """Whether the fast weights fade: a decay below 1, or decay tensors (one per fast weight)."""
    return isinstance(decay, tuple) or decay != 1.0


def _fade(new, params, decay, anchor):
    """new - (1 - decay) (W_start - anchor) for each fast weight; decay a float or one tensor per
    fast weight that broadcasts to it."""
    ds = decay if isinstance(decay, tuple) else (decay,) * len(params)
    return tuple(n - (1.0 - g) * (w - a) for n, w, a, g in zip(new, params, anchor, ds))


def _gated(decay, gate, n):
    """The decays of one mini-batch under a forget gate: decay ** gate, gate [B, H] the exponent given
    by the mini-batch's last token (0: nothing fades, 1: decay itself); one tensor per fast weight,
    [B, H, 1, 1] for a float decay, [B, H, ...] for decay tensors [H, ...]."""
    s = gate[:, :, None, None]
    ds = decay if isinstance(decay, tuple) else (decay,) * n
    return tuple(torch.pow(g, s) if torch.is_tensor(g) else torch.exp(s * math.log(g)) for g in ds)


def _next_start(params, grads, tau_last, decay, anchor):
    """The fast weights that start the next mini-batch: W_start - tau_{b-1} sum_j lr_j g_j (the
    official update); with decay < 1, what the memory held before this mini-batch also fades toward
    the anchor (the learnt start): - (1 - decay) (W_start - anchor)."""
    new = tuple(w - tau_last * g for w, g in zip(params, grads))
    return _fade(new, params, decay, anchor) if _forgets(decay) else new


def _full_minibatch(minibatch, params, q, k, v, lr, tau, ln_w, ln_b, decay=1.0, anchor=()):
    """A whole mini-batch from zero sums (all but a call's first and last piece): its outputs and
    the next W_start (_next_start). The unit that impl="compile" compiles."""
    out, grads = minibatch(params, None, q, k, v, lr, tau, ln_w, ln_b)
    return out, _next_start(params, grads, tau[-1], decay, anchor)


_COMPILED = {}
_COMPILE_FAILED = False  # set when an auto-picked compile failed once: stay eager


def _compiled_full_minibatch(minibatch):
    """torch.compile'd _full_minibatch: each mini-batch becomes a few fused kernels instead of a
    few dozen small launches (the eager loop is launch-bound). Compiled once per inner model."""
    if minibatch not in _COMPILED:
        _COMPILED[minibatch] = torch.compile(functools.partial(_full_minibatch, minibatch),
                                             fullgraph=True)  # a new batch size recompiles once
    return _COMPILED[minibatch]


def _scan(minibatch, state, q, k, v, lr, tau, ln_w, ln_b, b, checkpoint_group, compiled=False, decay=1.0,
          anchor=(), gate=None):
    """Chunked path: cut the call at mini-batch boundaries, run the dual form on each piece, and
    apply the W_start update whenever a piece completes its mini-batch. Reads state.i once.
    gate [B, H, T] (optional): the forget gate, decay ** gate[:, :, t] at the mini-batch ending at t."""
    T = q.shape[2]
    i0 = int(state.i)  # the one host read of a chunked call
    edges = [0, *range(b - i0, T, b), T]
    pieces = list(zip(edges[:-1], edges[1:]))  # token ranges, each inside one mini-batch
    full = (_compiled_full_minibatch(minibatch) if compiled
            else functools.partial(_full_minibatch, minibatch))

    def run(pieces, params, grads):
        outs = []
        for s, e in pieces:
            p = (i0 + s) % b  # position of token s inside its mini-batch
            args = (q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], lr[:, :, s:e], tau[p:p + e - s],
                    ln_w, ln_b)
            dec = decay if gate is None or p + e - s < b else _gated(decay, gate[:, :, e - 1], len(params))
            if s > 0 and e - s == b:  # past the first piece, a whole mini-batch from zero sums
                out, params = full(params, *args, dec, anchor)
                grads = None
            else:  # the first piece carries the state's sums; the last may stop mid-mini-batch
                out, grads = minibatch(params, grads, *args)
                if p + e - s == b:  # complete: W_start <- W_start - tau_{b-1} sum lr_j g_j
                    params, grads = _next_start(params, grads, tau[b - 1], dec, anchor), None
            outs.append(out)
        grads = grads if grads is not None else tuple(torch.zeros_like(w) for w in params)
        return torch.cat(outs, 2), params, grads

    params, grads = state.params, state.grads
    if checkpoint_group > 0 and torch.is_grad_enabled():
        # keep only the state at group boundaries; recompute the group in backward (upstream scan)
        outs = []
        for g in range(0, len(pieces), checkpoint_group):
            out, params, grads = torch.utils.checkpoint.checkpoint(
                run, pieces[g:g + checkpoint_group], params, grads, use_reentrant=False)
            outs.append(out)
        out = torch.cat(outs, 2)
    else:
        out, params, grads = run(pieces, params, grads)
    return out, TTTState(params, grads, (state.i + T) % b)


def _step(token, state, q, k, v, lr, tau, ln_w, ln_b, b, decay=1.0, anchor=(), gate=None):
    """Streaming path, T = 1: no host sync and no branch on tensor values, so it can be captured in
    a CUDA graph or compiled; the end of a mini-batch is a torch.where on i == b - 1."""
    tau_i = tau.index_select(0, state.i.view(1))  # [1] (indexing with a tensor would sync)
    out, grads, Wi = token(state.params, state.grads, tau_i, q, k, v, lr, ln_w, ln_b)
    if gate is not None:  # (used only where this token completes its mini-batch)
        decay = _gated(decay, gate[:, :, 0], len(Wi))
    if _forgets(decay):  # W_i = W_start - tau_i G_i: at the last token, _next_start's update
        Wi = _fade(Wi, state.params, decay, anchor)
    last = state.i == b - 1  # [] bool: the token that completes a mini-batch makes W_i the new W_start
    params = tuple(torch.where(last, w_i, w) for w_i, w in zip(Wi, state.params))
    grads = tuple(torch.where(last, 0.0, g) for g in grads)
    return out, TTTState(params, grads, (state.i + 1) % b)


def _check_inputs(name, q, k, v, lr, tau, ln_w, ln_b, b, state, shapes):
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"{name}: q, k, v must all be [B, H, T, d]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, H, T, d = q.shape
    if T < 1:
        raise ValueError(f"{name}: need at least one token, got T = {T}")
    if lr.shape != (B, H, T):
        raise ValueError(f"{name}: lr must be [B, H, T] = {(B, H, T)}, got {tuple(lr.shape)}")
    if tau.shape != (b,):
        raise ValueError(f"{name}: tau must be [b] = ({b},), one weight per mini-batch position, "
                         f"got {tuple(tau.shape)}")
    if ln_w.shape != (H, d) or ln_b.shape != (H, d):
        raise ValueError(f"{name}: ln_w and ln_b must be [H, d] = {(H, d)}, got "
                         f"{tuple(ln_w.shape)}, {tuple(ln_b.shape)}")
    if not isinstance(state, TTTState) or len(state.params) != len(shapes):
        raise ValueError(f"{name}: state must be a TTTState with {len(shapes)} fast weights "
                         "(make one with the layer's init_state(batch_size))")
    for p, g, s in zip(state.params, state.grads, shapes):
        if p.shape != (B, H, *s) or g.shape != p.shape:
            raise ValueError(f"{name}: state tensor of shape {tuple(p.shape)} (grads "
                             f"{tuple(g.shape)}) does not fit q {tuple(q.shape)}: expected "
                             f"{(B, H, *s)}; was the state made for another batch size or layer?")
        if not p.is_floating_point() or g.dtype != p.dtype:
            raise ValueError(f"{name}: state params and grads must share one float dtype")
    if state.i.shape != () or state.i.dtype != torch.int64:
        raise ValueError(f"{name}: state.i must be an int64 tensor of shape [], got "
                         f"{state.i.dtype} {tuple(state.i.shape)}")


def _check_decay_value(name, decay):
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 < decay <= 1.0:
        raise ValueError(f"{name}: decay must be a number in (0, 1] (1: the fast weights never forget), "
                         f"got {decay!r}")


def _check_decay(name, decay, anchor, state):
    if isinstance(decay, (tuple, list)):  # one tensor per fast weight (learnt half-lives)
        if len(decay) != len(state.params):
            raise ValueError(f"{name}: decay as tensors takes one per fast weight ({len(state.params)}), "
                             f"got {len(decay)}")
        for g, p in zip(decay, state.params):
            if not torch.is_tensor(g) or not g.is_floating_point():
                raise ValueError(f"{name}: decay tensors must be float tensors, got {type(g).__name__}"
                                 + (f" of {g.dtype}" if torch.is_tensor(g) else ""))
            try:
                fits = torch.broadcast_shapes(g.shape, p.shape) == p.shape
            except RuntimeError:
                fits = False
            if not fits:
                raise ValueError(f"{name}: decay tensor of shape {tuple(g.shape)} does not broadcast to the "
                                 f"fast weight {tuple(p.shape)}: give [H, ...] shapes such as "
                                 f"{(p.shape[1], *[1] * (p.dim() - 3), p.shape[-1])}")
    else:
        _check_decay_value(name, decay)
        if decay == 1.0:
            return
    if anchor is None or len(anchor) != len(state.params):
        raise ValueError(f"{name}: decay < 1 fades the fast weights toward an anchor: give anchor, one "
                         f"tensor per fast weight ({len(state.params)}), e.g. the layer's fast_weights()")
    for a, p in zip(anchor, state.params):
        if a.shape != p.shape[1:] and a.shape != p.shape:
            raise ValueError(f"{name}: anchor tensor of shape {tuple(a.shape)} does not fit the fast weight "
                             f"{tuple(p.shape)}: expected {tuple(p.shape[1:])} or {tuple(p.shape)}")


def _check_gate(name, gate, decay, q):
    if gate is None:
        return
    if not _forgets(decay):
        raise ValueError(f"{name}: a forget gate scales how fast the fast weights forget: give decay < 1 or "
                         "decay tensors with it (decay 1 never forgets, whatever the gate)")
    if not torch.is_tensor(gate) or not gate.is_floating_point() or gate.shape != q.shape[:3]:
        raise ValueError(f"{name}: forget_gate must be a float tensor [B, H, T] = {tuple(q.shape[:3])}, got "
                         + (f"{gate.dtype} {tuple(gate.shape)}" if torch.is_tensor(gate) else type(gate).__name__))


def _run(name, minibatch, token, shapes, q, k, v, lr, tau, ln_w, ln_b, b, state, impl,
         checkpoint_group, decay=1.0, anchor=None, gate=None):
    _check_inputs(name, q, k, v, lr, tau, ln_w, ln_b, b, state, shapes)
    _check_decay(name, decay, anchor, state)
    _check_gate(name, gate, decay, q)
    if impl not in ("torch", "compile", "triton"):
        raise ValueError(f"{name}: impl must be 'torch', 'compile' or 'triton', got {impl!r}")
    if impl == "triton" and _forgets(decay) and q.shape[2] > 1 and name == "ttt_mlp":
        raise NotImplementedError(f"{name}: TTT-MLP's Triton kernels have no decay (they run the official "
                                  "update); use impl='torch' or 'compile' with decay < 1")
    if impl == "triton" and isinstance(decay, (tuple, list)) and q.shape[2] > 1 and name == "ttt_linear":
        H, d = q.shape[1], q.shape[3]
        if any(g.dim() > 3 or torch.broadcast_shapes(g.shape, (H, 1, d)) != (H, 1, d) for g in decay):
            raise NotImplementedError(f"{name}: the Triton kernels take a decay per head and feature, tensors "
                                      f"that broadcast to [H, 1, d] = {(H, 1, d)}, got "
                                      f"{[tuple(g.shape) for g in decay]}; use impl='torch' or 'compile'")
    out_dtype = q.dtype
    # The inner loop runs in the state's dtype (float32 from init_state) whatever the autocast
    # dtype: bf16 fast weights drift over thousands of updates (DESIGN.md point 4).
    with torch.autocast(device_type=q.device.type, enabled=False):
        dt = state.params[0].dtype
        q, k, v, lr, tau = (t.to(dt) for t in (q, k, v, lr, tau))
        ln_w, ln_b = ln_w.to(dt)[:, None], ln_b.to(dt)[:, None]  # [H, 1, d]
        anchor = tuple(a.to(dt) for a in anchor) if _forgets(decay) else ()
        decay = tuple(g.to(dt) for g in decay) if isinstance(decay, (tuple, list)) else decay
        gate = gate.to(dt) if gate is not None else None
        if q.shape[2] == 1:
            out, state = _step(token, state, q, k, v, lr, tau, ln_w, ln_b, b, decay, anchor, gate)
        elif impl == "triton":
            out, state = _triton_scan(name, state, q, k, v, lr, tau, ln_w[:, 0], ln_b[:, 0], b,
                                      checkpoint_group, decay, anchor, gate)
        else:
            out, state = _scan(minibatch, state, q, k, v, lr, tau, ln_w, ln_b, b, checkpoint_group,
                               compiled=impl == "compile", decay=decay, anchor=anchor, gate=gate)
    return out.to(out_dtype), state


def ttt_linear(q, k, v, lr, tau, ln_w, ln_b, b, state, *, impl="torch", checkpoint_group=0, decay=1.0,
               anchor=None, forget_gate=None):
    """The TTT-Linear inner loop, f(x; W) = LN_h(x W1 + b1), over one call of T >= 1 tokens.

    q, k, v  [B, H, T, d]  any float dtype (bf16 under autocast is fine)
    lr       [B, H, T]     per-token learning rate: base_lr * sigmoid(gate) / d already applied
    tau      [b]           per-position token weights, already clamped at 0
    ln_w     [H, d]        inner LayerNorm weight and bias
    ln_b     [H, d]
    b        int           mini-batch size
    state    TTTState      params (W1 [B,H,d,d], b1 [B,H,1,d]), grads (same shapes), i
    impl     "torch" (the reference), "compile" (the same loop, each mini-batch torch.compile'd)
             or "triton" (CUDA kernels); all three only change the T > 1 path
    checkpoint_group       mini-batches per gradient-checkpoint segment, 0 = keep everything
                           (the Triton backward replays, from W1 kept every checkpoint_group
                           mini-batches, every 16 when 0; with few long sequences, where the
                           forward takes two passes, it keeps W1 of every mini-batch instead)
    decay    float in (0, 1]   1: the official update. Below 1, fast weights that forget: at the end
             of each mini-batch the next W_start = W_start - tau_{b-1} G - (1 - decay) (W_start - anchor),
             so what was written k mini-batches ago has faded by decay^k toward the anchor (not in
             the official layer; ttt_mlp's impl "triton" does not have it). Or a tuple of tensors,
             one per fast weight, each broadcasting to it ([H, 1, d] for W1 and b1: a decay per head
             and output feature; values in (0, 1], not checked); impl "triton" takes those that
             broadcast to [H, 1, d] (ttt_linear)
    anchor   tuple of tensors, one per fast weight, [H, ...] or [B, H, ...]: where the fast weights
             fade to (the layer passes its learnt start); needed when decay < 1
    forget_gate  [B, H, T] or None: with decay < 1 (or decay tensors), how fast each mini-batch
             forgets, from the input: the mini-batch that ends at token t fades by decay ** forget_gate[t]
             (0: keeps everything, 1: decay, larger: faster); the values at other tokens are not used.
             impl "triton" takes it for ttt_linear (each mini-batch's decays as a table)

    Returns out = q + f(q; W_i) [B, H, T, d] in q's dtype and the new state. The inner math runs in
    the state's dtype (float32) with autocast off. T = 1 takes the primal path, which never syncs
    with the host; T > 1 takes the dual form, which reads state.i once on the host with impl
    "torch" or "compile" and never with "triton" (its kernels read it on the device). A call may
    start and end anywhere inside a mini-batch.
    """
    d = q.shape[-1]
    return _run("ttt_linear", _linear_minibatch, _linear_token, [(d, d), (1, d)], q, k, v, lr,
                tau, ln_w, ln_b, b, state, impl, checkpoint_group, decay, anchor, forget_gate)


def ttt_mlp(q, k, v, lr, tau, ln_w, ln_b, b, state, *, impl="torch", checkpoint_group=0, decay=1.0,
            anchor=None, forget_gate=None):
    """The TTT-MLP inner loop, f(x; W) = LN_h(gelu(x W1 + b1) W2 + b2) with hidden width m = 4d.

    Arguments and result as ttt_linear, with state params (W1 [B,H,d,m], b1 [B,H,1,m],
    W2 [B,H,m,d], b2 [B,H,1,d]). impl="triton" needs m = 4 d (the layer's); its backward replays
    from the fast weights kept every checkpoint_group mini-batches (every 16 when 0).
    """
    d = q.shape[-1]
    m = state.params[0].shape[-1] if isinstance(state, TTTState) and state.params else 4 * d
    return _run("ttt_mlp", _mlp_minibatch, _mlp_token, [(d, m), (1, m), (m, d), (1, d)], q, k, v,
                lr, tau, ln_w, ln_b, b, state, impl, checkpoint_group, decay, anchor, forget_gate)


# -----------------------------------------------------------------------------
# Triton fast path for TTT-Linear: one program per (batch row, head) keeps W1, b1 (and the running
# sums) on chip and walks the mini-batches in order, so a whole call is one launch instead of a
# few dozen small launches per mini-batch (the official PyTorch loop is launch-bound; the
# authors' own fused GPU kernels keep the state on chip the same way). Backward is a second kernel
# that walks the mini-batches in reverse, replaying the forward from W1 saved every SEG
# mini-batches. For few, long sequences both split into passes that fill the GPU (TRITON_TWO_PASS
# below). TTT-MLP's kernels (after TTT-Linear's) walk the same way, with the fast weights in global
# memory. All are tested against the PyTorch functions above (tests/test_ttt.py).
#
# Inside the kernels a call is laid on a grid of "virtual" mini-batches: row r of mini-batch m is
# token t = m*b + r - i0; rows outside [0, T) are padding with lr = 0 and do not contribute.

TRITON_DOT = "tf32x3"  # fp32-accurate tensor-core products (3 tf32 MMAs); "ieee" is exact fp32
# launch settings of the forward kernel: warps per program, and the software-pipelining depth of its
# loop over mini-batches (loads of the next mini-batch overlap the current one's arithmetic)
TRITON_FWD = dict(num_warps=4, stages=2)  # best of `python bench/ttt.py --only tune` on an H100
# Few (row, head) sequences (long ones) leave most of the GPU idle: one program a sequence walks its
# mini-batches one after another. With at most `rows` of them (and the fast weights of every
# mini-batch within `bytes`), the forward runs in two passes: the walk updates the fast weights only
# and keeps those each mini-batch starts from; then one program per mini-batch computes its outputs.
# The backward takes those weights and runs in three passes (_ttt_linear_bwd_out_kernel). Both go in
# `pieces` pieces of mini-batches: while the walk goes through one, a second CUDA stream runs the
# per-mini-batch programs of those it has passed on the rest of the GPU. (H100: the two passes 1.9x
# faster at 32 rows, 0.77x at 128 with b = 16; 8 pieces against 1 at T = 32768, 32 rows, forward+
# backward: 2.49 against 1.93 Mtok/s with b = 16, 2.06 against 1.77 with b = 64.)
TRITON_TWO_PASS = dict(rows=64, bytes=4 << 30, pieces=8, piece_min=64)
# backward: num_warps 0 = 8 warps when b * d <= 1024, else 4; num_stages: software pipelining depth of its
# loops, 0 = 3 (Triton's default) when b * d <= 1024, else 1: each stage is shared memory, and at
# b = d = 64 three take 226 KB (one program an SM), one 96 KB (two); `python bench/ttt.py --only tune
# --T 2048`, H100, forward+backward at b = 64: 2.94 Mtok/s with 1 stage, 2.27 with 3 (b = 16: 3.54, 3.74)
TRITON_BWD = dict(num_warps=0, num_stages=0)
# the three-pass backward: warps of its passes, the walk's pipelining depth (par_warps 0: as TRITON_BWD's).
# H100, T = 32768: 2 warps made the walk 3-23x slower, 8 warps 9-13% slower; 8 warps made the third
# pass 1.8x slower at b = 64.
TRITON_BWD3 = dict(out_warps=4, walk_warps=4, walk_stages=2, par_warps=0)


# TTT-MLP's kernels: hidden units a chunk (each mini-batch goes through the hidden units hc at a
# time), warps of the forward and backward programs, precision of their products. On an H100
# (T = 2048 and 8192): 8 warps in the backward and chunks of 16 (`python bench/ttt.py --only
# tune_mlp`), a cap on registers (168 or 128 a thread) and pipelining the chunk loops 2 or 3 deep
# (experiments not kept in the repo) were all slower or no faster; chunks of 64 with 8 warps do not
# fit shared memory at b = 64. "tf32" (one tf32 product instead of three) doubles the forward and
# barely moves the backward.
TRITON_MLP = dict(hc=32, fwd_warps=4, bwd_warps=4, dot=TRITON_DOT)


def triton_supported(kind, d, b):
    """Whether the Triton path handles a layer: TTT-Linear or TTT-MLP (hidden width 4 d), d and b
    in {16, 32, 64}. (d = b = 64 already takes 226 KB of shared memory in TTT-Linear's backward;
    d = 128 would not fit an H100 SM.)"""
    pow2 = lambda n: 16 <= n <= 64 and n & (n - 1) == 0
    return triton is not None and kind in ("linear", "mlp") and pow2(d) and pow2(b)


if triton is not None:
    _EPS = tl.constexpr(LN_EPS)
    _GELU_C = tl.constexpr(GELU_C)

    @triton.jit
    def _tl_minibatch(q_ptr, k_ptr, v_ptr, lr_ptr, pid, m, i0, T, D: tl.constexpr, BS: tl.constexpr):
        """Load mini-batch m of program pid: q, k, v [BS, D], lr [BS] in float32, row mask, offsets."""
        rd = tl.arange(0, D)
        t = m * BS + tl.arange(0, BS) - i0                       # [BS] token of each row
        ok = (t >= 0) & (t < T)                                  # [BS] real tokens, not padding
        offs = pid * T * D + t[:, None] * D + rd[None, :]        # [BS, D]
        q = tl.load(q_ptr + offs, mask=ok[:, None], other=0.0).to(tl.float32)
        k = tl.load(k_ptr + offs, mask=ok[:, None], other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=ok[:, None], other=0.0).to(tl.float32)
        lr = tl.load(lr_ptr + pid * T + t, mask=ok, other=0.0).to(tl.float32)
        return q, k, v, lr, ok, offs, t

    @triton.jit
    def _tl_inner_grad(W, c, k, v, lnw, lnb, D: tl.constexpr, DOT: tl.constexpr):
        """gz = d/dz 1/2||LN(z) - (v - k)||^2 at z = k W + c, and what its backward needs."""
        return _tl_ln_l2(tl.dot(k, W, input_precision=DOT) + c[None, :], k, v, lnw, lnb, D)

    @triton.jit
    def _tl_ln_l2(z, k, v, lnw, lnb, D: tl.constexpr):
        """gz = d/dz 1/2||LN(z) - (v - k)||^2 for z [BS, D], and what its backward needs."""
        zc = z - tl.sum(z, 1)[:, None] / D                             # [BS, D]
        rs = 1.0 / tl.sqrt(tl.sum(zc * zc, 1) / D + _EPS)             # [BS] 1 / std
        xh = zc * rs[:, None]                                          # [BS, D]
        a = (lnw[None, :] * xh + lnb[None, :] - (v - k)) * lnw[None, :]  # [BS, D] d loss / d xh
        gz = (a - tl.sum(a, 1)[:, None] / D
              - xh * (tl.sum(a * xh, 1) / D)[:, None]) * rs[:, None]    # [BS, D]
        return gz, a, xh, rs

    @triton.jit
    def _tl_shape(i_ptr, T, BS: tl.constexpr, SEG: tl.constexpr):
        """Where the call starts in its mini-batch (read on the device: the host never waits for
        it), the mini-batches the call touches, the checkpoints kept, whether the last is complete."""
        i0 = tl.load(i_ptr).to(tl.int32)
        NM = (i0 + T + BS - 1) // BS
        return i0, NM, (NM + SEG - 1) // SEG, ((i0 + T) % BS == 0).to(tl.int32)

    @triton.jit
    def _tl_ln(z, D: tl.constexpr):
        zc = z - tl.sum(z, 1)[:, None] / D                              # [BS, D]
        rs = 1.0 / tl.sqrt(tl.sum(zc * zc, 1) / D + _EPS)              # [BS]
        return zc * rs[:, None], rs

    @triton.jit
    def _tl_fwd_minibatch(W, c, GW, Gc, q, k, v, lr, tau, lnw, lnb, HAS_G: tl.constexpr,
                          D: tl.constexpr, BS: tl.constexpr, DOT: tl.constexpr):
        """_linear_minibatch on one (row, head): out [BS, D] and the extended sums."""
        gz, a, xh, rs = _tl_inner_grad(W, c, k, v, lnw, lnb, D, DOT)
        r = tl.arange(0, BS)
        att = tl.dot(q, tl.trans(k), input_precision=DOT) + 1.0                   # [BS, BS]
        e = tl.where(r[:, None] >= r[None, :], tau[:, None] * lr[None, :] * att, 0.0)  # [BS, BS]
        zq = tl.dot(q, W, input_precision=DOT) + c[None, :] - tl.dot(e, gz, input_precision=DOT)
        u = lr[:, None] * gz                                                      # [BS, D]
        Gn = tl.dot(tl.trans(k), u, input_precision=DOT)                         # [D, D]
        Gcn = tl.sum(u, 0)                                                        # [D]
        if HAS_G:  # running sums carried in from an earlier call that stopped mid-mini-batch
            zq -= tau[:, None] * (tl.dot(q, GW, input_precision=DOT) + Gc[None, :])
            Gn += GW
            Gcn += Gc
        xq, _ = _tl_ln(zq, D)
        out = q + lnw[None, :] * xq + lnb[None, :]                                # [BS, D]
        return out, Gn, Gcn

    @triton.jit
    def _tl_decays_at(g_ptr, pid, h, m, NMS, D: tl.constexpr, PER_MB: tl.constexpr):
        """Where the decays of (row, head) pid's mini-batch m start: its head's [2, D] (of W's columns,
        then of c), or with PER_MB (a forget gate) its own, g [rows x H, NMS, 2, D]."""
        if PER_MB:
            return g_ptr + (pid * NMS + m) * 2 * D
        return g_ptr + h * 2 * D

    @triton.jit
    def _tl_decay(W, c, full, A_ptr, Ac_ptr, gh_ptr, pid, D: tl.constexpr):
        """The part of the next W_start that fast weights that forget add: -(1 - decay) (W - anchor)
        when the mini-batch is complete, a decay per feature: W's column j and c_j fade by
        gh_ptr[j] and gh_ptr[D + j] (this head's decays). The anchor of (row, head) pid is read from
        memory: it would hold as many registers as W through the walk."""
        rd = tl.arange(0, D)
        fw = full * (1.0 - tl.load(gh_ptr + rd))                                 # [D]
        fc = full * (1.0 - tl.load(gh_ptr + D + rd))
        A = tl.load(A_ptr + pid * D * D + rd[:, None] * D + rd[None, :])
        return -fw[None, :] * (W - A), -fc * (c - tl.load(Ac_ptr + pid * D + rd))

    @triton.jit
    def _tl_fwd_step(m, W, c, GW, Gc, q_ptr, k_ptr, v_ptr, lr_ptr, out_ptr, GW_ptr, Gc_ptr,
                     Wck_ptr, cck_ptr, tau, tau_last, lnw, lnb, pid, T, i0, NM, NCS, last_full,
                     A_ptr, Ac_ptr, gh_ptr, HAS_G: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
                     SEG: tl.constexpr, SAVE: tl.constexpr, DOT: tl.constexpr, DECAY: tl.constexpr):
        """Mini-batch m: outputs, then W_start moves on (or, for an incomplete last one, the
        running sums are written out as the new state's)."""
        rd = tl.arange(0, D)
        dd = rd[:, None] * D + rd[None, :]
        q, k, v, lr, ok, offs, t = _tl_minibatch(q_ptr, k_ptr, v_ptr, lr_ptr, pid, m, i0, T, D, BS)
        if SAVE:
            if m % SEG == 0:  # W at the start of every SEG-th mini-batch, for backward
                tl.store(Wck_ptr + (pid * NCS + m // SEG) * D * D + dd, W)
                tl.store(cck_ptr + (pid * NCS + m // SEG) * D + rd, c)
        out, Gn, Gcn = _tl_fwd_minibatch(W, c, GW, Gc, q, k, v, lr, tau, lnw, lnb, HAS_G, D, BS,
                                         DOT)
        tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=ok[:, None])
        # all mini-batches but maybe the last are complete: they move W_start and clear the sums
        full = ((m < NM - 1) | (last_full != 0)).to(tl.float32)
        last = m == NM - 1
        tl.store(GW_ptr + pid * D * D + dd, Gn * (1.0 - full), mask=last & (dd >= 0))
        tl.store(Gc_ptr + pid * D + rd, Gcn * (1.0 - full), mask=last & (rd >= 0))
        Wn, cn = W - (full * tau_last) * Gn, c - (full * tau_last) * Gcn
        if DECAY:
            xW, xc = _tl_decay(W, c, full, A_ptr, Ac_ptr, gh_ptr, pid, D)
            Wn, cn = Wn + xW, cn + xc
        return Wn, cn

    # runtime ints are never specialised: a value of 1 would turn them into compile-time
    # constants; T would recompile per length. NMS, NCS: the buffers' room for mini-batches and
    # checkpoints a row (for any start inside a mini-batch)
    _RUNTIME = ["T", "NMS", "NCS", "H"]

    @triton.jit(do_not_specialize=_RUNTIME)
    def _ttt_linear_fwd_kernel(q_ptr, k_ptr, v_ptr, lr_ptr, tau_ptr, lnw_ptr, lnb_ptr,
                               W_ptr, c_ptr, GW_ptr, Gc_ptr, out_ptr, Wck_ptr, cck_ptr, A_ptr, Ac_ptr, g_ptr,
                               T, i_ptr, NCS, H, NMS,
                               D: tl.constexpr, BS: tl.constexpr, SEG: tl.constexpr,
                               SAVE: tl.constexpr, DOT: tl.constexpr, STAGES: tl.constexpr,
                               DECAY: tl.constexpr, PER_MB: tl.constexpr):
        """W_ptr.. Gc_ptr hold the state; the kernel overwrites them with the new state. With
        DECAY, fast weights that forget: A_ptr, Ac_ptr the anchor, g_ptr the decays [H, 2, D] (of W's
        columns, then of c; ttt_linear), or with PER_MB one table a (row, head) and mini-batch,
        [rows x H, NMS, 2, D] (a forget gate)."""
        pid = tl.program_id(0)          # one (batch row, head)
        i0, NM, NC, last_full = _tl_shape(i_ptr, T, BS, SEG)
        h = pid % H
        rd, rb = tl.arange(0, D), tl.arange(0, BS)
        dd = rd[:, None] * D + rd[None, :]                                 # [D, D] offsets
        W = tl.load(W_ptr + pid * D * D + dd)                              # [D, D] float32 state
        c = tl.load(c_ptr + pid * D + rd)                                  # [D]
        lnw = tl.load(lnw_ptr + h * D + rd)
        lnb = tl.load(lnb_ptr + h * D + rd)
        tau = tl.load(tau_ptr + rb)                                        # [BS]
        tau_last = tl.load(tau_ptr + BS - 1)
        # the first mini-batch carries the sums of an earlier call that stopped inside it
        GW = tl.load(GW_ptr + pid * D * D + dd)
        Gc = tl.load(Gc_ptr + pid * D + rd)
        W, c = _tl_fwd_step(0, W, c, GW, Gc, q_ptr, k_ptr, v_ptr, lr_ptr, out_ptr, GW_ptr, Gc_ptr,
                            Wck_ptr, cck_ptr, tau, tau_last, lnw, lnb, pid, T, i0, NM, NCS,
                            last_full, A_ptr, Ac_ptr, _tl_decays_at(g_ptr, pid, h, 0, NMS, D, PER_MB), True, D,
                            BS, SEG, SAVE, DOT, DECAY)
        for m in tl.range(1, NM, num_stages=STAGES):  # later ones start from zero sums: their products are skipped
            W, c = _tl_fwd_step(m, W, c, W, c, q_ptr, k_ptr, v_ptr, lr_ptr, out_ptr, GW_ptr,
                                Gc_ptr, Wck_ptr, cck_ptr, tau, tau_last, lnw, lnb, pid, T, i0, NM,
                                NCS, last_full, A_ptr, Ac_ptr, _tl_decays_at(g_ptr, pid, h, m, NMS, D, PER_MB),
                                False, D, BS, SEG, SAVE, DOT, DECAY)
        tl.store(W_ptr + pid * D * D + dd, W)
        tl.store(c_ptr + pid * D + rd, c)

    @triton.jit(do_not_specialize=_RUNTIME + ["M0", "M1"])
    def _ttt_linear_scan_kernel(k_ptr, v_ptr, lr_ptr, lnw_ptr, lnb_ptr, tau_ptr, W_ptr, c_ptr, GW_ptr, Gc_ptr,
                                Wall_ptr, call_ptr, A_ptr, Ac_ptr, g_ptr, T, i_ptr, NMS, H, M0, M1,
                                D: tl.constexpr, BS: tl.constexpr, DOT: tl.constexpr, STAGES: tl.constexpr,
                                DECAY: tl.constexpr, PER_MB: tl.constexpr):
        """The two-pass forward's walk: the fast weights of one (batch row, head) through its
        mini-batches M0 to M1 - 1, each one's start written to Wall/call [NMS, D, D] / [NMS, D];
        W_ptr.. Gc_ptr hold the state in and the new state out, as in _ttt_linear_fwd_kernel."""
        pid = tl.program_id(0)
        i0, NM, NC, last_full = _tl_shape(i_ptr, T, BS, 1)
        h = pid % H
        rd = tl.arange(0, D)
        dd = rd[:, None] * D + rd[None, :]
        W = tl.load(W_ptr + pid * D * D + dd)
        c = tl.load(c_ptr + pid * D + rd)
        lnw = tl.load(lnw_ptr + h * D + rd)
        lnb = tl.load(lnb_ptr + h * D + rd)
        tau_last = tl.load(tau_ptr + BS - 1)
        for m in tl.range(M0, tl.minimum(M1, NM), num_stages=STAGES):
            tl.store(Wall_ptr + (pid * NMS + m) * D * D + dd, W)
            tl.store(call_ptr + (pid * NMS + m) * D + rd, c)
            _, k, v, lr, _, _, _ = _tl_minibatch(k_ptr, k_ptr, v_ptr, lr_ptr, pid, m, i0, T, D, BS)
            gz, _, _, _ = _tl_inner_grad(W, c, k, v, lnw, lnb, D, DOT)
            u = lr[:, None] * gz                                                  # [BS, D]
            Gn = tl.dot(tl.trans(k), u, input_precision=DOT)                     # [D, D]
            Gcn = tl.sum(u, 0)
            if m == 0:  # the sums carried in from an earlier call belong to mini-batch 0 only
                Gn += tl.load(GW_ptr + pid * D * D + dd)
                Gcn += tl.load(Gc_ptr + pid * D + rd)
            full = ((m < NM - 1) | (last_full != 0)).to(tl.float32)
            if m == NM - 1:  # the new state's sums: those of an incomplete last mini-batch, else 0
                tl.debug_barrier()  # every thread has read the sums carried in before they are overwritten
                tl.store(GW_ptr + pid * D * D + dd, Gn * (1.0 - full))
                tl.store(Gc_ptr + pid * D + rd, Gcn * (1.0 - full))
            if DECAY:
                xW, xc = _tl_decay(W, c, full, A_ptr, Ac_ptr, _tl_decays_at(g_ptr, pid, h, m, NMS, D, PER_MB),
                                   pid, D)
                W += xW
                c += xc
            W -= (full * tau_last) * Gn
            c -= (full * tau_last) * Gcn
        tl.store(W_ptr + pid * D * D + dd, W)
        tl.store(c_ptr + pid * D + rd, c)

    @triton.jit(do_not_specialize=_RUNTIME + ["M0"])
    def _ttt_linear_readout_kernel(q_ptr, k_ptr, v_ptr, lr_ptr, tau_ptr, lnw_ptr, lnb_ptr, GW_ptr, Gc_ptr,
                                   Wall_ptr, call_ptr, out_ptr, T, i_ptr, NMS, H, M0,
                                   D: tl.constexpr, BS: tl.constexpr, DOT: tl.constexpr):
        """The two-pass forward's outputs: mini-batch m = M0 + program_id(1) of (batch row, head)
        program_id(0), from the fast weights it starts from; GW_ptr, Gc_ptr: the sums carried into
        mini-batch 0 (the state given to the call). A program past the call's last mini-batch (the
        grid has room for any start) has no tokens: its rows are all masked."""
        pid, m = tl.program_id(0), M0 + tl.program_id(1)
        i0 = tl.load(i_ptr).to(tl.int32)
        h = pid % H
        rd, rb = tl.arange(0, D), tl.arange(0, BS)
        dd = rd[:, None] * D + rd[None, :]
        W = tl.load(Wall_ptr + (pid * NMS + m) * D * D + dd)
        c = tl.load(call_ptr + (pid * NMS + m) * D + rd)
        GW = tl.load(GW_ptr + pid * D * D + dd, mask=(m == 0) & (dd >= 0), other=0.0)
        Gc = tl.load(Gc_ptr + pid * D + rd, mask=(m == 0) & (rd >= 0), other=0.0)
        q, k, v, lr, ok, offs, t = _tl_minibatch(q_ptr, k_ptr, v_ptr, lr_ptr, pid, m, i0, T, D, BS)
        out, _, _ = _tl_fwd_minibatch(W, c, GW, Gc, q, k, v, lr, tl.load(tau_ptr + rb),
                                      tl.load(lnw_ptr + h * D + rd), tl.load(lnb_ptr + h * D + rd), True, D, BS,
                                      DOT)
        tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=ok[:, None])

    @triton.jit
    def _tl_inner_grad_bwd(dgz, gz, a, xh, rs, lnw, D: tl.constexpr):
        """Reverse of _tl_inner_grad from the adjoint of gz: those of z (dz), of a (da) and of
        the target term r = lnw xh + lnb - (v - k) (dr)."""
        # gz = P(a, xh) * rs with P(a, xh) = a - mean(a) - xh mean(a xh), a = lnw (lnw xh + lnb - t)
        dP = dgz * rs[:, None]                                                    # [BS, D]
        m_axh = tl.sum(a * xh, 1) / D                                             # [BS]
        m_pxh = tl.sum(dP * xh, 1) / D                                            # [BS]
        da = dP - tl.sum(dP, 1)[:, None] / D - xh * m_pxh[:, None]                # [BS, D]
        dxh = -(dP * m_axh[:, None] + a * m_pxh[:, None])                          # [BS, D]
        dsd = -tl.sum(dgz * gz, 1) * rs                                           # [BS] d / d std
        dr = da * lnw[None, :]
        dxh += dr * lnw[None, :]
        # xh = (z - mean z) / std: LayerNorm input gradient with the extra d std
        dz = ((dxh - tl.sum(dxh, 1)[:, None] / D - xh * (tl.sum(dxh * xh, 1) / D)[:, None])
              * rs[:, None] + xh * (dsd / D)[:, None])                            # [BS, D]
        return dz, da, dr

    @triton.jit
    def _tl_decay_grad(W, c, dW, dc, full, A_ptr, Ac_ptr, pid, D: tl.constexpr):
        """What a mini-batch's update adds to the adjoints of its head's decays (W's columns, c):
        W_next = ... - (1 - g) (W - A), so dg = full * sum over rows of dW_next (W - A)."""
        rd = tl.arange(0, D)
        A = tl.load(A_ptr + pid * D * D + rd[:, None] * D + rd[None, :])
        return full * tl.sum(dW * (W - A), 0), full * dc * (c - tl.load(Ac_ptr + pid * D + rd))

    @triton.jit
    def _tl_bwd_minibatch(W, c, GW, Gc, q, k, v, lr, tau, tau_last, full, lnw, lnb, dout,
                          dW, dc, dG, dGc, gw, gc, HAS_G: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
                          DOT: tl.constexpr, DECAY: tl.constexpr):
        """Reverse of _tl_fwd_minibatch plus the end-of-mini-batch update, derived by hand.

        dW, dc: adjoints of W_start after this mini-batch; dG, dGc: of the sums it hands on.
        Returns the adjoints of the inputs; dW, dc become those of W_start before it; with DECAY
        (decays gw of W's columns, gc of c, [D]), dA, dAc: what the anchor gets through this
        mini-batch's update (else zeros); the decays' adjoints are the caller's (_tl_decay_grad).
        """
        r = tl.arange(0, BS)
        causal = r[:, None] >= r[None, :]
        # recompute the forward
        gz, a, xh, rs = _tl_inner_grad(W, c, k, v, lnw, lnb, D, DOT)
        att = tl.dot(q, tl.trans(k), input_precision=DOT) + 1.0                   # [BS, BS]
        e = tl.where(causal, tau[:, None] * lr[None, :] * att, 0.0)               # [BS, BS]
        zq = tl.dot(q, W, input_precision=DOT) + c[None, :] - tl.dot(e, gz, input_precision=DOT)
        u = lr[:, None] * gz                                                      # [BS, D]
        Gn = tl.dot(tl.trans(k), u, input_precision=DOT)                         # [D, D]
        Gcn = tl.sum(u, 0)                                                        # [D]
        if HAS_G:
            qG = tl.dot(q, GW, input_precision=DOT) + Gc[None, :]                  # [BS, D]
            zq -= tau[:, None] * qG
            Gn += GW
            Gcn += Gc
        xq, rsq = _tl_ln(zq, D)
        # W_next = W - tau_last * Gn when the mini-batch is complete, else the sums go on
        dGn = full * (-tau_last) * dW + (1.0 - full) * dG                         # [D, D]
        dGcn = full * (-tau_last) * dc + (1.0 - full) * dGc                       # [D]
        dtau_last = -full * (tl.sum(tl.sum(dW * Gn, 1), 0) + tl.sum(dc * Gcn, 0))
        dA = tl.zeros([D, D], dtype=tl.float32)
        dAc = tl.zeros([D], dtype=tl.float32)
        if DECAY:  # W_next = W - ... - f (W - A): the share f of W_next's adjoint goes to A, not W
            dA = (full * (1.0 - gw))[None, :] * dW
            dAc = (full * (1.0 - gc)) * dc
            dW -= dA
            dc -= dAc
        # Gn = GW + k^T u, Gcn = Gc + sum_j u_j, u = lr * gz
        du = tl.dot(k, dGn, input_precision=DOT) + dGcn[None, :]                  # [BS, D]
        dk = tl.dot(u, tl.trans(dGn), input_precision=DOT)                       # [BS, D]
        dlr = tl.sum(du * gz, 1)                                                  # [BS]
        dgz = lr[:, None] * du                                                    # [BS, D]
        # out = q + lnw * LN(zq) + lnb
        dlnw = tl.sum(dout * xq, 0)                                               # [D]
        dlnb = tl.sum(dout, 0)                                                    # [D]
        dx = dout * lnw[None, :]
        dzq = (dx - tl.sum(dx, 1)[:, None] / D
               - xq * (tl.sum(dx * xq, 1) / D)[:, None]) * rsq[:, None]            # [BS, D]
        # zq = q W + c - e gz (- tau (q GW + Gc))
        dq = dout + tl.dot(dzq, tl.trans(W), input_precision=DOT)                # [BS, D]
        dW += tl.dot(tl.trans(q), dzq, input_precision=DOT)
        dc += tl.sum(dzq, 0)
        dtau = tl.zeros([BS], dtype=tl.float32)
        dGW_in = dGn
        dGc_in = dGcn
        if HAS_G:
            dq -= tau[:, None] * tl.dot(dzq, tl.trans(GW), input_precision=DOT)
            dGW_in -= tl.dot(tl.trans(q), tau[:, None] * dzq, input_precision=DOT)
            dGc_in -= tl.sum(tau[:, None] * dzq, 0)
            dtau -= tl.sum(dzq * qG, 1)
        dgz -= tl.dot(tl.trans(e), dzq, input_precision=DOT)
        de = tl.where(causal, -tl.dot(dzq, tl.trans(gz), input_precision=DOT), 0.0)  # [BS, BS]
        dtau += tl.sum(de * lr[None, :] * att, 1)
        dlr += tl.sum(de * tau[:, None] * att, 0)
        datt = de * tau[:, None] * lr[None, :]                                    # [BS, BS]
        dq += tl.dot(datt, k, input_precision=DOT)
        dk += tl.dot(tl.trans(datt), q, input_precision=DOT)
        dz, da, dr = _tl_inner_grad_bwd(dgz, gz, a, xh, rs, lnw, D)
        rr = lnw[None, :] * xh + lnb[None, :] - (v - k)                           # [BS, D]
        dlnw += tl.sum(da * rr + dr * xh, 0)
        dlnb += tl.sum(dr, 0)
        dv = -dr
        dk += dr
        dk += tl.dot(dz, tl.trans(W), input_precision=DOT)
        dW += tl.dot(tl.trans(k), dz, input_precision=DOT)
        dc += tl.sum(dz, 0)
        return dq, dk, dv, dlr, dtau, dtau_last, dlnw, dlnb, dW, dc, dGW_in, dGc_in, dA, dAc

    @triton.jit(do_not_specialize=_RUNTIME)
    def _ttt_linear_bwd_kernel(q_ptr, k_ptr, v_ptr, lr_ptr, tau_ptr, lnw_ptr, lnb_ptr,
                               GW_ptr, Gc_ptr, Wck_ptr, cck_ptr, Wbuf_ptr, cbuf_ptr, dout_ptr,
                               dW_ptr, dc_ptr, dGW_ptr, dGc_ptr,
                               dq_ptr, dk_ptr, dv_ptr, dlr_ptr, dtau_ptr, dlnw_ptr, dlnb_ptr,
                               A_ptr, Ac_ptr, g_ptr, dA_ptr, dAc_ptr, dg_ptr, T, i_ptr, NCS, H, NMS,
                               D: tl.constexpr, BS: tl.constexpr, SEG: tl.constexpr,
                               DOT: tl.constexpr, DECAY: tl.constexpr, PER_MB: tl.constexpr):
        """dW_ptr.. dGc_ptr hold the adjoints of the final state on entry and those of the initial
        state on exit; with DECAY, dA_ptr, dAc_ptr receive the anchor's and dg_ptr [rows x H, 2, D]
        the decays' (with PER_MB, [rows x H, NMS, 2, D]: each mini-batch's)."""
        pid = tl.program_id(0)
        i0, NM, NC, last_full = _tl_shape(i_ptr, T, BS, SEG)
        h = pid % H
        rd, rb = tl.arange(0, D), tl.arange(0, BS)
        dd = rd[:, None] * D + rd[None, :]
        lnw = tl.load(lnw_ptr + h * D + rd)
        lnb = tl.load(lnb_ptr + h * D + rd)
        tau = tl.load(tau_ptr + rb)
        tau_last = tl.load(tau_ptr + BS - 1)
        dW = tl.load(dW_ptr + pid * D * D + dd)
        dc = tl.load(dc_ptr + pid * D + rd)
        # adjoint of the sums handed on by the last mini-batch: it matters only when that one is
        # incomplete (a complete one hands on the constant 0); loaded below with a mask, so that
        # it does not hold registers through the loop
        g_out = last_full == 0
        dtau = tl.zeros([BS], dtype=tl.float32)
        dlnw = tl.zeros([D], dtype=tl.float32)
        dlnb = tl.zeros([D], dtype=tl.float32)
        dA = tl.zeros([D, D], dtype=tl.float32)
        dAc = tl.zeros([D], dtype=tl.float32)
        dgw = tl.zeros([D], dtype=tl.float32)
        dgc = tl.zeros([D], dtype=tl.float32)
        gh = g_ptr + h * 2 * D                 # this head's decays: of W's columns, then of c
        gw, gc = lnw, lnw                      # (unused without DECAY; with PER_MB, loaded a mini-batch at a time)
        if DECAY and not PER_MB:
            gw, gc = tl.load(gh + rd), tl.load(gh + D + rd)
        buf = Wbuf_ptr + pid * SEG * D * D
        cbuf = cbuf_ptr + pid * SEG * D
        for si in range(NC):
            s = NC - 1 - si
            m0 = s * SEG
            m1 = tl.minimum(m0 + SEG, NM)
            # replay this segment's forward from its checkpoint to get W_start of each mini-batch
            W = tl.load(Wck_ptr + (pid * NCS + s) * D * D + dd)
            c = tl.load(cck_ptr + (pid * NCS + s) * D + rd)
            tl.debug_barrier()  # the previous segment's reads of buf are done
            for m in range(m0, m1):
                tl.store(buf + (m - m0) * D * D + dd, W)
                tl.store(cbuf + (m - m0) * D + rd, c)
                q, k, v, lr, ok, offs, t = _tl_minibatch(q_ptr, k_ptr, v_ptr, lr_ptr, pid, m,
                                                         i0, T, D, BS)
                gz, a, xh, rs = _tl_inner_grad(W, c, k, v, lnw, lnb, D, DOT)
                u = lr[:, None] * gz
                GW0 = tl.load(GW_ptr + pid * D * D + dd, mask=(m == 0) & (dd >= 0), other=0.0)
                Gc0 = tl.load(Gc_ptr + pid * D + rd, mask=(m == 0) & (rd >= 0), other=0.0)
                full = ((m < NM - 1) | (last_full != 0)).to(tl.float32)
                if DECAY:
                    xW, xc = _tl_decay(W, c, full, A_ptr, Ac_ptr, _tl_decays_at(g_ptr, pid, h, m, NMS, D, PER_MB),
                                       pid, D)
                    W += xW
                    c += xc
                W -= (full * tau_last) * (tl.dot(tl.trans(k), u, input_precision=DOT) + GW0)
                c -= (full * tau_last) * (tl.sum(u, 0) + Gc0)
            tl.debug_barrier()  # buf is written before any thread reads it
            # walk the segment backwards; mini-batch 0 (with carried-in sums) is done after the loop
            for j in range(m1 - tl.maximum(m0, 1)):
                m = m1 - 1 - j
                W = tl.load(buf + (m - m0) * D * D + dd)
                c = tl.load(cbuf + (m - m0) * D + rd)
                q, k, v, lr, ok, offs, t = _tl_minibatch(q_ptr, k_ptr, v_ptr, lr_ptr, pid, m,
                                                         i0, T, D, BS)
                dout = tl.load(dout_ptr + offs, mask=ok[:, None], other=0.0).to(tl.float32)
                full = ((m < NM - 1) | (last_full != 0)).to(tl.float32)
                last = (m == NM - 1) & g_out
                dG = tl.load(dGW_ptr + pid * D * D + dd, mask=last & (dd >= 0), other=0.0)
                dGc = tl.load(dGc_ptr + pid * D + rd, mask=last & (rd >= 0), other=0.0)
                if DECAY:  # (dW, dc: the adjoints of the W_start this mini-batch hands on)
                    dgw_m, dgc_m = _tl_decay_grad(W, c, dW, dc, full, A_ptr, Ac_ptr, pid, D)
                    if PER_MB:   # this mini-batch's own decays
                        gm = _tl_decays_at(g_ptr, pid, h, m, NMS, D, PER_MB)
                        gw, gc = tl.load(gm + rd), tl.load(gm + D + rd)
                        tl.store(dg_ptr + (pid * NMS + m) * 2 * D + rd, dgw_m)
                        tl.store(dg_ptr + (pid * NMS + m) * 2 * D + D + rd, dgc_m)
                    else:
                        dgw += dgw_m
                        dgc += dgc_m
                # (the sums entering this mini-batch are the constant 0: their adjoint is dropped)
                dq, dk, dv, dlr, dtau_m, dtl, dlnw_m, dlnb_m, dW, dc, _, _, dA_m, dAc_m = _tl_bwd_minibatch(
                    W, c, dW, dc, q, k, v, lr, tau, tau_last, full, lnw, lnb, dout,
                    dW, dc, dG, dGc, gw, gc, False, D, BS, DOT, DECAY)
                if DECAY:
                    dA += dA_m
                    dAc += dAc_m
                dtau += dtau_m + tl.where(rb == BS - 1, dtl, 0.0)
                dlnw += dlnw_m
                dlnb += dlnb_m
                tl.store(dq_ptr + offs, dq, mask=ok[:, None])
                tl.store(dk_ptr + offs, dk, mask=ok[:, None])
                tl.store(dv_ptr + offs, dv, mask=ok[:, None])
                tl.store(dlr_ptr + pid * T + t, dlr, mask=ok)
        W = tl.load(buf + dd)   # segment 0 was replayed last: buf[0] holds W_start of mini-batch 0
        c = tl.load(cbuf + rd)
        q, k, v, lr, ok, offs, t = _tl_minibatch(q_ptr, k_ptr, v_ptr, lr_ptr, pid, 0, i0, T, D, BS)
        dout = tl.load(dout_ptr + offs, mask=ok[:, None], other=0.0).to(tl.float32)
        full = ((NM > 1) | (last_full != 0)).to(tl.float32)
        GW0 = tl.load(GW_ptr + pid * D * D + dd)     # sums carried into mini-batch 0
        Gc0 = tl.load(Gc_ptr + pid * D + rd)
        dG = tl.load(dGW_ptr + pid * D * D + dd, mask=(NM == 1) & g_out & (dd >= 0), other=0.0)
        dGc = tl.load(dGc_ptr + pid * D + rd, mask=(NM == 1) & g_out & (rd >= 0), other=0.0)
        if DECAY:
            dgw_m, dgc_m = _tl_decay_grad(W, c, dW, dc, full, A_ptr, Ac_ptr, pid, D)
            if PER_MB:
                gw, gc = tl.load(g_ptr + pid * NMS * 2 * D + rd), tl.load(g_ptr + pid * NMS * 2 * D + D + rd)
                tl.store(dg_ptr + pid * NMS * 2 * D + rd, dgw_m)
                tl.store(dg_ptr + pid * NMS * 2 * D + D + rd, dgc_m)
            else:
                tl.store(dg_ptr + pid * 2 * D + rd, dgw + dgw_m)
                tl.store(dg_ptr + pid * 2 * D + D + rd, dgc + dgc_m)
        dq, dk, dv, dlr, dtau_m, dtl, dlnw_m, dlnb_m, dW, dc, dG, dGc, dA_m, dAc_m = _tl_bwd_minibatch(
            W, c, GW0, Gc0, q, k, v, lr, tau, tau_last, full, lnw, lnb, dout,
            dW, dc, dG, dGc, gw, gc, True, D, BS, DOT, DECAY)
        if DECAY:
            tl.store(dA_ptr + pid * D * D + dd, dA + dA_m)
            tl.store(dAc_ptr + pid * D + rd, dAc + dAc_m)
        dtau += dtau_m + tl.where(rb == BS - 1, dtl, 0.0)
        tl.store(dq_ptr + offs, dq, mask=ok[:, None])
        tl.store(dk_ptr + offs, dk, mask=ok[:, None])
        tl.store(dv_ptr + offs, dv, mask=ok[:, None])
        tl.store(dlr_ptr + pid * T + t, dlr, mask=ok)
        tl.store(dtau_ptr + pid * BS + rb, dtau)
        tl.store(dlnw_ptr + pid * D + rd, dlnw + dlnw_m)
        tl.store(dlnb_ptr + pid * D + rd, dlnb + dlnb_m)
        tl.store(dW_ptr + pid * D * D + dd, dW)
        tl.store(dc_ptr + pid * D + rd, dc)
        tl.store(dGW_ptr + pid * D * D + dd, dG)
        tl.store(dGc_ptr + pid * D + rd, dGc)

    # The backward in three passes, for few (row, head) sequences with the fast weights of every
    # mini-batch kept by the forward. Going back, the adjoint of the fast weights is the only thing
    # carried from one mini-batch to the one before, and the chain that carries it is short: two
    # products and the inner LayerNorm's backward. So: (1) one program per mini-batch computes what
    # its outputs add to that adjoint; (2) one program per sequence walks back along the chain
    # only, keeping the adjoint each mini-batch receives; (3) one program per mini-batch computes
    # every input's adjoint from it (_tl_bwd_minibatch). (1) and (3) fill the GPU.

    @triton.jit(do_not_specialize=_RUNTIME)
    def _ttt_linear_bwd_out_kernel(q_ptr, k_ptr, v_ptr, lr_ptr, tau_ptr, lnw_ptr, lnb_ptr, GW_ptr, Gc_ptr,
                                   Wall_ptr, call_ptr, dout_ptr, Q_ptr, g0_ptr, s_ptr, T, i_ptr, NMS, H,
                                   D: tl.constexpr, BS: tl.constexpr, DOT: tl.constexpr):
        """Pass (1), mini-batch m = program_id(1): through its outputs, it adds Q = q^T dzq and
        s = sum dzq to the adjoint of the W and c it starts from, and g0 = -e^T dzq to that of its
        inner gradient gz."""
        pid, m = tl.program_id(0), tl.program_id(1)
        i0, NM, nc, lf = _tl_shape(i_ptr, T, BS, 1)
        if m < NM:
            h = pid % H
            rd, rb = tl.arange(0, D), tl.arange(0, BS)
            dd = rd[:, None] * D + rd[None, :]
            at = pid * NMS + m
            W = tl.load(Wall_ptr + at * D * D + dd)
            c = tl.load(call_ptr + at * D + rd)
            lnw = tl.load(lnw_ptr + h * D + rd)
            lnb = tl.load(lnb_ptr + h * D + rd)
            tau = tl.load(tau_ptr + rb)
            q, k, v, lr, ok, offs, t = _tl_minibatch(q_ptr, k_ptr, v_ptr, lr_ptr, pid, m, i0, T, D, BS)
            dout = tl.load(dout_ptr + offs, mask=ok[:, None], other=0.0).to(tl.float32)
            gz, _, _, _ = _tl_inner_grad(W, c, k, v, lnw, lnb, D, DOT)
            att = tl.dot(q, tl.trans(k), input_precision=DOT) + 1.0
            e = tl.where(rb[:, None] >= rb[None, :], tau[:, None] * lr[None, :] * att, 0.0)
            zq = tl.dot(q, W, input_precision=DOT) + c[None, :] - tl.dot(e, gz, input_precision=DOT)
            if m == 0:  # the sums carried in from an earlier call
                GW = tl.load(GW_ptr + pid * D * D + dd)
                zq -= tau[:, None] * (tl.dot(q, GW, input_precision=DOT) + tl.load(Gc_ptr + pid * D + rd)[None, :])
            xq, rsq = _tl_ln(zq, D)
            dx = dout * lnw[None, :]
            dzq = (dx - tl.sum(dx, 1)[:, None] / D - xq * (tl.sum(dx * xq, 1) / D)[:, None]) * rsq[:, None]
            tl.store(Q_ptr + at * D * D + dd, tl.dot(tl.trans(q), dzq, input_precision=DOT))
            tl.store(g0_ptr + at * BS * D + rb[:, None] * D + rd[None, :],
                     -tl.dot(tl.trans(e), dzq, input_precision=DOT))
            tl.store(s_ptr + at * D + rd, tl.sum(dzq, 0))

    @triton.jit(do_not_specialize=_RUNTIME + ["J0", "J1"])
    def _ttt_linear_bwd_walk_kernel(k_ptr, v_ptr, lr_ptr, tau_ptr, lnw_ptr, lnb_ptr, Wall_ptr, call_ptr,
                                    Q_ptr, g0_ptr, s_ptr, dGW_ptr, dGc_ptr, dW_ptr, dc_ptr, dWall_ptr, dcall_ptr,
                                    A_ptr, Ac_ptr, g_ptr, dA_ptr, dAc_ptr, dg_ptr, T, i_ptr, NMS, H, J0, J1,
                                    D: tl.constexpr,
                                    BS: tl.constexpr, DOT: tl.constexpr, STAGES: tl.constexpr,
                                    DECAY: tl.constexpr, PER_MB: tl.constexpr):
        """Pass (2), one program per (row, head): from the adjoint of W and c after mini-batch
        NM - 1 - J0 (dW_ptr, dc_ptr), back through J1 - J0 mini-batches, writing the adjoint each
        one receives from the next to dWall/dcall, and the last one's to dW_ptr, dc_ptr. With
        DECAY, the anchor's share of each is added to dA_ptr, dAc_ptr, and the decays' to dg_ptr."""
        pid = tl.program_id(0)
        i0, NM, nc, last_full = _tl_shape(i_ptr, T, BS, 1)
        h = pid % H
        rd, rb = tl.arange(0, D), tl.arange(0, BS)
        dd = rd[:, None] * D + rd[None, :]
        lnw = tl.load(lnw_ptr + h * D + rd)
        lnb = tl.load(lnb_ptr + h * D + rd)
        tau_last = tl.load(tau_ptr + BS - 1)
        dW = tl.load(dW_ptr + pid * D * D + dd)
        dc = tl.load(dc_ptr + pid * D + rd)
        dA = tl.zeros([D, D], dtype=tl.float32)
        dAc = tl.zeros([D], dtype=tl.float32)
        dgw = tl.zeros([D], dtype=tl.float32)
        dgc = tl.zeros([D], dtype=tl.float32)
        gw, gc = lnw, lnw   # (unused without DECAY)
        if DECAY and not PER_MB:
            gw, gc = tl.load(g_ptr + h * 2 * D + rd), tl.load(g_ptr + h * 2 * D + D + rd)
        for j in tl.range(J0, tl.minimum(J1, NM), num_stages=STAGES):
            m = NM - 1 - j
            at = pid * NMS + m
            W = tl.load(Wall_ptr + at * D * D + dd)
            c = tl.load(call_ptr + at * D + rd)
            _, k, v, lr, _, _, _ = _tl_minibatch(k_ptr, k_ptr, v_ptr, lr_ptr, pid, m, i0, T, D, BS)
            tl.store(dWall_ptr + at * D * D + dd, dW)
            tl.store(dcall_ptr + at * D + rd, dc)
            # an incomplete last mini-batch hands its sums on (their adjoint comes in) instead of W
            full = ((m < NM - 1) | (last_full != 0)).to(tl.float32)
            dGn = full * (-tau_last) * dW
            dGcn = full * (-tau_last) * dc
            if (m == NM - 1) & (last_full == 0):
                dGn += tl.load(dGW_ptr + pid * D * D + dd)
                dGcn += tl.load(dGc_ptr + pid * D + rd)
            if DECAY:  # as in _tl_bwd_minibatch
                dgw_m, dgc_m = _tl_decay_grad(W, c, dW, dc, full, A_ptr, Ac_ptr, pid, D)
                if PER_MB:   # this mini-batch's own decays
                    gm = _tl_decays_at(g_ptr, pid, h, m, NMS, D, PER_MB)
                    gw, gc = tl.load(gm + rd), tl.load(gm + D + rd)
                    tl.store(dg_ptr + at * 2 * D + rd, dgw_m)
                    tl.store(dg_ptr + at * 2 * D + D + rd, dgc_m)
                else:
                    dgw += dgw_m
                    dgc += dgc_m
                fw = (full * (1.0 - gw))[None, :]
                fc = full * (1.0 - gc)
                dA += fw * dW
                dAc += fc * dc
                dW -= fw * dW
                dc -= fc * dc
            gz, a, xh, rs = _tl_inner_grad(W, c, k, v, lnw, lnb, D, DOT)
            du = tl.dot(k, dGn, input_precision=DOT) + dGcn[None, :]
            dgz = lr[:, None] * du + tl.load(g0_ptr + at * BS * D + rb[:, None] * D + rd[None, :])
            dz, _, _ = _tl_inner_grad_bwd(dgz, gz, a, xh, rs, lnw, D)
            dW += tl.load(Q_ptr + at * D * D + dd) + tl.dot(tl.trans(k), dz, input_precision=DOT)
            dc += tl.load(s_ptr + at * D + rd) + tl.sum(dz, 0)
        tl.store(dW_ptr + pid * D * D + dd, dW)
        tl.store(dc_ptr + pid * D + rd, dc)
        if DECAY:  # the walk comes in pieces: add this one's share
            tl.store(dA_ptr + pid * D * D + dd, tl.load(dA_ptr + pid * D * D + dd) + dA)
            tl.store(dAc_ptr + pid * D + rd, tl.load(dAc_ptr + pid * D + rd) + dAc)
            if not PER_MB:   # (with PER_MB each mini-batch's went out as the walk passed it)
                tl.store(dg_ptr + pid * 2 * D + rd, tl.load(dg_ptr + pid * 2 * D + rd) + dgw)
                tl.store(dg_ptr + pid * 2 * D + D + rd, tl.load(dg_ptr + pid * 2 * D + D + rd) + dgc)

    @triton.jit(do_not_specialize=_RUNTIME + ["J0"])
    def _ttt_linear_bwd_par_kernel(q_ptr, k_ptr, v_ptr, lr_ptr, tau_ptr, lnw_ptr, lnb_ptr, GW_ptr, Gc_ptr,
                                   Wall_ptr, call_ptr, dWall_ptr, dcall_ptr, dout_ptr, dGW_ptr, dGc_ptr,
                                   dq_ptr, dk_ptr, dv_ptr, dlr_ptr, dtau_ptr, dlnw_ptr, dlnb_ptr,
                                   T, i_ptr, NMS, H, J0, D: tl.constexpr, BS: tl.constexpr,
                                   HAS_G: tl.constexpr, DOT: tl.constexpr):
        """Pass (3), mini-batch m = NM - 1 - J0 - program_id(1) (m >= 1), or m = 0 (HAS_G): the
        adjoints of its q, k, v and learning rates, its part of those of tau, lnw, lnb (summed over
        mini-batches by the caller) and, for mini-batch 0, that of the sums carried in, written over
        dGW_ptr, dGc_ptr."""
        pid = tl.program_id(0)
        i0, NM, nc, last_full = _tl_shape(i_ptr, T, BS, 1)
        m = NM - 1 - J0 - tl.program_id(1)
        if HAS_G:
            m = m * 0
        if (m >= 1) | HAS_G:
            h = pid % H
            rd, rb = tl.arange(0, D), tl.arange(0, BS)
            dd = rd[:, None] * D + rd[None, :]
            at = pid * NMS + m
            W = tl.load(Wall_ptr + at * D * D + dd)
            c = tl.load(call_ptr + at * D + rd)
            dW = tl.load(dWall_ptr + at * D * D + dd)
            dc = tl.load(dcall_ptr + at * D + rd)
            q, k, v, lr, ok, offs, t = _tl_minibatch(q_ptr, k_ptr, v_ptr, lr_ptr, pid, m, i0, T, D, BS)
            dout = tl.load(dout_ptr + offs, mask=ok[:, None], other=0.0).to(tl.float32)
            full = ((m < NM - 1) | (last_full != 0)).to(tl.float32)
            last = (m == NM - 1) & (last_full == 0)
            dG = tl.load(dGW_ptr + pid * D * D + dd, mask=last & (dd >= 0), other=0.0)
            dGc = tl.load(dGc_ptr + pid * D + rd, mask=last & (rd >= 0), other=0.0)
            GW, Gc = dW, dc   # (unused without HAS_G)
            if HAS_G:
                GW = tl.load(GW_ptr + pid * D * D + dd)
                Gc = tl.load(Gc_ptr + pid * D + rd)
            # (the decay changes only the adjoint of W handed back, which pass (2) made)
            dq, dk, dv, dlr, dtau, dtl, dlnw, dlnb, _, _, dGW, dGc, _, _ = _tl_bwd_minibatch(
                W, c, GW, Gc, q, k, v, lr, tl.load(tau_ptr + rb), tl.load(tau_ptr + BS - 1), full,
                tl.load(lnw_ptr + h * D + rd), tl.load(lnb_ptr + h * D + rd), dout, dW, dc, dG, dGc, dc, dc, HAS_G,
                D, BS, DOT, False)
            tl.store(dq_ptr + offs, dq, mask=ok[:, None])
            tl.store(dk_ptr + offs, dk, mask=ok[:, None])
            tl.store(dv_ptr + offs, dv, mask=ok[:, None])
            tl.store(dlr_ptr + pid * T + t, dlr, mask=ok)
            tl.store(dtau_ptr + at * BS + rb, dtau + tl.where(rb == BS - 1, dtl, 0.0))
            tl.store(dlnw_ptr + at * D + rd, dlnw)
            tl.store(dlnb_ptr + at * D + rd, dlnb)
            if HAS_G:
                tl.store(dGW_ptr + pid * D * D + dd, dGW)
                tl.store(dGc_ptr + pid * D + rd, dGc)


    # -------------------------------------------------------------------------
    # TTT-MLP. Its fast weights (W1 [D, M], b1, W2 [M, D], b2 with M = 4 D: 128 KB a head in
    # float32 at D = 64) do not fit in a program's registers, so they stay in global memory (L2 and
    # L1 keep them close) as one flat vector a (row, head), P = [W1, b1, W2, b2], and each mini-batch
    # goes through the hidden units HC at a time. Whatever needs all hidden units at once (the output
    # of the MLP and its LayerNorm) is summed over the chunks in one loop and used in the next.

    @triton.jit
    def _tm_gelu(x):
        """gelu_tanh(x), and its first and second derivatives (tanh written with a sigmoid)."""
        s = _GELU_C * (x + 0.044715 * x * x * x)
        t = 2.0 * tl.sigmoid(2.0 * s) - 1.0                           # tanh(s)
        ds = _GELU_C * (1.0 + 3.0 * 0.044715 * x * x)                 # s'
        g1 = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * ds
        g2 = (1.0 - t * t) * (ds + 0.5 * x * (6.0 * 0.044715 * _GELU_C * x - 2.0 * t * ds * ds))
        return 0.5 * x * (1.0 + t), g1, g2

    @triton.jit
    def _tm_offsets(D: tl.constexpr, M: tl.constexpr, HC: tl.constexpr):
        """Offsets in P of the first chunk of hidden units: W1 [D, HC] (the next chunk at + HC),
        b1 [HC] (+ HC), W2 [HC, D] (+ HC * D); and of b2 [D]."""
        rd, rh = tl.arange(0, D), tl.arange(0, HC)
        return (rd[:, None] * M + rh[None, :], D * M + rh, D * M + M + rh[:, None] * D + rd[None, :],
                2 * D * M + M + rd)

    @triton.jit
    def _tm_copy(src, dst, D: tl.constexpr, M: tl.constexpr, HC: tl.constexpr):
        o1, ob1, o2, ob2 = _tm_offsets(D, M, HC)
        for c in range(M // HC):
            tl.store(dst + o1 + c * HC, tl.load(src + o1 + c * HC))
            tl.store(dst + ob1 + c * HC, tl.load(src + ob1 + c * HC))
            tl.store(dst + o2 + c * HC * D, tl.load(src + o2 + c * HC * D))
        tl.store(dst + ob2, tl.load(src + ob2))

    @triton.jit
    def _tm_z2(P, k, D: tl.constexpr, M: tl.constexpr, HC: tl.constexpr, BS: tl.constexpr,
               DOT: tl.constexpr):
        """z2 = gelu(k W1 + b1) W2 + b2 [BS, D] at the fast weights P."""
        o1, ob1, o2, ob2 = _tm_offsets(D, M, HC)
        z2 = tl.zeros([BS, D], dtype=tl.float32)
        for c in range(M // HC):
            z1 = tl.dot(k, tl.load(P + o1 + c * HC), input_precision=DOT) + tl.load(P + ob1 + c * HC)[None, :]
            x2, g1_, g2_ = _tm_gelu(z1)
            z2 += tl.dot(x2, tl.load(P + o2 + c * HC * D), input_precision=DOT)
        return z2 + tl.load(P + ob2)[None, :]

    @triton.jit
    def _tm_fwd_minibatch(Pi, Po, G, Go, has_g, q, k, v, lr, tau, tau_last, full, last, lnw, lnb,
                          OUT: tl.constexpr, D: tl.constexpr, M: tl.constexpr, HC: tl.constexpr,
                          BS: tl.constexpr, DOT: tl.constexpr):
        """_mlp_minibatch on one (row, head), plus the end-of-mini-batch update: reads the fast
        weights at Pi and writes the next ones at Po (not Pi); when has_g, adds the sums carried in
        at G; when `last`, writes the sums handed on (0 for a complete mini-batch) at Go. Returns
        the outputs [BS, D] when OUT (else q)."""
        o1, ob1, o2, ob2 = _tm_offsets(D, M, HC)
        r = tl.arange(0, BS)
        gz2, a_, xh_, rs_ = _tl_ln_l2(_tm_z2(Pi, k, D, M, HC, BS, DOT), k, v, lnw, lnb, D)  # [BS, D]
        u2 = lr[:, None] * gz2                                                    # [BS, D]
        out = q
        if OUT:
            e = tl.where(r[:, None] >= r[None, :], tau[:, None] * lr[None, :], 0.0)  # [BS, BS]
            a1 = e * (tl.dot(q, tl.trans(k), input_precision=DOT) + 1.0)              # [BS, BS]
            att2 = tl.zeros([BS, BS], dtype=tl.float32)
            z2q = tl.zeros([BS, D], dtype=tl.float32)
        step = full * tau_last
        keep = 1.0 - full
        for c in range(M // HC):
            W1 = tl.load(Pi + o1 + c * HC)                                        # [D, HC]
            b1 = tl.load(Pi + ob1 + c * HC)                                       # [HC]
            z1 = tl.dot(k, W1, input_precision=DOT) + b1[None, :]                 # [BS, HC]
            x2, dx2, d2x2 = _tm_gelu(z1)
            W2 = tl.load(Pi + o2 + c * HC * D)                                    # [HC, D]
            gz1 = tl.dot(gz2, tl.trans(W2), input_precision=DOT) * dx2            # [BS, HC]
            u1 = lr[:, None] * gz1
            if OUT:
                z1q = tl.dot(q, W1, input_precision=DOT) + b1[None, :] - tl.dot(a1, gz1, input_precision=DOT)
                if has_g:  # sums carried in from an earlier call that stopped inside this mini-batch
                    z1q -= tau[:, None] * (tl.dot(q, tl.load(G + o1 + c * HC), input_precision=DOT)
                                           + tl.load(G + ob1 + c * HC)[None, :])
                x2q, g1q, g2q = _tm_gelu(z1q)                                     # [BS, HC]
                att2 += tl.dot(x2q, tl.trans(x2), input_precision=DOT)
                z2q += tl.dot(x2q, W2, input_precision=DOT)
                if has_g:
                    z2q -= tau[:, None] * tl.dot(x2q, tl.load(G + o2 + c * HC * D), input_precision=DOT)
            # the sums of this mini-batch (and those carried in); the next fast weights
            G1 = tl.dot(tl.trans(k), u1, input_precision=DOT)                    # [D, HC]
            Gb1 = tl.sum(u1, 0)                                                   # [HC]
            if has_g:
                G1 += tl.load(G + o1 + c * HC)
                Gb1 += tl.load(G + ob1 + c * HC)
            tl.store(Po + o1 + c * HC, W1 - step * G1)
            tl.store(Po + ob1 + c * HC, b1 - step * Gb1)
            if last:
                tl.store(Go + o1 + c * HC, keep * G1)
                tl.store(Go + ob1 + c * HC, keep * Gb1)
            G2 = tl.dot(tl.trans(x2), u2, input_precision=DOT)                   # [HC, D]
            if has_g:
                G2 += tl.load(G + o2 + c * HC * D)
            tl.store(Po + o2 + c * HC * D, W2 - step * G2)
            if last:
                tl.store(Go + o2 + c * HC * D, keep * G2)
        b2 = tl.load(Pi + ob2)
        Gb2 = tl.sum(u2, 0)
        if has_g:
            Gb2 += tl.load(G + ob2)
        tl.store(Po + ob2, b2 - step * Gb2)
        if last:
            tl.store(Go + ob2, keep * Gb2)
        if OUT:
            z2q += b2[None, :] - tl.dot(e * (att2 + 1.0), gz2, input_precision=DOT)
            if has_g:
                z2q -= tau[:, None] * tl.load(G + ob2)[None, :]
            xq, rsq = _tl_ln(z2q, D)
            out = q + lnw[None, :] * xq + lnb[None, :]
        tl.debug_barrier()  # the next mini-batch reads what this one wrote
        return out

    @triton.jit(do_not_specialize=_RUNTIME)
    def _ttt_mlp_fwd_kernel(q_ptr, k_ptr, v_ptr, lr_ptr, tau_ptr, lnw_ptr, lnb_ptr, P_ptr, G_ptr,
                            Go_ptr, out_ptr, Ck_ptr, T, i_ptr, NCS, H,
                            D: tl.constexpr, M: tl.constexpr, HC: tl.constexpr, BS: tl.constexpr,
                            SEG: tl.constexpr, SAVE: tl.constexpr, DOT: tl.constexpr):
        """One program per (row, head) walks its mini-batches. P_ptr [2, rows, NP] holds the fast
        weights in its first half and is the new state's on exit; mini-batch m reads half m % 2 and
        writes the other. G_ptr: the sums carried in; Go_ptr: the sums handed on. With SAVE, the
        fast weights every SEG mini-batches go to Ck_ptr [rows, NCS, NP]."""
        pid = tl.program_id(0)
        i0, NM, NC, last_full = _tl_shape(i_ptr, T, BS, SEG)
        NP = 2 * D * M + M + D
        half = tl.num_programs(0) * NP
        h = pid % H
        rd, rb = tl.arange(0, D), tl.arange(0, BS)
        lnw = tl.load(lnw_ptr + h * D + rd)
        lnb = tl.load(lnb_ptr + h * D + rd)
        tau = tl.load(tau_ptr + rb)
        tau_last = tl.load(tau_ptr + BS - 1)
        P, G, Go = P_ptr + pid * NP, G_ptr + pid * NP, Go_ptr + pid * NP
        for m in range(NM):
            Pm = P + (m % 2) * half
            if SAVE:
                if m % SEG == 0:
                    _tm_copy(Pm, Ck_ptr + (pid * NCS + m // SEG) * NP, D, M, HC)
            q, k, v, lr, ok, offs, t = _tl_minibatch(q_ptr, k_ptr, v_ptr, lr_ptr, pid, m, i0, T, D, BS)
            full = ((m < NM - 1) | (last_full != 0)).to(tl.float32)
            out = _tm_fwd_minibatch(Pm, P + ((m + 1) % 2) * half, G, Go, m == 0, q, k, v, lr, tau,
                                    tau_last, full, m == NM - 1, lnw, lnb, True, D, M, HC, BS, DOT)
            tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=ok[:, None])
        if NM % 2 == 1:  # the new state is in the second half: bring it to the first
            _tm_copy(P + half, P, D, M, HC)

    @triton.jit
    def _tm_bwd_minibatch(P, dP, G, has_g, dGo, dgo, dGi, S, q, k, v_ptr, offs, ok, lr, tau, tau_last,
                          full, lnw, lnb, dout, D: tl.constexpr, M: tl.constexpr, HC: tl.constexpr,
                          BS: tl.constexpr, DOT: tl.constexpr):
        """Reverse of _tm_fwd_minibatch (outputs and update), derived by hand. P: the fast weights
        at the start of the mini-batch; dP: the adjoint of those after it on entry, of those before
        it on exit (updated in place). dGo: the adjoint of the sums handed on, read when dgo. When
        has_g, G holds the sums carried in and dGi receives their adjoint. S: scratch [2, BS, M]
        and [BS, D]. v is loaded (v_ptr + offs, rows ok) only where it is needed, after loop (3):
        what lives through that loop is kept small (registers are what limit these programs).
        Four loops over the hidden units: (1) z2; (2) the outputs' forward; (3) the adjoints through
        the outputs and the update; (4) those through z1 and z2."""
        o1, ob1, o2, ob2 = _tm_offsets(D, M, HC)
        r = tl.arange(0, BS)
        rh = tl.arange(0, HC)
        os_ = r[:, None] * M + rh[None, :]                                        # [BS, HC] in S
        causal = r[:, None] >= r[None, :]
        od = r[:, None] * D + tl.arange(0, D)[None, :]                            # [BS, D] in S
        # (1) the inner loss's gradient at z2 (z2 is kept in S for after loop (3))
        z2 = _tm_z2(P, k, D, M, HC, BS, DOT)
        tl.store(S + 2 * BS * M + od, z2)
        v = tl.load(v_ptr + offs, mask=ok[:, None], other=0.0).to(tl.float32)
        gz2, a, xh, rs = _tl_ln_l2(z2, k, v, lnw, lnb, D)
        u2 = lr[:, None] * gz2
        e = tl.where(causal, tau[:, None] * lr[None, :], 0.0)                       # [BS, BS]
        A1 = tl.dot(q, tl.trans(k), input_precision=DOT) + 1.0                      # [BS, BS]
        a1 = e * A1
        ntl = -full * tau_last
        keep = 1.0 - full
        # (2) the outputs' forward (z2q, att2), and du2 = x2 dG2 + dGb2
        att2 = tl.zeros([BS, BS], dtype=tl.float32)
        z2q = tl.zeros([BS, D], dtype=tl.float32)
        du2 = tl.zeros([BS, D], dtype=tl.float32)
        for c in range(M // HC):
            W1 = tl.load(P + o1 + c * HC)
            b1 = tl.load(P + ob1 + c * HC)
            z1 = tl.dot(k, W1, input_precision=DOT) + b1[None, :]
            x2, dx2, d2x2 = _tm_gelu(z1)
            W2 = tl.load(P + o2 + c * HC * D)
            gz1 = tl.dot(gz2, tl.trans(W2), input_precision=DOT) * dx2
            z1q = tl.dot(q, W1, input_precision=DOT) + b1[None, :] - tl.dot(a1, gz1, input_precision=DOT)
            if has_g:
                z1q -= tau[:, None] * (tl.dot(q, tl.load(G + o1 + c * HC), input_precision=DOT)
                                       + tl.load(G + ob1 + c * HC)[None, :])
            x2q, g1q, g2q = _tm_gelu(z1q)
            att2 += tl.dot(x2q, tl.trans(x2), input_precision=DOT)
            z2q += tl.dot(x2q, W2, input_precision=DOT)
            if has_g:
                z2q -= tau[:, None] * tl.dot(x2q, tl.load(G + o2 + c * HC * D), input_precision=DOT)
            dG2 = ntl * tl.load(dP + o2 + c * HC * D) + keep * tl.load(
                dGo + o2 + c * HC * D, mask=dgo & (o2 >= 0), other=0.0)
            du2 += tl.dot(x2, dG2, input_precision=DOT)
        b2 = tl.load(P + ob2)
        db2 = tl.load(dP + ob2)                                                   # [D]
        dGb2 = ntl * db2 + keep * tl.load(dGo + ob2, mask=dgo & (ob2 >= 0), other=0.0)
        du2 += dGb2[None, :]
        Gb2 = tl.sum(u2, 0)
        A2 = att2 + 1.0
        z2q += b2[None, :] - tl.dot(e * A2, gz2, input_precision=DOT)
        if has_g:
            z2q -= tau[:, None] * tl.load(G + ob2)[None, :]
            Gb2 += tl.load(G + ob2)
        dtl = -full * tl.sum(db2 * Gb2, 0)                                        # d tau_last
        # out = q + lnw LN(z2q) + lnb
        xq, rsq = _tl_ln(z2q, D)
        dlnw = tl.sum(dout * xq, 0)
        dlnb = tl.sum(dout, 0)
        dx = dout * lnw[None, :]
        dz2q = (dx - tl.sum(dx, 1)[:, None] / D
                - xq * (tl.sum(dx * xq, 1) / D)[:, None]) * rsq[:, None]          # [BS, D]
        dEA2 = tl.where(causal, -tl.dot(dz2q, tl.trans(gz2), input_precision=DOT), 0.0)  # [BS, BS]
        dE = dEA2 * A2                     # e = tau_i lr_j: its adjoint goes to tau and lr now
        dtau = tl.sum(dE * lr[None, :], 1)                                        # [BS]
        dlr = tl.sum(dE * tau[:, None], 0) + tl.sum(du2 * gz2, 1)                 # [BS]
        dA2 = dEA2 * e
        dgz2 = lr[:, None] * du2 - tl.dot(tl.trans(e * A2), dz2q, input_precision=DOT)  # [BS, D]
        dq = dout
        dk = tl.zeros([BS, D], dtype=tl.float32)
        dEA1 = tl.zeros([BS, BS], dtype=tl.float32)
        if has_g:
            dtau -= tl.sum(dz2q * tl.load(G + ob2)[None, :], 1)
            tl.store(dGi + ob2, dGb2 - tl.sum(tau[:, None] * dz2q, 0))
        # (3) through the outputs' first layer and through the update; the W1 part, then the W2
        # part, each written back as soon as it is done (fewer [D, HC] tiles live at once)
        for c in range(M // HC):
            W1 = tl.load(P + o1 + c * HC)
            b1 = tl.load(P + ob1 + c * HC)
            z1 = tl.dot(k, W1, input_precision=DOT) + b1[None, :]
            x2, s1, s2 = _tm_gelu(z1)
            W2 = tl.load(P + o2 + c * HC * D)
            p = tl.dot(gz2, tl.trans(W2), input_precision=DOT)                   # [BS, HC]
            gz1 = p * s1
            u1 = lr[:, None] * gz1
            z1q = tl.dot(q, W1, input_precision=DOT) + b1[None, :] - tl.dot(a1, gz1, input_precision=DOT)
            dx2q = tl.dot(dz2q, tl.trans(W2), input_precision=DOT) + tl.dot(dA2, x2, input_precision=DOT)
            if has_g:
                z1q -= tau[:, None] * (tl.dot(q, tl.load(G + o1 + c * HC), input_precision=DOT)
                                       + tl.load(G + ob1 + c * HC)[None, :])
                dx2q -= tau[:, None] * tl.dot(dz2q, tl.trans(tl.load(G + o2 + c * HC * D)),
                                              input_precision=DOT)
            x2q, q1, q2 = _tm_gelu(z1q)
            dz1q = dx2q * q1                                                      # [BS, HC]
            dEA1 -= tl.dot(dz1q, tl.trans(gz1), input_precision=DOT)
            dq += tl.dot(dz1q, tl.trans(W1), input_precision=DOT)
            # W1, b1: the adjoints after (dW1, db1) give those of the sums (dG1, dGb1) through the
            # update; G1 = k^T u1 (+ the sums carried in), u1 = lr gz1
            dW1 = tl.load(dP + o1 + c * HC)
            db1 = tl.load(dP + ob1 + c * HC)
            dG1 = ntl * dW1 + keep * tl.load(dGo + o1 + c * HC, mask=dgo & (o1 >= 0), other=0.0)
            dGb1 = ntl * db1 + keep * tl.load(dGo + ob1 + c * HC, mask=dgo & (rh >= 0), other=0.0)
            G1 = tl.dot(tl.trans(k), u1, input_precision=DOT)
            Gb1 = tl.sum(u1, 0)
            if has_g:
                G1 += tl.load(G + o1 + c * HC)
                Gb1 += tl.load(G + ob1 + c * HC)
            dtl -= full * (tl.sum(tl.sum(dW1 * G1, 1), 0) + tl.sum(db1 * Gb1, 0))
            du1 = tl.dot(k, dG1, input_precision=DOT) + dGb1[None, :]             # [BS, HC]
            dlr += tl.sum(du1 * gz1, 1)
            dk += tl.dot(u1, tl.trans(dG1), input_precision=DOT)
            dgz1 = lr[:, None] * du1 - tl.dot(tl.trans(a1), dz1q, input_precision=DOT)
            if has_g:  # the sums carried in: z1q used them, G1 added them
                GW1 = tl.load(G + o1 + c * HC)
                qG = tl.dot(q, GW1, input_precision=DOT) + tl.load(G + ob1 + c * HC)[None, :]
                dq -= tau[:, None] * tl.dot(dz1q, tl.trans(GW1), input_precision=DOT)
                tdz1q = tau[:, None] * dz1q
                dtau -= tl.sum(dz1q * qG, 1)
                tl.store(dGi + o1 + c * HC, dG1 - tl.dot(tl.trans(q), tdz1q, input_precision=DOT))
                tl.store(dGi + ob1 + c * HC, dGb1 - tl.sum(tdz1q, 0))
            nW1 = dW1 + tl.dot(tl.trans(q), dz1q, input_precision=DOT)
            nb1 = db1 + tl.sum(dz1q, 0)
            tl.debug_barrier()  # every thread has read dW1, db1 before they are overwritten
            tl.store(dP + o1 + c * HC, nW1)
            tl.store(dP + ob1 + c * HC, nb1)
            # gz1 = p gelu'(z1), p = gz2 W2^T
            dp = dgz1 * s1
            dgz2 += tl.dot(dp, W2, input_precision=DOT)
            tl.store(S + BS * M + os_ + c * HC, dgz1 * p * s2)   # loop (4) adds it to dz1
            # W2: G2 = x2^T u2 (+ the sums carried in)
            dW2 = tl.load(dP + o2 + c * HC * D)
            dG2 = ntl * dW2 + keep * tl.load(dGo + o2 + c * HC * D, mask=dgo & (o2 >= 0), other=0.0)
            G2 = tl.dot(tl.trans(x2), u2, input_precision=DOT)
            if has_g:
                G2 += tl.load(G + o2 + c * HC * D)
                dtau -= tl.sum(dz2q * tl.dot(x2q, tl.load(G + o2 + c * HC * D), input_precision=DOT), 1)
                tl.store(dGi + o2 + c * HC * D,
                         dG2 - tl.dot(tl.trans(x2q), tau[:, None] * dz2q, input_precision=DOT))
            dtl -= full * tl.sum(tl.sum(dW2 * G2, 1), 0)
            # what loop (4) adds to the adjoint of x2 beside dz2's part
            tl.store(S + os_ + c * HC, tl.dot(u2, tl.trans(dG2), input_precision=DOT)
                     + tl.dot(tl.trans(dA2), x2q, input_precision=DOT))
            nW2 = dW2 + tl.dot(tl.trans(x2q), dz2q, input_precision=DOT) + tl.dot(tl.trans(dp), gz2, input_precision=DOT)
            tl.debug_barrier()  # every thread has read dW2 before it is overwritten
            tl.store(dP + o2 + c * HC * D, nW2)
        dEA1 = tl.where(causal, dEA1, 0.0)
        dE = dEA1 * (tl.dot(q, tl.trans(k), input_precision=DOT) + 1.0)           # (A1 again)
        dA1 = dEA1 * tl.where(causal, tau[:, None] * lr[None, :], 0.0)
        dq += tl.dot(dA1, k, input_precision=DOT)
        dk += tl.dot(tl.trans(dA1), q, input_precision=DOT)
        dtau += tl.sum(dE * lr[None, :], 1)
        dlr += tl.sum(dE * tau[:, None], 0)
        # gz2 = the inner loss's gradient at z2 = gelu(k W1 + b1) W2 + b2
        v = tl.load(v_ptr + offs, mask=ok[:, None], other=0.0).to(tl.float32)
        gz2, a, xh, rs = _tl_ln_l2(tl.load(S + 2 * BS * M + od), k, v, lnw, lnb, D)
        dz2, da, dr = _tl_inner_grad_bwd(dgz2, gz2, a, xh, rs, lnw, D)
        rr = lnw[None, :] * xh + lnb[None, :] - (v - k)
        dlnw += tl.sum(da * rr + dr * xh, 0)
        dlnb += tl.sum(dr, 0)
        dv = -dr
        dk += dr
        tl.debug_barrier()  # loop (3)'s stores are seen by every thread of loop (4)
        tl.store(dP + ob2, db2 + tl.sum(dz2q, 0) + tl.sum(dz2, 0))
        # (4) through z2 and z1
        for c in range(M // HC):
            W1 = tl.load(P + o1 + c * HC)
            b1 = tl.load(P + ob1 + c * HC)
            z1 = tl.dot(k, W1, input_precision=DOT) + b1[None, :]
            x2, s1, s2 = _tm_gelu(z1)
            dx2 = tl.load(S + os_ + c * HC) + tl.dot(dz2, tl.trans(tl.load(P + o2 + c * HC * D)),
                                                     input_precision=DOT)
            dz1 = dx2 * s1 + tl.load(S + BS * M + os_ + c * HC)
            dk += tl.dot(dz1, tl.trans(W1), input_precision=DOT)
            nW1 = tl.load(dP + o1 + c * HC) + tl.dot(tl.trans(k), dz1, input_precision=DOT)
            nb1 = tl.load(dP + ob1 + c * HC) + tl.sum(dz1, 0)
            nW2 = tl.load(dP + o2 + c * HC * D) + tl.dot(tl.trans(x2), dz2, input_precision=DOT)
            tl.debug_barrier()
            tl.store(dP + o1 + c * HC, nW1)
            tl.store(dP + ob1 + c * HC, nb1)
            tl.store(dP + o2 + c * HC * D, nW2)
        tl.debug_barrier()  # the next (earlier) mini-batch reads dP and S
        return dq, dk, dv, dlr, dtau, dtl, dlnw, dlnb

    @triton.jit(do_not_specialize=_RUNTIME)
    def _ttt_mlp_bwd_kernel(q_ptr, k_ptr, v_ptr, lr_ptr, tau_ptr, lnw_ptr, lnb_ptr, G_ptr, Ck_ptr,
                            buf_ptr, S_ptr, dout_ptr, dP_ptr, dGo_ptr, dGi_ptr,
                            dq_ptr, dk_ptr, dv_ptr, dlr_ptr, dtau_ptr, dlnw_ptr, dlnb_ptr,
                            T, i_ptr, NCS, H,
                            D: tl.constexpr, M: tl.constexpr, HC: tl.constexpr, BS: tl.constexpr,
                            SEG: tl.constexpr, DOT: tl.constexpr):
        """One program per (row, head) walks the mini-batches in reverse, a segment of SEG at a
        time: the segment's forward is replayed from its checkpoint into buf [rows, SEG, NP], then
        walked back. dP_ptr holds the adjoint of the final fast weights on entry and of the initial
        ones on exit; dGo_ptr that of the sums handed on; dGi_ptr receives that of the sums carried in."""
        pid = tl.program_id(0)
        i0, NM, NC, last_full = _tl_shape(i_ptr, T, BS, SEG)
        NP = 2 * D * M + M + D
        h = pid % H
        rd, rb = tl.arange(0, D), tl.arange(0, BS)
        lnw = tl.load(lnw_ptr + h * D + rd)
        lnb = tl.load(lnb_ptr + h * D + rd)
        tau = tl.load(tau_ptr + rb)
        tau_last = tl.load(tau_ptr + BS - 1)
        G, dP, dGo, dGi = G_ptr + pid * NP, dP_ptr + pid * NP, dGo_ptr + pid * NP, dGi_ptr + pid * NP
        buf, S = buf_ptr + pid * SEG * NP, S_ptr + pid * (2 * BS * M + BS * D)
        g_out = last_full == 0   # an incomplete last mini-batch hands its sums on
        dtau = tl.zeros([BS], dtype=tl.float32)
        dlnw = tl.zeros([D], dtype=tl.float32)
        dlnb = tl.zeros([D], dtype=tl.float32)
        for si in range(NC):
            s = NC - 1 - si
            m0 = s * SEG
            m1 = tl.minimum(m0 + SEG, NM)
            _tm_copy(Ck_ptr + (pid * NCS + s) * NP, buf, D, M, HC)
            tl.debug_barrier()
            # replay: buf[j] <- the fast weights at the start of mini-batch m0 + j
            for m in range(m0, m1 - 1):
                q, k, v, lr, ok, offs, t = _tl_minibatch(q_ptr, k_ptr, v_ptr, lr_ptr, pid, m, i0, T, D, BS)
                _tm_fwd_minibatch(buf + (m - m0) * NP, buf + (m - m0 + 1) * NP, G, G, m == 0, q, k, v,
                                  lr, tau, tau_last, 1.0, False, lnw, lnb, False, D, M, HC, BS, DOT)
            # walk the segment back
            for j in range(m1 - m0):
                m = m1 - 1 - j
                q, k, v, lr, ok, offs, t = _tl_minibatch(q_ptr, k_ptr, v_ptr, lr_ptr, pid, m, i0, T, D, BS)
                dout = tl.load(dout_ptr + offs, mask=ok[:, None], other=0.0).to(tl.float32)
                full = ((m < NM - 1) | (last_full != 0)).to(tl.float32)
                dq, dk, dv, dlr, dtau_m, dtl, dlnw_m, dlnb_m = _tm_bwd_minibatch(
                    buf + (m - m0) * NP, dP, G, m == 0, dGo, (m == NM - 1) & g_out, dGi, S, q, k,
                    v_ptr, offs, ok, lr, tau, tau_last, full, lnw, lnb, dout, D, M, HC, BS, DOT)
                dtau += dtau_m + tl.where(rb == BS - 1, dtl, 0.0)
                dlnw += dlnw_m
                dlnb += dlnb_m
                tl.store(dq_ptr + offs, dq, mask=ok[:, None])
                tl.store(dk_ptr + offs, dk, mask=ok[:, None])
                tl.store(dv_ptr + offs, dv, mask=ok[:, None])
                tl.store(dlr_ptr + pid * T + t, dlr, mask=ok)
        tl.store(dtau_ptr + pid * BS + rb, dtau)
        tl.store(dlnw_ptr + pid * D + rd, dlnw)
        tl.store(dlnb_ptr + pid * D + rd, dlnb)


def _pieces(n):
    """[start, length) pieces of n mini-batches: TRITON_TWO_PASS["pieces"] of them, or fewer, so that
    each holds `piece_min` or more (a piece costs two launches)."""
    step = -(-n // max(1, min(TRITON_TWO_PASS["pieces"], n // TRITON_TWO_PASS["piece_min"])))
    return [(i, min(step, n - i)) for i in range(0, n, step)]


class _Side:
    """`with side:` runs the kernels launched inside on a second CUDA stream, after what the current
    stream has launched so far; join() makes the current stream wait for them. (A no-op off CUDA.)"""
    streams = {}

    def __init__(self, x):
        self.cuda = x.is_cuda
        if self.cuda:
            self.main = torch.cuda.current_stream(x.device)
            if x.device not in _Side.streams:
                _Side.streams[x.device] = torch.cuda.Stream(x.device)
            self.side = _Side.streams[x.device]

    def __enter__(self):
        if self.cuda:
            self.side.wait_stream(self.main)
            self.ctx = torch.cuda.stream(self.side)
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.cuda:
            self.ctx.__exit__(*exc)

    def join(self):
        if self.cuda:
            self.main.wait_stream(self.side)


def _two_pass(rows, T, b, d):
    """Whether the forward of `rows` (row, head) sequences takes two passes (TRITON_TWO_PASS)."""
    return rows <= TRITON_TWO_PASS["rows"] and rows * _room(T, b, 1)[0] * d * (d + 1) * 4 <= TRITON_TWO_PASS["bytes"]


def _room(T, b, seg):
    """Mini-batches a call of T tokens can touch (it may start anywhere in a mini-batch), and the
    backward's checkpoints: the buffers are sized for any start, which only the kernels read."""
    NM = (T + 2 * b - 2) // b
    return NM, (NM + seg - 1) // seg


Tensor = torch.Tensor


# The kernels as PyTorch operators: torch.compile traces a TTT layer whole around them (no graph
# break), and autograd takes the backward kernel from register_autograd below.
@torch.library.custom_op("ttt::linear_chunk", mutates_args=())
def _linear_chunk(q: Tensor, k: Tensor, v: Tensor, lr: Tensor, tau: Tensor, ln_w: Tensor, ln_b: Tensor,
                  W: Tensor, c: Tensor, GW: Tensor, Gc: Tensor, A: Tensor, Ac: Tensor, g: Tensor, i: Tensor, b: int,
                  seg: int, save: bool, decay: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """ttt_linear's chunked path as Triton kernels (one pass, or two), on float32 contiguous
    inputs; i: the state's position in its mini-batch (int64 []); decay: fast weights that forget
    toward the anchor A, Ac (shaped as W, c), each head's W columns and c by the decays g [H, 2, d]
    (W's, then c's), or, with a forget gate, each (row, head)'s by its own a mini-batch, g [B x H, NMS,
    2, d] (_room's NMS). Returns out, the new state (W, c, GW, Gc)
    and, when save, the fast weights for backward: every seg mini-batches (one pass) or every
    mini-batch (two)."""
    B, H, T, d = q.shape
    NMS, NCS = _room(T, b, seg)
    GW_in, Gc_in = GW, Gc
    W, c, GW, Gc = (x.clone() for x in (W, c, GW, Gc))  # the kernel updates these in place
    out = torch.empty_like(q)
    if _two_pass(B * H, T, b, d):
        # the walk keeps the fast weights every mini-batch starts from; backward takes them too
        # in pieces: while the walk (a program a sequence) goes on, the rest of the GPU makes the
        # outputs of the mini-batches it has passed
        Wall, call = q.new_empty((B * H, NMS, d, d)), q.new_empty((B * H, NMS, d))
        side = _Side(q)
        for m0, n in _pieces(NMS):
            _ttt_linear_scan_kernel[(B * H,)](
                k, v, lr, ln_w, ln_b, tau, W, c, GW, Gc, Wall, call, A, Ac, g, T, i, NMS, H, m0, m0 + n,
                D=d, BS=b, DOT=TRITON_DOT, STAGES=TRITON_FWD["stages"], DECAY=decay, PER_MB=g.dim() == 4,
                num_warps=TRITON_FWD["num_warps"])
            with side:
                _ttt_linear_readout_kernel[(B * H, n)](
                    q, k, v, lr, tau, ln_w, ln_b, GW_in, Gc_in, Wall, call, out, T, i, NMS, H, m0, D=d, BS=b,
                    DOT=TRITON_DOT, num_warps=TRITON_FWD["num_warps"])
        side.join()
        if save:
            return out, W, c, GW, Gc, Wall, call
        return out, W, c, GW, Gc, q.new_empty((B * H, 1, d, d)), q.new_empty((B * H, 1, d))
    Wck = q.new_empty((B * H, NCS if save else 1, d, d))
    cck = q.new_empty((B * H, NCS if save else 1, d))
    _ttt_linear_fwd_kernel[(B * H,)](
        q, k, v, lr, tau, ln_w, ln_b, W, c, GW, Gc, out, Wck, cck, A, Ac, g, T, i, NCS, H, NMS,
        D=d, BS=b, SEG=seg, SAVE=save, DOT=TRITON_DOT, STAGES=TRITON_FWD["stages"], DECAY=decay,
        PER_MB=g.dim() == 4, num_warps=TRITON_FWD["num_warps"])
    return out, W, c, GW, Gc, Wck, cck


@_linear_chunk.register_fake
def _(q, k, v, lr, tau, ln_w, ln_b, W, c, GW, Gc, A, Ac, g, i, b, seg, save, decay):
    B, H, T, d = q.shape
    NCS = 1 if not save else _room(T, b, 1)[0] if _two_pass(B * H, T, b, d) else _room(T, b, seg)[1]
    return (torch.empty_like(q), torch.empty_like(W), torch.empty_like(c), torch.empty_like(GW),
            torch.empty_like(Gc), q.new_empty((B * H, NCS, d, d)), q.new_empty((B * H, NCS, d)))


@torch.library.custom_op("ttt::linear_chunk_backward", mutates_args=())
def _linear_chunk_backward(q: Tensor, k: Tensor, v: Tensor, lr: Tensor, tau: Tensor, ln_w: Tensor,
                           ln_b: Tensor, GW: Tensor, Gc: Tensor, Wck: Tensor, cck: Tensor, A: Tensor, Ac: Tensor,
                           g: Tensor, i: Tensor, dout: Tensor, dW: Tensor, dc: Tensor, dGW: Tensor, dGc: Tensor,
                           b: int, seg: int, decay: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                                                   Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                                                   Tensor, Tensor]:
    """The backward kernels (one walk, or three passes when the forward kept the fast weights of
    every mini-batch): from the adjoints of out and of the final state, those of q, k, v, lr, of
    tau, ln_w, ln_b per (row, head), of the initial state, and of the anchor and the decays per
    (row, head) (zero without decay; with a forget gate's table g, its own shape)."""
    B, H, T, d = q.shape
    dW, dc, dGW, dGc = (x.clone() for x in (dW, dc, dGW, dGc))  # the kernel updates these in place
    dq, dk, dv, dlr = (torch.empty_like(x) for x in (q, k, v, lr))
    per_mb = g.dim() == 4
    dA, dAc, dg = torch.zeros_like(A), torch.zeros_like(Ac), torch.zeros_like(g) if per_mb else q.new_zeros(B * H, 2, d)
    NMS = _room(T, b, 1)[0]
    if Wck.shape[1] == NMS and _two_pass(B * H, T, b, d):  # the forward kept every mini-batch's W
        args = (T, i, NMS, H)
        Q, dWall = q.new_empty(B * H, NMS, d, d), q.new_empty(B * H, NMS, d, d)
        g0, s, dcall = q.new_empty(B * H, NMS, b, d), q.new_empty(B * H, NMS, d), q.new_empty(B * H, NMS, d)
        _ttt_linear_bwd_out_kernel[(B * H, NMS)](q, k, v, lr, tau, ln_w, ln_b, GW, Gc, Wck, cck, dout, Q, g0, s,
                                                 *args, D=d, BS=b, DOT=TRITON_DOT,
                                                 num_warps=TRITON_BWD3["out_warps"])
        dtau, dlnw, dlnb = q.new_zeros(B * H, NMS, b), q.new_zeros(B * H, NMS, d), q.new_zeros(B * H, NMS, d)
        side = _Side(q)
        par = lambda j0, n, has_g: _ttt_linear_bwd_par_kernel[(B * H, n)](
            q, k, v, lr, tau, ln_w, ln_b, GW, Gc, Wck, cck, dWall, dcall, dout, dGW, dGc,
            dq, dk, dv, dlr, dtau, dlnw, dlnb, *args, j0, D=d, BS=b, HAS_G=has_g, DOT=TRITON_DOT,
            num_warps=TRITON_BWD3["par_warps"] or (8 if b * d <= 1024 else 4))
        for j0, n in _pieces(NMS):   # j: mini-batches from the last one back
            _ttt_linear_bwd_walk_kernel[(B * H,)](k, v, lr, tau, ln_w, ln_b, Wck, cck, Q, g0, s, dGW, dGc, dW,
                                                  dc, dWall, dcall, A, Ac, g, dA, dAc, dg, *args, j0, j0 + n, D=d,
                                                  BS=b, DOT=TRITON_DOT, STAGES=TRITON_BWD3["walk_stages"],
                                                  DECAY=decay, PER_MB=per_mb, num_warps=TRITON_BWD3["walk_warps"])
            with side:
                par(j0, n, False)
        with side:
            par(0, 1, True)   # mini-batch 0, last: it writes the adjoint of the sums carried in over dGW, dGc
        side.join()
        return dq, dk, dv, dlr, dtau.sum(1), dlnw.sum(1), dlnb.sum(1), dW, dc, dGW, dGc, dA, dAc, dg
    dtau, dlnw, dlnb = q.new_empty(B * H, b), q.new_empty(B * H, d), q.new_empty(B * H, d)
    Wbuf, cbuf = q.new_empty(B * H, seg, d, d), q.new_empty(B * H, seg, d)
    _ttt_linear_bwd_kernel[(B * H,)](
        q, k, v, lr, tau, ln_w, ln_b, GW, Gc, Wck, cck, Wbuf, cbuf, dout, dW, dc, dGW, dGc,
        dq, dk, dv, dlr, dtau, dlnw, dlnb, A, Ac, g, dA, dAc, dg, T, i, Wck.shape[1], H, NMS,
        D=d, BS=b, SEG=seg, DOT=TRITON_DOT, DECAY=decay, PER_MB=per_mb,
        num_stages=TRITON_BWD["num_stages"] or (3 if b * d <= 1024 else 1),
        num_warps=TRITON_BWD["num_warps"] or (8 if b * d <= 1024 else 4))
    return dq, dk, dv, dlr, dtau, dlnw, dlnb, dW, dc, dGW, dGc, dA, dAc, dg


@_linear_chunk_backward.register_fake
def _(q, k, v, lr, tau, ln_w, ln_b, GW, Gc, Wck, cck, A, Ac, g, i, dout, dW, dc, dGW, dGc, b, seg, decay):
    B, H, T, d = q.shape
    return (*(torch.empty_like(x) for x in (q, k, v, lr)), q.new_empty(B * H, b), q.new_empty(B * H, d),
            q.new_empty(B * H, d), *(torch.empty_like(x) for x in (dW, dc, dGW, dGc, A, Ac)),
            torch.empty_like(g) if g.dim() == 4 else q.new_empty(B * H, 2, d))


def _linear_chunk_setup(ctx, inputs, output):
    q, k, v, lr, tau, ln_w, ln_b, W, c, GW, Gc, A, Ac, g, i, b, seg, save, decay = inputs
    ctx.save_for_backward(q, k, v, lr, tau, ln_w, ln_b, GW, Gc, output[5], output[6], A, Ac, g, i)
    ctx.meta = (b, seg, decay)


def _linear_chunk_grad(ctx, dout, dW, dc, dGW, dGc, _dWck, _dcck):
    q, k, v, lr, tau, ln_w, ln_b, GW, Gc, Wck, cck, A, Ac, g, i = ctx.saved_tensors
    b, seg, decay = ctx.meta
    B, H, T, d = q.shape
    # adjoints of the final state (None: that state was unused)
    adj = lambda x, like: torch.zeros_like(like) if x is None else x.contiguous()
    dq, dk, dv, dlr, dtau, dlnw, dlnb, dW, dc, dGW, dGc, dA, dAc, dg = _linear_chunk_backward(
        q, k, v, lr, tau, ln_w, ln_b, GW, Gc, Wck, cck, A, Ac, g, i, adj(dout, q), adj(dW, GW), adj(dc, Gc),
        adj(dGW, GW), adj(dGc, Gc), b, seg, decay)
    return (dq, dk, dv, dlr, dtau.sum(0), dlnw.view(B, H, d).sum(0), dlnb.view(B, H, d).sum(0),
            dW, dc, dGW, dGc, dA if decay else None, dAc if decay else None,
            (dg if g.dim() == 4 else dg.view(B, H, 2, d).sum(0)) if decay else None, None, None, None, None, None)


_linear_chunk.register_autograd(_linear_chunk_grad, setup_context=_linear_chunk_setup)


def _mlp_width(P, d):
    """Hidden width M of TTT-MLP from the flat fast weights [rows, 2 d M + M + d]."""
    return (P.shape[-1] - d) // (2 * d + 1)


@torch.library.custom_op("ttt::mlp_chunk", mutates_args=())
def _mlp_chunk(q: Tensor, k: Tensor, v: Tensor, lr: Tensor, tau: Tensor, ln_w: Tensor, ln_b: Tensor,
               P: Tensor, G: Tensor, i: Tensor, b: int, seg: int,
               save: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """ttt_mlp's chunked path as one Triton kernel, on float32 contiguous inputs with the fast
    weights and sums flat ([rows, NP], P = [W1, b1, W2, b2]). Returns out, the new P and sums, and
    when save the fast weights every seg mini-batches for backward."""
    B, H, T, d = q.shape
    M = _mlp_width(P, d)
    P2 = P.new_empty((2, *P.shape))  # the fast weights go back and forth between two halves
    P2[0] = P
    Go = torch.empty_like(G)  # the last mini-batch writes the sums handed on
    out = torch.empty_like(q)
    Ck = q.new_empty((B * H, _room(T, b, seg)[1] if save else 1, P.shape[1]))
    _ttt_mlp_fwd_kernel[(B * H,)](q, k, v, lr, tau, ln_w, ln_b, P2, G, Go, out, Ck, T, i, Ck.shape[1], H,
                                  D=d, M=M, HC=min(M, TRITON_MLP["hc"]), BS=b, SEG=seg, SAVE=save,
                                  DOT=TRITON_MLP["dot"], num_warps=TRITON_MLP["fwd_warps"], num_stages=1)
    return out, P2[0], Go, Ck


@_mlp_chunk.register_fake
def _(q, k, v, lr, tau, ln_w, ln_b, P, G, i, b, seg, save):
    B, H, T, d = q.shape
    NCS = _room(T, b, seg)[1] if save else 1
    return torch.empty_like(q), torch.empty_like(P), torch.empty_like(G), q.new_empty((B * H, NCS, P.shape[1]))


@torch.library.custom_op("ttt::mlp_chunk_backward", mutates_args=())
def _mlp_chunk_backward(q: Tensor, k: Tensor, v: Tensor, lr: Tensor, tau: Tensor, ln_w: Tensor,
                        ln_b: Tensor, G: Tensor, Ck: Tensor, i: Tensor, dout: Tensor, dP: Tensor,
                        dGo: Tensor, b: int, seg: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor,
                                                               Tensor, Tensor, Tensor, Tensor]:
    """The backward kernel: from the adjoints of out, of the final fast weights and of the sums
    handed on, those of q, k, v, lr, of tau, ln_w, ln_b per (row, head), of the initial fast
    weights and of the sums carried in."""
    B, H, T, d = q.shape
    M = _mlp_width(G, d)
    dP, dGi = dP.clone(), torch.empty_like(G)
    dq, dk, dv, dlr = (torch.empty_like(x) for x in (q, k, v, lr))
    dtau, dlnw, dlnb = q.new_empty(B * H, b), q.new_empty(B * H, d), q.new_empty(B * H, d)
    buf, S = q.new_empty(B * H, seg, G.shape[1]), q.new_empty(B * H, 2 * b * M + b * d)
    _ttt_mlp_bwd_kernel[(B * H,)](q, k, v, lr, tau, ln_w, ln_b, G, Ck, buf, S, dout, dP, dGo, dGi,
                                  dq, dk, dv, dlr, dtau, dlnw, dlnb, T, i, Ck.shape[1], H,
                                  D=d, M=M, HC=min(M, TRITON_MLP["hc"]), BS=b, SEG=seg,
                                  DOT=TRITON_MLP["dot"], num_warps=TRITON_MLP["bwd_warps"], num_stages=1)
    return dq, dk, dv, dlr, dtau, dlnw, dlnb, dP, dGi


@_mlp_chunk_backward.register_fake
def _(q, k, v, lr, tau, ln_w, ln_b, G, Ck, i, dout, dP, dGo, b, seg):
    B, H, T, d = q.shape
    return (*(torch.empty_like(x) for x in (q, k, v, lr)), q.new_empty(B * H, b), q.new_empty(B * H, d),
            q.new_empty(B * H, d), torch.empty_like(dP), torch.empty_like(G))


def _mlp_chunk_setup(ctx, inputs, output):
    q, k, v, lr, tau, ln_w, ln_b, P, G, i, b, seg, save = inputs
    ctx.save_for_backward(q, k, v, lr, tau, ln_w, ln_b, G, output[3], i)
    ctx.meta = (b, seg)


def _mlp_chunk_grad(ctx, dout, dP, dGo, _dCk):
    q, k, v, lr, tau, ln_w, ln_b, G, Ck, i = ctx.saved_tensors
    b, seg = ctx.meta
    B, H, T, d = q.shape
    adj = lambda g, like: torch.zeros_like(like) if g is None else g.contiguous()
    dq, dk, dv, dlr, dtau, dlnw, dlnb, dP, dG = _mlp_chunk_backward(
        q, k, v, lr, tau, ln_w, ln_b, G, Ck, i, adj(dout, q), adj(dP, G), adj(dGo, G), b, seg)
    return (dq, dk, dv, dlr, dtau.sum(0), dlnw.view(B, H, d).sum(0), dlnb.view(B, H, d).sum(0),
            dP, dG, None, None, None, None)


_mlp_chunk.register_autograd(_mlp_chunk_grad, setup_context=_mlp_chunk_setup)


def _kernel_decays(decay, H, d, device):
    """TTT-Linear's decays as its kernels read them: [H, 2, d] float32, each head's decays of W's
    columns, then of c; decay one number, or a tensor each for W and c that broadcasts to [H, 1, d]."""
    if isinstance(decay, tuple):
        return torch.stack([g.expand(H, 1, d)[:, 0] for g in decay], 1).float().contiguous()
    return torch.full((H, 2, d), float(decay), device=device)


def _gated_kernel_decays(decay, gate, i, H, d, b):
    """With a forget gate, the decays each (row, head) takes at the end of each mini-batch the call
    touches, [B x H, NMS, 2, d]: decay ** gate at the mini-batch's last token (found on the device from
    the state's position i: no host sync; the table's rows for mini-batches the call does not complete
    are never read). Differentiable in decay and gate: the kernels give back this table's adjoint."""
    B, _, T = gate.shape
    NMS = _room(T, b, 1)[0]
    end = (torch.arange(NMS, device=gate.device) * b + b - 1 - i).clamp(0, T - 1)   # [NMS] token indices
    s = gate.index_select(2, end)                                                     # [B, H, NMS]
    g = _kernel_decays(decay, H, d, gate.device)                                      # [H, 2, d]
    return torch.pow(g[None, :, None], s[..., None, None]).reshape(B * H, NMS, 2, d).contiguous()


def _triton_scan(name, state, q, k, v, lr, tau, ln_w, ln_b, b, checkpoint_group, decay=1.0, anchor=(),
                 gate=None):
    """Chunked path of ttt_linear / ttt_mlp on the Triton kernels (same contract as _scan). Where
    the call starts inside its mini-batch is read by the kernels on the device: no host sync."""
    B, H, T, d = q.shape
    kind = "linear" if name == "ttt_linear" else "mlp"
    M = state.params[0].shape[-1]
    if not triton_supported(kind, d, b) or (kind == "mlp" and M != 4 * d):
        raise NotImplementedError(
            f"{name} with head width {d}, mini-batch {b}" + (f" and hidden width {M}" if kind == "mlp" else "")
            + " has no Triton path (d and b in {16, 32, 64}, TTT-MLP's hidden width 4 d, and triton "
            "installed); use impl='torch' or 'compile'")
    if q.dtype != torch.float32:
        raise ValueError(f"the Triton path keeps a float32 state; got a {q.dtype} state")
    seg = checkpoint_group if checkpoint_group > 0 else 16
    args = [x.contiguous() for x in (q, k, v, lr, tau, ln_w, ln_b)]
    i = state.i.to(q.device)
    if kind == "mlp":  # the fast weights and sums as one flat float32 vector a (row, head)
        flat = lambda ts: torch.cat([t.reshape(B * H, -1) for t in ts], 1)
        P, G = flat(state.params), flat(state.grads)
        save = torch.is_grad_enabled() and any(x.requires_grad for x in args + [P, G])
        out, P, G, _ = _mlp_chunk(*args, P, G, i, b, seg, save)
        sizes = [t[0, 0].numel() for t in state.params]
        unflat = lambda x: tuple(p.view(t.shape) for p, t in zip(x.split(sizes, 1), state.params))
        return out, TTTState(unflat(P), unflat(G), (state.i + T) % b)
    W, c = state.params
    GW, Gc = state.grads
    # the anchor, one copy a (row, head) as the kernels read it (W itself, unread, without decay),
    # and the decays of each head's W columns and c, [H, 2, d] (one number: the same everywhere)
    forget = _forgets(decay)
    A, Ac = (a.expand_as(p) for a, p in zip(anchor, (W, c))) if forget else (W, c)
    g = _kernel_decays(decay, H, d, q.device) if gate is None else _gated_kernel_decays(decay, gate, i, H, d, b)
    args += [x.contiguous() for x in (W, c, GW, Gc, A, Ac, g)]
    save = torch.is_grad_enabled() and any(x.requires_grad for x in args)  # keep W for backward?
    out, W, c, GW, Gc, _, _ = _linear_chunk(*args, i, b, seg, save, forget)
    return out, TTTState((W, c), (GW, Gc), (state.i + T) % b)


# -----------------------------------------------------------------------------
# The layers of ttt-lm-pytorch (TTTBase, TTTLinear, TTTMLP) around the pure functions


def _rope_cos_sin(pos, d, theta):
    """cos, sin [T, d/2] for integer positions pos [T], made in float32 (never from bf16)."""
    inv = 1.0 / theta ** (torch.arange(0, d, 2, device=pos.device, dtype=torch.float32) / d)  # [d/2]
    ang = pos.to(torch.float32)[:, None] * inv                                  # [T, d/2]
    return ang.cos(), ang.sin()


def _rope(x, cos, sin):
    """Rotate channel pairs (2j, 2j+1) of x [B,H,T,d] by pos * theta^(-2j/d).

    Upstream permutes q/k, applies rotate_half RoPE and permutes back (permute_qk); that is exactly
    this interleaved rotation. The result is float32 (or float64) whatever x's dtype.
    """
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    x1, x2 = x[..., 0::2], x[..., 1::2]                                         # [B,H,T,d/2]
    return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1).flatten(-2)  # [B,H,T,d]


class _TTTLayer(nn.Module):
    """Shared body of TTTLinear and TTTMLP (upstream TTTBase); see their docstrings."""

    def __init__(self, dim, n_heads, mini_batch=16, base_lr=1.0, rope_theta=10000.0, gate=True,
                 checkpoint_group=0, impl="auto", decay=1.0, half_life_range=None, forget_gate=False,
                 head_dim=None):
        super().__init__()
        if head_dim is None:   # the official layer: the heads split the model's width
            if dim % n_heads:
                raise ValueError(f"dim ({dim}) must be a multiple of n_heads ({n_heads})")
            head_dim = dim // n_heads
        if head_dim < 2 or head_dim % 2:
            raise ValueError(f"head width {head_dim} must be even for RoPE (head_dim, or dim / n_heads)")
        if mini_batch < 1:
            raise ValueError(f"mini_batch must be >= 1, got {mini_batch}")
        if impl not in ("auto", "torch", "compile", "triton"):
            raise ValueError(f"impl must be 'auto', 'torch', 'compile' or 'triton', got {impl!r}")
        # width: the inner model's, n_heads * head_dim; the model's width dim unless head_dim says
        # otherwise (a larger memory than the model's width gives: more fast weights, same model)
        self.dim, self.n_heads, self.head_dim, self.width = dim, n_heads, head_dim, n_heads * head_dim
        self.mini_batch, self.base_lr, self.rope_theta = mini_batch, base_lr, rope_theta
        self.checkpoint_group, self.impl = checkpoint_group, impl
        self.log_half_life = None   # learnt half-lives (learn_half_life), else one fixed decay
        self.forget_weight = self.forget_bias = None   # the forget gate (add_forget_gate)
        self.set_decay(decay)
        H, d = n_heads, self.head_dim
        W = self.width
        self.q_proj = nn.Linear(dim, W, bias=False)
        self.k_proj = nn.Linear(dim, W, bias=False)
        self.v_proj = nn.Linear(dim, W, bias=False)
        self.o_proj = nn.Linear(W, dim, bias=False)
        # learnable inner learning rate per head, Sec. 2.7: lr = base_lr * sigmoid(w_h . x + c_h) / d
        self.learnable_ttt_lr_weight = nn.Parameter(torch.randn(H, 1, dim) * 0.02)
        self.learnable_ttt_lr_bias = nn.Parameter(torch.zeros(H, 1))
        # tau_i = max(0, 1/(i+1) + offset_i): the 1/(i+1) averages the gradients of a mini-batch
        self.learnable_token_idx = nn.Parameter(torch.zeros(mini_batch))
        self.ttt_norm_weight = nn.Parameter(torch.ones(H, d))
        self.ttt_norm_bias = nn.Parameter(torch.zeros(H, d))
        self.post_norm = nn.LayerNorm(W, eps=LN_EPS)
        self.g_proj = nn.Linear(dim, W, bias=False) if gate else None
        # RoPE's cos and sin at the b positions of a mini-batch, [2, b, d/2]: a compiled layer reads them
        # rather than computing them again for every element of q and k
        self.register_buffer("rope_table", self.make_rope_table(), persistent=False)
        if half_life_range is not None:
            self.learn_half_life(*half_life_range)
        if forget_gate:
            self.add_forget_gate()

    def make_rope_table(self, device=None):
        return torch.stack(_rope_cos_sin(torch.arange(self.mini_batch, device=device), self.head_dim,
                                         self.rope_theta))

    def fast_weights(self):
        """The learnable initial fast weights, in state order."""
        raise NotImplementedError

    def _full_fast_weights(self):
        # under FSDP the parameters are shards outside forward: gather them (differentiably)
        return [w.full_tensor() if hasattr(w, "full_tensor") else w for w in self.fast_weights()]

    def set_decay(self, decay):
        """decay in (0, 1]: each mini-batch, what the fast weights hold beyond their learnt start fades by
        this factor (ttt_linear's decay; 1, the default, is the official layer). No weight depends on it.
        Replaces learnt half-lives, if the layer had them."""
        _check_decay_value(type(self).__name__, decay)
        self.decay = float(decay)
        self.log_half_life = None

    def learn_half_life(self, lo, hi):
        """Fast weights that forget at learnt rates (not in the official layer): a half-life in tokens
        per head and output feature of the inner model's last layer for TTT-Linear (W1's columns and
        b1 fade together), per head for TTT-MLP, starting log-spaced from lo to hi over the features
        (the same in every head; over the heads for TTT-MLP). A new parameter, log_half_life: decay = 0.5 ** (b / half-life)."""
        if not 0 < lo <= hi < float("inf"):
            raise ValueError(f"{type(self).__name__}: learnt half-lives start in a range 0 < lo <= hi, "
                             f"got ({lo}, {hi})")
        w = self.ttt_norm_weight   # (the fast weights are not made yet when __init__ calls this)
        H, n = self.n_heads, self.head_dim if self.kind == "linear" else 1
        init = torch.logspace(math.log10(lo), math.log10(hi), n if n > 1 else H, dtype=torch.float64)
        init = init.repeat(H, 1) if n > 1 else init[:, None]   # [H, n]
        self.decay = 1.0
        self.log_half_life = nn.Parameter(init.log().to(device=w.device, dtype=w.dtype))

    def add_forget_gate(self):
        """A forget gate from the input (not in the official layer; as Mamba's step size scales its
        decay): each mini-batch fades by decay ** s, s = softplus(w_h . x + c_h) / ln 2 per head from the
        mini-batch's last token, so a layer can hold on (s -> 0) or let go (s large) as the input asks.
        w and c start at 0, s = 1: the layer computes what it did without the gate. It acts only with
        fast weights that forget (a decay < 1 or learnt half-lives)."""
        w = self.ttt_norm_weight
        self.forget_weight = nn.Parameter(torch.zeros(self.n_heads, self.dim, device=w.device, dtype=w.dtype))
        self.forget_bias = nn.Parameter(torch.zeros(self.n_heads, device=w.device, dtype=w.dtype))

    def gates(self):
        """Whether the forget gate acts: the layer has one and its fast weights forget."""
        return self.forget_weight is not None and self.forgets()

    def forget_gate(self, x):
        """The forget gate's exponents s [B, H, T] for x [B, T, dim] (float32), or None without a gate
        or without forgetting."""
        if not self.gates():
            return None
        with torch.autocast(device_type=x.device.type, enabled=False):
            xf = x.to(torch.promote_types(x.dtype, torch.float32))
            # (contiguous: with a transposed z, torch.compile's softplus backward assumed strides it did not get)
            z = (xf @ self.forget_weight.to(xf.dtype).t()).transpose(1, 2).contiguous() + self.forget_bias.to(xf.dtype)[:, None]
            return F.softplus(z) / math.log(2.0)                                       # [B, H, T]

    def half_lives(self):
        """The learnt half-lives in tokens [H, n] (n = head width for TTT-Linear, 1 for TTT-MLP),
        or None."""
        return None if self.log_half_life is None else self.log_half_life.detach().float().exp()

    def forgets(self):
        return self.log_half_life is not None or self.decay != 1.0

    def decays(self):
        """What ttt_linear / ttt_mlp take as decay: the fixed float, or learnt tensors, one per fast
        weight (float32, [H, 1, d] for TTT-Linear, [H, 1, 1] for TTT-MLP)."""
        if self.log_half_life is None:
            return self.decay
        g = torch.exp(-math.log(2) * self.mini_batch * torch.exp(-self.log_half_life.float()))   # [H, n]
        return (g[:, None, :],) * len(self.fast_weights())

    def init_state(self, batch_size: int, device=None) -> TTTState:
        """A fresh state: the initial fast weights broadcast to the batch (float32, or float64 for a
        float64 layer), still linked to the parameters by autograd; zero sums; position 0."""
        dt = torch.promote_types(self.W1.dtype, torch.float32)
        full = self._full_fast_weights()
        params = tuple(w.to(device=device, dtype=dt)[None].repeat(batch_size, *[1] * w.dim()) for w in full)
        grads = tuple(torch.zeros_like(p) for p in params)
        return TTTState(params, grads, torch.zeros((), dtype=torch.int64, device=params[0].device))

    def _impl(self, x):
        if self.impl != "auto":
            return self.impl
        if not x.is_cuda:
            return "torch"
        if triton_supported(self.kind, self.head_dim, self.mini_batch) and (not self.forgets() or self.kind == "linear"):
            return "triton"
        return "torch" if _COMPILE_FAILED else "compile"

    def _inner(self, q, k, v, lr, tau, state, impl, gate=None):
        global _COMPILE_FAILED
        anchor = self._full_fast_weights() if self.forgets() else None
        decay = self.decays()
        run = lambda impl: self.inner(q, k, v, lr, tau, self.ttt_norm_weight, self.ttt_norm_bias,
                                      self.mini_batch, state, impl=impl,
                                      checkpoint_group=self.checkpoint_group, decay=decay,
                                      anchor=anchor, forget_gate=gate)
        if impl != "compile" or self.impl != "auto" or q.shape[2] == 1:  # (T = 1 compiles nothing)
            return run(impl)
        try:
            return run("compile")
        except Exception as e:  # auto-picked compile must never be what breaks a run
            warnings.warn(f"torch.compile of the TTT mini-batch failed ({e.__class__.__name__}: "
                          f"{e}); using the eager PyTorch path")
            _COMPILE_FAILED = True
            return run("torch")

    def written(self, x, before, after):
        """How far a call over x [B, T, dim] moved the fast weights beyond what forgetting alone does:
        ||W_after - fade(W_before)|| / ||W_0|| per row and head [B, H] (float32; all fast weights
        together), where W are the fast weights at mini-batch starts (state.params), W_0 the learnt
        start and fade(W) = W_0 + decay^n (W - W_0) over the n mini-batch ends inside the call (under
        the forget gate, decay^(sum of their exponents)). Differentiable (the size of W_0 is not), for
        a penalty on what the layer takes in: train.py --ttt_update_penalty. before None: a fresh state."""
        B, T, _ = x.shape
        b = self.mini_batch
        if before is None:
            before = self.init_state(B, device=x.device)
        ends = (before.i + torch.arange(T, device=x.device)) % b == b - 1       # [T] the mini-batches' last tokens
        dt = after.params[0].dtype
        if self.gates():
            n = self.forget_gate(x).to(dt)[:, :, ends].sum(-1)[:, :, None, None]   # [B,H,1,1] exponents summed
        else:
            n = ends.sum().to(dt)
        decay = self.decays()
        ds = decay if isinstance(decay, tuple) else (decay,) * len(after.params)
        num = den = 0.0
        for w0, w1, a, g in zip(before.params, after.params, self._full_fast_weights(), ds):
            a = a.to(dt)[None]
            kept = torch.pow(torch.as_tensor(g, dtype=dt, device=x.device), n)   # fade over the call
            num = num + (w1 - a - kept * (w0 - a)).square().sum((-2, -1))
            den = den + a.detach().square().sum((-2, -1))
        return torch.sqrt(num / den + 1e-12)

    def lr_gate(self, x):
        """The per-token learning-rate gate sigmoid(w_h . x + c_h) [B, H, T] (float32) for x [B, T, dim]:
        how much of the full inner step each token takes (inner_inputs' lr is base_lr * this / d)."""
        with torch.autocast(device_type=x.device.type, enabled=False):  # lr is inner math: float32
            xf = x.to(torch.promote_types(x.dtype, torch.float32))
            w = self.learnable_ttt_lr_weight[:, 0].to(xf.dtype)          # [H, D]
            return torch.sigmoid(torch.einsum("btc,hc->bht", xf, w) + self.learnable_ttt_lr_bias.to(xf.dtype))

    def inner_inputs(self, x, i):
        """The inner loop's inputs for x [B, T, dim] whose first token sits at position i (int64
        tensor []) of its mini-batch: q, k, v [B,H,T,d] (RoPE applied, float32), lr [B,H,T], tau [b].
        """
        B, T, D = x.shape  # batch, tokens, width
        H, d, b = self.n_heads, self.head_dim, self.mini_batch
        q, k, v = (p(x).view(B, T, H, d).transpose(1, 2) for p in (self.q_proj, self.k_proj,
                                                                    self.v_proj))  # [B,H,T,d]
        # RoPE at the position inside the mini-batch (upstream position_ids % mini_batch_size); the
        # state knows where this call starts, so chunked and streaming calls agree
        tab = self.rope_table
        if tab.dtype not in (torch.float32, torch.float64):  # cast with a bf16 model: made again in float32
            tab = self.make_rope_table(x.device)
        pos = (i + torch.arange(T, device=x.device)) % b
        q, k = _rope(q, tab[0, pos], tab[1, pos]), _rope(k, tab[0, pos], tab[1, pos])
        lr = self.base_lr * self.lr_gate(x) / d                          # [B,H,T]
        offset = self.learnable_token_idx.to(torch.promote_types(x.dtype, torch.float32))
        tau = torch.clamp_min(1.0 / torch.arange(1, b + 1, device=x.device, dtype=offset.dtype)
                              + offset, 0.0)                              # [b]
        return q, k, v, lr, tau

    def forward(self, x: torch.Tensor, state: TTTState = None):
        """x [B, T, dim] -> (y [B, T, dim], new state). state None starts a fresh one; T = 1 is
        the streaming step, any T continues from wherever the state stands in its mini-batch."""
        B, T, D = x.shape  # batch, tokens, width
        if D != self.dim:
            raise ValueError(f"{type(self).__name__} expects width {self.dim}, got x of shape "
                             f"{tuple(x.shape)}")
        if state is None:
            state = self.init_state(B, device=x.device)
        q, k, v, lr, tau = self.inner_inputs(x, state.i)
        out, state = self._inner(q, k, v, lr, tau, state, self._impl(x), self.forget_gate(x))
        y = self.post_norm(out.to(x.dtype).transpose(1, 2).reshape(B, T, self.width))  # [B,T,H*d]
        if self.g_proj is not None:  # output gate as upstream apply_gate
            y = F.gelu(self.g_proj(x), approximate="tanh") * y
        return self.o_proj(y), state


class TTTLinear(_TTTLayer):
    """TTT-Linear layer: per head a linear fast model f(x) = LN(x W1 + b1), trained while reading.

    TTTLinear(dim, n_heads, mini_batch=16, base_lr=1.0, rope_theta=10000.0, gate=True,
              checkpoint_group=0, impl="auto", decay=1.0, half_life_range=None, forget_gate=False,
              head_dim=None)
    forward(x [B, T, dim], state=None) -> (y [B, T, dim], TTTState)
    Parameter names follow ttt-lm-pytorch (q_proj, ..., W1, b1) so its checkpoints map by name.
    impl "auto": on CUDA the Triton kernels where they support the shape, else the compiled loop
    (falling back to eager if compiling fails); on the CPU the PyTorch reference.
    decay < 1 (not in the official layer): fast weights that fade toward their learnt start, see
    ttt_linear (TTT-MLP's takes the compiled loop on CUDA: its Triton kernels have no decay).
    half_life_range (lo, hi) in tokens: learnt forgetting rates instead (learn_half_life).
    forget_gate: the input scales how fast each mini-batch forgets (add_forget_gate; TTT-MLP's
    takes the compiled loop on CUDA).
    head_dim (not in the official layer): each head's width, so that the inner model is n_heads *
    head_dim wide whatever dim is (the projections map between the two); None: dim / n_heads.
    """
    kind = "linear"
    inner = staticmethod(ttt_linear)

    def __init__(self, dim, n_heads, **kw):
        super().__init__(dim, n_heads, **kw)
        H, d = self.n_heads, self.head_dim
        self.W1 = nn.Parameter(torch.randn(H, d, d) * 0.02)
        self.b1 = nn.Parameter(torch.zeros(H, 1, d))

    def fast_weights(self):
        return (self.W1, self.b1)


class TTTMLP(_TTTLayer):
    """TTT-MLP layer: per head f(x) = LN(gelu(x W1 + b1) W2 + b2), hidden width 4 * head_dim.

    Same constructor and forward as TTTLinear; fast weights W1, b1, W2, b2 as upstream.
    """
    kind = "mlp"
    inner = staticmethod(ttt_mlp)

    def __init__(self, dim, n_heads, **kw):
        super().__init__(dim, n_heads, **kw)
        H, d = self.n_heads, self.head_dim
        self.W1 = nn.Parameter(torch.randn(H, d, 4 * d) * 0.02)
        self.b1 = nn.Parameter(torch.zeros(H, 1, 4 * d))
        self.W2 = nn.Parameter(torch.randn(H, 4 * d, d) * 0.02)
        self.b2 = nn.Parameter(torch.zeros(H, 1, d))

    def fast_weights(self):
        return (self.W1, self.b1, self.W2, self.b2)
