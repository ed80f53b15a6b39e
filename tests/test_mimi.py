"""
Mimi: parity with the official implementations, streaming == batch, checkpoint layouts, the resampler,
the codes CLI and every bad input. The fast tests use small random codecs from tests/fixtures/mimi
(made by scripts/make_mimi_fixtures.py with moshi 0.2.13 and transformers); when moshi or transformers
is importable, a freshly built official model is compared too. `-m slow` adds the full-size checks.
"""
import importlib.util
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

import mimi
from codes import HEADER_SIZE, CodesFile, CodesWriter
from mimi import FRAME_SIZE, SAMPLE_RATE, Mimi, MimiCheckpointError, MimiConfig, MimiError
from scripts import make_mimi_fixtures as fx

FIX = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "mimi")
MOSHI_CKPT = os.path.join(FIX, "moshi_small.safetensors")
HF_CKPT = os.path.join(FIX, "hf_small", "model.safetensors")
REL_TOL = 1e-5
has_moshi = importlib.util.find_spec("moshi") is not None
has_transformers = importlib.util.find_spec("transformers") is not None


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny ops on a shared 2-core machine: a second OpenMP thread mostly waits for a busy core.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def expected():
    return np.load(os.path.join(FIX, "expected.npz"))


@pytest.fixture(scope="module")
def small():
    return Mimi.from_pretrained(MOSHI_CKPT, num_codebooks=32, device="cpu")


@pytest.fixture(scope="module")
def calib():
    return fx.calibration()  # [2, 1, 24 s]: the signal the fixtures' centroids were fitted on, and noise


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def assert_same(ours_codes, ref_codes, ours_audio, ref_audio):
    assert ours_codes.shape == ref_codes.shape
    mismatch = (ours_codes != ref_codes).sum().item()
    assert mismatch == 0, f"{mismatch} of {ref_codes.numel()} codes differ"
    assert ours_audio.shape == ref_audio.shape
    assert rel_err(ours_audio, ref_audio) < REL_TOL


# ----------------------------------------------------------------------------- parity

def test_fixture_signal_is_reproduced(expected):
    x = fx.signal(float(expected["seconds"]))
    assert fx.signal_crc(x) == int(expected["signal_crc"])
    assert len(x) / SAMPLE_RATE > 10  # longer than the attention window


@pytest.mark.parametrize("layout,path", [("moshi", MOSHI_CKPT), ("hf", HF_CKPT)])
@pytest.mark.parametrize("n_q", [8, 32])
def test_parity_with_fixtures(expected, layout, path, n_q):
    m = Mimi.from_pretrained(path, num_codebooks=n_q, device="cpu")
    x = torch.from_numpy(fx.signal(float(expected["seconds"])))[None, None]
    ref = torch.from_numpy(expected[f"{layout}_codes"][:n_q].astype(np.int64))[None]
    codes = m.encode(x)
    audio = m.decode(ref)[..., ::int(expected["stride"])]
    assert_same(codes, ref, audio, torch.from_numpy(expected[f"{layout}_audio{n_q}"])[None, None])


@pytest.mark.skipif(not has_moshi, reason="moshi not installed: fixtures only")
def test_parity_with_official_moshi(tmp_path, calib):
    ref = fx.moshi_mimi(fx.SMALL, seed=1, calib=calib)
    fx.save_moshi(ref, tmp_path / "m.safetensors")
    for n_q in (8, 32):
        ours = Mimi.from_pretrained(tmp_path / "m.safetensors", num_codebooks=n_q, device="cpu")
        codes, audio = fx.run_moshi(ref, calib, n_q)
        assert_same(ours.encode(calib), codes, ours.decode(codes), audio)


@pytest.mark.skipif(not has_transformers, reason="transformers not installed: fixtures only")
def test_parity_with_transformers(tmp_path, calib):
    ref = fx.hf_mimi(fx.SMALL, seed=1, calib=calib)
    ref.save_pretrained(tmp_path / "hf")
    for n_q in (8, 32):
        ours = Mimi.from_pretrained(tmp_path / "hf" / "model.safetensors", num_codebooks=n_q, device="cpu")
        codes, audio = fx.run_hf(ref, calib, n_q)
        assert_same(ours.encode(calib), codes, ours.decode(codes), audio)


@pytest.mark.slow
@pytest.mark.skipif(not has_moshi, reason="needs moshi")
def test_full_size_parity_with_official_moshi(tmp_path):
    calib = fx.calibration()
    ref = fx.moshi_mimi(MimiConfig(), seed=2, calib=calib)
    fx.save_moshi(ref, tmp_path / "m.safetensors")
    x = calib[:1]
    for n_q in (8, 32):
        ours = Mimi.from_pretrained(tmp_path / "m.safetensors", num_codebooks=n_q, device="cpu")
        codes, audio = fx.run_moshi(ref, x, n_q)
        assert_same(ours.encode(x), codes, ours.decode(codes), audio)
    stream_codes, stream_audio = stream(ours, x, codes, 1)
    assert_same(stream_codes, codes, stream_audio, audio)


