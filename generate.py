"""
Generate a conversation: minutes to hours of codes (and audio), written to disk as they are made.

    python generate.py --minutes 90                       # the repo's demo checkpoint
    python generate.py --ckpt runs/train --minutes 10 --mimi tokenizer.safetensors --out talk.wav
    python generate.py --prompt start.wav --minutes 5     # continue a recording
    python generate.py --ckpt demo_text --minutes 2 --text_out t.txt   # and what it says, as text

Per frame: one backbone step (windowed attention + TTT, constant-size state), the depth decoder
over the frame's codebooks, and, with Mimi weights, one streaming Mimi decode step whose audio is
appended to the wav file. The wav header is rewritten as the file grows, so an interrupted run
(Ctrl-C included) leaves a valid file with everything made so far; Ctrl-C and SIGTERM also stop
the run cleanly, writing the codes file with every frame made. Memory stays flat: nothing grows
with the length of the conversation.

With a text stream (a model trained on `python data.py align` or `synthetic --text` data),
--text_out writes the words as they are made, `seconds<TAB>word` a line (with a text stream per
speaker, `seconds<TAB>stream<TAB>word`), decoded with tokenizer.model from the checkpoint's folder.

--mode minibatch recomputes the current TTT mini-batch with the chunked (dual) form at every
frame, as a TTT implementation without the streaming form would; it gives the same codes as the
default one-step streaming form, more slowly.
"""
import argparse
import contextlib
import math
import os
import resource
import signal
import struct
import sys
import threading
import time

import numpy as np
import torch

from codes import CodesFile, CodesFormatError, CodesWriter
from data import TextDecoder, Tokenizer
from model import (SpeechLM, default_device, delay, depth_kernels_unsupported, step_kernels_unsupported, tree_leaves,
                   tree_map)

HERE = os.path.dirname(os.path.abspath(__file__))
DEMO_CKPT = os.path.join(HERE, "demo", "model.safetensors")
FRAME_RATE = 12.5
SAMPLE_RATE = 24_000
AUDIO_CHUNK = 25      # frames decoded and written at a time (2 s): Mimi's cost per frame falls with the chunk


class Sampler:
    """Temperature / top-k / top-p sampling, text and audio set apart. The random numbers of a
    frame are drawn at once (one exponential draw per column and vocabulary entry), so any way of
    computing the logits consumes them in the same order: sampling is argmax(p / Exp(1)), exact and
    sync-free. Top-k keeps every entry at least as large as the k-th largest."""

    def __init__(self, cfg, temp=0.8, top_k=250, top_p=1.0, text_temp=0.7, text_top_k=25, text_top_p=1.0,
                 generator=None):
        for name, t, k, p in (("", temp, top_k, top_p), ("text_", text_temp, text_top_k, text_top_p)):
            if not (t >= 0 and k >= 0 and 0 < p <= 1):
                raise ValueError(f"sampling needs --{name}temp >= 0 (0: greedy), --{name}top_k >= 0 (0: off) and "
                                 f"0 < --{name}top_p <= 1 (1: off); got {t}, {k} and {p}")
        self.cfg, self.g = cfg, generator
        self.audio = (temp, top_k, top_p)
        self.text = (text_temp, text_top_k, text_top_p)

    def new_frame(self, B, device):
        # Exp(1) as -log(u), u uniform in [2^-40, 1): positive and finite (and on a CPU, 6x quicker
        # to draw than exponential_, which would cost generate.py a tenth of its speed)
        def exp1(n, V):
            return torch.rand(B, n, V, device=device, generator=self.g).clamp_min_(2 ** -40).log_().neg_()
        self.noise_t = exp1(self.cfg.n_text, self.cfg.text_cardinality)
        self.noise_a = exp1(self.cfg.n_audio, self.cfg.cardinality)

    def params(self, c):
        """Column c's (temperature, top-k, top-p, noise [B, V])."""
        nt = self.cfg.n_text
        return (*self.text, self.noise_t[:, c]) if c < nt else (*self.audio, self.noise_a[:, c - nt])

    def __call__(self, logits, c):
        temp, k, p, noise = self.params(c)
        if temp <= 0:
            return logits.argmax(-1)
        z = logits / temp
        if k and k < z.shape[-1]:                             # keep the top k (and ties with the k-th)
            z = z.masked_fill(z < z.topk(k, -1, sorted=False).values.amin(-1, keepdim=True), -math.inf)
        if p < 1.0:
            zs, order = z.sort(-1, descending=True)
            ps = zs.softmax(-1)
            drop = ps.cumsum(-1) - ps > p                     # keep the smallest set with mass >= p
            z = z.masked_fill(drop.scatter(-1, order, drop), -math.inf)
        return (z.softmax(-1) / noise).argmax(-1)             # argmax p / Exp(1): a sample of p


