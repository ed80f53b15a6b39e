"""
Mimi speed and memory: ours (mimi.py) next to the official package (moshi 0.2.13), in one run.

    python bench/mimi.py --device cuda --minutes 1 5        # GPU: the README figures
    python bench/mimi.py --device cpu --minutes 0.1 0.5     # a quick CPU run
    python bench/mimi.py --no-official                      # ours only (moshi not installed)

Full-size Mimi, random weights: the official model is built from moshi's loaders config, given
non-degenerate codebooks (scripts/make_mimi_fixtures.py) and saved in the Moshi layout, and ours
loads that file, so both run the same weights. Without moshi, ours gets random weights of its own.
Rows: batch encode and decode time per minute of audio and the peak memory of each call (CUDA: the
allocator's peak above what was allocated before the call; CPU: sampled resident memory above the
level before the call); streaming encode and decode time per 80 ms frame at batch 1, synchronised
every frame as a live loop is (median); how many codes agree with the official ones. Float32, TF32
off unless --tf32 (cuDNN turns it on for convolutions by default, which moves codes; ours turns it
off inside its calls whatever the setting, so --tf32 changes the official package only).
"""
import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
if sys.platform.startswith("linux") and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
    # glibc keeps freed blocks below its (self-raising) mmap threshold, so resident memory would hide
    # the peaks of later calls; pin the threshold so big tensors go back to the OS, and start again
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(1 << 17)
    os.execv(sys.executable, [sys.executable] + sys.argv)

import torch  # noqa: E402

import mimi  # noqa: E402
from mimi import FRAME_SIZE, Mimi, MimiConfig  # noqa: E402
from scripts import make_mimi_fixtures as fx  # noqa: E402
from bench.prof import kernel_table  # noqa: E402


