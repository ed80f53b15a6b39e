"""
Golden fixtures for tests/test_mimi.py: small random Mimi codecs built with the official code (moshi
0.2.13 and transformers' MimiModel), saved in their checkpoint layouts, and what the official code
makes of a fixed 24 s signal (longer than the 10 s attention window).

    pip install --no-deps moshi==0.2.13      # and einops, sentencepiece; transformers>=5.3
    python scripts/make_mimi_fixtures.py     # writes tests/fixtures/mimi/ (about 3.5 MB)

Random Mimi weights leave every codebook at zero, so every code would be 0. Here the input projections
are first made blind to the mean latent (`center_projections`: a trained quantizer sees a centred
cloud), then `set_centroids` draws the centroids of each stage on a sphere around the mean of that
stage's residuals, of radius comparable to their spread, and re-draws any centroid that comes within
a hair of tying for a calibration frame: codes are diverse and float noise cannot flip one. The
builders here are also used by the tests (a live comparison when moshi or transformers is installed)
and by bench/mimi.py; the official packages are imported inside the functions that need them.
"""
import json
import math
import os
import sys
import zlib

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from mimi import FRAME_SIZE, SAMPLE_RATE, Mimi, MimiConfig  # noqa: E402

OUT = os.path.join(ROOT, "tests", "fixtures", "mimi")
SECONDS = 24.0   # > 10 s, so the 250-step attention window matters
STRIDE = 16      # decoded audio is stored every STRIDE-th sample, to keep the fixture small
MARGIN = 3e-5    # least gap between the two nearest squared distances, relative to the norms: implementations
                 # and chunkings differ by ~3e-7 in the latent and float32 rounds |r|^2 + |c|^2 - 2 r.c
LAYER_SCALE = (0.2, 1.0)  # the released init (0.01) would leave the random transformers almost silent
# Real architecture but narrow: same strides, frame size, window, 32 codebooks; 8 heads of 4. The
# codebooks are narrow too but wide enough (48) that 31 stages leave a residual well above float noise.
SMALL = MimiConfig(n_filters=4, dim=32, n_layers=2, n_heads=8, ffn=64, q_dim=48, bins=128)


