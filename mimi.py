"""
Mimi, Kyutai's streaming neural audio codec, written from scratch: 24 kHz mono audio <-> 12.5 Hz
frames of up to 32 codes (1 semantic + 31 acoustic codebooks of 2048 entries).

    python mimi.py encode talks/ interview.flac --out conv_codes.bin   # stereo file = 2 speakers
    python mimi.py decode conv_codes.bin --out out.wav --conversation 0

    mimi = Mimi.from_pretrained()              # finds the checkpoint in the Hugging Face cache
    codes = mimi.encode(wav)                   # [B, 1, T] float at 24 kHz -> [B, K, F] int64
    wav = mimi.decode(codes)                   # [B, K, F] -> [B, 1, F * 1920]
    with mimi.streaming(batch_size=1):         # chunks of whole frames, every state carried:
        codes = mimi.encode(chunk)             # the same codes as one batch call

The network (moshi/models/compression.py, loaders.py): a causal SEANet conv encoder (960x down, to
25 Hz), an 8-layer causal transformer (250-step window, RoPE, layer scale), a learnt stride-2 conv
(12.5 Hz) and a split residual quantizer; the decoder mirrors it. Every op is causal, so it streams.

Where we differ from the official package, on purpose: attention runs over blocks of queries, each
reading its own keys and the 249 before them, so memory is linear in length (the official batch path
builds a dense T x T mask: 9 GiB for 5 min) and a chunk of any size sees its whole window (the
official streaming cache holds exactly 250 steps, so past 10 s a chunk loses part of its window);
batch calls run the streaming path over chunks of CHUNK_FRAMES (CUDA_CHUNK_FRAMES on a GPU) from a
fresh state, so activations stay bounded (an hour of audio encodes on a CPU machine) and streaming
equals batch by construction.

Fast streaming on a GPU: `mimi.streaming(1, cuda_graph=True, compile=True)` runs a frame as one CUDA
graph, the transformers and the convolutions as Triton kernels (0.38-0.45 ms a frame each way on an
H100, docs/mimi.md).
"""
import argparse
import contextlib
import glob
import math
import os
import re
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # the streaming step kernels are optional
    triton = None

from codes import CodesFile, CodesFormatError, CodesWriter

SAMPLE_RATE = 24_000   # Hz
FRAME_RATE = 12.5      # Hz: frames of codes per second
FRAME_SIZE = 1920      # samples per frame, SAMPLE_RATE / FRAME_RATE
CARDINALITY = 2048     # entries per codebook
MAX_CODEBOOKS = 32     # 1 semantic + 31 acoustic
CONTEXT = 250          # attention window of both transformers, in 25 Hz steps (10 s)
CHUNK_FRAMES = 250     # batch calls run in chunks of this many frames (20 s) to bound memory
CUDA_CHUNK_FRAMES = 750  # on a GPU, chunks of 1 min: fewer, larger kernels, still a bounded memory
QUERY_BLOCK = 250      # attention queries per block; each block reads Q + CONTEXT - 1 keys
# Streaming steps are small: a frame is 1920 samples at the SEANet's first layer and 2 steps at the
# transformer's. Convolutions over at most SMALL_CONV samples (batch included) run on CUDA as one matrix
# product over the unfolded input (cuDNN's kernels for such shapes spend up to 100 us on one convolution,
# the matrix product a few). STEP_ROUTES says where this and the two routes below are taken: "cuda",
# "always" (every device: the tests) or "never".
SMALL_CONV, STEP_ROUTES = 8192, "cuda"
SMALL_ATTENTION = 16   # on CUDA, attention for at most this many queries is written out (no fused kernel)
# Compiled CUDA steps: a matrix product over at most SMALL_ROWS rows (the 25 Hz layers of a streaming frame)
# is written as products and sums, which Inductor turns into one reduction kernel that streams the weight
# at close to memory speed; cuBLAS's kernels for such shapes take 5-60 us (a 4 MB weight: 6.4 us, H100).
SMALL_ROWS = 16
# On a CPU, PyTorch's transposed convolution over a step or two takes its slow reference kernel
# (slow_conv_transpose2d): the decoder's first one in a streaming frame (2 steps, a 34 MB weight) took
# 4.7 ms against 1.8 ms as one matrix product (one thread). Transposed convolutions over at most this
# many steps (batch included) take the matrix product on every device unless STEP_ROUTES is "never".
FEW_STEPS = 4

MOSHI_REPO, MOSHI_FILE = "kyutai/moshiko-pytorch-bf16", "tokenizer-e351c8d8-checkpoint125.safetensors"
HF_REPO, HF_FILE = "kyutai/mimi", "model.safetensors"
GET_CHECKPOINT = (f"get one with `huggingface-cli download {HF_REPO} {HF_FILE}` (or "
                  f"`huggingface-cli download {MOSHI_REPO} {MOSHI_FILE}`) and pass its path with "
                  "--mimi PATH (Mimi.from_pretrained(PATH)); files in the Hugging Face cache are "
                  "found without it")


class MimiError(ValueError):
    """Bad input to the codec (audio, codes, arguments); the message says what to do instead."""


class MimiCheckpointError(MimiError):
    """Not a Mimi checkpoint in a layout we know, or one with missing, unexpected or mis-shaped keys."""


@dataclass
class MimiConfig:
    """Shapes of a Mimi; the defaults are the released model (moshi/models/loaders.py _mimi_config)."""
    n_filters: int = 64            # SEANet width at the audio end; doubles at every downsampling
    ratios: tuple = (8, 6, 5, 4)   # decoder upsampling strides (the encoder runs them reversed): 960x
    dim: int = 512                 # latent width = transformer width
    n_layers: int = 8
    n_heads: int = 8
    ffn: int = 2048
    context: int = CONTEXT
    max_period: float = 10_000.0   # RoPE base
    q_dim: int = 256               # codebook vector width
    n_q: int = MAX_CODEBOOKS       # codebooks in the checkpoint
    bins: int = CARDINALITY


# ----------------------------------------------------------------------------- convolutions

class Conv(nn.Module):
    """Causal Conv1d (moshi/modules/conv.py StreamingConv1d): the (kernel - stride) steps of left context
    are zeros at the start of a stream, then the end of the previous chunk; there is no right padding,
    so a chunk must be a whole number of strides. replicate=True starts from copies of the first sample
    (the downsampling conv, moshi/modules/resample.py). elu=True applies the ELU that precedes the conv in
    SEANet to its input (in place: the input is the caller's to give up); the state holds the input
    before it."""

    def __init__(self, cin, cout, k, stride=1, dilation=1, groups=1, bias=True, replicate=False, elu=False):
        super().__init__()
        self.conv = nn.Conv1d(cin, cout, k, stride, dilation=dilation, groups=groups, bias=bias)
        self.ctx = (k - 1) * dilation + 1 - stride
        self.replicate, self.elu = replicate, elu
        self.state = None
        self.kernel = False  # while streaming with the conv kernels

    def init_state(self, B, device, dtype):  # the left context; with replicate, whether no call came yet
        state = [torch.zeros(B, self.conv.in_channels, self.ctx, device=device, dtype=dtype)] if self.ctx else []
        return state + [torch.ones((), dtype=torch.bool, device=device)] if self.replicate else state

    def forward(self, x, res=None):  # [B, Cin, T] -> [B, Cout, T / stride] (+ res)
        if self.ctx:
            prev = self.state[0]
            if self.replicate:  # a tensor flag rather than a Python one, so a CUDA graph can replay it
                first = self.state[1]
                prev = torch.where(first, x[..., :1], prev)
                first.fill_(False)
            x = torch.cat([prev, x], dim=-1)
            self.state[0].copy_(x[..., -self.ctx:])
        return _conv(self.conv, x, self.elu, res, self.kernel)


def _routes(x):
    return STEP_ROUTES == "always" or (STEP_ROUTES == "cuda" and x.is_cuda)


def _small(x):
    return _routes(x) and x.shape[0] * x.shape[-1] <= SMALL_CONV


def _few_rows(x, rows):
    return torch.compiler.is_compiling() and _routes(x) and rows <= SMALL_ROWS