def sync(device):
    """Wait for the GPU (main makes `device` the current one: synchronize(device) would switch devices in
    every timed frame)."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Peak:
    """Peak memory (MiB) of the block above the level at its start."""

    def __init__(self, device):
        self.device, self.mib = device, float("nan")

    def __enter__(self):
        sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        elif os.path.exists("/proc/self/statm"):
            self.base = self.peak = rss()
            self.done = False
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while not self.done:
            self.peak = max(self.peak, rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        sync(self.device)
        if self.device.type == "cuda":
            self.mib = (torch.cuda.max_memory_allocated(self.device) - self.base) / 2 ** 20
        elif hasattr(self, "thread"):
            self.done = True
            self.thread.join()
            self.mib = (max(self.peak, rss()) - self.base) / 2 ** 20


def timed(fn, device, repeats):
    times, out = [], None
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def per_frame(step, chunks, device, warmup=5):
    """(median seconds per call of step(chunk), synchronising after each, after a few warm-up calls;
    the outputs)."""
    times, outs = [], []
    for i, c in enumerate(chunks):
        sync(device)
        t = time.perf_counter()
        outs.append(step(c))
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return statistics.median(times), outs


def build(args, device):
    """(ours, official or None, note)"""
    calib = fx.calibration()
    if not args.no_official:
        try:
            official = fx.moshi_mimi(MimiConfig(), seed=0, calib=calib)
        except ImportError as e:
            print(f"official package unavailable ({e}); timing ours only", file=sys.stderr)
        else:
            official.set_num_codebooks(args.num_codebooks)
            with tempfile.TemporaryDirectory() as d:
                fx.save_moshi(official, os.path.join(d, "mimi.safetensors"))
                ours = Mimi.from_pretrained(os.path.join(d, "mimi.safetensors"), args.num_codebooks, device=device)
            return ours, official.to(device), "same random weights (Moshi layout file)"
    return fx.ours_random(MimiConfig(), seed=0, calib=calib, num_codebooks=args.num_codebooks).to(device), None, \
        "random weights, ours only"


def attempt(results, key, fn):
    try:
        results[key] = fn()
    except Exception as e:  # report and carry on, so one run gives every figure it can
        traceback.print_exc()
        results[key] = f"failed: {type(e).__name__}"


def bench_batch(res, name, encode, decode, x, minutes, device):
    """One encode and one decode of x (the warm-up), with the peak memory of each; -> (codes, audio)."""
    with Peak(device) as p:
        codes = encode(x)
    res[(name, "enc_mib", minutes)] = p.mib
    with Peak(device) as p:
        audio = decode(codes)
    res[(name, "dec_mib", minutes)] = p.mib
    return codes, audio


def time_batch(res, calls, minutes, device, repeats):
    """Median time per minute of audio of each (name, what) -> call, the implementations alternated in each
    repeat (the order reversed every other one), so that a slow spell of the host weighs on both alike."""
    times = {k: [] for k in calls}
    names = list(dict.fromkeys(n for n, _ in calls))
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            for (n, what), fn in calls.items():
                if n == name:
                    times[(n, what)].append(timed(fn, device, 1)[0])
    for (n, what), ts in times.items():
        res[(n, what + "_ms", minutes)] = statistics.median(ts) * 1e3 / minutes
    for n in names:
        print(f"{n:9s} {minutes:g} min: encode {res[(n, 'enc_ms', minutes)]:.1f} ms/min, decode "
              f"{res[(n, 'dec_ms', minutes)]:.1f} ms/min, peak {res[(n, 'enc_mib', minutes)]:.0f} / "
              f"{res[(n, 'dec_mib', minutes)]:.0f} MiB", flush=True)


def bench_stream(res, name, model, frames, codes, device, kw, profile=False):
    chunks = [frames[..., i * FRAME_SIZE:(i + 1) * FRAME_SIZE] for i in range(frames.shape[-1] // FRAME_SIZE)]
    cols = [codes[..., i:i + 1] for i in range(codes.shape[-1])]
    kw = dict(kw)
    mimi.STEP_KERNELS = kw.pop("step_kernels", True)  # read when a stream opens
    mimi.CONV_KERNELS = kw.pop("conv_kernels", True)
    if kw.get("compile"):  # compile afresh for each row: Dynamo's cache is per code object, not per Mimi
        torch._dynamo.reset()
    with torch.no_grad():
        for key, step, xs in (("s_enc", "encode", chunks), ("s_dec", "decode", cols)):
            with model.streaming(1, **kw):
                t, outs = per_frame(getattr(model, step), xs, device)
                res[(name, key, 0)] = t * 1e3
                if step == "encode":  # against the float32 batch codes of the same audio
                    res[(name, "s_same", 0)] = (torch.cat(outs, -1) == codes[..., :len(outs)]).float().mean().item()
                graphs = [g for k, (_, _, g) in (getattr(model, "_graphs", None) or {}).items() if k[0] == step]
                if graphs:  # the GPU's part of a frame: its graph replayed back to back (the stream moves on)
                    res[(name, key + "_gpu", 0)] = replay_ms(graphs[0], device)
                if profile:
                    profile_stream(f"{name}, streaming {step}", getattr(model, step), xs[:20], device)
    print(f"{name:18s} streaming: encode {res[(name, 's_enc', 0)]:.3f} ms/frame, decode "
          f"{res[(name, 's_dec', 0)]:.3f} ms/frame; codes equal to ours in batch (float32): "
          f"{100 * res[(name, 's_same', 0)]:.2f}%", flush=True)


def replay_ms(graph, device, n=100):
    """GPU milliseconds per replay of a CUDA graph, n replays back to back."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    sync(device)
    start.record()
    for _ in range(n):
        graph.replay()
    end.record()
    sync(device)
    return start.elapsed_time(end) / n


