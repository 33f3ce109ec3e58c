"""The KV-eviction reference (popc/reference/kv_eviction.py, kv_selection.py) and the long-context tasks.

Tiny random-weight Llama and Gemma-3 (sliding-window layers) models in float64."""

from __future__ import annotations

import inspect

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import make_tiny_model_dir, make_tiny_tokenizer
from popc import longcontext
from popc.reference.kv_eviction import EvictionReference
from popc.reference.kv_selection import (
    LAPROX_SCORES,
    METHODS,
    OutputProjection,
    forced_mask,
    global_keep,
    laprox_head_scores,
    laprox_scores,
    mixed_scores,
    pool_scores,
    random_keep,
    snapkv_scores,
    streaming_keep,
    topk_per_head,
    whole_cache_budget,
)

FAMILIES = ("llama", "gemma3")
PROMPT, SINKS, WINDOW = 40, 2, 4


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {}
    for family in FAMILIES:
        path = make_tiny_model_dir(tmp_path_factory.mktemp(family), family)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()
        model.config._attn_implementation = "eager"  # per-head 4-D masks in the masked check
        out[family] = model
    return out


def prompt_ids(model, length=PROMPT, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(6, model.config.vocab_size, (1, length), generator=generator)


def masked_forward(model, ids, prompt_length, kept):
    """Logits [S, vocab] of the whole sequence through HF's own decoder layers, where every
    query after the prompt sees, of the prompt, only the kept tokens of its layer and KV
    head (``kept``: {layer: [Hkv, n]}); causal and sliding windows as HF applies them."""
    base = model.model
    config = model.config
    length = ids.shape[1]
    positions = torch.arange(length)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    types = list(getattr(config, "layer_types", None) or ["full_attention"] * len(base.layers))
    hidden = base.embed_tokens(ids)
    for index, layer in enumerate(base.layers):
        allowed = (positions[None, :] <= positions[:, None]).expand(heads, -1, -1).clone()
        if types[index] == "sliding_attention":
            allowed &= positions[None, :] > positions[:, None] - config.sliding_window
        if index in kept:
            visible = torch.zeros(kv_heads, prompt_length, dtype=torch.bool)
            visible.scatter_(1, kept[index], True)
            visible = visible.repeat_interleave(heads // kv_heads, dim=0)  # [H, T]
            allowed[:, prompt_length:, :prompt_length] &= visible[:, None, :]
        # HF's eager softmax runs in fp32: a float64-min mask would overflow there.
        mask = torch.where(allowed, 0.0, -1e30).to(torch.float64)[None]
        if "layer_type" in inspect.signature(base.rotary_emb.forward).parameters:
            rope = base.rotary_emb(hidden, positions[None], types[index])
        else:
            rope = base.rotary_emb(hidden, positions[None])
        out = layer(hidden, attention_mask=mask, position_ids=positions[None], position_embeddings=rope)
        hidden = out[0] if isinstance(out, tuple) else out
    logits = model.lm_head(base.norm(hidden))[0]
    softcap = getattr(config, "final_logit_softcapping", None)
    return torch.tanh(logits / softcap) * softcap if softcap is not None else logits


@pytest.mark.parametrize("family", FAMILIES)
def test_full_budget_equals_hf_greedy(models, family):
    model = models[family]
    ids = prompt_ids(model)
    with torch.no_grad():
        expected = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
            output_logits=True, return_dict_in_generate=True,
        )
    reference = EvictionReference(model)
    prefill = reference.prefill(ids, window=WINDOW)
    state = reference.evict(prefill, "laprox", 1.0, sinks=SINKS)
    tokens = reference.greedy(state, prefill.last_logits, 6)
    assert tokens == expected.sequences[0, PROMPT:].tolist()
    logits = [prefill.last_logits]
    state = reference.evict(prefill, "full")
    for token in tokens[:-1]:
        logits.append(reference.extend(state, torch.tensor([[token]]))[-1])
    # HF returns fp32 logits (and its eager softmax runs in fp32): compare at fp32 precision.
    torch.testing.assert_close(torch.stack(logits).float(), torch.cat(expected.logits), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["streaming", "snapkv", "random", "laprox"])
def test_eviction_equals_masked_full_attention(models, family, method):
    model = models[family]
    reference = EvictionReference(model)
    ids = prompt_ids(model)
    follow = prompt_ids(model, length=5, seed=2)
    prefill = reference.prefill(ids, window=WINDOW)
    state = reference.evict(prefill, method, 0.4, sinks=SINKS)
    kept = dict(zip(reference.evictable, reference.select(prefill, method, 0.4, sinks=SINKS)))
    assert all(k.shape[1] < PROMPT for k in kept.values())  # something was evicted
    got = torch.cat([prefill.last_logits[None], reference.extend(state, follow[:, :-1])])
    with torch.no_grad():
        expected = masked_forward(model, torch.cat([ids, follow], 1), PROMPT, kept)[PROMPT - 1 : -1]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # One token at a time over a fresh compaction gives the same logits as the chunk.
    state = reference.evict(prefill, method, 0.4, sinks=SINKS)
    steps = [reference.extend(state, follow[:, i : i + 1])[-1] for i in range(4)]
    torch.testing.assert_close(torch.stack(steps), got[1:], rtol=1e-8, atol=1e-8)


def test_true_positions_after_compaction(models):
    """Renumbering the compacted cache (positions 0..n-1) changes the logits: the reference
    must not do it, and the masked check above pins the true-position result."""
    model = models["llama"]
    reference = EvictionReference(model)
    ids = prompt_ids(model)
    follow = prompt_ids(model, length=3, seed=3)
    prefill = reference.prefill(ids, window=WINDOW)
    state = reference.evict(prefill, "streaming", 0.3, sinks=SINKS)
    true = reference.extend(state, follow)
    renumbered = reference.evict(prefill, "streaming", 0.3, sinks=SINKS)
    kept = renumbered.cache[0].positions.shape[1]
    renumbered.next_position = kept
    for layer in renumbered.cache:
        layer.positions = torch.arange(kept).expand_as(layer.positions).clone()
    assert not torch.allclose(true, reference.extend(renumbered, follow), atol=1e-4)
    assert state.next_position == PROMPT + 3


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("budget", [0.1, 0.25, 0.5, 12])
def test_kept_counts_sinks_and_window(models, family, budget):
    model = models[family]
    reference = EvictionReference(model)
    prefill = reference.prefill(prompt_ids(model), window=WINDOW)
    layers = len(reference.evictable)
    total = whole_cache_budget(budget, PROMPT, layers)
    forced = forced_mask(PROMPT, SINKS, WINDOW).nonzero().flatten()
    for method in METHODS[1:]:
        for score in LAPROX_SCORES if method == "laprox" else (None,):
            options = {"score": score} if score else {}
            kept = reference.select(prefill, method, budget, sinks=SINKS, **options)
            counts = [k.shape[1] for k in kept]
            floor = SINKS + WINDOW
            if method == "laprox":
                assert sum(counts) == max(total, floor * layers)
            else:
                assert counts == [max(total // layers, floor)] * layers
            for k in kept:
                for head in k:
                    assert set(forced.tolist()) <= set(head.tolist())
                    assert head.unique().numel() == head.numel()
    # Sliding-window layers (Gemma) are not evicted: they keep their window.
    state = reference.evict(prefill, "laprox", budget, sinks=SINKS)
    for index, window in enumerate(reference.windows):
        if window is not None:
            assert state.cache[index].positions[0].tolist() == list(range(PROMPT - window, PROMPT))
    if family == "gemma3":
        assert len(reference.evictable) < len(reference.layers)


def test_streaming_random_patterns():
    assert streaming_keep(20, 8, 2).tolist() == [0, 1, 14, 15, 16, 17, 18, 19]
    forced = forced_mask(20, 2, 3)
    first = random_keep(20, 9, forced, torch.Generator().manual_seed(5))
    again = random_keep(20, 9, forced, torch.Generator().manual_seed(5))
    other = random_keep(20, 9, forced, torch.Generator().manual_seed(6))
    assert first.tolist() == again.tolist() and first.tolist() != other.tolist()
    assert first.numel() == 9 and {0, 1, 17, 18, 19} <= set(first.tolist())


def test_snapkv_per_kv_head_selection():
    heads, window, length = 4, 2, 30  # 2 KV heads, 2 query heads each
    probs = torch.full((heads, window, length), 1.0 / length)
    probs[0:2, :, 10] += 1.0  # KV head 0's queries attend token 10
    probs[2:4, :, 20] += 1.0  # KV head 1's queries attend token 20
    probs[0, :, 5] += 0.5  # one query head of KV head 0 alone: still averaged in
    scores = snapkv_scores(probs, kv_heads=2, pool=1)
    keep = topk_per_head(scores, 4 + 2, forced_mask(length, 2, 2))
    assert keep[0].tolist() == [0, 1, 5, 10, 28, 29]
    assert 20 in keep[1].tolist() and 10 not in keep[1].tolist()
    # Pooling spreads a peak to its neighbours (SnapKV's clustering).
    pooled = snapkv_scores(probs, kv_heads=2, pool=3)
    assert pooled[1, 19] > pooled[1, 15] and pooled[1, 21] > pooled[1, 25]


def test_mixed_scores_share_the_budget_with_attention_mass():
    generator = torch.Generator().manual_seed(5)
    probs = torch.rand(4, 3, 20, generator=generator)
    scores = torch.rand(20, generator=generator)
    scores = scores / scores.sum()
    mass = probs.mean((0, 1))
    assert torch.equal(mixed_scores(scores, probs, 0.0), scores)
    torch.testing.assert_close(mixed_scores(scores, probs, 1.0), mass / mass.sum())
    half = mixed_scores(scores, probs, 0.5)
    torch.testing.assert_close(half, 0.5 * scores + 0.5 * mass / mass.sum())
    # A sink-like token: most of the attention, no contribution. Mixing keeps it in the ranking.
    probs[:, :, 7] = 5.0
    scores[7] = 0.0
    assert mixed_scores(scores, probs, 0.3).argmax() == 7


@pytest.mark.parametrize("pool, shift", [(11, 0), (11, 4), (5, 2), (1, 3), (3, 9)])
def test_pooling_averages_the_shifted_kernel(pool: int, shift: int):
    scores = torch.rand(2, 3, 30, generator=torch.Generator().manual_seed(pool + shift))
    pooled = pool_scores(scores, pool, shift)
    for t in range(30):  # token t averages [t - pool//2 - shift, t + pool//2 - shift], clipped to the prompt
        low, high = max(t - pool // 2 - shift, 0), min(t + pool // 2 - shift + 1, 30)
        expected = scores[..., low:high].mean(-1) if high > low else torch.zeros(2, 3)
        torch.testing.assert_close(pooled[..., t], expected)
    if shift:  # a peak spreads further forward than back
        peak = torch.zeros(30)
        peak[10] = 1.0
        spread = pool_scores(peak, pool, shift).nonzero().flatten()
        assert spread.max() - 10 > 10 - spread.min()


@pytest.mark.parametrize("hidden, width", [(48, 48), (40, 64), (64, 40), (7, 5)])
def test_output_projection_norms_equal_the_product_norms(hidden: int, width: int):
    # The triangular factor gives ||x W_O^T|| whichever of hidden and H * d is larger.
    generator = torch.Generator().manual_seed(hidden)
    weight = torch.randn(hidden, width, generator=generator)
    x = torch.randn(33, width, generator=generator)
    exact = (x @ weight.T).norm(dim=-1)
    torch.testing.assert_close(OutputProjection(weight, torch.float32).norms(x), exact, rtol=1e-5, atol=1e-5)
    # bfloat16 inputs and products, float32 sums: each norm within three bf16 roundings (2^-8 each).
    fast = OutputProjection(weight, torch.bfloat16).norms(x)
    assert fast.dtype == torch.float32
    torch.testing.assert_close(fast, exact, rtol=1.2e-2, atol=1e-4)
    # Whatever this CPU picks by default stays within that bound.
    torch.testing.assert_close(OutputProjection(weight).norms(x), exact, rtol=1.2e-2, atol=1e-4)


def test_delta_score_is_the_first_order_change_of_removing_a_token():
    """delta-total: || mean_i sum_h A_h[i,t] (v_t - o_h,i) W_O[h] ||, normalised; for a token
    with little attention mass it approaches the exact change of the window's output when
    the token leaves the softmax (the rest renormalised)."""
    generator = torch.Generator().manual_seed(3)
    heads, kv_heads, dim, hidden, length, window = 4, 2, 3, 5, 40, 3
    probs = (0.3 * torch.randn(heads, window, length, generator=generator, dtype=torch.float64)).softmax(-1)
    values = torch.randn(kv_heads, length, dim, generator=generator, dtype=torch.float64)
    o_weight = torch.randn(hidden, heads * dim, generator=generator, dtype=torch.float64)
    per_head = values.repeat_interleave(heads // kv_heads, dim=0)  # [H, T, d]: query head h reads KV head h // G
    out = probs @ per_head  # [H, w, d]
    first_order, exact = torch.zeros(length, dtype=torch.float64), torch.zeros(length, dtype=torch.float64)
    for t in range(length):
        a = probs[:, :, t, None]  # [H, w, 1]
        change = a * (per_head[:, None, t] - out)  # [H, w, d]
        first_order[t] = (change.mean(1).reshape(-1) @ o_weight.T).norm()
        kept = probs.clone()
        kept[:, :, t] = 0
        renormalised = (kept / kept.sum(-1, keepdim=True)) @ per_head
        exact[t] = ((out - renormalised).mean(1).reshape(-1) @ o_weight.T).norm()
    window_out = out.transpose(0, 1).reshape(window, -1) @ o_weight.T
    score = laprox_scores(probs, values, OutputProjection(o_weight), window_out, "delta-total")
    torch.testing.assert_close(score, first_order / first_order.sum())
    torch.testing.assert_close(score, exact / exact.sum(), rtol=0.01, atol=0.0)  # A ~ 1/40: 1/(1-A) ~ 1.03


def test_laprox_counts_inter_head_cancellation_and_query_aggregation():
    heads, hidden, dim, length = 2, 3, 2, 6
    # o_proj: head 0 writes its value to the output, head 1 writes its negation.
    o_weight = torch.zeros(hidden, heads * dim, dtype=torch.float64)
    o_weight[:dim, :dim] = torch.eye(dim)
    o_weight[:dim, dim:] = -torch.eye(dim)
    o_proj = OutputProjection(o_weight)
    values = torch.ones(1, length, dim, dtype=torch.float64)  # one KV head shared (GQA)
    values[0, 3] = torch.tensor([2.0, 2.0])
    probs = torch.full((heads, 1, length), 0.1, dtype=torch.float64)
    probs[:, 0, 2] = 0.5  # both heads attend token 2: the heads' contributions cancel
    probs[0, 0, 3] = 0.5  # only head 0 attends token 3: it survives
    out = torch.ones(1, hidden, dtype=torch.float64)
    for score in LAPROX_SCORES:
        if score == "delta-total":  # removing token 2 renormalises the two heads differently: not 0
            continue
        if score == "per-head":  # one KV head here: its entries' scores are the layer's
            s = laprox_head_scores(probs, values, o_weight)[0]
            torch.testing.assert_close(s, laprox_scores(probs, values, o_proj, out, "sum-total"))
        else:
            s = laprox_scores(probs, values, o_proj, out, score)
        assert s[2] < 1e-9 < s[3], score  # attention-only scores would rank token 2 first
    assert snapkv_scores(probs, 1, pool=1)[0, 2] > snapkv_scores(probs, 1, pool=1)[0, 3]
    # Two window queries reading token 4 through opposite heads: each query's contribution
    # is large, their average is zero. "mean" ranks token 4 first, "sum" scores it 0.
    probs = torch.full((heads, 2, length), 0.1, dtype=torch.float64)
    probs[0, 0, 4], probs[1, 1, 4] = 0.6, 0.6
    out = torch.ones(2, hidden, dtype=torch.float64)
    assert laprox_scores(probs, values, o_proj, out, "mean-total").argmax() == 4
    assert laprox_scores(probs, values, o_proj, out, "sum-total")[4] < 1e-9


def test_global_keep_gives_budget_to_the_layer_that_needs_it():
    forced = forced_mask(12, 1, 2)
    flat = torch.full((12,), 0.01)
    peaked = flat.clone()
    peaked[[4, 6, 8]] = torch.tensor([0.9, 0.8, 0.7])
    kept = global_keep([flat, peaked], total=3 * 2 + 3, forced=forced)
    assert kept[0].tolist() == [0, 10, 11]
    assert kept[1].tolist() == [0, 4, 6, 8, 10, 11]
    floored = global_keep([flat, peaked], total=3 * 2 + 3, forced=forced, floor=1)
    assert len(floored[0]) == 4 and {4, 6} <= set(floored[1].tolist())
    assert sum(len(k) for k in floored) == 9


def test_passkey_items_are_deterministic_with_the_needle_at_depth():
    tokenizer = make_tiny_tokenizer()
    text = " ".join(f"Sentence number {i} talks about the weather in town {i % 7}." for i in range(200))
    for depth in longcontext.PASSKEY_DEPTHS:
        item = longcontext.passkey_item(tokenizer, text, 600, depth, seed=3)
        assert item == longcontext.passkey_item(tokenizer, text, 600, depth, seed=3)
        assert len(item.ids) == 600
        needle = tokenizer.decode(item.ids[item.needle_start : item.needle_start + item.needle_length])
        assert needle.strip() == longcontext.NEEDLE.format(key=item.key)
        head = len(tokenizer(longcontext.INSTRUCTION, add_special_tokens=False)["input_ids"])
        filler = 600 - head - item.needle_length - len(longcontext._encode(tokenizer, longcontext.QUESTION))
        assert abs((item.needle_start - head) / filler - depth) < 0.1
        assert tokenizer.decode(item.ids).endswith(longcontext.QUESTION)
    keys = {longcontext.passkey_item(tokenizer, text, 600, 0.5, seed=s).key for s in range(5)}
    assert len(keys) > 1 and all(len(k) == 5 for k in keys)
    assert longcontext.passkey_correct(" 12345. The", "12345")
    assert not longcontext.passkey_correct(" 1234", "12345")
    items = longcontext.continuation_items(tokenizer, text, prefix=300, continuation=20, count=3)
    assert len(items) == 3 and all(len(i.prefix) == 300 and len(i.continuation) == 20 for i in items)


def test_laprox_floor_interpolates_between_model_wide_and_uniform(models):
    model = models["llama"]
    reference = EvictionReference(model)
    prefill = reference.prefill(prompt_ids(model), window=WINDOW)
    layers = len(reference.evictable)
    uniform = [k.shape[1] for k in reference.select(prefill, "laprox", 0.5, sinks=SINKS, floor=1.0)]
    assert uniform == [whole_cache_budget(0.5, PROMPT, layers) // layers] * layers
    wide = [k.shape[1] for k in reference.select(prefill, "laprox", 0.5, sinks=SINKS, floor=0.0)]
    half = [k.shape[1] for k in reference.select(prefill, "laprox", 0.5, sinks=SINKS, floor=0.5)]
    assert sum(wide) == sum(half) == sum(uniform)
    share = uniform[0] - SINKS - WINDOW
    assert min(half) >= SINKS + WINDOW + round(0.5 * share)


def test_per_head_laprox_scores_each_kv_entry_by_its_own_heads():
    """Two KV heads, one query head each: a token only head 1 reads scores in KV head 1 only."""
    hidden, dim, length = 4, 2, 6
    o_weight = torch.eye(hidden, dtype=torch.float64)  # head h writes output dims 2h, 2h+1
    values = torch.ones(2, length, dim, dtype=torch.float64)
    probs = torch.full((2, 1, length), 0.05, dtype=torch.float64)
    probs[1, 0, 3] = 0.75
    scores = laprox_head_scores(probs, values, o_weight)
    assert scores.shape == (2, length)
    assert scores[1].argmax() == 3 and scores[0, 3] == scores[0, 0]
    torch.testing.assert_close(scores.sum(), torch.tensor(1.0, dtype=torch.float64))


def test_report_pairs_laprox_with_each_method_per_prefix():
    from popc.longcontext_report import markdown

    def prefix(laprox: float, snapkv: float) -> dict:
        rows = [{"method": "full", "budget": 1.0, "value": 1.0, "evict_s": 0.0},
                {"method": "laprox", "budget": 0.1, "value": laprox, "evict_s": 0.2},
                {"method": "snapkv", "budget": 0.1, "value": snapkv, "evict_s": 0.1}]  # fmt: skip
        return {"prefix": 2048, "prefill_s": 2.0, "rows": rows}

    result = {"model": "m", "machine": "cpu", "date": "2026-12-07", "sinks": 4, "window": 16, "evictable_layers": 2,
              "layers": 2, "passkey": [], "ppl": [prefix(2.1, 2.0), prefix(2.2, 2.0), prefix(2.3, 2.0)]}  # fmt: skip
    report = markdown(result, "t", "s")
    # Differences 0.1, 0.2, 0.3: mean 0.2, 95 % half-width t(2) 4.303 x 0.1 / sqrt(3).
    assert "| snapkv | +0.200 ± 0.248 |" in report
    assert "| laprox | 10.0 % (3) |" in report and "| prefill s (median) | 2.0 |" in report