@pytest.mark.slow
@pytest.mark.skipif(not has_transformers, reason="needs transformers")
def test_full_size_parity_with_transformers(tmp_path):
    calib = fx.calibration()
    ref = fx.hf_mimi(MimiConfig(), seed=2, calib=calib)
    ref.save_pretrained(tmp_path / "hf")
    x = calib[:1]
    for n_q in (8, 32):
        ours = Mimi.from_pretrained(tmp_path / "hf", num_codebooks=n_q, device="cpu")
        codes, audio = fx.run_hf(ref, x, n_q)
        assert_same(ours.encode(x), codes, ours.decode(codes), audio)


# ----------------------------------------------------------------------------- streaming

def stream(m, x, codes, sizes):
    """Encode x and decode codes in chunks of `sizes` frames (an int, or a list used in turn)."""
    sizes = sizes if isinstance(sizes, list) else [sizes]
    enc, dec = [], []
    with m.streaming(x.shape[0]):
        i = j = 0
        while i < x.shape[-1]:
            n = sizes[j % len(sizes)] * FRAME_SIZE
            enc.append(m.encode(x[..., i:i + n]))
            i, j = i + n, j + 1
        i = j = 0
        while i < codes.shape[-1]:
            n = sizes[j % len(sizes)]
            dec.append(m.decode(codes[..., i:i + n]))
            i, j = i + n, j + 1
    return torch.cat(enc, -1), torch.cat(dec, -1)


@pytest.mark.parametrize("sizes", [1, 7, [3, 1, 126, 20]], ids=["1-frame", "7-frames", "mixed-incl-126"])
def test_streaming_equals_batch(small, calib, sizes):
    # 300 frames = 600 transformer steps > 250, so the window matters; a 126-frame chunk spans two query
    # blocks; the last 7-frame chunk is short
    codes, audio = small.encode(calib), small.decode(small.encode(calib))
    s_codes, s_audio = stream(small, calib, codes, sizes)
    assert_same(s_codes, codes, s_audio, audio)


@pytest.mark.parametrize("cin,cout,k,stride,dilation",
                         [(1, 16, 7, 1, 1), (16, 8, 3, 1, 3), (8, 16, 8, 4, 1), (64, 128, 16, 8, 1)])
