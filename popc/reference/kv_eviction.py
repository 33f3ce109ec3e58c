"""KV-cache eviction after a long prompt, in eager PyTorch: the ground truth for LaProx.

Read top to bottom: a prefill that keeps each layer's keys (after rotary), values and
the attention probabilities of the last ``window`` prompt queries; the scores of every
method; the selection of kept tokens under a whole-cache budget; the compaction; and
a decode loop over the compacted, per-layer (and, for SnapKV, per-head) cache.

Methods (``METHODS``), every one keeping the first ``sinks`` tokens and the last
``window`` prompt tokens (the observation window) in every layer:

* ``full``: no eviction.
* ``streaming`` (StreamingLLM): the sinks and the most recent tokens; uniform per layer.
* ``snapkv`` (SnapKV / H2O-style): the window's attention probabilities averaged over
  the window queries and over the query heads of each KV head (GQA), smoothed along the
  tokens with SnapKV's 1-D average pooling (kernel ``SNAPKV_POOL``, as SnapKV's code
  does by default); a uniform budget per layer, selected per KV head.
* ``random``: uniform per layer, a fixed seed.
* ``laprox``: output-aware, one token set per layer, optionally model-wide (below).

LaProx's score. For a layer with query heads h (KV head g(h)), window queries i and
value rows v_t, token t contributes ``c_i,t = sum_h A_h[i, t] * (v_{t,g(h)} W_O[h])``
to the window query i's attention output (W_O[h]: the o_proj columns of head h). The
heads are summed before any norm, so heads whose contributions cancel give a small
score. Variants (``LAPROX_SCORES``, ``aggregation-normalisation``):

* aggregation ``mean``: mean over window queries of ``||c_i,t||``; ``sum``: the norm
  of the window-averaged contribution ``||mean_i c_i,t||`` (contributions pointing in
  different directions for different queries cancel);
* normalisation ``out``: divided by the same aggregate of the layer's window attention
  output (``mean_i ||o_i||`` or ``||mean_i o_i||``), i.e. a token's share of what the
  layer writes; ``total``: divided by the layer's sum of scores over the prompt.

The normalised scores of every evictable layer's candidate tokens (not sinks/window),
pooled along tokens as SnapKV pools (without it retrieval collapses: the window queries
attend to a key's first digit, decoding needs the next ones), enter ONE top-k, which
thereby decides each layer's length; ``floor`` first gives every layer that fraction of
its uniform share by its own ranking (0: all model-wide; 1: uniform lengths).

Chosen default: ``sum-total``, ``floor=1.0``, pool 11, i.e.
``s_t = ||sum_h mean_i A_h[i,t] v_{t,g(h)} W_O[h]|| / sum_t' s_t'`` ranked per layer.
Measured first on this reference (``benchmarks/kv_eviction_reference.py``, SmolLM2-135M,
``benchmarks/results/kv-eviction-reference-smollm2*.md``), then on the ONNX export
(``popc eval --long-context``, 9 passkey prompts of 1k-4k, 2 continuation prefixes):

* score: of the four variants model-wide (floor 0), passkey accuracy at 20 % was 40 %
  (mean-out) vs 60 % (the other three); the "sum" aggregation costs one GEMM through
  o_proj, the "mean" one a [T, H, hidden] intermediate, about twice the time;
* floor: the model-wide allocation cost retrieval (sum-total at 10 / 20 %: 0 / 67 %
  model-wide, 67 / 100 % with floor 1; 3 prompts of 1k) while perplexity moved < 1 %;
* pooling: the decisive setting. At pool 7 (SnapKV's) LaProx retrieved 1 / 4 / 7 of 9
  at 5 / 10 / 20 %, SnapKV 2 / 5 / 8; failures were truncated keys (the first digits
  kept, the later ones evicted). At pool 11 every variant retrieved 7 / 8 / 8 of 9 (the
  full cache 8 / 9): LaProx per layer or per KV head (``per-head``) and SnapKV alike
  (pool 15: SnapKV the same, LaProx 7 / 7 / 8). The gain over SnapKV at its published kernel is the wider pooling, not the
  output-aware score; the score's own gain is in continuation perplexity at 5-10 %.

So the default keeps uniform per-layer lengths; ``floor < 1`` (the model-wide selection)
stays available and the exported graph supports it (every layer a length of its own).

Budget: a fraction of the prompt (``0.1``: the whole cache holds 10 % of
``prompt_length * evictable_layers`` entries) or an int (the average per-layer length,
so the whole cache holds ``int * evictable_layers``), sinks and window included. Layers
never go below ``sinks + window`` (then the cache exceeds a tiny budget; ``kept`` says).

Sliding-window layers (Gemma 3: 5 of every 6) are left out of the eviction: their cache
is already bounded by their window (512 for Gemma-3-270m), does not grow with the
prompt, and holds exactly the local context the model was trained to see; evicting in
them would change the model even at "full" budget. They keep their last ``window``
prompt tokens and slide as usual; the budget counts the full-attention layers only.

Positions: each kept key keeps the rotary rotation of its original index, and later
tokens are rotated at their true position (prompt length + step), whatever the
compacted lengths. The attention mask is built from the stored positions, so causal
order and sliding windows need no cache-index arithmetic.

Batch: 1. A left-padded batch would carry each row's pad count, score only real
tokens (pads scored -inf), keep per-row lengths (the rows' compacted lengths differ
under LaProx), and pad the compacted caches to the longest row with a key mask.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from popc.modeling import family_spec
from popc.rotary import apply_rotary

METHODS = ("full", "streaming", "snapkv", "random", "laprox")
LAPROX_SCORES = ("mean-out", "mean-total", "sum-out", "sum-total", "per-head")
DEFAULT_LAPROX_SCORE = "sum-total"
DEFAULT_LAPROX_FLOOR = 1.0
SNAPKV_POOL = 7
LAPROX_POOL = 11  # chosen by measurement (module docstring)
DEFAULT_SINKS = 4
DEFAULT_WINDOW = 16


# --------------------------------------------------------------------------- the cache


@dataclass
class LayerKV:
    """One layer's cache: keys (after rotary) and values [Hkv, N, d], and the original
    position of every entry [Hkv, N] (per head: SnapKV keeps different tokens per head)."""

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor

    def append(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        heads = self.keys.shape[0]
        self.keys = torch.cat([self.keys, keys], dim=1)
        self.values = torch.cat([self.values, values], dim=1)
        self.positions = torch.cat([self.positions, positions.expand(heads, -1)], dim=1)


@dataclass
class Prefill:
    """What one prefill leaves: every layer's full prompt cache, the window attention
    probabilities [H, window, T] of the evictable layers (None elsewhere), the window
    queries' attention outputs through o_proj [window, hidden] (bias excluded), and the
    logits of the last prompt token."""

    cache: list[LayerKV]
    window_probs: list[torch.Tensor | None]
    window_out: list[torch.Tensor | None]
    last_logits: torch.Tensor
    length: int
    window: int
    seconds: float


@dataclass
class Compacted:
    """A compacted cache ready to decode: per-layer caches and the next true position."""

    cache: list[LayerKV]
    next_position: int
    kept: list[int] = field(default_factory=list)  # entries per evictable layer (per head)
    seconds: float = 0.0  # scores + selection + compaction


# --------------------------------------------------------------------------- scores


def pool_scores(score: torch.Tensor, pool: int) -> torch.Tensor:
    """Scores [..., T] average-pooled along tokens with an odd kernel ``pool`` (SnapKV's
    clustering: a peak's neighbours are kept with it, e.g. the digits after the first one
    a question attends to, which decoding reads only later)."""
    if pool <= 1:
        return score
    shape = score.shape
    flat = score.reshape(-1, 1, shape[-1])
    return F.avg_pool1d(flat, pool, stride=1, padding=pool // 2, count_include_pad=False).reshape(shape)


def snapkv_scores(probs: torch.Tensor, kv_heads: int, pool: int = SNAPKV_POOL) -> torch.Tensor:
    """[Hkv, T]: the window probabilities [H, w, T] averaged over window queries and over
    each KV head's query heads, then average-pooled along tokens (SnapKV's clustering)."""
    heads, _, length = probs.shape
    return pool_scores(probs.mean(1).view(kv_heads, heads // kv_heads, length).mean(1), pool)


def laprox_head_scores(probs: torch.Tensor, values: torch.Tensor, o_weight: torch.Tensor) -> torch.Tensor:
    """[Hkv, T], normalised by the layer's total: the contribution of each KV entry (token t
    in KV head g) to the window-averaged attention output, ``||sum_{h in g} mean_i A_h[i,t]
    v_{t,g} W_O[h]||``: the query heads that read the entry summed before the norm. Under
    GQA the cache's entries are (token, KV head) pairs, each evictable on its own."""
    heads, _, length = probs.shape
    kv_heads, _, head_dim = values.shape
    group = heads // kv_heads
    weights = probs.mean(1).view(kv_heads, group, length)  # [Hkv, G, T]
    scaled = weights[..., None] * values[:, None]  # [Hkv, G, T, d]
    w_o = o_weight.view(o_weight.shape[0], kv_heads, group * head_dim)  # [hidden, Hkv, G*d]
    per_entry = torch.stack([
        (scaled[g].permute(1, 0, 2).reshape(length, group * head_dim) @ w_o[:, g].T).norm(dim=-1)
        for g in range(kv_heads)
    ])  # fmt: skip
    return per_entry / per_entry.sum().clamp_min(1e-12)


