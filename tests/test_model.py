import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

import model as model_mod
from model import (Config, SpeechLM, delay, detach_state, loss_fn, state_bytes, undelay)

torch.set_num_threads(2)


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = Config.preset("tiny", **{**dict(n_streams=2, n_codebooks=3, cardinality=32), **kw})
    m = SpeechLM(cfg).eval()
    # non-trivial gates and biases, so every branch changes the output
    with torch.no_grad():
        for b in m.layers:
            if b.ttt is not None:
                b.ttt.alpha.uniform_(0.5, 1.0)
    return m


def _codes(m, B, T, seed=1):
    g = torch.Generator().manual_seed(seed)
    cards = torch.tensor(m.cfg.col_cards())
    return (torch.rand(B, T, m.cfg.n_cols, generator=g) * cards).long()


def _cat(outs):
    a = torch.cat([o.audio for o in outs], 1)
    t = torch.cat([o.text for o in outs], 1) if outs[0].text is not None else None
    return a, t


def _assert_close(a, b, rtol):
    err = ((a - b).norm() / b.norm()).item()
    assert err < rtol, err


@pytest.mark.parametrize("ttt_type,half_life", [("linear", 0), ("mlp", 0), ("linear", 6), ("linear", (3, 60)),
                                                ("mlp", (3, 60)), ("linear", (3, 60, "gate")), ("mlp", (6, 0, "gate")),
                                                ("linear", "wide"), ("mlp", "wide")])
def test_any_split_gives_one_pass(ttt_type, half_life):
    # W not a multiple of b, T >= 3W: full pass, frame by frame, random chunks; with fast weights that forget too,
    # at one rate or at learnt ones, and with a forget gate; and with a TTT memory wider than the model
    wide = half_life == "wide"
    lo, hi, *gate = half_life if isinstance(half_life, tuple) else (0 if wide else half_life, 0)
    m = _model(ttt_type=ttt_type, window=10, ttt_mini_batch=4, n_text=1, text_cardinality=20, ttt_half_life=lo,
               ttt_half_life_max=hi, ttt_forget_gate=bool(gate), ttt_head_dim=32 if wide else 0)
    if wide:
        t = m.layers[-1].ttt.layer
        assert (t.dim, t.n_heads, t.head_dim, t.width) == (64, 4, 32, 128)
    if gate:   # (a new gate computes what no gate does)
        with torch.no_grad():
            for b in m.layers:
                if b.ttt is not None:
                    b.ttt.layer.forget_weight.normal_(0, 1.0)
    B, T = 2, 37
    codes = _codes(m, B, T)
    with torch.no_grad():
        full, s_full = m(codes)
        steps, s = [], None
        for t in range(T):
            o, s = m(codes[:, t:t + 1], s)
            steps.append(o)
        g = torch.Generator().manual_seed(3)
        chunks, s2, t = [], None, 0
        while t < T:
            n = int(torch.randint(1, 9, (1,), generator=g))
            o, s2 = m(codes[:, t:t + n], s2)
            chunks.append(o)
            t += n
    for outs in (steps, chunks):
        a, tx = _cat(outs)
        _assert_close(a, full.audio, 1e-4)
        _assert_close(tx, full.text, 1e-4)
    for x, y in zip(torch.utils._pytree.tree_leaves(s_full), torch.utils._pytree.tree_leaves(s)):
        assert torch.allclose(x.float(), y.float(), atol=1e-4)


def test_full_pass_masks_exactly_w_frames():
    # the first layer's attention output at frame t depends on frames t-W+1..t only: perturb the
    # embedding of frame t-W and the frame t logits must not move through attention alone
    m = _model(window=6, n_ttt=0, n_layers=1)
    T = 20
    codes = _codes(m, 1, T)
    x = m.frame_emb(codes)
    with torch.no_grad():
        st = m.init_state(1)
        h0, _ = m.backbone(x, st, fresh=True)
        for t in (10, 15):
            y = x.clone()
            y[:, t - 6] += 1.0  # just outside the window of frame t
            h1, _ = m.backbone(y, st, fresh=True)
            assert torch.equal(h0[:, t], h1[:, t])
            y = x.clone()
            y[:, t - 5] += 1.0  # just inside
            h1, _ = m.backbone(y, st, fresh=True)
            assert not torch.allclose(h0[:, t], h1[:, t])


def test_causality():
    m = _model(window=8, n_text=1, text_cardinality=20)
    T = 24
    codes = _codes(m, 1, T)
    with torch.no_grad():
        a, _ = m(codes)
        for t in (0, 7, 13, 23):
            c2 = codes.clone()
            c2[0, t] = (c2[0, t] + 1) % torch.tensor(m.cfg.col_cards())
            b, _ = m(c2)
            assert torch.equal(a.audio[:, :t], b.audio[:, :t]) and torch.equal(a.text[:, :t], b.text[:, :t])
            # within frame t, column c sees only columns before it
            assert torch.equal(a.text[:, t], b.text[:, t])
            if t + 1 < T:
                assert not torch.allclose(a.audio[:, t + 1], b.audio[:, t + 1])