def test_conv_as_matrix_product(monkeypatch, cin, cout, k, stride, dilation):
    # the route short CUDA inputs take (streaming steps), checked here on the CPU
    monkeypatch.setattr(mimi, "STEP_ROUTES", "always")
    conv = torch.nn.Conv1d(cin, cout, k, stride, dilation=dilation).double()
    x = torch.randn(2, cin, 5 * stride + (k - 1) * dilation, dtype=torch.float64)
    assert torch.allclose(mimi._conv(conv, x), conv(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("cin,cout,k,stride,groups", [(32, 16, 8, 4, 1), (16, 16, 4, 2, 16), (8, 4, 6, 2, 1)])
def test_transposed_conv_as_matrix_product(monkeypatch, cin, cout, k, stride, groups):
    monkeypatch.setattr(mimi, "STEP_ROUTES", "always")
    conv = torch.nn.ConvTranspose1d(cin, cout, k, stride, groups=groups, bias=groups == 1).double()
    x = torch.randn(2, cin, 7, dtype=torch.float64)
    y = mimi._conv_tr(conv, x)
    assert y.shape == conv(x).shape and torch.allclose(y, conv(x), rtol=0, atol=1e-12)


def test_linear_as_sum():
    x, w = torch.randn(3, 2, 40, dtype=torch.float64), torch.randn(24, 40, dtype=torch.float64)
    assert torch.allclose(mimi.linear_as_sum(x, w), torch.nn.functional.linear(x, w), rtol=0, atol=1e-12)


@pytest.mark.parametrize("compiled_form", [False, True], ids=["eager-form", "compiled-form"])
def test_streaming_with_matrix_product_convs_equals_batch(small, calib, monkeypatch, compiled_form):
    # the GPU routes of a streaming step, taken on the CPU: convolutions as matrix products, attention
    # written out and (the forms a compiled step takes) products and sums for few-row matrix products
    codes, audio = small.encode(calib), small.decode(small.encode(calib))
    monkeypatch.setattr(mimi, "STEP_ROUTES", "always")
    monkeypatch.setattr(mimi, "SMALL_CONV", 10 ** 9)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiled_form)
    s_codes, s_audio = stream(small, calib, codes, [1, 4])
    assert_same(s_codes, codes, s_audio, audio)


def test_codes_out_of_range_raise(small):
    good = torch.zeros(1, 8, 3, dtype=torch.long)
    bins = small.cfg.bins
    for bad in (bins, -1):
        codes = good.clone()
        codes[0, 3, 1] = bad
        with pytest.raises(MimiError, match=rf"must lie in \[0, {bins}\); got values from {min(bad, 0)} to {max(bad, 0)}"):
            small.decode(codes)
        with small.streaming(1), pytest.raises(MimiError, match="must lie in"):
            small.decode(codes[..., :1]), small.decode(codes[..., 1:])


def test_batch_chunks_equal_one_pass(small, calib):
    codes, audio = small.encode(calib), small.decode(small.encode(calib))
    small.chunk_frames = 300  # everything in one chunk: a single 600-step attention call
    try:
        assert_same(small.encode(calib), codes, small.decode(codes), audio)
    finally:
        small.chunk_frames = None


@pytest.mark.parametrize("query_block", [4, 250])
def test_ring_any_split_equals_one_pass(monkeypatch, query_block):
    # the attention cache is a ring (slots in arrival order mod C, not in time order): one pass, chunks of
    # any size and 1-step calls agree, also with query blocks shorter than the ring (several blocks a call)
    monkeypatch.setattr(mimi, "QUERY_BLOCK", query_block)
    torch.manual_seed(0)
    tr = mimi.Transformer(MimiConfig(dim=32, n_layers=2, n_heads=2, ffn=64, context=7)).eval()
    with torch.no_grad():
        for p in tr.parameters():
            p.add_(0.5 * torch.randn_like(p))
        x = torch.randn(2, 32, 40)
        tr.state = tr.init_state(2, "cpu", torch.float32)[:3]
        ref = tr(x)
        for sizes in ([1] * 40, [3, 9, 1, 20, 7], [13, 27]):
            tr.state = tr.init_state(2, "cpu", torch.float32)[:3]
            out, i = [], 0
            for n in sizes:
                out.append(tr(x[..., i:i + n]))
                i += n
            err = ((torch.cat(out, -1) - ref).abs().max() / ref.abs().max()).item()
            assert err < 1e-5, (sizes, err)   # float32 rounding: 2e-6 at most here


def test_attention_window_matters(small, calib, expected):
    # without the 250-step window the codes of this 24 s input change: the window is exercised
    codes = small.encode(calib[:1])
    for t in (small.encoder_transformer, small.decoder_transformer):
        t.cfg.context = 10_000
    try:
        assert (small.encode(calib[:1]) != codes).float().mean() > 0.1
    finally:
        for t in (small.encoder_transformer, small.decoder_transformer):
            t.cfg.context = mimi.CONTEXT


def test_streaming_state_is_bounded(small):
    def size():
        return sum(t.numel() for m in small._stateful() for t in m.state)
    x = torch.zeros(1, 1, 200 * FRAME_SIZE)
    with small.streaming(1):
        small.encode(x[..., :FRAME_SIZE])
        small.decode(torch.zeros(1, 32, 1, dtype=torch.long))
        first = size()
        small.encode(x)
        small.decode(torch.zeros(1, 32, 200, dtype=torch.long))
        assert size() == first
    assert all(m.state is None for m in small._stateful())


def test_fewer_codebooks_are_a_prefix(small, calib):
    one = Mimi.from_pretrained(MOSHI_CKPT, num_codebooks=1, device="cpu")
    x = calib[:1, :, :40 * FRAME_SIZE]
    codes = small.encode(x)
    assert torch.equal(one.encode(x), codes[:, :1])
    assert torch.allclose(one.decode(codes[:, :1]), small.decode(codes[:, :1]), atol=1e-6)


def test_encode_pads_the_end_to_whole_frames(small, calib):
    x = calib[:1, :, :10 * FRAME_SIZE + 5]
    padded = torch.nn.functional.pad(x, (0, FRAME_SIZE - 5))
    assert torch.equal(small.encode(x), small.encode(padded))
    assert small.encode(x).shape == (1, 32, 11)
    assert small.decode(small.encode(x)).shape == (1, 1, 11 * FRAME_SIZE)


def test_captured_shapes_go_straight_to_the_replay(small):
    """A streaming call of a chunk shape already captured skips the checks and replays its graph (here a
    stand-in on the CPU, where there are no CUDA graphs); a tensor of another kind takes the checked path,
    and the step's range check still raises."""
    class Graph:
        replays = 0

        def replay(self):
            Graph.replays += 1
    wav, codes = torch.zeros(1, 1, FRAME_SIZE), torch.zeros(1, 32, 1, dtype=torch.long)
    with small.streaming(1):
        enc_out, dec_out = torch.full((1, 32, 1), 7), (torch.ones(1, 1, FRAME_SIZE), torch.tensor(False))
        x_enc, x_dec = wav.clone(), codes.clone()
        small._graphs = {("encode", tuple(wav.shape)): (x_enc, enc_out, Graph()),
                         ("decode", tuple(codes.shape)): (x_dec, dec_out, Graph())}
        w = torch.randn(1, 1, FRAME_SIZE, requires_grad=True)
        assert torch.equal(small.encode(w), enc_out) and Graph.replays == 1
        assert torch.equal(x_enc, w.detach()) and not x_enc.requires_grad   # the input copied, no history
        assert torch.equal(small.decode((codes + 3).int()), dec_out[0]) and Graph.replays == 2
        assert torch.equal(x_dec, codes + 3)
        with pytest.raises(MimiError, match="integer tensor"):
            small.decode(codes.float())
        with pytest.raises(MimiError, match="float tensor"):
            small.encode(wav.long())
        assert Graph.replays == 2
        dec_out[1].fill_(True)  # the step found a code out of range
        with pytest.raises(MimiError, match="must lie in"):
            small.decode(codes)


@pytest.mark.gpu
@pytest.mark.parametrize("kw", [dict(cuda_graph=True), dict(cuda_graph=True, compile=True)], ids=["graph", "compile"])
def test_cuda_graph_streaming_equals_plain(calib, kw):
    m = Mimi.from_pretrained(MOSHI_CKPT, num_codebooks=32, device="cuda")
    x = calib.cuda()
    codes = m.encode(x)
    ref = stream(m, x, codes, 1)
    assert torch.equal(ref[0], codes) and rel_err(ref[1], m.decode(codes)) < REL_TOL   # CUDA streaming == batch
    with m.streaming(2, **kw):
        enc = torch.cat([m.encode(x[..., i:i + FRAME_SIZE]) for i in range(0, x.shape[-1], FRAME_SIZE)], -1)
        dec = torch.cat([m.decode(codes[..., i:i + 1]) for i in range(codes.shape[-1])], -1)
        # calls of a captured shape go straight to the replay, and bad ones are still refused
        with pytest.raises(MimiError, match="integer tensor"):
            m.decode(codes[..., :1].float())
        with pytest.raises(MimiError, match="float tensor"):
            m.encode(x[..., :FRAME_SIZE].long())
        bad = codes[..., :1].clone()
        bad[1, 3, 0] = 2048
        with pytest.raises(MimiError, match="must lie in"):
            m.decode(bad)
    assert torch.equal(enc, ref[0])
    assert rel_err(dec, ref[1]) < REL_TOL


STEP_KERNELS_CHECK = r'''
import os, sys
sys.path[:0] = [sys.argv[1], os.path.join(sys.argv[1], "tests")]
import interpreted  # Triton's CPU interpreter: before anything defines a kernel
import torch
import mimi
mimi.STEP_ROUTES = "always"
mimi.STEP_LAUNCH["splits"] = 4  # the ring (6 slots) in 4 splits of 2
torch.manual_seed(0)
cfg = mimi.MimiConfig(dim=32, n_layers=2, n_heads=2, ffn=64, context=7)
tr = mimi.Transformer(cfg).eval()
with torch.no_grad():
    for p in tr.parameters():
        p.add_(0.5 * torch.randn_like(p))  # attention far from uniform, layers that matter
worst = 0.0
# products in one tile and in several (a loop over the inputs), 2 to 16 outputs a program
for B, sizes, launch in ((2, (1, 2, 3, 5, 1, 2), dict(programs=16, tile=4096)),
                         (1, (2, 2, 2, 2, 16, 1), dict(programs=64, tile=64))):
    mimi.STEP_LAUNCH.update(launch)
    ref, ker = tr.init_state(B, "cpu", torch.float32)[:3], tr.init_state(B, "cpu", torch.float32)
    assert len(ref) == 3 and len(ker) == 5
    g = torch.Generator().manual_seed(B)
    for T in sizes:  # 14 or 25 steps, 2 to 3 windows: the ring wraps; 16 steps at once: more than a window
        x = torch.randn(B, cfg.dim, T, generator=g)
        with torch.no_grad():
            tr.state = ref
            y0 = tr(x.clone())
            tr.state = ker
            y1 = tr(x.clone())
        worst = max(worst, ((y1 - y0).norm() / y0.norm()).item())
        assert torch.equal(ref[1], ker[1]) and torch.equal(ref[2], ker[2]), (ref[1], ker[1])
        worst = max(worst, ((ker[0] - ref[0]).norm() / ref[0].norm()).item())
        assert ker[4].eq(0).all()   # the split counters are back at zero
print("worst", worst)
assert worst < 1e-5, worst
print("steps equal")
'''


def test_step_kernels_match_the_transformer_in_the_interpreter(run_interpreted):
    """The transformer's streaming step as Triton kernels (used on CUDA for steps of at most SMALL_ROWS
    rows), run on the CPU by Triton's interpreter, against the PyTorch layers: same outputs and state
    (ring, slot positions, offset), float32, batch 2 and 1, chunks of 1-16 steps, the ring wrapping."""
    run_interpreted(STEP_KERNELS_CHECK, "steps equal")


CONV_KERNEL_CHECK = r"""
import os, sys
sys.path[:0] = [sys.argv[1], os.path.join(sys.argv[1], "tests")]
import interpreted  # Triton's CPU interpreter: before anything defines a kernel
import torch
import torch.nn.functional as F
import mimi
from mimi import FRAME_SIZE, Mimi
from scripts import make_mimi_fixtures as fx
torch.manual_seed(0)
worst = 0.0
# one convolution each (at most CONV_ROWS output rows): strides, dilations, the ELU on the input, bias, the
# residual, and a weight read in several tiles
for cin, cout, k, s, d, B, T in [(8, 12, 7, 1, 1, 1, 2), (24, 40, 3, 1, 2, 2, 8), (16, 8, 4, 2, 1, 1, 16),
                                 (1, 16, 7, 1, 1, 1, 16), (20, 24, 6, 3, 1, 3, 5), (300, 6, 5, 1, 1, 1, 3),
                                 (1, 20, 7, 1, 1, 1, 70), (12, 40, 8, 4, 1, 2, 33), (40, 3, 3, 1, 3, 1, 100)]:
    for elu in (False, True):
        for with_res in (False, True):
            conv = torch.nn.Conv1d(cin, cout, k, s, dilation=d)
            x = torch.randn(B, cin, (T - 1) * s + (k - 1) * d + 1)
            res = torch.randn(B, cout, T) if with_res else None
            ref = conv(F.elu(x) if elu else x) + (0 if res is None else res)
            y = mimi._conv_rows(x, conv.weight.reshape(cout, -1), conv.bias, res, k, s, d, elu)
            assert y.shape == ref.shape, (y.shape, ref.shape)
            worst = max(worst, ((y - ref).abs().max() / ref.abs().max()).item())
mimi.STEP_ROUTES = "always"
for cin, cout, k, s, B, T in [(16, 8, 8, 4, 1, 2), (12, 6, 12, 6, 2, 8), (8, 4, 10, 5, 1, 16), (20, 10, 8, 4, 2, 25)]:
    for elu in (False, True):
        ct = torch.nn.ConvTranspose1d(cin, cout, k, s)
        x = torch.randn(B, cin, T)
        ref = ct(F.elu(x) if elu else x)
        y = mimi._conv_tr(ct, x.clone(), elu, ct.weight.reshape(cin, -1).t().contiguous())
        assert y.shape == ref.shape, (y.shape, ref.shape)
        worst = max(worst, ((y - ref).abs().max() / ref.abs().max()).item())
print("worst", worst)
assert worst < 1e-5, worst
# a whole stream of the small codec, every convolution of both SEANets through the kernel (the
# transformers' step kernels off: they have their own check), against the batch result
mimi.STEP_KERNELS = False
m = Mimi.from_pretrained(os.path.join(sys.argv[1], "tests", "fixtures", "mimi", "moshi_small.safetensors"),
                         num_codebooks=32, device="cpu")
x = fx.calibration()[:1, :, :3 * FRAME_SIZE]
mimi.STEP_ROUTES = "never"
codes, audio = m.encode(x), m.decode(m.encode(x))
mimi.STEP_ROUTES = "always"
calls = []
op = mimi._conv_rows_op
mimi._conv_rows_op = lambda *a: calls.append(1) or op(*a)
with m.streaming(1):
    enc = torch.cat([m.encode(x[..., :FRAME_SIZE]), m.encode(x[..., FRAME_SIZE:])], -1)
    dec = torch.cat([m.decode(codes[..., :1]), m.decode(codes[..., 1:])], -1)
# every convolution but the depthwise upsampling takes a kernel (the rows kernel or the tile kernel): an
# encode call 17 (the SEANet's 14, the learnt downsampling, the two RVQ input projections), a decode call
# 16 (the two RVQ output projections, the SEANet's 14)
assert len(calls) == 2 * 17 + 2 * 16, len(calls)
assert torch.equal(enc, codes), (enc != codes).sum()
err = ((dec - audio).norm() / audio.norm()).item()
print("audio", err)
assert err < 1e-5, err
print("convs equal")
"""


def test_conv_kernel_in_the_interpreter(run_interpreted):
    """The streaming convolution kernels (rows and tiles; used on CUDA for the convolutions of a streaming
    frame), run on the CPU by Triton's interpreter: single convolutions and transposed convolutions
    against PyTorch's, and a stream of 1 + 2 frames, encoded and decoded with every convolution but the
    depthwise upsampling through them, against the batch codes and audio."""
    run_interpreted(CONV_KERNEL_CHECK, "convs equal")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_conv_kernels_compile_for_h100(dtype):
    """The streaming conv kernels compiled to sm_90 machine code without a GPU (Triton ships ptxas), with
    the settings they launch with: the rows kernel at 2 and 16 rows, the tile kernel's two tiles."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import mimi
    ints = ("R", "L", "Tout", "N", "K")
    cases = [(mimi._conv_rows_kernel, dict(RP=RP, BN=BN, BK=BK), w)
             for RP, (BN, BK, w) in ((2, mimi._conv_blocks(1024, 8192, 2)), (16, mimi._conv_blocks(512, 3072, 16)))]
    cases += [(mimi._conv_tile_kernel, dict(BM=BM, BN=BN, BK=mimi.CONV_TILES["BK"], DOT=mimi.CONV_DOT),
               mimi.CONV_TILES["warps"]) for BM, BN in mimi.CONV_TILES["tiles"]]
    for kern, blocks, warps in cases:
        consts = dict(KS=3, stride=2, dil=1, ELU=True, BIAS=True, RES=True, **blocks)
        names = kern.arg_names
        sig = {n: "constexpr" if n in consts else "i32" if n in ints else f"*{dtype}" for n in names}
        src = ASTSource(fn=kern, signature=sig, constexprs={(names.index(n),): v for n, v in consts.items()})
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
        assert compiled.metadata.shared <= 227 * 1024


@pytest.mark.slow
def test_compiled_streaming_equals_plain(small, calib):
    # torch.compile(fullgraph=True) also proves the step has no host sync, which a CUDA graph needs
    x, codes = calib[..., :20 * FRAME_SIZE], small.encode(calib[..., :20 * FRAME_SIZE])
    ref = stream(small, x, codes, 1)
    with small.streaming(2, compile=True):
        enc = torch.cat([small.encode(x[..., i:i + FRAME_SIZE]) for i in range(0, x.shape[-1], FRAME_SIZE)], -1)
        dec = torch.cat([small.decode(codes[..., i:i + 1]) for i in range(codes.shape[-1])], -1)
    assert torch.equal(enc, ref[0])
    assert rel_err(dec, ref[1]) < REL_TOL


# ----------------------------------------------------------------------------- checkpoints

def _tensors(path):
    import safetensors.torch
    return safetensors.torch.load_file(path)


def _save(d, path):
    import safetensors.torch
    safetensors.torch.save_file(d, str(path))
    return str(path)


@pytest.mark.parametrize("rename", [
    ("moshi: in_proj_weight", MOSHI_CKPT, lambda k: k.replace("in_projs.0.weight", "in_proj_weight")
     .replace("out_projs.0.weight", "out_proj.weight")),
    ("hf: split encoder/decoder", HF_CKPT, lambda k: next(
        (k.replace(a, b, 1) for a, b in [("encoder.layers.", "encoder.encoder_seanet.layers."),
                                         ("decoder.layers.", "decoder.decoder_seanet.layers."),
                                         ("encoder_transformer.", "encoder.encoder_transformer."),
                                         ("decoder_transformer.", "decoder.decoder_transformer."),
                                         ("downsample.", "encoder.downsample."), ("upsample.", "decoder.upsample.")]
         if k.startswith(a)), k)),
], ids=lambda r: r[0])
def test_other_key_spellings_load(tmp_path, calib, rename):
    _, path, fn = rename
    renamed = _save({fn(k): v for k, v in _tensors(path).items()}, tmp_path / "model.safetensors")
    if "hf" in path:
        shutil.copy(os.path.join(os.path.dirname(path), "config.json"), tmp_path / "config.json")
    x = calib[:1, :, :20 * FRAME_SIZE]
    a, b = Mimi.from_pretrained(path, device="cpu"), Mimi.from_pretrained(renamed, device="cpu")
    assert torch.equal(a.encode(x), b.encode(x))


def test_bad_checkpoint_lists_every_problem(tmp_path):
    d = _tensors(MOSHI_CKPT)
    del d["decoder.model.5.convtr.convtr.bias"]
    d["encoder.model.3.conv.conv.weight"] = torch.zeros(3, 3, 3)
    d["encoder.extra.weight"] = torch.zeros(1)
    with pytest.raises(MimiCheckpointError) as e:
        Mimi.from_pretrained(_save(d, tmp_path / "bad.safetensors"))
    msg = str(e.value)
    for needle in ["moshi layout", "missing keys (1): decoder.model.5.convtr.convtr.bias",
                   "unexpected keys (1): encoder.extra.weight", "encoder.model.3.conv.conv.weight (3, 3, 3), expected",
                   "huggingface-cli download kyutai/mimi model.safetensors"]:
        assert needle in msg


def test_wrong_layout_checkpoint(tmp_path):
    path = _save({"model.layers.0.weight": torch.zeros(2, 2), "lm_head.weight": torch.zeros(2)}, tmp_path / "lm.safetensors")
    with pytest.raises(MimiCheckpointError, match="not a Mimi checkpoint in a layout we know"):
        Mimi.from_pretrained(path)
    (tmp_path / "junk.safetensors").write_bytes(b"this is not safetensors")
    with pytest.raises(MimiCheckpointError, match="not a safetensors file"):
        Mimi.from_pretrained(tmp_path / "junk.safetensors")
    with pytest.raises(MimiCheckpointError, match="does not exist.*--mimi PATH"):
        Mimi.from_pretrained(tmp_path / "nope.safetensors")
    with pytest.raises(MimiError, match="num_codebooks must be in 1..32"):
        Mimi.from_pretrained(MOSHI_CKPT, num_codebooks=33)


def test_find_checkpoint_in_hf_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    assert mimi.find_checkpoint() is None
    with pytest.raises(MimiCheckpointError) as e:
        Mimi.from_pretrained()
    assert "huggingface-cli download kyutai/mimi model.safetensors" in str(e.value) and "--mimi PATH" in str(e.value)
    snap = tmp_path / "models--kyutai--mimi" / "snapshots" / "0123abc"
    snap.mkdir(parents=True)
    os.symlink(HF_CKPT, snap / "model.safetensors")
    assert mimi.find_checkpoint() == str(snap / "model.safetensors")
    shutil.copy(os.path.join(FIX, "hf_small", "config.json"), snap / "config.json")
    assert Mimi.from_pretrained(device="cpu").cfg.dim == 32


# ----------------------------------------------------------------------------- bad inputs to the API

def test_encode_rejects_bad_audio(small):
    for bad in [torch.zeros(1, 1920), torch.zeros(1, 2, 1920), torch.zeros(1, 1, 1920, dtype=torch.int16),
                np.zeros((1, 1, 1920), np.float32)]:
        with pytest.raises(MimiError, match=r"float tensor \[batch, 1, samples\]"):
            small.encode(bad)
    with small.streaming(1):
        with pytest.raises(MimiError, match="whole frames of 1920"):
            small.encode(torch.zeros(1, 1, 1000))
        with pytest.raises(MimiError, match="batch_size=1"):
            small.encode(torch.zeros(2, 1, FRAME_SIZE))
        with pytest.raises(MimiError, match="already streaming"):
            with small.streaming(1):
                pass


def test_decode_rejects_bad_codes(small):
    eight = Mimi.from_pretrained(MOSHI_CKPT, num_codebooks=8, device="cpu")
    with pytest.raises(MimiError, match=rf"must lie in \[0, {fx.SMALL.bins}\)"):
        small.decode(torch.full((1, 8, 3), fx.SMALL.bins))
    with pytest.raises(MimiError, match=rf"must lie in \[0, {fx.SMALL.bins}\)"):
        small.decode(torch.full((1, 8, 3), -1))
    with pytest.raises(MimiError, match="loaded with num_codebooks=8.*num_codebooks=9"):
        eight.decode(torch.zeros(1, 9, 3, dtype=torch.long))
    with pytest.raises(MimiError, match="integer tensor"):
        small.decode(torch.zeros(1, 8, 3))
    with pytest.raises(MimiError, match="integer tensor"):
        small.decode(torch.zeros(8, 3, dtype=torch.long))


# ----------------------------------------------------------------------------- resampling

def _sine(freq, sr, seconds=0.5):
    return np.sin(2 * np.pi * freq * np.arange(round(seconds * sr)) / sr)[None].astype(np.float32)


@pytest.mark.parametrize("sr,freq", [(44_100, 1000.0), (16_000, 3000.0), (48_000, 7000.0), (22_050, 440.0)])
def test_resampler_matches_the_analytic_sine(sr, freq):
    y = mimi.resample(_sine(freq, sr), sr)
    assert y.shape == (1, -(-round(0.5 * sr) * SAMPLE_RATE // sr))
    want = torch.from_numpy(_sine(freq, SAMPLE_RATE))[:, :y.shape[1]]
    edge = 200  # the filter sees zeros beyond the ends
    assert (y - want)[:, edge:-edge].abs().max() < 2e-3


def test_resampler_removes_what_the_new_rate_cannot_hold():
    y = mimi.resample(_sine(15_000.0, 48_000), 48_000)  # above 12 kHz, the Nyquist of 24 kHz
    assert y[:, 200:-200].pow(2).mean().sqrt() < 1e-3
    assert torch.equal(mimi.resample(_sine(100.0, SAMPLE_RATE), SAMPLE_RATE), torch.from_numpy(_sine(100.0, SAMPLE_RATE)))
    with pytest.raises(MimiError, match="cannot resample 7919 Hz"):
        mimi.resample(_sine(100.0, 7919), 7919)


# ----------------------------------------------------------------------------- command line

def run_cli(capsys, *argv):
    rc = mimi.main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def _wav(path, seconds, sr=SAMPLE_RATE, channels=1, seed=0):
    x = np.stack([fx.signal(seconds * sr / SAMPLE_RATE, seed + c)[:round(seconds * sr)] for c in range(channels)], 1)
    sf.write(str(path), x, sr)
    return path


def test_cli_round_trip(tmp_path, capsys):
    folder = tmp_path / "talks"
    folder.mkdir()
    _wav(folder / "a.wav", 3.0, sr=48_000, channels=2)
    _wav(folder / "b.flac", 2.0, channels=2, seed=5)
    rc, err = run_cli(capsys, "encode", folder, "--out", tmp_path / "c.bin", "--mimi", MOSHI_CKPT, "--device", "cpu")
    assert rc == 0, err
    assert "encoded 0.1 of 0.1 min" in err and "real time" in err
    f = CodesFile(tmp_path / "c.bin")
    assert (len(f), f.n_streams, f.n_codebooks, f.cardinality) == (2, 2, 8, fx.SMALL.bins)
    assert list(f.lengths) == [-(-3 * SAMPLE_RATE // FRAME_SIZE), -(-2 * SAMPLE_RATE // FRAME_SIZE)]
    # the codes are what the API gives for the same (resampled) audio
    x = mimi.load_audio(folder / "a.wav")[:, None]
    assert torch.equal(torch.from_numpy(f.audio(0).astype(np.int64)).permute(1, 2, 0),
                       Mimi.from_pretrained(MOSHI_CKPT, device="cpu").encode(x))
    rc, err = run_cli(capsys, "decode", tmp_path / "c.bin", "--out", tmp_path / "out.wav", "--conversation", 1,
                      "--mimi", MOSHI_CKPT, "--device", "cpu")
    assert rc == 0, err
    audio, sr = sf.read(str(tmp_path / "out.wav"))
    assert (sr, audio.shape) == (SAMPLE_RATE, (f.lengths[1] * FRAME_SIZE, 2))
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    _wav(tmp_path / "mono.ogg", 1.0)
    rc, err = run_cli(capsys, "encode", tmp_path / "mono.ogg", "--out", tmp_path / "m.bin", "--mimi", MOSHI_CKPT,
                      "--num_codebooks", 32, "--device", "cpu")
    assert rc == 0, err
    assert (CodesFile(tmp_path / "m.bin").n_streams, CodesFile(tmp_path / "m.bin").n_codebooks) == (1, 32)


def test_cli_bad_inputs(tmp_path, capsys):
    ck = ["--mimi", MOSHI_CKPT, "--device", "cpu"]  # later options (the overrides below) win
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "text.wav").write_text("not audio at all")
    _wav(tmp_path / "odd.wav", 0.5, sr=7919)
    _wav(tmp_path / "mono.wav", 0.5)
    _wav(tmp_path / "stereo.wav", 0.5, channels=2)
    (tmp_path / "nothing").mkdir()
    lm = _save({"model.layers.0.weight": torch.zeros(2, 2)}, tmp_path / "lm.safetensors")
    mono = tmp_path / "mono.wav"
    cases = [  # (inputs, overriding options, what the error says)
        ([tmp_path / "missing.wav"], [], "does not exist"),
        ([tmp_path / "empty.wav"], [], "is empty"),
        ([tmp_path / "text.wav"], [], "cannot read"),
        ([tmp_path / "nothing"], [], "holds no .wav"),
        ([tmp_path / "odd.wav"], [], "cannot resample 7919 Hz"),
        ([mono, tmp_path / "stereo.wav"], [], "all be mono or all stereo"),
        ([mono], ["--num_codebooks", 40], "num_codebooks must be in 1..32"),
        ([mono], ["--mimi", lm], "not a Mimi checkpoint"),
        ([mono], ["--mimi", tmp_path / "nope.safetensors"], "does not exist"),
        ([mono], ["--device", "tpu9"], "unknown device"),
    ]
    for inputs, options, needle in cases:
        rc, err = run_cli(capsys, "encode", *inputs, "--out", tmp_path / "c.bin", *ck, *options)
        assert rc == 2 and err.startswith("error:") and needle in err, (inputs, options, err)
    assert not os.path.exists(tmp_path / "c.bin")

    bins = fx.SMALL.bins

    def codes_file(name, codes, cardinality=bins):
        with CodesWriter(tmp_path / name, n_streams=1, n_codebooks=8, cardinality=cardinality) as w:
            w.add(codes)
        return tmp_path / name
    good = codes_file("good.bin", np.zeros((10, 1, 8), np.int64))
    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes(good.read_bytes()[:-20])
    corrupt = tmp_path / "corrupt.bin"  # a code >= the cardinality written over the payload
    corrupt.write_bytes(good.read_bytes()[:HEADER_SIZE] + struct.pack("<H", bins + 5) + good.read_bytes()[HEADER_SIZE + 2:])
    cases = [
        (tmp_path / "none.bin", [], "does not exist"),
        (truncated, [], "truncated"),
        (corrupt, [], f"holds code {bins + 5} >= cardinality {bins}"),
        (good, ["--conversation", 3], "holds conversations 0..0"),
        (codes_file("wide.bin", np.full((4, 1, 8), 4000), cardinality=4096), [], "codebooks of 4096"),
        (good, ["--out", tmp_path / "x.mp3"], "give a .wav or .flac name"),
        (codes_file("big.bin", np.full((4, 1, 8), bins), cardinality=2048), [], f"must lie in [0, {bins})"),
    ]
    for codes, options, needle in cases:
        rc, err = run_cli(capsys, "decode", codes, "--out", tmp_path / "x.wav", *ck, *options)
        assert rc == 2 and err.startswith("error:") and needle in err, (codes, options, err)
    assert not [p for p in os.listdir(tmp_path) if p.endswith((".tmp", "x.wav"))]


def test_cli_exit_status_without_traceback(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run([sys.executable, "mimi.py", "decode", str(tmp_path / "none.bin"), "--out", str(tmp_path / "o.wav")],
                       cwd=root, capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.startswith("error:") and "Traceback" not in p.stderr
