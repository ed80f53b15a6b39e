"""
The speech LM: a Qwen2-style temporal backbone over frames of codec codes, with windowed attention
and gated TTT layers on top, and a small depth decoder run inside each frame over its codebooks.

    frame t-1 codes --sum of embeddings--> backbone (window W, TTT on top) --> h_t
    h_t + codes of frame t before column c --depth decoder--> logits of column c of frame t

One state object carries everything that lives across frames (the attention caches of exactly W
slots with the absolute position of each slot, the TTT fast weights, the last frame). `forward`
takes any number of frames, so a sequence split anywhere gives the result of one pass: T = 1 is
streaming, T > 1 the chunked path. The design and its reasons: DESIGN.md.
"""
import json
import math
import os
from dataclasses import asdict, dataclass, fields, replace
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ttt import LN_EPS as TTT_LN_EPS, TTTLinear, TTTMLP, TTTState, _kernel_decays, _rope_cos_sin

try:  # optional: the generation kernels (SpeechLM.use_depth_kernels, SpeechLM.use_step_kernels)
    import triton
    import triton.language as tl
except ImportError:
    triton = None
try:  # programmatic dependent launch (see PDL), in Triton 3.3 and later
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:
    gdc_launch_dependents = gdc_wait = None

# -----------------------------------------------------------------------------
# Config


