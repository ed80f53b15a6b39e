"""
Train the speech LM on a codes file.

    python train.py --data conv_codes.bin                      # GPU: small preset, streaming mode
    python train.py --data synth.bin --preset demo --max_steps 300 --out_dir demo
    torchrun --nproc_per_node 2 train.py --data conv_codes.bin  # DDP on every GPU given
    torchrun --nproc_per_node 2 train.py --data conv_codes.bin --init_from Qwen2.5-1.5B --fsdp

Two modes:
- minibatch: random windows of seq_len frames inside conversations, fresh state each;
- streaming: each batch row walks one conversation in consecutive chunks and the attention caches
  and TTT states are carried (detached) from step to step, reset when the row moves to its next
  conversation: truncated backpropagation through time over whole conversations, so the TTT
  layers learn to use memory older than one training window.

Every --eval_interval steps the loss over held-out windows is printed; on synthetic data with recall
events (data.py synthetic) also the top-1 accuracy on the recalled values' semantic codes whose first
mention lies in the same window (over all, and within / beyond the attention window of the first
mention), the lookup the experiment's drills teach. Every evaluation also goes to out_dir/evals.json.

A run resumes from out_dir/ckpt.pt where one exists (model, optimizer, step, every row's data
position, the carried states, RNG states); Ctrl-C or SIGTERM writes a checkpoint and stops. Every
option is a field of TrainConfig below or of model.Config (shape overrides), shown by --help.
"""
import argparse
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields

# the allocator grows segments rather than reserving fixed blocks: a step of varied activation sizes near
# the GPU's memory fragments it otherwise (the small preset at 128 x 256 frames a step peaks at 73 GiB on an H100)
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
import numpy as np
import torch

from codes import CodesFile, CodesFormatError
from data import RecallFrames, StreamSampler, WindowSampler, load_events, silence_frame
from model import (Config, SpeechLM, config_from_dict, default_device, detach_state, flops_per_frame, loss_fn,
                   tree_map)

H100_BF16_FLOPS = 989e12  # dense bf16 peak of an H100 SXM, for MFU


@dataclass
class TrainConfig:
    data: str = "conv_codes.bin"   # codes file (python mimi.py encode / python data.py synthetic)
    val_data: str = ""             # held-out codes file; default: hold out whole conversations of --data
    val_conversations: int = 0     # conversations held out of --data for validation; 0: about 5%, at least 1
    out_dir: str = "runs/train"    # checkpoints and logs
    preset: str = ""               # model preset (model.PRESETS); default small on GPU, demo on CPU
    init_from: str = ""            # a Hugging Face Qwen2/Llama directory or one of our checkpoints
    mode: str = "streaming"        # streaming | minibatch
    seq_len: int = 256             # frames per training chunk (12.5 frames per second)
    batch_size: int = 8            # rows per micro-batch, per GPU
    grad_accum: int = 1            # micro-batches per optimizer step
    max_steps: int = 2000
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup: int = 100
    weight_decay: float = 0.1
    beta2: float = 0.95
    grad_clip: float = 1.0          # largest gradient norm (0: no clipping)
    recall_weight: float = 1.0     # loss weight of the recalled values' frames (DATA.events.json of data.py synthetic) against 1
    ttt_write_penalty: float = 0.0  # loss weight of the TTT layers' mean learning-rate gate (it lowers the gate more than the writes)
    ttt_update_penalty: float = 0.0  # loss weight of how far each window moves the TTT fast weights beyond forgetting (ttt.py written), relative to their start
    ttt_update_penalty_power: float = 1.0  # the penalty weighs that move to this power (2: small moves cost little, none is not pulled to 0)
    ttt_half_life_lr_mult: float = 1.0  # learning rate of the learnt half-lives (ttt_half_life_max) over the others'
    eval_interval: int = 250       # steps between evaluations and checkpoints (0: only at the end)
    eval_batches: int = 8
    log_interval: int = 10
    compile: bool = False          # torch.compile the model
    fsdp: bool = False             # shard weights and optimizer state over GPUs (FSDP2), under torchrun
    device: str = ""               # cuda, mps or cpu; default: the best there is
    dtype: str = ""                # bfloat16 (autocast) or float32; default: bfloat16 on CUDA
    seed: int = 1337
    stop_at: int = 0               # stop (with a checkpoint) after this step, as if interrupted
    resume: bool = True            # continue from out_dir/ckpt.pt when it exists
    save: bool = True              # write checkpoints (off for throughput measurements)
    export_dtype: str = "float32"  # dtype of out_dir/model.safetensors (bfloat16 halves its size)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    comments = _field_comments()
    for f in fields(TrainConfig):
        _add(ap, f.name, f.type, f.default, comments.get(f.name, ""))
    model = ap.add_argument_group("model shape overrides (model.Config; default: the preset's)")
    for f in fields(Config):
        if f.name in ("n_streams", "n_codebooks", "cardinality", "n_text", "text_cardinality", "vocab_size",
                      "tie_embeddings", "rope_scaling"):
            continue  # the data file or the loaded checkpoint decides these
        _add(model, f.name, f.type, None, "")
    a = vars(ap.parse_args(argv))
    tc = TrainConfig(**{f.name: a.pop(f.name) for f in fields(TrainConfig)})
    overrides = {k: v for k, v in a.items() if v is not None}
    return tc, overrides


