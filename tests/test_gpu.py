"""The CUDA paths of model.py and generate.py against their CPU/eager twins (run: pytest -m gpu)."""
import pytest
import torch

import generate
from model import Config, SpeechLM, delay, detach_state, loss_fn, tree_leaves, tree_map

pytestmark = pytest.mark.gpu


def _model(dev, **kw):
    torch.manual_seed(0)
    cfg = Config.preset("tiny", **{**dict(n_streams=2, n_codebooks=4, cardinality=128, window=24, n_ttt=1,
                                          ttt_mini_batch=16, ttt_heads=2, dim=128, n_heads=4), **kw})
    m = SpeechLM(cfg).to(dev).eval()
    with torch.no_grad():
        for b in m.layers:
            if b.ttt is not None:
                b.ttt.alpha.fill_(0.8)
    return m


def _forget(half_life):
    """Model settings for fast weights that forget: a number of frames, or a range (learnt half-lives);
    "wide": a TTT memory 4 times the model's width instead (8 heads of 64)."""
    if half_life == "wide":
        return dict(ttt_heads=8, ttt_head_dim=64)
    lo, hi, *gate = half_life if isinstance(half_life, tuple) else (half_life, 0)
    return dict(ttt_half_life=lo, ttt_half_life_max=hi, ttt_forget_gate=bool(gate))


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("ttt_type,half_life", [("linear", 0), ("mlp", 0), ("linear", 40), ("mlp", 40),
                                                ("linear", (8, 800)), ("linear", (8, 800, "gate")),   # forgetting: Triton / compiled loop
                                                ("linear", "wide")])
def test_cuda_split_invariance_and_cpu_parity(ttt_type, half_life):
    torch.backends.cuda.matmul.allow_tf32 = False
    m = _model("cuda", ttt_type=ttt_type, **_forget(half_life))
    x = (torch.rand(2, 80, m.cfg.n_cols, device="cuda") * 128).long()
    with torch.no_grad():
        for p in (p for n, p in m.named_parameters() if "forget_weight" in n):   # a gate that depends on x
            p.normal_(0, 1.0)
        full, _ = m(x)
        s, outs = m.init_state(2), []
        for t in range(0, 80, 7):
            o, s = m(x[:, t:t + 7], s)
            outs.append(o.audio)
        cpu = m.cpu()(x.cpu())[0]
    assert _rel(torch.cat(outs, 1), full.audio) < 1e-4
    assert _rel(full.audio.cpu(), cpu.audio) < 1e-4


@pytest.mark.parametrize("how,B,half_life", [(False, 2, 0), ("kernels", 2, 0), ("kernels", 1, 0),   # batch 1: the step kernels too
                                             ("kernels", 1, 40), ("kernels", 1, (8, 800)),   # forgetting
                                             ("kernels", 1, (8, 800, "gate")),   # (the gated layer's own step)
                                             ("kernels", 1, "wide")])                # (the wide layer's own step)
def test_cuda_graph_generation_matches_teacher_forcing(how, B, half_life):
    torch.backends.cuda.matmul.allow_tf32 = False
    m = _model("cuda", delays=(0, 1, 1, 1), **_forget(half_life))
    with torch.no_grad():  # weights large enough that attention is far from uniform: a wrong key shows
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
    torch.manual_seed(1)
    s = generate.Sampler(m.cfg, temp=1.0, top_k=0 if not how else 20)
    step = generate.FrameStep(m, s, B, "cuda", compile=how, cuda_graph=True)
    frames, logps = [], []
    with torch.inference_mode():
        generate.generate(m, 60, s, B, None, "streaming", lambda f, lp: (frames.append(f), logps.append(lp)),
                          "cuda", step)
        out = torch.stack(frames, 1)
        d = delay(out, m.cfg)
        logits, _ = m(d)
    lp = logits.audio[:, 1:].float().log_softmax(-1).gather(-1, d[:, 1:, :, None])[..., 0].sum(-1)
    torch.testing.assert_close(torch.stack(logps, 1)[:, :59], lp, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("B", [1, 8])
def test_depth_kernels_match_the_loop(B):
    m = _model("cuda", n_text=1, text_cardinality=300, depth_dim=128, depth_heads=4).use_depth_kernels()
    h = torch.randn(B, m.cfg.dim, device="cuda")
    for kw in (dict(), dict(top_k=5, text_top_k=3), dict(top_k=0)):
        s = generate.Sampler(m.cfg, **kw)
        s.new_frame(B, "cuda")
        with torch.no_grad():
            f0, l0 = m._depth_loop(h, s)
            f1, l1 = m._depth_loop_kernels(h, s)
        assert torch.equal(f0, f1), kw
        assert (l0 - l1).abs().max() < 2e-5, kw


@pytest.mark.parametrize("B,half_life", [(1, 0), (8, 0), (1, 40), (1, (8, 800))])
def test_step_kernels_match_the_backbone(B, half_life):
    # the backbone's one-frame step as kernels (use_step_kernels) against backbone(), float32, rows at
    # different positions, over more than two windows (the cache's ring wraps); with fast weights that
    # forget (the TTT kernel's DECAY: one half-life, or learnt ones)
    torch.backends.cuda.matmul.allow_tf32 = False
    m = _model("cuda", qkv_bias=True, **_forget(half_life)).use_step_kernels()
    assert m._step_ttt_kernel[-1] is not None
    g = torch.Generator("cuda").manual_seed(0)

    def frame():
        return (torch.rand(B, m.cfg.n_cols, device="cuda", generator=g) * 128).long()
    with torch.no_grad():
        s0 = m.prefill(torch.stack([frame() for _ in range(30)], 1))
        s0 = m.reset_rows(s0, torch.arange(B, device="cuda") == B - 1)
        s1 = tree_map(lambda t: t.clone(), s0)
        for t in range(2 * m.cfg.window + 5):
            f = frame()
            h0, s0 = m.backbone(m.frame_emb(f[:, None]), s0._replace(prev=f))
            h1, s1 = m._backbone_step_kernels(s1._replace(prev=f))
            assert _rel(h1, h0) < 1e-5, t
    for a, b in zip(tree_leaves(s0), tree_leaves(s1)):
        assert torch.equal(a, b) if not a.is_floating_point() else _rel(b, a) < 1e-5


def test_bf16_training_step_streaming():
    m = _model("cuda").train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True)
    x = (torch.rand(2, 32, m.cfg.n_cols, device="cuda") * 128).long()
    state, first = m.init_state(2), None
    for i in range(20):
        with torch.autocast("cuda", torch.bfloat16):
            logits, new = m(x, state)
            loss, _ = loss_fn(logits, x, m.cfg)
        loss.backward()
        opt.step()
        opt.zero_grad()
        state = m.reset_rows(detach_state(new), torch.tensor([i % 4 == 3, False], device="cuda"))
        first = first or loss.item()
        assert all(t.dtype == torch.float32 for s in state.ttt for t in s.params + s.grads)
    assert loss.item() < first


