"""TTT layers: the pure functions against DESIGN.md written as plainly as possible, chunking
invariance (one call = token by token = random chunks), gradients, dtypes under autocast, the
streaming step's freedom from host syncs, and the Triton fast path against the PyTorch one."""
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import ttt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KINDS = {"linear": (ttt.ttt_linear, ttt.TTTLinear), "mlp": (ttt.ttt_mlp, ttt.TTTMLP)}


@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are tiny: a second thread only adds barrier waits (slow on a shared CPU)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

# -----------------------------------------------------------------------------
# The obvious per-token loop: DESIGN.md "TTT layer", one token at a time, autograd for g_j


def ln(z, w, b):
    mu = z.mean(-1, keepdim=True)
    var = ((z - mu) ** 2).mean(-1, keepdim=True)
    return (z - mu) / torch.sqrt(var + 1e-6) * w + b


def f_linear(x, W, w, b):
    W1, b1 = W
    return ln(x @ W1 + b1, w, b)


def f_mlp(x, W, w, b):
    W1, b1, W2, b2 = W
    return ln(F.gelu(x @ W1 + b1, approximate="tanh") @ W2 + b2, w, b)


def reference(kind, q, k, v, lr, tau, ln_w, ln_b, b, W0, i0=0, G0=None, decay=1.0, anchor=None, gate=None):
    """out_t = q_t + f(q_t; W_start - tau_i sum_{j<=i} lr_j g_j), g_j by autograd at W_start; with
    decay < 1 the next W_start also moves (1 - decay) of the way from W_start back to the anchor
    (decay a number, or one tensor per fast weight; with a forget gate [B, H, T], decay ** gate[t]
    at the mini-batch that ends at t)."""
    f = f_linear if kind == "linear" else f_mlp
    w, bb = ln_w[:, None], ln_b[:, None]
    W = list(W0)
    G = list(G0) if G0 is not None else [torch.zeros_like(p) for p in W]
    outs = []
    for t in range(q.shape[2]):
        i = (i0 + t) % b
        kt, vt, qt = k[:, :, t:t + 1], v[:, :, t:t + 1], q[:, :, t:t + 1]
        loss = 0.5 * ((f(kt, W, w, bb) - (vt - kt)) ** 2).sum()  # rows and heads are independent
        g = torch.autograd.grad(loss, W, create_graph=True)
        G = [Gp + lr[:, :, t, None, None] * gp for Gp, gp in zip(G, g)]
        Wi = [p - tau[i] * Gp for p, Gp in zip(W, G)]
        outs.append(qt + f(qt, Wi, w, bb))
        if i == b - 1:
            if isinstance(decay, list) or decay != 1.0:
                ds = decay if isinstance(decay, list) else [decay] * len(W)
                if gate is not None:
                    ds = [g ** gate[:, :, t, None, None] for g in ds]
                Wi = [p_i - (1 - g) * (p - a) for p_i, p, a, g in zip(Wi, W, anchor, ds)]
            W, G = Wi, [torch.zeros_like(Gp) for Gp in G]
    return torch.cat(outs, 2), W, G


