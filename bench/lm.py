"""
Speed of the speech LM on a GPU: training throughput, the per-frame step, and generation with
Mimi decoding. Random weights, random codes (the speed does not depend on the values).

    python bench/lm.py train        # forward+backward frames/s and MFU, bf16 autocast
    python bench/lm.py step         # per-frame backbone step at batch 1: eager, CUDA graph, compiled
    python bench/lm.py generate     # whole frames (backbone + depth decoder + Mimi decode)
    python bench/lm.py profile --mode minibatch --batch 48   # the top kernels of a training step
    python bench/lm.py profile_generate                      # a frame's parts and kernels at batch 1
    python bench/lm.py all

Each section prints a markdown table; `--presets` and `--quick` shrink the work (`--quick` also
runs on a CPU, for the tests).
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# the allocator grows segments rather than reserving fixed blocks: a step of varied activation sizes near
# the GPU's memory fragments it otherwise (the small preset at 128 x 256 frames a step peaks at 73 GiB on an H100)
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
import torch  # noqa: E402

from generate import AUDIO_CHUNK, FrameStep, Sampler  # noqa: E402
import model as model_mod  # noqa: E402
from model import Config, SpeechLM, detach_state, flops_per_frame, loss_fn, tree_leaves, tree_map  # noqa: E402
from train import H100_BF16_FLOPS  # noqa: E402

from bench.prof import kernel_table  # noqa: E402

FRAME_S = 1 / 12.5


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def peak_gb(dev):
    return torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else float("nan")


def reset_peak(dev):
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def build(preset, dev, dtype, quick):
    over = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden=128, ttt_heads=2, depth_dim=32,
                depth_layers=1, depth_heads=2, window=32, ttt_mini_batch=16, n_ttt=1) if quick else {}
    cfg = Config.preset(preset, **over)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)   # build directly in the target dtype: a 7B model never exists in fp32
    with torch.device(dev):
        m = SpeechLM(cfg)
    torch.set_default_dtype(old)
    return m


def codes(cfg, B, T, dev):
    return (torch.rand(B, T, cfg.n_cols, device=dev) * torch.tensor(cfg.col_cards(), device=dev)).long()


# --- training -----------------------------------------------------------------------------------

def bench_train(a, dev):
    rows = []
    B, T = (2, 32) if a.quick else (a.batch, a.seq_len)
    for preset in a.presets:
        for compiled in (["eager"] if a.quick or a.no_compile else ["compiled"] if a.no_eager else ["eager", "compiled"]):
            m = build(preset, dev, torch.float32, a.quick)   # float32 master weights, bf16 autocast
            cfg = m.cfg

            lossf = loss_fn
            if compiled == "compiled":   # as train.py --compile: each block, and the loss
                m.compile_blocks()
                lossf = torch.compile(loss_fn, dynamic=False)

            def fwd_loss(x, state):
                logits, new = m(x, state, keep_state=state is not None)
                return lossf(logits, x, cfg)[0], new
            opt = torch.optim.AdamW(m.parameters(), lr=1e-4, fused=dev.type == "cuda")
            for mode in ("minibatch", "streaming"):
                reset_peak(dev)
                state = m.init_state(B, dev) if mode == "streaming" else None
                x = codes(cfg, B, T, dev)
                ac = torch.autocast(dev.type, torch.bfloat16, enabled=dev.type == "cuda")
                times = []
                try:
                    for i in range(a.warmup + a.iters):
                        sync(dev)
                        t0 = time.perf_counter()
                        with ac:
                            loss, new = fwd_loss(x, state)
                        loss.backward()
                        opt.step()
                        opt.zero_grad(set_to_none=True)
                        if state is not None:
                            state = detach_state(new)
                        sync(dev)
                        times.append(time.perf_counter() - t0)
                except torch.OutOfMemoryError:
                    loss = new = state = None
                    opt.zero_grad(set_to_none=True)
                    rows.append((preset, mode, compiled, f"{m.num_params() / 1e6:.0f}M", "out of memory", "", ""))
                    print(rows[-1], flush=True)
                    continue
                dt = sorted(times[a.warmup:])[len(times[a.warmup:]) // 2]
                fps = B * T / dt
                mfu = fps * flops_per_frame(cfg, T) / H100_BF16_FLOPS
                rows.append((preset, mode, compiled, f"{m.num_params() / 1e6:.0f}M",
                             f"{fps:,.0f}", f"{mfu:.1%}", f"{peak_gb(dev):.1f}"))
                print(rows[-1], flush=True)
            del m, opt
    table(f"Training, forward + backward + AdamW, bf16 autocast, {B} x {T} frames a step",
          ["preset", "mode", "", "params", "frames/s", "MFU", "peak GiB"], rows)


def bench_profile(a, dev):
    """Where a training step's GPU time goes: the top kernels of a few steps (small preset)."""
    from torch.profiler import ProfilerActivity, profile
    B, T = (2, 32) if a.quick else (a.batch, a.seq_len)
    m = build(a.presets[0], dev, torch.float32, a.quick)
    how = "eager" if a.no_compile or a.quick else "compiled"
    lossf = loss_fn
    if how != "eager":   # as train.py --compile
        m.compile_blocks()
        lossf = torch.compile(loss_fn, dynamic=False)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4, fused=dev.type == "cuda")
    x = codes(m.cfg, B, T, dev)
    stream = a.mode == "streaming"
    state = m.init_state(B, dev) if stream else None

    def step(state):
        with torch.autocast(dev.type, torch.bfloat16, enabled=dev.type == "cuda"):
            logits, new = m(x, state, keep_state=state is not None)
            loss, _ = lossf(logits, x, m.cfg)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return detach_state(new) if stream else None
    for _ in range(3):
        state = step(state)
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(3):
        state = step(state)
    sync(dev)
    wall = (time.perf_counter() - t0) / 3
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(3):
            state = step(state)
        sync(dev)
    key = "cuda_time_total" if dev.type == "cuda" else "cpu_time_total"
    what = f"{a.presets[0]}, {a.mode}, {how}, {B} x {T}"
    print(f"\n### Training step profile ({what}), 3 steps; {wall * 1e3:.1f} ms a step unprofiled\n")
    print(prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=60))
    if dev.type == "cuda":
        kernel_table(prof, 3, f"Training step kernels ({what})", limit=30)