def _bool(s):
    if s.lower() in ("1", "true", "yes", "0", "false", "no"):
        return s.lower() in ("1", "true", "yes")
    raise argparse.ArgumentTypeError(f"{s!r} is not true or false")


def check_config(tc):
    """Numbers that would fail later, deep inside a step, or train on silently: a clear error now."""
    for k in ("seq_len", "batch_size", "grad_accum", "max_steps", "eval_batches", "log_interval"):
        if getattr(tc, k) < 1:
            raise ValueError(f"--{k} must be at least 1, not {getattr(tc, k)}")
    for k in ("warmup", "eval_interval", "val_conversations", "stop_at", "weight_decay", "grad_clip", "min_lr"):
        if getattr(tc, k) < 0:
            raise ValueError(f"--{k} must be 0 or more, not {getattr(tc, k)}")
    if not tc.lr > 0:
        raise ValueError(f"--lr must be > 0, not {tc.lr}")
    if not 0 <= tc.beta2 < 1:
        raise ValueError(f"--beta2 must be in [0, 1), not {tc.beta2}")


def _add(ap, name, typ, default, help):
    help = help.replace("%", "%%")  # argparse formats help strings
    typ = {"int": int, "float": float, "str": str, "bool": bool, "tuple": str}.get(getattr(typ, "__name__", str(typ)), str)
    if typ is bool:
        ap.add_argument(f"--{name}", type=_bool, default=default,
                        metavar="BOOL",
                        help=f"{help} (default {'the preset' if default is None else default})".strip())
    elif name == "silence":
        ap.add_argument(f"--{name}", default=default, metavar="CODES",
                        help="a stream's silence frame, one code per codebook (e.g. 2005,17,...), or 'data': the "
                             "one data.py synthetic wrote beside --data; a silent stream then adds nothing to the "
                             "frame's input (default: none, every frame is embedded)")
    elif name == "delays":
        ap.add_argument(f"--{name}", type=lambda s: tuple(int(x) for x in s.split(",")), default=default,
                        help="per-codebook delays, e.g. 0,1,1,1,1,1,1,1")
    else:
        ap.add_argument(f"--{name}", type=typ, default=default,
                        help=f"{help} (default {'the preset' if default is None else default})".strip())


def _field_comments():
    # help text comes from the comments beside the fields above: one place for both
    import inspect
    out = {}
    for line in inspect.getsource(TrainConfig).splitlines():
        if ":" in line and "#" in line:
            out[line.split(":")[0].strip()] = line.split("#", 1)[1].strip()
    return out

# -----------------------------------------------------------------------------