def make_inputs(kind, B=2, H=2, T=20, d=8, b=4, dtype=torch.float64, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=1.0: (torch.randn(*s, generator=g, dtype=dtype) * scale)
    m = 4 * d
    q, k, v = r(B, H, T, d), r(B, H, T, d), r(B, H, T, d)
    lr = torch.rand(B, H, T, generator=g, dtype=dtype) / d * 2
    tau = (1.0 / torch.arange(1, b + 1, dtype=dtype) + r(b, scale=0.05)).clamp_min(0)
    ln_w, ln_b = 1 + r(H, d, scale=0.1), r(H, d, scale=0.1)
    shapes = [(d, d), (1, d)] if kind == "linear" else [(d, m), (1, m), (m, d), (1, d)]
    W0 = [r(H, *s, scale=0.3 if s[0] > 1 else 0.1)[None].repeat(B, 1, 1, 1) for s in shapes]
    xs = [q, k, v, lr, tau, ln_w, ln_b, *W0]
    if grad:
        for t in xs:
            t.requires_grad_()
    return xs


def state_of(W, G=None, i=0):
    G = G if G is not None else [torch.zeros_like(p) for p in W]
    return ttt.TTTState(tuple(W), tuple(G), torch.tensor(i, dtype=torch.int64))


def run_chunks(fn, q, k, v, lr, tau, ln_w, ln_b, b, state, sizes, **kw):
    """Call fn over consecutive chunks of the given sizes; return outputs and the final state."""
    outs, s = [], 0
    gate = kw.pop("forget_gate", None)
    for n in sizes:
        if gate is not None:   # per token, as q
            kw["forget_gate"] = gate[:, :, s:s + n]
        out, state = fn(q[:, :, s:s + n], k[:, :, s:s + n], v[:, :, s:s + n], lr[:, :, s:s + n],
                        tau, ln_w, ln_b, b, state, **kw)
        outs.append(out)
        s += n
    assert s == q.shape[2]
    return torch.cat(outs, 2), state


def random_sizes(T, seed, hi=9):
    g = torch.Generator().manual_seed(seed)
    sizes = []
    while sum(sizes) < T:
        sizes.append(min(int(torch.randint(1, hi, (1,), generator=g)), T - sum(sizes)))
    return sizes


def layer_one_call_and_chunks(layer, x, seed):
    """A layer over x [B, T, D] in one call and in random chunks: the two agree (float64, 1e-10).
    Returns the one call's output and state."""
    y, state = layer(x)
    ys, st, s = [], layer.init_state(x.shape[0]), 0
    for n in random_sizes(x.shape[1], seed):
        yi, st = layer(x[:, s:s + n], st)
        ys.append(yi)
        s += n
    assert (torch.cat(ys, 1) - y).abs().max().item() < 1e-10
    assert_state_close(st, state, 1e-10)
    return y, state


def assert_state_close(s1, s2, tol):
    assert int(s1.i) == int(s2.i)
    for x, y in zip(s1.params + s1.grads, s2.params + s2.grads):
        assert (x - y).abs().max().item() <= tol * (1 + y.abs().max().item())

# -----------------------------------------------------------------------------
# Exactness: the functions equal the per-token loop


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("b,T", [(4, 23), (16, 37), (64, 70)])
def test_matches_per_token_loop(kind, b, T):
    fn = KINDS[kind][0]
    q, k, v, lr, tau, ln_w, ln_b, *W0 = make_inputs(kind, T=T, b=b, d=8 if b < 64 else 4)
    for p in W0:
        p.requires_grad_()  # autograd of g_j in the reference
    ref, W, G = reference(kind, q, k, v, lr, tau, ln_w, ln_b, b, W0)
    with torch.no_grad():
        out, state = fn(q, k, v, lr, tau, ln_w, ln_b, b, state_of(W0))           # chunked, dual
        out1, state1 = run_chunks(fn, q, k, v, lr, tau, ln_w, ln_b, b, state_of(W0), [1] * T)
    err = (out - ref).abs().max().item()
    assert err < 1e-10, err
    assert (out1 - ref).abs().max().item() < 1e-10
    assert int(state.i) == T % b
    for s in (state, state1):
        for x, y in zip(s.params + s.grads, W + G):
            assert (x - y).abs().max().item() < 1e-10


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_matches_per_token_loop_from_mid_minibatch(kind):
    """A state that stands inside a mini-batch with non-zero sums (as left by an earlier call)."""
    fn = KINDS[kind][0]
    b, i0 = 16, 11
    q, k, v, lr, tau, ln_w, ln_b, *W0 = make_inputs(kind, T=30, b=b, seed=3)
    G0 = [0.01 * torch.randn_like(p) for p in W0]
    for p in W0:
        p.requires_grad_()
    ref, W, G = reference(kind, q, k, v, lr, tau, ln_w, ln_b, b, W0, i0=i0, G0=G0)
    with torch.no_grad():
        out, state = fn(q, k, v, lr, tau, ln_w, ln_b, b, state_of(W0, G0, i0))
    assert (out - ref).abs().max().item() < 1e-10
    assert int(state.i) == (i0 + 30) % b
    for x, y in zip(state.params + state.grads, W + G):
        assert (x - y).abs().max().item() < 1e-10

# -----------------------------------------------------------------------------
# Fast weights that forget (decay < 1, not in the official layer)


def make_anchor(W0, seed=11):
    g = torch.Generator().manual_seed(seed)
    return [p[0] + 0.1 * torch.randn(p[0].shape, generator=g, dtype=p.dtype) for p in W0]  # [H, ...]


def make_decays(W0, seed=12):
    """One decay tensor per fast weight, per head and output feature ([H, 1, n]), in (0.4, 0.95)."""
    g = torch.Generator().manual_seed(seed)
    return [0.4 + 0.55 * torch.rand(p.shape[1], 1, p.shape[-1], generator=g, dtype=p.dtype) for p in W0]


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("b,T,i0", [(4, 23, 0), (16, 37, 5)])
@pytest.mark.parametrize("per_feature", [False, True])
def test_decay_matches_per_token_loop(kind, b, T, i0, per_feature):
    """decay < 1 (one number, or a tensor per fast weight), one call, token by token and random
    chunks, from the start or mid-mini-batch."""
    fn = KINDS[kind][0]
    q, k, v, lr, tau, ln_w, ln_b, *W0 = make_inputs(kind, T=T, b=b, seed=8)
    G0 = [0.01 * torch.randn_like(p) for p in W0] if i0 else None
    anchor, decay = make_anchor(W0), make_decays(W0) if per_feature else 0.7
    for p in W0:
        p.requires_grad_()
    ref, W, G = reference(kind, q, k, v, lr, tau, ln_w, ln_b, b, W0, i0, G0, decay, anchor)
    plain, W1, _ = reference(kind, q, k, v, lr, tau, ln_w, ln_b, b, W0, i0, G0)
    assert (plain - ref).abs().max().item() > 1e-3  # the decay changes the outputs
    with torch.no_grad():
        for sizes in ([T], [1] * T, random_sizes(T, 4)):
            out, st = run_chunks(fn, q, k, v, lr, tau, ln_w, ln_b, b, state_of(W0, G0, i0), sizes,
                                 decay=tuple(decay) if per_feature else decay, anchor=anchor)
            assert (out - ref).abs().max().item() < 1e-10, sizes
            for x, y in zip(st.params + st.grads, W + G):
                assert (x - y).abs().max().item() < 1e-10, sizes


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_decay_fades_toward_the_anchor(kind):
    """With nothing learnt (lr = 0) the fast weights approach the anchor by decay each mini-batch:
    after n whole mini-batches W = anchor + decay^n (W0 - anchor), and mid-mini-batch they stay."""
    fn = KINDS[kind][0]
    b, n, decay = 4, 5, 0.8
    q, k, v, lr, tau, ln_w, ln_b, *W0 = make_inputs(kind, T=n * b + 2, b=b, seed=9)
    anchor = make_anchor(W0)
    for T in (n * b, n * b + 2):
        for sizes in ([T], [1] * T):
            _, st = run_chunks(fn, q[:, :, :T], k[:, :, :T], v[:, :, :T], torch.zeros_like(lr[:, :, :T]), tau,
                               ln_w, ln_b, b, state_of(W0), sizes, decay=decay, anchor=anchor)
            for p, p0, a in zip(st.params, W0, anchor):
                assert (p - (a + decay ** n * (p0 - a))).abs().max().item() < 1e-12, (T, sizes)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("per_feature", [False, True])
def test_decay_gradients_match_per_token_loop(kind, per_feature):
    """Outer gradients with decay < 1, the anchor's included (and the decay tensors'), chunked,
    token by token and checkpointed."""
    fn = KINDS[kind][0]
    b, T = 4, 19
    xs = make_inputs(kind, T=T, b=b, d=4, grad=True, seed=6)
    q, k, v, lr, tau, ln_w, ln_b, *W0 = xs
    anchor = [a.requires_grad_() for a in make_anchor(W0)]
    decay = [g.requires_grad_() for g in make_decays(W0)] if per_feature else 0.6
    extra = anchor + (decay if per_feature else [])
    ref = grads_of(kind, reference(kind, q, k, v, lr, tau, ln_w, ln_b, b, W0, decay=decay, anchor=anchor),
                   xs + extra)
    for sizes, group in (([T], 0), ([1] * T, 0), ([3, 1, 9, 6], 2)):
        out, st = run_chunks(fn, q, k, v, lr, tau, ln_w, ln_b, b, state_of(W0), sizes, checkpoint_group=group,
                             decay=tuple(decay) if per_feature else decay, anchor=anchor)
        for a, r in zip(grads_of(kind, (out, st.params, st.grads), xs + extra), ref):
            assert (a - r).abs().max().item() < 1e-8 * (1 + r.abs().max().item()), sizes
    assert all(r.abs().max() > 0 for r in ref[len(xs):])  # the anchor (and the decays) get a gradient


def make_gate(q, seed=13):
    """Forget-gate exponents [B, H, T] in (0, 3): some mini-batches keep nearly all, some forget fast."""
    g = torch.Generator().manual_seed(seed)
    return 3.0 * torch.rand(q.shape[:3], generator=g, dtype=q.dtype)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("b,T,i0", [(4, 23, 0), (16, 37, 5)])
@pytest.mark.parametrize("per_feature", [False, True])
def test_forget_gate_matches_per_token_loop(kind, b, T, i0, per_feature):
    """A forget gate (decay ** gate at each mini-batch's last token): one call, token by token and
    random chunks, from the start or mid-mini-batch, equal the per-token loop."""
    fn = KINDS[kind][0]
    q, k, v, lr, tau, ln_w, ln_b, *W0 = make_inputs(kind, T=T, b=b, seed=18)
    G0 = [0.01 * torch.randn_like(p) for p in W0] if i0 else None
    anchor, decay = make_anchor(W0), make_decays(W0) if per_feature else 0.7
    gate = make_gate(q)
    for p in W0:
        p.requires_grad_()
    ref, W, G = reference(kind, q, k, v, lr, tau, ln_w, ln_b, b, W0, i0, G0, decay, anchor, gate)
    ungated, _, _ = reference(kind, q, k, v, lr, tau, ln_w, ln_b, b, W0, i0, G0, decay, anchor)
    assert (ungated - ref).abs().max().item() > 1e-3  # the gate changes the outputs
    with torch.no_grad():
        for sizes in ([T], [1] * T, random_sizes(T, 4)):
            out, st = run_chunks(fn, q, k, v, lr, tau, ln_w, ln_b, b, state_of(W0, G0, i0), sizes,
                                 decay=tuple(decay) if per_feature else decay, anchor=anchor, forget_gate=gate)
            assert (out - ref).abs().max().item() < 1e-10, sizes
            for x, y in zip(st.params + st.grads, W + G):
                assert (x - y).abs().max().item() < 1e-10, sizes


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_forget_gate_gradients_match_per_token_loop(kind):
    """Outer gradients through a forget gate, the gate's own included, chunked, token by token and
    checkpointed."""
    fn = KINDS[kind][0]
    b, T = 4, 19
    xs = make_inputs(kind, T=T, b=b, d=4, grad=True, seed=16)
    q, k, v, lr, tau, ln_w, ln_b, *W0 = xs
    anchor = [a.requires_grad_() for a in make_anchor(W0)]
    decay = [g.requires_grad_() for g in make_decays(W0)]
    gate = make_gate(q).requires_grad_()
    extra = anchor + decay + [gate]
    ref = grads_of(kind, reference(kind, q, k, v, lr, tau, ln_w, ln_b, b, W0, decay=decay, anchor=anchor,
                                   gate=gate), xs + extra)
    for sizes, group in (([T], 0), ([1] * T, 0), ([3, 1, 9, 6], 2)):
        out, st = run_chunks(fn, q, k, v, lr, tau, ln_w, ln_b, b, state_of(W0), sizes, checkpoint_group=group,
                             decay=tuple(decay), anchor=anchor, forget_gate=gate)
        for a, r in zip(grads_of(kind, (out, st.params, st.grads), xs + extra), ref):
            assert (a - r).abs().max().item() < 1e-8 * (1 + r.abs().max().item()), sizes
    gg = ref[-1]   # the gate's gradient: at the tokens that end a mini-batch, and only there
    ends = torch.zeros(T, dtype=torch.bool)
    ends[b - 1::b] = True
    assert gg[:, :, ends].abs().min() > 0 and gg[:, :, ~ends].abs().max() == 0


@pytest.mark.parametrize("cls", [ttt.TTTLinear, ttt.TTTMLP])
def test_module_forget_gate(cls):
    """A layer with a forget gate: it starts as the same layer without one (s = 1), then a gate that
    depends on the input changes the outputs; one call and random chunks agree; the gate's weights get
    gradients and travel in the state dict; without forgetting it does nothing."""
    torch.manual_seed(3)
    b, T, D, H = 4, 23, 16, 2
    layer = cls(D, H, mini_batch=b, half_life_range=(4.0, 40.0), forget_gate=True).double()
    plain = cls(D, H, mini_batch=b, half_life_range=(4.0, 40.0)).double()
    plain.load_state_dict({k: v for k, v in layer.state_dict().items() if not k.startswith("forget_")})
    x = torch.randn(2, T, D, dtype=torch.float64)
    assert (layer(x)[0] - plain(x)[0]).abs().max().item() < 1e-12
    with torch.no_grad():
        layer.forget_weight.normal_(0, 0.5)
        layer.forget_bias.fill_(0.3)
    y, state = layer_one_call_and_chunks(layer, x, 7)
    assert (y - plain(x)[0]).abs().max().item() > 1e-4
    s = layer.forget_gate(x)
    assert s.shape == (2, H, T) and s.min() > 0
    # against the per-token loop with the layer's decays and gate
    q, k, v, lr, tau = layer.inner_inputs(x, torch.tensor(0))
    W0 = [p.detach()[None].repeat(2, *[1] * p.dim()).requires_grad_() for p in layer.fast_weights()]
    _, W, _ = reference(layer.kind, q, k, v, lr, tau, layer.ttt_norm_weight, layer.ttt_norm_bias, b, W0,
                        decay=[g.detach() for g in layer.decays()], anchor=[p.detach() for p in layer.fast_weights()],
                        gate=s.detach())
    for a, r in zip(state.params, W):
        assert (a - r).abs().max().item() < 1e-10
    (y.sum() + state.params[0].sum()).backward()
    assert layer.forget_weight.grad.abs().max() > 0 and layer.forget_bias.grad.abs().min() > 0
    other = cls(D, H, mini_batch=b, half_life_range=(1.0, 2.0), forget_gate=True).double()
    other.load_state_dict(layer.state_dict())
    assert (other(x)[0] - y).abs().max().item() == 0
    layer.set_decay(1.0)   # nothing forgets: the gate has nothing to scale
    assert not layer.gates() and layer.forget_gate(x) is None
    plain.set_decay(1.0)
    assert (layer(x)[0] - plain(x)[0]).abs().max().item() < 1e-12


def test_forget_gate_bad_inputs():
    q, k, v, lr, tau, ln_w, ln_b, *W0 = make_inputs("linear", T=5, b=4, dtype=torch.float32)
    anchor = [w[0] for w in W0]
    with pytest.raises(ValueError, match="give decay < 1 or decay tensors with it"):
        ttt.ttt_linear(q, k, v, lr, tau, ln_w, ln_b, 4, state_of(W0), forget_gate=torch.ones(2, 2, 5))
    for bad in (torch.ones(2, 2, 4), torch.ones(2, 2, 5, dtype=torch.int64), 1.0):
        with pytest.raises(ValueError, match=r"forget_gate must be a float tensor \[B, H, T\] = \(2, 2, 5\)"):
            ttt.ttt_linear(q, k, v, lr, tau, ln_w, ln_b, 4, state_of(W0), decay=0.9, anchor=anchor, forget_gate=bad)
    q, k, v, lr, tau, ln_w, ln_b, *W0 = make_inputs("mlp", T=5, b=4, dtype=torch.float32)
    with pytest.raises(NotImplementedError, match="no decay"):   # TTT-MLP's kernels: the official update only
        ttt.ttt_mlp(q, k, v, lr, tau, ln_w, ln_b, 4, state_of(W0), decay=0.9, anchor=[w[0] for w in W0],
                    impl="triton", forget_gate=torch.ones(2, 2, 5))
    for cls, cuda in ((ttt.TTTLinear, "triton"), (ttt.TTTMLP, "compile")):   # what a gated layer runs on CUDA
        layer = cls(32, 2, mini_batch=16, decay=0.9, forget_gate=True)
        assert layer._impl(torch.empty(1)) == "torch"
        if torch.cuda.is_available() and ttt.triton is not None:
            assert layer._impl(torch.empty(1, device="cuda")) == cuda


@pytest.mark.parametrize("cls", [ttt.TTTLinear, ttt.TTTMLP])
def test_module_decay(cls):
    """A layer with decay: chunking invariance, a different result than without, its learnt start as
    the anchor (gradients reach it through the decay too), and set_decay's checks."""
    torch.manual_seed(1)
    b, T = 4, 21
    layer = cls(16, 2, mini_batch=b, decay=0.5).double()
    x = torch.randn(2, T, 16, dtype=torch.float64)
    y, state = layer_one_call_and_chunks(layer, x, 5)
    # the anchor is W1 itself: the state's W1 = start + sum of decayed writes, against the reference
    q, k, v, lr, tau = layer.inner_inputs(x, torch.tensor(0))
    ref, W, _ = reference(layer.kind, q, k, v, lr, tau, layer.ttt_norm_weight, layer.ttt_norm_bias, b,
                          [p.detach()[None].repeat(2, *[1] * p.dim()).requires_grad_() for p in layer.fast_weights()],
                          decay=0.5, anchor=[p.detach() for p in layer.fast_weights()])
    assert (state.params[0] - W[0]).abs().max().item() < 1e-10
    layer.set_decay(1.0)
    y1, _ = layer(x)
    assert (y1 - y).abs().max().item() > 1e-6
    layer.set_decay(0.5)
    (y.sum() + state.params[0].sum()).backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in layer.fast_weights())
    for bad in (0.0, 1.5, -0.1, "0.9", True):
        with pytest.raises(ValueError, match="decay must be a number in"):
            layer.set_decay(bad)
    with pytest.raises(ValueError, match="decay must be a number in"):
        cls(16, 2, decay=2.0)