class FrameStep:
    """One frame: draw the frame's random numbers, backbone step, depth decoder.
    compile fuses kernels with torch.compile: "blocks" (or True) compiles each transformer block on
    its own (quick to compile), "depth" also the depth decoder's loop over the columns, sampling
    included, as one graph (fewer kernels, longer to compile), "kernels" runs the backbone's step and
    the depth decoder's loop as Triton kernels, the TTT branch compiled (CUDA, with cuda_graph: the
    fewest kernels, the fastest; the blocks are compiled for prompts).
    cuda_graph=True captures the whole step once and replays it, the state living in static buffers
    (the step is free of host syncs)."""

    def __init__(self, model, sampler, batch, device, compile=False, cuda_graph=False):
        self.model, self.sampler, self.B, self.device = model, sampler, batch, torch.device(device)
        if compile not in (False, True, "blocks", "depth", "kernels"):
            raise ValueError(f"compile must be False, 'blocks', 'depth' or 'kernels', got {compile!r}")
        if compile == "kernels" and not cuda_graph:
            raise ValueError("the generation kernels are launched 5 times a layer and column: "
                             "capture them as a CUDA graph (--cuda_graph), or use --compile depth")
        if compile == "depth":
            model.compile_depth()
        elif compile == "kernels":
            model.compile_blocks().use_depth_kernels().use_step_kernels(compile_ttt=True)
        elif compile:
            model.compile_blocks()
        self.fn, self.compile = self.eager, compile
        self.cuda_graph, self.graph, self.static = cuda_graph, None, None

    def eager(self, state, force=None):
        self.sampler.new_frame(self.B, self.device)
        return self.model.step(state, self.sampler, force)

    def __call__(self, state, force=None):
        if force is not None:          # the first frames of a delayed model: rare, not worth a graph
            return self.eager(state, force)
        if not self.cuda_graph:
            return self.fn(state)
        if self.graph is None:
            self._capture(state)
        elif state is not self.static:
            _copy(self.static, state)
        self.graph.replay()
        return self.frame.clone(), self.logp.clone(), self.static

    def _capture(self, state):
        self.static = tree_map(lambda t: t.clone(), state)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up (compiles, allocates) off the capture
            for _ in range(3):
                _, _, new = self.fn(self.static)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.frame, self.logp, new = self.fn(self.static)
            _copy(self.static, new)
        _copy(self.static, state)      # capture ran nothing; the warm-up's steps are undone here


def compiled_or_eager(step, model, a, device, sampler):
    """Compile now, on a throwaway frame (the sampler's random numbers are put back), so that a machine
    where torch.compile cannot run (no C++ compiler, say) falls back to eager with a note, not a crash."""
    if not a.quiet:
        print(f"compiling the frame step (--compile {step.compile}; --compile '' skips it)", file=sys.stderr)
    g = sampler.g.get_state() if sampler.g is not None else None
    try:
        with torch.inference_mode():   # as the frames will be made: graphs for the forced first frames, if any,
            state = model.init_state(a.batch, device)   # and for the frames after (with the TTT state)
            if max(model.cfg.col_delays()):
                step(state, torch.full((a.batch, model.cfg.n_cols), -1, dtype=torch.long, device=device))
            step(step(state)[2])
    except Exception as e:  # noqa: BLE001 (any compiler failure)
        print(f"note: torch.compile failed here ({e.__class__.__name__}: {str(e).splitlines()[0][:120]}); "
              "generating without it", file=sys.stderr)
        torch._dynamo.reset()
        model = SpeechLM.from_checkpoint(a.ckpt, device=device).eval().to(getattr(torch, a.dtype))
        step = FrameStep(model, sampler, a.batch, device)
    if g is not None:
        sampler.g.set_state(g)
    return step, model


def _copy(dst, src):
    for a, b in zip(tree_leaves(dst), tree_leaves(src)):
        if a is not b:
            a.copy_(b)


