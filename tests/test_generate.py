import glob
import os
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf
import torch

import generate
from codes import CodesFile, write_codes
from model import Config, SpeechLM, delay

torch.set_num_threads(2)


def _model(**kw):
    torch.manual_seed(0)
    cfg = Config.preset("tiny", **{**dict(n_streams=2, n_codebooks=3, cardinality=64, window=8, ttt_mini_batch=4), **kw})
    m = SpeechLM(cfg).eval()
    with torch.no_grad():
        for b in m.layers:
            if b.ttt is not None:
                b.ttt.alpha.fill_(0.8)
    return m


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    p = tmp_path_factory.mktemp("ck") / "m.safetensors"
    _model(delays=(0, 1, 1)).save(p)
    return str(p)


def _run(m, n, seed=0, mode="streaming", prompt=None, batch=1, **kw):
    frames, logps = [], []

    def on_frame(f, lp):
        frames.append(f.clone())
        logps.append(lp)
    g = torch.Generator().manual_seed(seed)
    s = generate.Sampler(m.cfg, generator=g, **kw)
    with torch.inference_mode():
        generate.generate(m, n, s, batch, prompt, mode, on_frame)
    return torch.stack(frames, 1), logps


def test_same_seed_same_codes_and_modes_agree():
    m = _model(delays=(0, 1, 1), n_text=1, text_cardinality=30)
    a, _ = _run(m, 45, seed=1, batch=2)
    b, _ = _run(m, 45, seed=1, batch=2)
    c, _ = _run(m, 45, seed=1, batch=2, mode="minibatch")
    d, _ = _run(m, 45, seed=2, batch=2)
    assert torch.equal(a, b)
    assert torch.equal(a, c)
    assert not torch.equal(a, d)
    assert a.shape == (2, 45, 7)  # 1 text + 2 streams x 3 codebooks


@pytest.mark.parametrize("half_life", [0, 6, (3, 300), (3, 300, "gate")])
def test_logprobs_match_a_full_forward(half_life):
    # several attention windows long (W = 8), with delays: the log-probabilities accumulated while
    # sampling equal those of one teacher-forced pass over the generated sequence (fast weights that
    # forget too, at one rate or at learnt ones, and with a forget gate)
    lo, hi, *gate = half_life if isinstance(half_life, tuple) else (half_life, 0)
    m = _model(delays=(0, 1, 2), n_text=1, text_cardinality=30, ttt_half_life=lo, ttt_half_life_max=hi,
               ttt_forget_gate=bool(gate))
    with torch.no_grad():
        for blk in m.layers if gate else ():
            if blk.ttt is not None:
                blk.ttt.layer.forget_weight.normal_(0, 1.0)
    n = 40
    out, logps = _run(m, n, temp=1.0, top_k=0, text_temp=1.0, text_top_k=0)
    d = delay(out, m.cfg)
    with torch.no_grad():
        logits, _ = m(d)
    md = 2  # delayed frames before md hold initial tokens, which are not predicted
    lp = logits.audio[:, md:].float().log_softmax(-1).gather(-1, d[:, md:, 1:, None])[..., 0].sum(-1)
    lp = lp + logits.text[:, md:].float().log_softmax(-1).gather(-1, d[:, md:, :1, None])[..., 0].sum(-1)
    got = torch.stack(logps, 1)                      # step t >= md gives the logp of delayed frame t
    torch.testing.assert_close(got[:, :n - md], lp, rtol=1e-4, atol=1e-4)


def test_prompt_continues_where_it_ends():
    m = _model(delays=(0, 1, 1))
    full, _ = _run(m, 30, seed=3)
    P = 13
    prompt = full[:, :P]
    out, logps = _run(m, 17, seed=4, prompt=prompt)
    assert torch.equal(out[:, :P], prompt)              # the prompt comes first, unchanged
    assert out.shape[1] == P + 17 and logps[P - 1] is None and logps[P] is not None
    # the continuation is conditioned on the prompt exactly: its log-probabilities equal those of
    # one teacher-forced pass over prompt + continuation (a wrong forced delayed column, or a
    # state that lost part of the prompt, would change every later frame's)
    d = delay(out, m.cfg)
    with torch.no_grad():
        logits, _ = m(d)
    lp = logits.audio[:, P + 1:].float().log_softmax(-1).gather(-1, d[:, P + 1:, :, None])[..., 0].sum(-1)
    got = torch.stack(logps[P:], 1)
    torch.testing.assert_close(got[:, :-1], lp, rtol=1e-4, atol=1e-4)