def fail(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def parse_silence(s, data_path):
    """--silence: 'data' (the frame data.py wrote beside the codes file), codes separated by commas,
    or '' / 'none' (no silence frame)."""
    s = s.strip()
    if s in ("", "none"):
        return ()
    if s == "data":
        try:
            return silence_frame(data_path)
        except ValueError as e:
            raise ValueError(f"--silence 'data': {e}") from None
    try:
        return tuple(int(c) for c in s.split(","))
    except ValueError:
        raise ValueError(f"--silence takes 'data' or codes separated by commas, not {s!r}") from None


def build_model(tc, overrides, data, device):
    """The model for this data: a preset with overrides, our checkpoint, or a HF backbone."""
    shape = dict(n_streams=data.n_streams, n_codebooks=data.n_codebooks, cardinality=data.cardinality,
                 n_text=data.n_text, text_cardinality=data.text_cardinality)
    if "silence" in overrides:
        overrides = {**overrides, "silence": parse_silence(overrides["silence"], tc.data)}
    if tc.init_from:
        p = tc.init_from
        if os.path.isdir(p) and os.path.isfile(os.path.join(p, "config.json")):
            return SpeechLM.from_hf(p, device=device, **{**shape, **overrides})
        if os.path.isfile(p) or os.path.isfile(os.path.join(p, "model.safetensors")):
            model = SpeechLM.from_checkpoint(p, device=device)
            have = {k: getattr(model.cfg, k) for k in shape}
            if have != shape:
                raise ValueError(f"--init_from {p!r} takes frames of {have}, but {tc.data!r} holds {shape}")
            differ = {k: v for k, v in overrides.items() if getattr(model.cfg, k) != v}
            if "ttt_base_lr" in differ:   # no weight depends on it: a model can train on with another
                lr = differ.pop("ttt_base_lr")
                if model.cfg.n_ttt:
                    model.set_ttt_base_lr(lr)
            if "ttt_half_life" in differ or "ttt_half_life_max" in differ:   # nor on this (learnt: new weights)
                frames = differ.pop("ttt_half_life", model.cfg.ttt_half_life)
                max_frames = differ.pop("ttt_half_life_max", model.cfg.ttt_half_life_max)
                if model.cfg.n_ttt:
                    model.set_ttt_half_life(frames, max_frames)
            if differ.get("ttt_forget_gate") and model.cfg.n_ttt:   # new weights that start as no gate
                differ.pop("ttt_forget_gate")
                model.add_ttt_forget_gate()
            if differ:   # a checkpoint keeps its own shape: an override would be ignored, so say so
                raise ValueError(f"--init_from {p!r} has " + ", ".join(f"{k}={getattr(model.cfg, k)!r}" for k in differ)
                                 + ", not " + ", ".join(f"{k}={v!r}" for k, v in differ.items())
                                 + ": a checkpoint keeps its model's settings; drop "
                                 + " ".join(f"--{k}" for k in differ))
            return model
        raise ValueError(f"--init_from {p!r} is not a checkpoint: give a Hugging Face model directory "
                         "(config.json + safetensors) or a model.safetensors / run directory written by train.py")
    preset = tc.preset or ("small" if device.type == "cuda" else "demo")
    cfg = Config.preset(preset, **{**overrides, **shape})
    with torch.device(device):  # initialise in place: a 1.5B model is slow to build on a CPU and move
        return SpeechLM(cfg)


def lr_at(tc, step):
    """Linear warmup, then cosine decay to min_lr at max_steps."""
    if step < tc.warmup:
        return tc.lr * (step + 1) / tc.warmup
    p = min(1.0, (step - tc.warmup) / max(1, tc.max_steps - tc.warmup))
    return tc.min_lr + 0.5 * (1 + math.cos(math.pi * p)) * (tc.lr - tc.min_lr)


def make_optimizer(model, tc, device):
    decay, no_decay, half_lives = [], [], []
    mult = tc.ttt_half_life_lr_mult
    for n, p in model.named_parameters():
        if mult != 1 and n.endswith("log_half_life"):
            half_lives.append(p)
        else:
            (decay if p.dim() >= 2 and "ttt.layer" not in n else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if half_lives:   # (a group of their own only then: checkpoints without it resume as before)
        groups.append({"params": half_lives, "weight_decay": 0.0, "lr_mult": mult})
    fused = device.type == "cuda" and not tc.fsdp
    return torch.optim.AdamW(groups, lr=tc.lr, betas=(0.9, tc.beta2), fused=fused or None)


def _write_json(path, obj):
    import json
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(obj, fh)
    os.replace(tmp, path)


def save_atomic(obj, path):
    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def rng_state():
    s = {"torch": torch.get_rng_state(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def main(argv=None):
    tc, overrides = parse_args(argv)
    try:
        return train(tc, overrides)
    except (ValueError, FileNotFoundError, CodesFormatError) as e:
        fail(e)


def train(tc, overrides):
    if tc.mode not in ("streaming", "minibatch"):
        raise ValueError(f"--mode must be streaming or minibatch, not {tc.mode!r}")
    check_config(tc)
    # --- distributed: torchrun sets RANK; one process per GPU -------------------------------
    ddp = "RANK" in os.environ
    rank, world, local = 0, 1, 0
    if ddp:
        import torch.distributed as dist
        rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    if tc.fsdp and not ddp:
        raise ValueError("--fsdp shards over several processes: launch with torchrun")
    master = rank == 0
    device = default_device(tc.device, local)   # a bare "cuda": this process's GPU under torchrun
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dtype = tc.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    if dtype not in ("bfloat16", "float32"):
        raise ValueError(f"--dtype must be bfloat16 or float32, not {dtype!r}")
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext())
    torch.manual_seed(tc.seed)  # the same initial weights on every rank (FSDP does not broadcast them)

    # --- data ----------------------------------------------------------------------------------
    if not os.path.isfile(tc.data):
        raise FileNotFoundError(f"data file {tc.data!r} does not exist; make one with `python mimi.py encode "
                                "AUDIO... --out FILE` or `python data.py synthetic --out FILE`")
    data = CodesFile(tc.data)
    n = len(data)
    if tc.val_data:
        val, val_ids, train_ids = CodesFile(tc.val_data), None, np.arange(n)
        if val.meta() != data.meta():
            raise ValueError(f"--val_data holds frames of {val.meta()}, --data {data.meta()}")
        val_ids = np.arange(len(val))
    else:
        k = tc.val_conversations or max(1, round(0.05 * n))
        if tc.eval_interval >= 0 and n <= k:
            raise ValueError(f"{tc.data!r} has {n} conversation(s): too few to hold {k} out for validation; "
                             "give --val_data FILE or more conversations")
        val, val_ids, train_ids = data, np.arange(n - k, n), np.arange(n - k)

    model = build_model(tc, overrides, data, device)
    cfg = model.cfg
    if tc.mode == "streaming" and cfg.n_ttt and tc.seq_len % cfg.ttt_mini_batch:
        raise ValueError(f"streaming mode needs seq_len ({tc.seq_len}) to be a multiple of the TTT mini-batch "
                         f"({cfg.ttt_mini_batch}), so every row is at a mini-batch boundary when it resets")
    delays, initial = cfg.col_delays(), cfg.col_cards()
    B, A = tc.batch_size, tc.grad_accum
    if tc.mode == "streaming":
        samplers = [StreamSampler(data, train_ids, tc.seq_len, B, delays, initial, tc.seed + 7 * i, rank, world)
                    for i in range(A)]
    else:
        # one seed per (rank, micro-batch) slot: N GPUs x A micro-batches draw the windows that one GPU
        # with N * A micro-batches draws, so the two runs see the same data
        samplers = [WindowSampler(data, train_ids, tc.seq_len, B, delays, initial, tc.seed + 7 * (rank * A + i))
                    for i in range(A)]
    recall = None
    if tc.recall_weight != 1:   # the recall's share of the loss, raised: the lookup forms sooner (see docs/experiment)
        if not tc.recall_weight > 0:
            raise ValueError(f"--recall_weight must be > 0, not {tc.recall_weight}")
        recall = RecallFrames(tc.data, data)
    if tc.ttt_half_life_lr_mult != 1 and not (tc.ttt_half_life_lr_mult > 0 and cfg.n_ttt and cfg.ttt_half_life_max):
        raise ValueError(f"--ttt_half_life_lr_mult scales the learnt half-lives' learning rate: it needs a number > 0 "
                         f"(not {tc.ttt_half_life_lr_mult}) and a model with learnt half-lives (--ttt_half_life_max)")
    if tc.ttt_write_penalty and not (tc.ttt_write_penalty > 0 and cfg.n_ttt):
        raise ValueError(f"--ttt_write_penalty weighs the TTT layers' learning-rate gate: it needs a weight > 0 "
                         f"(not {tc.ttt_write_penalty}) and a model with TTT layers (--n_ttt {cfg.n_ttt})")
    if tc.ttt_update_penalty and not (tc.ttt_update_penalty > 0 and cfg.n_ttt):
        raise ValueError(f"--ttt_update_penalty weighs how far the TTT fast weights move: it needs a weight > 0 "
                         f"(not {tc.ttt_update_penalty}) and a model with TTT layers (--n_ttt {cfg.n_ttt})")
    if not tc.ttt_update_penalty_power > 0:
        raise ValueError(f"--ttt_update_penalty_power must be > 0, not {tc.ttt_update_penalty_power}")
    writes, updates = [], []   # each TTT layer's mean learning-rate gate / mean move of this forward
    for b in model.layers:
        if b.ttt is not None and tc.ttt_write_penalty:
            b.ttt.layer.register_forward_pre_hook(lambda mod, args: writes.append(mod.lr_gate(args[0]).mean()))
        if b.ttt is not None and tc.ttt_update_penalty:   # (x, state) in, (y, new state) out
            b.ttt.layer.register_forward_hook(
                lambda mod, args, out: updates.append(mod.written(args[0], args[1], out[1]).pow(tc.ttt_update_penalty_power).mean()))
    val_sampler = WindowSampler(val, val_ids, min(tc.seq_len, int(val.lengths[val_ids].max())), B, delays,
                                initial, 0)
    # synthetic data with recall events: the held-out recall, and the same on fixed windows of the training
    # conversations (far above the held-out one: the values were learnt by heart instead of looked up). Held-out
    # windows of the training file share its events (thousands of hours of drills list millions of them).
    val_path = tc.val_data or tc.data
    fit_recall = recall if recall is not None else RecallFrames(tc.data, data) if len(load_events(tc.data)) else None
    val_recall = fit_recall if val_path == tc.data else RecallFrames(val_path, val) if len(load_events(val_path)) else None
    fit_sampler = None
    if val_recall is not None and fit_recall is not None:
        fit_sampler = WindowSampler(data, train_ids, min(tc.seq_len, int(data.lengths[train_ids].max())), B, delays,
                                    initial, 0)

    # --- model, optimizer, resume --------------------------------------------------------------
    raw = model
    if tc.fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        # cast_forward_inputs=False: FSDP would otherwise cast the carried state (float32 TTT fast
        # weights) to bf16 on the way into every block; autocast already handles the activations
        mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)
              if dtype == "bfloat16" else None)
        for block in model.layers:
            fully_shard(block, **({"mp_policy": mp} if mp else {}))
        fully_shard(model, **({"mp_policy": mp} if mp else {}))
    elif ddp:
        from torch.nn.parallel import DistributedDataParallel
        model = DistributedDataParallel(model, device_ids=[local] if device.type == "cuda" else None)
    lossf = loss_fn
    if tc.compile:
        raw.compile_blocks()  # block by block: fast to compile, and `raw` stays the plain module
        lossf = torch.compile(loss_fn, dynamic=False)  # one fused pass over the float32 logits
    opt = make_optimizer(raw, tc, device)
    os.makedirs(tc.out_dir, exist_ok=True)
    ckpt_path = os.path.join(tc.out_dir, "ckpt.pt")
    rank_path = os.path.join(tc.out_dir, f"ckpt_rank{rank}.pt")
    states = [None] * A
    step, losses, evals = 0, [], []   # evals: {"step", "val_loss", and evaluate's recall figures} each
    if tc.resume and os.path.exists(ckpt_path):
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if asdict(config_from_dict(ck["model_config"])) != asdict(cfg):   # (fields added since: their defaults)
            raise ValueError(f"{ckpt_path} was written for another model shape; use another --out_dir "
                             "or --resume false")
        if ck["world"] != world:
            raise ValueError(f"{ckpt_path} was written by {ck['world']} processes, this run has {world}")
        _load_model_opt(raw, opt, ck, tc.fsdp)
        step, losses, evals = ck["step"], ck.get("losses", []), ck.get("evals", [])
        mine = torch.load(rank_path, map_location="cpu", weights_only=False)
        for s, d in zip(samplers, mine["samplers"]):
            s.load_state_dict(d)
        states = [None if s is None else _to(s, device) for s in mine["states"]]
        set_rng_state(mine["rng"])
        if master:
            print(f"resumed from {ckpt_path} at step {step}")

    def checkpoint(step):
        if not tc.save:
            return
        if tc.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
            msd, osd = get_state_dict(raw, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        else:
            msd, osd = raw.state_dict(), opt.state_dict()
        save_atomic({"samplers": [s.state_dict() for s in samplers], "rng": rng_state(),
                     "states": [None if s is None else _to(s, "cpu") for s in states]}, rank_path)
        if ddp:
            torch.distributed.barrier()
        if master:
            save_atomic({"model": msd, "optimizer": osd, "step": step, "losses": losses, "evals": evals,
                         "train_config": asdict(tc),
                         "model_config": asdict(cfg), "world": world}, ckpt_path)
            nn_save(cfg, msd, os.path.join(tc.out_dir, "model.safetensors"), step, getattr(torch, tc.export_dtype))
            spm = tc.data + ".spm.model"   # the text stream's tokenizer (data.py): generate.py --text_out reads it
            if cfg.n_text and os.path.isfile(spm):
                import shutil
                tmp = os.path.join(tc.out_dir, "tokenizer.model.tmp")
                shutil.copyfile(spm, tmp)
                os.replace(tmp, os.path.join(tc.out_dir, "tokenizer.model"))

    # --- loop ----------------------------------------------------------------------------------
    # Ctrl-C, and SIGTERM as schedulers, `timeout` and `docker stop` send it: finish the step, write a
    # checkpoint, stop; the same signal again aborts at once. A repeat within a second is the same request:
    # `timeout` and a kill of the process group each deliver it twice.
    stop = {"at": None}   # when the first signal came

    def on_signal(sig, frame):
        if stop["at"] is not None:
            if time.monotonic() - stop["at"] < 1.0:
                return
            raise KeyboardInterrupt
        stop["at"] = time.monotonic()
        who = f"rank {rank}: " if world > 1 else ""
        print(f"\n{who}{'interrupted' if sig == signal.SIGINT else signal.Signals(sig).name}: finishing this "
              f"step, writing a checkpoint (the same again to abort)", flush=True)
    stop_signals = (signal.SIGINT, signal.SIGTERM)

    def hold_signals():
        # (again) at every step: the first time Triton compiles a kernel, its compiler (LLVM) puts a handler of its
        # own in front of ours, one that resets to the default action as it runs; a second signal right behind the
        # first, as `timeout` sends them, then kills the run without a checkpoint
        return [signal.signal(s, on_signal) for s in stop_signals] if threading_main() else []
    old_handlers = hold_signals()

    fpf = flops_per_frame(cfg, tc.seq_len)
    frames_per_step = B * A * tc.seq_len * world
    if master:
        print(f"model: {raw.num_params() / 1e6:.1f}M parameters, {cfg.n_layers} layers of {cfg.dim}, window "
              f"{cfg.window} frames ({cfg.window / 12.5:.0f} s), TTT-{cfg.ttt_type} in the top {cfg.n_ttt}")
        print(f"data: {len(train_ids)} conversations for training, {len(val_ids)} for validation; "
              f"{tc.mode} mode, {frames_per_step} frames a step ({frames_per_step / 12.5 / 60:.1f} min of audio)")
    t0, t_start, last, first = time.time(), time.time(), None, step
    while step < tc.max_steps:
        lr = lr_at(tc, step)
        for g in opt.param_groups:
            g["lr"] = lr * g.get("lr_mult", 1.0)
        total = torch.zeros((), device=device)
        parts_sum = {}
        for i in range(A):
            x, reset = samplers[i].next()
            x = torch.from_numpy(x).to(device, non_blocking=True)
            if tc.mode == "streaming":
                st = states[i]
                st = raw.init_state(B, device) if st is None else raw.reset_rows(st, torch.from_numpy(reset).to(device))
            else:
                st = None
            wt = None
            if recall is not None:
                m = np.stack([recall.mask(c, s, tc.seq_len, delays) for c, s in samplers[i].last])[..., cfg.n_text:]
                wt = torch.from_numpy(np.where(m, np.float32(tc.recall_weight), np.float32(1))).to(device)
            sync = nullcontext() if not ddp or tc.fsdp or i == A - 1 else model.no_sync()
            writes.clear()
            updates.clear()
            with sync, autocast:
                logits, new = model(x, st, keep_state=st is not None)  # mini-batch: no state to keep
                loss, parts = lossf(logits, x, cfg, weight=wt)
                if tc.ttt_write_penalty:   # the logged loss includes it; "writ": the mean gate
                    gate = torch.stack(writes).mean()
                    loss = loss + tc.ttt_write_penalty * gate
                    parts["write"] = gate.detach()
                if tc.ttt_update_penalty:   # "upda": how far the fast weights moved, over their start's size (to the power)
                    moved = torch.stack(updates).mean()
                    loss = loss + tc.ttt_update_penalty * moved
                    parts["update"] = moved.detach()
            (loss / A).backward()
            if tc.mode == "streaming":
                states[i] = detach_state(new)
            total += loss.detach() / A
            for k, v in parts.items():
                parts_sum[k] = parts_sum.get(k, 0) + v / A
        norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), tc.grad_clip or math.inf)
        hold_signals()
        stopping = stop["at"] is not None   # read once: a signal may come at any moment
        if ddp:   # the mean loss, and whether any rank was asked to stop: then all stop at this step
            red = torch.stack([total, torch.tensor(float(stopping), device=device)])
            torch.distributed.all_reduce(red)
            total, stopping = red[0] / world, bool(red[1] > 0)
        lv = total.item()
        if not math.isfinite(lv):
            msg = (f"loss is {lv} at step {step + 1}: stopping. The last good checkpoint, if any, is "
                   f"{ckpt_path}; lower --lr or check the data")
            if ddp:
                torch.distributed.destroy_process_group()
            raise ValueError(msg)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        losses.append(lv)
        if master and (step % tc.log_interval == 0 or step == tc.max_steps):
            dt = time.time() - t0
            n_steps = step - (last or 0) if last is not None else min(step, tc.log_interval)
            fps = frames_per_step * n_steps / max(dt, 1e-9)
            mfu = f" | MFU {fps * fpf / world / H100_BF16_FLOPS:.1%}" if device.type == "cuda" else ""
            eta = (time.time() - t_start) / (step - first) * (tc.max_steps - step)
            groups = " ".join(f"{k[:4]} {v.item():.3f}" for k, v in parts_sum.items())
            print(f"step {step}/{tc.max_steps} ({step / tc.max_steps:.0%}) | loss {lv:.4f} ({groups}) | "
                  f"lr {lr:.2e} | norm {norm.item():.2f} | {fps:,.0f} frames/s{mfu} | eta {_fmt(eta)}", flush=True)
            t0, last = time.time(), step
        at_eval = tc.eval_interval > 0 and step % tc.eval_interval == 0
        if at_eval or step == tc.max_steps or (tc.stop_at and step >= tc.stop_at) or stopping:
            if at_eval or step == tc.max_steps:
                vl, rec = evaluate(model, raw, val_sampler, tc, cfg, device, autocast, val_recall)
                if fit_sampler is not None:
                    _, fit = evaluate(model, raw, fit_sampler, tc, cfg, device, autocast, fit_recall)
                    rec.update({"train" + k[3:]: v for k, v in fit.items()})
                hold_signals()
                evals.append({"step": step, "val_loss": vl, **rec})
                if master:
                    print(f"eval step {step}: val loss {vl:.4f}{_recall_text(rec)}", flush=True)
                    if tc.save:   # every evaluation so far, for experiment.py's report (resumed runs keep theirs)
                        _write_json(os.path.join(tc.out_dir, "evals.json"), evals)
            checkpoint(step)
            if (tc.stop_at and step >= tc.stop_at) or stopping:
                break
    for s, h in zip(stop_signals, old_handlers):
        signal.signal(s, h)
    if master:
        mem = f"; peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if device.type == "cuda" else ""
        print(f"done: step {step}, {_fmt(time.time() - t_start)}{mem}; checkpoint {ckpt_path}")
    if ddp:   # every rank waits for the master's last checkpoint before the group goes away
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return losses