def signal(seconds=SECONDS, seed=0):
    """A fixed speech-like test signal [samples] float32 on the 16-bit grid: a gliding harmonic tone with
    a syllable-rate envelope, bursts of hashed noise and one second of silence. Integer and float64
    arithmetic only, so every machine makes the same samples (the fixture keeps a CRC to check)."""
    n = round(seconds * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    phase = 2 * np.pi * np.cumsum(140 + 60 * np.sin(2 * np.pi * 0.3 * t + seed)) / SAMPLE_RATE
    tone = sum(np.sin(k * phase) / k for k in range(1, 8)) * (0.5 + 0.5 * np.sin(2 * np.pi * 3.1 * t) ** 2)
    h = np.arange(n, dtype=np.uint32) ^ np.uint32((seed * 0x9E3779B9) & 0xFFFFFFFF)  # PCG-style hash
    h = h * np.uint32(747796405) + np.uint32(2891336453)
    h = ((h >> ((h >> np.uint32(28)) + np.uint32(4))) ^ h) * np.uint32(277803737)
    noise = ((h >> np.uint32(22)) ^ h) / 2.0 ** 32 - 0.5
    x = 0.25 * tone + 0.4 * noise * (np.sin(2 * np.pi * 0.7 * t + seed) > 0.5)
    x[(t >= 5) & (t < 6)] = 0
    return (np.round(np.clip(x, -1, 1) * 32767) / 32767).astype(np.float32)


def signal_crc(x):
    return zlib.crc32(np.round(x * 32767).astype("<i2").tobytes())


def calibration(seconds=SECONDS, seed=0):
    """[2, 1, T] audio the centroids are fitted on: the test signal and white-ish noise."""
    x = signal(seconds, seed)
    noise = np.random.default_rng(seed).uniform(-0.5, 0.5, len(x)).astype(np.float32)
    return torch.from_numpy(np.stack([x, noise]))[:, None]


def center_projections(latent, projs):
    """Random weights give latents [N, D] that are mostly one constant vector; a trained quantizer sees a
    centred cloud. Remove the direction of the mean latent from the input projections [q, D] (in place),
    else no gap between centroids survives the float32 cancellation described in set_centroids."""
    m = latent.double().mean(0)
    m = m / m.norm()
    for p in projs:
        p -= (p.double() @ m)[:, None].to(p.dtype) * m.to(p.dtype)


def set_centroids(latent, projs, n_q, bins, seed=0, margin=MARGIN):
    """Non-degenerate random codebooks: latent [N, D] pre-quantizer latents of calibration audio, projs the
    input projections [q, D] of the semantic and the acoustic quantizer -> centroids [n_q, bins, q].
    Stage by stage: centroids = mean + radius * random unit vectors, radius = spread of the residuals times
    sqrt(2 ln(bins) / q) (capped at 1), the typical best alignment of `bins` random directions in q
    dimensions, so each stage shrinks the residual as a trained one would. While a calibration residual has its
    runner-up too close to its nearest, the runner-up is re-drawn. "Too close" is measured against the
    norms, not the distance: every implementation (torch.cdist in moshi and transformers, ours) finds the
    nearest centroid as |r|^2 + |c|^2 - 2 r.c in float32, which cancels when r and c are far from 0."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for p, n in [(projs[0], 1), (projs[1], n_q - 1)]:
        r = latent.double() @ p.double().T                                     # [N, q] residuals
        r0 = r.pow(2).sum(1)                                                   # |stage 0 input|^2: error scale
        for _ in range(n):
            mu = r.mean(0)
            radius = (r - mu).pow(2).sum(1).mean().sqrt() * min(1.0, math.sqrt(2 * math.log(bins) / r.shape[1]))

            def draw(k):
                u = torch.randn(k, r.shape[1], generator=g, dtype=torch.float64)
                return mu + radius * u / u.norm(dim=1, keepdim=True)
            c = draw(bins)
            for _ in range(500):
                d = torch.cdist(r, c).pow(2)                                    # [N, bins]
                top = d.topk(2, largest=False)
                scale = r0 + r.pow(2).sum(1) + c[top.indices[:, 0]].pow(2).sum(1)
                bad = top.indices[top.values[:, 1] - top.values[:, 0] < margin * scale, 1].unique()
                if len(bad) == 0:
                    break
                c[bad] = draw(len(bad))
            else:
                raise RuntimeError("could not clear the code margins; use less calibration audio")
            out.append(c)
            r = r - c[d.argmin(1)]
    return torch.stack(out).float()


def _scale_layers(model, names, seed):
    g = torch.Generator().manual_seed(seed + 1)
    for name, p in model.named_parameters():
        if name.endswith(names):
            p.data.copy_(torch.empty(p.shape).uniform_(*LAYER_SCALE, generator=g))


def moshi_mimi(cfg=SMALL, seed=0, calib=None):
    """A random official MimiModel (moshi 0.2.13) of shape cfg with non-degenerate codebooks, all 32 active."""
    from moshi.models import loaders
    torch.manual_seed(seed)
    conf = json.loads(json.dumps(loaders._mimi_config))
    conf["seanet"].update(n_filters=cfg.n_filters, dimension=cfg.dim)
    conf["transformer"].update(d_model=cfg.dim, num_heads=cfg.n_heads, num_layers=cfg.n_layers,
                               dim_feedforward=cfg.ffn, context=cfg.context, input_dimension=cfg.dim,
                               output_dimensions=[cfg.dim], max_period=cfg.max_period)
    conf["quantizer"].update(dimension=cfg.q_dim, n_q=cfg.n_q, bins=cfg.bins, input_dimension=cfg.dim,
                             output_dimension=cfg.dim)
    model = loaders.get_mimi(None, mimi_config=conf, device="cpu", num_codebooks=cfg.n_q).eval()
    _scale_layers(model, ("layer_scale_1.scale", "layer_scale_2.scale"), seed)
    q = model.quantizer
    with torch.no_grad():
        x = calibration(seed=seed) if calib is None else calib
        latent = model._encode_to_unquantized_latent(x).transpose(1, 2).reshape(-1, cfg.dim)
        projs = [q.rvq_first.input_proj.weight[..., 0], q.rvq_rest.input_proj.weight[..., 0]]
        center_projections(latent, projs)
        c = set_centroids(latent, projs, cfg.n_q, cfg.bins, seed)
        for layer, centroids in zip(list(q.rvq_first.vq.layers) + list(q.rvq_rest.vq.layers), c):
            cb = layer._codebook
            cb.embedding_sum.copy_(centroids)
            cb.cluster_usage.fill_(1.0)
            cb._initialized.fill_(1.0)
            cb.register_buffer("_embedding", None, persistent=False)  # drop its cached centroids
    return model


def hf_mimi(cfg=SMALL, seed=0, calib=None):
    """A random transformers MimiModel of shape cfg with non-degenerate codebooks."""
    from transformers import MimiConfig as HFMimiConfig, MimiModel
    torch.manual_seed(seed)
    hc = HFMimiConfig(hidden_size=cfg.dim, num_filters=cfg.n_filters, num_hidden_layers=cfg.n_layers,
                      intermediate_size=cfg.ffn, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_heads,
                      codebook_size=cfg.bins, codebook_dim=cfg.q_dim, vector_quantization_hidden_dimension=cfg.q_dim,
                      upsample_groups=cfg.dim, num_quantizers=cfg.n_q, sliding_window=cfg.context,
                      rope_parameters={"rope_theta": cfg.max_period, "rope_type": "default"})
    model = MimiModel(hc).eval()
    _scale_layers(model, ("self_attn_layer_scale.scale", "mlp_layer_scale.scale"), seed)
    sem, ac = model.quantizer.semantic_residual_vector_quantizer, model.quantizer.acoustic_residual_vector_quantizer
    with torch.no_grad():
        x = calibration(seed=seed) if calib is None else calib
        latent = model.encoder(x).latents.transpose(1, 2).reshape(-1, cfg.dim)
        projs = [sem.input_proj.weight[..., 0], ac.input_proj.weight[..., 0]]
        center_projections(latent, projs)
        c = set_centroids(latent, projs, cfg.n_q, cfg.bins, seed)
        for layer, centroids in zip(list(sem.layers) + list(ac.layers), c):
            layer.codebook.embed_sum.copy_(centroids)
            layer.codebook.cluster_usage.fill_(1.0)
            layer.codebook._embed = None
    return model


def ours_random(cfg=SMALL, seed=0, calib=None, num_codebooks=8):
    """Our Mimi with random weights and the same kind of codebooks, for when moshi is not installed."""
    torch.manual_seed(seed)
    model = Mimi(cfg, num_codebooks).eval()
    _scale_layers(model, ("layer_scale_1", "layer_scale_2"), seed)
    q = model.quantizer
    x = calibration(seed=seed) if calib is None else calib
    latent = model.latent(x).transpose(1, 2).reshape(-1, cfg.dim)
    projs = [q.rvq_first.input_proj.weight.data[..., 0], q.rvq_rest.input_proj.weight.data[..., 0]]
    center_projections(latent, projs)
    c = set_centroids(latent, projs, num_codebooks, cfg.bins, seed)
    q.rvq_first.codebook, q.rvq_rest.codebook = c[:1], c[1:]
    q.refresh()
    return model


def run_moshi(model, x, n_q):
    """Official batch encode and decode of x [B, 1, T] with n_q codebooks."""
    model.set_num_codebooks(n_q)
    with torch.no_grad():
        codes = model.encode(x)
        return codes, model.decode(codes)


def run_hf(model, x, n_q):
    with torch.no_grad():
        codes = model.encode(x, num_quantizers=n_q).audio_codes
        return codes, model.decode(codes).audio_values


def save_moshi(model, path):
    import safetensors.torch
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)


def main():
    os.makedirs(OUT, exist_ok=True)
    x = torch.from_numpy(signal())[None, None]
    assert x.shape[-1] % FRAME_SIZE == 0
    expected = dict(signal_crc=np.uint32(signal_crc(signal())), seconds=SECONDS, stride=STRIDE)
    m = moshi_mimi()
    save_moshi(m, os.path.join(OUT, "moshi_small.safetensors"))
    h = hf_mimi()
    h.save_pretrained(os.path.join(OUT, "hf_small"))
    for name, model, run in [("moshi", m, run_moshi), ("hf", h, run_hf)]:
        for n_q in (8, 32):
            codes, audio = run(model, x, n_q)
            if n_q == 32:
                expected[f"{name}_codes"] = codes[0].numpy().astype(np.int16)
            expected[f"{name}_audio{n_q}"] = audio[0, 0, ::STRIDE].numpy()
            print(f"{name} {n_q} codebooks: {codes.shape[-1]} frames, {len(np.unique(codes[0, 0]))} distinct "
                  f"semantic codes, audio rms {audio.pow(2).mean().sqrt():.3g}")
    np.savez_compressed(os.path.join(OUT, "expected.npz"), **expected)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(OUT) for f in fs)
    print(f"wrote {OUT} ({size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
