"""An export made with KV eviction (popc.kv_eviction, popc.evicting_steps) against the
PyTorch reference (popc/reference/kv_eviction.py): the same kept tokens and the same
logits while decoding over the compacted cache, batch 1 and a left-padded batch of 3.

Tiny random-weight Llama (every layer evicts) and Gemma-3 (sliding-window layers keep
their window; one full-attention layer evicts) models, float32."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import make_tiny_model_dir, serve_all
from popc import runtime
from popc.errors import PopcError
from popc.export import ExportPlan, export
from popc.kv_eviction import EvictionSettings, parse_budget, parse_method
from popc.pop import PopSettings
from popc.reference.kv_eviction import EvictionReference

FAMILIES = ("llama", "gemma3")
WINDOW, SINKS = 4, 2
LENGTHS = (40, 33, 27)  # the batch of 3, left-padded to 40
FOLLOW = 5  # teacher-forced tokens decoded after the eviction
CASES = [
    ("full", 1.0, {}),
    ("streaming", 0.3, {}),
    ("snapkv", 0.3, {}),
    ("random", 0.3, {}),
    ("laprox", 0.3, {}),
    ("laprox", 0.3, {"floor": 0.0}),  # model-wide: every layer a length of its own
    ("laprox", 12, {"score": "mean-out"}),
]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = {}
    for family in FAMILIES:
        root = tmp_path_factory.mktemp(f"kv-{family}")
        source = make_tiny_model_dir(root, family)
        export(ExportPlan(model=str(source), out=str(root / "export"), kv_window=WINDOW))
        hf = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
        out[family] = (runtime.load(root / "export", use_oplib=False), EvictionReference(hf))
    return out


def prompts(vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(3)
    return [[int(t) for t in rng.integers(6, vocab, n)] for n in LENGTHS]


def reference_run(reference: EvictionReference, ids: list[int], follow: list[int], method, budget, options, skip=0):
    """Kept tokens per evictable layer and the logits [1 + FOLLOW, vocab] of the reference
    (POP-prefill's deepest ``skip`` layers skipped by the prompt but its window)."""
    prefill = reference.prefill(torch.tensor([ids]), window=WINDOW, skip=skip)
    kept = reference.select(prefill, method, budget, sinks=SINKS, **options)
    state = reference.compact(prefill, kept)
    logits = reference.extend(state, torch.tensor([follow]))
    return kept, torch.cat([prefill.last_logits[None], logits]).numpy()


def onnx_run(model, batch: list[list[int]], follow: list[list[int]], settings: EvictionSettings, pop=None):
    longest = max(len(p) for p in batch)
    ids = np.zeros((len(batch), longest), np.int64)
    mask = np.zeros_like(ids)
    for row, prompt in enumerate(batch):
        ids[row, longest - len(prompt) :] = prompt
        mask[row, longest - len(prompt) :] = 1
    stepper = model.bound(pop, capacity=longest + FOLLOW + 1, kv=settings)
    logits = [stepper.prefill(ids, mask)[:, -1]]
    for step in range(FOLLOW):
        logits.append(stepper.decode(np.array([[f[step]] for f in follow], np.int64))[:, -1])
    return stepper, np.stack(logits, axis=1)  # [B, 1 + FOLLOW, vocab]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("method", "budget", "options"), CASES, ids=lambda v: str(v))
def test_export_evicts_as_the_reference(exported, family, method, budget, options):
    model, reference = exported[family]
    vocab = int(model.config["vocab_size"])
    batch = prompts(vocab)
    follow = [[int(t) for t in np.random.default_rng(row).integers(6, vocab, FOLLOW)] for row in range(len(batch))]
    settings = EvictionSettings(method=method, budget=budget, sinks=SINKS, **options)
    for rows in ([0], [0, 1, 2]):  # batch 1, then the left-padded batch of 3
        stepper, logits = onnx_run(model, [batch[r] for r in rows], [follow[r] for r in rows], settings)
        for position, row in enumerate(rows):
            kept, expected = reference_run(reference, batch[row], follow[row], method, budget, options)
            got_kept = stepper.compaction.kept_tokens[position]
            if settings.evicts:
                assert len(got_kept) == len(kept)
                for got, want in zip(got_kept, kept):
                    assert torch.equal(got, want), f"row {row}: kept tokens differ"
            np.testing.assert_allclose(logits[position], expected, atol=2e-4, rtol=1e-3)
        if method == "laprox" and options.get("floor") == 0.0 and family == "llama":
            # The model-wide selection gives the layers different lengths (else it tests little).
            assert len(set(stepper.kv_slots())) > 1


@pytest.mark.parametrize(("family", "skip"), [("llama", 0), ("gemma3", 0), ("gemma3", 3)])
def test_quantized_export_evicts_as_the_quantized_reference(tmp_path, family, skip):
    """--kv-evict --quant int4: the scores read o_proj's dequantized blocks, so kept tokens and
    logits are the reference's over the same fake-quantized weights (MatMulNBits at accuracy
    level 0, float activations), batch 1 and the left-padded batch of 3. With --prefill-skip
    the independent K/V read the same quantized k/v projections (the prefill branch is made
    after the weights are quantized)."""
    from popc.quantize import QuantScheme
    from popc.reference import fake_quantize_model

    scheme = QuantScheme(4, 32, accuracy_level=0)
    source = make_tiny_model_dir(tmp_path, family)
    plan = ExportPlan(model=str(source), out=str(tmp_path / "export"), kv_window=WINDOW, quant=scheme,
                      prefill_skip=skip or None)  # fmt: skip
    export(plan)
    model = runtime.load(tmp_path / "export", use_oplib=False)
    hf = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    reference = EvictionReference(fake_quantize_model(hf, scheme, pop_layout=False))
    vocab = int(model.config["vocab_size"])
    batch = prompts(vocab)
    follow = [[int(t) for t in np.random.default_rng(row).integers(6, vocab, FOLLOW)] for row in range(len(batch))]
    for method in ("snapkv", "laprox"):
        settings = EvictionSettings(method=method, budget=0.3, sinks=SINKS)
        for rows in ([0], [0, 1, 2]):
            stepper, logits = onnx_run(model, [batch[r] for r in rows], [follow[r] for r in rows], settings)
            for position, row in enumerate(rows):
                kept, expected = reference_run(reference, batch[row], follow[row], method, 0.3, {}, skip)
                for got, want in zip(stepper.compaction.kept_tokens[position], kept, strict=True):
                    assert torch.equal(got, want), f"{method} row {row}: kept tokens differ"
                np.testing.assert_allclose(logits[position], expected, atol=2e-4, rtol=1e-3)


def test_eviction_shrinks_the_cache_and_full_equals_the_plain_graph(exported):
    model, _ = exported["llama"]
    prompt = prompts(int(model.config["vocab_size"]))[0]
    evicted = model.bound(capacity=64, kv=EvictionSettings(method="laprox", budget=0.25, sinks=SINKS))
    evicted.prefill(np.array([prompt]), np.ones((1, len(prompt)), np.int64))
    # 25 % of 40 tokens = 10 per layer, and the KV mask holds exactly that.
    assert evicted.kv_slots() == [10] * model.num_layers
    # Budget 1 keeps every slot: the step path of the plain graph gives the same logits.
    plain_logits, _ = model.step(np.array([prompt]), np.ones((1, len(prompt)), np.int64), model.initial_state(1))
    full = model.bound(capacity=64, kv=EvictionSettings(method="laprox", budget=1.0))
    np.testing.assert_allclose(full.prefill(np.array([prompt]), np.ones((1, len(prompt)), np.int64))[0, -1],
                               plain_logits[0, -1], atol=1e-5)  # fmt: skip


@pytest.mark.parametrize("family", FAMILIES)
def test_eviction_composes_with_pop(tmp_path, family):
    """A POP export with KV eviction against the two references together: POP-online's FFNs
    (popc.reference.PopReference, dense with partitions at the prefill, pruned per token
    after it) inside the eviction reference's layers. The same kept tokens in every layer and
    the same logits over the compacted cache."""
    from popc.reference import PopReference

    source = make_tiny_model_dir(tmp_path, family)
    pop = PopSettings(retain=0.25, candidate=0.5, keep=0.25)
    export(ExportPlan(model=str(source), out=str(tmp_path / "pop"), pop=pop, kv_window=WINDOW))
    model = runtime.load(tmp_path / "pop", use_oplib=False)
    vocab = int(model.config["vocab_size"])
    prompt = prompts(vocab)[0]
    follow = [int(t) for t in np.random.default_rng(5).integers(6, vocab, FOLLOW)]
    hf = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    pop_reference = PopReference(hf, pop)
    reference = EvictionReference(hf)  # its layers call the POP-wrapped FFNs
    for method in ("snapkv", "laprox"):
        settings = EvictionSettings(method=method, budget=0.3, sinks=SINKS)
        pop_reference.prefill, pop_reference.token_mask = True, torch.ones(1, len(prompt))
        prefill = reference.prefill(torch.tensor([prompt]), window=WINDOW)
        kept = reference.select(prefill, method, 0.3, sinks=SINKS)
        pop_reference.prefill = False  # after the prompt: each token prunes its own FFNs
        expected = reference.extend(reference.compact(prefill, kept), torch.tensor([follow]))
        expected = torch.cat([prefill.last_logits[None], expected]).numpy()
        stepper, logits = onnx_run(model, [prompt], [follow], settings, pop=pop)
        for got, want in zip(stepper.compaction.kept_tokens[0], kept, strict=True):
            assert torch.equal(got, want), f"{method}: kept tokens differ"
        np.testing.assert_allclose(logits[0], expected, atol=2e-4, rtol=1e-3)
    tokens, _, _ = model.generate_ids([prompt], 6, kv=settings)
    assert len(tokens[0]) == 6


SKIPPED = {"llama": 1, "gemma3": 3}  # deep layers POP-prefill skips (Gemma-3: its full-attention layer approximated)


@pytest.mark.parametrize("family", FAMILIES)
def test_eviction_composes_with_pop_prefill(tmp_path, family):
    """--kv-evict --prefill-skip N (and with POP-online): at the prefill every prompt token but
    the window's skips the deepest N layers (their K/V independent projections); the window
    runs every layer, so each has its queries. Against the eviction reference with the same
    skip: kept tokens and logits, batch 1 and the left-padded batch of 3, every method."""
    from popc.reference import PopReference

    source = make_tiny_model_dir(tmp_path, family)
    skip = SKIPPED[family]
    export(ExportPlan(model=str(source), out=str(tmp_path / "skip"), kv_window=WINDOW, prefill_skip=skip))
    model = runtime.load(tmp_path / "skip", use_oplib=False)
    assert model.kv_eviction["prompt_layers"] == list(range(model.num_layers - skip, model.num_layers))
    hf = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    reference = EvictionReference(hf)
    vocab = int(model.config["vocab_size"])
    batch = prompts(vocab)
    follow = [[int(t) for t in np.random.default_rng(row).integers(6, vocab, FOLLOW)] for row in range(len(batch))]

    for method, budget in (("full", 1.0), ("snapkv", 0.3), ("laprox", 0.3), ("streaming", 0.3)):
        settings = EvictionSettings(method=method, budget=budget, sinks=SINKS)
        for rows in ([0], [0, 1, 2]):
            stepper, logits = onnx_run(model, [batch[r] for r in rows], [follow[r] for r in rows], settings)
            for position, row in enumerate(rows):
                kept, want = reference_run(reference, batch[row], follow[row], method, budget, {}, skip)
                if settings.evicts:
                    for got, ref in zip(stepper.compaction.kept_tokens[position], kept, strict=True):
                        assert torch.equal(got, ref), f"{method} row {row}: kept tokens differ"
                np.testing.assert_allclose(logits[position], want, atol=2e-4, rtol=1e-3)
    if skip > 1:  # (skipping the last layer alone is exact: its input is the cut's hidden)
        # The skip changes the model's prefill (else this tests little): the plain reference differs.
        plain = reference.prefill(torch.tensor([batch[0]]), window=WINDOW).last_logits
        skipped = reference.prefill(torch.tensor([batch[0]]), window=WINDOW, skip=skip).last_logits
        assert not torch.allclose(plain, skipped, atol=1e-3)

    # With POP-online too: the deep FFNs' partitions come from the window's tokens.
    pop = PopSettings(retain=0.25, candidate=0.5, keep=0.25)
    export(ExportPlan(model=str(source), out=str(tmp_path / "pop"), pop=pop, kv_window=WINDOW, prefill_skip=skip))
    model = runtime.load(tmp_path / "pop", use_oplib=False)
    pop_reference = PopReference(hf, pop)
    settings = EvictionSettings(method="laprox", budget=0.3, sinks=SINKS)
    pop_reference.prefill, pop_reference.token_mask = True, torch.ones(1, len(batch[0]))
    prefill = reference.prefill(torch.tensor([batch[0]]), window=WINDOW, skip=skip, pop=pop_reference)
    kept = reference.select(prefill, "laprox", 0.3, sinks=SINKS)
    pop_reference.prefill = False
    want = reference.extend(reference.compact(prefill, kept), torch.tensor([follow[0]]))
    want = torch.cat([prefill.last_logits[None], want]).numpy()
    stepper, logits = onnx_run(model, [batch[0]], [follow[0]], settings, pop=pop)
    for got, ref in zip(stepper.compaction.kept_tokens[0], kept, strict=True):
        assert torch.equal(got, ref), "POP: kept tokens differ"
    np.testing.assert_allclose(logits[0], want, atol=2e-4, rtol=1e-3)


def test_pop_prefill_eviction_export_prefills_only_through_its_stepper(tmp_path):
    """Its prefill cache comes apart from the decode cache: model.step and the server's batch
    gather it; plain BoundSteps refuses to prefill it rather than keep a wrong cache."""
    from popc.serve.batch import RunningBatch
    from popc.steps import BoundSteps

    source = make_tiny_model_dir(tmp_path, "llama")
    export(ExportPlan(model=str(source), out=str(tmp_path / "skip"), kv_window=WINDOW, prefill_skip=1))
    model = runtime.load(tmp_path / "skip", use_oplib=False)
    prompt = np.array([prompts(int(model.config["vocab_size"]))[0]])
    mask = np.ones_like(prompt)
    with pytest.raises(PopcError, match="POP-prefill"):
        BoundSteps(model, capacity=64).prefill(prompt, mask)
    stepper = model.bound(capacity=64)
    first = stepper.prefill(prompt, mask)[0, -1]
    after = stepper.decode(np.array([[7]]))[0, -1]
    logits, state = model.step(prompt, mask, model.initial_state(1), logits_to_keep=1)
    np.testing.assert_allclose(logits[0, -1], first, atol=1e-5)
    assert state[-1].shape[2] == prompt.shape[1]  # the whole prompt's cache, not the window's
    logits, _ = model.step(np.array([[7]]), np.ones((1, prompt.shape[1] + 1), np.int64), state)
    np.testing.assert_allclose(logits[0, -1], after, atol=1e-4)
    served = RunningBatch(model)
    ((served_first, _),) = served.prefill_rows([list(prompt[0])])
    np.testing.assert_allclose(served_first, first, atol=1e-5)


def test_budgets_parse_and_bad_ones_are_refused(exported):
    assert parse_budget("0.05") == 0.05
    assert parse_budget("5%") == 0.05
    assert parse_budget("256") == 256
    assert parse_budget("1") == 1.0
    for bad in ("0", "1.5", "-3", "abc", "0%"):
        with pytest.raises(PopcError, match="--kv-budget"):
            parse_budget(bad)
    with pytest.raises(PopcError, match="--kv-method"):
        EvictionSettings(method="h2o")
    variant = parse_method("laprox:mean-out:floor0.5:pool7:shift3", 0.1)
    assert (variant.score, variant.floor, variant.pool, variant.shift, variant.budget) == ("mean-out", 0.5, 7, 3, 0.1)
    assert parse_method("laprox:mix0").mix == 0.0
    # The runtime's defaults are the reference's (two modules: the runtime's avoids importing torch).
    from popc.reference import kv_selection

    defaults = EvictionSettings()
    assert (defaults.mix, defaults.sinks, defaults.floor, defaults.score) == (
        kv_selection.DEFAULT_LAPROX_MIX, kv_selection.DEFAULT_SINKS, kv_selection.DEFAULT_LAPROX_FLOOR,
        kv_selection.DEFAULT_LAPROX_SCORE,
    )
    for bad in ("snapkv:shift2", "laprox:shiftx", "streaming:pool5", "laprox:wide", "laprox:mix1.5", "snapkv:mix0.2"):
        with pytest.raises(PopcError, match="--kv-method"):
            parse_method(bad)


def test_plain_export_refuses_a_budget(tmp_path, exported):
    source = make_tiny_model_dir(tmp_path, "llama")
    export(ExportPlan(model=str(source), out=str(tmp_path / "plain")))
    model = runtime.load(tmp_path / "plain")
    # Only an eviction export's session stops its workers spinning after a run (host scoring follows).
    spin_stop = "session.force_spinning_stop"
    with pytest.raises(RuntimeError, match=spin_stop):  # not set at all
        model.session.get_session_options().get_session_config_entry(spin_stop)
    evicting, _ = exported["llama"]
    assert evicting.session.get_session_options().get_session_config_entry(spin_stop) == "1"
    with pytest.raises(PopcError, match="--kv-evict"):
        model.bound(kv=EvictionSettings(budget=0.1))


def test_one_prompt_serves_every_setting_and_extend_equals_decode(exported):
    """apply() evicts again from the same prompt run; extend() of several tokens gives the
    logits of as many decode steps."""
    model, _ = exported["gemma3"]
    prompt = prompts(int(model.config["vocab_size"]))[0]
    follow = [7, 8, 9, 10]
    stepper = model.bound(capacity=64)
    stepper.run_prompt(np.array([prompt]), np.ones((1, len(prompt)), np.int64))
    for settings in (EvictionSettings(method="snapkv", budget=0.3, sinks=SINKS), EvictionSettings(method="full")):
        stepper.apply(settings)
        stepwise = [stepper.decode(np.array([[t]]))[0, -1] for t in follow]
        stepper.apply(settings)
        together = stepper.extend(np.array([follow]))[0]
        np.testing.assert_allclose(together, np.stack(stepwise), atol=1e-4)


def test_plain_steps_run_an_eviction_export_with_the_full_cache(exported):
    """BoundSteps (what popc serve's batch builds on) feeds an eviction export's per-layer
    masks itself: the same logits as EvictingSteps at budget 1."""
    from popc.steps import BoundSteps

    model, _ = exported["gemma3"]
    prompt = np.array([prompts(int(model.config["vocab_size"]))[0]])
    mask = np.ones_like(prompt)
    plain, evicting = BoundSteps(model, capacity=64), model.bound(capacity=64)
    np.testing.assert_allclose(plain.prefill(prompt, mask), evicting.prefill(prompt, mask), atol=1e-5)
    for token in (7, 8, 9):
        np.testing.assert_allclose(plain.decode(np.array([[token]])), evicting.decode(np.array([[token]])), atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_serving_batch_evicts_each_sequence_as_it_runs_alone(exported, family):
    """popc serve's running batch with a budget: rows evicted at their own prefill, joining
    and leaving a batch whose layers differ in length, see the logits they get alone."""
    from popc.serve.batch import RunningBatch

    model, _ = exported[family]
    settings = EvictionSettings(method="laprox", budget=0.3, sinks=SINKS, floor=0.0)  # layers of their own lengths
    rng = np.random.default_rng(5)
    batch_prompts = [[int(t) for t in rng.integers(6, 200, n)] for n in (30, 45, 20)]
    steps = {0: 4, 1: 8, 2: 6}
    joins = {0: [0], 2: [1, 2]}
    references = []
    for prompt, count in zip(batch_prompts, steps.values()):
        stepper = model.bound(capacity=len(prompt) + count + 1, kv=settings)
        logits = [stepper.prefill(np.array([prompt]), np.ones((1, len(prompt)), np.int64))[0, -1]]
        tokens = []
        for _ in range(count):
            tokens.append(int(logits[-1].argmax()))
            logits.append(stepper.decode(np.array([[tokens[-1]]]))[0, -1])
        references.append((tokens, logits))
    batch = RunningBatch(model, max_rows=3, headroom=3, kv=settings)
    running, worst = [], 0.0
    for turn in range(20):
        together = joins.get(turn, [])
        for sequence, (logits, row) in zip(together, batch.prefill_rows([batch_prompts[s] for s in together]) if together else []):
            batch.join(row)
            running.append([sequence, 0])
            worst = max(worst, float(np.abs(logits - references[sequence][1][0]).max()))
        order = batch.leave([i for i, (sequence, done) in enumerate(running) if done >= steps[sequence]])
        running = [running[old] for old in order]
        if not running:
            if turn > max(joins):
                break
            continue
        logits = batch.decode(np.array([[references[s][0][d]] for s, d in running]))
        for row, entry in enumerate(running):
            entry[1] += 1
            worst = max(worst, float(np.abs(logits[row, -1] - references[entry[0]][1][entry[1]]).max()))
    assert not running
    assert worst < 1e-4


def test_engine_with_a_budget_serves_what_generate_gives(exported):
    """popc serve's engine with --kv-budget: concurrent requests (some prefilled together,
    left-padded) get the tokens generate() gives each one with the same eviction."""
    from popc.serve.engine import Engine
    from popc.serve.sequence import Request

    model, _ = exported["llama"]
    settings = EvictionSettings(method="snapkv", budget=0.3, sinks=SINKS)
    rng = np.random.default_rng(8)
    batch_prompts = [[int(t) for t in rng.integers(6, 200, n)] for n in (33, 40, 28, 36)]
    expected = [model.generate(p, max_new_tokens=8, kv=settings).generated_ids for p in batch_prompts]
    engine = Engine(model, max_batch=2, max_queue=8, kv=settings)
    results = serve_all(engine, [Request(prompt, max_tokens=8) for prompt in batch_prompts])
    for result, tokens in zip(results, expected):
        assert result["error"] is None
        assert "".join(result["text"]) == model.decode(tokens)


def test_engine_serves_each_request_its_own_budget(exported):
    """Requests with different eviction settings admitted together (grouped by setting for
    their prefill, then one running batch): each samples what generate() samples with its
    setting (seeded sampling: the tiny model's greedy tokens ignore its cache)."""
    from popc.runtime import SamplingOptions
    from popc.serve.engine import Engine
    from popc.serve.sequence import Request

    model, _ = exported["llama"]
    rng = np.random.default_rng(8)
    prompts_ = [[int(t) for t in rng.integers(6, 200, n)] for n in (40, 36, 40, 33)]
    settings = [None, EvictionSettings("snapkv", 0.3, sinks=SINKS), EvictionSettings("snapkv", 0.3, sinks=SINKS),
                EvictionSettings("laprox", 12, sinks=SINKS, floor=0.0)]  # fmt: skip
    expected = [
        model.generate(p, max_new_tokens=8, kv=kv, temperature=1.0, seed=5).text for p, kv in zip(prompts_, settings)
    ]
    assert expected[0] != model.generate(prompts_[0], max_new_tokens=8, kv=settings[1], temperature=1.0, seed=5).text
    engine = Engine(model, max_batch=4, max_queue=8)
    requests = [Request(p, 8, SamplingOptions(1.0, 1.0, 5), kv=kv) for p, kv in zip(prompts_, settings)]
    for result, text in zip(serve_all(engine, requests), expected):
        assert result["error"] is None
        assert "".join(result["text"]) == text


def test_eval_long_context_scores_every_setting_as_the_reference(tmp_path):
    """`popc eval --long-context` end to end on a tiny export: one row per method x budget on
    every prompt, and each continuation's perplexity equal to the reference's after the same
    eviction (the full cache and LaProx)."""
    import json

    from typer.testing import CliRunner

    from popc import longcontext
    from popc.cli import app

    source = make_tiny_model_dir(tmp_path, "llama")
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps(config | {"max_position_embeddings": 512}))  # room for a passkey
    export(ExportPlan(model=str(source), out=str(tmp_path / "export"), kv_window=WINDOW))
    text = tmp_path / "held.txt"
    text.write_text(" ".join(f"The river {word} ran past the old mill." for word in ("north", "east", "west") * 6))
    out = tmp_path / "long.json"
    args = ["eval", str(tmp_path / "export"), "--long-context", "--text", str(text), "--lengths", "300",
            "--depths", "0.5", "--ppl-prefixes", "60", "--continuation", "8", "--ppl-count", "2",
            "--kv-budgets", "0.5", "--kv-methods", "snapkv,laprox", "--json", str(out)]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert len(report["passkey"]) == 1 and len(report["ppl"]) == 2
    for prompt in report["passkey"] + report["ppl"]:
        assert sorted((row["method"], row["budget"]) for row in prompt["rows"]) == [
            ("full", 1.0), ("laprox", 0.5), ("snapkv", 0.5)
        ]  # fmt: skip

    hf = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    reference = EvictionReference(hf)
    tokenizer = runtime.load(tmp_path / "export", use_oplib=False).tokenizer
    items = longcontext.continuation_items(tokenizer, text.read_text(), 60, 8, 2)
    sinks = report["sinks"]
    for item, prompt in zip(items, report["ppl"]):
        assert prompt["offset"] == item.offset
        prefill = reference.prefill(torch.tensor([item.prefix]), window=WINDOW)
        follow = torch.tensor([item.continuation])
        for row in prompt["rows"]:
            if row["method"] == "snapkv":
                continue
            kept = reference.select(prefill, row["method"], row["budget"], sinks=sinks)
            nll = reference.continuation_nll(reference.compact(prefill, kept), prefill.last_logits, follow)
            assert row["value"] == pytest.approx(nll, abs=1e-4), row
        values = {row["method"]: row["value"] for row in prompt["rows"]}
        assert values["laprox"] != pytest.approx(values["full"], abs=1e-3)  # the eviction changed the cache
