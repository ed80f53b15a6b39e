"""
How dense must recall events be for a model to learn them? A toy version of the experiment's
recall task, on fresh random data every step (nothing to learn by heart), through the backbone
of model.py in its text-LM mode (one token a step, no depth decoder):

    python scripts/recall_toy.py                    # 3 events of 16-token values per 128 tokens
    python scripts/recall_toy.py --events 2 --value 8
    python scripts/recall_toy.py --frames --steps 1000                  # the speech path: one frame a token
    python scripts/recall_toy.py --frames --depth_layers 0 --steps 1000 # ... without the depth decoder's block

Each sequence is uniform noise over 64 tokens. An event is `cue1 key value` early and `cue2 key
value` later (2-token cues, a 2-token key, a value of --value tokens, all but the cues drawn from
the 64). The recalled values can only be predicted by finding the first mention with the same key
and copying what follows it (an induction circuit). Prints the loss and the top-1 accuracy on the
recalled tokens (chance 1/64) every 100 steps. On a 2-core CPU (2 layers of 128, 16 x 128 tokens a
step): 3 events of 16 tokens (38% of the tokens recalled) reach 99% accuracy by step 500; 2 events
of 8 tokens (12%) stay at chance through step 800. Learning is a jump after a plateau whose length
depends on the path. With --frames the tokens go through the speech model's own path (frames of
--codebooks codebooks, each holding the token: frame embedding, backbone, depth decoder, loss_fn):
  1 codebook, the demo's depth decoder (1 layer of 64)     chance to step 800, 53% at step 900
  the same with --depth_layers 0 (no block, a projection)   86% at step 400, 100% at 500
  --depth_layers 0 --events 2 (25% recalled)                chance through step 1200
  --depth_layers 0 --codebooks 8                            chance through step 800 (the semantic
                                                            codebook is 1/8 of the loss)
  the same with --semantic_weight 100 (as the presets)      13% at step 500, 71% at 600, 100% at 700
  --depth_layers 0 --semantic_weight 100 --silent_speaker   71% at step 300, 100% at 400

Beyond the window: with --window 16 every recall lies beyond attention (the first mentions are
about 60 tokens back), and only a TTT branch (--n_ttt) could carry the pattern there:

    python scripts/recall_toy.py --window 16 --n_ttt 1 --steps 2000

--memory swaps the TTT branch for a control (linear attention, the delta rule, softmax attention
over the whole sequence): softmax attention in the branch learns the recall beyond the window,
the linear memories do not at 128 tokens.

Stacked windowed layers reach farther than one window: with --window 8 and 2 layers a token can
carry what it saw from up to 15 tokens back (the accuracy is printed for the window, for beyond it
but within that reach, and beyond the reach). At 32 tokens, where the event fills the sequence and
the recall is 12 tokens after its first mention, the model learns the recall without any branch:

    python scripts/recall_toy.py --window 8 --n_ttt 0 --seq_len 32 --events 1 --value 8   # 100% at step 1000

(with TTT-Linear in the top layer, --n_ttt 1: 100% at step 300), and the same when the recall
directly follows its first mention in longer sequences (--adjacent). Beyond the reach (distance 24
and more) no TTT setting tried has learnt it, even when nothing is written between the first
mention and the recall (--quiet_probe):

    python scripts/recall_toy.py --window 8 --n_ttt 1 --seq_len 48 --events 1 --value 8 \
        --adjacent_steps 1200 --by_distance --quiet_probe --steps 2400

Nor when it is trained writing nothing there (--quiet_train), the choice of writes a content gate
would ideally make. (docs/experiment/notes.md has the tables.)

--pool N trains on N batches made once, in turn, as a codes file repeats, and prints the recall on a
fresh batch beside the training one's: 256 repeated sequences (--pool 16) teach the lookup above by
step 200 instead of 400-500, then are learnt by heart; with --events 2 --value 8, where fresh data
teach nothing in 2,000 steps, they are recalled by heart (0.99) while fresh ones stay at chance,
also with --weight_decay 1.0 (0.92 by heart at step 4,000, fresh at chance: no grokking by then).

--mqar N swaps the events for multi-query associative recall (Zoology's MQAR): N single-token
key-value pairs open the sequence, each key comes back once beyond the stacked windows' reach
followed by its value, and the loss is on those values only. --eval_lens then reads held-out
sequences up to 90 minutes of frames long, with the state carried chunk by chunk
(scripts/recall_mqar.sh runs the comparison):

    python scripts/recall_toy.py --mqar 8 --seq_len 256 --window 16 --batch 64 --alphabet 256 \
        --separate_noise --n_ttt 2 --device cuda --max_minutes 7 --eval_lens 1024,4096,16384,67500
"""
import argparse
import contextlib
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import Config, GatedTTT, SpeechLM, loss_fn  # noqa: E402
from ttt import TTTState, _rope, _rope_cos_sin, _TTTLayer  # noqa: E402