def generate(model, n_frames, sampler, batch=1, prompt=None, mode="streaming", on_frame=None, device="cpu",
             step=None):
    """Make n_frames frames after an optional prompt [B, P, C] (undelayed codes, prefilled through
    the chunked path). on_frame(codes [B, C], logp [B]) receives each finished frame in order:
    the prompt's frames first (logp None), then the generated ones, undelayed. step: a FrameStep
    (default: eager). Returns the state."""
    cfg = model.cfg
    step = step or FrameStep(model, sampler, batch, device)
    dl = cfg.col_delays()
    md = max(dl)
    b = cfg.ttt_mini_batch
    state = model.init_state(batch, device)
    P = 0
    hist = torch.full((batch, md + 1, cfg.n_cols), -1, dtype=torch.long, device=device)  # last md+1 delayed frames
    force = None
    if prompt is not None:
        P = prompt.shape[1]
        d = delay(prompt, cfg)                                       # [B, P, C] delayed
        for t in range(0, P, cfg.window):                            # chunked prefill, a window at a time
            state = model.prefill(d[:, t:t + cfg.window], state)
        for t in range(P):
            on_frame and on_frame(prompt[:, t], None)
        tail = prompt[:, -md:] if md else prompt[:, :0]
    mb_state, mb_frames = state, []
    for t in range(n_frames + md):
        # delayed columns not yet started are forced: the prompt's values, or the initial token
        force = None
        if t < md:
            force = torch.full((batch, cfg.n_cols), -1, dtype=torch.long, device=device)
            for c, dc in enumerate(dl):
                if t < dc:
                    force[:, c] = tail[:, md - dc + t, c] if prompt is not None else cfg.col_cards()[c]
        if mode == "streaming":
            frame, logp, state = step(state, force)
        else:
            sampler.new_frame(batch, device)
            if (P + t) % b == 0:                                      # a new TTT mini-batch starts here
                mb_state, mb_frames = state, []
            inp = torch.stack([mb_state.prev] + mb_frames, 1)        # frames since the mini-batch start
            h, st = model.backbone(model.frame_emb(inp), mb_state)
            frame, logp, state = model.depth_sample(h[:, -1], sampler, st, force)
            mb_frames.append(frame)
        hist = torch.cat([hist[:, 1:], frame[:, None]], 1)
        if t >= md and on_frame is not None:                         # undelay: column c of frame t-md
            out = torch.stack([hist[:, dc, c] for c, dc in enumerate(dl)], 1)
            on_frame(out, logp)
    return state


class WavWriter:
    """16-bit PCM wav appended chunk by chunk; the header's sizes are rewritten after each chunk,
    so the file on disk is always a valid wav of everything written so far."""

    def __init__(self, path, channels, rate=SAMPLE_RATE):
        self.path, self.ch, self.rate, self.n = path, channels, rate, 0
        self.f = open(path, "wb")
        self._header()

    def _header(self):
        data = self.n * self.ch * 2
        self.f.seek(0)
        self.f.write(b"RIFF" + struct.pack("<I", 36 + data) + b"WAVEfmt " +
                     struct.pack("<IHHIIHH", 16, 1, self.ch, self.rate, self.rate * self.ch * 2, self.ch * 2, 16) +
                     b"data" + struct.pack("<I", data))
        self.f.seek(0, 2)

    def write(self, x):  # x [samples, channels] float in [-1, 1]
        pcm = (np.clip(x, -1, 1) * 32767).round().astype("<i2")
        self.f.write(pcm.tobytes())
        self.n += len(x)
        self._header()
        self.f.flush()

    def close(self):
        self.f.close()


class TranscriptWriter:
    """The words of conversation 0's text streams, written as they are made: one line per word
    with its start time (the frame of its first piece), in order of start time across streams,
    flushed after every chunk so that an interrupted run keeps what was said."""

    def __init__(self, path, tok, n_text):
        self.f = open(path, "w", encoding="utf-8")
        self.dec = [TextDecoder(tok) for _ in range(n_text)]
        self.done = []                                   # finished words not yet written: (frame, stream, word)

    def add(self, text):
        """text [n, n_text]: the text columns of the next n frames (numpy, on the host)."""
        for row in text.tolist():
            for s, d in enumerate(self.dec):
                w = d.push(row[s])
                if w:
                    self.done.append((w[0], s, w[1]))
        # a word can go out once no word still being spelt in another stream starts before it
        self._write(min([d.start for d in self.dec if d.ids] + [self.dec[0].t]))

    def _write(self, before):
        out = sorted(w for w in self.done if w[0] < before)
        self.done = [w for w in self.done if w[0] >= before]
        for t, s, word in out:
            col = f"{s}\t" if len(self.dec) > 1 else ""
            self.f.write(f"{t / FRAME_RATE:.2f}\t{col}{word}\n")
        self.f.flush()

    def close(self):
        for s, d in enumerate(self.dec):
            w = d.finish()
            if w:
                self.done.append((w[0], s, w[1]))
        self._write(math.inf)
        self.f.close()