def threading_main():
    import threading
    return threading.current_thread() is threading.main_thread()


def _recall_text(rec):
    """evaluate's recall figures for the log line ("" without them)."""
    if not rec:
        return ""
    part = lambda k: "-" if rec[f"val_recall_{k}"] is None else f"{rec[f'val_recall_{k}']:.3f}"
    fit = f" | train recall {rec['train_recall']:.3f}" if "train_recall" in rec else ""
    return (f" | val recall {rec['val_recall']:.3f} ({rec['val_recall_codes']} codes; within the attention window "
            f"{part('within')}, beyond it {part('beyond')}){fit}")


@torch.no_grad()
def evaluate(model, raw, sampler, tc, cfg, device, autocast, recall=None):
    """Mean loss over a fixed set of held-out windows (fresh state each), and a dict of recall figures:
    with recall (a RecallFrames of the held-out file) the top-1 accuracy on the semantic codes of the
    recalled values whose first mention is inside the window, over all of them ("val_recall") and apart
    for those recalled within the attention window of their first mention and beyond it ("_within",
    "_beyond"), each with its count of codes ("..._codes"); empty without recall or where none is heard."""
    saved = sampler.state_dict()
    sampler.rng = np.random.default_rng(0)
    raw.eval()
    tot = 0.0
    hits, counts = {"within": 0, "beyond": 0}, {"within": 0, "beyond": 0}
    gaps = {"within": (0, cfg.window), "beyond": (cfg.window, math.inf)}
    sem = slice(None, None, cfg.n_codebooks)   # the semantic columns
    for _ in range(tc.eval_batches):
        x, _ = sampler.next()
        x = torch.from_numpy(x).to(device)
        with autocast:
            logits = model(x, None, keep_state=False)[0]
            loss, _ = loss_fn(logits, x, cfg)
        tot += loss.item() / tc.eval_batches
        if recall is not None:
            hit = logits.audio[..., sem, :].argmax(-1) == x[..., cfg.n_text:][..., sem]
            for k, g in gaps.items():
                m = np.stack([recall.mask(c, s, sampler.T, sampler.delays, heard_from=s, gaps=g) for c, s in sampler.last])
                m = torch.from_numpy(m[..., cfg.n_text:][..., sem]).to(device)
                hits[k], counts[k] = hits[k] + int((hit & m).sum()), counts[k] + int(m.sum())
    raw.train()
    sampler.load_state_dict(saved)
    rec = {}
    n = sum(counts.values())
    if n:
        rec = {"val_recall": sum(hits.values()) / n, "val_recall_codes": n}
        for k in gaps:
            rec[f"val_recall_{k}"] = hits[k] / counts[k] if counts[k] else None
            rec[f"val_recall_{k}_codes"] = counts[k]
    return tot, rec


def nn_save(cfg, sd, path, step, dtype=torch.float32):
    """model.safetensors beside the training checkpoint, for generate.py."""
    import json
    from safetensors.torch import save_file
    tmp = f"{path}.tmp"
    save_file({k: v.detach().to(dtype).contiguous().cpu() for k, v in sd.items()}, tmp,
              metadata={"config": json.dumps(asdict(cfg)), "step": str(step)})
    os.replace(tmp, path)


def _load_model_opt(raw, opt, ck, fsdp):
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
        set_state_dict(raw, opt, model_state_dict=ck["model"], optim_state_dict=ck["optimizer"],
                       options=StateDictOptions(full_state_dict=True))
    else:
        raw.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])


def _to(state, device):
    return tree_map(lambda t: t.to(device), state)


def _fmt(s):
    s = int(max(0, s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


if __name__ == "__main__":
    main()