@pytest.mark.parametrize("T", [6, 20])  # within the window (causal), past it (banded)
def test_pass_without_keeping_the_state(T):
    """keep_state=False (mini-batch training) gives the same logits and gradients, builds no cache,
    and refuses a carried state."""
    m = _model(window=8, n_text=1, text_cardinality=20)
    codes = _codes(m, 2, T)
    outs = []
    for keep in (True, False):
        m.zero_grad()
        logits, s = m(codes, keep_state=keep)
        loss_fn(logits, codes, m.cfg)[0].backward()
        assert (s is None) != keep
        outs.append([logits.audio, logits.text] + [p.grad.clone() for p in m.parameters() if p.grad is not None])
    assert len(outs[0]) == len(outs[1])
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="fresh start"):
        m(codes, m.init_state(2), keep_state=False)


def test_state_size_is_constant():
    m = _model(window=8)
    codes = _codes(m, 2, 100)
    with torch.no_grad():
        s = m.init_state(2)
        n0 = state_bytes(s)
        shapes0 = [t.shape for t in torch.utils._pytree.tree_leaves(s)]
        for t in range(0, 100, 7):
            _, s = m(codes[:, t:t + 7], s)
            assert state_bytes(s) == n0
        assert [t.shape for t in torch.utils._pytree.tree_leaves(s)] == shapes0


def test_reset_rows_and_detach():
    m = _model()
    codes = _codes(m, 2, 12)
    with torch.no_grad():
        _, s = m(codes)
        s = m.reset_rows(detach_state(s), torch.tensor([True, False]))
        fresh = m.init_state(2)
        assert s.pos.tolist() == [0, 12]
        for x, y in zip(torch.utils._pytree.tree_leaves(s), torch.utils._pytree.tree_leaves(fresh)):
            if x.dim() and x.shape[0] == 2:
                assert torch.equal(x[0], y[0])
        # a reset row continues exactly like a fresh sequence
        o1, _ = m(codes[:1, :4], None)
        o2, _ = m(codes[:, :4], s)
        _assert_close(o2.audio[:1], o1.audio, 1e-5)


def test_delay_roundtrip_and_loss_ignores_padding():
    cfg = Config.preset("tiny", n_streams=2, n_codebooks=3, cardinality=32, delays=(0, 1, 2))
    codes = torch.randint(0, 32, (2, 10, cfg.n_cols))
    d = delay(codes, cfg)
    assert (d[:, 0, 1] == 32).all() and (d[:, :2, 2] == 32).all()
    assert torch.equal(undelay(d, cfg), codes[:, :8])
    m = SpeechLM(cfg)
    logits, _ = m(d)
    loss, parts = loss_fn(logits, d, cfg)
    assert torch.isfinite(loss) and set(parts) == {"semantic", "acoustic"}
    # chance level for random weights is about log(32)
    assert abs(parts["acoustic"].item() - math.log(32)) < 0.5


def test_frame_embedding_starts_at_one_tokens_size():
    # a frame's input sums one embedding row per column: the rows start at 0.02 / sqrt(columns), so
    # the sum has about the size of one N(0, 0.02) row whatever the number of codebooks
    torch.manual_seed(0)
    for K in (1, 8):
        cfg = Config.preset("tiny", n_streams=2, n_codebooks=K, dim=256)
        model = SpeechLM(cfg)
        assert model.frame_emb.emb.weight.std().item() == pytest.approx(0.02 / math.sqrt(cfg.n_cols), rel=0.05)
        frames = torch.randint(0, cfg.cardinality, (4, 64, cfg.n_cols))
        x = model.frame_emb(frames)
        assert x.pow(2).mean().sqrt().item() == pytest.approx(0.02, rel=0.1)
        assert model.depth.token_emb.weight.std().item() == pytest.approx(0.02, rel=0.05)   # the others: 0.02