V, A, CUE, KEY = 2048, 64, 2, 2


class LinearAttention(torch.nn.Module):
    """y_t = o(LN(sum_{s <= t} (q_t . k_s) v_s)) per head, q and k L2-normalised: the fast-weight memory
    W_t = sum_s v_s k_s^T read by q_t, with none of TTT's inner LayerNorm or learning rates. softmax=True:
    plain causal softmax attention over the whole sequence instead (the same branch, a memory that grows).
    delta=True: the delta rule, W_t = W_{t-1} + beta_t (v_t - W_{t-1} k_t) k_t^T, y_t = W_t q_t, with a
    learnt beta_t = sigmoid(w . x_t) per head (TTT-Linear without its inner LayerNorm, one token a
    mini-batch, normalised keys), one token at a time."""

    def __init__(self, dim, n_heads, softmax=False, rope=False, delta=False):
        super().__init__()
        self.H, self.softmax, self.rope, self.delta = n_heads, softmax, rope, delta
        self.beta = torch.nn.Linear(dim, n_heads)  # used by delta only (made always: same init for all)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (torch.nn.Linear(dim, dim, bias=False)
                                                              for _ in range(4))
        self.post_norm = torch.nn.LayerNorm(dim)

    def init_state(self, batch_size, device=None):  # nothing is carried: whole sequences only
        z = torch.zeros(1, device=device)
        return TTTState((z,), (z,), torch.zeros((), dtype=torch.long, device=device))

    def forward(self, x, state=None):
        B, T, D = x.shape
        q, k, v = (p(x).view(B, T, self.H, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        if self.rope:
            cos, sin = _rope_cos_sin(torch.arange(T, device=x.device), q.shape[-1], 10000.0)
            q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        if self.softmax:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, D)
            return self.o_proj(self.post_norm(y)), state
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        if self.delta:
            beta = torch.sigmoid(self.beta(x)).transpose(1, 2)                 # [B, H, T]
            W = q.new_zeros(B, self.H, v.shape[-1], k.shape[-1])
            ys = []
            for t in range(T):
                kt, vt = k[:, :, t], v[:, :, t]                                # [B, H, d]
                err = vt - (W @ kt[..., None])[..., 0]
                W = W + beta[:, :, t, None, None] * err[..., None] * kt[..., None, :]
                ys.append((W @ q[:, :, t, :, None])[..., 0])
            y = torch.stack(ys, 2).transpose(1, 2).reshape(B, T, D)
            return self.o_proj(self.post_norm(y)), state
        a = (q @ k.transpose(2, 3)).tril()                                     # [B, H, T, T]
        y = (a @ v).transpose(1, 2).reshape(B, T, D)
        return self.o_proj(self.post_norm(y)), state


class ProjConv(torch.nn.Module):
    """proj(x) [B, T, D] followed by a causal depthwise convolution over the last k tokens."""

    def __init__(self, proj, k):
        super().__init__()
        D = proj.out_features
        self.proj, self.k = proj, k
        self.conv = torch.nn.Conv1d(D, D, k, groups=D)

    def forward(self, x):
        y = self.proj(x).transpose(1, 2)                                       # [B, D, T]
        return self.conv(F.pad(y, (self.k - 1, 0))).transpose(1, 2)


class ShiftProj(torch.nn.Module):
    """proj(x) [B, T, D] shifted one token later: the key of token t is made from token t - 1 (zeros at
    t = 0), so a write stores what followed the token before, and a read by the current token returns
    what followed it last time (the shift of H3's associative recall). Whole sequences only."""

    def __init__(self, proj):
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return F.pad(self.proj(x), (0, 0, 1, 0))[:, :-1]


class NormProj(torch.nn.Module):
    """proj(x) [B, T, D] with each head's vector scaled to length sqrt(head size): keys (and queries)
    of one length, so that a write cannot outweigh others by its size."""

    def __init__(self, proj, n_heads):
        super().__init__()
        self.proj, self.H = proj, n_heads

    def forward(self, x):
        y = self.proj(x)
        y = y.view(*y.shape[:-1], self.H, -1)
        return (F.normalize(y, dim=-1) * y.shape[-1] ** 0.5).flatten(-2)


@contextlib.contextmanager
def quiet_between(model, dist):
    """Inside: every TTT layer's inner learning rate is zero at the tokens between the end of the first
    mention and the start of the recall (one event a row; dist from batch), so they write nothing. The
    layers' gate bias [H, 1] is swapped for a [B, H, T] one, -1e4 at those tokens."""
    B, T = dist.shape[0], dist.shape[1] - 1
    quiet = torch.zeros(B, T, dtype=torch.bool, device=dist.device)
    for b in range(B):
        at = (dist[b] > 0).nonzero()
        if len(at):
            v0 = int(at[0])                      # the first recalled value token
            recall = v0 - CUE - KEY
            first_end = recall - int(dist[b, v0]) + CUE + KEY + int((dist[b] > 0).sum())   # + the value
            quiet[b, first_end:recall] = True
    layers = [m for m in model.modules() if isinstance(m, _TTTLayer)]
    saved = [m._parameters["learnable_ttt_lr_bias"] for m in layers]
    try:
        for m, bias in zip(layers, saved):
            m._parameters["learnable_ttt_lr_bias"] = bias.detach()[None] - 1e4 * quiet[:, None, :].to(bias.dtype)
        yield
    finally:
        for m, bias in zip(layers, saved):
            m._parameters["learnable_ttt_lr_bias"] = bias


def batch(g, alphabet, cues, B, T, n_events, value, first_at_start=False, adjacent=False, noise_alphabet=None,
          max_gap=0):
    """x [B, T + 1] tokens and dist [B, T + 1]: at the recalled value tokens, how far back the
    token they copy is; 0 elsewhere. max_gap > 0 (one event): the recall 1 to max_gap event slots after
    the first mention (1: adjacent), each as likely."""
    noise = alphabet if noise_alphabet is None else noise_alphabet
    x = noise[torch.randint(0, len(noise), (B, T + 1), generator=g)]
    dist = torch.zeros(B, T + 1, dtype=torch.long)
    span = CUE + KEY + value
    if 2 * n_events * span > T:
        raise SystemExit(f"{n_events} events of span {span} do not fit {T} tokens")
    if (first_at_start or adjacent or max_gap) and n_events != 1:
        raise SystemExit("--first_at_start, --adjacent and --gaps place one event: pass --events 1")
    for b in range(B):
        slots = torch.randperm(T // span, generator=g)[:2 * n_events].sort().values * span
        if first_at_start:  # the first mention at token 0, the recall anywhere after it
            slots = torch.cat([torch.zeros(1, dtype=torch.long),
                               1 + torch.randperm(T // span - 1, generator=g)[:1]]) * span
        if adjacent or max_gap:  # the recall 1 (adjacent) to max_gap slots after the first mention
            gap = 1 if adjacent else int(torch.randint(1, min(max_gap, T // span - 1) + 1, (1,), generator=g))
            s0 = int(torch.randint(0, T // span - gap, (1,), generator=g))
            slots = torch.tensor([s0, s0 + gap]) * span
        for e in range(n_events):  # all first mentions, then all recalls: only the key tells them apart
            kv = alphabet[torch.randint(0, len(alphabet), (KEY + value,), generator=g)]
            first, recall = int(slots[e]), int(slots[n_events + e])
            x[b, first:first + span] = torch.cat([cues[0], kv])
            x[b, recall:recall + span] = torch.cat([cues[1], kv])
            dist[b, recall + CUE + KEY:recall + span] = recall - first
    return x, dist


def mqar_batch(g, alphabet, B, T, pairs, start, noise=None, value=1):
    """Multi-query associative recall (Zoology's MQAR, Arora et al. 2023): `pairs` key-value pairs
    `k1 v1 k2 v2 ...` open the sequence, keys from the first half of the alphabet and values (of
    `value` tokens) from the second, each key once; from token `start` on, each key comes back once,
    at a random offset that is a multiple of 1 + value, followed by its value, and token 0 fills the
    rest (or tokens drawn from `noise`, so that every token writes something new to a memory).
    x [B, T + 1], dist [B, T + 1] as batch()."""
    keys, values = alphabet[:len(alphabet) // 2], alphabet[len(alphabet) // 2:]
    span = 1 + value
    slots = (T + 1 - start) // span
    if pairs > len(keys) or pairs > slots:
        raise SystemExit(f"{pairs} pairs need {pairs} keys (the alphabet has {len(keys)}) and {pairs} slots after "
                         f"token {start} ({slots} there)")
    x = torch.zeros(B, T + 1, dtype=torch.long) if noise is None else \
        noise[torch.randint(0, len(noise), (B, T + 1), generator=g)]
    dist = torch.zeros(B, T + 1, dtype=torch.long)
    first = span * torch.arange(pairs)                                                  # where each pair starts
    for b in range(B):
        k = keys[torch.randperm(len(keys), generator=g)[:pairs]]
        v = values[torch.randint(0, len(values), (pairs, value), generator=g)]
        at = start + span * torch.randperm(slots, generator=g)[:pairs]                  # where each key returns
        for j in range(span):
            x[b, first + j] = x[b, at + j] = k if j == 0 else v[:, j - 1]
            if j:
                dist[b, at + j] = at - first
    return x, dist


def predict(model, x, state=None, K=0, S=1):
    """The model's logits for x[:, 1:] given x [B, n + 1] tokens: those of the token [B, n, V], then
    (the speech path only, else None) the whole Logits with the frames they predict, then the state.
    K = 0: text-LM mode; K > 0: the speech path, frames of K codebooks each holding the token (and a
    second stream always 7 when S = 2), the logits of the token those of codebook 0."""
    if not K:
        logits, state = model.lm_forward(x[:, :-1], state)
        return logits, None, state
    frames = x[:, :, None].expand(-1, -1, K).contiguous()     # the model predicts frame t from frames < t
    if S == 2:
        frames = torch.cat([frames, torch.full_like(frames, 7)], -1)
    if state is None:   # the first frame is the input to the second, as the first token is in text-LM mode
        state = model.init_state(x.shape[0], x.device)._replace(prev=frames[:, 0])
    lg, state = model(frames[:, 1:], state)
    return lg.audio[:, :, 0], (lg, frames[:, 1:]), state


def by_bucket(hit, d, lo):
    """Accuracy of hit [...] over distances d [...] (0: not a recall) in buckets from lo up, each ending
    at the next power of two: 'lo-63: 0.61 (n), 64-127: ...'."""
    out, a = [], lo
    while (d >= a).any():
        b = 1 << a.bit_length()                                   # the next power of two above a
        m = (d >= a) & (d < b)
        if m.any():
            out.append(f"{a}-{b - 1}: {hit[m].float().mean().item():.2f} ({m.sum().item()})")
        a = b
    return ", ".join(out)


@torch.no_grad()
def mqar_eval(model, g, alphabet, noise, L, pairs, start, reach, device, carry, K, S, value=1, batches=4, B=16,
              chunk=256):
    """Recall on MQAR sequences of L tokens (keys coming back anywhere from `start` on), by distance
    and by the order in which the keys come back, read in chunks of `chunk` tokens with the state
    carried (constant memory) when `carry`, else (the controls, which keep no state) in one piece.
    The order tells a lookup by key from elimination: a model that only knows which values were
    written and which have come back gets about 1/8, 1/7, ..., 1/1 right for the 1st, 2nd, ..., 8th
    key of 8 (0.34 on average), a lookup 1 for each."""
    hits, dists = [], []
    for _ in range(batches):
        x, dist = mqar_batch(g, alphabet, B, L, pairs, start, noise, value)
        x = x.to(device)
        if carry:
            state, hit = None, []
            for i in range(0, L, chunk):
                lg, _, state = predict(model, x[:, i:min(i + chunk, L) + 1], state, K, S)
                hit.append(lg.argmax(-1) == x[:, i + 1:min(i + chunk, L) + 1])
            hit = torch.cat(hit, 1)
        else:
            hit = predict(model, x, None, K, S)[0].argmax(-1) == x[:, 1:]
        hits.append(hit.cpu())
        dists.append(dist[:, 1:])
    hit, d = torch.cat(hits), torch.cat(dists)
    begins = (d > 0) & (F.pad(d, (1, 0))[:, :-1] == 0)                # the first token of each recalled value
    order = begins.cumsum(1)                                           # 1 for the first key back, ...
    by_order = ", ".join(f"{n}: {hit[(d > 0) & (order == n)].float().mean().item():.2f}" for n in range(1, pairs + 1))
    return by_bucket(hit, d, reach + 1), by_order


@torch.no_grad()
def write_rates(model, x, dist, pairs, K, S, value=1):
    """The TTT layers' learnt write rates on MQAR tokens x [B, T + 1] (dist from mqar_batch): the mean
    gate sigmoid(w . x + c) of their inner learning rate (1: the base rate) over the pairs' keys and
    values, the keys and values coming back, and the filler."""
    seen, layers = [], [m for m in model.modules() if isinstance(m, _TTTLayer)]
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.append((mod, args[0]))) for m in layers]
    try:
        predict(model, x, None, K, S)
    finally:
        for h in hooks:
            h.remove()
    T, span = x.shape[1] - 1, 1 + value
    kind = torch.full((x.shape[0], T), 4)                                  # 4: filler
    kind[:, :span * pairs] = 1                                             # the pairs' values (1), keys (0)
    kind[:, 0:span * pairs:span] = 0
    kind[(dist[:, 1:] > 0) & (dist[:, :-1] == 0)] = 2                      # a key back: its value comes next
    kind[dist[:, :-1] > 0] = 3                                             # a value back
    out = []
    for i, (mod, inp) in enumerate(seen):
        logit = torch.einsum("btc,hc->bht", inp.float(), mod.learnable_ttt_lr_weight[:, 0].float())
        gate = torch.sigmoid(logit + mod.learnable_ttt_lr_bias.float()).mean(1).cpu()   # [B, T]
        out.append(f"layer {i}: " + ", ".join(f"{name} {gate[kind == c].mean().item():.3f}" for c, name in
                                              enumerate(["keys", "values", "keys back", "values back", "filler"])))
    return "; ".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=3, help="events per sequence")
    ap.add_argument("--value", type=int, default=16, help="tokens of a value")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--max_minutes", type=float, default=0, help="stop training after this many minutes (0: no limit)")
    ap.add_argument("--seq_len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--weight_decay", type=float, default=0.1, help="AdamW's (train.py's default 0.1)")
    ap.add_argument("--frames", action="store_true",
                    help="train the speech path (frames, depth decoder, loss_fn) instead of the text-LM mode")
    ap.add_argument("--codebooks", type=int, default=1, help="--frames: codebooks a frame, each holding the token")
    ap.add_argument("--depth_layers", type=int, default=1, help="--frames: the depth decoder's blocks (demo: 1)")
    ap.add_argument("--semantic_weight", type=float, default=1.0, help="--frames: loss weight of codebook 0")
    ap.add_argument("--emb_lr_scale", type=float, default=1.0,
                    help="the input embedding's learning rate, as a multiple of --lr (with --frames --codebooks K "
                         "the K tables summed into a frame all move together: K times a table's step)")
    ap.add_argument("--emb_init_scale", type=float, default=1.0,
                    help="scale the input embedding's initial weights (with --frames --codebooks K a frame's "
                         "input is the sum of K embeddings: sqrt(K) times one embedding's size)")
    ap.add_argument("--silent_speaker", action="store_true", help="--frames: a second stream, always the same code")
    ap.add_argument("--window", type=int, default=0, help="attention window (default: --seq_len)")
    ap.add_argument("--n_ttt", type=int, default=0, help="TTT branch in the top n layers")
    ap.add_argument("--ttt_type", default="linear", help="linear or mlp")
    ap.add_argument("--ttt_mini_batch", type=int, default=16)
    ap.add_argument("--ttt_memory", type=int, default=1,
                    help="k times the TTT heads, each as wide: k times the fast weights (model.py's ttt_head_dim)")
    ap.add_argument("--ttt_base_lr", type=float, default=1.0)
    ap.add_argument("--ttt_gate_init", type=float, default=0.1)
    ap.add_argument("--ttt_lr_bias", type=float, default=0.0,
                    help="initial bias of the TTT layers' learning-rate gate (0: sigmoid 0.5; -4: 0.018, so that "
                         "a token is written at base_lr / 55 unless the model learns to raise it)")
    ap.add_argument("--alphabet", type=int, default=A,
                    help="tokens the noise, keys and values are drawn from (at most 2048; chance is 1 / alphabet)")
    ap.add_argument("--ttt_no_rope", action="store_true",
                    help="no RoPE on the TTT branch's q and k (the layers' RoPE at the position inside the mini-batch)")
    ap.add_argument("--by_distance", action="store_true", help="also print the accuracy at each distance")
    ap.add_argument("--adjacent_steps", type=int, default=0,
                    help="--adjacent for the first N steps only, then the recall anywhere after the first mention")
    ap.add_argument("--adjacent", action="store_true",
                    help="one event whose recall directly follows its first mention, the pair anywhere")
    ap.add_argument("--gaps", default="",
                    help="a curriculum of distances, one event: MAX:STEPS,... the recall 1 to MAX event slots after "
                         "the first mention for STEPS steps each (1: adjacent), then anywhere after it")
    ap.add_argument("--quiet_probe", action="store_true",
                    help="with --by_distance, one event: also the recall when the TTT layers write nothing between the "
                         "first mention and the recall (their learning rate zero there): is it what is written in "
                         "between that the store does not survive?")
    ap.add_argument("--quiet_train", action="store_true",
                    help="one event: train with the TTT layers writing nothing between the first mention and the "
                         "recall (an oracle choice of what to write): can the lookup be learnt when nothing "
                         "interferes with the store?")
    ap.add_argument("--first_at_start", action="store_true",
                    help="one event whose first mention starts the sequence: nothing is written before it")
    ap.add_argument("--separate_noise", action="store_true",
                    help="tokens outside events from an alphabet of their own, so that content tells what to store "
                         "(--mqar: random tokens of that alphabet fill the sequence instead of token 0)")
    ap.add_argument("--ttt_norm_qk", action="store_true",
                    help="the branch's queries and keys scaled to one length per head (NormProj)")
    ap.add_argument("--ttt_shift", action="store_true",
                    help="the branch's keys from the token before (ShiftProj), its queries and values from the token")
    ap.add_argument("--ttt_conv", type=int, default=0,
                    help="a causal depthwise convolution of this many tokens after the TTT layers' q and k "
                         "projections (upstream's share_qk backbone; whole sequences only: no state)")
    ap.add_argument("--memory", default="ttt",
                    choices=["ttt", "linear_attention", "delta", "softmax_attention", "softmax_attention_rope"],
                    help="what the --n_ttt branches hold: the TTT layer, or (controls) causal linear attention "
                         "over the whole sequence with L2-normalised q and k, the delta rule on such keys, or "
                         "causal softmax attention (with RoPE at absolute positions)")
    ap.add_argument("--no_post_norm", action="store_true",
                    help="drop the branch layer's LayerNorm on its output (TTT's post_norm, or the controls')")
    ap.add_argument("--mqar", type=int, default=0,
                    help="instead of events: multi-query associative recall with this many key-value pairs "
                         "(mqar_batch; keys and values from the two halves of --alphabet), the keys coming back "
                         "from token --mqar_start on; the loss on the recalled values only")
    ap.add_argument("--mqar_value", type=int, default=1,
                    help="--mqar: tokens of a value (1 as in Zoology; the experiment's patterns have 32 frames)")
    ap.add_argument("--mqar_full_loss", action="store_true",
                    help="--mqar: the loss on every token, as the experiment's, instead of on the recalled values only")
    ap.add_argument("--mqar_fill_from_pairs", action="store_true",
                    help="--mqar: the filler drawn from the keys' and values' own tokens, as the events' noise is, so "
                         "that keys also turn up in it followed by other tokens")
    ap.add_argument("--mqar_start", type=int, default=0,
                    help="--mqar: the first token where keys come back (0: just past the stacked windows' reach "
                         "from the last pair, so that every recall lies beyond it)")
    ap.add_argument("--eval_lens", default="",
                    help="--mqar: after training, recall by distance on sequences of these lengths (e.g. 1024,4096), "
                         "the keys coming back anywhere after the pairs")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--pool", type=int, default=0,
                    help="train on this many batches made once, in turn (repeated epochs, as a codes file is), "
                         "instead of fresh ones; then each report also gives the accuracy on a fresh batch")
    ap.add_argument("--curriculum", default="",
                    help="shorter sequences first, e.g. 32:500,48:500 (tokens:steps), each with as many events "
                         "as fit (at most --events); then --seq_len for the remaining steps")
    a = ap.parse_args(argv)
    if a.quiet_train and (a.events != 1 or not a.n_ttt):
        ap.error("--quiet_train places the quiet span of one event in the TTT layers: pass --events 1 and --n_ttt")
    if a.eval_lens and not a.mqar:
        ap.error("--eval_lens evaluates --mqar runs: pass --mqar")
    if a.pool and (a.curriculum or a.gaps or a.adjacent_steps or a.quiet_train):
        ap.error("--pool repeats one kind of batch: it does not go with --curriculum, --gaps, --adjacent_steps "
                 "or --quiet_train")
    if not 2 <= a.alphabet * (2 if a.separate_noise else 1) <= V:
        ap.error(f"--alphabet must lie in [2, {V // 2 if a.separate_noise else V}] (the vocabulary holds {V} tokens"
                 + (", split between events and the rest with --separate_noise)" if a.separate_noise else ")"))
    torch.manual_seed(a.seed)
    K = a.codebooks if a.frames else 1
    path = dict(depth_layers=a.depth_layers, semantic_weight=a.semantic_weight) if a.frames else \
        dict(vocab_size=V, tie_embeddings=False)
    S = 2 if a.frames and a.silent_speaker else 1
    heads = max(1, a.dim // 64)   # of a.dim // heads each; --ttt_memory k: k times the heads, as wide each
    ttt = dict(n_ttt=a.n_ttt, ttt_type=a.ttt_type, ttt_mini_batch=a.ttt_mini_batch, ttt_heads=heads * a.ttt_memory,
               ttt_head_dim=a.dim // heads, ttt_base_lr=a.ttt_base_lr, ttt_gate_init=a.ttt_gate_init)
    W = a.window or a.seq_len
    cfg = Config.preset("demo", n_streams=S, n_codebooks=K, window=W, **ttt, dim=a.dim,
                        n_layers=a.layers, n_heads=a.dim // 32, n_kv_heads=a.dim // 64, hidden=3 * a.dim, **path)
    model = SpeechLM(cfg)
    if a.memory != "ttt":
        for m in model.modules():
            if isinstance(m, GatedTTT):
                m.layer = LinearAttention(a.dim, max(1, a.dim // 64), softmax=a.memory.startswith("softmax"),
                                          rope=a.memory.endswith("rope"), delta=a.memory == "delta")
    if a.no_post_norm:
        for m in model.modules():
            if isinstance(m, GatedTTT):
                m.layer.post_norm = torch.nn.Identity()
    if a.ttt_conv:
        for m in model.modules():
            if isinstance(m, (_TTTLayer, LinearAttention)):
                m.q_proj, m.k_proj = (ProjConv(p, a.ttt_conv) for p in (m.q_proj, m.k_proj))
    if a.ttt_norm_qk:
        for m in model.modules():
            if isinstance(m, _TTTLayer):
                m.q_proj, m.k_proj = (NormProj(p, m.n_heads) for p in (m.q_proj, m.k_proj))
    if a.ttt_shift:
        for m in model.modules():
            if isinstance(m, (_TTTLayer, LinearAttention)):
                m.k_proj = ShiftProj(m.k_proj)
    for m in model.modules():
        if isinstance(m, _TTTLayer):
            torch.nn.init.constant_(m.learnable_ttt_lr_bias, a.ttt_lr_bias)
    if a.ttt_no_rope:  # for this run only: ttt.py's RoPE becomes the identity
        import ttt
        saved_rope, ttt._rope = ttt._rope, lambda x, cos, sin: x
    model.to(a.device)
    emb = [p for n, p in model.named_parameters() if n.startswith(("frame_emb.", "embed_tokens."))]
    with torch.no_grad():
        for p in emb:
            p.mul_(a.emb_init_scale)
    rest = [p for n, p in model.named_parameters() if not n.startswith(("frame_emb.", "embed_tokens."))]
    opt = torch.optim.AdamW([dict(params=rest, scale=1.0), dict(params=emb, scale=a.emb_lr_scale)], lr=a.lr,
                            weight_decay=a.weight_decay)
    g = torch.Generator().manual_seed(a.seed + 1)
    perm = torch.randperm(V, generator=g)
    alphabet = perm[:a.alphabet]
    noise_alphabet = perm[a.alphabet:2 * a.alphabet] if a.separate_noise else None
    if a.mqar_fill_from_pairs:
        noise_alphabet = alphabet
    cues = torch.randint(0, V, (2, CUE), generator=g)
    reach = a.layers * (W - 1) + 1
    mqar_start = a.mqar_start or (1 + a.mqar_value) * a.mqar + reach
    if a.mqar:
        print(f"{a.mqar} key-value pairs per {a.seq_len} tokens, recalled from token {mqar_start} on")
    else:
        share = a.events * a.value / a.seq_len
        print(f"{a.events} events of {a.value}-token values per {a.seq_len} tokens: {share:.0%} of the tokens are "
              "recalled")
    t0 = time.time()
    stages = [tuple(int(v) for v in part.split(":")) for part in a.curriculum.split(",") if part]
    gap_stages = [tuple(int(v) for v in part.split(":")) for part in a.gaps.split(",") if part]
    gap_max = [n for n, _ in gap_stages]
    gap_ends = [sum(n for _, n in gap_stages[:i + 1]) for i in range(len(gap_stages))]
    ends = [sum(n for _, n in stages[:i + 1]) for i in range(len(stages))]
    def make(L, n_events, gap, adjacent):
        if a.mqar:
            return mqar_batch(g, alphabet, a.batch, L, a.mqar, mqar_start, noise_alphabet, a.mqar_value)
        return batch(g, alphabet, cues, a.batch, L, n_events, a.value, a.first_at_start, adjacent, noise_alphabet,
                     gap)
    pool = [make(a.seq_len, a.events, 0, a.adjacent) for _ in range(a.pool)]
    if pool:
        print(f"training on {a.pool} batches ({a.pool * a.batch} sequences), each seen every {a.pool} steps")
    for step in range(a.steps + 1):
        last = step == a.steps or bool(a.max_minutes and time.time() - t0 > 60 * a.max_minutes)
        stage = next((i for i, end in enumerate(ends) if step < end), None)
        warm = stage is not None
        L = stages[stage][0] if warm else a.seq_len
        n_events = min(a.events, L // (2 * (CUE + KEY + a.value))) if warm else a.events
        gap = next((n for n, end in zip(gap_max, gap_ends) if step < end), 0)
        x, dist = pool[step % a.pool] if pool else make(L, n_events, gap, a.adjacent or step < a.adjacent_steps)
        x, dist = x.to(a.device), dist.to(a.device)
        for group in opt.param_groups:
            group["lr"] = a.lr * group["scale"] * min(1.0, (step + 1) / 50)
        with quiet_between(model, dist) if a.quiet_train else contextlib.nullcontext():
            logits, speech, _ = predict(model, x, None, K if a.frames else 0, S)
        recalled = dist[:, 1:] > 0
        zoology = a.mqar and not a.mqar_full_loss    # as Zoology: the loss on the recalled values only
        if zoology and speech:                       # ... weighted over the columns as loss_fn
            lg, frames = speech
            ce = F.cross_entropy(lg.audio[recalled].float().transpose(1, 2), frames[recalled], reduction="none")
            w = torch.ones(frames.shape[-1], device=ce.device)
            w[::K] = a.semantic_weight                                         # codebook 0 of each stream
            loss = (ce.mean(0) * w).sum() / w.sum()
        elif zoology:
            loss = F.cross_entropy(logits[recalled], x[:, 1:][recalled])
        elif speech:
            loss = loss_fn(*speech, cfg)[0]
        else:
            loss = F.cross_entropy(logits.reshape(-1, V), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or last:
            d, hit = dist[:, 1:], logits.detach().argmax(-1) == x[:, 1:]
            # the token predicted at position p copies the one at p + 1 - d. One layer's attention at p sees
            # p - W + 1 .. p, so the source is in its window when d <= W; stacked, the layers reach
            # REACH = layers x (W - 1) + 1 tokens back, through the positions in between. Only a memory
            # (the --n_ttt branch) can carry a recall from farther than that.
            acc = [f"{hit[m].float().mean().item():.3f} ({m.sum().item()})" if m.any() else "-"
                   for m in ((d > 0) & (d <= W), (d > W) & (d <= reach), d > reach)]
            stage_note = f" ({L} tokens)" if warm else ""
            far = d > W
            if a.mqar and a.by_distance:
                acc[2] += " [" + by_bucket(hit, d, reach + 1) + "]"
            elif a.by_distance and far.any():  # beyond the window, by distance since the first mention
                acc[2] += " [" + ", ".join(f"{int(v)}: {hit[d == v].float().mean().item():.2f}"
                                           for v in d[far].unique()) + "]"
                if a.quiet_probe:
                    with torch.no_grad(), quiet_between(model, dist):
                        qhit = predict(model, x, None, K if a.frames else 0, S)[0].argmax(-1) == x[:, 1:]
                    acc[2] += " quiet [" + ", ".join(f"{int(v)}: {qhit[d == v].float().mean().item():.2f}"
                                                     for v in d[far].unique()) + "]"
            held = ""
            if pool:   # the same accuracies on a fresh batch: what was looked up, not learnt by heart
                hx, hd = (v.to(a.device) for v in make(a.seq_len, a.events, 0, a.adjacent))
                with torch.no_grad():
                    hhit = predict(model, hx, None, K if a.frames else 0, S)[0].argmax(-1) == hx[:, 1:]
                hd = hd[:, 1:]
                held = " | fresh batch " + " / ".join(
                    f"{hhit[m].float().mean().item():.3f}" if m.any() else "-"
                    for m in ((hd > 0) & (hd <= W), (hd > W) & (hd <= reach), hd > reach))
            print(f"step {step:5d}{stage_note} | loss {loss.item():.3f} | recall accuracy in the window / beyond it "
                  f"within {reach} tokens / beyond {reach} {acc[0]} / {acc[1]} / {acc[2]} (chance "
                  f"{(2 if a.mqar else 1) / a.alphabet:.3f}){held} | {time.time() - t0:.0f}s", flush=True)
        if last:
            break
    carry = a.memory == "ttt" and not (a.ttt_conv or a.ttt_shift)   # the branches that keep a state
    KF = K if a.frames else 0
    for L in (int(v) for v in a.eval_lens.split(",") if v):
        if not carry and L > 4096:
            print(f"held-out, {L} tokens: skipped (this branch keeps no state: the whole sequence at once)")
            continue
        model.eval()
        if carry and L == int(a.eval_lens.split(",")[0]) and a.n_ttt:
            x, dist = mqar_batch(g, alphabet, 16, L, a.mqar, mqar_start, noise_alphabet, a.mqar_value)
            rates = write_rates(model, x.to(a.device), dist.to(a.device), a.mqar, KF, S, a.mqar_value)
            print(f"write rates, {L} tokens: {rates}")
        by_distance, by_order = mqar_eval(model, g, alphabet, noise_alphabet, L, a.mqar, mqar_start, reach,
                                          a.device, carry, KF, S, a.mqar_value)
        print(f"held-out, {L} tokens: recall accuracy by distance {by_distance}")
        print(f"held-out, {L} tokens, by the order the keys come back: {by_order}", flush=True)
    if a.ttt_no_rope:
        ttt._rope = saved_rope
    return model


if __name__ == "__main__":
    main()