@pytest.mark.parametrize("cls", [ttt.TTTLinear, ttt.TTTMLP])
def test_module_learnt_half_lives(cls):
    """A layer that learns its half-lives: they start log-spaced in the range given (per output
    feature for TTT-Linear, per head for TTT-MLP), its decays equal the per-token loop's decay per
    fast weight, chunks and one call agree, the log-half-lives get gradients, the state dict keeps
    them, and set_decay drops them."""
    torch.manual_seed(2)
    b, T, D, H = 4, 23, 16, 2
    layer = cls(D, H, mini_batch=b, half_life_range=(4.0, 400.0)).double()
    h = layer.half_lives()
    n = D // H if cls is ttt.TTTLinear else 1
    assert h.shape == (H, n)
    start = torch.logspace(math.log10(4), 2 + math.log10(4), n if n > 1 else H, dtype=torch.float64)
    assert ((h / (start.repeat(H, 1) if n > 1 else start[:, None])) - 1).abs().max().item() < 1e-6   # (made float32)
    with torch.no_grad():   # learnt: no longer all alike
        layer.log_half_life.add_(0.3 * torch.randn_like(layer.log_half_life))
    x = torch.randn(2, T, D, dtype=torch.float64)
    y, state = layer_one_call_and_chunks(layer, x, 6)
    # against the per-token loop with decay 0.5 ** (b / half-life) per (head, feature)
    g = 0.5 ** (b / layer.half_lives())                                 # [H, n]
    decays = [g[:, None, :].expand(H, 1, p.shape[-1]) for p in layer.fast_weights()]
    q, k, v, lr, tau = layer.inner_inputs(x, torch.tensor(0))
    W0 = [p.detach()[None].repeat(2, *[1] * p.dim()).requires_grad_() for p in layer.fast_weights()]
    _, W, _ = reference(layer.kind, q, k, v, lr, tau, layer.ttt_norm_weight, layer.ttt_norm_bias, b, W0,
                        decay=decays, anchor=[p.detach() for p in layer.fast_weights()])
    for a, r in zip(state.params, W):
        assert (a - r).abs().max().item() < 1e-10
    (y.sum() + state.params[0].sum()).backward()
    assert layer.log_half_life.grad is not None and layer.log_half_life.grad.abs().min() > 0
    sd = layer.state_dict()
    assert "log_half_life" in sd
    other = cls(D, H, mini_batch=b, half_life_range=(1.0, 2.0)).double()
    other.load_state_dict(sd)
    assert (other(x)[0] - y).abs().max().item() == 0
    layer.set_decay(1.0)   # a fixed decay replaces them
    assert layer.log_half_life is None and "log_half_life" not in layer.state_dict()
    assert (layer(x)[0] - y).abs().max().item() > 1e-6
    for bad in ((0.0, 5.0), (5.0, 4.0), (1.0, float("inf"))):
        with pytest.raises(ValueError, match="learnt half-lives start in a range"):
            cls(D, H, mini_batch=b, half_life_range=bad)


def test_decay_bad_inputs_and_mlp_triton_refuses_it():
    q, k, v, lr, tau, ln_w, ln_b, *W0 = make_inputs("linear", T=5, b=4, dtype=torch.float32)
    with pytest.raises(ValueError, match="give anchor"):
        ttt.ttt_linear(q, k, v, lr, tau, ln_w, ln_b, 4, state_of(W0), decay=0.9)
    with pytest.raises(ValueError, match="does not fit the fast weight"):
        ttt.ttt_linear(q, k, v, lr, tau, ln_w, ln_b, 4, state_of(W0), decay=0.9,
                       anchor=[W0[0][0, 0], W0[1][0]])
    with pytest.raises(ValueError, match="decay must be a number in"):
        ttt.ttt_linear(q, k, v, lr, tau, ln_w, ln_b, 4, state_of(W0), decay=0.0, anchor=[w[0] for w in W0])
    with pytest.raises(ValueError, match="one per fast weight"):
        ttt.ttt_linear(q, k, v, lr, tau, ln_w, ln_b, 4, state_of(W0), decay=(torch.ones(2, 1, 8),),
                       anchor=[w[0] for w in W0])
    with pytest.raises(ValueError, match=r"does not broadcast to the fast weight .* \[H, \.\.\.\] shapes such as \(2, 1, 8\)"):
        ttt.ttt_linear(q, k, v, lr, tau, ln_w, ln_b, 4, state_of(W0), decay=(torch.ones(3, 1, 8), torch.ones(2, 1, 8)),
                       anchor=[w[0] for w in W0])
    with pytest.raises(ValueError, match="must be float tensors"):
        ttt.ttt_linear(q, k, v, lr, tau, ln_w, ln_b, 4, state_of(W0), decay=(0.9, 0.9), anchor=[w[0] for w in W0])
    with pytest.raises(NotImplementedError, match=r"a decay per head and feature, .* got \[\(2, 8, 8\), \(2, 1, 8\)\]"):
        ttt.ttt_linear(q, k, v, lr, tau, ln_w, ln_b, 4, state_of(W0), impl="triton",   # the kernels' shapes
                       decay=(torch.ones(2, 8, 8), torch.ones(2, 1, 8)), anchor=[w[0] for w in W0])
    q, k, v, lr, tau, ln_w, ln_b, *W0 = make_inputs("mlp", T=5, b=4, dtype=torch.float32)
    with pytest.raises(NotImplementedError, match="no decay"):   # TTT-MLP's kernels run the official update
        ttt.ttt_mlp(q, k, v, lr, tau, ln_w, ln_b, 4, state_of(W0), impl="triton", decay=0.9,
                    anchor=[w[0] for w in W0])
    for cls, cuda, kw in ((ttt.TTTLinear, "triton", dict(decay=0.9)), (ttt.TTTMLP, "compile", dict(decay=0.9)),
                          (ttt.TTTLinear, "triton", dict(half_life_range=(16, 1600))),
                          (ttt.TTTMLP, "compile", dict(half_life_range=(16, 1600)))):
        layer = cls(32, 2, mini_batch=16, **kw)
        assert layer._impl(torch.empty(1)) == "torch"   # the CPU
        if torch.cuda.is_available() and ttt.triton is not None:
            assert layer._impl(torch.empty(1, device="cuda")) == cuda

# -----------------------------------------------------------------------------
# Chunking invariance


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_chunking_invariance(kind, dtype, tol):
    fn = KINDS[kind][0]
    b, T = 16, 53
    q, k, v, lr, tau, ln_w, ln_b, *W0 = make_inputs(kind, T=T, b=b, dtype=dtype, seed=1)
    args = (q, k, v, lr, tau, ln_w, ln_b, b)
    out, state = fn(*args, state_of(W0))
    for sizes in ([1] * T, random_sizes(T, 0), [5, 30, 18], [3] + random_sizes(T - 3, 1, hi=20)):
        out2, state2 = run_chunks(fn, *args, state_of(W0), sizes)
        assert (out2 - out).abs().max().item() < tol, sizes
        assert_state_close(state2, state, tol)