@torch.inference_mode()
def bench_profile_generate(a, dev):
    """Where a generated frame's time goes at batch 1: the frame, the backbone step and the depth
    decoder each captured as a CUDA graph and timed, then the kernels of the whole frame."""
    from torch.profiler import ProfilerActivity, profile
    preset = a.presets[0]
    m = build(preset, dev, torch.bfloat16 if dev.type == "cuda" else torch.float32, a.quick).eval()
    graph = dev.type == "cuda"
    sampler = Sampler(m.cfg)
    how = False if a.no_compile else "kernels" if a.depth_kernels else "depth"
    step = FrameStep(m, sampler, 1, dev, cuda_graph=graph, compile=how)
    state = m.prefill(codes(m.cfg, 1, m.cfg.window, dev), m.init_state(1, dev))
    st = [state]

    def frame():
        _, _, st[0] = step(st[0])
    n = 20 if a.quick else a.frames
    rows = [("whole frame", f"{pct(time_each(frame, n, dev), 0.5):.3f}")]
    if graph:
        static = tree_map(lambda t: t.clone(), state)
        if hasattr(m, "_step_weights"):   # the backbone step as kernels
            g = graph_of(m._backbone_step_kernels, static)
        else:
            g = graph_of(lambda s: m.backbone(m.frame_emb(s.prev[:, None]), s), static)
        rows.append(("backbone step", f"{pct(time_each(g.replay, n, dev), 0.5):.3f}"))
        h = torch.randn(1, m.cfg.dim, device=dev, dtype=torch.bfloat16)
        loop = getattr(m, "_depth_fn", None) or m._depth_loop
        sampler.new_frame(1, dev)
        g = graph_of(lambda s: (loop(h, sampler), s), [h])
        rows.append(("depth decoder with sampling", f"{pct(time_each(g.replay, n, dev), 0.5):.3f}"))
    table(f"Frame at batch 1 ({preset}, {how or 'eager'}"
          f"{' + CUDA graph' if graph else ''}), ms, median", ["part", "ms"], rows)
    if graph:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(n):
                frame()
            sync(dev)
        kernel_table(prof, n, f"Kernels of a frame ({preset}, batch 1)", limit=30)


# --- per-frame steps ------------------------------------------------------------------------------