def test_cli_codes_and_memory(ckpt, tmp_path, capsys):
    out = tmp_path / "g.bin"
    n = generate.main(["--ckpt", ckpt, "--minutes", "1.2", "--codes_out", str(out), "--mimi", "", "--quiet"])
    assert n == 900
    f = CodesFile(out)
    assert f.n_frames == 900 and f.n_codebooks == 3
    text = capsys.readouterr().out
    assert "peak memory after minute 1" in text and "python mimi.py decode" in text
    # a codes prompt: the output starts with it
    write_codes(tmp_path / "p.bin", [f.conversation(0)[:50]], **f.meta())
    generate.main(["--ckpt", ckpt, "--minutes", "0.1", "--codes_out", str(tmp_path / "c.bin"),
                   "--prompt", str(tmp_path / "p.bin"), "--quiet"])
    g2 = CodesFile(tmp_path / "c.bin")
    assert g2.n_frames == 50 + 75
    np.testing.assert_array_equal(g2.conversation(0)[:50], f.conversation(0)[:50])


def test_wav_writer_is_valid_at_every_moment(tmp_path):
    p = str(tmp_path / "a.wav")
    w = generate.WavWriter(p, 2)
    x = np.random.default_rng(0).uniform(-0.5, 0.5, (1920, 2))
    w.write(x)
    info = sf.info(p)                          # readable before close, as after a crash
    assert info.frames == 1920 and info.channels == 2 and info.samplerate == 24000
    w.write(x)
    y, sr = sf.read(p)
    assert y.shape == (3840, 2)
    np.testing.assert_allclose(y[:1920], x, atol=1 / 32767)
    w.close()


FIXTURE_MIMI = os.path.join(os.path.dirname(__file__), "fixtures", "mimi", "moshi_small.safetensors")


@pytest.fixture(scope="module")
def ckpt128(tmp_path_factory):
    # a model whose codes fit the small fixture Mimi (128 entries a codebook)
    p = tmp_path_factory.mktemp("ck128") / "m.safetensors"
    _model(cardinality=128).save(p)
    return str(p)


def test_cli_audio_with_mimi(ckpt128, tmp_path, capsys):
    wav, codes = tmp_path / "g.wav", tmp_path / "g.bin"
    n = generate.main(["--ckpt", ckpt128, "--minutes", "0.1", "--mimi", FIXTURE_MIMI, "--out", str(wav),
                       "--codes_out", str(codes), "--quiet"])
    y, sr = sf.read(wav)
    assert sr == 24000 and y.shape == (n * 1920, 2)          # stereo: one speaker per channel
    assert np.abs(y).max() > 0
    # the audio is the streaming decode of the codes written beside it
    import mimi
    m = mimi.Mimi.from_pretrained(FIXTURE_MIMI, num_codebooks=3)
    a = torch.from_numpy(CodesFile(codes).audio(0).astype(np.int64))    # [F, S, K]
    with torch.no_grad():
        ref = m.decode(a.permute(1, 2, 0))[:, 0].numpy().T           # [samples, S]
    np.testing.assert_allclose(y, np.clip(ref, -1, 1), atol=2 / 32767)
    # a wav prompt: encoded with Mimi, then continued
    sf.write(tmp_path / "p.wav", np.random.default_rng(0).uniform(-0.3, 0.3, (24000, 2)), 24000)
    generate.main(["--ckpt", ckpt128, "--minutes", "0.05", "--mimi", FIXTURE_MIMI, "--out", str(wav),
                   "--codes_out", str(codes), "--prompt", str(tmp_path / "p.wav"), "--quiet"])
    assert CodesFile(codes).n_frames == 13 + 38                  # 1 s of prompt (12.5 frames, padded) + 3 s