@pytest.mark.parametrize("cls", [ttt.TTTLinear, ttt.TTTMLP])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_module_chunking_invariance(cls, dtype, tol):
    torch.manual_seed(0)
    b, T = 8, 29
    layer = cls(32, 4, mini_batch=b).to(dtype)
    with torch.no_grad():  # make the fast weights and offsets non-trivial
        for p in layer.fast_weights():
            p.add_(0.05 * torch.randn_like(p))
        layer.learnable_token_idx.add_(0.02 * torch.randn(b))
    x = torch.randn(2, T, 32, dtype=dtype)
    with torch.no_grad():
        y, state = layer(x)
        for sizes in ([1] * T, random_sizes(T, 2), [3, 13, 13]):
            ys, st, s = [], layer.init_state(2), 0
            for n in sizes:
                yi, st = layer(x[:, s:s + n], st)
                ys.append(yi)
                s += n
            assert (torch.cat(ys, 1) - y).abs().max().item() < tol, sizes
            assert_state_close(st, state, tol)
    assert y.shape == x.shape and state.params[0].dtype == dtype


@pytest.mark.parametrize("cls", [ttt.TTTLinear, ttt.TTTMLP])
def test_module_wider_than_the_model(cls):
    """head_dim: a memory of n_heads * head_dim, wider than the model. The layer is its projections
    around the per-token loop of that width, streams as it runs in one call, and with head_dim =
    dim / n_heads it is the official layer, weights and outputs."""
    torch.manual_seed(0)
    D, H, hd, b, T = 16, 4, 8, 4, 19
    layer = cls(D, H, mini_batch=b, head_dim=hd).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert (layer.width, layer.W1.shape[:2]) == (32, (H, hd))
    assert layer.q_proj.weight.shape == (32, D) and layer.o_proj.weight.shape == (D, 32)
    x = torch.randn(2, T, D, dtype=torch.float64)
    with torch.no_grad():
        y, state = layer(x)
        q, k, v, lr, tau = layer.inner_inputs(x, torch.zeros((), dtype=torch.int64))
        W0 = [w.detach()[None].expand(2, *w.shape).clone().requires_grad_() for w in layer.fast_weights()]
    with torch.enable_grad():
        out, *_ = reference(layer.kind, q, k, v, lr, tau, layer.ttt_norm_weight.detach(),
                            layer.ttt_norm_bias.detach(), b, W0)
    with torch.no_grad():
        z = layer.post_norm(out.transpose(1, 2).reshape(2, T, H * hd))
        ref = layer.o_proj(F.gelu(layer.g_proj(x), approximate="tanh") * z)
        assert (y - ref).abs().max().item() < 1e-10
        ys, st = [], layer.init_state(2)
        for t in range(T):
            yt, st = layer(x[:, t:t + 1], st)
            ys.append(yt)
        assert (torch.cat(ys, 1) - y).abs().max().item() < 1e-10
        assert_state_close(st, state, 1e-10)
        official, same = cls(D, 2, mini_batch=b).double(), cls(D, 2, mini_batch=b, head_dim=8).double()
        same.load_state_dict(official.state_dict())   # strict: the same names and shapes
        assert torch.equal(same(x)[0], official(x)[0])
    with pytest.raises(ValueError, match="even"):
        cls(16, 2, head_dim=7)