def test_loss_falls_when_overfitting():
    torch.manual_seed(0)
    m = _model()
    m.train()
    codes = _codes(m, 2, 16)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    first = None
    for i in range(60):
        loss, _ = loss_fn(m(codes)[0], codes, m.cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first or loss.item()
    assert loss.item() < 0.3 * first


def test_generation_step_matches_forward():
    m = _model(window=6, n_text=1, text_cardinality=20)
    g = torch.Generator().manual_seed(0)

    def sample(logits, c):
        return torch.multinomial(logits.softmax(-1), 1, generator=g)[:, 0]
    s = m.init_state(2)
    frames, logps = [], []
    with torch.no_grad():
        for _ in range(20):
            f, lp, s = m.step(s, sample)
            frames.append(f)
            logps.append(lp)
        codes = torch.stack(frames, 1)
        out, _ = m(codes)
    lp_a = out.audio.float().log_softmax(-1).gather(-1, codes[..., 1:, None])[..., 0].sum(-1)
    lp_t = out.text.float().log_softmax(-1).gather(-1, codes[..., :1, None])[..., 0].sum(-1)
    torch.testing.assert_close(lp_a + lp_t, torch.stack(logps, 1), rtol=1e-4, atol=1e-4)


def test_checkpoint_roundtrip(tmp_path):
    # bitwise: a loaded model computes what the saved one did (several seeds: with the loaded weights
    # at the file's unaligned offsets, products rounded differently for most of them)
    for seed in range(3):
        m = _model(seed=seed, n_text=1, text_cardinality=20, delays=(0, 1, 1))
        p = tmp_path / "m.safetensors"
        m.save(p)
        m2 = SpeechLM.from_checkpoint(p)
        assert m2.cfg == m.cfg
        codes = _codes(m, 1, 9)
        with torch.no_grad():
            assert torch.equal(m(codes)[0].audio, m2(codes)[0].audio)
    assert "parameters" in repr(m2)


def test_ttt_half_life(tmp_path):
    # fast weights that forget: the decay a mini-batch from the half-life in frames, kept in the checkpoint,
    # changed in place (as the inner learning rate), and the same model as before with 0
    m = _model(ttt_mini_batch=4, ttt_half_life=8)
    assert all(b.ttt.layer.decay == 0.5 ** 0.5 for b in m.layers if b.ttt is not None)
    p = tmp_path / "m.safetensors"
    m.save(p)
    assert SpeechLM.from_checkpoint(p).cfg.ttt_half_life == 8
    codes = _codes(m, 1, 30)
    with torch.no_grad():
        forget = m(codes)[0].audio
        m.set_ttt_half_life(0)
        never = m(codes)[0].audio
        assert torch.equal(never, _model(ttt_mini_batch=4)(codes)[0].audio)
    assert not torch.allclose(forget, never) and torch.equal(forget[:, :4], never[:, :4])  # from the 2nd mini-batch on
    with pytest.raises(ValueError, match="number of frames"):
        m.set_ttt_half_life(-1)
    with pytest.raises(ValueError, match="ttt_half_life must be"):
        _model(ttt_half_life=-2)
    with pytest.raises(ValueError, match="no TTT layer"):
        _model(n_ttt=0).set_ttt_half_life(10)


def test_ttt_learnt_half_lives(tmp_path):
    # learnt half-lives: made by set_ttt_half_life(lo, hi) on a model without (as train.py --init_from does),
    # trained values kept by the checkpoint, replaced by a fixed half-life, and bad ranges refused
    m = _model(ttt_mini_batch=4)
    codes = _codes(m, 1, 30)
    with torch.no_grad():
        never = m(codes)[0].audio
    m.set_ttt_half_life(4, 400)
    layers = [b.ttt.layer for b in m.layers if b.ttt is not None]
    assert all(t.log_half_life is not None and t.half_lives().min() > 3.99 and t.half_lives().max() < 400.01 for t in layers)
    assert m.cfg.ttt_half_life_range() == (4, 400) and m.cfg.ttt_decay() == 1.0
    assert any("log_half_life" in n for n, _ in m.named_parameters())
    with torch.no_grad():
        for t in layers:
            t.log_half_life.add_(0.1)
        learnt = m(codes)[0].audio
    assert not torch.allclose(learnt, never) and torch.equal(learnt[:, :4], never[:, :4])
    p = tmp_path / "m.safetensors"
    m.save(p)
    m2 = SpeechLM.from_checkpoint(p)
    assert m2.cfg.ttt_half_life_max == 400
    with torch.no_grad():
        assert torch.equal(m2(codes)[0].audio, learnt)
    m2.set_ttt_half_life(0)
    assert all(b.ttt.layer.log_half_life is None for b in m2.layers if b.ttt is not None)
    with torch.no_grad():
        assert torch.equal(m2(codes)[0].audio, never)
    with pytest.raises(ValueError, match="0 < 5 <= 2"):
        m.set_ttt_half_life(5, 2)
    with pytest.raises(ValueError, match="need 0 < ttt_half_life <= ttt_half_life_max"):
        _model(ttt_half_life=0, ttt_half_life_max=10)


def test_ttt_forget_gate(tmp_path):
    # a forget gate: added to a model with a half-life (as train.py --init_from does) it changes nothing until
    # its weights move; the checkpoint keeps it; without a half-life it is refused
    m = _model(ttt_mini_batch=4, ttt_half_life=8)
    codes = _codes(m, 1, 30)
    with torch.no_grad():
        before = m(codes)[0].audio
        m.add_ttt_forget_gate()
        assert m.cfg.ttt_forget_gate and torch.equal(m(codes)[0].audio, before)
        for b in m.layers:
            if b.ttt is not None:
                b.ttt.layer.forget_bias.fill_(2.0)   # forget faster than the half-life everywhere
        gated = m(codes)[0].audio
    assert not torch.allclose(gated, before) and torch.equal(gated[:, :4], before[:, :4])
    p = tmp_path / "m.safetensors"
    m.save(p)
    m2 = SpeechLM.from_checkpoint(p)
    assert m2.cfg.ttt_forget_gate
    with torch.no_grad():
        assert torch.equal(m2(codes)[0].audio, gated)
    with pytest.raises(ValueError, match="set a half-life first"):
        _model(ttt_mini_batch=4).add_ttt_forget_gate()
    with pytest.raises(ValueError, match="ttt_forget_gate scales how fast .* needs ttt_half_life"):
        _model(ttt_forget_gate=True)


def test_bad_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        SpeechLM.from_checkpoint(tmp_path / "none.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable"):
        SpeechLM.from_checkpoint(tmp_path / "junk.safetensors")
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="no model config"):
        SpeechLM.from_checkpoint(tmp_path / "other.safetensors")
    m = _model()
    sd = {k: v.contiguous() for k, v in m.state_dict().items()}
    sd.pop("norm.weight")
    sd["layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3)
    save_file(sd, tmp_path / "bad.safetensors", metadata={"config": json.dumps(m.cfg.__dict__)})
    with pytest.raises(ValueError, match=r"missing keys \(1\): norm.weight(.|\n)*wrong shapes"):
        SpeechLM.from_checkpoint(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="columns per frame"):
        m(torch.zeros(1, 3, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown preset"):
        Config.preset("huge")


# --- Hugging Face parity -----------------------------------------------------------------------

transformers = pytest.importorskip("transformers")


def _save_hf(tmp_path, kind, tie, shard):
    torch.manual_seed(0)
    common = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=tie,
                  max_position_embeddings=256, rms_norm_eps=1e-6)
    if kind == "qwen2":
        conf = transformers.Qwen2Config(**common, rope_parameters={"rope_type": "default", "rope_theta": 5e5})
        model = transformers.Qwen2ForCausalLM(conf)
    else:
        conf = transformers.LlamaConfig(**common, attention_bias=False,
                                        rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0,
                                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                         "original_max_position_embeddings": 32})
        model = transformers.LlamaForCausalLM(conf)
    with torch.no_grad():  # HF zero-initialises biases; make them matter
        for n, p in model.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.normal_(0, 0.5 if n.endswith("bias") else 0.1).add_(1.0 if "norm" in n else 0.0)
    model.save_pretrained(tmp_path, max_shard_size="40KB" if shard else "1GB")
    return model.eval()


@pytest.mark.parametrize("kind,tie,shard", [("qwen2", True, False), ("qwen2", False, True), ("llama", False, True),
                                            ("llama", True, False)])
def test_hf_parity(tmp_path, kind, tie, shard):
    ref = _save_hf(tmp_path, kind, tie, shard)
    assert shard == os.path.exists(tmp_path / "model.safetensors.index.json")
    m = SpeechLM.from_hf(tmp_path, text_lm=True, n_ttt=1).eval()  # TTT branch present, gate at 0
    tokens = torch.randint(0, 97, (2, 40))
    with torch.no_grad():
        want = ref(tokens).logits
        got, _ = m.lm_forward(tokens)
        # and the same through the streaming path
        s, outs = None, []
        s = m.init_state(2)
        for t in range(0, 40, 7):
            o, s = m.lm_forward(tokens[:, t:t + 7], s)
            outs.append(o)
    _assert_close(got, want, 1e-5)
    _assert_close(torch.cat(outs, 1), want, 1e-5)


def test_hf_speech_model_and_errors(tmp_path):
    _save_hf(tmp_path, "qwen2", True, False)
    m = SpeechLM.from_hf(tmp_path, n_streams=1, n_codebooks=2, cardinality=16, window=8, n_ttt=1)
    assert not hasattr(m, "embed_tokens")
    assert not any(p.is_meta for p in m.parameters())
    logits, _ = m(torch.randint(0, 16, (1, 5, 2)))
    assert torch.isfinite(logits.audio).all()
    with pytest.raises(ValueError, match="fixed by the checkpoint"):
        SpeechLM.from_hf(tmp_path, dim=32)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        SpeechLM.from_hf(tmp_path / "nowhere")
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'"):
        SpeechLM.from_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    with pytest.raises(ValueError, match=r"missing keys \(12\): layers.2"):
        SpeechLM.from_hf(tmp_path)


@pytest.mark.parametrize("T,H,Hkv", [(1, 4, 4), (3, 8, 2), (4, 6, 1)])
def test_attend_few_equals_sdpa(T, H, Hkv):
    # the written-out attention of generation steps against PyTorch's, with grouped kv heads and a mask
    g = torch.Generator().manual_seed(T)
    B, L, hd = 2, 9, 8
    q = torch.randn(B, H, T, hd, generator=g, dtype=torch.float64)
    k, v = (torch.randn(B, Hkv, L, hd, generator=g, dtype=torch.float64) for _ in range(2))
    mask = torch.rand(B, T, L, generator=g) < 0.6
    mask[..., -1] = True
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], enable_gqa=H != Hkv)
    assert torch.allclose(model_mod.attend_few(q, k, v, mask), ref, rtol=0, atol=1e-12)
    if T == 3:  # compiled, it takes its other form (products and sums)
        compiled = torch.compile(model_mod.attend_few, fullgraph=True, dynamic=False)
        assert torch.allclose(compiled(q, k, v, mask), ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("H,Hkv", [(4, 4), (8, 2)])
def test_attend_short_equals_sdpa_with_gradients(H, Hkv):
    g = torch.Generator().manual_seed(H)
    q = torch.randn(2, H, 7, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, Hkv, 7, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    ours = model_mod.attend_short(q, k, v)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=H != Hkv)
    assert torch.allclose(ours, ref, rtol=0, atol=1e-12)
    w = torch.randn(ours.shape, generator=g, dtype=torch.float64)
    g1 = torch.autograd.grad((ours * w).sum(), (q, k, v))
    g2 = torch.autograd.grad((ref * w).sum(), (q, k, v))
    assert all(torch.allclose(a, b, rtol=0, atol=1e-12) for a, b in zip(g1, g2))


DEPTH_KERNELS_CHECK = r'''
import os, sys
sys.path[:0] = [sys.argv[1], os.path.join(sys.argv[1], "tests")]
import interpreted  # Triton's CPU interpreter: before anything defines a kernel
import torch
import model as M
from generate import Sampler
torch.manual_seed(0)
cfg = M.Config.preset("tiny", n_text=1, text_cardinality=50, cardinality=300, n_codebooks=2, depth_hidden=96)
m = M.SpeechLM(cfg).eval()
with torch.no_grad():
    for p in m.parameters():
        p.add_(0.3 * torch.randn_like(p))  # large enough that attention is far from uniform
m.use_depth_kernels()
worst, n = 0.0, 0
cases = [dict(), dict(top_k=3, text_top_k=2), dict(top_k=0, text_temp=1.3), dict(top_p=0.9), dict(temp=0.0)]
# batch 1 (products and sums) and 3 (matrix products); one block of the reduction, then several
for B, bk, bn, kws in ((3, 2048, 0, cases), (1, 2048, 0, cases[:3]), (1, 16, 32, cases[:1]), (3, 16, 0, cases[:1])):
    M.DEPTH_LAUNCH.update(BK=bk, BN=bn, dot_BK=bk)
    h = torch.randn(B, cfg.dim)
    for kw in kws:
        s = Sampler(cfg, generator=torch.Generator().manual_seed(n), **kw)
        s.new_frame(B, "cpu")
        with torch.no_grad():
            f0, l0 = m._depth_loop(h, s)
            f1, l1 = m._depth_loop_kernels(h, s)
        assert torch.equal(f0, f1), (B, bk, kw, f0, f1)
        worst = max(worst, (l0 - l1).abs().max().item())
        n += 1
assert worst < 2e-5, worst
print("frames equal; worst log-probability difference", worst)
'''


def test_depth_kernels_match_the_loop_in_the_interpreter(run_interpreted):
    """The depth decoder's Triton generation kernels (SpeechLM.use_depth_kernels), run on the CPU
    by Triton's interpreter, against the PyTorch loop: same frames and log-probabilities, float32,
    batch 1 and 3, with a text column, top-k (below, at and above a small k), temperature, and the
    top-p and greedy columns that fall back to PyTorch sampling."""
    run_interpreted(DEPTH_KERNELS_CHECK, "frames equal")


SAMPLE_KERNEL_CHECK = r'''
import os, sys
sys.path[:0] = [sys.argv[1], os.path.join(sys.argv[1], "tests")]
import interpreted  # Triton's CPU interpreter: before anything defines a kernel
import torch
import model as M
from generate import Sampler
g = torch.Generator().manual_seed(0)
n = 0
for V in (300, 2048):
    cfg = M.Config(n_streams=1, n_codebooks=1, cardinality=V)
    B = 6
    # rows: a coarse grid (many ties), distinct values, every value about three times, large and tiny
    # scales, and values round 0 with -0 beside +0
    x = torch.randn(B, V, generator=g)
    lg = torch.stack([torch.randint(-6, 7, (V,), generator=g) * 0.5, x[1],
                      x[2, torch.randint(0, V // 3, (V,), generator=g)], x[3] * 1e4, x[4] * 1e-30,
                      torch.where(torch.rand(V, generator=g) < 0.03, x[5].abs(), torch.where(x[5] > 0, 0.0, -0.0))])
    for k in (1, 3, 250, V - 1):
        s = Sampler(cfg, temp=0.9, top_k=k, generator=g)
        s.new_frame(B, "cpu")
        noise = s.noise_a[:, 0].contiguous()
        tok = torch.zeros(B, dtype=torch.long)
        lp = torch.zeros(B)
        M._sample_kernel[(B,)](lg, V, noise, noise.stride(0), 0.9, k, tok, lp, 1, lg, 0, lg, 0, lg, 1,
                               NEXT=False, BV=M.triton.next_power_of_2(V), BD=1, PDL=False)
        ref = s(lg, 0)
        assert torch.equal(tok, ref), (V, k, tok, ref)
        err = (lp - lg.log_softmax(-1).gather(1, ref[:, None])[:, 0]).abs()
        assert (err <= 1e-6 * (1 + lg.abs().amax(1))).all(), (V, k, err)   # float32 at the logits' scale
        n += B
print("tokens equal", n)
'''


def test_sample_kernel_top_k_with_ties_in_the_interpreter(run_interpreted):
    """The sampling kernel's top-k (a radix selection over the logits' bits) keeps what
    the PyTorch sampler keeps, ties with the k-th largest included, on logits full of ties, of both
    signs, with -0 beside +0, at scales from 1e-30 to 1e4: the same tokens, Triton's interpreter."""
    run_interpreted(SAMPLE_KERNEL_CHECK, "tokens equal")


SHORT_ATTENTION_CHECK = r'''
import os, sys
sys.path[:0] = [sys.argv[1], os.path.join(sys.argv[1], "tests")]
import interpreted  # Triton's CPU interpreter: before anything defines a kernel
import torch
import model as M
torch.manual_seed(0)
worst = 0.0
# 16 positions (4 whole sequences a program), 17 (padded to 32; a partial last program), one position;
# grouped-query heads; k and v as views of one fused projection
for B, T, H, Hkv, hd in ((5, 16, 8, 8, 64), (3, 17, 4, 2, 16), (9, 1, 2, 1, 32)):
    q = torch.randn(B, T, H, hd, requires_grad=True)
    kv = torch.randn(B, T, 2 * Hkv, hd, requires_grad=True)
    k, v = kv[:, :, :Hkv], kv[:, :, Hkv:]
    o = M._short_attention(q, k, v)
    do = torch.randn_like(o)
    dq, dkv = torch.autograd.grad(o, (q, kv), do)
    q2, kv2 = q.detach().double().requires_grad_(), kv.detach().double().requires_grad_()
    o2 = M.attend_short(q2.transpose(1, 2), kv2[:, :, :Hkv].transpose(1, 2), kv2[:, :, Hkv:].transpose(1, 2))
    o2 = o2.transpose(1, 2)
    dq2, dkv2 = torch.autograd.grad(o2, (q2, kv2), do.double())
    for a, b in ((o, o2), (dq, dq2), (dkv, dkv2)):
        worst = max(worst, ((a.double() - b).abs().max() / b.abs().max().clamp(min=1e-3)).item())
assert worst < 1e-5, worst
# the depth decoder's teacher-forced pass, kernel against matrix products: logits and gradients
cfg = M.Config.preset("tiny", n_text=1, text_cardinality=50, cardinality=300, n_codebooks=2)
m = M.SpeechLM(cfg)
codes = (torch.rand(2, 6, cfg.n_cols) * torch.tensor(cfg.col_cards())).long()
outs = []
for on in (False, True):
    M.SHORT_KERNEL = on
    m.zero_grad()
    logits, _ = m(codes)
    M.loss_fn(logits, codes, cfg)[0].backward()
    outs.append([logits.audio, logits.text] + [p.grad.clone() for p in m.depth.parameters()])
for a, b in zip(*outs):
    worst = max(worst, ((a - b).abs().max() / b.abs().max().clamp(min=1e-6)).item())
assert worst < 1e-5, worst
print("attention equal; worst relative difference", worst)
'''


def test_short_attention_kernel_in_the_interpreter(run_interpreted):
    """The depth decoder's teacher-forced attention kernel (forward and backward), run on the CPU by
    Triton's interpreter, against attend_short's matrix products in float64: 16 and 17 positions, one
    position, grouped-query heads, a batch that leaves the last program partly empty; and a tiny
    model's logits and depth-decoder gradients with the kernel on and off."""
    run_interpreted(SHORT_ATTENTION_CHECK, "attention equal")


STEP_KERNELS_CHECK = r'''
import os, sys
sys.path[:0] = [sys.argv[1], os.path.join(sys.argv[1], "tests")]
import interpreted  # Triton's CPU interpreter: before anything defines a kernel
import torch
import model as M
torch.manual_seed(0)
cfg = M.Config.preset("tiny", qkv_bias=True, n_heads=6, n_kv_heads=2, head_dim=16, window=6)
m = M.SpeechLM(cfg).eval()
with torch.no_grad():
    for p in m.parameters():
        p.add_(0.3 * torch.randn_like(p))  # large enough that attention is far from uniform
    for l in m.layers:   # token weights 1/(i+1): perturbed, the last one clamps at 0 and W_start never moves
        if l.ttt is not None:
            l.ttt.layer.learnable_token_idx.zero_()
m.use_step_kernels()


def compare(m, s0, s1, frame, n):
    """n frames through backbone() from s0 and through the step kernels from s1: the worst relative
    difference of h; the states must end equal."""
    worst = 0.0
    with torch.no_grad():
        for t in range(n):
            f = frame()
            h0, s0 = m.backbone(m.frame_emb(f[:, None]), s0._replace(prev=f))
            h1, s1 = m._backbone_step_kernels(s1._replace(prev=f))
            worst = max(worst, ((h0 - h1).abs().max() / h0.abs().max()).item())
    for a, b in zip(M.tree_leaves(s0), M.tree_leaves(s1)):
        assert torch.allclose(a.double(), b.double(), rtol=1e-4, atol=1e-5), (a, b)
    return worst


worst = 0.0
# 3 rows (matrix products), the window in 4 splits; 1 row (products and sums), several reduction
# blocks, one split; and 1 row from a fresh state; one row again with fast weights that forget, at one
# rate and at learnt ones (a half-life per head and feature, set after use_step_kernels as this one)
for B, bk, bn, programs, fresh, half_life in ((3, 1024, 0, 24, False, 0), (1, 32, 16, 1, False, 0),
                                              (1, 1024, 0, 128, True, 0), (1, 32, 16, 1, False, 6),
                                              (1, 32, 16, 1, False, (3, 60))):
    M.STEP_LAUNCH.update(BK=bk, BN=bn, programs=programs)
    m.set_ttt_half_life(*half_life) if isinstance(half_life, tuple) else m.set_ttt_half_life(half_life)
    g = torch.Generator().manual_seed(B)
    frame = lambda: (torch.rand(B, cfg.n_cols, generator=g) * torch.tensor(cfg.col_cards())).long()
    with torch.no_grad():
        s0 = m.prefill(torch.stack([frame() for _ in range(4)], 1))
        s0 = m.reset_rows(s0, torch.arange(B) == B - 1)   # rows at different positions
        s1 = M.tree_map(lambda t: t.clone(), s0)
        if fresh:  # as init_state makes it, not a copy
            s0, s1 = m.init_state(B), m.init_state(B)
    worst = max(worst, compare(m, s0, s1, frame, cfg.window + 3))   # the ring wraps
# a TTT memory wider than the model (ttt_head_dim): its branch takes the layer's own step, the rest kernels
m = M.SpeechLM(M.Config.preset("tiny", window=6, ttt_head_dim=32)).eval()
with torch.no_grad():
    for p in m.parameters():
        p.add_(0.3 * torch.randn_like(p))
m.use_step_kernels()
assert [k is None for k in m._step_ttt_kernel] == [True] * len(m.layers), "a wide branch has no kernel"
M.STEP_LAUNCH.update(BK=1024, BN=0, programs=128)
g = torch.Generator().manual_seed(7)
frame = lambda: (torch.rand(1, m.cfg.n_cols, generator=g) * torch.tensor(m.cfg.col_cards())).long()
worst = max(worst, compare(m, m.init_state(1), m.init_state(1), frame, 9))
assert worst < 1e-5, worst
print("states equal; worst relative difference of h", worst)
'''


def test_step_kernels_match_the_backbone_in_the_interpreter(run_interpreted):
    """The backbone's one-frame step as Triton kernels (SpeechLM.use_step_kernels), run on the CPU by
    Triton's interpreter, against backbone(): same outputs and state (caches, positions, TTT), float32,
    rows at different positions, the cache's ring wrapping, the attention split or not."""
    run_interpreted(STEP_KERNELS_CHECK, "states equal")


def test_step_kernels_refuse_what_they_do_not_cover():
    m = SpeechLM(Config.preset("tiny"))
    assert model_mod.step_kernels_unsupported(m)  # on a CPU without the interpreter
    with pytest.raises(ValueError, match="cannot run here"):
        m.use_step_kernels()


def test_depth_kernels_refuse_what_they_do_not_cover():
    m = SpeechLM(Config.preset("tiny"))
    why = model_mod.depth_kernels_unsupported(m)
    assert why  # on a CPU without the interpreter
    with pytest.raises(ValueError, match="cannot run here"):
        m.use_depth_kernels()


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_short_attention_kernels_compile_for_h100(dtype):
    """The depth decoder's attention kernels compiled to sm_90 machine code without a GPU (Triton ships
    ptxas), as launched: 16 positions (4 sequences a program) and 17 (padded to 32), grouped heads."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    ints = ("B", "T", "sq_b", "sq_t", "sk_b", "sk_t")
    for kern in (model_mod._short_attn_fwd_kernel, model_mod._short_attn_bwd_kernel):
        for T, GQ in ((16, 1), (17, 2)):
            TP = triton.next_power_of_2(T)
            consts = dict(H=8, GQ=GQ, HD=64, TP=TP, R=max(model_mod.SHORT_ROWS, TP),
                          PRECISION="ieee" if dtype == "fp32" else "tf32")
            names = kern.arg_names
            sig = {n: "constexpr" if n in consts else "i32" if n in ints else "fp32" if n == "scale"
                   else f"*{dtype}" for n in names}
            src = ASTSource(fn=kern, signature=sig, constexprs={(names.index(n),): v for n, v in consts.items()})
            compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
            assert compiled.metadata.shared <= 227 * 1024


@pytest.mark.slow
def test_ttt_step_kernel_compiles_for_h100():
    """The TTT-Linear streaming step kernel compiled to sm_90 machine code without a GPU, with the
    official update and with fast weights that forget (DECAY)."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    kern = model_mod._ttt_step_kernel
    names = kern.arg_names
    for decay in (False, True):
        consts = dict(H=16, HD=64, BD=1024, PDL=False, DECAY=decay)
        sig = {n: "constexpr" if n in consts else "i32" if n in ("D", "MB") else "*i64" if n == "i_ptr"
               else "fp32" if n in ("eps", "base_lr") else "*bf16" if n in ("buf_ptr", "x_ptr", "out_ptr")
               else "*fp32" for n in names}
        src = ASTSource(fn=kern, signature=sig, constexprs={(names.index(n),): v for n, v in consts.items()})
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
        assert compiled.metadata.shared <= 227 * 1024


def test_loss_weight():
    # weight: each audio target's weight within its column's mean; all ones is the plain loss, and
    # zeros drop targets as padding does
    torch.manual_seed(0)
    cfg = Config.preset("tiny", n_streams=2, n_codebooks=3, cardinality=32)
    m = SpeechLM(cfg)
    codes = torch.randint(0, 32, (2, 12, cfg.n_cols))
    logits, _ = m(codes)
    plain, _ = loss_fn(logits, codes, cfg)
    ones, _ = loss_fn(logits, codes, cfg, weight=torch.ones(2, 12, cfg.n_audio))
    torch.testing.assert_close(ones, plain, rtol=1e-6, atol=0)
    w = torch.ones(2, 12, cfg.n_audio)
    w[:, :5] = 0
    padded = codes.clone()
    padded[:, :5, cfg.n_text:] = cfg.cardinality          # the initial token: ignored by the loss
    torch.testing.assert_close(loss_fn(logits, codes, cfg, weight=w)[0], loss_fn(logits, padded, cfg)[0],
                               rtol=1e-6, atol=0)
    w[:, :5] = 3.0                                         # a weight of 3 counts a target three times
    tripled = torch.cat([codes[:, :5]] * 3 + [codes[:, 5:]], 1)
    lt = model_mod.Logits(*(None if x is None else torch.cat([x[:, :5]] * 3 + [x[:, 5:]], 1) for x in logits))
    torch.testing.assert_close(loss_fn(logits, codes, cfg, weight=w)[0], loss_fn(lt, tripled, cfg)[0],
                               rtol=1e-5, atol=0)


@pytest.mark.parametrize("bag", [True, False])
def test_silent_stream_adds_nothing(bag, monkeypatch):
    # Config.silence: a stream whose codebooks all hold the silence frame is left out of the frame's
    # input; one codebook of it is not enough; text columns always count; both embedding paths agree
    monkeypatch.setattr(model_mod, "EMBEDDING_BAG", bag)
    sil = (5, 7, 11)
    m = _model(silence=sil, n_text=1, text_cardinality=20)
    plain = _model(n_text=1, text_cardinality=20)
    plain.load_state_dict(m.state_dict())
    codes = _codes(m, 2, 12)
    codes[0, :6, 1:4] = torch.tensor(sil)          # stream 0 silent in frames 0-5 of row 0
    codes[1, :, 4:7] = torch.tensor(sil)           # stream 1 silent throughout in row 1
    codes[1, 3, 4] = 6                             # ...but for frame 3, where it speaks (one codebook off)
    x, ref = m.frame_emb(codes), plain.frame_emb(codes)
    e = plain.frame_emb.emb.weight
    def col(r, t, c):
        return e[codes[r, t, c] + plain.frame_emb.offsets[c]]
    torch.testing.assert_close(x[0, :6], ref[0, :6] - sum(col(0, slice(0, 6), c) for c in (1, 2, 3)))
    torch.testing.assert_close(x[0, 6:], ref[0, 6:])
    keep = [t for t in range(12) if t != 3]
    torch.testing.assert_close(x[1, keep], ref[1, keep] - sum(col(1, keep, c) for c in (4, 5, 6)))
    torch.testing.assert_close(x[1, 3], ref[1, 3])
    assert (x[1, keep] - ref[1, keep]).abs().max() > 1e-3          # the silent stream did count before
    # a frame that is silence in every stream is the text's embedding alone
    codes[:, :, 1:] = torch.tensor(sil * 2)
    torch.testing.assert_close(m.frame_emb(codes), e[codes[..., 0]])   # (text's rows come first)
    with pytest.raises(ValueError, match="one code in"):
        Config.preset("tiny", n_streams=2, n_codebooks=3, cardinality=32, silence=(5, 7))


def test_silence_generation_step_matches_forward():
    # the streaming step and one forward see the same frame inputs with a silence frame set
    m = _model(window=6, silence=(1, 2, 3))
    codes = _codes(m, 2, 20)
    codes[:, 4:12, 3:6] = torch.tensor((1, 2, 3))
    with torch.no_grad():
        full, _ = m(codes)
        s, outs = m.init_state(2), []
        for t in range(20):
            o, s = m(codes[:, t:t + 1], s)
            outs.append(o)
    torch.testing.assert_close(_cat(outs)[0], full.audio, rtol=1e-4, atol=1e-5)
