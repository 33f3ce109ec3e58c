"""Which tokens each KV-eviction method keeps: scores and selection, shared by the PyTorch
reference (:mod:`popc.reference.kv_eviction`) and the runtime (:mod:`popc.kv_eviction`).

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
* aggregation ``delta``: as ``sum``, with each head's term ``A_h[i,t] (v_t - o_h,i)``
  (o_h,i the head's window output): the first-order change of the output when t leaves
  the softmax, whose renormalisation of the other tokens ``sum`` leaves out;
* normalisation ``out``: divided by the same aggregate of the layer's window attention
  output (``mean_i ||o_i||`` or ``||mean_i o_i||``), i.e. a token's share of what the
  layer writes; ``total``: divided by the layer's sum of scores over the prompt.

The normalised scores of every evictable layer's candidate tokens (not sinks/window),
pooled along tokens as SnapKV pools (without it retrieval collapses: the window queries
attend to a key's first digit, decoding needs the next ones), enter ONE top-k, which
thereby decides each layer's length; ``floor`` first gives every layer that fraction of
its uniform share by its own ranking (0: all model-wide; 1: uniform lengths).

Chosen default: ``sum-total``, ``floor=1.0``, pool 11, mix 0.3, i.e.
``s_t = 0.7 ||sum_h mean_i A_h[i,t] v_{t,g(h)} W_O[h]|| / sum_t' (...) + 0.3 mean_{h,i} A_h[i,t] / sum_t' (...)``
pooled and ranked per layer.
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

A pooling ``shift`` (the kernel moved back, keeping more after a peak than before it)
lowered SmolLM2's perplexity at shift 5 within the paired intervals: measured, not adopted.

Attention mass (``mix``, :func:`mixed_scores`): the output-aware score alone can evict tokens
that take much of the window's attention but write little (sink-like tokens); evicting them
renormalises the attention over what is kept, and with few tokens kept that can collapse a
prefix (Gemma-3 int4, one 2k prefix at 5 %: perplexity 298 against the full cache's 57).
``mix=0.3`` gives 30 % of each layer's score to its attention mass: that prefix 72, the
model's 5 % average 47.15 against 57.12 (SnapKV-style 48.28); elsewhere on both models, fp32
and int4, passkey and perplexity within the paired intervals of ``mix=0``, except one Gemma-3
int4 passkey prompt lost at 50 % (``mix=0.5`` lost more). Chosen over ``delta-total``, which
fixes the collapse too but loses passkey at 10 % on SmolLM2 and costs 1.5x; mixing costs nothing
(``benchmarks/results/kv-eviction-ablation-{mix,delta}.md``).

So the default keeps uniform per-layer lengths; ``floor < 1`` (the model-wide selection)
stays available and the exported graph supports it (every layer a length of its own).

Budget: a fraction of the prompt (``0.1``: the whole cache holds 10 % of
``prompt_length * evictable_layers`` entries) or an int (the average per-layer length,
so the whole cache holds ``int * evictable_layers``), sinks and window included. Layers
never go below ``sinks + window`` (then the cache exceeds a tiny budget; ``kept`` says).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

METHODS = ("full", "streaming", "snapkv", "random", "laprox")
LAPROX_SCORES = ("mean-out", "mean-total", "sum-out", "sum-total", "delta-total", "per-head")
DEFAULT_LAPROX_SCORE = "sum-total"
DEFAULT_LAPROX_FLOOR = 1.0
SNAPKV_POOL = 7
LAPROX_POOL = 11  # chosen by measurement (module docstring)
DEFAULT_LAPROX_MIX = 0.3  # the attention-mass share of LaProx's score (module docstring)
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


# --------------------------------------------------------------------------- scores


def pool_scores(score: torch.Tensor, pool: int, shift: int = 0) -> torch.Tensor:
    """Scores [..., T] average-pooled along tokens with an odd kernel ``pool`` (SnapKV's
    clustering: a peak's neighbours are kept with it, e.g. the digits after the first one
    a question attends to, which decoding reads only later). ``shift`` > 0 moves the kernel
    back by that many tokens: token t averages ``[t - pool//2 - shift, t + pool//2 - shift]``,
    so more of what follows a peak (what decoding reads next) is kept than what precedes it."""
    if pool <= 1 and shift == 0:
        return score
    shape = score.shape
    flat = score.reshape(-1, 1, shape[-1])
    if shift == 0:
        return F.avg_pool1d(flat, pool, stride=1, padding=pool // 2, count_include_pad=False).reshape(shape)
    length = shape[-1]
    sums = F.pad(flat.double().cumsum(-1), (1, 0))  # sums[..., j] = sum of the first j scores
    tokens = torch.arange(length)
    low = (tokens - pool // 2 - shift).clamp(0, length)
    high = (tokens + pool // 2 - shift + 1).clamp(0, length)
    count = (high - low).clamp_min(1)
    pooled = (sums[..., high] - sums[..., low]) / count
    return pooled.to(score.dtype).reshape(shape)


def snapkv_scores(probs: torch.Tensor, kv_heads: int, pool: int = SNAPKV_POOL) -> torch.Tensor:
    """[Hkv, T]: the window probabilities [H, w, T] averaged over window queries and over
    each KV head's query heads, then average-pooled along tokens (SnapKV's clustering)."""
    heads, _, length = probs.shape
    return pool_scores(probs.mean(1).view(kv_heads, heads // kv_heads, length).mean(1), pool)


def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX), where a bf16 GEMM
    runs about 3x a float32 one; elsewhere bf16 is emulated and slower than float32."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


class OutputProjection:
    """A layer's o_proj weight [hidden, H * d] and the norms of rows through it.

    ``norms(x)`` is ``||x W_O^T||`` per row at about 2/3 of the product's cost: with
    ``W_O = Q R`` (QR, Q's columns orthonormal), ``||x W_O^T|| = ||x R^T||``, and ``R^T``
    [H * d, k] is lower triangular, so its column block j reads x's columns from j on only
    (in ``BLOCKS`` blocks: 10/16 of the multiplies). LaProx's score is one such norm per
    prompt token; this is most of what the eviction costs.

    Precision (``dtype``): bfloat16 inputs with float32 accumulation where the CPU has bf16
    dot products (:func:`native_bf16`): 2.8x faster than float32 at 1k tokens, each norm
    within 1e-3 of the float32 one (2e-4 on average), which moves only near-ties of the
    ranking. The weight's own type elsewhere, for a float64 weight, or with ``dtype=``."""

    BLOCKS = 4

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype | None = None):
        self.weight = weight
        fast = weight.dtype == torch.float32 and native_bf16()
        self.dtype = dtype or (torch.bfloat16 if fast else weight.dtype)
        self.accumulate = torch.float32 if self.dtype == torch.bfloat16 else self.dtype
        self._factor: torch.Tensor | None = None

    @property
    def factor(self) -> torch.Tensor:
        """``R^T`` [H * d, k] in :attr:`dtype`, computed once (in float64)."""
        if self._factor is None:
            upper = torch.linalg.qr(self.weight.double(), mode="r").R  # [k, H * d]
            self._factor = upper.T.to(self.dtype).contiguous()
        return self._factor

    def norms(self, x: torch.Tensor) -> torch.Tensor:
        """[T] (float32 for bf16): ``||x_t W_O^T||`` for ``x`` [T, H * d] (any float type)."""
        factor = self.factor
        x = x.to(self.dtype)
        width = factor.shape[1]
        step = -(-width // self.BLOCKS)
        squared = torch.zeros(x.shape[0], dtype=self.accumulate)
        for start in range(0, width, step):
            block = (x[:, start:] @ factor[start:, start : start + step]).to(self.accumulate)
            squared.add_(torch.linalg.vecdot(block, block))
        return squared.sqrt()


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
    probs: torch.Tensor, values: torch.Tensor, o_proj: OutputProjection, window_out: torch.Tensor | None, score: str
) -> torch.Tensor:
    """[T]: each token's normalised contribution to the layer's window attention output.

    ``probs`` [H, w, T]; ``values`` [Hkv, T, d]; ``o_proj`` the layer's o_proj;
    ``window_out`` [w, hidden] the window queries' outputs through o_proj (no bias; read
    by the ``*-out`` scores only);
    ``score`` one of ``LAPROX_SCORES``."""
    o_weight = o_proj.weight
    aggregation, normalisation = score.split("-")
    heads, _, length = probs.shape
    head_dim = values.shape[-1]
    kv_heads = values.shape[0]
    if aggregation == "sum":
        # One GEMM: the window-averaged probabilities scale each head's values, o_proj sums
        # the heads (what the layer's o_proj costs over the prompt, no [H, T, hidden]). The
        # scaled values are built in o_proj's [T, H * d] layout by one broadcast product
        # (query head h = g * G + j reads KV head g), without repeating the values per head.
        weights = probs.mean(1).view(kv_heads, heads // kv_heads, length).permute(2, 0, 1)  # [T, Hkv, G]
        # In the projection's precision at once: no float32 copy to convert.
        scaled = torch.empty(length, kv_heads, heads // kv_heads, head_dim, dtype=o_proj.dtype)  # not values' layout
        torch.mul(weights[..., None], values.transpose(0, 1)[:, :, None], out=scaled)
        value = o_proj.norms(scaled.view(length, heads * head_dim))  # [T]
    elif aggregation == "delta":
        # The first-order change of the window's output when t leaves the softmax, which
        # renormalises the rest: A_h[i,t] (v_t - o_h,i) per head, o_h,i the head's window
        # output. A token much attended but with a small value (a sink-like token) then
        # scores by what its removal moves, not by its small v_t W_O.
        group = heads // kv_heads
        window = probs.shape[1]
        head_out = (probs.reshape(kv_heads, group * window, length) @ values).view(heads, window, head_dim)
        renormalised = probs.transpose(1, 2) @ head_out / window  # [H, T, d]: mean_i A_h[i,t] o_h,i
        delta = probs.mean(1)[..., None] * values.repeat_interleave(group, dim=0) - renormalised  # [H, T, d]
        value = o_proj.norms(delta.transpose(0, 1).reshape(length, heads * head_dim))
    elif aggregation == "mean":
        per_head = values.repeat_interleave(heads // kv_heads, dim=0)  # [H, T, d]
        w_o = o_weight.view(o_weight.shape[0], heads, head_dim).permute(1, 2, 0)  # [H, d, hidden]
        u = torch.bmm(per_head, w_o)  # [H, T, hidden]: v_t W_O[h], what head h writes per unit weight
        # ||sum_h a_h u_h||^2 = a^T G a with the per-token Gram matrix G_t = U_t U_t^T [H, H]:
        # the per-query norms without materialising [w, T, hidden].
        per_token = u.transpose(0, 1)  # [T, H, hidden]
        gram = torch.bmm(per_token, per_token.transpose(1, 2))  # [T, H, H]
        a = probs.permute(2, 1, 0)  # [T, w, H]
        squared = (torch.bmm(a, gram) * a).sum(-1).transpose(0, 1)  # [w, T]
        value = squared.clamp_min(0).sqrt().mean(0)
    else:
        raise ValueError(f"unknown LaProx aggregation {aggregation!r}")
    if normalisation == "out":
        reference = window_out.mean(0).norm() if aggregation == "sum" else window_out.norm(dim=-1).mean()
        return value / reference.clamp_min(1e-12)
    if normalisation == "total":
        return value / value.sum().clamp_min(1e-12)
    raise ValueError(f"unknown LaProx normalisation {normalisation!r}")


def mixed_scores(scores: torch.Tensor, probs: torch.Tensor, mix: float) -> torch.Tensor:
    """``(1 - mix)`` of a layer's LaProx scores [T] (summing to 1) plus ``mix`` of its window
    attention mass per token (``probs`` [H, w, T] averaged, also summing to 1): a token much
    attended keeps a share of the budget even where its value contributes little, since
    evicting it renormalises the attention over the rest."""
    if mix == 0:
        return scores
    mass = probs.mean((0, 1)).to(scores.dtype)
    return (1 - mix) * scores / scores.sum().clamp_min(1e-12) + mix * mass / mass.sum().clamp_min(1e-12)


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
    o_projs: list[OutputProjection],
    method: str,
    budget: float | int = 1.0,
    sinks: int = DEFAULT_SINKS,
    score: str = DEFAULT_LAPROX_SCORE,
    seed: int = 0,
    floor: float = DEFAULT_LAPROX_FLOOR,
    pool: int | None = None,
    shift: int = 0,
    mix: float = DEFAULT_LAPROX_MIX,
) -> list[torch.Tensor]:
    """Per layer of ``evictable``, the kept token indices [Hkv, n] (sorted per head), from a
    prefill's window probabilities and values (``o_projs``: each evictable layer's o_proj). ``score``,
    ``floor`` (the fraction of the uniform per-layer share, beyond sinks and window,
    that every layer keeps by its own ranking before the model-wide top-k: 0 = all
    model-wide, 1 = uniform per layer), ``pool`` and ``shift`` (the token pooling of the scores),
    ``mix`` (:func:`mixed_scores`: the share of the window's attention mass in the score)
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
            pool_scores(laprox_head_scores(prefill.window_probs[i], prefill.cache[i].values, o_proj.weight), pool, shift)
            for i, o_proj in zip(evictable, o_projs)
        ]
        # Each layer's length from the model-wide top-k over the head-summed scores, then
        # each KV head its own tokens (the cache is one tensor per layer: equal lengths).
        lengths = [k.numel() for k in global_keep([e.sum(0) for e in entries], total, forced, round(floor * share))]
        return [topk_per_head(e, n, forced) for e, n in zip(entries, lengths)]
    scores = [
        pool_scores(
            mixed_scores(
                laprox_scores(prefill.window_probs[i], prefill.cache[i].values, o_proj, prefill.window_out[i], score),
                prefill.window_probs[i],
                mix,
            ),
            pool,
            shift,
        )
        for i, o_proj in zip(evictable, o_projs)
    ]
    return [keep.expand(heads, -1) for keep in global_keep(scores, total, forced, round(floor * share))]