def text_tokenizer(ckpt, cfg):
    """The sentencepiece model saved beside a checkpoint (train.py copies it there)."""
    folder = ckpt if os.path.isdir(ckpt) else os.path.dirname(os.path.abspath(ckpt))
    path = os.path.join(folder, "tokenizer.model")
    if not cfg.n_text:
        raise ValueError(f"--text_out: {ckpt!r} has no text stream (it was trained on codes without text); drop "
                         "--text_out, or train on data with text (python data.py align / synthetic --text)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--text_out needs the model's text tokenizer at {path!r}; copy there the "
                                "sentencepiece model its data was aligned with (the codes file's .spm.model)")
    tok = Tokenizer(path)
    if tok.n != cfg.text_cardinality:
        raise ValueError(f"{path!r} has {tok.n} pieces but the model's text stream has {cfg.text_cardinality}: "
                         "it is the tokenizer of another model")
    return tok


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def minutes_arg(s):
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--minutes must be a number, got {s!r}")
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"--minutes must be a positive number of minutes, got {s!r}")
    return v


def writable(path, what):
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"cannot write {what} {path!r}: folder {folder!r} does not exist")
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise ValueError(f"cannot write {what} {path!r}: permission denied")
    if os.path.isdir(path):
        raise ValueError(f"cannot write {what} {path!r}: it is a folder")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=minutes_arg, default=1.0, help="length to generate (default 1)")
    ap.add_argument("--ckpt", default=DEMO_CKPT, help="model checkpoint (.safetensors or a train.py run folder)")
    ap.add_argument("--mimi", default="", help="Mimi weights; default: looked up in the Hugging Face cache")
    ap.add_argument("--out", default="generated.wav", help="wav to write (stereo: one speaker per channel)")
    ap.add_argument("--codes_out", default="generated_codes.bin", help="codes file to write")
    ap.add_argument("--text_out", default="", help="transcript to write, as it is made (models with a text "
                    "stream; conversation 0, like --codes_out)")
    ap.add_argument("--prompt", default="", help="a wav or codes file to continue")
    ap.add_argument("--mode", default="streaming", choices=["streaming", "minibatch"])
    ap.add_argument("--temp", type=float, default=0.8, help="audio sampling temperature (0: greedy)")
    ap.add_argument("--top_k", type=int, default=250, help="audio top-k (0: off)")
    ap.add_argument("--top_p", type=float, default=1.0, help="audio top-p (1: off)")
    ap.add_argument("--text_temp", type=float, default=0.7)
    ap.add_argument("--text_top_k", type=int, default=25)
    ap.add_argument("--text_top_p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=1, help="conversations generated at once")
    ap.add_argument("--device", default="", help="cuda, mps or cpu (default: the best there is)")
    ap.add_argument("--compile", nargs="?", const="blocks", default="auto",
                    choices=["auto", "", "blocks", "depth", "kernels"],
                    help="torch.compile the frame step: each block (`--compile`, quick), or also the depth "
                         "decoder's loop as one graph (`--compile depth`: fewer kernels; on a GPU minutes to "
                         "compile), or the backbone's step and the depth decoder's loop as Triton kernels "
                         "(`--compile kernels`, CUDA with --cuda_graph: the fastest); auto (default): depth on a CPU for 5 minutes "
                         "or more, kernels with --cuda_graph, else off; '' off")
    ap.add_argument("--cuda_graph", action="store_true", help="capture the frame step as a CUDA graph (CUDA only)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="the model's weights and activations (the TTT state stays float32); bfloat16 on a GPU")
    ap.add_argument("--quiet", action="store_true")
    return ap.parse_args(argv)


def main(argv=None):
    a = parse_args(argv)
    try:
        return run(a)
    except (ValueError, FileNotFoundError, CodesFormatError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def run(a):
    device = default_device(a.device)
    if a.batch < 1:
        raise ValueError(f"--batch must be at least 1, got {a.batch}")
    writable(a.codes_out, "codes")
    model = SpeechLM.from_checkpoint(a.ckpt, device=device).eval().to(getattr(torch, a.dtype))
    cfg = model.cfg
    tok = None
    if a.text_out:
        tok = text_tokenizer(a.ckpt, cfg)
        writable(a.text_out, "transcript")
    torch.manual_seed(a.seed)

    # Mimi, for audio in and out
    import mimi as mimi_mod
    mimi_path = a.mimi or mimi_mod.find_checkpoint()
    codec = None
    if mimi_path:
        writable(a.out, "audio")
        codec = mimi_mod.Mimi.from_pretrained(mimi_path, num_codebooks=min(cfg.n_codebooks, 32), device=device)
        if cfg.cardinality != codec.cfg.bins or cfg.n_codebooks > codec.cfg.n_q:
            raise ValueError(f"this model makes {cfg.n_codebooks} codebooks of {cfg.cardinality}; the Mimi weights "
                             f"{mimi_path!r} have {codec.cfg.n_q} of {codec.cfg.bins}: they do not fit")

    prompt = None
    if a.prompt:
        prompt = load_prompt(a.prompt, cfg, codec, device).expand(a.batch, -1, -1)
    n_frames = int(round(a.minutes * 60 * FRAME_RATE))
    if a.cuda_graph and device.type != "cuda":
        raise ValueError("--cuda_graph needs a CUDA device")
    if a.cuda_graph and a.mode != "streaming":
        raise ValueError("--cuda_graph captures the streaming step: use --mode streaming")
    # a graph replays the default generator's stream; eager runs use their own, seeded, generator
    g = None if a.cuda_graph else torch.Generator(device).manual_seed(a.seed)
    sampler = Sampler(cfg, a.temp, a.top_k, a.top_p, a.text_temp, a.text_top_k, a.text_top_p, generator=g)
    compile = a.compile
    if compile == "auto":  # on a CPU, compiling (about 20 s) pays for itself within a few minutes
        compile = "depth" if device.type == "cpu" and a.minutes >= 5 else ""
        if a.cuda_graph and not depth_kernels_unsupported(model) and not step_kernels_unsupported(model):
            compile = "kernels"
    step = FrameStep(model, sampler, a.batch, device, compile=compile or False, cuda_graph=a.cuda_graph)
    if compile and not a.cuda_graph:
        step, model = compiled_or_eager(step, model, a, device, sampler)

    stack = contextlib.ExitStack()
    writer = CodesWriter(a.codes_out, **{k: getattr(cfg, k) for k in ("n_streams", "n_codebooks", "cardinality",
                                                                       "n_text", "text_cardinality")})
    transcript = TranscriptWriter(a.text_out, tok, cfg.n_text) if tok is not None else None
    wavs = []
    if codec is not None:
        stem, ext = os.path.splitext(a.out)
        names = [a.out] if a.batch == 1 else [f"{stem}_{i}{ext}" for i in range(a.batch)]
        wavs = [WavWriter(n, cfg.n_streams) for n in names]
        stack.enter_context(codec.streaming(a.batch * cfg.n_streams))
    made, t0, last_print = [0], time.time(), [0.0]
    mem1 = [None]
    total = n_frames + (prompt.shape[1] if prompt is not None else 0)
    buf = []

    def flush():
        if not buf:
            return
        chunk = torch.stack(buf, 1)                                  # [B, n, C]
        buf.clear()
        writer.extend(chunk[0].cpu().numpy())                        # the codes file holds conversation 0
        if transcript is not None:                                   # and so does the transcript
            transcript.add(chunk[0, :, :cfg.n_text].cpu().numpy())
        if codec is not None:
            audio = chunk[..., cfg.n_text:].reshape(a.batch, -1, cfg.n_streams, cfg.n_codebooks)
            audio = audio.permute(0, 2, 3, 1).reshape(a.batch * cfg.n_streams, cfg.n_codebooks, -1)
            wav = codec.decode(audio).view(a.batch, cfg.n_streams, -1).float().cpu().numpy()
            for w, x in zip(wavs, wav):
                w.write(x.T)
        made[0] += chunk.shape[1]
        hold_signals()

    def on_frame(frame, logp):
        if stop[0] is not None:
            raise KeyboardInterrupt
        buf.append(frame)
        if len(buf) == AUDIO_CHUNK:                                  # write two seconds at a time
            flush()
        if made[0] >= 750 and mem1[0] is None:
            mem1[0] = peak_memory_mb(device)
        if not a.quiet and made[0] and time.time() - last_print[0] > 2:
            last_print[0] = time.time()
            el = time.time() - t0
            rtf = made[0] / FRAME_RATE / max(el, 1e-9)
            left = (total - made[0]) / FRAME_RATE / max(rtf, 1e-9)
            print(f"\rminute {made[0] / FRAME_RATE / 60:.1f} of {total / FRAME_RATE / 60:.1f} | "
                  f"{rtf:.1f}x real time | {left / 60:.1f} min left | peak memory {peak_memory_mb(device):.0f} MB ",
                  end="", file=sys.stderr, flush=True)

    interrupted = False

    def on_signal(sig, frame):
        # Ctrl-C or SIGTERM (schedulers, `timeout`, `docker stop`): stop at the next frame, where nothing is
        # half done (an exception raised anywhere could leave a lock held in torch.compile's code); a second
        # signal stops at once, unless it comes within a second (`timeout` and a kill of the process group
        # each deliver it twice)
        if stop[0] is not None:
            if time.monotonic() - stop[0] < 1.0:
                return
            raise KeyboardInterrupt
        stop[0] = time.monotonic()
    stop = [None]   # when the first signal came
    in_main = threading.current_thread() is threading.main_thread()   # (signals can be set there only)

    def hold_signals():
        # (again) at every write: compiling a Triton kernel puts the compiler's (LLVM's) handler in front of
        # ours, one that resets to the default action as it runs, so that a second signal right behind the
        # first would kill the run with its last frames unwritten
        return {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)} if in_main else {}
    old = hold_signals()
    try:
        with torch.inference_mode():
            generate(model, n_frames, sampler, a.batch, prompt, a.mode, on_frame, device, step)
            flush()
    except KeyboardInterrupt:
        interrupted = True
        with torch.inference_mode():
            flush()
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        stack.close()
        writer.close()
        if transcript is not None:
            transcript.close()
        for w in wavs:
            w.close()
    el = time.time() - t0
    if not a.quiet:
        print(file=sys.stderr)
    mem_end = peak_memory_mb(device)
    note = " (interrupted)" if interrupted else ""
    print(f"{made[0]} frames ({made[0] / FRAME_RATE / 60:.2f} min) in {el:.1f}s, "
          f"{made[0] / FRAME_RATE / max(el, 1e-9):.1f}x real time{note}; codes: {a.codes_out}"
          + (f"; audio: {', '.join(w.path for w in wavs)}" if wavs else "")
          + (f"; transcript: {a.text_out}" if transcript is not None else ""))
    if mem1[0] is not None:
        print(f"peak memory after minute 1: {mem1[0]:.1f} MB; at the end: {mem_end:.1f} MB "
              f"({(mem_end - mem1[0]) / mem1[0]:+.2%})")
    if codec is None:
        print("no Mimi weights found, so no audio: get them with `huggingface-cli download kyutai/mimi "
              "model.safetensors` and pass --mimi PATH (or decode later: python mimi.py decode "
              f"{a.codes_out} --out out.wav)")
    return made[0]


def load_prompt(path, cfg, codec, device):
    """A prompt as undelayed codes [1, P, C]: a codes file (its first conversation) or audio."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompt {path!r} does not exist")
    with open(path, "rb") as f:
        magic = f.read(8)
    if magic == b"CONVCODE":
        f = CodesFile(path)
        want = {k: getattr(cfg, k) for k in ("n_streams", "n_codebooks", "cardinality", "n_text", "text_cardinality")}
        have = {k: getattr(f, k) for k in want}
        if have != want:
            raise ValueError(f"prompt {path!r} holds frames of {have}; the model takes {want}")
        return torch.from_numpy(np.asarray(f.conversation(0), dtype=np.int64))[None].to(device)
    if codec is None:
        raise ValueError(f"prompt {path!r} is audio: encoding it needs Mimi weights (--mimi PATH)")
    if cfg.n_text:
        raise ValueError("this model has a text stream: give the prompt as a codes file with text")
    import mimi as mimi_mod
    wav = mimi_mod.load_audio(path)                                 # [channels, samples] at 24 kHz
    if wav.shape[0] != cfg.n_streams:
        raise ValueError(f"prompt {path!r} has {wav.shape[0]} channel(s); the model has {cfg.n_streams} "
                         "streams (one speaker per channel)")
    codes = codec.encode(torch.as_tensor(wav, device=device)[:, None])   # [S, K, F]
    return codes.permute(2, 0, 1).reshape(1, codes.shape[-1], -1)


if __name__ == "__main__":
    main()