def test_bad_audio_inputs(ckpt, ckpt128, tmp_path, capsys):
    base = ["--codes_out", str(tmp_path / "x.bin"), "--out", str(tmp_path / "x.wav"), "--quiet", "--minutes", "0.05"]
    from safetensors.torch import save_file
    save_file({"encoder.weight": torch.zeros(2)}, tmp_path / "notmimi.safetensors")
    msg = _err(capsys, ["--ckpt", ckpt128, "--mimi", str(tmp_path / "notmimi.safetensors")] + base)
    assert "error:" in msg and "Traceback" not in msg
    assert "do not fit" in _err(capsys, ["--ckpt", ckpt, "--mimi", FIXTURE_MIMI] + base)   # 64 entries != 128
    sf.write(tmp_path / "mono.wav", np.zeros((24000, 1)), 24000)
    assert "1 channel(s)" in _err(capsys, ["--ckpt", ckpt128, "--mimi", FIXTURE_MIMI, "--prompt",
                                           str(tmp_path / "mono.wav")] + base)
    # (another sample rate is resampled, not refused: tests/test_mimi.py checks the resampler and the
    # rates mimi.py refuses)
    (tmp_path / "noise.wav").write_bytes(b"not audio at all")
    assert "error:" in _err(capsys, ["--ckpt", ckpt128, "--mimi", FIXTURE_MIMI, "--prompt",
                                     str(tmp_path / "noise.wav")] + base)
    assert "cannot write audio" in _err(capsys, ["--ckpt", ckpt128, "--mimi", FIXTURE_MIMI, "--codes_out",
                                                 str(tmp_path / "y.bin"), "--out", str(tmp_path / "no" / "a.wav")])


def _err(capsys, argv):
    with pytest.raises(SystemExit) as e:
        generate.main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def test_bad_inputs(ckpt, tmp_path, capsys):
    base = ["--codes_out", str(tmp_path / "x.bin"), "--quiet"]
    for bad in ["0", "-3", "nan", "ten", "inf"]:
        assert "--minutes must be" in _err(capsys, ["--ckpt", ckpt, "--minutes", bad] + base)
    assert "does not exist" in _err(capsys, ["--ckpt", str(tmp_path / "none.safetensors")] + base)
    (tmp_path / "junk.safetensors").write_bytes(b"\0" * 64)
    assert "not a readable" in _err(capsys, ["--ckpt", str(tmp_path / "junk.safetensors")] + base)
    assert "folder" in _err(capsys, ["--ckpt", ckpt, "--codes_out", str(tmp_path / "no" / "x.bin")])
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o500)
    if not os.access(ro, os.W_OK):  # root can write anywhere
        assert "permission denied" in _err(capsys, ["--ckpt", ckpt, "--codes_out", str(ro / "x.bin")])
    # a codes prompt of another shape
    write_codes(tmp_path / "p1.bin", [np.zeros((20, 1, 3), np.int64)], n_streams=1, n_codebooks=3, cardinality=64)
    msg = _err(capsys, ["--ckpt", ckpt, "--minutes", "0.1", "--prompt", str(tmp_path / "p1.bin")] + base)
    assert "holds frames of" in msg and "'n_streams': 1" in msg
    assert "does not exist" in _err(capsys, ["--ckpt", ckpt, "--prompt", str(tmp_path / "nope.wav")] + base)
    sf.write(tmp_path / "p.wav", np.zeros((2400, 2)), 24000)
    assert "needs Mimi weights" in _err(capsys, ["--ckpt", ckpt, "--prompt", str(tmp_path / "p.wav")] + base)
    # the depth decoder kernels: launched from Python they would be slower than the loop, and need a GPU
    assert "capture them as a CUDA graph" in _err(capsys, ["--ckpt", ckpt, "--compile", "kernels"] + base)
    assert "needs a CUDA device" in _err(capsys, ["--ckpt", ckpt, "--compile", "kernels", "--cuda_graph"] + base)
    # sampling settings that would sample silently wrong (a negative temperature flips the distribution)
    for opt, v in [("--temp", "-1"), ("--top_k", "-3"), ("--top_p", "0"), ("--top_p", "1.5"), ("--text_temp", "-0.1")]:
        msg = _err(capsys, ["--ckpt", ckpt, "--minutes", "0.1", "--mimi", "", opt, v] + base)
        assert "sampling needs" in msg and opt.lstrip("-").split("_")[0] in msg, (opt, msg)
    if not torch.cuda.is_available():
        assert "torch sees no CUDA device here" in _err(capsys, ["--ckpt", ckpt, "--device", "cuda"] + base)


@pytest.mark.slow
def test_compiled_frame_step_gives_the_same_codes():
    # FrameStep(compile="depth"): blocks and the depth decoder's loop compiled (about a minute on a
    # CPU); the same seed gives the same frames and log-probabilities as the eager step
    m = _model(delays=(0, 1, 1), n_text=1, text_cardinality=30)
    out = {}
    for how in (False, "depth"):
        s = generate.Sampler(m.cfg, generator=torch.Generator().manual_seed(3))
        step = generate.FrameStep(m, s, 2, "cpu", compile=how)
        state, frames, lps = m.init_state(2), [], []
        with torch.inference_mode():
            for _ in range(12):
                f, lp, state = step(state)
                frames.append(f)
                lps.append(lp)
        out[how] = torch.stack(frames, 1), torch.stack(lps, 1)
    assert torch.equal(out[False][0], out["depth"][0])
    torch.testing.assert_close(out[False][1], out["depth"][1], rtol=1e-5, atol=1e-5)