def linear(x, w):
    """x [..., K] @ w [N, K].T: F.linear, or products and sums over few rows in a compiled CUDA step."""
    return linear_as_sum(x, w) if _few_rows(x, x.numel() // x.shape[-1]) else F.linear(x, w)


def linear_as_sum(x, w):
    return (x[..., None, :] * w).sum(-1)


def _weight_times(w, u):
    """w [N, K] @ u [B, K, T] -> [B, N, T]; products and sums over few rows in a compiled CUDA step."""
    if _few_rows(u, u.shape[0] * u.shape[2]):
        return linear_as_sum(u.transpose(1, 2), w).transpose(1, 2)
    return w @ u


def _conv(conv, x, elu=False, res=None, kernel=False):
    """conv(elu(x)) (+ res); for a short x one matrix product: weight [Cout, Cin * k] @ unfolded x
    [B, Cin * k, Tout]; with kernel=True (streaming), a conv kernel where the shape suits one."""
    (k,), (s,), (d,) = conv.kernel_size, conv.stride, conv.dilation
    rows = x.shape[0] * ((x.shape[-1] - (k - 1) * d - 1) // s + 1)
    if kernel and conv.groups == 1 and _conv_kernel_route(x, rows, conv.out_channels, conv.in_channels * k):
        return _conv_rows(x, conv.weight.reshape(conv.out_channels, -1), conv.bias, res, k, s, d, elu)
    if elu:
        x = F.elu(x, inplace=True)
    if conv.groups != 1 or not _small(x):
        y = conv(x)
    else:
        u = x.unfold(-1, (k - 1) * d + 1, s)[..., ::d]                             # [B, Cin, Tout, k]
        u = u.transpose(2, 3).reshape(x.shape[0], -1, u.shape[2])                  # [B, Cin * k, Tout]
        y = _weight_times(conv.weight.reshape(conv.out_channels, -1), u)
        y = y if conv.bias is None else y + conv.bias[:, None]
    return y if res is None else y + res


def _conv_tr(convtr, x, elu=False, wt=None):
    """convtr(elu(x)), for a short x as one matrix product (or a product by channel when depthwise) giving
    each input step's k outputs, then overlap-added: kernel k = m * stride, so m steps add into each
    output. wt: the weight as [Cout * k, Cin], contiguous, for the conv kernel."""
    (k,), (s,) = convtr.kernel_size, convtr.stride
    Cin, Cout, g = convtr.in_channels, convtr.out_channels, convtr.groups
    B, _, T = x.shape
    if wt is not None and not k % s and _conv_kernel_route(x, B * T, Cout * k, Cin):
        z = _conv_rows(x, wt, None, None, 1, 1, 1, elu).view(B, Cout, k, T)
    else:
        if elu:
            x = F.elu(x, inplace=True)
        few = STEP_ROUTES != "never" and B * T <= FEW_STEPS
        if not (_small(x) or few) or k % s or (g != 1 and not g == Cin == Cout):
            return convtr(x)
        w = convtr.weight                                                      # [Cin, Cout / g, k]
        if g == 1:
            z = _weight_times(w.reshape(Cin, Cout * k).t(), x).view(B, Cout, k, T)
        else:
            z = w[:, 0, :, None] * x[:, :, None, :]                             # [B, C, k, T]
    z = z.view(B, Cout, k // s, s, T).transpose(3, 4).reshape(B, Cout, k // s, T * s)
    m = k // s
    y = sum(F.pad(z[:, :, j], (j * s, (m - 1 - j) * s)) for j in range(m))   # [B, Cout, (T + m - 1) * s]
    return y if convtr.bias is None else y + convtr.bias[:, None]


class ConvTr(nn.Module):
    """Causal ConvTranspose1d (moshi/modules/conv.py StreamingConvTranspose1d): the last (kernel - stride)
    outputs of a chunk overlap the next chunk's first ones, so they are held back (bias removed) and
    added there. A fresh state gives the batch result: trim (kernel - stride) on the right. elu=True: as
    Conv's."""

    def __init__(self, cin, cout, k, stride, groups=1, bias=True, elu=False):
        super().__init__()
        self.convtr = nn.ConvTranspose1d(cin, cout, k, stride, groups=groups, bias=bias)
        self.overlap = k - stride
        self.elu = elu
        self.state = None
        self.wt = None  # while streaming with the conv kernels: the weight as [Cout * k, Cin], contiguous

    def init_state(self, B, device, dtype):
        return [torch.zeros(B, self.convtr.out_channels, self.overlap, device=device, dtype=dtype)]

    def forward(self, x):  # [B, Cin, T] -> [B, Cout, T * stride]
        y = _conv_tr(self.convtr, x, self.elu, self.wt)
        held = self.state[0]
        n = y.shape[-1] - self.overlap
        y[..., :self.overlap] += held
        tail = y[..., n:]
        held.copy_(tail if self.convtr.bias is None else tail - self.convtr.bias[:, None])
        return y[..., :n]


class ResBlock(nn.Module):
    """x + conv1(elu(conv3(elu(x)))), halving the width inside (moshi/modules/seanet.py, compress=2)."""

    def __init__(self, dim):
        super().__init__()
        # the ELUs (index 0 and 2, as in the official block) are applied by the convs that follow them
        self.block = nn.ModuleList([nn.Identity(), Conv(dim, dim // 2, 3, elu=True), nn.Identity(),
                                    Conv(dim // 2, dim, 1, elu=True)])

    def forward(self, x):
        return self.block[3](self.block[1](x), res=x)


class SEANet(nn.Module):
    """SEANet encoder (audio -> dim at 25 Hz) or decoder (moshi/modules/seanet.py). The layer indices,
    activations included, are those of the official nn.Sequential, so checkpoint keys map one to one.
    Each ELU precedes a conv, which applies it (the Identity at the ELU's index)."""

    def __init__(self, cfg, decoder=False):
        super().__init__()
        nf, top = cfg.n_filters, cfg.n_filters * 2 ** len(cfg.ratios)
        elu = nn.Identity()  # applied by the next conv
        if not decoder:
            layers = [Conv(1, nf, 7)]
            for i, r in enumerate(reversed(cfg.ratios)):
                c = nf * 2 ** i
                layers += [ResBlock(c), elu, Conv(c, 2 * c, 2 * r, stride=r, elu=True)]
            layers += [elu, Conv(top, cfg.dim, 3, elu=True)]
        else:
            layers = [Conv(cfg.dim, top, 7)]
            for i, r in enumerate(cfg.ratios):
                c = top // 2 ** i
                layers += [elu, ConvTr(c, c // 2, 2 * r, r, elu=True), ResBlock(c // 2)]
            layers += [elu, Conv(nf, 1, 3, elu=True)]
        self.layers = nn.ModuleList(layers)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


# ----------------------------------------------------------------------------- transformer

def rope(pos, hd, max_period):
    """Rotations (cos, sin), each [T, 3, 1, hd/2], for q, k and v (v: the identity) at integer
    positions pos [T]; the angles are float32 and the pairs interleaved, as in moshi/modules/rope.py.
    Real arithmetic rather than complex numbers, so torch.compile can fuse it."""
    freqs = torch.exp(torch.arange(hd // 2, device=pos.device, dtype=torch.float32)
                      * (-math.log(max_period) * 2 / hd))
    angle = pos.float()[:, None] * freqs                                      # [T, hd/2]
    cos, sin = torch.cos(angle), torch.sin(angle)
    cos = torch.stack([cos, cos, torch.ones_like(cos)], dim=1)[:, :, None]
    sin = torch.stack([sin, sin, torch.zeros_like(sin)], dim=1)[:, :, None]
    return cos, sin


def window_mask(qpos, kpos, context, Q):
    """Attention mask [nb, Q, Q + C] for queries at qpos [T] taken in blocks of Q; block j reads the keys
    kpos[j*Q : j*Q + Q + C] (kpos [C + T]: C cached steps, then the queries). Key k is visible from query
    q when 0 <= q - k < context and k >= 0 (a negative position is an empty cache slot)."""
    T = qpos.shape[0]
    C = kpos.shape[0] - T
    nb = -(-T // Q)
    if nb * Q > T:  # pad queries and keys with later positions: invisible to every real query
        extra = qpos[-1] + 1 + torch.arange(nb * Q - T, device=qpos.device)
        qpos, kpos = torch.cat([qpos, extra]), torch.cat([kpos, extra])
    kb = kpos.unfold(0, Q + C, Q)                                             # [nb, Q + C]
    d = qpos.view(nb, Q, 1) - kb[:, None, :]                                  # [nb, Q, Q + C]
    return (kb[:, None, :] >= 0) & (d >= 0) & (d < context)


def windowed_attention(q, kv, mask):
    """q [B, T, H, hd], kv [B, C + T, 2, H, hd], mask [nb, Q, Q + C] -> [B, T, H * hd]. Query block j
    attends to its own slice of keys, so memory is (Q + C) / Q times the keys, never T x T."""
    B, T, H, hd = q.shape
    nb, Q, L = mask.shape
    if nb == 1:
        k, v = kv.permute(2, 0, 3, 1, 4)                                      # [B, H, C + T, hd] each
        if T <= SMALL_ATTENTION and _routes(q):  # a streaming step: a fused kernel would idle (CPUs: no gain)
            f, q = torch.promote_types(q.dtype, torch.float32), q.transpose(1, 2)
            if torch.compiler.is_compiling():  # products and sums: each one small fused reduction kernel
                a = (q[:, :, :, None].to(f) * k[:, :, None].to(f)).sum(-1)     # [B, H, T, C + T]
            else:                              # eager: matrix products
                a = (q @ k.transpose(2, 3)).to(f)
            a = (a * hd ** -0.5).masked_fill(~mask[:, None], -math.inf).softmax(-1)
            if torch.compiler.is_compiling():
                y = (a[..., None] * v[:, :, None].to(f)).sum(-2).to(v.dtype)  # [B, H, T, hd]
            else:
                y = a.to(v.dtype) @ v
        else:
            y = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask[:, None])
        return y.transpose(1, 2).reshape(B, T, H * hd)
    pad = nb * Q - T
    if pad:  # (F.pad copies even when it pads nothing)
        q, kv = F.pad(q, (0, 0, 0, 0, 0, pad)), F.pad(kv, (0, 0, 0, 0, 0, 0, 0, pad))
    q = q.reshape(B * nb, Q, H, hd).transpose(1, 2)                            # [B*nb, H, Q, hd]
    kv = kv.unfold(1, L, Q)                                                    # [B, nb, 2, H, hd, L]
    k, v = kv.permute(2, 0, 1, 3, 5, 4).reshape(2, B * nb, H, L, hd)          # [B*nb, H, L, hd] each
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=(mask if B == 1 else mask.repeat(B, 1, 1))[:, None])
    return y.transpose(1, 2).reshape(B, nb * Q, H * hd)[:, :T]


class Layer(nn.Module):
    """Pre-norm layer with layer scale (moshi/modules/transformer.py StreamingTransformerLayer)."""

    def __init__(self, cfg):
        super().__init__()
        D = cfg.dim
        self.n_heads = cfg.n_heads
        self.norm1, self.norm2 = nn.LayerNorm(D, eps=1e-5), nn.LayerNorm(D, eps=1e-5)
        self.in_proj = nn.Linear(D, 3 * D, bias=False)   # q, k, v; RoPE pairs interleaved (moshi)
        self.out_proj = nn.Linear(D, D, bias=False)
        self.linear1 = nn.Linear(D, cfg.ffn, bias=False)
        self.linear2 = nn.Linear(cfg.ffn, D, bias=False)
        self.layer_scale_1 = nn.Parameter(torch.full((D,), 0.01))
        self.layer_scale_2 = nn.Parameter(torch.full((D,), 0.01))

    def forward(self, x, rot, mask, cache, slots):
        # x [B, T, D]; rot [T, 3, 1, hd/2]; mask [nb, Q, Q + C]; cache [B, C, 2, H, hd], a ring: the last
        # len(slots) steps' keys and values go to slots, in place
        B, T, D = x.shape
        H = self.n_heads
        qkv = linear(self.norm1(x), self.in_proj.weight).view(B, T, 3, H, D // H // 2, 2)
        re, im = qkv.float().unbind(-1)                                        # [B, T, 3, H, hd/2] each
        cos, sin = rot
        qkv = torch.stack([re * cos - im * sin, re * sin + im * cos], -1).to(x.dtype).flatten(-2)
        kv = torch.cat([cache, qkv[:, :, 1:]], dim=1)                         # [B, C + T, 2, H, hd]
        y = linear(windowed_attention(qkv[:, :, 0], kv, mask), self.out_proj.weight)
        cache.index_copy_(1, slots, kv[:, kv.shape[1] - slots.shape[0]:])
        x = torch.addcmul(x, self.layer_scale_1, y)
        h = linear(F.gelu(linear(self.norm2(x), self.linear1.weight)), self.linear2.weight)
        return torch.addcmul(x, self.layer_scale_2, h)


class Transformer(nn.Module):
    """Causal transformer over [B, D, T]; its state is a ring of the last context - 1 keys and values of
    every layer with their absolute positions, so memory stays constant however long the stream."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.n_layers))
        self.state = None
        self.stacked = None  # the step kernels' copy of the weights, made afresh for each stream

    def init_state(self, B, device, dtype):
        c, C = self.cfg, self.cfg.context - 1
        state = [torch.zeros(c.n_layers, B, C, 2, c.n_heads, c.dim // c.n_heads, device=device, dtype=dtype),
                 torch.full((C,), -1, dtype=torch.long, device=device),   # position held by each slot
                 torch.zeros((), dtype=torch.long, device=device)]        # position of the next step
        self.stacked = None
        if step_kernels_supported(device) and B <= SMALL_ROWS:  # the step kernels' scratch
            state += [torch.empty(2 * SMALL_ROWS * c.n_heads * STEP_LAUNCH["splits"] * (c.dim // c.n_heads + 2),
                                  device=device, dtype=torch.float32),     # attention partials
                      torch.zeros(B * c.n_heads, device=device, dtype=torch.int32)]  # splits done per head
        return state

    def forward(self, x):  # [B, D, T] -> [B, D, T]
        cache, cache_pos, offset = self.state[:3]
        B, D, T = x.shape
        C = cache_pos.shape[0]
        qpos = offset + torch.arange(T, device=x.device)                      # [T] absolute positions
        slots = qpos[max(T - C, 0):] % C                                       # where the last C steps go
        rot = rope(qpos, D // self.cfg.n_heads, self.cfg.max_period)
        if len(self.state) == 5 and B * T <= SMALL_ROWS and _routes(x):
            x = _step_layers(self, x, rot, offset).view(B, T, D)
        else:
            kpos = torch.cat([cache_pos, qpos])                                # [C + T]
            # every query block must hold the whole ring (in slot order, not time order) in its keys
            mask = window_mask(qpos, kpos, self.cfg.context, min(T, max(QUERY_BLOCK, C)))
            x = x.transpose(1, 2)
            for i, layer in enumerate(self.layers):
                x = layer(x, rot, mask, cache[i], slots)
        cache_pos.index_copy_(0, slots, qpos[max(T - C, 0):])
        offset.add_(T)
        return x.transpose(1, 2)


# ----------------------------------------------------------------------------- streaming step kernels
# A streaming frame is 2 steps of each transformer. Compiled, a layer over those 2 rows is 16 small
# kernels; here it is 5 launches of one Triton kernel, a phase each: LayerNorm + q/k/v + RoPE; attention
# over the window, split among programs and merged by the last of each head to finish; output projection
# + layer scale + residual, which also writes the new keys and values into the ring; LayerNorm + linear1
# + GELU; linear2 + layer scale + residual. Products and sums in float32, as the compiled step. On an
# H100 a launch takes about 5 us however its work is cut (docs/mimi.md: what else was tried).
STEP_KERNELS = True    # use them for CUDA streaming steps of at most SMALL_ROWS rows (triton installed)
# programs: about this many programs a product (each at least 2 outputs); tile: the most weights a program
# multiplies at once; splits: programs per (row, head) over the window (a power of 2). Other settings
# were within 10% on an H100.
STEP_LAUNCH = dict(programs=256, tile=8192, warps=4, splits=16)
PHASES = 5             # launches a layer


def step_kernels_supported(device):
    return (STEP_KERNELS and triton is not None
            and (torch.device(device).type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"))


if triton is not None:
    @triton.jit
    def _rows_block(blk, x_ptr, w_ptr, y_ptr, lnw_ptr, lnb_ptr, cos_ptr, sin_ptr, s_ptr, qkv_ptr, ring_ptr, pos,
                    R, T, N: tl.constexpr, K: tl.constexpr, C, eps, LN: tl.constexpr, ROPE: tl.constexpr,
                    GELU: tl.constexpr, RES: tl.constexpr, RING: tl.constexpr, HD: tl.constexpr,
                    RP: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        # y[r, n] = f(LN(x[r]) . w[n]) for the rows r < R and the BN outputs n of block blk. ROPE: rotate the
        # pairs (2j, 2j + 1) of q and k (n < 2N/3) by the angles of step r % T; GELU: exact gelu; RES:
        # y[r, n] += s[n] (x[r] . w[n]). RING: also copy the new keys and values (qkv [R, 3N], columns n) of
        # each row into its ring slot (pos + r % T) % C of batch row r // T (ring [B, C, 2, N]).
        rn, rr, rk = blk * BN + tl.arange(0, BN), tl.arange(0, RP), tl.arange(0, BK)
        rmask, nmask = rr < R, rn < N
        dt = y_ptr.dtype.element_ty
        if K <= BK:  # one tile: the rows are loaded once, for the norm and the product
            kmask = rk < K
            w = tl.load(w_ptr + rn[:, None] * K + rk[None, :], mask=nmask[:, None] & kmask[None, :], other=0.0)
            m = rmask[:, None] & kmask[None, :]
            xk = tl.load(x_ptr + rr[:, None] * K + rk[None, :], mask=m, other=0.0).to(tl.float32)
            if LN:  # mean, then the variance about it, in float32
                xc = tl.where(m, xk - (tl.sum(xk, 1) / K)[:, None], 0.0)
                inv = tl.rsqrt(tl.sum(xc * xc, 1) / K + eps)
                lw = tl.load(lnw_ptr + rk, mask=kmask, other=0.0).to(tl.float32)
                lb = tl.load(lnb_ptr + rk, mask=kmask, other=0.0).to(tl.float32)
                xk = (xc * inv[:, None] * lw[None, :] + lb[None, :]).to(dt).to(tl.float32)
            acc = tl.sum(xk[:, None, :] * w.to(tl.float32)[None, :, :], 2)
        else:
            if LN:
                s1 = tl.zeros([RP, BK], tl.float32)
                for k0 in range(0, K, BK):
                    m = rmask[:, None] & (k0 + rk < K)[None, :]
                    s1 += tl.load(x_ptr + rr[:, None] * K + k0 + rk[None, :], mask=m, other=0.0).to(tl.float32)
                mean = tl.sum(s1, 1) / K
                s2 = tl.zeros([RP, BK], tl.float32)
                for k0 in range(0, K, BK):
                    m = rmask[:, None] & (k0 + rk < K)[None, :]
                    xk = tl.load(x_ptr + rr[:, None] * K + k0 + rk[None, :], mask=m, other=0.0)
                    xk = tl.where(m, xk.to(tl.float32) - mean[:, None], 0.0)
                    s2 += xk * xk
                inv = tl.rsqrt(tl.sum(s2, 1) / K + eps)
            acc3 = tl.zeros([RP, BN, BK], tl.float32)  # summed across the tile once, after the loop
            for k0 in range(0, K, BK):
                kk = k0 + rk
                kmask = kk < K
                w = tl.load(w_ptr + rn[:, None] * K + kk[None, :], mask=nmask[:, None] & kmask[None, :], other=0.0)
                xk = tl.load(x_ptr + rr[:, None] * K + kk[None, :], mask=rmask[:, None] & kmask[None, :],
                             other=0.0).to(tl.float32)
                if LN:
                    lw = tl.load(lnw_ptr + kk, mask=kmask, other=0.0).to(tl.float32)
                    lb = tl.load(lnb_ptr + kk, mask=kmask, other=0.0).to(tl.float32)
                    xk = ((xk - mean[:, None]) * inv[:, None] * lw[None, :] + lb[None, :]).to(dt).to(tl.float32)
                acc3 += xk[:, None, :] * w.to(tl.float32)[None, :, :]
            acc = tl.sum(acc3, 2)
        y = acc.to(dt).to(tl.float32)
        if ROPE:  # the q and k columns (n < 2N/3)
            j = (blk * (BN // 2) + tl.arange(0, BN // 2)) % (HD // 2)                # [BN/2] pair's frequency
            at = (rr % T)[:, None] * (HD // 2) + j[None, :]
            cs, sn = tl.load(cos_ptr + at), tl.load(sin_ptr + at)                     # [RP, BN/2]
            re, im = tl.split(tl.reshape(y, [RP, BN // 2, 2]))
            y = tl.where((rn < 2 * (N // 3))[None, :],
                         tl.reshape(tl.join(re * cs - im * sn, re * sn + im * cs), [RP, BN]), y)
        if GELU:
            y = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))
        out = y_ptr + rr[:, None] * N + rn[None, :]
        omask = rmask[:, None] & nmask[None, :]
        if RES:
            y = tl.load(out, mask=omask, other=0.0).to(tl.float32) + \
                tl.load(s_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :] * y
        tl.store(out, y.to(dt), mask=omask)
        if RING:
            t = rr % T
            slot = (pos + t) % C
            ok = omask & (t >= T - C)[:, None]
            src = qkv_ptr + rr[:, None] * (3 * N) + N + rn[None, :]
            dst = ring_ptr + ((rr // T) * C + slot)[:, None] * (2 * N) + rn[None, :]
            tl.store(dst, tl.load(src, mask=ok, other=0.0), mask=ok)
            tl.store(dst + N, tl.load(src + N, mask=ok, other=0.0), mask=ok)

    @triton.jit
    def _attend_block(b, h, s, qkv_ptr, ring_ptr, kpos_ptr, pos, part_ptr, count_ptr, y_ptr, T, C, context, per,
                      scale, H: tl.constexpr, HD: tl.constexpr, TP: tl.constexpr, S: tl.constexpr,
                      BL: tl.constexpr):
        # The T queries (steps pos .. pos + T - 1) of head h, batch row b, over the ring slots
        # [s * per, (s + 1) * per), and in the last split over the T new keys (causal, within the window).
        # Each split writes its softmax partials (max, sum, weighted values); the last split of (b, h) to
        # finish merges them into y [B * T, H * HD].
        D: tl.constexpr = H * HD
        rt, rd, rl = tl.arange(0, TP), tl.arange(0, HD), tl.arange(0, BL)
        tmask = rt < T
        rows = qkv_ptr + (b * T + rt)[:, None] * (3 * D) + h * HD + rd[None, :]           # [TP, HD]
        q = tl.load(rows, mask=tmask[:, None], other=0.0).to(tl.float32)
        m = tl.full([TP], -1e30, tl.float32)
        l = tl.zeros([TP], tl.float32)
        acc = tl.zeros([TP, HD], tl.float32)
        if s == S - 1:  # the new keys: step t sees steps t' <= t of this chunk, within the window
            kn = tl.load(rows + D, mask=tmask[:, None], other=0.0).to(tl.float32)
            vn = tl.load(rows + 2 * D, mask=tmask[:, None], other=0.0).to(tl.float32)
            a = tl.sum(q[:, None, :] * kn[None, :, :], 2) * scale                         # [TP, TP]
            d = rt[:, None] - rt[None, :]
            a = tl.where((d >= 0) & (d < context) & tmask[None, :], a, -float("inf"))
            m = tl.max(a, 1)
            p = tl.exp(a - m[:, None])
            l = tl.sum(p, 1)
            acc = tl.sum(p[:, :, None] * vn[None, :, :], 1)
        for j0 in range(s * per, tl.minimum(s * per + per, C), BL):
            j = j0 + rl
            jm = (j < C) & (j < s * per + per)
            kp = tl.load(kpos_ptr + j, mask=jm, other=-1)
            vis = (jm & (kp >= 0))[None, :] & ((pos + rt)[:, None] - kp[None, :] < context)   # [TP, BL]
            at = ring_ptr + ((b * C + j) * 2 * D + h * HD)[:, None] + rd[None, :]
            kb = tl.load(at, mask=jm[:, None], other=0.0).to(tl.float32)
            vb = tl.load(at + D, mask=jm[:, None], other=0.0).to(tl.float32)
            a = tl.where(vis, tl.sum(q[:, None, :] * kb[None, :, :], 2) * scale, -float("inf"))
            m2 = tl.maximum(m, tl.max(a, 1))
            p = tl.exp(a - m2[:, None])
            r = tl.exp(m - m2)
            l = l * r + tl.sum(p, 1)
            acc = acc * r[:, None] + tl.sum(p[:, :, None] * vb[None, :, :], 1)
            m = m2
        part = part_ptr + ((b * H + h) * S + s) * TP * (HD + 2)      # per split: m [TP], l [TP], acc [TP, HD]
        tl.store(part + rt, m)
        tl.store(part + TP + rt, l)
        tl.store(part + 2 * TP + rt[:, None] * HD + rd[None, :], acc)
        tl.debug_barrier()                                           # every thread's partials are stored,
        done = tl.atomic_add(count_ptr + b * H + h, 1, sem="acq_rel")  # then seen by the last split
        if done == S - 1:
            base = part_ptr + ((b * H + h) * S + tl.arange(0, S)) * TP * (HD + 2)             # [S]
            ms = tl.load(base[:, None] + rt[None, :])                 # [S, TP]
            wt = tl.exp(ms - tl.max(ms, 0)[None, :])
            ls = tl.sum(wt * tl.load(base[:, None] + TP + rt[None, :]), 0)   # [TP]
            ys = tl.load(base[:, None, None] + 2 * TP + rt[None, :, None] * HD + rd[None, None, :])                                              # [S, TP, HD]
            yv = tl.sum(wt[:, :, None] * ys, 0) / ls[:, None]
            tl.store(y_ptr + (b * T + rt)[:, None] * D + h * HD + rd[None, :], yv.to(y_ptr.dtype.element_ty),
                     mask=tmask[:, None])
            tl.store(count_ptr + b * H + h, 0)

    @triton.jit
    def _phase_kernel(x_ptr, qkv_ptr, att_ptr, ff_ptr, wqkv_ptr, wo_ptr, w1_ptr, w2_ptr, n1w_ptr, n1b_ptr,
                      n2w_ptr, n2b_ptr, ls1_ptr, ls2_ptr, cos_ptr, sin_ptr, ring_ptr, kpos_ptr, pos_ptr, part_ptr,
                      count_ptr, R, T, B, C, context, per, scale, eps, i, WHAT: tl.constexpr, D: tl.constexpr,
                      FF: tl.constexpr, H: tl.constexpr, RP: tl.constexpr, TP: tl.constexpr, S: tl.constexpr,
                      BL: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        # phase WHAT of layer i (weights stacked [L, ...]): 0 q/k/v, 1 attention, 2 output, 3 linear1, 4 linear2
        pid = tl.program_id(0)
        HD: tl.constexpr = D // H
        pos = tl.load(pos_ptr)
        ring = ring_ptr + i * B * C * 2 * D
        if WHAT == 0:    # LayerNorm + q, k, v + RoPE
            _rows_block(pid, x_ptr, wqkv_ptr + i * 3 * D * D, qkv_ptr, n1w_ptr + i * D, n1b_ptr + i * D,
                        cos_ptr, sin_ptr, x_ptr, x_ptr, x_ptr, pos, R, T, 3 * D, D, C, eps, True, True, False,
                        False, False, HD, RP, BN, BK)
        elif WHAT == 1:  # attention over the ring and the new steps: program (b, h, split)
            _attend_block(pid // (H * S), (pid // S) % H, pid % S, qkv_ptr, ring, kpos_ptr, pos, part_ptr,
                          count_ptr, att_ptr, T, C, context, per, scale, H, HD, TP, S, BL)
        elif WHAT == 2:  # output projection + layer scale + residual; new keys and values to the ring
            _rows_block(pid, att_ptr, wo_ptr + i * D * D, x_ptr, x_ptr, x_ptr, x_ptr, x_ptr, ls1_ptr + i * D,
                        qkv_ptr, ring, pos, R, T, D, D, C, eps, False, False, False, True, True, HD, RP, BN, BK)
        elif WHAT == 3:  # LayerNorm + linear1 + GELU
            _rows_block(pid, x_ptr, w1_ptr + i * FF * D, ff_ptr, n2w_ptr + i * D, n2b_ptr + i * D, x_ptr,
                        x_ptr, x_ptr, x_ptr, x_ptr, pos, R, T, FF, D, C, eps, True, False, True, False, False, HD,
                        RP, BN, BK)
        else:            # linear2 + layer scale + residual
            _rows_block(pid, ff_ptr, w2_ptr + i * D * FF, x_ptr, x_ptr, x_ptr, x_ptr, x_ptr, ls2_ptr + i * D,
                        x_ptr, x_ptr, pos, R, T, D, FF, C, eps, False, False, False, True, False, HD, RP, BN, BK)


def _blocks(N, K, R):
    """Block shape (BN outputs, BK inputs) of a product with N outputs over K inputs and R rows."""
    BN = max(2, min(64, triton.next_power_of_2(N) // STEP_LAUNCH["programs"]))
    BK = min(triton.next_power_of_2(K), max(16, STEP_LAUNCH["tile"] // (BN * triton.next_power_of_2(R))))
    return BN, BK


def _stacked(tr):
    """The layers' weights stacked per kind, [L, ...] each, as the kernel reads them."""
    ls = tr.layers
    return [torch.stack([getattr(getattr(l, m), p) for l in ls]).contiguous() for m, p in (
        ("in_proj", "weight"), ("out_proj", "weight"), ("linear1", "weight"), ("linear2", "weight"),
        ("norm1", "weight"), ("norm1", "bias"), ("norm2", "weight"), ("norm2", "bias"))] + \
        [torch.stack([getattr(l, p) for l in ls]).contiguous() for p in ("layer_scale_1", "layer_scale_2")]


@torch.compiler.disable  # Triton launches that update the state in place: outside any compiled graph
def _step_layers(tr, x_in, rot, offset):
    """The transformer's layers over x_in [B, D, T] as Triton kernels -> [B * T, D], rows batch-major."""
    if tr.stacked is None:  # once a stream, on first use (so not inside a CUDA graph's capture)
        tr.stacked = _stacked(tr)
    cache, cache_pos, _, part, count = tr.state
    B, D, T = x_in.shape
    R, C, H, FF = B * T, cache.shape[2], tr.cfg.n_heads, tr.cfg.ffn
    cos, sin = (r[:, 0, 0].contiguous() for r in rot)                            # [T, hd/2] each
    x = x_in.new_empty(R, D)                                                  # updated in place below
    x.view(B, T, D).copy_(x_in.transpose(1, 2))
    qkv, att, ff = x.new_empty(R, 3 * D), torch.empty_like(x), x.new_empty(R, FF)
    S = STEP_LAUNCH["splits"]
    per = triton.cdiv(C, S)
    TP = triton.next_power_of_2(T)
    BL = max(1, min(triton.next_power_of_2(per), 4096 // (TP * D // H)))
    shapes = {0: (3 * D, D), 2: (D, D), 3: (FF, D), 4: (D, FF)}
    for i in range(len(tr.layers)):
        for what in range(PHASES):
            if what == 1:
                grid, (BN, BK) = B * H * S, (2, 16)
            else:
                N, K = shapes[what]
                BN, BK = _blocks(N, K, R)
                grid = triton.cdiv(N, BN)
            _phase_kernel[(grid,)](
                x, qkv, att, ff, *tr.stacked, cos, sin, cache, cache_pos, offset, part, count, R, T, B, C,
                tr.cfg.context, per, (D // H) ** -0.5, tr.layers[0].norm1.eps, i, WHAT=what, D=D, FF=FF, H=H,
                RP=triton.next_power_of_2(R), TP=TP, S=S, BL=BL, BN=BN, BK=BK, num_warps=STEP_LAUNCH["warps"])
    return x


# ----------------------------------------------------------------------------- streaming conv kernels
# In a streaming frame the SEANets' layers see 1920 steps down to 2. As PyTorch ops each convolution is
# an unfold, a matrix product and the ELU, bias and residual around it: several launches of a few
# microseconds each. Here each is one Triton kernel that reads the unfolded input where it lies, applies
# the ELU as it loads it, and adds the bias and the residual as it stores. Two kernels:
# - at most CONV_ROWS output rows (batch x steps; the layers nearest the transformers, with the largest
#   weights, up to 34 MB): every program takes all rows and a block of outputs, and reads the weight once;
# - up to CONV_TILE_ROWS rows and CONV_TILE_K inputs an output: tiles of rows x outputs.
CONV_KERNELS = True    # use them for convolutions of at most CONV_TILE_ROWS rows on CUDA (triton installed)
CONV_ROWS = 16
CONV_LAUNCH = {2: (256, 8192, 8), 16: (128, 16384, 4)}  # rows up to: (programs, tile, warps)
CONV_TILE_ROWS, CONV_TILE_K = 4096, 256   # tile kernel: at most this many rows, and inputs an output (K):
# its programs walk K in steps, one after another, so long ones are slower than cuBLAS's split products
CONV_DOT = "tf32x3"    # the tile kernel's products: float32-accurate on tensor cores (3 TF32 products each)
# tiles (rows, outputs), the first that makes `programs`; the best in a sweep of 16-64 x 16-64 tiles on an H100
CONV_TILES = dict(programs=64, tiles=((64, 32), (16, 32)), BK=32, warps=4)


def conv_kernels_supported(device):
    return (CONV_KERNELS and triton is not None
            and (torch.device(device).type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"))


def _conv_blocks(N, K, RP):
    """(BN outputs a program, BK inputs a step, warps) for N outputs over K inputs and RP (padded) rows.
    Every program loads (and applies the ELU to) all the rows' inputs: with many rows, fewer programs."""
    programs, tile, warps = CONV_LAUNCH[min(CONV_LAUNCH, key=lambda r: (r < RP, r))]
    BN = max(2, min(64, triton.next_power_of_2(N) // programs))
    return BN, min(triton.next_power_of_2(K), max(16, tile // (BN * RP))), warps


def _conv_tiles(R, N):
    """(BM rows, BN outputs) of the tile kernel: the largest tile that still makes CONV_TILES["programs"]
    programs, else the smallest."""
    tiles = CONV_TILES["tiles"]
    return next((t for t in tiles if triton.cdiv(R, t[0]) * triton.cdiv(N, t[1]) >= CONV_TILES["programs"]),
                tiles[-1])


def _conv_kernel_route(x, rows, N, K):
    """Whether a convolution of `rows` output rows, N outputs and K inputs each takes a conv kernel: the
    streaming shapes (larger products, as in batch calls, are cuDNN's or cuBLAS's)."""
    small = rows <= CONV_ROWS or (rows <= CONV_TILE_ROWS and K <= CONV_TILE_K)
    return small and _routes(x) and conv_kernels_supported(x.device)


if triton is not None:
    @triton.jit
    def _conv_inputs(x_ptr, xrow, rmask, kk, kmask, L, KS: tl.constexpr, dil: tl.constexpr, ELU: tl.constexpr,
                     dt: tl.constexpr):
        """The unfolded f(x) [rows, inputs] (float32) for the rows starting at xrow and the inputs kk."""
        xv = tl.load(x_ptr + xrow[:, None] + ((kk // KS) * L + (kk % KS) * dil)[None, :],
                     mask=rmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
        if ELU:  # rounded to the input's type, as PyTorch's ELU would leave it
            xv = tl.where(xv > 0, xv, tl.exp(xv) - 1.0).to(dt).to(tl.float32)
        return xv

    @triton.jit
    def _conv_store(acc, rr, rn, rmask, nmask, b_ptr, r_ptr, y_ptr, N, Tout, BIAS: tl.constexpr,
                    RES: tl.constexpr):
        """y[b, n, t] = acc (+ bias[n]) (+ r[b, n, t]) for the rows rr = b * Tout + t and outputs rn."""
        dt = y_ptr.dtype.element_ty
        if BIAS:
            acc += tl.load(b_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
        off = ((rr // Tout) * (N * Tout) + rr % Tout)[:, None] + rn[None, :] * Tout
        m = rmask[:, None] & nmask[None, :]
        y = acc.to(dt)
        if RES:
            y = (y.to(tl.float32) + tl.load(r_ptr + off, mask=m, other=0.0).to(tl.float32)).to(dt)
        tl.store(y_ptr + off, y, mask=m)

    @triton.jit
    def _conv_rows_kernel(x_ptr, w_ptr, b_ptr, r_ptr, y_ptr, R, L, Tout, N, K, KS: tl.constexpr,
                          stride: tl.constexpr, dil: tl.constexpr, ELU: tl.constexpr, BIAS: tl.constexpr,
                          RES: tl.constexpr, RP: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        # y[b, n, t] = bias[n] + sum_k w[n, k] f(x[b, k // KS, t * stride + (k % KS) * dil]) (+ r[b, n, t]),
        # f = ELU or identity, for the BN outputs n of this program and every row r = b * Tout + t < R
        rn, rr, rk = tl.program_id(0) * BN + tl.arange(0, BN), tl.arange(0, RP), tl.arange(0, BK)
        nmask, rmask = rn < N, rr < R
        xrow = (rr // Tout) * ((K // KS) * L) + (rr % Tout) * stride           # [RP] where row r's window starts
        acc3 = tl.zeros([RP, BN, BK], tl.float32)                               # summed over k after the loop
        for k0 in range(0, K, BK):
            kk = k0 + rk
            kmask = kk < K
            xv = _conv_inputs(x_ptr, xrow, rmask, kk, kmask, L, KS, dil, ELU, y_ptr.dtype.element_ty)  # [RP, BK]
            w = tl.load(w_ptr + rn[:, None] * K + kk[None, :], mask=nmask[:, None] & kmask[None, :],
                        other=0.0).to(tl.float32)                                            # [BN, BK]
            acc3 += xv[:, None, :] * w[None, :, :]
        _conv_store(tl.sum(acc3, 2), rr, rn, rmask, nmask, b_ptr, r_ptr, y_ptr, N, Tout, BIAS, RES)

    @triton.jit
    def _conv_tile_kernel(x_ptr, w_ptr, b_ptr, r_ptr, y_ptr, R, L, Tout, N, K, KS: tl.constexpr,
                          stride: tl.constexpr, dil: tl.constexpr, ELU: tl.constexpr, BIAS: tl.constexpr,
                          RES: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                          DOT: tl.constexpr):
        # as _conv_rows_kernel, for the BM rows x BN outputs of this program: tile products
        rm = tl.program_id(0) * BM + tl.arange(0, BM)
        rn = tl.program_id(1) * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        mmask, nmask = rm < R, rn < N
        xrow = (rm // Tout) * ((K // KS) * L) + (rm % Tout) * stride           # [BM] where row r's window starts
        acc = tl.zeros([BM, BN], tl.float32)
        for k0 in range(0, K, BK):
            kk = k0 + rk
            kmask = kk < K
            xv = _conv_inputs(x_ptr, xrow, mmask, kk, kmask, L, KS, dil, ELU, y_ptr.dtype.element_ty)  # [BM, BK]
            w = tl.load(w_ptr + rn[None, :] * K + kk[:, None], mask=nmask[None, :] & kmask[:, None],
                        other=0.0).to(tl.float32)                                            # [BK, BN]
            acc += tl.dot(xv, w, input_precision=DOT)
        _conv_store(acc, rm, rn, mmask, nmask, b_ptr, r_ptr, y_ptr, N, Tout, BIAS, RES)

    @torch.library.triton_op("mimi::conv_rows", mutates_args=())
    def _conv_rows_op(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor, res: torch.Tensor, k: int,
                      stride: int, dil: int, elu: bool, has_bias: bool, has_res: bool) -> torch.Tensor:
        B, Cin, L = x.shape
        N, K = w.shape
        Tout = (L - (k - 1) * dil - 1) // stride + 1
        y = x.new_empty(B, N, Tout)
        R = B * Tout
        if R <= CONV_ROWS:
            RP = triton.next_power_of_2(R)
            BN, BK, warps = _conv_blocks(N, K, RP)
            torch.library.wrap_triton(_conv_rows_kernel)[(triton.cdiv(N, BN),)](
                x, w, bias, res, y, R, L, Tout, N, K, k, stride, dil, ELU=elu, BIAS=has_bias, RES=has_res,
                RP=RP, BN=BN, BK=BK, num_warps=warps)
        else:
            BM, BN = _conv_tiles(R, N)
            torch.library.wrap_triton(_conv_tile_kernel)[(triton.cdiv(R, BM), triton.cdiv(N, BN))](
                x, w, bias, res, y, R, L, Tout, N, K, k, stride, dil, ELU=elu, BIAS=has_bias, RES=has_res,
                BM=BM, BN=BN, BK=CONV_TILES["BK"], DOT=CONV_DOT, num_warps=CONV_TILES["warps"])
        return y


def _conv_rows(x, w, bias, res, k, stride, dil, elu):
    """y [B, N, Tout] = w [N, Cin * k] @ the unfolded f(x) [B, Cin * k, Tout] (+ bias [N]) (+ res
    [B, N, Tout]), f = ELU if elu, for B * Tout <= CONV_TILE_ROWS: one kernel launch."""
    return _conv_rows_op(x.contiguous(), w.contiguous(), x if bias is None else bias,
                         x if res is None else res.contiguous(), k, stride, dil, elu, bias is not None,
                         res is not None)


# ----------------------------------------------------------------------------- quantizer

class RVQ(nn.Module):
    """Residual vector quantizer (moshi/quantization/vq.py, core_vq.py): project to q_dim, then each stage
    codes what the stages before it left with its nearest centroid (Euclidean)."""

    def __init__(self, dim, q_dim, n, bins):
        super().__init__()
        self.input_proj = nn.Conv1d(dim, q_dim, 1, bias=False)
        self.output_proj = nn.Conv1d(q_dim, dim, 1, bias=False)
        self.register_buffer("codebook", torch.zeros(n, bins, q_dim))         # centroids
        self.register_buffer("codebook_sq", torch.zeros(n, bins), persistent=False)
        self.kernel = False  # while streaming with the conv kernels: the projections take them

    def refresh(self):
        """Recompute |c|^2 after the centroids change."""
        self.codebook_sq = self.codebook.pow(2).sum(-1)
        return self

    def encode(self, x):  # [B, dim, F] -> [B, n, F]
        B, _, Fr = x.shape
        r = _conv(self.input_proj, x.to(self.codebook.dtype), kernel=self.kernel)
        r = r.transpose(1, 2).reshape(B * Fr, -1)                               # [N, q_dim]
        codes = []
        for cb, sq in zip(self.codebook, self.codebook_sq):
            # argmin |r - c|^2 = argmin |c|^2 - 2 r.c: the matmul route torch.cdist takes in moshi
            if _few_rows(r, r.shape[0]):
                d = sq - 2 * linear_as_sum(r, cb)
            else:
                d = torch.addmm(sq, r, cb.T, alpha=-2)
            idx = d.argmin(-1)                                                 # [N]
            r = r - cb[idx]
            codes.append(idx)
        return torch.stack(codes, 1).view(B, Fr, -1).transpose(1, 2)

    def decode(self, codes):  # [B, n, F] -> [B, dim, F]
        q = self.codebook[0][codes[:, 0]]                                      # [B, F, q_dim]
        for k in range(1, codes.shape[1]):
            q = q + self.codebook[k][codes[:, k]]
        return _conv(self.output_proj, q.transpose(1, 2), kernel=self.kernel)


class Quantizer(nn.Module):
    """Split RVQ: codebook 0 quantizes one projection of the latent (semantic, distilled from WavLM), the
    acoustic codebooks quantize another; the two decoded parts add (moshi SplitResidualVectorQuantizer)."""

    def __init__(self, cfg, num_codebooks):
        super().__init__()
        self.rvq_first = RVQ(cfg.dim, cfg.q_dim, 1, cfg.bins)
        self.rvq_rest = RVQ(cfg.dim, cfg.q_dim, num_codebooks - 1, cfg.bins)

    def refresh(self):
        self.rvq_first.refresh(), self.rvq_rest.refresh()
        return self

    def encode(self, x):
        codes = self.rvq_first.encode(x)
        if len(self.rvq_rest.codebook):
            codes = torch.cat([codes, self.rvq_rest.encode(x)], 1)
        return codes

    def decode(self, codes):
        x = self.rvq_first.decode(codes[:, :1])
        return x + self.rvq_rest.decode(codes[:, 1:]) if codes.shape[1] > 1 else x


# ----------------------------------------------------------------------------- the codec

@contextlib.contextmanager
def _no_tf32():
    """Float32 as float32 for the call: PyTorch runs cuDNN convolutions in TF32 by default (and matrix
    products too when asked), which moves codes (6% of them over 24 s of audio, measured on an H100)."""
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


def _joined(ys, empty):
    """Chunk outputs joined along time (empty() when there are none)."""
    return ys[0] if len(ys) == 1 else torch.cat(ys, -1) if ys else empty()


class Mimi(nn.Module):
    """The codec. encode: wav [B, 1, T] float at 24 kHz -> codes [B, K, F] int64; decode: the reverse.
    Load the released weights with Mimi.from_pretrained."""

    def __init__(self, cfg: MimiConfig = None, num_codebooks: int = 8):
        super().__init__()
        cfg = cfg or MimiConfig()
        self.cfg = cfg
        stride = round(SAMPLE_RATE / math.prod(cfg.ratios) / FRAME_RATE)       # 25 Hz -> 12.5 Hz: 2
        self.encoder = SEANet(cfg)
        self.encoder_transformer = Transformer(cfg)
        self.downsample = Conv(cfg.dim, cfg.dim, 2 * stride, stride, bias=False, replicate=True)
        self.quantizer = Quantizer(cfg, num_codebooks)
        # depthwise (groups=dim): the released weights come from moshi's upsample_channel_wise_bug=True
        self.upsample = ConvTr(cfg.dim, cfg.dim, 2 * stride, stride, groups=cfg.dim, bias=False)
        self.decoder_transformer = Transformer(cfg)
        self.decoder = SEANet(cfg, decoder=True)
        self.chunk_frames = None  # None: CUDA_CHUNK_FRAMES on CUDA, CHUNK_FRAMES elsewhere
        self._streaming, self._graphs, self._compile, self._compiled = False, None, False, {}

    @property
    def num_codebooks(self):
        return 1 + len(self.quantizer.rvq_rest.codebook)

    @property
    def device(self):
        return self.downsample.conv.weight.device

    @property
    def dtype(self):
        return self.downsample.conv.weight.dtype

    # --- the two halves, on chunks of whole frames, states carried in the modules
    def _latent(self, wav):  # [B, 1, n * FRAME_SIZE] -> [B, D, n]
        h = self.encoder(wav.to(self.dtype))                                  # [B, D, 2n] at 25 Hz
        return self.downsample(self.encoder_transformer(h)).float()           # [B, D, n] at 12.5 Hz

    def _encode_step(self, wav):  # -> [B, K, n]
        return self.quantizer.encode(self._latent(wav))

    def _decode_step(self, codes):  # [B, K, n] -> (wav [B, 1, n * FRAME_SIZE], any code out of range?)
        # clamped, so that codes out of range (reported by decode once the step is done) index nothing
        # outside the codebooks; the check is part of the step, so a CUDA graph holds it too
        inside = codes.clamp(0, self.cfg.bins - 1)
        h = self.upsample(self.quantizer.decode(inside).to(self.dtype))                 # [B, D, 2n]
        return self.decoder(self.decoder_transformer(h)).float(), (inside != codes).any()

    def _stateful(self, half=None):
        """The modules that carry a state: all, or those of one half ("encode" or "decode")."""
        parts = {"encode": (self.encoder, self.encoder_transformer, self.downsample),
                 "decode": (self.upsample, self.decoder_transformer, self.decoder)}.get(half, (self,))
        return [m for p in parts for m in p.modules() if hasattr(m, "init_state")]

    def _set_state(self, B, half=None):
        for m in self._stateful(half):
            m.state = None if B is None else m.init_state(B, self.device, self.dtype)
        self._batch = B

    @contextlib.contextmanager
    def _fresh_state(self, B, half):
        self._set_state(B, half)  # only the half the call runs: fewer allocations before its first kernel
        try:
            yield
        finally:
            self._set_state(None)

    @contextlib.contextmanager
    def streaming(self, batch_size: int, cuda_graph: bool = False, compile: bool = False):
        """Inside this block, encode and decode take chunks of whole frames of one stream each per batch
        row and carry every convolution and attention state, so any split of a stream gives the batch
        result. The state is bounded: conv left contexts and the last 249 steps of attention.
        cuda_graph=True (CUDA only, ignored elsewhere) records one CUDA graph per chunk shape on first
        use and replays it: no per-op launch cost, for frame-by-frame use. compile=True first runs the
        steps through torch.compile, which fuses elementwise ops (a few minutes on first use). On CUDA
        (with triton installed) the transformers of a step of at most SMALL_ROWS rows (batch x 25 Hz
        steps) run as Triton kernels; STEP_KERNELS = False turns them off for streams opened after."""
        if self._streaming:
            raise MimiError("this Mimi is already streaming; leave the first `with mimi.streaming()` block "
                            "(or use a second Mimi) before starting another stream")
        try:
            self._set_state(batch_size)
            kernels = conv_kernels_supported(self.device)  # streaming only: in a batch call (eager) a Triton
            for m in self.modules():                       # launch costs the host more than cuBLAS's
                if isinstance(m, (Conv, RVQ)):
                    m.kernel = kernels
                elif isinstance(m, ConvTr) and m.convtr.groups == 1 and kernels:  # read in output order
                    w = m.convtr.weight.detach()
                    m.wt = w.reshape(w.shape[0], -1).t().contiguous()
            self._streaming = True
            self._graphs = {} if cuda_graph and self.device.type == "cuda" else None
            self._compile = compile
            yield self
        finally:
            self._set_state(None)
            for m in self.modules():
                if isinstance(m, (Conv, RVQ)):
                    m.kernel = False
                elif isinstance(m, ConvTr):
                    m.wt = None
            self._streaming, self._graphs, self._compile = False, None, False

    def _captured(self, name, x, floating):
        """The CUDA graph of a streaming call whose chunk shape was captured before (and so checked then),
        or None: such calls skip the checks and go straight to the replay."""
        if not self._graphs or not torch.is_tensor(x) or x.is_floating_point() != floating or x.is_complex():
            return None
        return self._graphs.get((name, tuple(x.shape)))

    @staticmethod
    def _replay(graph, x):
        x_in, y_out, g = graph
        x_in.copy_(x.detach())  # (no autograd here: the replay is outside any no_grad block)
        g.replay()
        if isinstance(y_out, tuple):  # (output, check): the caller reads the check before the next replay
            return (y_out[0].clone(),) + y_out[1:]
        return y_out.clone()

    def _run(self, name, fn, x):
        key = (name, tuple(x.shape))
        if self._graphs is None or key not in self._graphs:
            with _no_tf32():  # (a graph's replay chooses no kernel: it needs no switch, nor its cost)
                if self._compile:  # compiled once per Mimi: its guards are on shapes, not on the state tensors
                    if name not in self._compiled:
                        # combo kernels: Inductor launches independent small kernels as one (measured: 0.04-0.18
                        # ms a frame saved encoding on an H100)
                        # (the transformer's step kernels run between graphs: fullgraph only without them)
                        self._compiled[name] = torch.compile(fn, fullgraph=not step_kernels_supported(self.device),
                                                             dynamic=False, options={"combo_kernels": True})
                    fn = self._compiled[name]
                if self._graphs is None:
                    return fn(x)
                self._graphs[key] = self._capture(fn, x)
        return self._replay(self._graphs[key], x)

    def _capture(self, fn, x):
        # Warm-up and capture run the step, so put the state back as it was afterwards; the replays
        # then read and write the very same state tensors as the plain path.
        saved = [t.clone() for m in self._stateful() for t in m.state]
        x_in = x.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                fn(x_in)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y_out = fn(x_in)
        for t, v in zip([t for m in self._stateful() for t in m.state], saved):
            t.copy_(v)
        return x_in, y_out, graph

    def _process(self, name, fn, x, per_frame):
        """[fn(chunk)] over x in chunks of whole frames: the open stream's state, or a fresh one for a batch
        call."""
        if self._streaming and x.shape[0] != self._batch:
            raise MimiError(f"this stream was opened with streaming(batch_size={self._batch}), got a batch of "
                            f"{x.shape[0]}")
        if self._streaming and x.shape[-1] == 0:
            raise MimiError(f"{name}: an empty chunk; a stream advances by whole frames")
        half = "decode" if name == "decode" else "encode"
        with contextlib.nullcontext() if self._streaming else self._fresh_state(x.shape[0], half):
            n = (self.chunk_frames or (CUDA_CHUNK_FRAMES if x.is_cuda else CHUNK_FRAMES)) * per_frame
            if x.shape[-1] <= n:  # one chunk (every streaming call that fits one): no slicing
                return [self._run(name, fn, x)]
            return [self._run(name, fn, x[..., i:i + n]) for i in range(0, x.shape[-1], n)]

    def encode(self, wav: torch.Tensor) -> torch.Tensor:
        """wav [B, 1, T] float at 24 kHz -> codes [B, K, ceil(T / 1920)] int64 on the model's device.
        In batch, the end is zero-padded to whole frames (as the official package does); when streaming,
        T must be a multiple of FRAME_SIZE."""
        graph = self._captured("encode", wav, True)
        return self._replay(graph, wav) if graph else self._encode(wav)

    @torch.no_grad()
    def _encode(self, wav):
        if not torch.is_tensor(wav) or wav.ndim != 3 or wav.shape[1] != 1 or not wav.is_floating_point():
            got = f"{tuple(wav.shape)} {wav.dtype}" if torch.is_tensor(wav) else type(wav).__name__
            raise MimiError(f"encode takes a float tensor [batch, 1, samples] at {SAMPLE_RATE} Hz, got {got}; "
                            "put the channels of a stereo conversation in the batch: wav[:, None] for [2, T]")
        T = wav.shape[-1]
        if self._streaming and T % FRAME_SIZE:
            raise MimiError(f"when streaming, encode takes whole frames of {FRAME_SIZE} samples, got {T}: buffer "
                            "the audio, or zero-pad the last chunk of a stream")
        wav = wav.to(self.device)
        if T % FRAME_SIZE:
            wav = F.pad(wav, (0, -T % FRAME_SIZE))
        return _joined(self._process("encode", self._encode_step, wav, FRAME_SIZE), lambda: torch.zeros(
            wav.shape[0], self.num_codebooks, 0, dtype=torch.long, device=self.device))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, K, F] integers in [0, 2048) with 1 <= K <= num_codebooks -> wav [B, 1, F * 1920]
        float32 on the model's device. Codes out of range raise MimiError (when streaming, after the
        stream has moved past them)."""
        graph = self._captured("decode", codes, False)
        return self._checked(codes, [self._replay(graph, codes)]) if graph else self._decode(codes)

    @torch.no_grad()
    def _decode(self, codes):
        if not torch.is_tensor(codes) or codes.ndim != 3 or codes.is_floating_point() or codes.is_complex():
            got = f"{tuple(codes.shape)} {codes.dtype}" if torch.is_tensor(codes) else type(codes).__name__
            raise MimiError(f"decode takes an integer tensor [batch, codebooks, frames], got {got}")
        K = codes.shape[1]
        if not 1 <= K <= self.num_codebooks:
            raise MimiError(f"codes have {K} codebooks but this Mimi was loaded with num_codebooks="
                            f"{self.num_codebooks}; load it with Mimi.from_pretrained(..., num_codebooks={max(K, 1)})")
        codes = codes.to(self.device, torch.long)
        return self._checked(codes, self._process("decode", self._decode_step, codes, 1))

    def _checked(self, codes, ys):
        """The audio of decode's chunks ys [(wav, any code out of range?)], or MimiError. The range is
        checked inside the step (a CUDA graph included), and read back once it is queued: on a GPU the read
        waits for the step (the caller waits for the audio anyway) rather than delaying it; out-of-range
        codes raise instead of returning that audio."""
        wav = _joined([y for y, _ in ys], lambda: torch.zeros(codes.shape[0], 1, 0, device=self.device))
        if ys and (ys[0][1] if len(ys) == 1 else torch.stack([b for _, b in ys]).any()).item():
            lo, hi = torch.stack(torch.aminmax(codes.flatten())).tolist()
            raise MimiError(f"codes must lie in [0, {self.cfg.bins}); got values from {lo} to {hi}")
        return wav

    @torch.no_grad()
    def latent(self, wav: torch.Tensor) -> torch.Tensor:
        """wav [B, 1, n * 1920] -> the continuous latent [B, dim, n] that the quantizer codes."""
        return _joined(self._process("latent", self._latent, wav.to(self.device), FRAME_SIZE),
                       lambda: torch.zeros(wav.shape[0], self.cfg.dim, 0, device=self.device))

    @classmethod
    def from_pretrained(cls, path: str = None, num_codebooks: int = 8, device=None, dtype=None) -> "Mimi":
        """Load a Mimi checkpoint: the Moshi layout (kyutai/moshiko-pytorch-bf16
        tokenizer-e351c8d8-checkpoint125.safetensors) or the Hugging Face one (kyutai/mimi
        model.safetensors, flat or split encoder/decoder keys), told apart by their keys. With no path,
        look in the Hugging Face cache. device: default cuda, then mps, then cpu. dtype: default float32;
        the quantizer stays float32 whatever it is."""
        path = find_checkpoint() if path is None else str(path)
        if path is None:
            raise MimiCheckpointError("no Mimi checkpoint in the Hugging Face cache; " + GET_CHECKPOINT)
        if os.path.isdir(path):
            found = [os.path.join(path, f) for f in (HF_FILE, MOSHI_FILE) if os.path.isfile(os.path.join(path, f))]
            if not found:
                raise MimiCheckpointError(f"folder {path!r} holds neither {HF_FILE} nor {MOSHI_FILE}; "
                                          + GET_CHECKPOINT)
            path = found[0]
        if not os.path.isfile(path):
            raise MimiCheckpointError(f"checkpoint {path!r} does not exist; " + GET_CHECKPOINT)
        import safetensors.torch
        try:
            raw = safetensors.torch.load_file(path)
        except Exception as e:  # safetensors raises its own error types for a file that is not one
            raise MimiCheckpointError(f"{path!r} is not a safetensors file ({e}); " + GET_CHECKPOINT) from None
        raw, layout = _normalize(raw, path)
        cfg = _infer_config(raw, layout, os.path.join(os.path.dirname(path), "config.json"))
        if not 1 <= num_codebooks <= cfg.n_q:
            raise MimiError(f"num_codebooks must be in 1..{cfg.n_q}, got {num_codebooks}")
        with torch.device("meta"):
            model = cls(cfg, num_codebooks)
        model.load_state_dict(_convert(raw, model, layout, path), assign=True)
        model.quantizer.refresh()  # |c|^2 is not in the state dict: still on meta
        model.to(device=default_device(device), dtype=dtype)
        model.quantizer.float().refresh()
        return model.eval()


def default_device(name=None):
    """torch.device(name), else the best available: cuda, then mps, then cpu."""
    try:
        d = torch.device(name) if name else None
    except RuntimeError:
        raise MimiError(f"unknown device {name!r}; use cpu, cuda, cuda:1 or mps") from None
    if d is not None and d.type == "cuda" and not torch.cuda.is_available():
        raise MimiError(f"device {name!r} asked for, but torch sees no CUDA device; use cpu")
    mps = getattr(torch.backends, "mps", None)
    return d or torch.device("cuda" if torch.cuda.is_available() else "mps" if mps and mps.is_available() else "cpu")


# ----------------------------------------------------------------------------- checkpoints

def find_checkpoint():
    """Path of a Mimi checkpoint in the standard Hugging Face cache (HF_HUB_CACHE, HF_HOME or
    ~/.cache/huggingface/hub): the kyutai/moshiko-pytorch-bf16 tokenizer or kyutai/mimi; else None."""
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    hub = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    for repo, name in [(MOSHI_REPO, MOSHI_FILE), (HF_REPO, HF_FILE)]:
        snaps = glob.glob(os.path.join(hub, "models--" + repo.replace("/", "--"), "snapshots", "*", name))
        snaps = [p for p in snaps if os.path.isfile(p)]  # entries link into blobs/; skip dangling ones
        if snaps:
            return max(snaps, key=os.path.getmtime)
    return None


_ALIASES = [  # older or newer spellings -> the names the key maps below use
    (r"\.self_attn\.in_proj(_weight|\.weight)$", ".self_attn.in_projs.0.weight"),  # moshi _load_hook
    (r"\.self_attn\.out_proj\.weight$", ".self_attn.out_projs.0.weight"),
    (r"\._codebook\.(embed_sum|embed_avg)$", "._codebook.embedding_sum"),  # moshi core_vq.py
    (r"\._codebook\.cluster_size$", "._codebook.cluster_usage"),
    (r"^encoder\.encoder(_seanet)?\.layers\.", "encoder.layers."),  # transformers' split MimiModel
    (r"^encoder\.(encoder_transformer|downsample)\.", r"\1."),
    (r"^decoder\.(decoder_transformer|upsample)\.", r"\1."),
    (r"^decoder\.decoder(_seanet)?\.layers\.", "decoder.layers."),
]
_KEYS = {"moshi": [  # our key -> Moshi key (the module tree of moshi/models/compression.py)
    (r"^(encoder|decoder)\.layers\.(\d+)\.block\.(\d)\.conv\.", r"\1.model.\2.block.\3.conv.conv."),
    (r"^(encoder|decoder)\.layers\.(\d+)\.conv\.", r"\1.model.\2.conv.conv."),
    (r"^decoder\.layers\.(\d+)\.convtr\.", r"decoder.model.\1.convtr.convtr."),
    (r"^downsample\.conv\.", "downsample.conv.conv.conv."),
    (r"^upsample\.convtr\.", "upsample.convtr.convtr.convtr."),
    (r"^(\w+)_transformer\.layers\.(\d+)\.(in|out)_proj\.",
     r"\1_transformer.transformer.layers.\2.self_attn.\3_projs.0."),
    (r"^(\w+)_transformer\.layers\.(\d+)\.(layer_scale_\d)$", r"\1_transformer.transformer.layers.\2.\3.scale"),
    (r"^(\w+)_transformer\.layers\.", r"\1_transformer.transformer.layers."),
], "hf": [  # our key -> Hugging Face key (transformers/models/mimi, the flat layout of kyutai/mimi)
    (r"\.convtr\.", ".conv."),
    (r"\.norm1\.", ".input_layernorm."), (r"\.norm2\.", ".post_attention_layernorm."),
    (r"\.linear1\.", ".mlp.fc1."), (r"\.linear2\.", ".mlp.fc2."), (r"\.out_proj\.", ".self_attn.o_proj."),
    (r"\.layer_scale_1$", ".self_attn_layer_scale.scale"), (r"\.layer_scale_2$", ".mlp_layer_scale.scale"),
    (r"^quantizer\.rvq_first\.", "quantizer.semantic_residual_vector_quantizer."),
    (r"^quantizer\.rvq_rest\.", "quantizer.acoustic_residual_vector_quantizer."),
]}


def _rename(key, rules):
    for pattern, repl in rules:
        key = re.sub(pattern, repl, key)
    return key


def _their_key(ours, layout):
    return _rename(ours, _KEYS[layout])


def _codebook_keys(layout, rvq, k):  # (centroid sum, usage) of stage k; centroid = sum / usage
    if layout == "moshi":
        return (f"quantizer.{rvq}.vq.layers.{k}._codebook.embedding_sum",
                f"quantizer.{rvq}.vq.layers.{k}._codebook.cluster_usage")
    p = f"{_their_key(f'quantizer.{rvq}.', 'hf')}layers.{k}.codebook."
    return p + "embed_sum", p + "cluster_usage"


def _normalize(raw, path):
    """Rename aliases and tell the layout from the keys."""
    raw = {_rename(k, _ALIASES): v for k, v in raw.items()}
    if any(k.startswith(("encoder.model.", "quantizer.rvq_first.")) for k in raw):
        return raw, "moshi"
    if any(k.startswith(("encoder.layers.", "quantizer.semantic_residual_vector_quantizer.")) for k in raw):
        return raw, "hf"
    some = ", ".join(sorted(raw)[:4]) or "none"
    raise MimiCheckpointError(f"{path!r} is not a Mimi checkpoint in a layout we know (its keys: {some}); "
                              + GET_CHECKPOINT)


def _infer_config(raw, layout, config_json):
    """Read widths and counts off the weights; a missing anchor leaves the default (the key check then
    reports it). Head count, window and RoPE base are not in the weights: taken from the Hugging Face
    config.json next to the file if there is one, else the released model's."""
    def size(ours=None, theirs=None):
        t = raw.get(theirs or _their_key(ours, layout))
        return None if t is None else t.shape[0]

    def count(theirs):  # how many of theirs(0), theirs(1), .. the checkpoint holds
        return next(n for n in range(1 << 16) if theirs(n) not in raw)

    cfg = MimiConfig()
    last = f"encoder.layers.{3 * len(cfg.ratios) + 2}.conv.weight"  # the SEANet encoder's last conv
    found = dict(n_filters=size("encoder.layers.0.conv.weight"), dim=size(last),
                 ffn=size("encoder_transformer.layers.0.linear1.weight"),
                 q_dim=size("quantizer.rvq_first.input_proj.weight"),
                 bins=size(theirs=_codebook_keys(layout, "rvq_first", 0)[0]),
                 n_layers=count(lambda i: _their_key(f"encoder_transformer.layers.{i}.norm1.weight", layout)) or None,
                 n_q=1 + count(lambda k: _codebook_keys(layout, "rvq_rest", k)[0]))
    if layout == "hf" and os.path.isfile(config_json):
        import json
        with open(config_json) as f:
            hf = json.load(f)
        found.update(n_heads=hf.get("num_attention_heads"), context=hf.get("sliding_window"),
                     max_period=(hf.get("rope_parameters") or {}).get("rope_theta") or hf.get("rope_theta"))
    for k, v in found.items():
        if v is not None:
            setattr(cfg, k, v)
    return cfg


def _convert(raw, model, layout, path):
    """Our state dict from the checkpoint's tensors: a key map plus shape checks; every problem is
    reported at once."""
    cfg, table = model.cfg, {}  # our key -> (their keys, their shapes, f(their tensors) -> ours)
    for ours, t in model.state_dict().items():
        if ours.endswith(".codebook"):
            rvq, n = ours.split(".")[1], t.shape[0]
            keys = [k for s in range(1 if rvq == "rvq_first" else cfg.n_q - 1) for k in _codebook_keys(layout, rvq, s)]
            shapes = [(cfg.bins, cfg.q_dim), (cfg.bins,)] * (len(keys) // 2)
            # centroid = embedding_sum / cluster_usage (moshi core_vq.py EuclideanCodebook.embedding)
            table[ours] = keys, shapes, lambda *ts, n=n: torch.stack(
                [s / u.clamp(min=1e-5)[:, None] for s, u in zip(ts[0::2], ts[1::2])][:n]
                or [torch.zeros(cfg.bins, cfg.q_dim)])[:n]
        elif layout == "hf" and ours.endswith(".in_proj.weight"):
            p = _their_key(ours[:-len("in_proj.weight")], layout) + "self_attn."
            table[ours] = [p + "q_proj.weight", p + "k_proj.weight", p + "v_proj.weight"], [(cfg.dim, cfg.dim)] * 3, \
                lambda q, k, v: torch.cat([_unpermute(q, cfg.n_heads), _unpermute(k, cfg.n_heads), v])
        else:
            table[ours] = [_their_key(ours, layout)], [tuple(t.shape)], lambda x: x
    missing, shapes, used = [], [], set()
    for keys, want, _ in table.values():
        used.update(keys)
        for k, s in zip(keys, want):
            if k not in raw:
                missing.append(k)
            elif tuple(raw[k].shape) != s:
                shapes.append(f"{k} {tuple(raw[k].shape)}, expected {s}")
    unexpected = [k for k in raw if k not in used and not k.endswith("initialized")]
    if missing or shapes or unexpected:
        def some(xs):
            return ", ".join(xs[:6]) + (f" and {len(xs) - 6} more" if len(xs) > 6 else "")
        report = "; ".join(f"{name} ({len(xs)}): {some(xs)}" for name, xs in
                           [("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", shapes)] if xs)
        raise MimiCheckpointError(f"{path!r} does not fit the Mimi architecture ({layout} layout): {report}. "
                                  "Is it a Mimi checkpoint, complete and unmodified? " + GET_CHECKPOINT)
    return {ours: fn(*[raw[k].float() for k in keys]) for ours, (keys, _, fn) in table.items()}


def _unpermute(w, H):
    # transformers' convert_mimi_checkpoint_to_pytorch.py reorders q and k rows per head from interleaved
    # RoPE pairs (r0, i0, r1, i1, ..) to halves (r0, r1, .., i0, i1, ..); put them back
    D, Din = w.shape
    return w.view(H, 2, D // H // 2, Din).transpose(1, 2).reshape(D, Din)


# ----------------------------------------------------------------------------- audio

AUDIO_EXTS = (".wav", ".flac", ".ogg")
MAX_PHASES = 1000  # resampling ratios up/down (reduced) with up above this are refused


def resample(x, sr_in, sr_out=SAMPLE_RATE, zeros=32, rolloff=0.95, beta=8.6):
    """Band-limited resampling of x [C, T] float (numpy or torch) -> torch [C, ceil(T * sr_out / sr_in)]:
    a Kaiser-windowed sinc low-pass at rolloff * min(sr_in, sr_out) / 2, `zeros` zero crossings each side,
    computed polyphase (one filter per output phase, a strided conv). Refuses ratios it cannot do exactly."""
    x = torch.as_tensor(x, dtype=torch.float32)
    if sr_in == sr_out:
        return x
    g = math.gcd(int(sr_in), int(sr_out))
    up, down = sr_out // g, sr_in // g
    if sr_in <= 0 or up > MAX_PHASES:
        raise MimiError(f"cannot resample {sr_in} Hz to {sr_out} Hz (ratio {up}/{down}); convert the file "
                        f"first, e.g. `sox in.wav -r {sr_out} out.wav` or `ffmpeg -i in.wav -ar {sr_out} out.wav`")
    nu = rolloff * min(sr_in, sr_out) / 2 / sr_in                # cutoff, cycles per input sample
    width = zeros / (2 * nu)                                    # filter half-width, input samples
    half = math.ceil(width)
    # output q*up + p sits at input time q*down + p*down/up: phase p reads inputs q*down + j, j in
    # [-half, down + half], weighted by h(p*down/up - j) (zero outside the window)
    tau = np.arange(up)[:, None] * down / up - np.arange(-half, down + half + 1)[None, :]  # [up, taps]
    win = np.i0(beta * np.sqrt(np.clip(1 - (tau / width) ** 2, 0, None))) / np.i0(beta) * (np.abs(tau) <= width)
    h = 2 * nu * np.sinc(2 * nu * tau) * win
    h /= h.sum(1, keepdims=True)                                # unit DC gain in every phase
    w = torch.from_numpy(h).float()[:, None]                    # [up, 1, taps]: phase p of output q*up + p
    C, T = x.shape
    n_out = -(-T * up // down)
    Q = -(-n_out // up)
    xp = F.pad(x[:, None], (half, max(0, (Q - 1) * down + w.shape[-1] - T - half)))
    step = max(1, (1 << 22) // up)                              # outputs per block, to bound memory
    ys = [F.conv1d(xp[..., q * down:(min(q + step, Q) - 1) * down + w.shape[-1]], w, stride=down)
          for q in range(0, Q, step)]
    return torch.cat(ys, -1).transpose(1, 2).reshape(C, -1)[:, :n_out]


def list_audio(paths):
    """Files as given, folders expanded (recursively, sorted) to their wav/flac/ogg files."""
    out = []
    for p in paths:
        if os.path.isdir(p):
            found = sorted(os.path.join(d, f) for d, _, fs in os.walk(p) for f in fs if f.lower().endswith(AUDIO_EXTS))
            if not found:
                raise MimiError(f"folder {p!r} holds no {', '.join(AUDIO_EXTS)} files")
            out += found
        elif os.path.isfile(p):
            out.append(p)
        else:
            raise MimiError(f"{p!r} does not exist")
    return out


def audio_info(path):
    """(channels, samples, sample rate) from the header; a clear error for anything that is not audio."""
    import soundfile as sf
    if not os.path.isfile(path):
        raise MimiError(f"{path!r} does not exist")
    if os.path.getsize(path) == 0:
        raise MimiError(f"{path!r} is empty (0 bytes)")
    try:
        i = sf.info(path)
    except Exception as e:  # libsndfile's errors for a file it cannot parse
        raise MimiError(f"cannot read {path!r} as audio ({e}); give wav, flac or ogg files") from None
    if i.frames <= 0:
        raise MimiError(f"{path!r} holds no audio samples")
    if i.channels > 2:
        raise MimiError(f"{path!r} has {i.channels} channels; a conversation file is mono (one speaker) or "
                        "stereo (one speaker per channel)")
    return i.channels, i.frames, i.samplerate


def load_audio(path) -> torch.Tensor:
    """A wav/flac/ogg file -> float32 [channels, samples] at 24 kHz (resampled if needed); a clear
    MimiError for a missing, empty or non-audio file, more than 2 channels or an unsupported rate."""
    import soundfile as sf
    audio_info(path)
    try:
        data, sr = sf.read(path, dtype="float32", always_2d=True)
    except Exception as e:
        raise MimiError(f"cannot read {path!r} as audio ({e})") from None
    return resample(data.T, sr)


# ----------------------------------------------------------------------------- command line

class Progress:
    """'encoded 12.0 of 60.0 min, 35x real time' on stderr, at most every few seconds."""

    def __init__(self, verb, total_s):
        self.verb, self.total, self.done, self.t0 = verb, total_s, 0.0, time.time()
        self.last = self.t0

    def add(self, seconds, final=False):
        self.done += seconds
        now = time.time()
        if final or now - self.last > 5:
            self.last = now
            print(f"{self.verb} {self.done / 60:.1f} of {self.total / 60:.1f} min, "
                  f"{self.done / max(now - self.t0, 1e-9):.0f}x real time", file=sys.stderr, flush=True)


def cmd_encode(args):
    files = list_audio(args.audio)
    infos = [audio_info(f) for f in files]
    streams = sorted({c for c, _, _ in infos})
    if len(streams) > 1:
        per = ", ".join(f"{f}: {c}" for f, (c, _, _) in list(zip(files, infos))[:6])
        raise MimiError(f"files in one codes file must all be mono or all stereo (channels per file: {per}); "
                        "encode them into separate codes files")
    for _, _, sr in infos:
        resample(np.zeros((1, 1), np.float32), sr)  # refuse an unsupported rate before any work
    mimi = Mimi.from_pretrained(args.mimi, args.num_codebooks, device=args.device)
    S, step = streams[0], 750 * FRAME_SIZE                                    # 60 s per call
    progress, frames = Progress("encoded", sum(n / sr for _, n, sr in infos)), 0
    with CodesWriter(args.out, n_streams=S, n_codebooks=mimi.num_codebooks, cardinality=mimi.cfg.bins,
                     frame_rate=FRAME_RATE) as w:
        for f in files:
            wav, codes = load_audio(f), []
            with mimi.streaming(S):  # streaming equals batch; chunks keep memory flat and report progress
                for i in range(0, wav.shape[-1], step):
                    x = wav[:, None, i:i + step]
                    codes.append(mimi.encode(F.pad(x, (0, -x.shape[-1] % FRAME_SIZE))).cpu())
                    progress.add(x.shape[-1] / SAMPLE_RATE)
            codes = torch.cat(codes, -1)                                         # [S, K, F]
            w.add(codes.permute(2, 0, 1).numpy())
            frames += codes.shape[-1]
    progress.add(0, final=True)
    print(f"wrote {args.out}: {len(files)} conversations, {frames / FRAME_RATE / 60:.1f} min, {S} streams x "
          f"{mimi.num_codebooks} codebooks", file=sys.stderr)


def cmd_decode(args):
    f = CodesFile(args.codes)
    if f.cardinality > CARDINALITY or not 1 <= f.n_codebooks <= MAX_CODEBOOKS or f.frame_rate != FRAME_RATE:
        raise MimiError(f"{args.codes!r} holds {f.n_codebooks} codebooks of {f.cardinality} at {f.frame_rate} Hz; "
                        f"Mimi decodes up to {MAX_CODEBOOKS} codebooks of {CARDINALITY} at {FRAME_RATE} Hz")
    if not 0 <= args.conversation < len(f):
        raise MimiError(f"--conversation {args.conversation}: {args.codes!r} holds conversations 0..{len(f) - 1}")
    fmt = {".wav": "WAV", ".flac": "FLAC"}.get(os.path.splitext(args.out)[1].lower())
    if fmt is None:
        raise MimiError(f"--out {args.out!r}: give a .wav or .flac name")
    if len(f) > 1:
        print(f"decoding conversation {args.conversation} of {len(f)} (choose with --conversation)", file=sys.stderr)
    import soundfile as sf
    mimi = Mimi.from_pretrained(args.mimi, f.n_codebooks, device=args.device)
    codes, S = f.audio(args.conversation), f.n_streams                        # [frames, S, K]
    progress, tmp = Progress("decoded", len(codes) / FRAME_RATE), f"{args.out}.{os.getpid()}.tmp"
    try:
        with sf.SoundFile(tmp, "w", SAMPLE_RATE, S, subtype="PCM_16", format=fmt) as out, mimi.streaming(S):
            for i in range(0, len(codes), 750):
                c = torch.from_numpy(codes[i:i + 750].astype(np.int64)).permute(1, 2, 0)  # [S, K, n]
                out.write(mimi.decode(c)[:, 0].T.clamp(-1, 1).cpu().numpy())
                progress.add(c.shape[-1] / FRAME_RATE)
        os.replace(tmp, args.out)  # the wav appears whole or not at all
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    progress.add(0, final=True)
    print(f"wrote {args.out}: {len(codes) / FRAME_RATE / 60:.1f} min, {S} channel(s)", file=sys.stderr)


def main(argv=None):
    p = argparse.ArgumentParser(prog="mimi.py", description="Mimi codec: audio <-> codes files (codes.py)")
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("encode", help="audio files -> one codes file, one conversation per file")
    e.add_argument("audio", nargs="+", help="wav/flac/ogg files or folders of them; stereo = one speaker per channel")
    e.add_argument("--out", required=True, help="codes file to write, e.g. conv_codes.bin")
    e.add_argument("--num_codebooks", type=int, default=8, help="codebooks per frame, 1 to 32")
    d = sub.add_parser("decode", help="one conversation of a codes file -> wav (stereo for two streams)")
    d.add_argument("codes", help="codes file written by `mimi.py encode` or by generate.py")
    d.add_argument("--out", required=True, help="audio file to write (.wav or .flac)")
    d.add_argument("--conversation", type=int, default=0, help="which conversation of the file")
    for s in (e, d):
        s.add_argument("--mimi", help="Mimi checkpoint (default: found in the Hugging Face cache)")
        s.add_argument("--device", help="cpu, cuda, mps (default: the best available)")
    args = p.parse_args(argv)
    try:
        (cmd_encode if args.cmd == "encode" else cmd_decode)(args)
    except (MimiError, CodesFormatError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