def laprox_scores(
    probs: torch.Tensor, values: torch.Tensor, o_weight: torch.Tensor, window_out: torch.Tensor, score: str
) -> torch.Tensor:
    """[T]: each token's normalised contribution to the layer's window attention output.

    ``probs`` [H, w, T]; ``values`` [Hkv, T, d]; ``o_weight`` the o_proj weight
    [hidden, H * d]; ``window_out`` [w, hidden] the window queries' outputs through
    o_proj (no bias); ``score`` one of ``LAPROX_SCORES``."""
    aggregation, normalisation = score.split("-")
    heads, _, length = probs.shape
    head_dim = values.shape[-1]
    per_head = values.repeat_interleave(heads // values.shape[0], dim=0)  # [H, T, d]
    if aggregation == "sum":
        # One GEMM: the window-averaged probabilities scale each head's values, o_proj sums
        # the heads (what the layer's o_proj costs over the prompt, no [H, T, hidden]).
        scaled = probs.mean(1)[:, :, None] * per_head  # [H, T, d]
        contribution = scaled.transpose(0, 1).reshape(length, heads * head_dim) @ o_weight.T  # [T, hidden]
        value = contribution.norm(dim=-1)
        reference = window_out.mean(0).norm()
    elif aggregation == "mean":
        w_o = o_weight.view(o_weight.shape[0], heads, head_dim).permute(1, 2, 0)  # [H, d, hidden]
        u = torch.bmm(per_head, w_o)  # [H, T, hidden]: v_t W_O[h], what head h writes per unit weight
        # ||sum_h a_h u_h||^2 = a^T G a with the per-token Gram matrix G_t = U_t U_t^T [H, H]:
        # the per-query norms without materialising [w, T, hidden].
        per_token = u.transpose(0, 1)  # [T, H, hidden]
        gram = torch.bmm(per_token, per_token.transpose(1, 2))  # [T, H, H]
        a = probs.permute(2, 1, 0)  # [T, w, H]
        squared = (torch.bmm(a, gram) * a).sum(-1).transpose(0, 1)  # [w, T]
        value = squared.clamp_min(0).sqrt().mean(0)
        reference = window_out.norm(dim=-1).mean()
    else:
        raise ValueError(f"unknown LaProx aggregation {aggregation!r}")
    if normalisation == "out":
        return value / reference.clamp_min(1e-12)
    if normalisation == "total":
        return value / value.sum().clamp_min(1e-12)
    raise ValueError(f"unknown LaProx normalisation {normalisation!r}")


# --------------------------------------------------------------------------- selection


def forced_mask(length: int, sinks: int, window: int) -> torch.Tensor:
    """[T] bool: the tokens every method keeps (the first ``sinks``, the last ``window``)."""
    forced = torch.zeros(length, dtype=torch.bool)
    forced[:sinks] = True
    forced[max(length - window, 0) :] = True
    return forced


def topk_per_head(scores: torch.Tensor, count: int, forced: torch.Tensor) -> torch.Tensor:
    """[Hkv, count] sorted token indices: the forced tokens and the best-scored others."""
    count = min(max(count, int(forced.sum())), scores.shape[-1])
    ranked = scores.masked_fill(forced, float("inf"))
    return ranked.topk(count, dim=-1).indices.sort(dim=-1).values


def streaming_keep(length: int, count: int, sinks: int) -> torch.Tensor:
    """[count] indices: the ``sinks`` first tokens and the most recent ``count - sinks``."""
    count = min(count, length)
    return torch.cat([torch.arange(min(sinks, count)), torch.arange(length - (count - min(sinks, count)), length)])


def random_keep(length: int, count: int, forced: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """[count] sorted indices: the forced tokens and uniformly drawn others."""
    scores = torch.rand(length, generator=generator)
    return topk_per_head(scores[None], count, forced)[0]


def global_keep(
    scores: list[torch.Tensor], total: int, forced: torch.Tensor, floor: int = 0
) -> list[torch.Tensor]:
    """One model-wide selection: per layer, the sorted kept indices. Every layer keeps its
    forced tokens and its ``floor`` best others; the rest of ``total`` goes to the best
    normalised scores over all layers together."""
    free = (~forced).nonzero().flatten()
    floor = min(floor, free.numel())
    chosen = []
    pooled = []
    for layer, score in enumerate(scores):
        candidate = score[free]
        best = candidate.topk(floor).indices
        chosen.append(free[best])
        rest = torch.ones_like(candidate, dtype=torch.bool)
        rest[best] = False
        pooled.append((candidate[rest], torch.full((int(rest.sum()),), layer), free[rest]))
    remaining = total - len(scores) * (int(forced.sum()) + floor)
    if remaining > 0:
        values = torch.cat([p[0] for p in pooled])
        layers = torch.cat([p[1] for p in pooled])
        tokens = torch.cat([p[2] for p in pooled])
        top = values.topk(min(remaining, values.numel())).indices
        for layer in range(len(scores)):
            chosen[layer] = torch.cat([chosen[layer], tokens[top][layers[top] == layer]])
    base = forced.nonzero().flatten()
    return [torch.cat([base, extra]).sort().values for extra in chosen]


def whole_cache_budget(budget: float | int, length: int, layers: int) -> int:
    """Entries the whole (evictable) cache may hold: a fraction of ``length * layers``, or
    an int average per-layer length times ``layers``."""
    if isinstance(budget, float):
        if not 0.0 < budget <= 1.0:
            raise ValueError("a fractional budget must be in (0, 1]")
        return round(budget * length * layers)
    if budget < 1:
        raise ValueError("a token budget must be at least 1")
    return min(budget, length) * layers


@torch.no_grad()
def select_tokens(
    prefill: Prefill,
    evictable: list[int],
    kv_heads: int,
    o_weights: list[torch.Tensor],
    method: str,
    budget: float | int = 1.0,
    sinks: int = DEFAULT_SINKS,
    score: str = DEFAULT_LAPROX_SCORE,
    seed: int = 0,
    floor: float = DEFAULT_LAPROX_FLOOR,
    pool: int | None = None,
) -> list[torch.Tensor]:
    """Per layer of ``evictable``, the kept token indices [Hkv, n] (sorted per head), from a
    prefill's window probabilities and values (``o_weights``: each evictable layer's o_proj
    weight [hidden, H * d]). ``score``,
    ``floor`` (the fraction of the uniform per-layer share, beyond sinks and window,
    that every layer keeps by its own ranking before the model-wide top-k: 0 = all
    model-wide, 1 = uniform per layer) and ``pool`` (the token pooling of the scores)
    are LaProx's; ``seed`` is random's."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}")
    length, heads = prefill.length, kv_heads
    forced = forced_mask(length, sinks, prefill.window)
    layers = len(evictable)
    total = whole_cache_budget(budget, length, layers)
    per_layer = total // layers
    if method == "full" or total >= length * layers:
        return [torch.arange(length).expand(heads, -1) for _ in evictable]
    if method == "streaming":
        keep = streaming_keep(length, max(per_layer, int(forced.sum())), sinks)
        return [keep.expand(heads, -1) for _ in evictable]
    if method == "random":
        generator = torch.Generator().manual_seed(seed)
        return [random_keep(length, per_layer, forced, generator).expand(heads, -1) for _ in evictable]
    if method == "snapkv":
        return [
            topk_per_head(snapkv_scores(prefill.window_probs[i], heads, pool or SNAPKV_POOL), per_layer, forced)
            for i in evictable
        ]
    share = max(per_layer - int(forced.sum()), 0)
    pool = pool or LAPROX_POOL
    if score == "per-head":
        entries = [
            pool_scores(laprox_head_scores(prefill.window_probs[i], prefill.cache[i].values, o_weight), pool)
            for i, o_weight in zip(evictable, o_weights)
        ]
        # Each layer's length from the model-wide top-k over the head-summed scores, then
        # each KV head its own tokens (the cache is one tensor per layer: equal lengths).
        lengths = [k.numel() for k in global_keep([e.sum(0) for e in entries], total, forced, round(floor * share))]
        return [topk_per_head(e, n, forced) for e, n in zip(entries, lengths)]
    scores = [
        pool_scores(
            laprox_scores(prefill.window_probs[i], prefill.cache[i].values, o_weight, prefill.window_out[i], score),
            pool,
        )
        for i, o_weight in zip(evictable, o_weights)
    ]
    return [keep.expand(heads, -1) for keep in global_keep(scores, total, forced, round(floor * share))]


# --------------------------------------------------------------------------- the model


class EvictionReference:
    """A HF Llama-family or Gemma-3 causal LM run layer by layer over an evictable cache."""

    def __init__(self, model: nn.Module):
        self.model = model
        config = model.config
        self.base = model.model
        self.layers = list(self.base.layers)
        self.windows = family_spec(config).sliding_windows(config)
        self.layer_types = list(getattr(config, "layer_types", None) or ["full_attention"] * len(self.layers))
        self.evictable = [index for index, window in enumerate(self.windows) if window is None]
        self.typed_rope = "layer_type" in inspect.signature(self.base.rotary_emb.forward).parameters
        self.softcap = getattr(config, "final_logit_softcapping", None)
        attn = self.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads

    # ---- one layer

    def _rope(self, hidden: torch.Tensor, positions: torch.Tensor, index: int):
        if self.typed_rope:
            cos, sin = self.base.rotary_emb(hidden, positions, self.layer_types[index])
        else:
            cos, sin = self.base.rotary_emb(hidden, positions)
        return cos.unsqueeze(1), sin.unsqueeze(1)

    def _qkv(self, index: int, x: torch.Tensor, positions: torch.Tensor):
        """q [1, H, S, d], k, v [1, Hkv, S, d] of layer ``index``, rotated at ``positions``."""
        attn = self.layers[index].self_attn
        shape = (1, x.shape[1], -1, self.head_dim)
        q = attn.q_proj(x).view(shape)
        k = attn.k_proj(x).view(shape)
        v = attn.v_proj(x).view(shape).transpose(1, 2)
        if getattr(attn, "q_norm", None) is not None:
            q, k = attn.q_norm(q), attn.k_norm(k)
        cos, sin = self._rope(x, positions, index)
        return apply_rotary(q.transpose(1, 2), cos, sin), apply_rotary(k.transpose(1, 2), cos, sin), v

    def _block(self, index: int, hidden: torch.Tensor, attend) -> torch.Tensor:
        """The decoder layer around an attention function ``attend(x) -> [1, S, H*d]``
        (Gemma's sandwich norms where the layer has them)."""
        layer = self.layers[index]
        attn_out = layer.self_attn.o_proj(attend(layer.input_layernorm(hidden)))
        pre_ffn = getattr(layer, "pre_feedforward_layernorm", None)
        if pre_ffn is not None:  # Gemma: norm after attention, norms around the FFN
            hidden = hidden + layer.post_attention_layernorm(attn_out)
            return hidden + layer.post_feedforward_layernorm(layer.mlp(pre_ffn(hidden)))
        hidden = hidden + attn_out
        return hidden + layer.mlp(layer.post_attention_layernorm(hidden))

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.model.lm_head(self.base.norm(hidden))
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def _check_softcap(self, index: int) -> None:
        if getattr(self.layers[index].self_attn, "attn_logit_softcapping", None) is not None:
            raise NotImplementedError("attention logit soft-capping is not supported by this reference")

    # ---- prefill

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor, window: int = DEFAULT_WINDOW) -> Prefill:
        """Run the prompt ``ids`` [1, T]; keep every layer's cache and the window's attention."""
        if ids.shape[0] != 1:
            raise ValueError("the eviction reference runs batch 1")
        start = time.perf_counter()
        length = ids.shape[1]
        window = min(window, length)
        positions = torch.arange(length)[None]
        hidden = self.base.embed_tokens(ids)
        key_pos = torch.arange(length)
        causal = key_pos[None, :] <= key_pos[:, None]
        caches, probs, outs = [], [], []
        for index in range(len(self.layers)):
            self._check_softcap(index)
            attn = self.layers[index].self_attn
            span = self.windows[index]

            def attend(x, index=index, attn=attn, span=span):
                q, k, v = self._qkv(index, x, positions)
                caches.append(LayerKV(k[0], v[0], key_pos.expand(self.kv_heads, -1)))
                if span is None:  # is_causal: SDPA's fused path, no T x T mask at 4k
                    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=attn.scaling, enable_gqa=True)
                else:
                    mask = causal & (key_pos[None, :] > key_pos[:, None] - span)
                    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling, enable_gqa=True)
                if span is None:
                    # The window rows only, recomputed: [H, w, T], never T x T for every layer.
                    qw = q[0, :, length - window :]
                    kw = k[0].repeat_interleave(self.heads // self.kv_heads, dim=0)
                    logits = (qw @ kw.transpose(1, 2)) * attn.scaling
                    p = logits.masked_fill(~causal[length - window :], float("-inf")).softmax(-1)
                    probs.append(p)
                    wo = out[0, :, length - window :].transpose(0, 1).reshape(window, -1)
                    outs.append(F.linear(wo, attn.o_proj.weight))
                else:
                    probs.append(None)
                    outs.append(None)
                return out.transpose(1, 2).reshape(1, length, -1)

            hidden = self._block(index, hidden, attend)
        last = self._logits(hidden[:, -1:])[0, -1]
        return Prefill(caches, probs, outs, last, length, window, time.perf_counter() - start)

    # ---- selection and compaction

    def select(self, prefill: Prefill, method: str, budget: float | int = 1.0, **options) -> list[torch.Tensor]:
        """Per evictable layer, the kept token indices [Hkv, n] (:func:`select_tokens`)."""
        o_weights = [self.layers[i].self_attn.o_proj.weight for i in self.evictable]
        return select_tokens(prefill, self.evictable, self.kv_heads, o_weights, method, budget, **options)

    def compact(self, prefill: Prefill, kept: list[torch.Tensor]) -> Compacted:
        """Each evictable layer's cache gathered to its kept tokens (per head); sliding-window
        layers keep their last ``window`` prompt tokens. Positions stay the original ones."""
        caches = []
        by_layer = dict(zip(self.evictable, kept))
        for index, layer in enumerate(prefill.cache):
            if index in by_layer:
                keep = by_layer[index]
            else:
                start = max(prefill.length - self.windows[index], 0)
                keep = torch.arange(start, prefill.length).expand(self.kv_heads, -1)
            gather = keep[..., None].expand(-1, -1, self.head_dim)
            caches.append(
                LayerKV(layer.keys.gather(1, gather), layer.values.gather(1, gather), layer.positions.gather(1, keep))
            )
        return Compacted(caches, prefill.length, [k.shape[1] for k in kept])

    def evict(self, prefill: Prefill, method: str, budget: float | int = 1.0, **options) -> Compacted:
        """``select`` then ``compact``, timed."""
        start = time.perf_counter()
        compacted = self.compact(prefill, self.select(prefill, method, budget, **options))
        compacted.seconds = time.perf_counter() - start
        return compacted

    # ---- decode over the compacted cache

    @torch.no_grad()
    def extend(self, state: Compacted, ids: torch.Tensor) -> torch.Tensor:
        """Run new tokens ``ids`` [1, S] at their true positions over ``state`` (appended in
        place); their logits [S, vocab]."""
        count = ids.shape[1]
        query_pos = torch.arange(state.next_position, state.next_position + count)
        hidden = self.base.embed_tokens(ids)
        for index in range(len(self.layers)):
            attn = self.layers[index].self_attn
            span = self.windows[index]
            cache = state.cache[index]

            def attend(x, index=index, attn=attn, span=span, cache=cache):
                q, k, v = self._qkv(index, x, query_pos[None])
                cache.append(k[0], v[0], query_pos[None])
                groups = self.heads // self.kv_heads
                keys = cache.keys.repeat_interleave(groups, dim=0)  # [H, N, d]
                values = cache.values.repeat_interleave(groups, dim=0)
                key_pos = cache.positions.repeat_interleave(groups, dim=0)[:, None, :]  # [H, 1, N]
                allowed = key_pos <= query_pos[None, :, None]
                if span is not None:
                    allowed = allowed & (key_pos > query_pos[None, :, None] - span)
                logits = (q[0] @ keys.transpose(1, 2)) * attn.scaling
                p = logits.masked_fill(~allowed, float("-inf")).softmax(-1)
                return (p @ values).transpose(0, 1).reshape(1, count, -1)

            hidden = self._block(index, hidden, attend)
        state.next_position += count
        return self._logits(hidden)[0]

    def greedy(self, state: Compacted, first_logits: torch.Tensor, steps: int) -> list[int]:
        """Greedy tokens from the prefill's last logits, decoding over ``state``."""
        tokens = [int(first_logits.argmax())]
        for _ in range(steps - 1):
            logits = self.extend(state, torch.tensor([[tokens[-1]]]))
            tokens.append(int(logits[-1].argmax()))
        return tokens

    def continuation_nll(self, state: Compacted, first_logits: torch.Tensor, ids: torch.Tensor) -> float:
        """Mean NLL of ``ids`` [1, S] following the prompt, teacher-forced over ``state``."""
        logits = torch.cat([first_logits[None], self.extend(state, ids[:, :-1])])
        return float(F.cross_entropy(logits.float(), ids[0]))