def test_compile_failure_falls_back_to_eager(ckpt, tmp_path, capsys, monkeypatch):
    # a machine where torch.compile cannot build (no C++ compiler): a note, then the eager codes
    def broken(self):
        def fail(*args, **kwargs):
            raise RuntimeError("no C++ compiler found")
        self._depth_fn = fail
        return self
    ref, out = tmp_path / "ref.bin", tmp_path / "out.bin"
    generate.main(["--ckpt", ckpt, "--minutes", "0.1", "--compile", "", "--codes_out", str(ref), "--mimi", "", "--quiet"])
    monkeypatch.setattr(SpeechLM, "compile_depth", broken)
    generate.main(["--ckpt", ckpt, "--minutes", "0.1", "--compile", "depth", "--codes_out", str(out), "--mimi", "",
                   "--quiet"])
    assert "torch.compile failed here (RuntimeError: no C++ compiler found); generating without it" in capsys.readouterr().err
    np.testing.assert_array_equal(CodesFile(out).conversation(0), CodesFile(ref).conversation(0))


@pytest.mark.parametrize("sig,compile", [(signal.SIGTERM, "auto"), (signal.SIGINT, "")], ids=["sigterm", "ctrl-c"])
def test_signal_keeps_what_was_made(ckpt, tmp_path, sig, compile):
    # SIGTERM (a scheduler, `timeout`) and Ctrl-C stop the run at the next frame: the codes file is
    # written, with every frame made so far, and the run says it was interrupted (SIGTERM on the
    # compiled path that a long CPU run takes by default, Ctrl-C on the eager one)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out, wav = tmp_path / "g.bin", tmp_path / "g.wav"
    log = open(tmp_path / "log.txt", "w+")
    p = subprocess.Popen([sys.executable, "generate.py", "--ckpt", ckpt, "--minutes", "600", "--codes_out", str(out),
                          "--out", str(wav), "--mimi", "", "--device", "cpu", "--quiet", "--compile", compile],
                         cwd=root, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 300   # (compiling from a cold cache takes a minute on a small machine)
    while time.time() < deadline and p.poll() is None:   # until frames reach the file being written
        tmp = glob.glob(f"{out}.*.tmp")
        if tmp and os.path.getsize(tmp[0]) > 4096 + 1000 * 6 * 2:
            break
        time.sleep(0.2)
    assert p.poll() is None, open(tmp_path / "log.txt").read()[-2000:]
    p.send_signal(sig)
    try:
        p.wait(timeout=60)
    finally:
        p.kill()
    text = open(tmp_path / "log.txt").read()
    assert p.returncode == 0 and "(interrupted)" in text, text[-2000:]
    f = CodesFile(out)
    assert 1000 <= f.n_frames < 600 * 750 and len(f) == 1 and f"{f.n_frames} frames" in text


def test_a_signal_after_a_compiler_took_the_handler(ckpt, tmp_path):
    # The first time Triton compiles a kernel, its compiler (LLVM) puts its own SIGTERM handler in front of
    # generate.py's, one that resets to the default action as it runs. Here the first frame resets the action
    # behind Python's back, as that would; a SIGTERM at frame 60 must still stop the run with its frames written.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "g.bin"
    code = f"""
import ctypes, os, signal, sys
sys.path.insert(0, {root!r})
import generate
libc = ctypes.CDLL(None)
libc.signal.argtypes, libc.signal.restype = [ctypes.c_int, ctypes.c_void_p], ctypes.c_void_p
inner = generate.generate
def wrapped(*a, **k):
    on_frame, n = a[6], [0]
    def frame(codes, logp):
        n[0] += 1
        if n[0] == 1:
            libc.signal(signal.SIGTERM, 0)      # SIG_DFL
        if n[0] == 60:
            os.kill(os.getpid(), signal.SIGTERM)
        on_frame(codes, logp)
    return inner(*a[:6], frame, *a[7:], **k)
generate.generate = wrapped
generate.main(["--ckpt", {ckpt!r}, "--minutes", "10", "--compile", "", "--codes_out", {str(out)!r}, "--mimi", "",
               "--device", "cpu"])
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=root,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0 and "(interrupted)" in p.stdout + p.stderr, (p.returncode, (p.stdout + p.stderr)[-3000:])
    assert CodesFile(out).n_frames == 59