def test_compiled_blocks_match_eager_in_training():
    """compile_blocks traces each block whole, the Triton TTT operators included (no graph break),
    and, with the compiled loss of train.py --compile, gives eager's loss, gradients and carried
    state over two streaming chunks (float32)."""
    import copy
    from torch._dynamo.utils import counters
    torch.backends.cuda.matmul.allow_tf32 = False
    counters.clear()
    m = _model("cuda").train()
    c = copy.deepcopy(m).compile_blocks()
    closs = torch.compile(loss_fn, dynamic=False)
    x = (torch.rand(2, 48, m.cfg.n_cols, device="cuda") * 128).long()
    res = []
    for model, lossf in ((m, loss_fn), (c, closs)):
        state, losses = model.init_state(2), []
        for chunk in (x[:, :20], x[:, 20:]):   # the second starts mid-way through a TTT mini-batch
            logits, state = model(chunk, state)
            loss = lossf(logits, chunk, m.cfg)[0]
            loss.backward()
            losses.append(loss.detach())
            state = detach_state(state)
        res.append((torch.stack(losses), [p.grad for p in model.parameters()], tree_leaves(state)))
    assert not counters["graph_break"], dict(counters["graph_break"])
    (l0, g0, s0), (l1, g1, s1) = res
    assert _rel(l1, l0) < 1e-5
    assert max(_rel(b, a) for a, b in zip(g0, g1) if a is not None and a.norm() > 0) < 1e-4
    for a, b in zip(s0, s1):   # (some are all zeros: the TTT sums after a completed mini-batch)
        assert torch.equal(a, b) if not a.is_floating_point() else (b - a).norm() <= 1e-5 * a.norm()


DEVICES = ("cpu", "cuda")


def test_state_by_minute_on_the_gpu(tmp_path):
    # scripts/state_by_minute.py --device cuda: the speech loss by minute and the fast weights' distance
    # from their start, as on the CPU
    import importlib.util
    import os
    from data import synthetic
    spec = importlib.util.spec_from_file_location("sbm", os.path.join(os.path.dirname(__file__), "..", "scripts",
                                                                      "state_by_minute.py"))
    sbm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sbm)
    p = str(tmp_path / "h.bin")
    synthetic(p, hours=2 / 60, min_minutes=2, max_minutes=2, n_codebooks=4, seed=5, quiet=True, events_per_min=4.0)
    torch.manual_seed(0)
    SpeechLM(Config.preset("tiny", n_codebooks=4, ttt_mini_batch=16, ttt_half_life=40)).save(str(tmp_path / "ttt.safetensors"))
    got = {d: sbm.main(["--data", p, "--ckpt", str(tmp_path / "ttt.safetensors"), "--device", d, "--blocks", "1-2"])
           for d in DEVICES}
    assert not torch.backends.cuda.matmul.allow_tf32   # on for its own work only: later tests compare float32 results
    a, b = (got[d]["ttt"] for d in DEVICES)
    assert len(a["loss"]) == 2 and max(abs(x / y - 1) for x, y in zip(a["loss"], b["loss"])) < 2e-3   # TF32 on the GPU
    assert max(abs(x / y - 1) for r, s in zip(a["moved"], b["moved"]) for x, y in zip(r, s)) < 2e-3
    assert max(abs(x / y - 1) for x, y in zip(a["fresh"], b["fresh"])) < 2e-3