@dataclass
class Config:
    # the frame: these match the codes file (codes.py) the model is trained on
    n_streams: int = 2            # audio streams (speakers)
    n_codebooks: int = 8          # codebooks per stream; the first is Mimi's semantic one
    cardinality: int = 2048       # entries per codebook
    n_text: int = 0               # text streams (0, 1, or one per speaker)
    text_cardinality: int = 0     # text vocabulary size
    delays: tuple = ()            # per-codebook delay in frames, () = none; Moshi: (0, 1, 1, ...)
    # backbone (Qwen2 block)
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 0           # 0: same as n_heads
    head_dim: int = 0             # 0: dim // n_heads
    hidden: int = 0               # SwiGLU width; 0: about 8/3 dim, a multiple of 64
    qkv_bias: bool = True         # Qwen2 has q/k/v bias, Llama does not
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None  # Llama 3 style {"rope_type": "llama3", "factor": ...}
    norm_eps: float = 1e-6
    window: int = 256             # attention sees the W most recent frames, itself included
    # TTT branch in the top n_ttt layers: x + tanh(alpha) * TTT(norm(x))
    n_ttt: int = 0
    ttt_type: str = "linear"      # "linear" or "mlp"
    ttt_heads: int = 0            # 0: dim // 64
    # 0: the heads split the model's width (dim / ttt_heads each, as the official layer); else each
    # head's width, the fast model then ttt_heads * ttt_head_dim wide: more memory at the same width
    ttt_head_dim: int = 0
    ttt_mini_batch: int = 16
    ttt_base_lr: float = 1.0
    # frames after which what the fast weights wrote has faded halfway back to their learnt start
    # (ttt.py's decay, applied once a mini-batch); 0: they never forget, as the official layer
    ttt_half_life: float = 0.0
    # above 0: learnt half-lives instead, per head and feature, starting log-spaced from ttt_half_life
    # to this (ttt.py's learn_half_life)
    ttt_half_life_max: float = 0.0
    # with forgetting (either above): the input scales each mini-batch's decay (ttt.py's add_forget_gate)
    ttt_forget_gate: bool = False
    ttt_gate_init: float = 0.1    # 0 leaves a pretrained backbone unchanged at the start
    ttt_checkpoint_group: int = 0  # mini-batches per gradient checkpoint segment, 0 = off
    # depth decoder: a small transformer inside each frame
    depth_dim: int = 128
    depth_layers: int = 2
    depth_heads: int = 4
    depth_hidden: int = 0
    # loss weights, as Moshi: text term + audio term, semantic codebook weighted up
    semantic_weight: float = 100.0
    text_weight: float = 1.0
    # text LM head, only for a loaded Qwen2/Llama checkpoint used as a text model
    vocab_size: int = 0
    tie_embeddings: bool = False
    # a stream's silence frame, one code per codebook (as data.py writes it): a stream whose frame is
    # this adds nothing to the frame's input (empty: every frame is embedded). A stream that holds
    # one frame adds the same vector to every frame, which a TTT layer's keys then share; zero, it
    # does not (docs/experiment/notes.md)
    silence: tuple = ()

    def __post_init__(self):
        self.delays = tuple(int(d) for d in self.delays)
        self.silence = tuple(int(c) for c in self.silence)
        self.n_kv_heads = self.n_kv_heads or self.n_heads
        self.head_dim = self.head_dim or self.dim // self.n_heads
        self.hidden = self.hidden or 64 * math.ceil(8 * self.dim / 3 / 64)
        self.ttt_heads = self.ttt_heads or max(1, self.dim // 64)
        self.depth_hidden = self.depth_hidden or 64 * math.ceil(8 * self.depth_dim / 3 / 64)
        if self.delays and len(self.delays) != self.n_codebooks:
            raise ValueError(f"delays has {len(self.delays)} entries, expected one per codebook ({self.n_codebooks})")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.n_ttt > self.n_layers:
            raise ValueError(f"n_ttt ({self.n_ttt}) exceeds n_layers ({self.n_layers})")
        if self.ttt_type not in ("linear", "mlp"):
            raise ValueError(f"ttt_type must be 'linear' or 'mlp', got {self.ttt_type!r}")
        if not self.ttt_half_life >= 0:
            raise ValueError(f"ttt_half_life must be 0 (never forget) or a number of frames, got {self.ttt_half_life}")
        if self.ttt_half_life_max and not (0 < self.ttt_half_life <= self.ttt_half_life_max < float("inf")):
            raise ValueError(f"learnt half-lives start from ttt_half_life to ttt_half_life_max frames: need "
                             f"0 < ttt_half_life <= ttt_half_life_max, got {self.ttt_half_life} and {self.ttt_half_life_max}")
        if self.ttt_forget_gate and not self.ttt_half_life:
            raise ValueError("ttt_forget_gate scales how fast the fast weights forget: it needs ttt_half_life "
                             "(and ttt_half_life_max, for learnt half-lives)")
        if self.n_text and not self.text_cardinality:
            raise ValueError("a text stream needs text_cardinality")
        if self.silence and (len(self.silence) != self.n_codebooks
                             or not all(0 <= c < self.cardinality for c in self.silence)):
            raise ValueError(f"silence must be one code in [0, {self.cardinality}) per codebook "
                             f"({self.n_codebooks}), got {self.silence}")

    def ttt_decay(self):
        """ttt.py's decay per mini-batch for ttt_half_life: 0.5 ** (mini-batch / half-life), 1 for 0
        (and 1 with learnt half-lives: see ttt_half_life_range)."""
        if self.ttt_half_life_max:
            return 1.0
        return 0.5 ** (self.ttt_mini_batch / self.ttt_half_life) if self.ttt_half_life else 1.0

    def ttt_half_life_range(self):
        """Where learnt half-lives start, (lo, hi) frames, or None for one fixed decay."""
        return (self.ttt_half_life, self.ttt_half_life_max) if self.ttt_half_life_max else None

    @property
    def n_audio(self):  # audio columns of a frame
        return self.n_streams * self.n_codebooks

    @property
    def n_cols(self):   # all columns of a frame: text first, then each stream's codebooks
        return self.n_text + self.n_audio

    def col_delays(self):
        d = self.delays or (0,) * self.n_codebooks
        return (0,) * self.n_text + d * self.n_streams

    def col_cards(self):
        return (self.text_cardinality,) * self.n_text + (self.cardinality,) * self.n_audio

    @staticmethod
    def preset(name, **overrides):
        """Named shapes. `tiny` for tests, `demo` trains on a laptop CPU in minutes, `small` is the
        GPU default, `qwen2.5-*` match those checkpoints' backbones so their weights load."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return Config(**{**PRESETS[name], **overrides})


PRESETS = {
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, window=16, n_ttt=1, ttt_mini_batch=4,
                 ttt_heads=4, depth_dim=32, depth_layers=1, depth_heads=2),
    # about 8M parameters, most of them codebook embeddings; 90 minutes of codes on a 2-core CPU runs many times faster than real time
    "demo": dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, hidden=384, window=250, n_ttt=2,
                 ttt_mini_batch=16, ttt_heads=2, depth_dim=64, depth_layers=1, depth_heads=2),
    # a few hundred million parameters; the window is one minute of audio
    "small": dict(dim=1024, n_layers=20, n_heads=16, n_kv_heads=4, hidden=4096, window=750, n_ttt=4,
                  ttt_mini_batch=16, ttt_heads=16, depth_dim=512, depth_layers=4, depth_heads=8),
    # backbones shaped as Qwen2.5 checkpoints (config.json of Qwen/Qwen2.5-*)
    "qwen2.5-0.5b": dict(dim=896, n_layers=24, n_heads=14, n_kv_heads=2, hidden=4864, rope_theta=1e6,
                         window=750, n_ttt=4, ttt_heads=14, ttt_gate_init=0.0,
                         depth_dim=512, depth_layers=4, depth_heads=8),
    "qwen2.5-1.5b": dict(dim=1536, n_layers=28, n_heads=12, n_kv_heads=2, hidden=8960, rope_theta=1e6,
                         window=750, n_ttt=4, ttt_heads=24, ttt_gate_init=0.0,
                         depth_dim=1024, depth_layers=4, depth_heads=16),
    "qwen2.5-7b": dict(dim=3584, n_layers=28, n_heads=28, n_kv_heads=4, hidden=18944, rope_theta=1e6,
                       window=750, n_ttt=4, ttt_heads=56, ttt_gate_init=0.0,
                       depth_dim=1024, depth_layers=6, depth_heads=16),
}

def default_device(name="", index=None):
    """The device to run on: `name` if given, else cuda, then mps, then cpu. A bare "cuda" becomes
    cuda:index where an index is given (this process's GPU under torchrun). A device that torch cannot
    use here is a ValueError that says so, not an error from deep inside the first copy to it."""
    try:
        d = torch.device(name) if name else None
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use cpu, cuda, cuda:1 or mps") from None
    if d is None:
        d = torch.device("cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu")
    if d.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build of torch" if torch.version.cuda is None else "no GPU visible"
            raise ValueError(f"device {name!r}: torch sees no CUDA device here ({build}); use --device cpu")
        if d.index is None and index is not None:
            d = torch.device("cuda", index)
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(d)!r}: there are {torch.cuda.device_count()} CUDA device(s) here")
    elif d.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r}: torch sees no MPS device here; use --device cpu")
    elif d.type not in ("cpu", "mps"):
        raise ValueError(f"device {name!r}: this project runs on cpu, cuda or mps")
    return d


# -----------------------------------------------------------------------------
# Building blocks (Qwen2: transformers/models/qwen2/modeling_qwen2.py)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in float32, scale in the input dtype, as Qwen2 (one fused op for the first part)
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * y.to(x.dtype)


def rope_inv_freq(head_dim, theta, scaling=None):
    """Inverse frequencies [head_dim/2] in float64, with Llama 3 scaling when asked."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "default":
        return inv
    if kind == "linear":
        return inv / scaling["factor"]
    if kind == "llama3":  # Llama 3.1: stretch the low frequencies, keep the high ones
        f, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = ((old / wavelen) - lo) / (hi - lo)
        mixed = (1 - smooth) * inv / f + smooth * inv
        return torch.where(wavelen > old / lo, inv / f, torch.where(wavelen < old / hi, inv, mixed))
    raise ValueError(f"unsupported rope scaling {kind!r} (supported: default, linear, llama3)")


def rope_cos_sin(pos, inv_freq):
    """cos, sin [*pos.shape, head_dim] from integer positions. The angles are computed in float64
    (float32 where the device has none), so position 67,500 is as exact as position 5."""
    dt = torch.float32 if pos.device.type == "mps" else torch.float64
    ang = pos.to(dt)[..., None] * inv_freq.to(pos.device, dt)     # [..., hd/2]
    ang = torch.cat([ang, ang], -1)                                # [..., hd]
    return ang.cos().float(), ang.sin().float()


def apply_rope(x, cos, sin):
    # x [B, H, T, hd]; cos, sin [B, T, hd]; rotate-half convention of Qwen2/Llama
    x1, x2 = x.chunk(2, -1)
    rot = torch.cat([-x2, x1], -1)
    return (x.float() * cos[:, None] + rot.float() * sin[:, None]).to(x.dtype)


# On a GPU, a step of a few frames (generation: one frame, or one codebook in the depth decoder) has its
# attention written out: fused attention kernels are built for long queries and spend most of such a
# step idle. 0 sends everything to scaled_dot_product_attention (bench/lm.py --attention sdpa).
SMALL_ATTENTION = 4


def attend_few(q, k, v, mask):
    """Softmax attention for a few queries: q [B, H, T, hd], k and v [B, Hkv, L, hd] (query head h reads
    kv head h // (H / Hkv)), mask [B, T, L] bool (True: visible) -> [B, H, T, hd]. Scores in float32 at least."""
    B, H, T, hd = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    f = torch.promote_types(q.dtype, torch.float32)
    q = q.reshape(B, Hkv, H // Hkv, T, hd)
    k, v = k[:, :, None], v[:, :, None]                                                 # [B, Hkv, 1, L, hd]
    if torch.compiler.is_compiling():  # products and sums: each becomes one small fused reduction kernel
        a = (q[..., None, :].to(f) * k[:, :, :, None].to(f)).sum(-1)                   # [B, Hkv, G, T, L]
    else:                              # eager: matrix products
        a = (q @ k.transpose(3, 4)).to(f)
    a = (a * hd ** -0.5).masked_fill(~mask[:, None, None], -math.inf).softmax(-1)
    if torch.compiler.is_compiling():
        return (a[..., None] * v[:, :, :, None].to(f)).sum(-2).to(v.dtype).view(B, H, T, hd)
    return (a.to(v.dtype) @ v).view(B, H, T, hd)


# A pass over a short sequence with nothing cached (the depth decoder's teacher-forced pass over a
# frame's columns: thousands of 16-long sequences) attends through plain matrix products: fused kernels
# work in tiles of 64 or more positions and would spend most of their time on padding. 0: off.
SHORT_SEQUENCE = 32


def attend_short(q, k, v):
    """Causal softmax attention over a short sequence: q [B, H, T, hd], k and v [B, Hkv, T, hd] ->
    [B, H, T, hd], as matrix products (differentiable). Scores in float32 at least."""
    B, H, T, hd = q.shape
    Hkv = k.shape[1]
    q = q.reshape(B, Hkv, H // Hkv, T, hd)
    a = q @ k[:, :, None].transpose(3, 4)                                               # [B, Hkv, G, T, T]
    a = a.to(torch.promote_types(a.dtype, torch.float32)) * hd ** -0.5
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    a = a.masked_fill(~causal, -math.inf).softmax(-1).to(v.dtype)
    return (a @ v[:, :, None]).view(B, H, T, hd)


# On a GPU the teacher-forced pass runs those sequences through one Triton kernel instead (forward
# and backward): attend_short's products are batches of 16 x 64 tiles that the library splits into
# several launches, with transposes and a softmax pass around them. A program takes SHORT_ROWS rows:
# several whole sequences of one head as one tile, under a block-diagonal causal mask, read and
# written in the projections' own layout [B, T, H, hd]. The backward recomputes the softmax from q
# and k, so the forward saves nothing but its inputs. False: attend_short everywhere.
SHORT_KERNEL = True
SHORT_ROWS = 64

if triton is not None:
    @triton.jit
    def _short_tiles(q_ptr, k_ptr, v_ptr, sq_b, sq_t, sk_b, sk_t, pid, h, hk, B, T, scale,
                     HD: tl.constexpr, TP: tl.constexpr, R: tl.constexpr, PRECISION: tl.constexpr):
        # rows r = sequence * TP + position of the SHORT_ROWS / TP sequences from pid's; q of head h,
        # k and v of head hk (strides: q's and k's; v is laid out as k) -> q, k, v, softmax p [R, R]
        r = tl.arange(0, R)
        n, t = (pid * (R // TP) + r // TP).to(tl.int64), r % TP  # int64: offsets pass 2**31 at large batches
        ok = ((n < B) & (t < T))[:, None]
        d = tl.arange(0, HD)[None, :]
        q = tl.load(q_ptr + n[:, None] * sq_b + t[:, None] * sq_t + h * HD + d, mask=ok, other=0.0)
        kv = n[:, None] * sk_b + t[:, None] * sk_t + hk * HD + d
        k = tl.load(k_ptr + kv, mask=ok, other=0.0)
        v = tl.load(v_ptr + kv, mask=ok, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale                  # [R, R] float32
        vis = (r[:, None] // TP == r[None, :] // TP) & (r[None, :] % TP <= r[:, None] % TP)
        s = tl.where(vis, s, float("-inf"))
        p = tl.exp(s - tl.max(s, 1)[:, None])
        return q, k, v, p / tl.sum(p, 1)[:, None]

    @triton.jit
    def _short_attn_fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, B, T, scale, sq_b, sq_t, sk_b, sk_t,
                               H: tl.constexpr, GQ: tl.constexpr, HD: tl.constexpr, TP: tl.constexpr,
                               R: tl.constexpr, PRECISION: tl.constexpr):
        pid, h = tl.program_id(0), tl.program_id(1)
        q, k, v, p = _short_tiles(q_ptr, k_ptr, v_ptr, sq_b, sq_t, sk_b, sk_t, pid, h, h // GQ, B, T, scale,
                                  HD, TP, R, PRECISION)
        o = tl.dot(p.to(v.dtype), v, input_precision=PRECISION)                         # [R, HD]
        r = tl.arange(0, R)
        n, t = (pid * (R // TP) + r // TP).to(tl.int64), r % TP  # int64: offsets pass 2**31 at large batches
        d = tl.arange(0, HD)[None, :]
        tl.store(o_ptr + (n[:, None] * T + t[:, None]) * (H * HD) + h * HD + d, o.to(o_ptr.dtype.element_ty),
                 mask=((n < B) & (t < T))[:, None])

    @triton.jit
    def _short_attn_bwd_kernel(q_ptr, k_ptr, v_ptr, do_ptr, dq_ptr, dk_ptr, dv_ptr, B, T, scale,
                               sq_b, sq_t, sk_b, sk_t, H: tl.constexpr, GQ: tl.constexpr, HD: tl.constexpr,
                               TP: tl.constexpr, R: tl.constexpr, PRECISION: tl.constexpr):
        # one program a kv head: it sums dk and dv over the GQ query heads that read it
        pid, hk = tl.program_id(0), tl.program_id(1)
        r = tl.arange(0, R)
        n, t = (pid * (R // TP) + r // TP).to(tl.int64), r % TP  # int64: offsets pass 2**31 at large batches
        ok = ((n < B) & (t < T))[:, None]
        d = tl.arange(0, HD)[None, :]
        dk = tl.zeros((R, HD), tl.float32)
        dv = tl.zeros((R, HD), tl.float32)
        for g in range(GQ):
            h = hk * GQ + g
            q, k, v, p = _short_tiles(q_ptr, k_ptr, v_ptr, sq_b, sq_t, sk_b, sk_t, pid, h, hk, B, T, scale,
                                      HD, TP, R, PRECISION)
            at = (n[:, None] * T + t[:, None]) * (H * HD) + h * HD + d                # do and dq: [B, T, H, HD]
            do = tl.load(do_ptr + at, mask=ok, other=0.0)
            pl = p.to(v.dtype)
            dv += tl.dot(tl.trans(pl), do, input_precision=PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)                    # [R, R]
            ds = p * (dp - tl.sum(p * dp, 1)[:, None]) * scale
            dsl = ds.to(q.dtype)
            tl.store(dq_ptr + at, tl.dot(dsl, k, input_precision=PRECISION).to(dq_ptr.dtype.element_ty), mask=ok)
            dk += tl.dot(tl.trans(dsl), q, input_precision=PRECISION)
        kv = (n[:, None] * T + t[:, None]) * (H // GQ * HD) + hk * HD + d
        tl.store(dk_ptr + kv, dk.to(dk_ptr.dtype.element_ty), mask=ok)
        tl.store(dv_ptr + kv, dv.to(dv_ptr.dtype.element_ty), mask=ok)


def _short_layout(q, k, v):
    """The kernels index heads as [..., H, hd] with hd contiguous, and v with k's strides: views of the
    projections (one fused or three) already are; anything else is copied."""
    hd = q.shape[3]
    q = q if q.stride(3) == 1 and q.stride(2) == hd else q.contiguous()
    if k.stride(3) != 1 or k.stride(2) != hd or v.stride() != k.stride():
        k, v = k.contiguous(), v.contiguous()
    return q, k, v


def _short_launch(q, k):
    B, T, H, hd = q.shape
    TP = triton.next_power_of_2(T)
    R = max(SHORT_ROWS, TP)
    return dict(B=B, T=T, scale=hd ** -0.5, sq_b=q.stride(0), sq_t=q.stride(1), sk_b=k.stride(0),
                sk_t=k.stride(1), H=H, GQ=H // k.shape[2], HD=hd, TP=TP, R=R,
                PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=4), triton.cdiv(B, R // TP)


@torch.library.custom_op("speechlm::short_attention", mutates_args=())
def _short_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention within each sequence: q [B, T, H, hd], k and v [B, T, Hkv, hd] (hd contiguous; v
    strided as k) -> [B, T, H, hd] contiguous."""
    q, k, v = _short_layout(q, k, v)
    o = q.new_empty(q.shape)
    kw, nb = _short_launch(q, k)
    _short_attn_fwd_kernel[(nb, q.shape[2])](q, k, v, o, **kw)
    return o


@_short_attention.register_fake
def _(q, k, v):
    return q.new_empty(q.shape)


@torch.library.custom_op("speechlm::short_attention_backward", mutates_args=())
def _short_attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              do: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v = _short_layout(q, k, v)
    dq, dk, dv = q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)
    kw, nb = _short_launch(q, k)
    _short_attn_bwd_kernel[(nb, k.shape[2])](q, k, v, do.contiguous(), dq, dk, dv, **kw)
    return dq, dk, dv


@_short_attention_backward.register_fake
def _(q, k, v, do):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _short_attention_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _short_attention_grad(ctx, do):
    return _short_attention_backward(*ctx.saved_tensors, do)


_short_attention.register_autograd(_short_attention_grad, setup_context=_short_attention_setup)


def short_kernel_ok(q, T, hd):
    """Whether attention over these T positions (no cache, no RoPE) runs as the Triton kernel."""
    return (SHORT_KERNEL and triton is not None and T <= SHORT_SEQUENCE and 16 <= hd <= 128
            and not hd & (hd - 1) and q.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and (q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"))


class Attention(nn.Module):
    """Grouped-query attention over a window of W frames, with a cache of exactly W slots."""

    def __init__(self, dim, n_heads, n_kv_heads, head_dim, bias):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.q_proj = nn.Linear(dim, n_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(n_heads * head_dim, dim, bias=False)

    def fused(self):
        """q, k and v's weights (and biases) as one: one matrix product where a step of a few frames
        would run three (the depth decoder's loop builds it once per frame)."""
        ps = (self.q_proj, self.k_proj, self.v_proj)
        bias = torch.cat([p.bias for p in ps]) if self.q_proj.bias is not None else None
        return torch.cat([p.weight for p in ps]), bias

    def forward(self, x, cos, sin, mask, cache, qkv=None, slots=None):
        """x [B, T, D]; cos/sin [B, T, hd] (None: no RoPE); mask: None (causal over x alone), a bool [T, T] band
        (x alone, windowed) or a bool [B, T, W+T] over cache + x; cache (k, v) [B, Hkv, W, hd], a ring: the
        slots [B, n] of x's last n frames get their keys and values (None: the cache is returned as it was,
        the depth decoder's use, whose cache is all of a frame's positions)."""
        B, T, _ = x.shape
        H, Hkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        if qkv is None:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        else:
            q, k, v = F.linear(x, *qkv).split([H * hd, Hkv * hd, Hkv * hd], -1)
        if mask is None and cos is None and slots is None and short_kernel_ok(q, T, hd):  # the depth decoder's teacher-forced pass
            y = _short_attention(q.view(B, T, H, hd), k.view(B, T, Hkv, hd), v.view(B, T, Hkv, hd))
            return self.o_proj(y.view(B, T, H * hd)), cache
        q = q.view(B, T, H, hd).transpose(1, 2)                                        # [B, H, T, hd]
        k = k.view(B, T, Hkv, hd).transpose(1, 2)                                      # [B, Hkv, T, hd]
        v = v.view(B, T, Hkv, hd).transpose(1, 2)
        if cos is not None:  # the backbone; keys are cached already rotated
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        ck, cv = cache
        gqa = self.n_heads != self.n_kv_heads
        if mask is None and T <= SHORT_SEQUENCE:
            y = attend_short(q, k, v)
        elif mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        elif mask.dim() == 2:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        else:
            kk, vv = torch.cat([ck.to(k.dtype), k], 2), torch.cat([cv.to(v.dtype), v], 2)  # [B, Hkv, W+T, hd]
            if T <= SMALL_ATTENTION and q.is_cuda:  # (on a CPU the library call is as fast)
                y = attend_few(q, kk, vv, mask)
            else:
                y = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask[:, None], enable_gqa=gqa)
        y = self.o_proj(y.transpose(1, 2).reshape(B, T, -1))
        if slots is None:
            return y, (ck, cv)
        n = slots.shape[1]  # the last n frames go to their slots of the ring: frame at position p, slot p mod W
        idx = slots[:, None, :, None].expand(B, Hkv, n, hd)
        return y, (ck.scatter(2, idx, k[:, :, T - n:].to(ck.dtype)), cv.scatter(2, idx, v[:, :, T - n:].to(cv.dtype)))


class MLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def fused(self):
        """gate and up weights as one (see Attention.fused)."""
        return torch.cat([self.gate_proj.weight, self.up_proj.weight])

    def forward(self, x, gate_up=None):
        if gate_up is None:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        g, u = F.linear(x, gate_up).chunk(2, -1)
        return self.down_proj(F.silu(g) * u)


class GatedTTT(nn.Module):
    """x + tanh(alpha) * TTT(norm(x)), alpha per channel (as in the TTT video model), so with
    alpha = 0 a pretrained backbone is unchanged."""

    def __init__(self, cfg):
        super().__init__()
        cls = TTTLinear if cfg.ttt_type == "linear" else TTTMLP
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.layer = cls(cfg.dim, cfg.ttt_heads, mini_batch=cfg.ttt_mini_batch, base_lr=cfg.ttt_base_lr,
                         checkpoint_group=cfg.ttt_checkpoint_group, decay=cfg.ttt_decay(),
                         half_life_range=cfg.ttt_half_life_range(), forget_gate=cfg.ttt_forget_gate,
                         head_dim=cfg.ttt_head_dim or None)
        self.alpha = nn.Parameter(torch.full((cfg.dim,), float(cfg.ttt_gate_init)))

    def forward(self, x, state):
        if state is not None and state.params[0].dtype not in (torch.float32, torch.float64):
            raise ValueError(f"the TTT state must stay float32, got {state.params[0].dtype}: something cast it "
                             "(a mixed-precision wrapper casting forward inputs?)")
        y, state = self.layer(self.norm(x), state)
        return x + torch.tanh(self.alpha).to(y.dtype) * y, state


class Block(nn.Module):
    def __init__(self, dim, n_heads, n_kv_heads, head_dim, hidden, bias, eps, ttt_cfg=None):
        super().__init__()
        self.input_layernorm = RMSNorm(dim, eps)
        self.self_attn = Attention(dim, n_heads, n_kv_heads, head_dim, bias)
        self.post_attention_layernorm = RMSNorm(dim, eps)
        self.mlp = MLP(dim, hidden)
        self.ttt = GatedTTT(ttt_cfg) if ttt_cfg is not None else None

    def fused(self):
        """The weights fused for steps of a few frames: (qkv, gate_up), passed back as `fused`."""
        return self.self_attn.fused(), self.mlp.fused()

    def forward(self, x, cos, sin, mask, cache, ttt_state=None, fused=None, slots=None):
        qkv, gate_up = fused or (None, None)
        a, cache = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, qkv, slots)
        x = x + a
        if self.ttt is not None:
            x, ttt_state = self.ttt(x, ttt_state)
        x = x + self.mlp(self.post_attention_layernorm(x), gate_up)
        return x, cache, ttt_state

# -----------------------------------------------------------------------------
# The state carried across calls


class State(NamedTuple):
    pos: torch.Tensor    # [B] int64: absolute position of the next frame of each row
    prev: torch.Tensor   # [B, C] int64: the last frame seen (initial tokens when fresh)
    kpos: torch.Tensor   # [B, W] int64: absolute position held by each cache slot, -1 = empty
    kv: tuple            # per layer (k, v), each [B, Hkv, W, hd]; a ring: position p lives in slot p mod W
    ttt: tuple           # per TTT layer, a ttt.TTTState (float32)


def tree_map(fn, x):
    """Apply fn to every tensor of a nest of tuples / NamedTuples."""
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, tuple) and hasattr(x, "_fields"):
        return type(x)(*[tree_map(fn, y) for y in x])
    if isinstance(x, (tuple, list)):
        return type(x)(tree_map(fn, y) for y in x)
    return x


def tree_leaves(x):
    out = []
    tree_map(out.append, x)
    return out


def detach_state(state):
    return tree_map(lambda t: t.detach(), state)


def state_bytes(state):
    return sum(t.numel() * t.element_size() for t in tree_leaves(state))

# -----------------------------------------------------------------------------
# Frame embedding, depth decoder


def _offsets(cards):
    # one embedding table for all columns: column c's rows start at offsets[c]; each column has
    # card + 1 rows, the last one the "initial" token used before the first frame and for delays
    return torch.tensor([0] + [c + 1 for c in cards[:-1]]).cumsum(0)


EMBEDDING_BAG = True  # False: gather, then sum (bench)


class FrameEmbedding(nn.Module):
    """Sum over streams and codebooks (and text) of per-column embeddings: one vector a frame.
    With silence (one code per codebook; the audio columns, after n_text text columns, are
    n_streams x n_codebooks), a stream whose codebooks all hold their silence code is left out."""

    def __init__(self, cards, dim, silence=(), n_text=0):
        super().__init__()
        self.register_buffer("offsets", _offsets(cards), persistent=False)
        self.emb = nn.Embedding(sum(c + 1 for c in cards), dim)
        self.n_text = n_text
        self.register_buffer("silence", torch.tensor(silence, dtype=torch.long) if silence else None,
                             persistent=False)

    def keep(self, codes):
        """codes [B, T, C] -> [B, T, C] 1.0 where a column counts, 0.0 in a silent stream's columns."""
        audio = codes[..., self.n_text:].unflatten(-1, (-1, len(self.silence)))          # [B, T, S, K]
        speaks = (audio != self.silence).any(-1, keepdim=True).expand(audio.shape).flatten(-2)
        return F.pad(speaks, (self.n_text, 0), value=True).to(self.emb.weight.dtype)

    def forward(self, codes):  # [B, T, C] -> [B, T, D]
        w = None if self.silence is None else self.keep(codes)
        if not EMBEDDING_BAG or codes.device.type not in ("cpu", "cuda"):  # (other backends may lack it)
            e = self.emb(codes + self.offsets)
            return (e if w is None else e * w[..., None]).sum(2)
        # gathered and summed in one op: the [B, T, C, D] rows are never written out (nor their gradient)
        B, T, C = codes.shape
        return F.embedding_bag((codes + self.offsets).reshape(B * T, C), self.emb.weight, mode="sum",
                               per_sample_weights=None if w is None else w.reshape(B * T, C)).view(B, T, -1)


class DepthDecoder(nn.Module):
    """Predicts the columns of one frame in order (text first, then each stream's codebooks).
    Position c sees proj_c(h_t) plus the embedding of the frame's column c-1; it has no state
    across frames (Moshi's depformer, without streaming machinery). The projection of h_t is
    per position, which tells positions apart: like Moshi's depformer, no positional embedding."""

    def __init__(self, cfg):
        super().__init__()
        C, d = cfg.n_cols, cfg.depth_dim
        self.cfg = cfg
        self.in_proj = nn.Linear(cfg.dim, C * d, bias=False)  # one projection per position
        self.register_buffer("offsets", _offsets(cfg.col_cards()[:-1] or (0,)), persistent=False)
        self.token_emb = nn.Embedding(sum(c + 1 for c in cfg.col_cards()[:-1]) or 1, d)
        hd = d // cfg.depth_heads
        self.layers = nn.ModuleList(Block(d, cfg.depth_heads, cfg.depth_heads, hd, cfg.depth_hidden,
                                          False, cfg.norm_eps) for _ in range(cfg.depth_layers))
        self.norm = RMSNorm(d, cfg.norm_eps)
        self.text_heads = nn.Parameter(torch.empty(cfg.n_text, cfg.text_cardinality, d)) if cfg.n_text else None
        self.audio_heads = nn.Parameter(torch.empty(cfg.n_audio, cfg.cardinality, d))
        self.compiled_inputs = None  # SpeechLM.compile_blocks: the gather, padding and sum as one kernel

    def inputs(self, h, codes):
        """h [N, D] backbone outputs; codes [N, c] the frame's first c columns (c < C) -> the inputs
        [N, c+1, d] of positions 0..c: proj_j(h), plus the embedding of column j-1 from position 1 on.
        They keep the projection's dtype, so under bf16 autocast the depth decoder's residual stream is
        bf16 (as in generation with bf16 weights): it is 16 positions a frame, and float32 would double
        the bytes of every norm, residual and their gradients (2% of a training step, H100)."""
        N, c = codes.shape
        x = self.in_proj(h).view(N, -1, self.cfg.depth_dim)[:, :c + 1]        # [N, c+1, d]
        if c:
            x = x + F.pad(self.token_emb(codes + self.offsets[:c]), (0, 0, 1, 0)).to(x.dtype)
        return x

    def hidden(self, h, codes):
        """h [N, D] backbone outputs; codes [N, c] the frame's first c columns (c < C) ->
        depth states [N, c+1, d] for positions 0..c."""
        d = self.cfg.depth_dim
        x = (self.compiled_inputs or self.inputs)(h, codes)
        empty = x.new_zeros(x.shape[0], self.layers[0].self_attn.n_kv_heads, 0, d // self.cfg.depth_heads) if len(self.layers) else None
        for layer in self.layers:
            x, _, _ = layer(x, None, None, None, (empty, empty))
        return self.norm(x)

    def forward(self, h, codes):
        """Teacher-forced: h [B, T, D], codes [B, T, C] -> (text [B, T, nt, Vt], audio [B, T, A, V])."""
        B, T, C = codes.shape
        nt = self.cfg.n_text
        x = self.hidden(h.reshape(B * T, -1), codes.reshape(B * T, C)[:, :-1])   # [BT, C, d]
        audio = torch.einsum("nad,avd->nav", x[:, nt:], self.audio_heads.to(x.dtype)).view(B, T, -1, self.cfg.cardinality)
        text = None
        if nt:
            text = torch.einsum("nad,avd->nav", x[:, :nt], self.text_heads.to(x.dtype)).view(B, T, nt, -1)
        return text, audio

# -----------------------------------------------------------------------------
# The depth decoder's generation loop as Triton kernels (GPU, batch of a few rows)
#
# At batch 1 the loop is 16 codebooks x depth_layers one-token steps, each a handful of
# matrix-vector products: launch-bound (about 60 kernels a codebook once compiled). Here a layer
# step is 5 kernels (norm + qkv; attention; output projection + residual; norm + gate/up + SwiGLU;
# down projection + residual) and a codebook's head and sampling 2 more. Each kernel rounds where
# the PyTorch modules round, so in float32 it computes what `_depth_loop` does.

# launch shapes, chosen on an H100: a matrix-vector kernel's reduction block (at most K), its outputs
# a program (0: 4096 weights a program) and warps; the same for several rows (a matrix product); the
# sampling kernel's warps. STEP_LAUNCH: the backbone step's; its attention kernel splits the window
# among about `programs` programs.
DEPTH_LAUNCH = dict(BK=1024, BN=0, warps=4, dot_BK=128, dot_BN=16, sample_warps=8)
STEP_LAUNCH = dict(BK=1024, BN=0, warps=4, dot_BK=128, dot_BN=16, programs=128, attend_warps=4)
# Programmatic dependent launch (Hopper and later) at batch 1: each kernel lets the next one start
# early, and the next one loads its weights (which no kernel writes) before it waits for its inputs, so
# the gaps between a step's hundreds of small kernels are spent loading. (At batch 8 it made the depth
# decoder's loop 1.6-1.8x slower on an H100.) Every kernel launched so waits before reading anything.
PDL = True


def _pdl(t):
    """Launch options for a kernel over rows t [B, ...]."""
    ok = (PDL and gdc_wait is not None and t.shape[0] == 1 and t.is_cuda
          and torch.cuda.get_device_capability(t.device)[0] >= 9)
    return dict(launch_pdl=True) if ok else {}

if triton is not None:
    GELU_K = tl.constexpr(math.sqrt(2.0 / math.pi))
    TTT_EPS = tl.constexpr(TTT_LN_EPS)

    @triton.jit
    def _rows_linear_kernel(x_ptr, nw_ptr, nb_ptr, g_ptr, w_ptr, b_ptr, s_ptr, y_ptr, y_stride, M, N, K, eps,
                            NORM: tl.constexpr, BIAS: tl.constexpr, SWIGLU: tl.constexpr, SCALE: tl.constexpr,
                            RES: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                            DOT: tl.constexpr, PRECISION: tl.constexpr, PDL: tl.constexpr):
        # y[m, n] = (y[m, n] +) s[n] f(norm(x[m]) . w[n] + b[n]) for every row m < M (<= BM) and BN outputs n;
        # with SWIGLU, f = silu(. w[n]) * (. w[n + N]) (gate and up rows stacked). norm: NORM 1 RMSNorm
        # (weight nw), 2 (one row only) LayerNorm (weight nw, bias nb) times gelu(g), the TTT branch's
        # post-norm and output gate. One row: products and sums; several (DOT): the rows padded to
        # BM >= 16 times the block of weights, one matrix product.
        rn = tl.program_id(0) * BN + tl.arange(0, BN)
        rk, rm, nmask = tl.arange(0, BK), tl.arange(0, BM), rn < N
        dt = y_ptr.dtype.element_ty
        if PDL:
            gdc_launch_dependents()
        if DOT:
            if PDL:
                gdc_wait()
            xmask = (rm < M)[:, None]
            if NORM == 1:
                ss = tl.zeros([BM, BK], tl.float32)
                for k0 in range(0, K, BK):
                    xk = tl.load(x_ptr + rm[:, None] * K + k0 + rk[None, :], mask=xmask & (k0 + rk < K)[None, :],
                                 other=0.0).to(tl.float32)
                    ss += xk * xk
                inv = tl.rsqrt(tl.sum(ss, 1) / K + eps)
            acc = tl.zeros([BM, BN], tl.float32)
            acc2 = tl.zeros([BM, BN], tl.float32)
            for k0 in range(0, K, BK):
                kk = k0 + rk
                kmask = kk < K
                xk = tl.load(x_ptr + rm[:, None] * K + kk[None, :], mask=xmask & kmask[None, :], other=0.0)
                if NORM == 1:
                    nw = tl.load(nw_ptr + kk, mask=kmask, other=0.0).to(tl.float32)
                    xk = (nw[None, :] * (xk.to(tl.float32) * inv[:, None]).to(dt).to(tl.float32)).to(dt)
                wmask = nmask[:, None] & kmask[None, :]
                w = tl.load(w_ptr + rn[:, None] * K + kk[None, :], mask=wmask, other=0.0)
                acc += tl.dot(xk.to(dt), tl.trans(w.to(dt)), input_precision=PRECISION)
                if SWIGLU:
                    w2 = tl.load(w_ptr + (rn[:, None] + N) * K + kk[None, :], mask=wmask, other=0.0)
                    acc2 += tl.dot(xk.to(dt), tl.trans(w2.to(dt)), input_precision=PRECISION)
        else:  # one row (M = BM = 1): products and sums, no padding to 16 rows
            # each block of weights is loaded one block ahead; the first before waiting for x
            wmask = nmask[:, None] & (rk < K)[None, :]
            w = tl.load(w_ptr + rn[:, None] * K + rk[None, :], mask=wmask, other=0.0)
            w2 = w
            if SWIGLU:
                w2 = tl.load(w_ptr + (rn[:, None] + N) * K + rk[None, :], mask=wmask, other=0.0)
            if PDL:
                gdc_wait()
            if NORM == 1:
                ss = tl.zeros([BK], tl.float32)
                for k0 in range(0, K, BK):
                    xk = tl.load(x_ptr + k0 + rk, mask=k0 + rk < K, other=0.0).to(tl.float32)
                    ss += xk * xk
                inv = tl.rsqrt(tl.sum(ss, 0) / K + eps)
            if NORM == 2:  # mean, then variance about it, in float32
                s1 = tl.zeros([BK], tl.float32)
                for k0 in range(0, K, BK):
                    s1 += tl.load(x_ptr + k0 + rk, mask=k0 + rk < K, other=0.0).to(tl.float32)
                mean = tl.sum(s1, 0) / K
                ss = tl.zeros([BK], tl.float32)
                for k0 in range(0, K, BK):
                    xk = tl.load(x_ptr + k0 + rk, mask=k0 + rk < K, other=0.0).to(tl.float32)
                    xk = tl.where(k0 + rk < K, xk - mean, 0.0)
                    ss += xk * xk
                inv = tl.rsqrt(tl.sum(ss, 0) / K + eps)
            acc = tl.zeros([BN], tl.float32)
            acc2 = tl.zeros([BN], tl.float32)
            for k0 in range(0, K, BK):
                kk = k0 + rk
                kmask = kk < K
                xk = tl.load(x_ptr + kk, mask=kmask, other=0.0)
                if NORM == 1:
                    nw = tl.load(nw_ptr + kk, mask=kmask, other=0.0).to(tl.float32)
                    xk = (nw * (xk.to(tl.float32) * inv).to(dt).to(tl.float32)).to(dt)
                if NORM == 2:
                    nw = tl.load(nw_ptr + kk, mask=kmask, other=0.0).to(tl.float32)
                    nb = tl.load(nb_ptr + kk, mask=kmask, other=0.0).to(tl.float32)
                    xk = ((xk.to(tl.float32) - mean) * inv * nw + nb).to(dt)
                    g = tl.load(g_ptr + kk, mask=kmask, other=0.0).to(tl.float32)
                    u = GELU_K * (g + 0.044715 * g * g * g)
                    ge = (0.5 * g * (2.0 * tl.sigmoid(2.0 * u))).to(dt)   # gelu, tanh form: 1 + tanh(u) = 2 sigmoid(2u)
                    xk = (ge.to(tl.float32) * xk.to(tl.float32)).to(dt)
                xk = xk.to(tl.float32)[None, :]
                nmask2 = nmask[:, None] & (kk + BK < K)[None, :]
                w_next = tl.load(w_ptr + rn[:, None] * K + BK + kk[None, :], mask=nmask2, other=0.0)
                acc += tl.sum(w.to(tl.float32) * xk, 1)
                w = w_next
                if SWIGLU:
                    w2_next = tl.load(w_ptr + (rn[:, None] + N) * K + BK + kk[None, :], mask=nmask2, other=0.0)
                    acc2 += tl.sum(w2.to(tl.float32) * xk, 1)
                    w2 = w2_next
            acc, acc2 = acc[None, :], acc2[None, :]
        if BIAS:
            acc += tl.load(b_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
        y = acc.to(dt).to(tl.float32)
        if SWIGLU:
            y = (y * tl.sigmoid(y)).to(dt).to(tl.float32) * acc2.to(dt).to(tl.float32)
        if SCALE:
            y = (y * tl.load(s_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]).to(dt).to(tl.float32)
        out = y_ptr + rm[:, None] * y_stride + rn[None, :]
        omask = (rm < M)[:, None] & nmask[None, :]
        if RES:
            y = tl.load(out, mask=omask, other=0.0).to(tl.float32) + y.to(dt).to(tl.float32)
        tl.store(out, y.to(dt), mask=omask)

    @triton.jit
    def _attend_kernel(buf_ptr, buf_stride, c, y_ptr, scale, H: tl.constexpr, HKV: tl.constexpr, HD: tl.constexpr,
                       BL: tl.constexpr, PDL: tl.constexpr):
        # y[m, head h] = attention of position c over positions 0..c, for h = program_id(0), m = program_id(1)
        h, m = tl.program_id(0), tl.program_id(1)
        if PDL:
            gdc_launch_dependents()
            gdc_wait()
        rl, rd = tl.arange(0, BL), tl.arange(0, HD)
        width = (H + 2 * HKV) * HD
        row = buf_ptr + m * buf_stride
        at = rl[:, None] * width + (h // (H // HKV)) * HD + rd[None, :]
        lmask = (rl <= c)[:, None]
        q = tl.load(row + c * width + h * HD + rd).to(tl.float32)
        s = tl.sum(tl.load(row + H * HD + at, mask=lmask, other=0.0).to(tl.float32) * q[None, :], 1) * scale
        s = tl.where(rl <= c, s, -float("inf"))
        p = tl.exp(s - tl.max(s, 0))
        p = p / tl.sum(p, 0)
        v = tl.load(row + (H + HKV) * HD + at, mask=lmask, other=0.0).to(tl.float32)
        tl.store(y_ptr + m * H * HD + h * HD + rd, tl.sum(p[:, None] * v, 0).to(y_ptr.dtype.element_ty))

    @triton.jit
    def _sample_kernel(logit_ptr, V, noise_ptr, noise_stride, temp, top_k, tok_ptr, lp_ptr, out_stride,
                       x0_ptr, x0_stride, emb_ptr, off, xn_ptr, D,
                       NEXT: tl.constexpr, BV: tl.constexpr, BD: tl.constexpr, PDL: tl.constexpr):
        # row m: token = argmax over the top k of softmax(logits / temp) / noise, its log-probability
        # log_softmax(logits)[token], and (NEXT) the next position's input x0[m] + emb[off + token]
        m = tl.program_id(0)
        if PDL:
            gdc_launch_dependents()
            gdc_wait()
        rv = tl.arange(0, BV)
        vmask = rv < V
        lg = tl.load(logit_ptr + m * V + rv, mask=vmask, other=-float("inf")).to(tl.float32)
        z = lg / temp
        keep = vmask
        if top_k < V:  # the k-th largest z, exactly: over the floats' bits as order-keeping int32 keys, the
            b = tl.where(z == 0.0, 0, z.to(tl.int32, bitcast=True))   # (-0 as +0) the largest t with k keys >= t,
            key = tl.where(vmask, b ^ ((b >> 31) & 0x7FFFFFFF), -2147483647 - 1)   # 2 bits, then 10 x 3 bits
            cand = (tl.arange(0, 4) - 2) << 30                                          # sign and bit 30
            n = tl.sum((key[None, :] >= cand[:, None]).to(tl.int32), 1)
            t = tl.max(tl.where(n >= top_k, cand, -2147483647 - 1), 0)
            for i in tl.static_range(10):
                cand = t | (tl.arange(0, 8) << (27 - 3 * i))
                n = tl.sum((key[None, :] >= cand[:, None]).to(tl.int32), 1)
                t = tl.max(tl.where(n >= top_k, cand, t), 0)
            keep = vmask & (key >= t)
        zk = tl.where(keep, z, -float("inf"))
        e = tl.exp(zk - tl.max(zk, 0))
        noise = tl.load(noise_ptr + m * noise_stride + rv, mask=vmask, other=1.0)
        tok = tl.argmax(tl.where(keep, (e / tl.sum(e, 0)) / noise, -1.0), 0)
        mx = tl.max(lg, 0)
        lse = mx + tl.log(tl.sum(tl.where(vmask, tl.exp(lg - mx), 0.0), 0))
        tl.store(tok_ptr + m * out_stride, tok.to(tl.int64))
        tl.store(lp_ptr + m * out_stride, tl.sum(tl.where(rv == tok, lg, 0.0), 0) - lse)
        if NEXT:
            rd = tl.arange(0, BD)
            dmask = rd < D
            x = tl.load(x0_ptr + m * x0_stride + rd, mask=dmask, other=0.0).to(tl.float32)
            x += tl.load(emb_ptr + (off + tok) * D + rd, mask=dmask, other=0.0).to(tl.float32)
            tl.store(xn_ptr + m * D + rd, x.to(xn_ptr.dtype.element_ty), mask=dmask)


    @triton.jit
    def _step_attend_kernel(qkv_ptr, qkv_stride, cos_ptr, sin_ptr, k_ptr, v_ptr, kpos_ptr, pos_ptr, part_ptr,
                            count_ptr, y_ptr, W, per, scale, G: tl.constexpr, GP: tl.constexpr, HKV: tl.constexpr,
                            HD: tl.constexpr, S: tl.constexpr, BL: tl.constexpr, PDL: tl.constexpr):
        # The backbone's one-frame attention for kv head hk of row b, over the cache slots [s * per, (s + 1) * per)
        # (s = program_id(1)) and, in the last split, the new position; the G query heads of hk together.
        # RoPE on q and the new k; the new k and v go to their ring slot pos mod W. Each split writes its
        # softmax partials (max, sum, weighted values); the last split of (b, hk) to finish merges them into y.
        hk, s, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rg, rd, rl = tl.arange(0, GP), tl.arange(0, HD), tl.arange(0, BL)
        gmask = rg < G
        dt = y_ptr.dtype.element_ty
        if PDL:
            gdc_launch_dependents()
        pos = tl.load(pos_ptr + b)
        cache = (b * HKV + hk) * W * HD
        if PDL:
            gdc_wait()
        cs = tl.load(cos_ptr + b * HD + rd)
        sn = tl.load(sin_ptr + b * HD + rd) * tl.where(rd < HD // 2, -1.0, 1.0)   # rotate half: (-x2, x1)
        rot = (rd + HD // 2) % HD
        row = qkv_ptr + b * qkv_stride
        qh = (hk * G + rg)[:, None] * HD
        q = (tl.load(row + qh + rd[None, :], mask=gmask[:, None], other=0.0).to(tl.float32) * cs[None, :]
             + tl.load(row + qh + rot[None, :], mask=gmask[:, None], other=0.0).to(tl.float32) * sn[None, :])
        q = q.to(dt).to(tl.float32)
        kn_at = row + (HKV * G + hk) * HD
        kn = (tl.load(kn_at + rd).to(tl.float32) * cs + tl.load(kn_at + rot).to(tl.float32) * sn).to(dt)
        vn = tl.load(row + (HKV * G + HKV + hk) * HD + rd)
        # the new position: counted once (last split), stored into its slot once (first split)
        sc = tl.sum(q * kn.to(tl.float32)[None, :], 1) * scale                        # [GP]
        last = s == S - 1
        m = tl.where(last, sc, -1e30)
        l = tl.where(last, 1.0, 0.0) + tl.zeros([GP], tl.float32)
        acc = tl.where(last, 1.0, 0.0) * vn.to(tl.float32)[None, :] + tl.zeros([GP, HD], tl.float32)
        for j0 in range(s * per, tl.minimum(s * per + per, W), BL):
            j = j0 + rl
            jm = (j < W) & (j < s * per + per)
            kp = tl.load(kpos_ptr + b * W + j, mask=jm, other=-1)
            vis = jm & (kp >= 0) & (pos - kp < W)
            kb = tl.load(k_ptr + cache + j[:, None] * HD + rd[None, :], mask=jm[:, None], other=0.0).to(tl.float32)
            vb = tl.load(v_ptr + cache + j[:, None] * HD + rd[None, :], mask=jm[:, None], other=0.0).to(tl.float32)
            a = tl.sum(q[:, None, :] * kb[None, :, :], 2) * scale                      # [GP, BL]
            a = tl.where(vis[None, :], a, -float("inf"))
            m2 = tl.maximum(m, tl.max(a, 1))
            p = tl.exp(a - m2[:, None])
            r = tl.exp(m - m2)
            l = l * r + tl.sum(p, 1)
            acc = acc * r[:, None] + tl.sum(p[:, :, None] * vb[None, :, :], 1)
            m = m2
        if s == 0:
            slot = pos % W
            tl.store(k_ptr + cache + slot * HD + rd, kn)
            tl.store(v_ptr + cache + slot * HD + rd, vn)
        part = part_ptr + ((b * HKV + hk) * S + s) * GP * (HD + 2)        # per split: m [GP], l [GP], acc [GP, HD]
        tl.store(part + rg, m)
        tl.store(part + GP + rg, l)
        tl.store(part + 2 * GP + rg[:, None] * HD + rd[None, :], acc)
        tl.debug_barrier()  # one thread does the atomic: every thread's stores must come before it
        done = tl.atomic_add(count_ptr + b * HKV + hk, 1)                  # acq_rel: the partials above are seen
        if done == S - 1:
            rs = tl.arange(0, S)
            base = part_ptr + ((b * HKV + hk) * S + rs) * GP * (HD + 2)                # [S]
            ms = tl.load(base[:, None] + rg[None, :])                                 # [S, GP]
            mx = tl.max(ms, 0)
            wt = tl.exp(ms - mx[None, :])
            ls = tl.sum(wt * tl.load(base[:, None] + GP + rg[None, :]), 0)             # [GP]
            ys = tl.load(base[:, None, None] + 2 * GP + rg[None, :, None] * HD + rd[None, None, :])  # [S, GP, HD]
            yv = tl.sum(wt[:, :, None] * ys, 0) / ls[:, None]
            tl.store(y_ptr + b * HKV * G * HD + qh + rd[None, :], yv.to(dt), mask=gmask[:, None])
            tl.store(count_ptr + b * HKV + hk, 0)


    @triton.jit
    def _ttt_step_kernel(buf_ptr, x_ptr, nw_ptr, eps, wlr_ptr, blr_ptr, base_lr, tau_ptr, i_ptr, cos_ptr, sin_ptr,
                         lnw_ptr, lnb_ptr, W_ptr, c_ptr, GW_ptr, Gc_ptr, out_ptr, A_ptr, Ac_ptr, g_ptr, D, MB,
                         H: tl.constexpr, HD: tl.constexpr, BD: tl.constexpr, PDL: tl.constexpr,
                         DECAY: tl.constexpr):
        # The TTT-Linear streaming step (ttt._linear_token and ttt._step) of head h = program_id(0), row
        # bi = program_id(1): buf holds the row's q, k, v (before RoPE) and gate; x the branch's input,
        # whose RMSNorm (weight nw) feeds the learning-rate gate. Fast weights W [HD, HD], c [HD] and the
        # running sums GW, Gc are updated in place; out = q + LN(q W_i + c_i) in out's dtype. DECAY: fast
        # weights that forget (ttt.py's decay), toward the layer's learnt start A [H, HD, HD], Ac [H, HD], by
        # the decays g [H, 2, HD] of each head's W columns and of c.
        h, bi = tl.program_id(0), tl.program_id(1)
        rd = tl.arange(0, HD)
        if PDL:
            gdc_launch_dependents()
        st = (bi * H + h) * HD
        at = st * HD + rd[:, None] * HD + rd[None, :]
        W = tl.load(W_ptr + at)                          # the state: only this program writes it
        GW = tl.load(GW_ptr + at)
        c = tl.load(c_ptr + st + rd)
        Gc = tl.load(Gc_ptr + st + rd)
        i = tl.load(i_ptr)
        if PDL:
            gdc_wait()
        dt = out_ptr.dtype.element_ty
        # learning rate: base_lr * sigmoid(norm(x) . w_h + b_h) / HD
        rD = tl.arange(0, BD)
        dm = rD < D
        xv = tl.load(x_ptr + bi * D + rD, mask=dm, other=0.0).to(tl.float32)
        inv = tl.rsqrt(tl.sum(xv * xv, 0) / D + eps)
        xn = (tl.load(nw_ptr + rD, mask=dm, other=0.0).to(tl.float32) * (xv * inv).to(dt).to(tl.float32)).to(dt)
        logit = (tl.sum(xn.to(tl.float32) * tl.load(wlr_ptr + h * D + rD, mask=dm, other=0.0).to(tl.float32), 0)
                 + tl.load(blr_ptr + h).to(tl.float32))
        lr = base_lr * tl.sigmoid(logit) / HD
        # RoPE on channel pairs (2j, 2j + 1) at position i of the mini-batch
        cs = tl.load(cos_ptr + i * (HD // 2) + rd // 2)
        sn = tl.load(sin_ptr + i * (HD // 2) + rd // 2) * tl.where(rd % 2 == 0, -1.0, 1.0)
        row = buf_ptr + bi * 4 * D + h * HD
        q = tl.load(row + rd).to(tl.float32) * cs + tl.load(row + (rd ^ 1)).to(tl.float32) * sn
        k = tl.load(row + D + rd).to(tl.float32) * cs + tl.load(row + D + (rd ^ 1)).to(tl.float32) * sn
        v = tl.load(row + 2 * D + rd).to(tl.float32)
        lnw = tl.load(lnw_ptr + h * HD + rd).to(tl.float32)
        lnb = tl.load(lnb_ptr + h * HD + rd).to(tl.float32)
        tau = tl.load(tau_ptr + i)
        # gradient of 1/2 ||LN(k W + c) - (v - k)||^2 with respect to k W + c
        z = tl.sum(k[:, None] * W, 0) + c
        zc = z - tl.sum(z, 0) / HD
        sd = tl.sqrt(tl.sum(zc * zc, 0) / HD + TTT_EPS)
        xh = zc / sd
        gx = (lnw * xh + lnb - (v - k)) * lnw
        gz = (gx - tl.sum(gx, 0) / HD - xh * (tl.sum(gx * xh, 0) / HD)) / sd
        GW = GW + (lr * k)[:, None] * gz[None, :]
        Gc = Gc + lr * gz
        Wi = W - tau * GW
        ci = c - tau * Gc
        zq = tl.sum(q[:, None] * Wi, 0) + ci
        zc = zq - tl.sum(zq, 0) / HD
        o = q + (zc * tl.rsqrt(tl.sum(zc * zc, 0) / HD + TTT_EPS) * lnw + lnb)
        tl.store(out_ptr + bi * D + h * HD + rd, o.to(dt))
        if i == MB - 1:  # the mini-batch is complete: W_i is the next start, the sums start again
            if DECAY:   # ... and what W held fades toward the learnt start
                A = tl.load(A_ptr + h * HD * HD + rd[:, None] * HD + rd[None, :]).to(tl.float32)
                gw = tl.load(g_ptr + h * 2 * HD + rd)
                gc = tl.load(g_ptr + h * 2 * HD + HD + rd)
                Wi -= (1.0 - gw)[None, :] * (W - A)
                ci -= (1.0 - gc) * (c - tl.load(Ac_ptr + h * HD + rd).to(tl.float32))
            tl.store(W_ptr + at, Wi)
            tl.store(c_ptr + st + rd, ci)
            tl.store(GW_ptr + at, tl.zeros([HD, HD], tl.float32))
            tl.store(Gc_ptr + st + rd, tl.zeros([HD], tl.float32))
        else:
            tl.store(GW_ptr + at, GW)
            tl.store(Gc_ptr + st + rd, Gc)


def _rows_linear(x, w, out, norm=None, bias=None, swiglu=False, residual=False, launch=None, gate=None, scale=None):
    """out [M, N] (rows may be strided) = norm(x) [M, K] @ w.T (+ bias), or silu(gate) * up for
    w = [gate; up]; scale [N] multiplies the result; residual=True adds to what out holds. norm: an
    RMSNorm, or (one row) a LayerNorm whose output is multiplied by gelu(gate [1, K]). One Triton
    kernel; launch: DEPTH_LAUNCH or STEP_LAUNCH."""
    cfg = launch or DEPTH_LAUNCH
    M, K = x.shape
    ln = isinstance(norm, nn.LayerNorm)
    assert not ln or (M == 1 and gate is not None), "the LayerNorm + gate prologue takes one row"
    N = w.shape[0] // (2 if swiglu else 1)
    dot = M > 1
    if dot:  # tensor-core tiles: at least 16 x 16 x 16
        BM, BN, BK = max(16, triton.next_power_of_2(M)), cfg["dot_BN"], cfg["dot_BK"]
    else:
        BM, BK = 1, min(cfg["BK"], triton.next_power_of_2(K))
        BN = cfg["BN"] or max(1, 4096 // BK)
    pdl = _pdl(x)
    _rows_linear_kernel[(triton.cdiv(N, BN),)](
        x, norm.weight if norm is not None else x, norm.bias if ln else x, gate if ln else x, w,
        bias if bias is not None else w, scale if scale is not None else w, out, out.stride(0), M, N, K,
        norm.eps if norm is not None else 0.0, NORM=0 if norm is None else 2 if ln else 1, BIAS=bias is not None,
        SWIGLU=swiglu, SCALE=scale is not None, RES=residual, BM=BM, BN=BN, BK=BK, DOT=dot,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32", PDL=bool(pdl), num_warps=cfg["warps"], **pdl)
    return out


def _step_attend(qkv, cos, sin, k, v, kpos, pos, y, scratch):
    """The backbone's attention for one frame a row (see _step_attend_kernel): qkv [B, (H + 2 Hkv) hd]
    before RoPE, cos/sin [B, hd], the layer's cache k, v [B, Hkv, W, hd] (the new key and value are
    written into it), kpos [B, W] and pos [B] before the step -> y [B, H hd]. scratch: (partials, counts)."""
    B, Hkv, W, hd = k.shape
    G = y.shape[1] // (Hkv * hd)
    S = scratch[0].shape[2]
    per = triton.cdiv(W, S)
    GP = triton.next_power_of_2(G)
    BL = max(1, min(triton.next_power_of_2(per), 8192 // (GP * hd)))
    pdl = _pdl(qkv)
    _step_attend_kernel[(Hkv, S, B)](qkv, qkv.stride(0), cos, sin, k, v, kpos, pos, scratch[0], scratch[1], y,
                                     W, per, hd ** -0.5, G=G, GP=GP, HKV=Hkv, HD=hd, S=S, BL=BL, PDL=bool(pdl),
                                     num_warps=STEP_LAUNCH["attend_warps"], **pdl)
    return y


def step_kernels_unsupported(model):
    """Why SpeechLM.use_step_kernels cannot run for this model, or "" when it can."""
    if not model.layers:
        return "the backbone has no layers"
    p = model.layers[0].self_attn.q_proj.weight
    if triton is None:
        return "triton is not installed"
    if p.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return f"they need a CUDA GPU (the model is on {p.device})"
    if p.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"weights in {p.dtype}"
    hd = model.cfg.head_dim
    if hd & (hd - 1):
        return f"the head size ({hd}) is not a power of 2"
    return ""


def depth_kernels_unsupported(model):
    """Why SpeechLM.use_depth_kernels cannot run for this model, or "" when it can."""
    p = model.depth.in_proj.weight
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if triton is None:
        return "triton is not installed"
    if p.device.type != "cuda" and not interpreted:
        return f"they need a CUDA GPU (the model is on {p.device})"
    if p.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"weights in {p.dtype}"
    if not model.depth.layers:
        return "the depth decoder has no layers"
    att = model.depth.layers[0].self_attn
    for what, n in (("head size", att.head_dim), ("number of heads", att.n_heads)):
        if n & (n - 1):
            return f"the depth decoder's {what} ({n}) is not a power of 2"
    return ""


# -----------------------------------------------------------------------------
# The model


class Logits(NamedTuple):
    text: Optional[torch.Tensor]   # [B, T, n_text, text_cardinality] or None
    audio: torch.Tensor            # [B, T, n_streams * n_codebooks, cardinality]


class SpeechLM(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.frame_emb = FrameEmbedding(cfg.col_cards(), cfg.dim, cfg.silence, cfg.n_text)
        first_ttt = cfg.n_layers - cfg.n_ttt
        self.layers = nn.ModuleList(
            Block(cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.hidden, cfg.qkv_bias, cfg.norm_eps,
                  cfg if i >= first_ttt else None) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.depth = DepthDecoder(cfg)
        if cfg.vocab_size:  # text LM mode of a loaded checkpoint
            self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
            self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling).float(),
                             persistent=False)
        self.register_buffer("initial", torch.tensor(cfg.col_cards()), persistent=False)  # [C]
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """GPT-2 style: N(0, 0.02), output projections scaled down with depth; TTT keeps its own. A
        frame's input sums one embedding row per column, so those rows get 0.02 / sqrt(columns): the
        sum starts at the size of one token's embedding. (At 0.02 each, a frame of 8 codebooks starts
        sqrt(8) times larger, and on associative recall the model learnt no lookup, only elimination;
        scaled, it learnt the lookup as with one codebook: docs/experiment/notes.md.)"""
        for name, p in self.named_parameters():
            if ".ttt.layer." in name or p.is_meta:
                continue
            if name.endswith("alpha"):
                p.fill_(self.cfg.ttt_gate_init)
            elif p.dim() == 1:
                p.fill_(1.0 if name.endswith("norm.weight") else 0.0)
            elif name == "frame_emb.emb.weight":
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(self.cfg.n_cols))
            else:
                depth = self.cfg.depth_layers if name.startswith("depth.") else self.cfg.n_layers
                out = name.endswith(("o_proj.weight", "down_proj.weight"))
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * max(1, depth)) if out else 0.02)

    def __repr__(self):
        n = sum(p.numel() for p in self.parameters())
        return f"{super().__repr__()}\n{n / 1e6:.2f}M parameters"

    def num_params(self, exclude_embeddings=False):
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.frame_emb.emb.weight.numel()
        return n

    def compile_blocks(self, **kw):
        """torch.compile each transformer block on its own (regional compilation): identical
        blocks share one compiled graph, so compiling costs about one block whatever the depth,
        and the elementwise work around each matmul (norms, RoPE, SwiGLU, residuals) is fused."""
        # backbone and depth blocks share Block.forward, and each shape (batch, frames, cache)
        # is a graph of its own: allow more than torch's default 8 before it falls back to eager
        cfg = torch._dynamo.config
        for name, n in (("recompile_limit", 64), ("cache_size_limit", 64), ("accumulated_recompile_limit", 1024),
                        ("accumulated_cache_size_limit", 1024)):
            if hasattr(cfg, name):
                setattr(cfg, name, max(getattr(cfg, name), n))
        for b in list(self.layers) + list(self.depth.layers):
            b.compile(dynamic=False, **kw)
        self.depth.compiled_inputs = torch.compile(self.depth.inputs, dynamic=False, **kw)
        for norm in (self.norm, self.depth.norm):  # the last norms: eager, each is four passes over its input
            norm.compile(dynamic=False, **kw)
        return self

    def compile_depth(self):
        """torch.compile the depth decoder's whole loop over a frame's columns, sampling included,
        as one graph (on top of compile_blocks): fewer, fused kernels for generation."""
        self.compile_blocks()
        self._depth_fn = torch.compile(self._depth_loop, fullgraph=True, dynamic=False)
        return self

    def _ttt_layers(self, what):
        layers = [b.ttt.layer for b in self.layers if b.ttt is not None]
        if not layers:
            raise ValueError(f"this model has no TTT layer to {what}")
        return layers

    def set_ttt_base_lr(self, lr):
        """Give every TTT layer a new base inner learning rate (no weight depends on it: a trained
        model can be evaluated or trained on with another). Saved with the config."""
        layers = self._ttt_layers(f"set an inner learning rate of {lr} for")
        if not lr >= 0:
            raise ValueError(f"the TTT base learning rate must be 0 or more, not {lr}")
        self.cfg.ttt_base_lr = float(lr)
        for t in layers:
            t.base_lr = float(lr)
        return self

    def set_ttt_half_life(self, frames, max_frames=0.0):
        """Let every TTT layer's fast weights fade toward their learnt start with this half-life in
        frames (0: never, the official layer). No weight depends on it. With max_frames, learnt
        half-lives instead: new parameters, starting log-spaced from frames to max_frames (replaced
        if the model had them; so is a learnt one by a fixed half-life). Saved with the config."""
        layers = self._ttt_layers(f"give a half-life of {frames} frames")
        if not frames >= 0:
            raise ValueError(f"the TTT half-life must be 0 (never forget) or a number of frames, not {frames}")
        if max_frames and not 0 < frames <= max_frames < float("inf"):
            raise ValueError(f"learnt TTT half-lives start in a range of frames 0 < {frames} <= {max_frames}")
        self.cfg.ttt_half_life, self.cfg.ttt_half_life_max = float(frames), float(max_frames)
        for t in layers:
            t.set_decay(self.cfg.ttt_decay())
            if max_frames:
                t.learn_half_life(frames, max_frames)
        return self

    def add_ttt_forget_gate(self):
        """Give every TTT layer a forget gate from its input (ttt.py's add_forget_gate: new weights, which
        start where the model computes what it did without them). Needs a half-life. Saved with the config."""
        layers = self._ttt_layers("add a forget gate")
        if not self.cfg.ttt_half_life:
            raise ValueError("a forget gate scales how fast the fast weights forget: set a half-life first "
                             "(set_ttt_half_life)")
        self.cfg.ttt_forget_gate = True
        for t in layers:
            t.add_forget_gate()
        return self

    # --- state -----------------------------------------------------------------

    def init_state(self, batch_size, device=None, dtype=None, cache=True) -> State:
        """A fresh state: nothing seen, caches empty, TTT fast weights at their learnt start.
        cache=False: attention caches of no slots (a pass whose new state is not kept)."""
        cfg = self.cfg
        device = device or self.inv_freq.device
        dtype = dtype or self.norm.weight.dtype
        B, W = batch_size, cfg.window if cache else 0
        kv = tuple(tuple(torch.zeros(B, cfg.n_kv_heads, W, cfg.head_dim, device=device, dtype=dtype) for _ in "kv")
                   for _ in range(cfg.n_layers))   # k and v apart: the step kernels write them in place
        ttt = tuple(b.ttt.layer.init_state(B, device=device) for b in self.layers if b.ttt is not None)
        return State(pos=torch.zeros(B, dtype=torch.long, device=device),
                     prev=self.initial.to(device).expand(B, -1).clone(),
                     kpos=torch.full((B, W), -1, dtype=torch.long, device=device), kv=kv, ttt=ttt)

    def reset_rows(self, state, rows):
        """Fresh state for the rows where rows [B] (bool) is True (a new conversation starts)."""
        fresh = self.init_state(len(rows), device=rows.device, dtype=state.kv[0][0].dtype if state.kv else None)

        def pick(new, old):
            m = rows.view(-1, *([1] * (old.dim() - 1))) if old.dim() and old.shape[0] == len(rows) else None
            return old if m is None else torch.where(m, new.to(old.dtype), old)
        return State(*[tree_map_pair(pick, f, s) for f, s in zip(fresh, state)])

    # --- forward ---------------------------------------------------------------

    def backbone(self, x, state, fresh=False, keep=True):
        """x [B, T, D] frame embeddings -> h [B, T, D] and the new state (prev unchanged; None when not
        keep: a fresh pass, with a state of init_state(cache=False), that writes no cache)."""
        B, T, _ = x.shape
        W = self.cfg.window
        pos = state.pos[:, None] + torch.arange(T, device=x.device)          # [B, T]
        cos, sin = rope_cos_sin(pos, self.inv_freq)                          # [B, T, hd]
        if fresh:  # nothing before x: plain causal attention, banded when T exceeds the window
            mask = None if T <= W else _band(T, W, x.device)
        else:
            kp = torch.cat([state.kpos, pos], 1)                             # [B, W+T]
            dist = pos[:, :, None] - kp[:, None, :]                          # [B, T, W+T]
            mask = (kp[:, None, :] >= 0) & (dist >= 0) & (dist < W)
        slots = pos[:, -min(T, W):] % W if keep else None                   # the ring's slots of the last frames
        kv, ttt = [], []
        it = iter(state.ttt)
        for layer in self.layers:
            ts = next(it) if layer.ttt is not None else None
            x, cache, ts = layer(x, cos, sin, mask, state.kv[len(kv)], ts, slots=slots)
            kv.append(cache)
            if layer.ttt is not None:
                ttt.append(ts)
        if not keep:
            return self.norm(x), None
        kpos = state.kpos.scatter(1, slots, pos[:, -slots.shape[1]:])
        return self.norm(x), State(state.pos + T, state.prev, kpos, tuple(kv), tuple(ttt))

    def forward(self, codes, state: Optional[State] = None, keep_state: bool = True):
        """codes [B, T, C] int64 (delayed, see `delay`) -> Logits for every frame of codes, and
        the new state. logits[:, t, c] is p(codes[t, c] | codes[<t], codes[t, <c]). With state=None
        the sequence starts fresh. keep_state=False (fresh only; mini-batch training) returns None
        for the state and skips building it: no attention cache is allocated or written."""
        B, T, C = codes.shape
        if C != self.cfg.n_cols:
            raise ValueError(f"codes have {C} columns per frame; this model takes {self.cfg.n_cols} "
                             f"({self.cfg.n_text} text + {self.cfg.n_streams} x {self.cfg.n_codebooks})")
        fresh = state is None
        if not (fresh or keep_state):
            raise ValueError("keep_state=False is for a fresh start (state=None)")
        if fresh:
            state = self.init_state(B, codes.device, cache=keep_state)
        inp = torch.cat([state.prev[:, None], codes[:, :-1]], 1)  # the backbone sees frames up to t-1
        h, new = self.backbone(self.frame_emb(inp), state, fresh, keep_state)
        text, audio = self.depth(h, codes)
        return Logits(text, audio), new._replace(prev=codes[:, -1]) if keep_state else None

    def lm_forward(self, tokens, state=None):
        """Text LM mode (a loaded Qwen2/Llama checkpoint): tokens [B, T] -> logits [B, T, vocab]."""
        if not self.cfg.vocab_size:
            raise ValueError("this model has no text LM head; load one with SpeechLM.from_hf(..., text_lm=True)")
        fresh = state is None
        state = state or self.init_state(tokens.shape[0], tokens.device)
        h, state = self.backbone(self.embed_tokens(tokens), state, fresh)
        w = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return h @ w.t(), state

    @torch.no_grad()
    def step(self, state, sample, force=None):
        """Generate one frame. sample(logits [B, V], column) -> tokens [B]. Returns the frame
        [B, C], the model's log-probability of it [B] (float32) and the new state."""
        if hasattr(self, "_step_weights") and state.pos.shape[0] == 1:
            h, state = self._backbone_step_kernels(state)
        else:
            h, state = self.backbone(self.frame_emb(state.prev[:, None]), state)
        return self.depth_sample(h[:, 0], sample, state, force)

    def prefill(self, codes, state=None):
        """Consume frames codes [B, T, C] without predicting them (a prompt): the new state."""
        fresh = state is None
        state = self.init_state(codes.shape[0], codes.device) if fresh else state
        inp = torch.cat([state.prev[:, None], codes[:, :-1]], 1)
        _, state = self.backbone(self.frame_emb(inp), state, fresh)
        return state._replace(prev=codes[:, -1])

    def depth_sample(self, h, sample, state, force=None):
        """Sample a frame column by column from backbone outputs h [B, D]. The depth decoder runs
        one position at a time over a cache of C slots (positions before c are valid), the same
        attention as the teacher-forced pass. force [B, C] (-1 = sample) fixes known columns;
        a forced initial token (delay padding) adds nothing to the log-probability."""
        frame, logp = (getattr(self, "_depth_fn", None) or self._depth_loop)(h, sample, force)
        return frame, logp, state._replace(prev=frame)

    def _depth_loop(self, h, sample, force=None):
        cfg, dd = self.cfg, self.depth
        B, C, d = h.shape[0], cfg.n_cols, cfg.depth_dim
        x0 = dd.in_proj(h).view(B, C, d)                                   # all positions at once
        caches = [(h.new_zeros(B, l.self_attn.n_kv_heads, C, l.self_attn.head_dim),) * 2 for l in dd.layers]
        slot = torch.arange(C + 1, device=h.device)   # cache slot s holds position s; then the new position
        masks = ((slot[None] < slot[:C, None]) | (slot[None] == C))[:, None, None].expand(C, B, 1, C + 1)
        at = slot[:C, None, None].expand(C, B, 1)      # column c's slot
        fused = [layer.fused() for layer in dd.layers]                      # once a frame, used C times
        lps, cols = [], []
        for c in range(C):
            x = x0[:, c:c + 1]
            if c:
                x = x + dd.token_emb(cols[-1] + dd.offsets[c - 1])[:, None]
            for i, layer in enumerate(dd.layers):  # cached positions < c, and itself
                x, caches[i], _ = layer(x, None, None, masks[c], caches[i], fused=fused[i], slots=at[c])
            w = dd.text_heads[c] if c < cfg.n_text else dd.audio_heads[c - cfg.n_text]
            logits = (dd.norm(x)[:, 0] @ w.t().to(x.dtype)).float()          # [B, V]
            tok = sample(logits, c)
            if force is not None:
                tok = torch.where(force[:, c] >= 0, force[:, c], tok)
                lps.append(torch.where(tok < w.shape[0], logits.log_softmax(-1).gather(
                    1, tok.clamp(max=w.shape[0] - 1)[:, None])[:, 0], 0.0))
            else:
                lps.append(logits.log_softmax(-1).gather(1, tok[:, None])[:, 0])
            cols.append(tok)
        return torch.stack(cols, 1), torch.stack(lps, 1).sum(1)

    def use_depth_kernels(self):
        """Generation on a GPU: run the depth decoder's loop over a frame's columns as Triton kernels,
        2 + 5 x depth_layers launches a column (capture the frame step as a CUDA graph: launching
        them one by one from Python is slower than the loop it replaces). The q/k/v and gate/up
        weights are concatenated once, here: call it after the weights are final."""
        why = depth_kernels_unsupported(self)
        if why:
            raise ValueError(f"the depth decoder kernels cannot run here: {why}")
        with torch.no_grad():
            self._depth_weights = [layer.fused() for layer in self.depth.layers]
        self._depth_offsets = _offsets(self.cfg.col_cards()[:-1] or (0,)).tolist()   # token_emb rows of each column
        self._depth_fn = self._depth_loop_kernels
        return self

    def use_step_kernels(self, compile_ttt=False):
        """Generation on a GPU: run the backbone's one-frame step (`step`) as Triton kernels, 5 a layer
        (RMSNorm + q/k/v; RoPE + attention over the window, writing the new key and value into the
        cache; output projection + residual; RMSNorm + gate/up + SwiGLU; down projection + residual).
        A gated TTT-Linear branch is 3 more (RMSNorm + q/k/v/gate; the inner step, which updates the
        state's fast weights in place; post-norm, gate, output projection and the gated residual); other
        TTT branches run in PyTorch (compile_ttt: torch.compile them). Capture the step as a CUDA graph.
        At batch 1 only: with more rows the compiled blocks' matrix products were as fast or faster
        (a 7B-shaped backbone at batch 8: 5.2x real time with these kernels, 5.8x without, H100).
        The step then updates the attention caches and TTT states of the state it is given in place.
        Weights are concatenated (and tanh(alpha), tau precomputed) once, here: call it when they are final."""
        why = step_kernels_unsupported(self)
        if why:
            raise ValueError(f"the backbone step kernels cannot run here: {why}")
        with torch.no_grad():
            self._step_weights = [layer.fused() for layer in self.layers]
        self._step_ttt = [None if l.ttt is None else torch.compile(l.ttt, dynamic=False) if compile_ttt else l.ttt
                          for l in self.layers]
        self._step_ttt_kernel = [None] * len(self.layers)   # TTT-Linear branches as 3 kernels (batch 1)
        for i, l in enumerate(self.layers):
            t = l.ttt.layer if l.ttt is not None else None
            if (t is None or not isinstance(t, TTTLinear) or t.g_proj is None or t.head_dim & (t.head_dim - 1)
                    or t.forget_weight is not None or t.width != t.dim):
                continue   # (a forget gate, or a memory wider than the model: the layer's own step)
            p = t.q_proj.weight
            with torch.no_grad():
                cos, sin = _rope_cos_sin(torch.arange(t.mini_batch, device=p.device), t.head_dim, t.rope_theta)
                off = t.learnable_token_idx.float()
                self._step_ttt_kernel[i] = dict(
                    qkvg=torch.cat([t.q_proj.weight, t.k_proj.weight, t.v_proj.weight, t.g_proj.weight]),
                    tau=torch.clamp_min(1.0 / torch.arange(1, t.mini_batch + 1, device=p.device) + off, 0.0),
                    cos=cos.contiguous(), sin=sin.contiguous(), alpha=torch.tanh(l.ttt.alpha).to(p.dtype))
        return self

    def _ttt_step_kernels(self, i, x, ts):
        """The gated TTT-Linear branch of layer i for one row, x [1, D] updated in place: RMSNorm + q/k/v/gate;
        the inner step (the state's fast weights and sums updated in place); post-norm, gate, output
        projection, x + tanh(alpha) * that. Returns the state with its position moved on."""
        g, t, D = self._step_ttt_kernel[i], self.layers[i].ttt.layer, x.shape[1]
        buf, out = x.new_empty(1, 4 * D), x.new_empty(1, D)
        # the decays of each head's W columns and c [H, 2, HD], kept while the layer's half-lives stay
        # (made here, not in use_step_kernels: a half-life may be set after it)
        lhl = t.log_half_life
        key = (t.decay, None if lhl is None else (lhl.data_ptr(), lhl._version))
        if t.forgets() and g.get("decay_key") != key:
            with torch.no_grad():
                g["decay"] = _kernel_decays(t.decays(), t.n_heads, t.head_dim, x.device)
            g["decay_key"] = key
        _rows_linear(x, g["qkvg"], buf, norm=self.layers[i].ttt.norm, launch=STEP_LAUNCH)
        W, c, GW, Gc = (a.contiguous() for a in (*ts.params, *ts.grads))   # (no copy when they are already)
        pdl = _pdl(x)
        _ttt_step_kernel[(t.n_heads, 1)](
            buf, x, self.layers[i].ttt.norm.weight, self.layers[i].ttt.norm.eps, t.learnable_ttt_lr_weight,
            t.learnable_ttt_lr_bias, float(t.base_lr), g["tau"], ts.i, g["cos"], g["sin"], t.ttt_norm_weight,
            t.ttt_norm_bias, W, c, GW, Gc, out, t.W1, t.b1, g["decay"] if t.forgets() else W, D, t.mini_batch,
            H=t.n_heads, HD=t.head_dim, BD=triton.next_power_of_2(D), PDL=bool(pdl), DECAY=t.forgets(), num_warps=4,
            **pdl)
        _rows_linear(out, t.o_proj.weight, x, norm=t.post_norm, gate=buf[:, 3 * D:], scale=g["alpha"], residual=True,
                     launch=STEP_LAUNCH)
        return TTTState((W, c), (GW, Gc), (ts.i + 1) % t.mini_batch)

    def _backbone_step_kernels(self, state):
        """backbone() of one frame a row, as kernels (see use_step_kernels): h [B, 1, D] and the state."""
        cfg = self.cfg
        B, W = state.pos.shape[0], cfg.window
        att = self.layers[0].self_attn
        H, Hkv, hd = att.n_heads, att.n_kv_heads, att.head_dim
        x = self.frame_emb(state.prev[:, None])[:, 0].contiguous()             # the residual stream [B, D]
        cos, sin = rope_cos_sin(state.pos, self.inv_freq)                      # [B, hd]
        qkv, y, u = x.new_empty(B, (H + 2 * Hkv) * hd), x.new_empty(B, H * hd), x.new_empty(B, cfg.hidden)
        S = 1 << int(math.log2(max(1, min(64, W, STEP_LAUNCH["programs"] // (B * Hkv)))))
        G = triton.next_power_of_2(H // Hkv)
        scratch = (torch.empty(B, Hkv, S, G * (hd + 2), dtype=torch.float32, device=x.device),
                   torch.zeros(B, Hkv, dtype=torch.int32, device=x.device))   # each kernel leaves the counts at 0
        ttt, it = [], iter(state.ttt)
        for i, layer in enumerate(self.layers):
            (w_qkv, b_qkv), w_gu = self._step_weights[i]
            k, v = state.kv[i]
            if k.data_ptr() == v.data_ptr() or not (k.is_contiguous() and v.is_contiguous()):
                raise ValueError("the step kernels write the caches in place: they must be contiguous tensors of "
                                 "their own (make states with init_state, prefill or a clone)")
            _rows_linear(x, w_qkv, qkv, norm=layer.input_layernorm, bias=b_qkv, launch=STEP_LAUNCH)
            _step_attend(qkv, cos, sin, k, v, state.kpos, state.pos, y, scratch)
            _rows_linear(y, layer.self_attn.o_proj.weight, x, residual=True, launch=STEP_LAUNCH)
            if layer.ttt is not None and B == 1 and self._step_ttt_kernel[i] is not None:
                ttt.append(self._ttt_step_kernels(i, x, next(it)))
            elif layer.ttt is not None:
                xt, ts = self._step_ttt[i](x[:, None], next(it))
                x = xt[:, 0].contiguous()
                ttt.append(ts)
            _rows_linear(x, w_gu, u, norm=layer.post_attention_layernorm, swiglu=True, launch=STEP_LAUNCH)
            _rows_linear(u, layer.mlp.down_proj.weight, x, residual=True, launch=STEP_LAUNCH)
        kpos = state.kpos.scatter(1, (state.pos % W)[:, None], state.pos[:, None])
        return self.norm(x)[:, None], State(state.pos + 1, state.prev, kpos, state.kv, tuple(ttt))

    def _depth_loop_kernels(self, h, sample, force=None):
        """_depth_loop as Triton kernels; forced columns, or a sampler without params(c), take _depth_loop."""
        if force is not None or not hasattr(sample, "params"):
            return self._depth_loop(h, sample, force)
        cfg, dd = self.cfg, self.depth
        B, C, d = h.shape[0], cfg.n_cols, cfg.depth_dim
        att = dd.layers[0].self_attn
        H, Hkv, hd = att.n_heads, att.n_kv_heads, att.head_dim
        x0 = dd.in_proj(h).view(B, C, d)
        x = x0[:, 0].contiguous()                                          # the residual stream, in place
        qkv = [x.new_empty(B, C, (H + 2 * Hkv) * hd) for _ in dd.layers]  # every position's q, k, v
        u, y = x.new_empty(B, cfg.depth_hidden), x.new_empty(B, H * hd)
        frame = torch.empty(B, C, dtype=torch.long, device=h.device)
        lps = torch.empty(B, C, dtype=torch.float32, device=h.device)
        offs = self._depth_offsets
        pdl = _pdl(x)
        for c in range(C):
            for i, layer in enumerate(dd.layers):
                (w_qkv, b_qkv), w_gu = self._depth_weights[i]
                _rows_linear(x, w_qkv, qkv[i][:, c], norm=layer.input_layernorm, bias=b_qkv)
                _attend_kernel[(H, B)](qkv[i], qkv[i].stride(0), c, y, hd ** -0.5, H=H, HKV=Hkv, HD=hd,
                                       BL=triton.next_power_of_2(C), PDL=bool(pdl), **pdl)
                _rows_linear(y, layer.self_attn.o_proj.weight, x, residual=True)
                _rows_linear(x, w_gu, u, norm=layer.post_attention_layernorm, swiglu=True)
                _rows_linear(u, layer.mlp.down_proj.weight, x, residual=True)
            w = dd.text_heads[c] if c < cfg.n_text else dd.audio_heads[c - cfg.n_text]
            V = w.shape[0]
            logits = _rows_linear(x, w, x.new_empty(B, V), norm=dd.norm)
            temp, k, p, noise = sample.params(c)
            nxt = c + 1 < C
            if temp > 0 and p >= 1.0 and V <= 16384:
                _sample_kernel[(B,)](logits, V, noise, noise.stride(0), float(temp), k if 0 < k < V else V,
                                     frame[:, c], lps[:, c], C, x0[:, c + 1] if nxt else x0, C * d,
                                     dd.token_emb.weight, offs[c] if nxt else 0, x, d,
                                     NEXT=nxt, BV=triton.next_power_of_2(V), BD=triton.next_power_of_2(d),
                                     PDL=bool(pdl), num_warps=DEPTH_LAUNCH["sample_warps"], **pdl)
                continue
            lg = logits.float()
            tok = sample(lg, c)
            frame[:, c], lps[:, c] = tok, lg.log_softmax(-1).gather(1, tok[:, None])[:, 0]
            if nxt:
                x = x0[:, c + 1] + dd.token_emb(tok + offs[c])
        return frame, lps.sum(1)

    # --- checkpoints -------------------------------------------------------------

    @classmethod
    def from_checkpoint(cls, path, device="cpu"):
        """Load one of our checkpoints: a .safetensors file (config in its metadata) or a training
        checkpoint directory / .pt file written by train.py."""
        from safetensors import safe_open
        from safetensors.torch import load_file
        path = str(path)
        if os.path.isdir(path):
            path = os.path.join(path, "model.safetensors")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint {path!r} does not exist; train one with "
                                    "`python train.py --data FILE` or pass --ckpt")
        try:
            with safe_open(path, "pt") as f:
                meta = f.metadata() or {}
            sd = load_file(path, device=str(device))
            if torch.device(device).type == "cpu":
                # on the CPU the tensors share one buffer at the file's offsets, not 64-byte aligned, and
                # the matrix products then round differently: each gets memory of its own, so a loaded
                # model computes what the saved one did to the bit
                sd = {k: v.clone() for k, v in sd.items()}
            sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}  # bf16 exports too
        except Exception as e:
            raise ValueError(f"{path!r} is not a readable safetensors checkpoint ({e})") from None
        if "config" not in meta:
            raise ValueError(f"{path!r} has no model config in its metadata: it is not a checkpoint "
                             "written by this project (for Hugging Face Qwen2/Llama use from_hf)")
        cfg = config_from_dict(json.loads(meta["config"]))
        with torch.device("meta"):
            model = cls(cfg)
        load_exact(model, sd, path)
        model._materialize_buffers(device)
        return model

    def save(self, path, extra_meta=None):
        """Write model weights + config as safetensors, atomically."""
        from safetensors.torch import save_file
        sd = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        meta = {"config": json.dumps(asdict(self.cfg)), **(extra_meta or {})}
        tmp = f"{path}.tmp"
        save_file(sd, tmp, metadata=meta)
        os.replace(tmp, path)

    def _materialize_buffers(self, device):
        # non-persistent buffers are derived from the config: rebuild them on the target device
        fresh = {"inv_freq": rope_inv_freq(self.cfg.head_dim, self.cfg.rope_theta, self.cfg.rope_scaling).float(),
                 "initial": torch.tensor(self.cfg.col_cards())}
        for name, buf in list(self.named_buffers()):
            mod = self.get_submodule(name.rsplit(".", 1)[0]) if "." in name else self
            short = name.rsplit(".", 1)[-1]
            if short == "offsets":
                cards = self.cfg.col_cards() if mod is self.frame_emb else (self.cfg.col_cards()[:-1] or (0,))
                val = _offsets(cards)
            elif short == "rope_table":  # a TTT layer's
                val = mod.make_rope_table()
            elif short == "silence":
                val = torch.tensor(self.cfg.silence, dtype=torch.long)
            else:
                val = fresh[short]
            mod.register_buffer(short, val.to(device), persistent=False)

    # --- Hugging Face Qwen2 / Llama ---------------------------------------------

    @classmethod
    def from_hf(cls, path, text_lm=False, device="cpu", dtype=torch.float32, **overrides):
        """Load a Hugging Face Qwen2/Qwen2.5/Llama checkpoint directory into the backbone.

        text_lm=True keeps embed_tokens/lm_head: the model is then exactly the text LM
        (lm_forward), with TTT gates at 0 and the window as set. Otherwise the speech parts (frame
        embedding, depth decoder, TTT) start fresh and the text head is dropped. overrides set any
        Config field that is not part of the backbone shape (window, n_ttt, n_streams, ...)."""
        hf, sd = read_hf_checkpoint(path)
        cfg = config_from_hf(hf, text_lm=text_lm, **overrides)
        with torch.device("meta"):
            model = cls(cfg)
        backbone = {}
        for k, v in sd.items():
            name = k[len("model."):] if k.startswith("model.") else k
            if name == "lm_head.weight" and not text_lm:
                continue
            if name == "embed_tokens.weight" and not text_lm:
                continue
            if name.startswith("layers.") and ".rotary_emb." in name:
                continue
            backbone[name] = v.to(dtype)
        if text_lm and cfg.tie_embeddings:
            backbone.pop("lm_head.weight", None)
        # the parts a text checkpoint does not have start fresh
        expected = {k for k in model.state_dict()
                    if k.startswith(("layers.", "norm.", "embed_tokens.", "lm_head.")) and ".ttt." not in k}
        missing = sorted(expected - backbone.keys())
        unexpected = sorted(backbone.keys() - expected)
        shapes = model.state_dict()
        wrong = sorted(f"{k}: checkpoint {tuple(backbone[k].shape)} vs model {tuple(shapes[k].shape)}"
                       for k in expected & backbone.keys() if backbone[k].shape != shapes[k].shape)
        if missing or unexpected or wrong:
            raise ValueError(f"{str(path)!r} does not fit a {hf.get('model_type')} backbone:\n" +
                             _listing(missing, unexpected, wrong))
        model.load_state_dict(backbone, strict=False, assign=True)
        # new parts: rebuilt for real on the target device, with their normal initialisation
        with torch.device(device):
            fresh = cls(replace(cfg, vocab_size=0, n_layers=0, n_ttt=0))
            model.frame_emb, model.depth = fresh.frame_emb, fresh.depth
            first = cfg.n_layers - cfg.n_ttt
            for b in model.layers[first:]:
                b.ttt = GatedTTT(cfg)
        model._materialize_buffers(device)
        return model.to(device)


def tree_map_pair(fn, a, b):
    if isinstance(a, torch.Tensor):
        return fn(a, b)
    if isinstance(a, tuple) and hasattr(a, "_fields"):
        return type(a)(*[tree_map_pair(fn, x, y) for x, y in zip(a, b)])
    return type(a)(tree_map_pair(fn, x, y) for x, y in zip(a, b))


def _band(T, W, device):
    i = torch.arange(T, device=device)
    d = i[:, None] - i[None, :]
    return (d >= 0) & (d < W)


def _listing(missing, unexpected, wrong, n=20):
    out = []
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)):
        if items:
            more = f" ... and {len(items) - n} more" if len(items) > n else ""
            out.append(f"  {title} ({len(items)}): {', '.join(items[:n])}{more}")
    return "\n".join(out)


def load_exact(model, sd, where):
    """load_state_dict(assign=True) with every key and shape checked, one error listing all."""
    own = model.state_dict()
    missing = sorted(own.keys() - sd.keys())
    unexpected = sorted(sd.keys() - own.keys())
    wrong = sorted(f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                   for k in own.keys() & sd.keys() if sd[k].shape != own[k].shape)
    if missing or unexpected or wrong:
        raise ValueError(f"checkpoint {where!r} does not match its config:\n" + _listing(missing, unexpected, wrong))
    model.load_state_dict(sd, assign=True)


def config_from_dict(d):
    known = {f.name for f in fields(Config)}
    return Config(**{k: v for k, v in d.items() if k in known})


def read_hf_checkpoint(path):
    """config.json + weights (one safetensors file or several with their index) of a HF model."""
    from safetensors.torch import load_file
    path = str(path)
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise FileNotFoundError(f"{path!r} is not a Hugging Face checkpoint directory (no config.json)")
    with open(cfg_file) as f:
        hf = json.load(f)
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{path!r} has no model.safetensors or model.safetensors.index.json "
                                "(only safetensors checkpoints are read)")
    sd = {}
    for name in files:
        sd.update(load_file(os.path.join(path, name)))
    return hf, sd


def config_from_hf(hf, text_lm=False, **overrides):
    kind = hf.get("model_type")
    if kind not in ("qwen2", "llama"):
        raise ValueError(f"unsupported model_type {kind!r}: this loader reads qwen2 (Qwen2, Qwen2.5) and llama")
    rope = hf.get("rope_parameters") or dict(hf.get("rope_scaling") or {})
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"} or None
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    if scaling and "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    n_heads = hf["num_attention_heads"]
    shape = dict(dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=n_heads,
                 n_kv_heads=hf.get("num_key_value_heads") or n_heads,
                 head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads, hidden=hf["intermediate_size"],
                 qkv_bias=True if kind == "qwen2" else bool(hf.get("attention_bias", False)),
                 rope_theta=float(theta), rope_scaling=scaling, norm_eps=hf.get("rms_norm_eps", 1e-6))
    if kind == "llama" and hf.get("mlp_bias"):
        raise ValueError("Llama checkpoints with mlp_bias are not supported")
    if text_lm:
        shape.update(vocab_size=hf["vocab_size"], tie_embeddings=bool(hf.get("tie_word_embeddings", False)))
    base = dict(window=hf.get("max_position_embeddings", 4096), n_ttt=0, ttt_gate_init=0.0,
                ttt_heads=max(1, shape["dim"] // 64))
    clash = sorted(set(overrides) & set(shape))
    if clash:
        raise ValueError(f"{clash} are fixed by the checkpoint's config and cannot be overridden")
    return Config(**{**base, **overrides, **shape})

def flops_per_frame(cfg, seq_len, train=True):
    """Matrix-multiply FLOPs per frame (x3 for forward + backward), for MFU: 2 per weight per
    token through the backbone (one token a frame) and the depth decoder (n_cols tokens a frame),
    plus attention over the window and the TTT inner loop."""
    D, hd, C, d = cfg.dim, cfg.head_dim, cfg.n_cols, cfg.depth_dim
    attn_w = D * hd * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
    layer = attn_w + 3 * D * cfg.hidden
    keys = min(seq_len, cfg.window) / 2 if train else cfg.window   # average keys a query sees
    f = 2 * cfg.n_layers * layer + 4 * cfg.n_layers * cfg.n_heads * hd * keys
    th = cfg.ttt_head_dim or D // cfg.ttt_heads
    inner = (8 * th * th + 4 * cfg.ttt_mini_batch * th) * (5 if cfg.ttt_type == "mlp" else 1)
    f += cfg.n_ttt * (2 * 5 * D * th * cfg.ttt_heads + cfg.ttt_heads * inner)   # q, k, v, o, gate + inner loop
    dl = 4 * d * d + 3 * d * cfg.depth_hidden
    f += 2 * D * C * d + C * (2 * cfg.depth_layers * dl + 4 * cfg.depth_layers * d * C / 2)
    f += 2 * d * (cfg.n_audio * cfg.cardinality + cfg.n_text * cfg.text_cardinality)
    return f * (3 if train else 1)


# -----------------------------------------------------------------------------
# Delays and loss


def delay(codes, cfg, initial=None):
    """Shift column c right by its delay (Moshi's acoustic delay): [B, T, C] -> [B, T, C], frames
    before a column's start filled with that column's initial token."""
    out = codes.clone()
    for c, d in enumerate(cfg.col_delays()):
        if d:
            out[:, d:, c] = codes[:, :-d, c]
            out[:, :d, c] = cfg.col_cards()[c]
    return out


def undelay(codes, cfg):
    """Inverse of delay: [B, T, C] -> [B, T - max_delay, C]."""
    dl = cfg.col_delays()
    m = max(dl)
    T = codes.shape[1]
    return torch.stack([codes[:, d:T - m + d, c] for c, d in enumerate(dl)], 2)


def loss_fn(logits: Logits, codes, cfg, reduce=True, weight=None):
    """Moshi's weighting: text term + audio term, where the audio term is a weighted mean over
    codebooks with the semantic one weighted `semantic_weight`. Targets equal to a column's initial
    token (delay padding) are ignored. weight [B, T, n_audio] (optional): each audio target's weight
    within its column's mean (default: all 1). Returns (loss, parts) with parts the mean cross-entropy
    per group ("text", "semantic", "acoustic") for logging, weighted as the loss is."""
    nt, K = cfg.n_text, cfg.n_codebooks
    audio_t = codes[..., nt:]
    ce = F.cross_entropy(logits.audio.float().flatten(0, 2), audio_t.flatten(), reduction="none",
                         ignore_index=cfg.cardinality).view(audio_t.shape)          # [B, T, A]
    valid = (audio_t != cfg.cardinality).float()
    if weight is not None:
        valid = valid * weight
    w = torch.ones(K, device=codes.device)
    w[0] = cfg.semantic_weight
    w = w.repeat(cfg.n_streams)
    per_col = (ce * valid).sum((0, 1)) / valid.sum((0, 1)).clamp(min=1)               # [A]
    loss = (per_col * w).sum() / w.sum()
    sem = per_col.view(cfg.n_streams, K)[:, 0].mean()
    parts = {"semantic": sem.detach()}
    if K > 1:
        parts["acoustic"] = per_col.view(cfg.n_streams, K)[:, 1:].mean().detach()
    if nt:
        text_t = codes[..., :nt]
        ce_t = F.cross_entropy(logits.text.float().flatten(0, 2), text_t.flatten(),
                               ignore_index=cfg.text_cardinality)
        loss = loss + cfg.text_weight * ce_t
        parts["text"] = ce_t.detach()
    return loss, parts