def profile_stream(title, step, xs, device):
    """The kernels of one streaming frame (CUDA graph replays included), averaged over len(xs) frames."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for x in xs:
            step(x)
        sync(device)
    kernel_table(prof, len(xs), title, limit=25)


def profile_batch(name, model, x, device):
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.no_grad(), profile(activities=acts) as prof:
        model.decode(model.encode(x))
        sync(device)
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    print(f"\n### {name}: one batch encode + decode of {x.shape[-1] / 24000 / 60:g} min, top ops\n")
    print(prof.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=50), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--minutes", type=float, nargs="+", default=[1, 5], help="audio lengths for the batch rows")
    p.add_argument("--frames", type=int, default=100, help="frames timed one by one for the streaming rows")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed batch runs of each implementation, alternated, median (default: cuda 9, cpu 1)")
    p.add_argument("--num_codebooks", type=int, default=8)
    p.add_argument("--no-official", action="store_true", help="skip the official package")
    p.add_argument("--no-cuda-graph", action="store_true", help="skip our CUDA-graph streaming rows")
    p.add_argument("--no-compile", action="store_true", help="skip our CUDA graph + torch.compile streaming row")
    p.add_argument("--tf32", action="store_true", help="allow TF32 matmuls and convolutions on CUDA (the official package; ours stays float32)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--bf16_stream", action="store_true",
                   help="also time streaming with the weights in bfloat16 (CUDA graph + compile)")
    p.add_argument("--profile", action="store_true",
                   help="also print where the time of one batch encode + decode goes (top kernels), per implementation")
    p.add_argument("--profile_stream", action="store_true",
                   help="also print the kernels of a streaming frame for each of our rows (CUDA)")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    repeats = args.repeats or (9 if device.type == "cuda" else 1)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; TF32 {'on' if args.tf32 else 'off'}", flush=True)
    t = time.time()
    ours, official, note = build(args, device)
    print(f"built full-size Mimi, {note}, {args.num_codebooks} codebooks, in {time.time() - t:.0f} s", flush=True)

    res, impls = {}, [("ours", ours)] + ([("official", official)] if official is not None else [])
    for minutes in args.minutes:
        x = torch.from_numpy(fx.signal(minutes * 60))[None, None].to(device)
        x = x[..., :x.shape[-1] // FRAME_SIZE * FRAME_SIZE]
        out, calls = {}, {}
        for impl, model in impls:
            def enc(x, model=model):
                with torch.no_grad():
                    return model.encode(x)

            def dec(c, model=model):
                with torch.no_grad():
                    return model.decode(c)
            attempt(out, impl, lambda: bench_batch(res, impl, enc, dec, x, minutes, device))
            if isinstance(out[impl], tuple):
                calls[(impl, "enc")] = lambda enc=enc: enc(x)
                calls[(impl, "dec")] = lambda dec=dec, c=out[impl][0]: dec(c)
        time_batch(res, calls, minutes, device, repeats)
        if official is not None and all(isinstance(out.get(k), tuple) for k in ("ours", "official")):
            (c_ours, _), (c_off, a_off) = out["ours"], out["official"]
            res[("cmp", "codes", minutes)] = (c_ours == c_off).float().mean().item()
            with torch.no_grad():
                a = ours.decode(c_off)
            res[("cmp", "rel", minutes)] = ((a - a_off).norm() / a_off.norm()).item()
            print(f"codes equal to official at {minutes:g} min: {100 * res[('cmp', 'codes', minutes)]:.3f}%, "
                  f"decoded rel err {res[('cmp', 'rel', minutes)]:.1e}", flush=True)
        if args.profile and minutes == args.minutes[0]:
            for impl, model in impls:
                profile_batch(impl, model, x, device)
        del out, x

    x = torch.from_numpy(fx.signal((args.frames + 5) / 12.5))[None, None].to(device)
    codes = ours.encode(x)
    streams = [("ours", ours, {})]
    if device.type == "cuda" and not args.no_cuda_graph:
        streams.append(("ours+graph", ours, dict(cuda_graph=True)))
        if not args.no_compile:  # compiles on first use: a minute or two
            streams.append(("ours+graph+compile", ours, dict(cuda_graph=True, compile=True)))
            import copy
            if mimi.step_kernels_supported(device):  # the same without the transformer's step kernels
                streams.append(("ours+graph+compile, no step kernels", copy.deepcopy(ours),
                                dict(cuda_graph=True, compile=True, step_kernels=False)))
            if mimi.conv_kernels_supported(device):  # the same without the SEANets' conv kernel
                streams.append(("ours+graph+compile, no conv kernel", copy.deepcopy(ours),
                                dict(cuda_graph=True, compile=True, conv_kernels=False)))
            if args.bf16_stream:  # the weights in bfloat16, as Kyutai's bf16 checkpoint runs
                half = copy.deepcopy(ours).to(torch.bfloat16)
                half.quantizer.float().refresh()  # as from_pretrained(dtype=...): codes picked in float32
                streams.append(("ours+graph+compile bf16", half, dict(cuda_graph=True, compile=True)))
    streams += [(n, m, {}) for n, m in impls[1:]]
    for impl, model, kw in streams:
        prof = args.profile_stream and device.type == "cuda"
        attempt(res, (impl, "stream", 0), lambda: bench_stream(res, impl, model, x, codes, device, kw, prof))
    print_table(res, args, name, note, [n for n, _, _ in streams])


def print_table(res, args, device_name, note, stream_names):
    def cell(key, fmt):
        v = res.get(key)
        return "-" if v is None else v if isinstance(v, str) else format(v, fmt)

    have_off = any(k[0] == "official" for k in res)
    print(f"\n### Mimi, {device_name}, {args.num_codebooks} codebooks, float32{' + TF32' if args.tf32 else ''}, "
          f"{note}\n")
    print("| | ours | official |\n|---|---:|---:|")
    for m in args.minutes:
        for k, what in [("enc_ms", "batch encode, ms per minute of audio"), ("dec_ms", "batch decode, ms per minute of audio"),
                        ("enc_mib", "peak memory, encode (MiB)"), ("dec_mib", "peak memory, decode (MiB)")]:
            fmt = ".1f" if "ms" in k else ".0f"
            print(f"| {what}, {m:g} min | {cell(('ours', k, m), fmt)} | {cell(('official', k, m), fmt) if have_off else '-'} |")
        if ("cmp", "codes", m) in res:
            print(f"| codes equal to official, {m:g} min | {100 * res[('cmp', 'codes', m)]:.3f}% | |")
            print(f"| decoded audio rel. err. vs official, {m:g} min | {res[('cmp', 'rel', m)]:.1e} | |")
    for k, what in [("s_enc", "streaming encode, batch 1, ms per frame"), ("s_dec", "streaming decode, batch 1, ms per frame")]:
        ours = cell(("ours", k, 0), ".3f")
        if "ours+graph" in stream_names:
            ours += f"; CUDA graph {cell(('ours+graph', k, 0), '.3f')}"
        if "ours+graph+compile" in stream_names:
            ours += f"; + compile {cell(('ours+graph+compile', k, 0), '.3f')}"
        if "ours+graph+compile, no step kernels" in stream_names:
            ours += f" (without the step kernels {cell(('ours+graph+compile, no step kernels', k, 0), '.3f')})"
        if "ours+graph+compile, no conv kernel" in stream_names:
            ours += f" (without the conv kernel {cell(('ours+graph+compile, no conv kernel', k, 0), '.3f')})"
        if "ours+graph+compile bf16" in stream_names:
            ours += f"; + bf16 {cell(('ours+graph+compile bf16', k, 0), '.3f')}"
        failed = [cell((n, "stream", 0), "") for n in stream_names if isinstance(res.get((n, "stream", 0)), str)]
        print(f"| {what} | {ours} | {cell(('official', k, 0), '.3f') if have_off else '-'} |"
              + (f" {'; '.join(failed)}" if failed and k == "s_enc" else ""))
        gpu = [(n, res[(n, k + "_gpu", 0)]) for n in stream_names if (n, k + "_gpu", 0) in res]
        if gpu:
            print(f"| {what.replace('batch 1, ms per frame', 'GPU part (graph replays back to back), ms')} | "
                  + "; ".join(f"{n.replace('ours+', '')} {v:.3f}" for n, v in gpu) + " | - |")
    same = [(n, res[(n, "s_same", 0)]) for n in stream_names if (n, "s_same", 0) in res]
    if same:
        print("| streaming codes equal to our float32 batch codes | "
              + "; ".join(f"{n.replace('ours+', '') if n != 'ours' else 'plain'} {100 * v:.2f}%" for n, v in same
                          if n != "official")
              + f" | {cell(('official', 's_same', 0), '.2%') if have_off else '-'} |")


if __name__ == "__main__":
    main()