def test_rope_is_upstream_permuted_rotate_half():
    """ttt-lm-pytorch: permute_qk, rotate_half RoPE at position_ids % mini_batch, undo_permute_qk."""
    B, H, T, d, theta = 1, 2, 7, 8, 10000.0
    x = torch.randn(B, H, T, d, dtype=torch.float64)
    pos = torch.arange(T) % 4
    cs = ttt._rope_cos_sin(pos, d, theta)
    xp = x.reshape(B, H, T, d // 2, 2).transpose(3, 4).reshape(B, H, T, d)
    inv = 1.0 / theta ** (torch.arange(0, d, 2).float() / d)
    ang = pos.float()[:, None] * inv
    cos, sin = torch.cat((ang, ang), -1).cos(), torch.cat((ang, ang), -1).sin()
    rot = torch.cat((-xp[..., d // 2:], xp[..., :d // 2]), -1)
    y = xp * cos + rot * sin
    y = y.reshape(B, H, T, 2, d // 2).transpose(3, 4).reshape(B, H, T, d)
    assert (ttt._rope(x, *cs) - y).abs().max().item() < 1e-12

# -----------------------------------------------------------------------------
# Gradients of the outer loss through the inner loop


def grads_of(kind, fn_out, xs, seed=7):
    out, params, grads = fn_out
    g = torch.Generator().manual_seed(seed)
    loss = (out * torch.randn(out.shape, generator=g, dtype=out.dtype)).sum()
    for p in list(params) + list(grads):  # the final state feeds the next window
        loss = loss + (p * torch.randn(p.shape, generator=g, dtype=p.dtype)).sum()
    return torch.autograd.grad(loss, xs)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("checkpoint_group", [0, 2])
def test_gradients_match_per_token_loop(kind, checkpoint_group):
    fn = KINDS[kind][0]
    b, T = 4, 19
    xs = make_inputs(kind, T=T, b=b, d=4, grad=True, seed=5)
    q, k, v, lr, tau, ln_w, ln_b, *W0 = xs
    ref = grads_of(kind, reference(kind, q, k, v, lr, tau, ln_w, ln_b, b, W0), xs)
    out, st = fn(q, k, v, lr, tau, ln_w, ln_b, b, state_of(W0), checkpoint_group=checkpoint_group)
    ours = grads_of(kind, (out, st.params, st.grads), xs)
    for name, a, r in zip("q k v lr tau ln_w ln_b W1 b1 W2 b2".split(), ours, ref):
        assert (a - r).abs().max().item() < 1e-8 * (1 + r.abs().max().item()), name
    # and the same gradients when the sequence arrives in chunks that start mid-mini-batch
    out, st = run_chunks(fn, q, k, v, lr, tau, ln_w, ln_b, b, state_of(W0), [3, 1, 9, 6],
                         checkpoint_group=checkpoint_group)
    for a, r in zip(grads_of(kind, (out, st.params, st.grads), xs), ref):
        assert (a - r).abs().max().item() < 1e-8 * (1 + r.abs().max().item())


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_gradcheck(kind):
    fn = KINDS[kind][0]
    b = 4
    xs = make_inputs(kind, B=1, H=1, T=6, d=2, b=b, grad=True, seed=2)

    def f(q, k, v, lr, tau, ln_w, ln_b, *W0):
        G0 = [0.1 * torch.ones_like(p) for p in W0]
        out, st = fn(q, k, v, lr, tau, ln_w, ln_b, b, state_of(W0, G0, 2))  # starts mid-batch
        return out, *st.params, *st.grads

    assert torch.autograd.gradcheck(f, xs, eps=1e-6, atol=1e-6)


def test_module_gradients_flow_to_every_parameter():
    layer = ttt.TTTLinear(16, 2, mini_batch=4, checkpoint_group=1).double()
    x = torch.randn(2, 11, 16, dtype=torch.float64, requires_grad=True)
    y, state = layer(x)
    (y.square().sum() + state.params[0].sum()).backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert torch.isfinite(x.grad).all()

# -----------------------------------------------------------------------------
# Numerics and the streaming step


@pytest.mark.parametrize("cls", [ttt.TTTLinear, ttt.TTTMLP])
def test_bf16_autocast_keeps_the_inner_loop_float32(cls, monkeypatch):
    seen = []
    inner = ttt._ln_l2_grad

    def spy(z, target, w, b):
        seen.append((z.dtype, target.dtype, w.dtype))
        return inner(z, target, w, b)

    monkeypatch.setattr(ttt, "_ln_l2_grad", spy)
    layer = cls(32, 2, mini_batch=4)
    x = torch.randn(2, 9, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, state = layer(x)          # chunked
        y1, state = layer(x[:, :1], state)  # streaming
    assert y.dtype == torch.bfloat16  # the projections did run in bf16
    assert seen and all(dt == (torch.float32,) * 3 for dt in seen), seen
    for t in state.params + state.grads:
        assert t.dtype == torch.float32
    assert state.i.dtype == torch.int64 and state.i.shape == ()
    y32, _ = layer(x)  # and the bf16 result is close to the float32 one
    assert (y.float() - y32).abs().max() < 0.05 * y32.abs().max()


@pytest.mark.parametrize("cls", [ttt.TTTLinear, ttt.TTTMLP])
def test_bf16_parameters_still_get_a_float32_state(cls):
    layer = cls(32, 2, mini_batch=4).to(torch.bfloat16)
    x = torch.randn(2, 6, 32, dtype=torch.bfloat16)
    y, state = layer(x)
    y1, state = layer(x[:, :1], state)
    assert y.dtype == y1.dtype == torch.bfloat16 and torch.isfinite(y).all()
    assert all(t.dtype == torch.float32 for t in state.params + state.grads)


@pytest.mark.parametrize("cls", [ttt.TTTLinear, ttt.TTTMLP])
def test_streaming_step_never_syncs_with_the_host(cls):
    """Trace the T = 1 step with fake tensors: any .item(), int() or branch on a tensor value
    (anything a CUDA graph or a compiled frame loop cannot hold) raises here."""
    from torch.fx.experimental.proxy_tensor import make_fx
    layer = cls(16, 2, mini_batch=4)
    state = layer.init_state(3)
    x = torch.randn(3, 1, 16)
    params = {**dict(layer.named_parameters()), **dict(layer.named_buffers())}
    step = lambda p, x, s: torch.func.functional_call(layer, p, (x, s))
    gm = make_fx(step, tracing_mode="fake")(params, x, state)
    assert "_local_scalar_dense" not in gm.code
    with pytest.raises(Exception):  # the check has teeth: the chunked path reads state.i once
        make_fx(step, tracing_mode="fake")(params, torch.randn(3, 2, 16), state)
    # the traced graph replays the mini-batch boundary correctly without Python branches
    y, st = layer(x, state)
    for _ in range(5):
        y, st = layer(x, st)
    assert int(st.i) == 6 % 4


def test_state_helpers_and_reset_by_rows():
    layer = ttt.TTTMLP(16, 2, mini_batch=4)
    state = layer.init_state(3)
    assert [p.shape for p in state.params] == [(3, 2, 8, 32), (3, 2, 1, 32), (3, 2, 32, 8),
                                               (3, 2, 1, 8)]
    assert state.params[0].requires_grad and state.params[0].grad_fn is not None  # linked to W1
    _, state = layer(torch.randn(3, 8, 16), state)
    det = ttt.detach_state(state)
    assert all(t.grad_fn is None for t in det.params + det.grads)
    fresh = layer.init_state(3)
    rows = torch.tensor([True, False, True])
    mixed = ttt.TTTState(*[tuple(torch.where(rows.view(3, 1, 1, 1), a, b) for a, b in zip(x, y))
                           for x, y in zip(fresh[:2], det[:2])], det.i)
    assert torch.equal(mixed.params[0][1], det.params[0][1])
    assert torch.equal(mixed.params[0][0], fresh.params[0][0])


def test_bad_inputs_raise_clear_errors():
    q, k, v, lr, tau, ln_w, ln_b, *W0 = make_inputs("linear", T=5, b=4)
    with pytest.raises(ValueError, match="lr must be"):
        ttt.ttt_linear(q, k, v, lr[:, :, :2], tau, ln_w, ln_b, 4, state_of(W0))
    with pytest.raises(ValueError, match="tau must be"):
        ttt.ttt_linear(q, k, v, lr, tau[:3], ln_w, ln_b, 4, state_of(W0))
    with pytest.raises(ValueError, match="another batch size"):
        ttt.ttt_linear(q[:1], k[:1], v[:1], lr[:1], tau, ln_w, ln_b, 4, state_of(W0))
    with pytest.raises(ValueError, match="4 fast weights"):
        ttt.ttt_mlp(q, k, v, lr, tau, ln_w, ln_b, 4, state_of(W0))
    with pytest.raises(ValueError, match="expects width"):
        ttt.TTTLinear(16, 2)(torch.randn(1, 3, 8))
    with pytest.raises(ValueError, match="multiple of n_heads"):
        ttt.TTTLinear(10, 3)

# -----------------------------------------------------------------------------
# The Triton fast path against the PyTorch reference

TRITON_CHECK = r'''
import os, sys
sys.path[:0] = [sys.argv[1], os.path.join(sys.argv[1], "tests")]
import interpreted  # Triton's CPU interpreter: before anything defines a kernel
import torch, ttt
torch.manual_seed(0)
B, H = 1, 2
worst = 0.0
cases = [(16, 16, 40, 0, 1, 0), (16, 16, 37, 5, 2, 1), (16, 16, 10, 3, 16, 1), (16, 16, 16, 0, 1, 0),
         (16, 16, 11, 5, 1, 1), (32, 32, 70, 9, 3, 1)]
# each case through the one-pass forward and the two-pass one (walk, then outputs per mini-batch)
# (the two-pass forward and three-pass backward in pieces of one mini-batch or more, as many as 8),
# with the official update and with fast weights that forget (decay 0.7, toward an anchor per head;
# and a decay per head and feature, for W's columns and for c, whose gradients are checked too; and
# those with a forget gate, each mini-batch's decays a table of its own, the gate's gradient checked)
ttt.TRITON_TWO_PASS["piece_min"] = 1
for (d, b, T, i0, seg, full_G), rows, decay in [(c, r, g) for g in (1.0, 0.7, "feature", "gate") for r in (0, 1 << 20)
                                                for c in cases]:
    ttt.TRITON_TWO_PASS["rows"] = rows
    q, k, v = (torch.randn(B, H, T, d, dtype=torch.float64) for _ in range(3))
    lr = torch.rand(B, H, T, dtype=torch.float64) / d
    tau = (1 / torch.arange(1, b + 1) + 0.05 * torch.randn(b)).clamp_min(0).double()
    lnw, lnb = 1 + 0.1 * torch.randn(H, d).double(), 0.1 * torch.randn(H, d).double()
    W, c = 0.3 * torch.randn(B, H, d, d).double(), 0.1 * torch.randn(B, H, 1, d).double()
    GW, Gc = 0.01 * full_G * torch.randn_like(W), 0.01 * full_G * torch.randn_like(c)
    A, Ac = 0.3 * torch.randn(H, d, d).double(), 0.1 * torch.randn(H, 1, d).double()
    gW, gc = (0.4 + 0.55 * torch.rand(H, 1, d).double() for _ in range(2))
    s = 3 * torch.rand(B, H, T).double()
    per = decay in ("feature", "gate")
    xs = ([q, k, v, lr, tau, lnw, lnb, W, c, GW, Gc] + ([A, Ac] if decay != 1.0 else []) + ([gW, gc] if per else [])
          + ([s] if decay == "gate" else []))
    res = []
    for impl, dt in (("torch", torch.float64), ("triton", torch.float32)):
        xx = [x.to(dt).requires_grad_() for x in xs]
        st = ttt.TTTState((xx[7], xx[8]), (xx[9], xx[10]), torch.tensor(i0))
        out, st = ttt.ttt_linear(*xx[:7], b, st, impl=impl, checkpoint_group=seg,
                                 decay=tuple(xx[13:15]) if per else decay, anchor=xx[11:13],
                                 forget_gate=xx[15] if decay == "gate" else None)
        g = torch.Generator().manual_seed(1)
        loss = (out * torch.randn(out.shape, generator=g, dtype=torch.float64).to(dt)).sum()
        for p in st.params + st.grads:
            loss = loss + (p * torch.randn(p.shape, generator=g, dtype=torch.float64).to(dt)).sum()
        grads = torch.autograd.grad(loss, xx, allow_unused=True)  # (no mini-batch complete: no anchor)
        res.append([out, *st.params, *st.grads, *(torch.zeros_like(x) if g is None else g for g, x in zip(grads, xx))])
    for name, a, r in zip("out W c GW Gc dq dk dv dlr dtau dlnw dlnb dW dc dGW dGc dA dAc dgW dgc dgate".split(), *res):
        err = ((a.double() - r.double()).abs().max() / (1 + r.abs().max())).item()
        worst = max(worst, err)
        assert err < 1e-5, (T, i0, seg, rows, decay, name, err)
    with torch.no_grad():  # inference: no checkpoints kept
        st = ttt.TTTState((W.float(), c.float()), (GW.float(), Gc.float()), torch.tensor(i0))
        out, _ = ttt.ttt_linear(*[x.float() for x in xs[:7]], b, st, impl="triton",
                                decay=tuple(x.float() for x in xs[13:15]) if per else decay,
                                anchor=[x.float() for x in xs[11:13]],
                                forget_gate=xs[15].float() if decay == "gate" else None)
    assert (out.double() - res[0][0]).abs().max() < 1e-5
print("worst relative error", worst)
'''


MLP_TRITON_CHECK = r'''
import os, sys
sys.path[:0] = [sys.argv[1], os.path.join(sys.argv[1], "tests")]
import interpreted  # Triton's CPU interpreter: before anything defines a kernel
import torch, ttt
torch.manual_seed(0)
B, H = 1, 2
worst = 0.0
# (d, b, T, start in the mini-batch, checkpoint spacing, carried sums, hidden units a chunk)
cases = [(16, 16, 40, 0, 1, 0, 16), (16, 16, 37, 5, 2, 1, 32), (16, 16, 10, 3, 16, 1, 16),
         (16, 16, 16, 0, 1, 0, 64), (16, 16, 11, 5, 1, 1, 16), (32, 32, 70, 9, 3, 1, 32),
         (16, 32, 50, 31, 2, 1, 16)]
for d, b, T, i0, seg, full_G, hc in cases:
    ttt.TRITON_MLP["hc"] = hc
    m = 4 * d
    q, k, v = (torch.randn(B, H, T, d, dtype=torch.float64) for _ in range(3))
    lr = torch.rand(B, H, T, dtype=torch.float64) / d
    tau = (1 / torch.arange(1, b + 1) + 0.05 * torch.randn(b)).clamp_min(0).double()
    lnw, lnb = 1 + 0.1 * torch.randn(H, d).double(), 0.1 * torch.randn(H, d).double()
    W = [0.3 * torch.randn(B, H, d, m), 0.1 * torch.randn(B, H, 1, m), 0.3 * torch.randn(B, H, m, d),
         0.1 * torch.randn(B, H, 1, d)]
    W = [w.double() for w in W]
    G = [0.01 * full_G * torch.randn_like(w) for w in W]
    xs = [q, k, v, lr, tau, lnw, lnb, *W, *G]
    res = []
    for impl, dt in (("torch", torch.float64), ("triton", torch.float32)):
        xx = [x.to(dt).requires_grad_() for x in xs]
        st = ttt.TTTState(tuple(xx[7:11]), tuple(xx[11:]), torch.tensor(i0))
        out, st = ttt.ttt_mlp(*xx[:7], b, st, impl=impl, checkpoint_group=seg)
        g = torch.Generator().manual_seed(1)
        loss = (out * torch.randn(out.shape, generator=g, dtype=torch.float64).to(dt)).sum()
        for p in st.params + st.grads:
            loss = loss + (p * torch.randn(p.shape, generator=g, dtype=torch.float64).to(dt)).sum()
        res.append([out, *st.params, *st.grads, *torch.autograd.grad(loss, xx)])
    names = ("out W1 b1 W2 b2 GW1 Gb1 GW2 Gb2 dq dk dv dlr dtau dlnw dlnb dW1 db1 dW2 db2 "
             "dGW1 dGb1 dGW2 dGb2").split()
    for name, a, r in zip(names, *res):
        err = ((a.double() - r.double()).abs().max() / (1 + r.abs().max())).item()
        worst = max(worst, err)
        assert err < 1e-5, (d, b, T, i0, seg, hc, name, err)
    with torch.no_grad():  # inference: no checkpoints kept
        st = ttt.TTTState(tuple(w.float() for w in W), tuple(g.float() for g in G), torch.tensor(i0))
        out, _ = ttt.ttt_mlp(*[x.float() for x in xs[:7]], b, st, impl="triton")
    assert (out.double() - res[0][0]).abs().max() < 1e-5
print("worst relative error", worst)
'''


COMPILE_CHECK = r'''
import os, sys
sys.path[:0] = [sys.argv[1], os.path.join(sys.argv[1], "tests")]
import interpreted  # Triton's CPU interpreter: before anything defines a kernel
import torch, ttt
torch.manual_seed(0)
name, _, extra = sys.argv[2].partition(":")   # "TTTLinear:gate": learnt half-lives and a forget gate
kw = dict(half_life_range=(16.0, 1600.0), forget_gate=True) if extra == "gate" else {}
layer = getattr(ttt, name)(32, 2, mini_batch=16, impl="triton", **kw)
if extra == "gate":
    with torch.no_grad():
        layer.forget_weight.normal_(0, 0.5)
wrt = [layer.W1, layer.ttt_norm_weight] + ([layer.forget_weight, layer.log_half_life] if extra == "gate" else [])
x = torch.randn(2, 40, 32, requires_grad=True)
_, st0 = layer(torch.randn(2, 5, 32))   # the call below starts at position 5 of a mini-batch

def f(x, st):
    y, st = layer(x, st)
    return y, st.params[0], st.i

res = []
for fn in (f, torch.compile(f, fullgraph=True, backend="aot_eager")):  # fullgraph: a graph break raises
    y, W, i = fn(x, st0)
    res.append([y, W, i, *torch.autograd.grad((y.square().sum() + W.sum()), [x, *wrt], retain_graph=True)])
for a, r in zip(*res):
    assert (a.double() - r.double()).abs().max() <= 1e-5 * (1 + r.abs().max()), (a, r)
assert int(res[0][2]) == 45 % 16
# the chunked call never reads a tensor's value on the host: traced with fake tensors, an int() or
# .item() would raise or leave a _local_scalar_dense in the graph
from torch.fx.experimental.proxy_tensor import make_fx
st1 = ttt.TTTState(tuple(p.detach() for p in st0.params), tuple(g.detach() for g in st0.grads), st0.i)
step = lambda p, x, s: torch.func.functional_call(layer, p, (x, s))
gm = make_fx(step, tracing_mode="fake")({**dict(layer.named_parameters()), **dict(layer.named_buffers())}, x.detach(), st1)
assert "_local_scalar_dense" not in gm.code and ("linear_chunk" in gm.code or "mlp_chunk" in gm.code)
print("compiled whole")
'''


@pytest.mark.parametrize("cls", ["TTTLinear", "TTTMLP", "TTTLinear:gate"])
def test_triton_path_compiles_without_graph_breaks(cls):
    """torch.compile traces a TTT layer on the Triton path as one graph (the kernels are
    registered operators with their backward), the compiled layer gives the eager outputs, state
    and gradients, and the chunked call never syncs with the host (where it starts inside its
    mini-batch is read by the kernels on the device)."""
    pytest.importorskip("triton")
    r = subprocess.run([sys.executable, "-c", COMPILE_CHECK, ROOT, cls], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "compiled whole" in r.stdout


def test_triton_kernels_match_torch_in_the_interpreter():
    """The Triton forward (one pass, and two) and hand-written backward (one walk, and three passes)
    against autograd of the PyTorch path, run on the CPU by Triton's interpreter: calls that start
    mid-mini-batch, incomplete last mini-batches, several checkpoint spacings, the passes in pieces."""
    pytest.importorskip("triton")
    r = subprocess.run([sys.executable, "-c", TRITON_CHECK, ROOT], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "worst relative error" in r.stdout


def test_triton_mlp_kernels_match_torch_in_the_interpreter():
    """TTT-MLP's Triton forward and hand-written backward against autograd of the PyTorch path, in
    Triton's interpreter: calls that start mid-mini-batch with carried sums, incomplete last
    mini-batches, several checkpoint spacings, the hidden units in one chunk or several."""
    pytest.importorskip("triton")
    r = subprocess.run([sys.executable, "-c", MLP_TRITON_CHECK, ROOT], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "worst relative error" in r.stdout


def test_triton_path_refuses_what_it_does_not_cover():
    q, k, v, lr, tau, ln_w, ln_b, *W0 = make_inputs("mlp", T=5, b=4, dtype=torch.float32)
    with pytest.raises(NotImplementedError, match="impl='torch'"):
        ttt.ttt_mlp(q, k, v, lr, tau, ln_w, ln_b, 4, state_of(W0), impl="triton")


def cuda_inputs(B, H, T, d, b, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, device="cuda")
    q, k, v = (r(B, H, T, d).to(dtype) for _ in range(3))
    lr = torch.rand(B, H, T, generator=g, device="cuda") / d
    tau = (1 / torch.arange(1, b + 1, device="cuda") + 0.05 * r(b)).clamp_min(0)
    lnw, lnb = 1 + 0.1 * r(H, d), 0.1 * r(H, d)
    W, c = 0.02 * r(B, H, d, d), torch.zeros(B, H, 1, d, device="cuda")
    return [q, k, v, lr, tau, lnw, lnb, W, c]


@pytest.mark.gpu
@pytest.mark.parametrize("b", [16, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("two_pass", [False, True], ids=["1-pass", "2-pass"])
def test_triton_matches_torch_on_cuda(b, dtype, two_pass, monkeypatch):
    monkeypatch.setitem(ttt.TRITON_TWO_PASS, "rows", 1 << 20 if two_pass else 0)
    B, H, d, T = 2, 4, 64, 3 * b + 5
    xs = cuda_inputs(B, H, T, d, b, dtype)
    res = []
    for impl in ("torch", "triton"):
        xx = [x.detach().clone().requires_grad_() for x in xs]
        W, c = xx[7:]
        st = ttt.TTTState((W, c), (torch.zeros_like(W), torch.zeros_like(c)),
                          torch.zeros((), dtype=torch.int64, device="cuda"))
        # three calls: the second starts mid-mini-batch with carried sums
        outs = []
        for s, e in ((0, 7), (7, 2 * b + 1), (2 * b + 1, T)):
            out, st = ttt.ttt_linear(*[x[:, :, s:e] for x in xx[:3]], xx[3][:, :, s:e], *xx[4:7],
                                     b, st, impl=impl, checkpoint_group=2)
            outs.append(out)
        out = torch.cat(outs, 2)
        loss = out.float().square().sum() + sum(p.square().sum() for p in st.params + st.grads)
        res.append([out.float(), *st.params, *st.grads, *torch.autograd.grad(loss, xx)])
    for name, a, r in zip("out W c GW Gc dq dk dv dlr dtau dlnw dlnb dW dc".split(), *res):
        err = ((a.float() - r.float()).abs().max() / (1e-3 + r.float().abs().max())).item()
        assert err < (1e-4 if dtype == torch.float32 else 2e-2), (name, err)


@pytest.mark.gpu
@pytest.mark.parametrize("b", [16, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_mlp_matches_torch_on_cuda(b, dtype):
    B, H, d, T = 2, 4, 64, 3 * b + 5
    q, k, v, lr, tau, lnw, lnb, W1, _ = cuda_inputs(B, H, T, d, b, dtype)
    g = torch.Generator(device="cuda").manual_seed(1)
    W2 = 0.02 * torch.randn(B, H, 4 * d, d, generator=g, device="cuda")
    W1 = 0.02 * torch.randn(B, H, d, 4 * d, generator=g, device="cuda")
    b1, b2 = torch.zeros(B, H, 1, 4 * d, device="cuda"), torch.zeros(B, H, 1, d, device="cuda")
    xs = [q, k, v, lr, tau, lnw, lnb, W1, b1, W2, b2]
    res = []
    for impl in ("torch", "triton"):
        xx = [x.detach().clone().requires_grad_() for x in xs]
        st = ttt.TTTState(tuple(xx[7:]), tuple(torch.zeros_like(w) for w in xx[7:]),
                          torch.zeros((), dtype=torch.int64, device="cuda"))
        outs = []  # three calls: the second starts mid-mini-batch with carried sums
        for s, e in ((0, 7), (7, 2 * b + 1), (2 * b + 1, T)):
            out, st = ttt.ttt_mlp(*[x[:, :, s:e] for x in xx[:3]], xx[3][:, :, s:e], *xx[4:7],
                                  b, st, impl=impl, checkpoint_group=2)
            outs.append(out)
        out = torch.cat(outs, 2)
        loss = out.float().square().sum() + sum(p.square().sum() for p in st.params + st.grads)
        res.append([out.float(), *st.params, *st.grads, *torch.autograd.grad(loss, xx)])
    names = "out W1 b1 W2 b2 GW1 Gb1 GW2 Gb2 dq dk dv dlr dtau dlnw dlnb dW1 db1 dW2 db2".split()
    for name, a, r in zip(names, *res):
        err = ((a.float() - r.float()).abs().max() / (1e-3 + r.float().abs().max())).item()
        assert err < (1e-4 if dtype == torch.float32 else 2e-2), (name, err)


@pytest.mark.gpu
@pytest.mark.parametrize("cls,decay", [(ttt.TTTLinear, 1.0), (ttt.TTTMLP, 1.0), (ttt.TTTLinear, 0.9),
                                       (ttt.TTTLinear, "learnt"), (ttt.TTTLinear, "gate"), (ttt.TTTLinear, "wide")])
def test_module_on_cuda_takes_triton_and_agrees_with_torch(cls, decay):
    torch.manual_seed(0)
    kw = (dict(half_life_range=(8.0, 800.0), forget_gate=decay == "gate") if decay in ("learnt", "gate")
          else dict(head_dim=64, decay=0.9) if decay == "wide" else dict(decay=decay))
    layer = cls(128 if decay == "wide" else 256, 4, mini_batch=16, **kw).cuda()   # wide: 4 heads of 64 from 128
    x = torch.randn(2, 100, layer.dim, device="cuda", requires_grad=True)
    if decay == "gate":   # a gate that depends on the input
        with torch.no_grad():
            layer.forget_weight.normal_(0, 0.5)
    assert layer._impl(x) == "triton"
    wrt = [x, layer.W1] + ([layer.log_half_life] if decay in ("learnt", "gate") else [])
    wrt += [layer.forget_weight, layer.forget_bias] if decay == "gate" else []
    res = []
    for impl in ("triton", "torch"):
        layer.impl = impl
        y, st = layer(x)
        # (written: how far the call moved the fast weights, train.py --ttt_update_penalty's term)
        res.append((y, st, torch.autograd.grad(y.square().sum() + st.params[0].sum() + layer.written(x, None, st).sum(), wrt)))
    (y, st, g), (y2, st2, g2) = res
    assert (y - y2).abs().max() < 1e-4 * y2.abs().max()
    assert_state_close(st, st2, 1e-4)
    for a, r in zip(g, g2):
        assert (a - r).abs().max() < 1e-4 * (1 + r.abs().max())


@pytest.mark.gpu
@pytest.mark.parametrize("cls", [ttt.TTTLinear, ttt.TTTMLP])
def test_streaming_step_in_a_cuda_graph(cls):
    torch.manual_seed(0)
    b = 4
    layer = cls(128, 2, mini_batch=b).cuda()
    xs = torch.randn(3 * b + 1, 2, 1, 128, device="cuda")
    ref, st = [], layer.init_state(2)
    with torch.no_grad():
        for x in xs:
            y, st = layer(x, st)
            ref.append(y)
        static_x = xs[0].clone()
        static = ttt.detach_state(layer.init_state(2))
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):  # warm up outside the graph
            layer(static_x, static)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y_g, st_g = layer(static_x, static)
        outs = []
        for x in xs:
            static_x.copy_(x)
            graph.replay()
            outs.append(y_g.clone())
            for dst, src in zip(static.params + static.grads + (static.i,),
                                st_g.params + st_g.grads + (st_g.i,)):
                dst.copy_(src)
    for y, r in zip(outs, ref):
        assert (y - r).abs().max() < 1e-5 * (1 + r.abs().max())


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("decay", [1.0, 0.7, "gate"])
def test_compile_impl_matches_torch(kind, decay, monkeypatch):
    """impl="compile" runs the same math with each whole mini-batch under torch.compile; traced
    here with the aot_eager backend (dynamo + AOTAutograd, no code generation) to stay fast."""
    import functools
    fn = KINDS[kind][0]
    minibatch = ttt._linear_minibatch if kind == "linear" else ttt._mlp_minibatch
    compiled = torch.compile(functools.partial(ttt._full_minibatch, minibatch), backend="aot_eager",
                             dynamic=False, fullgraph=True)
    monkeypatch.setitem(ttt._COMPILED, minibatch, compiled)
    b = 4
    xs = make_inputs(kind, T=19, b=b, d=4, grad=True, seed=4)
    q, k, v, lr, tau, ln_w, ln_b, *W0 = xs
    res = []
    gate = make_gate(q).requires_grad_() if decay == "gate" else None   # (a forget gate on a decay of 0.7)
    kw = dict(decay=0.7, forget_gate=gate) if gate is not None else dict(decay=decay)
    for impl in ("torch", "compile"):
        out, st = run_chunks(fn, q, k, v, lr, tau, ln_w, ln_b, b, state_of(W0), [2, 13, 4],
                             impl=impl, checkpoint_group=2, anchor=[w[0] for w in W0] if decay != 1.0 else None, **kw)
        res.append([out, *st.params, *grads_of(kind, (out, st.params, st.grads), xs + ([gate] if gate is not None else []))])
    for a, r in zip(*res):
        assert (a - r).abs().max().item() < 1e-10


def test_bench_baseline_loops_are_the_same_layer():
    """bench/ttt.py's per-mini-batch loops (the official code's dual form) equal ttt.py."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_ttt", os.path.join(ROOT, "bench", "ttt.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for kind in ("linear", "mlp"):
        q, k, v, lr, tau, ln_w, ln_b, *W0 = make_inputs(kind, T=32, b=16, seed=6)
        loop = bench.loop_linear if kind == "linear" else bench.loop_mlp
        ref = loop(q, k, v, lr, tau, ln_w, ln_b, 16, *W0)
        out, _ = KINDS[kind][0](q, k, v, lr, tau, ln_w, ln_b, 16, state_of(W0))
        assert (ref - out).abs().max().item() < 1e-10


@pytest.mark.slow
def test_bench_quick_runs():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "ttt.py"), "--quick"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "| linear | 16 | loop |" in r.stdout and "## Streaming step" in r.stdout


def test_modules_match_official_ttt_lm_pytorch():
    """TTTLinear and TTTMLP against the official layers of ttt-lm-pytorch, weights loaded by name:
    outputs (one call and one token a call) and gradients, float64 and float32, b in {4, 16},
    lengths that are and are not multiples of b. Needs a checkout of the official repository (this
    suite downloads nothing): TTT_LM_PYTORCH=path/to/ttt-lm-pytorch; skipped without it."""
    path = os.path.join(os.environ.get("TTT_LM_PYTORCH", ""), "ttt.py")
    if not os.environ.get("TTT_LM_PYTORCH") or not os.path.isfile(path):
        pytest.skip("set TTT_LM_PYTORCH to a checkout of test-time-training/ttt-lm-pytorch")
    pytest.importorskip("transformers")
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import ttt_official_parity
    for kind, dtype, b, L, *errs in ttt_official_parity.compare(path):
        tol = 1e-7 if dtype == "float64" else 3e-6   # both RoPE tables are float32, made differently
        assert max(errs) < tol, (kind, dtype, b, L, errs)


def _fla_case(B, H, T, d, b, impl="torch", device="cpu"):
    """Inputs where ours and flash-linear-attention's TTT-Linear define the same update (one learning
    rate for every token, token weights 1), our output and final state, and the inputs in fla's
    layout [B, T, H, d] with its initial state."""
    q, k, v = (torch.randn(B, H, T, d, device=device) for _ in range(3))
    lr = torch.full((B, H, T), 0.5 / d, device=device)
    lnw, lnb = torch.rand(H, d, device=device) + 0.5, 0.1 * torch.randn(H, d, device=device)
    W0, b0 = 0.02 * torch.randn(B, H, d, d, device=device), 0.02 * torch.randn(B, H, 1, d, device=device)
    st = ttt.TTTState((W0.clone(), b0.clone()), (torch.zeros_like(W0), torch.zeros_like(b0)),
                      torch.zeros((), dtype=torch.int64, device=device))
    out, st = ttt.ttt_linear(q, k, v, lr, torch.ones(b, device=device), lnw, lnb, b, st, impl=impl)
    tr = lambda x: x.transpose(1, 2).contiguous()
    fla_args = (tr(q), tr(k), tr(v), lnw, lnb, tr(lr[..., None]))
    return q, lnw, lnb, W0, out, st, fla_args, dict(initial_state=W0.clone(), initial_state_bias=b0.clone(),
                                                    output_final_state=True)


def _rel(a, r):
    return ((a - r).norm() / r.norm()).item()


@pytest.mark.parametrize("b", [4, 16])
def test_ttt_linear_matches_fla_reference(b):
    """Against an independent implementation: flash-linear-attention's PyTorch reference of its
    chunk_ttt_linear (fla.ops.ttt.naive; fla-core, a test extra). fla takes one learning rate per
    query row where the official layer has tau_i * lr_j, scales q, and returns z + LN(z) where ours
    is q + LN(z). With one learning rate for every token, token weights 1 and q unscaled both
    define the same layer: the fast weights after 4 mini-batches are equal, and the outputs agree
    (z = fla's output - ours + q gives back our LN(z)), float32."""
    naive = pytest.importorskip("fla.ops.ttt.naive")
    torch.manual_seed(0)
    d = 32
    q, lnw, lnb, W0, out, st, fla_args, fla_state = _fla_case(2, 3, 4 * b, d, b)
    o, W, bias = naive.chunk_ttt_linear_ref(*fla_args, scale=1.0, mini_batch_size=b, **fla_state)
    assert _rel(st.params[0], W0) > 10   # the fast weights moved
    assert _rel(W, st.params[0]) < 1e-6 and _rel(bias, st.params[1]) < 1e-6
    z = o.transpose(1, 2) - out + q
    ln = F.layer_norm(z, (d,), eps=ttt.LN_EPS) * lnw[:, None] + lnb[:, None]
    assert _rel(ln, out - q) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_ttt_linear_final_state_matches_fla(impl):
    """Against an independent implementation, where one is installed: flash-linear-attention's
    chunk_ttt_linear. Its outputs are defined differently (q scaled, o + LN(o)), but with one
    learning rate for every token and token weights 1 both make the same updates of the fast
    weights: after 4 mini-batches W and b agree to float32 precision (they moved 16 times their
    initial size)."""
    fla_ttt = pytest.importorskip("fla.ops.ttt")
    torch.manual_seed(0)
    b = 16
    _, _, _, W0, _, st, fla_args, fla_state = _fla_case(2, 2, 4 * b, 64, b, impl=impl, device="cuda")
    _, W, bias = fla_ttt.chunk_ttt_linear(*fla_args, chunk_size=b, **fla_state)
    assert _rel(st.params[0], W0) > 1
    assert _rel(W, st.params[0]) < 1e-5 and _rel(bias, st.params[1]) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("cls,decay", [(ttt.TTTMLP, 1.0), (ttt.TTTMLP, 0.9), (ttt.TTTLinear, "gate")])
def test_compile_impl_on_cuda_matches_torch(cls, decay):
    torch.manual_seed(0)
    kw = dict(half_life_range=(16.0, 1600.0), forget_gate=True) if decay == "gate" else dict(decay=decay)
    layer = cls(256, 4, mini_batch=16, checkpoint_group=2, **kw).cuda()
    if decay == "gate":   # a gate that depends on the input
        with torch.no_grad():
            layer.forget_weight.normal_(0, 0.5)
    x = torch.randn(2, 70, 256, device="cuda", requires_grad=True)
    if decay != 1.0:
        assert layer._impl(x) == ("compile" if cls is ttt.TTTMLP else "triton")   # TTT-MLP's kernels have no decay
    res = []
    for impl in ("torch", "compile"):
        layer.impl = impl
        y, st = layer(x[:, :9])
        y2, st = layer(x[:, 9:], st)
        y = torch.cat([y, y2], 1)
        wrt = [x, layer.W1] + ([layer.forget_weight, layer.log_half_life] if decay == "gate" else [])
        g = torch.autograd.grad(y.square().sum(), wrt)
        res.append([y, *st.params, *g])
    for a, r in zip(*res):
        assert (a - r).abs().max() < 1e-4 * (1 + r.abs().max())


@pytest.mark.slow
@pytest.mark.parametrize("b", [16, 64])
def test_triton_kernels_compile_for_h100(b):
    """Compile the kernels to sm_90 machine code without a GPU (Triton ships ptxas): catches what
    the interpreter cannot, such as type or layout errors in the compiled language."""
    pytest.importorskip("triton")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    ints = ("T", "NMS", "NCS", "H", "M0", "M1", "J0", "J1")
    for kern, consts, warps in (
            (ttt._ttt_linear_fwd_kernel, dict(D=64, BS=b, SEG=16, SAVE=True, DOT=ttt.TRITON_DOT,
                                              STAGES=ttt.TRITON_FWD["stages"]), ttt.TRITON_FWD["num_warps"]),
            (ttt._ttt_linear_bwd_kernel, dict(D=64, BS=b, SEG=16, DOT=ttt.TRITON_DOT),
             8 if b * 64 <= 1024 else 4),
            (ttt._ttt_linear_scan_kernel, dict(D=64, BS=b, DOT=ttt.TRITON_DOT, STAGES=ttt.TRITON_FWD["stages"]),
             ttt.TRITON_FWD["num_warps"]),
            (ttt._ttt_linear_readout_kernel, dict(D=64, BS=b, DOT=ttt.TRITON_DOT), ttt.TRITON_FWD["num_warps"]),
            (ttt._ttt_linear_bwd_out_kernel, dict(D=64, BS=b, DOT=ttt.TRITON_DOT), 4),
            (ttt._ttt_linear_bwd_walk_kernel, dict(D=64, BS=b, DOT=ttt.TRITON_DOT, STAGES=ttt.TRITON_FWD["stages"]), 4),
            (ttt._ttt_linear_bwd_par_kernel, dict(D=64, BS=b, HAS_G=True, DOT=ttt.TRITON_DOT),
             8 if b * 64 <= 1024 else 4),
            (ttt._ttt_mlp_fwd_kernel, dict(D=64, M=256, HC=ttt.TRITON_MLP["hc"], BS=b, SEG=16, SAVE=True,
                                           DOT=ttt.TRITON_MLP["dot"]), ttt.TRITON_MLP["fwd_warps"]),
            (ttt._ttt_mlp_bwd_kernel, dict(D=64, M=256, HC=ttt.TRITON_MLP["hc"], BS=b, SEG=16,
                                           DOT=ttt.TRITON_MLP["dot"]), ttt.TRITON_MLP["bwd_warps"])):
        names = kern.arg_names
        # the official update, forgetting, and forgetting under a forget gate (each mini-batch's decays)
        variants = [{}] if "DECAY" not in names else [{"DECAY": False}, {"DECAY": True}] if "PER_MB" not in names \
            else [{"DECAY": False, "PER_MB": False}, {"DECAY": True, "PER_MB": False}, {"DECAY": True, "PER_MB": True}]
        for var in variants:
            decay = var.get("DECAY"), var.get("PER_MB")
            kc = {**consts, **var}
            sig = {n: "constexpr" if n in kc else "i32" if n in ints else "*i64" if n == "i_ptr"
                   else "*fp32" for n in names}
            src = ASTSource(fn=kern, signature=sig,
                            constexprs={(names.index(n),): v for n, v in kc.items()})
            stages = 3 if kern is not ttt._ttt_linear_bwd_kernel or b * 64 <= 1024 else 1   # as launched
            if kern in (ttt._ttt_mlp_fwd_kernel, ttt._ttt_mlp_bwd_kernel):
                stages = 1
            compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                      options={"num_warps": warps, "num_stages": stages})
            assert compiled.metadata.shared <= 227 * 1024  # fits an H100 SM
            if kern is ttt._ttt_linear_bwd_kernel and b == 64:  # two programs an SM (228 KB, 1 KB each reserved)
                assert compiled.metadata.shared <= 113 * 1024, (decay, compiled.metadata.shared)


def test_memory_probe():
    # scripts/ttt_memory.py: one pair written into a fresh layer comes back; a key never written
    # does not (chance 1/256); with 63 pairs after it the first one is still there at base lr 1
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import ttt_memory
    first, last, never = ttt_memory.probe("linear", 1.0, 0, 1.0, trials=64)
    assert first == last >= 0.95 and never <= 0.1
    first, last, never = ttt_memory.probe("linear", 1.0, 63, 1.0, trials=64)
    assert first >= 0.9 and never <= 0.1


@pytest.mark.slow
def test_kernel_sizes_script(capsys):
    """scripts/kernel_sizes.py (docs/ttt.md's PTX figures): a row for each kernel, with DECAY off and on
    (and on with a forget gate's table), and forgetting never makes a kernel smaller."""
    pytest.importorskip("triton")
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import kernel_sizes
    kernel_sizes.main([])
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| _ttt")]
    got = {(r[0].strip(), r[1].strip()): int(r[2]) for r in rows}
    assert len(got) == 13
    for name in ("fwd", "bwd", "scan", "bwd_walk"):
        k = f"_ttt_linear_{name}_kernel"
        assert 0 < got[k, "off"] < got[k, "on"] and 0 < got[k, "off"] < got[k, "gate"], (k, got)


@pytest.mark.parametrize("cls", [ttt.TTTLinear, ttt.TTTMLP])
@pytest.mark.parametrize("kw", [{}, {"decay": 0.9}, {"half_life_range": (4.0, 40.0)},
                                {"decay": 0.9, "forget_gate": True}])
def test_written_is_the_move_beyond_forgetting(cls, kw):
    """written(x, before, after): with a base learning rate of 0 the layer only forgets, and what it wrote
    is 0; with learning, it is the distance from where forgetting alone leads (that lr-0 state), over the
    learnt start's size; a fresh state counts from the start; the penalty's gradient reaches the weights."""
    torch.manual_seed(3)
    b, D, H = 4, 16, 2
    layer = cls(D, H, mini_batch=b, **kw).double()
    if kw.get("forget_gate"):   # a gate that depends on the input
        with torch.no_grad():
            layer.forget_weight.normal_(0, 0.3)
    x = torch.randn(2, 15, D, dtype=torch.float64)
    _, s1 = layer(x[:, :4])   # at a mini-batch start
    layer.base_lr = 0.0
    _, faded = layer(x[:, 4:], s1)
    assert layer.written(x[:, 4:], s1, faded).max().item() < 1e-5
    assert all((a - w).abs().max() > 1e-4 for a, w in zip(faded.params, s1.params)) == ("decay" in kw or "half_life_range" in kw)
    layer.base_lr = 1.0
    _, s2 = layer(x[:, 4:], s1)
    size = sum(w.detach().square().sum((-2, -1)) for w in layer.fast_weights())      # [H]
    want = torch.sqrt(sum((a - f).square().sum((-2, -1)) for a, f in zip(s2.params, faded.params)) / size)
    got = layer.written(x[:, 4:], s1, s2)
    assert got.shape == (2, H) and got.min() > 1e-3 and (got - want).abs().max().item() < 1e-9
    fresh = layer.init_state(2)
    assert (layer.written(x[:, :4], None, s1) - layer.written(x[:, :4], fresh, s1)).abs().max().item() == 0
    layer.written(x[:, 4:], s1, s2).sum().backward()
    assert layer.learnable_ttt_lr_bias.grad.abs().max() > 0 and layer.k_proj.weight.grad.abs().max() > 0