def graph_of(fn, static):
    """Capture fn(static) -> (outputs, new_state) with the state copied back into static."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    saved = tree_map(lambda t: t.clone(), static)
    with torch.cuda.stream(side):
        for _ in range(3):
            fn(static)
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out, new = fn(static)
        for d, s in zip(tree_leaves(static), tree_leaves(new)):
            if d is not s:
                d.copy_(s)
    for d, s in zip(tree_leaves(static), tree_leaves(saved)):
        d.copy_(s)
    return g


def time_each(fn, n, dev, warmup=5):
    """Per-call wall times (host clock, synchronised), warm-up calls excluded."""
    out = []
    for i in range(n + warmup):
        sync(dev)
        t0 = time.perf_counter()
        fn()
        sync(dev)
        out.append(time.perf_counter() - t0)
    return sorted(out[warmup:])


def pct(ts, q):
    return ts[min(len(ts) - 1, int(q * len(ts)))] * 1e3


@torch.inference_mode()
def bench_step(a, dev):
    rows = []
    n = 20 if a.quick else a.frames
    for preset in a.presets:
        m = build(preset, dev, torch.bfloat16 if dev.type == "cuda" else torch.float32, a.quick).eval()
        state = m.init_state(1, dev)
        state = m.prefill(codes(m.cfg, 1, m.cfg.window, dev), state)   # a full cache, as in a long run
        st = [state]

        def bb(s):
            h, s2 = m.backbone(m.frame_emb(s.prev[:, None]), s)
            return h, s2

        def eager():
            _, st[0] = bb(st[0])
        rows.append((preset, "backbone", "eager", f"{pct(time_each(eager, n, dev), 0.5):.2f}"))
        print(rows[-1], flush=True)
        if dev.type == "cuda":
            static = tree_map(lambda t: t.clone(), state)
            g = graph_of(bb, static)
            rows.append((preset, "backbone", "CUDA graph", f"{pct(time_each(g.replay, n, dev), 0.5):.2f}"))
            print(rows[-1], flush=True)
            if not a.no_compile:
                m.compile_blocks()
                static = tree_map(lambda t: t.clone(), state)
                g = graph_of(bb, static)
                rows.append((preset, "backbone", "compiled + graph", f"{pct(time_each(g.replay, n, dev), 0.5):.2f}"))
                print(rows[-1], flush=True)
                if not model_mod.step_kernels_unsupported(m):   # as generate.py --compile kernels --cuda_graph
                    m.use_step_kernels(compile_ttt=True)
                    static = tree_map(lambda t: t.clone(), state)
                    g = graph_of(m._backbone_step_kernels, static)
                    rows.append((preset, "backbone", "kernels + graph", f"{pct(time_each(g.replay, n, dev), 0.5):.2f}"))
                    print(rows[-1], flush=True)
        del m
        reset_peak(dev)
    table("Backbone step, one frame at batch 1 (ms, median); bf16, random weights, full window cache",
          ["preset", "what", "how", "ms"], rows)


@torch.inference_mode()
def bench_generate(a, dev):
    import mimi as mimi_mod
    rows = []
    n = 20 if a.quick else a.frames
    codec = None
    if not a.no_mimi:
        codec = mimi_mod.Mimi(num_codebooks=8).to(dev).eval()
    for preset in a.presets:
        m = build(preset, dev, torch.bfloat16 if dev.type == "cuda" else torch.float32, a.quick).eval()
        cfg = m.cfg
        compiled = False
        hows = ["eager"] if dev.type != "cuda" else a.hows
        for how in hows:
            if "compiled" in how and a.no_compile:
                continue
            if how == "compiled blocks + graph" and not compiled:
                m.compile_blocks()
                compiled = True
            for B in a.batches:
                try:
                    rows.append(gen_row(a, m, codec, preset, how, B, n, dev))
                except Exception as e:  # report, and go on with the other rows
                    rows.append((preset, how, B, f"failed: {e.__class__.__name__}: {str(e)[:80]}", "", "", "", "", ""))
                print(rows[-1], flush=True)
        del m
        reset_peak(dev)
    mim = (f"with Mimi streaming decode, {a.audio_chunk} frames at a time as generate.py" if codec
           else "without Mimi")
    table(f"Generation, whole frames ({mim}); bf16, random weights; frames/s and real-time factor from the "
          "mean time per frame (decoding included), per conversation",
          ["preset", "how", "batch", "ms/frame p50", "p99", "mean", "frames/s", "x real time", "peak GiB"], rows)


def gen_row(a, m, codec, preset, how, B, n, dev):
    cfg = m.cfg
    reset_peak(dev)
    sampler = Sampler(cfg)
    step = FrameStep(m, sampler, B, dev, cuda_graph=dev.type == "cuda",
                     compile={"compiled depth + graph": "depth", "kernels + graph": "kernels"}.get(how, False))
    st = [m.init_state(B, dev)]
    ctx = codec.streaming(B * cfg.n_streams, cuda_graph=dev.type == "cuda") if codec else None
    if ctx:
        ctx.__enter__()

    buf = []

    def frame():  # as generate.py: audio is decoded AUDIO_CHUNK frames at a time
        f, _, st[0] = step(st[0])
        buf.append(f)
        if codec is not None and len(buf) == a.audio_chunk:
            audio = torch.stack(buf, 2)[:, cfg.n_text:]           # [B, C, n]
            codec.decode(audio.reshape(B * cfg.n_streams, cfg.n_codebooks, -1))
        if len(buf) == a.audio_chunk:
            buf.clear()
    ts = time_each(frame, n, dev, warmup=a.audio_chunk + 5)   # the warm-up includes a first Mimi decode
    if ctx:
        ctx.__exit__(None, None, None)
    med, p99, mean = pct(ts, 0.5), pct(ts, 0.99), sum(ts) / len(ts) * 1e3
    return (preset, how, B, f"{med:.2f}", f"{p99:.2f}", f"{mean:.2f}", f"{B / (mean / 1e3):,.0f}",
            f"{FRAME_S / (mean / 1e3):.1f}x", f"{peak_gb(dev):.1f}")


def table(title, head, rows):
    print(f"\n### {title}\n")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(str(x) for x in r) + " |")
    print(flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["train", "step", "generate", "profile", "profile_generate", "all"])
    ap.add_argument("--presets", nargs="+", default=None)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq_len", type=int, default=256)
    ap.add_argument("--mode", choices=["minibatch", "streaming"], default="streaming", help="profile: training mode")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--frames", type=int, default=200)
    ap.add_argument("--no_compile", action="store_true")
    ap.add_argument("--no_eager", action="store_true", help="train: only the compiled rows")
    ap.add_argument("--no_mimi", action="store_true")
    ap.add_argument("--hows", nargs="+", default=["CUDA graph", "compiled blocks + graph", "compiled depth + graph",
                                                  "kernels + graph"],
                    choices=["CUDA graph", "compiled blocks + graph", "compiled depth + graph", "kernels + graph"],
                    help="generate: the ways to run a frame (CUDA only; the CPU runs eager). kernels: as generate.py "
                         "--compile kernels, the backbone step (batch 1) and the depth decoder's loop as Triton "
                         "kernels (SpeechLM.use_step_kernels, use_depth_kernels)")
    ap.add_argument("--depth_kernels", action="store_true",
                    help="profile_generate: the frame as generate.py --compile kernels (the backbone step and the depth "
                         "decoder as Triton kernels), not compiled")
    ap.add_argument("--audio_chunk", type=int, default=AUDIO_CHUNK,
                    help="frames decoded by Mimi at a time (generate.py: %(default)s; 1: every frame)")
    ap.add_argument("--quick", action="store_true", help="tiny shapes, a few iterations (CPU smoke test)")
    ap.add_argument("--attention", choices=["auto", "sdpa"], default="auto",
                    help="auto: steps of a few frames and short sequences (the depth decoder) attend through "
                         "plain products (model.SMALL_ATTENTION, SHORT_SEQUENCE); sdpa: every call goes to "
                         "scaled_dot_product_attention")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args(argv)
    if a.attention == "sdpa":
        model_mod.SMALL_ATTENTION = model_mod.SHORT_SEQUENCE = 0
    dev = torch.device(a.device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        print(torch.cuda.get_device_name(), torch.__version__)
    defaults = {"train": ["small", "qwen2.5-0.5b"], "step": ["small", "qwen2.5-0.5b", "qwen2.5-7b"], "profile": ["small"],
                "profile_generate": ["small"], "generate": ["small", "qwen2.5-0.5b", "qwen2.5-7b"]}
    for what in (["train", "step", "generate"] if a.what == "all" else [a.what]):
        b = argparse.Namespace(**vars(a))
        b.presets = a.presets or (["small"] if a.quick else defaults[what])
        {"train": bench_train, "step": bench_step, "generate": bench_generate, "profile": bench_profile,
         "profile_generate": bench_profile_generate}[what](b, dev)


if __name__ == "__main__":
    main()
