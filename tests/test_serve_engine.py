"""The serving engine: a running batch that sequences join and leave must give every
sequence the logits it gets alone, and the engine's requests the tokens ``generate``
gives."""

from __future__ import annotations

import numpy as np
import pytest

import popc
from conftest import collect, make_tiny_model_dir, serve_all
from popc.defaults import settings_for_sparsity
from popc.errors import PopcError
from popc.export import ExportPlan, export
from popc.runtime import SamplingOptions
from popc.serve.batch import RunningBatch
from popc.serve.engine import BadRequest, Engine, QueueFull, prefill_groups
from popc.serve.sequence import Handle, Request, TextStream

# (family, fused graph, POP): fused caches are re-rotated when a row moves; Gemma-3 adds
# sliding-window layers with their own rotary tables; the unfused graph counts positions.
VARIANTS = [("llama", True, False), ("llama", True, True), ("llama", False, True), ("gemma3", True, True)]


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[tuple[str, bool, bool], popc.PopcModel]:
    root = tmp_path_factory.mktemp("serve-engine")
    models = {}
    for family, fused, pop in VARIANTS:
        source = make_tiny_model_dir(root, family)
        out = root / f"{family}-{fused}-{pop}"
        export(ExportPlan(model=str(source), out=out, fuse=fused, pop=settings_for_sparsity(0.5) if pop else None))
        models[family, fused, pop] = popc.load(out)
    return models


def alone(model, prompt: list[int], steps: int) -> tuple[list[int], list[np.ndarray]]:
    """Greedy tokens and each step's logits for ``prompt`` run by itself."""
    stepper = model.bound(capacity=len(prompt) + steps + 1)
    logits = stepper.prefill(np.array([prompt]), np.ones((1, len(prompt)), np.int64))[0, -1]
    tokens, every = [], [logits]
    for _ in range(steps):
        tokens.append(int(logits.argmax()))
        logits = stepper.decode(np.array([[tokens[-1]]]))[0, -1]
        every.append(logits)
    return tokens, every


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: f"{v[0]}-{'fused' if v[1] else 'plain'}-{'pop' if v[2] else 'dense'}")
def test_rows_joining_and_leaving_see_the_logits_they_get_alone(exports, variant):
    model = exports[variant]
    rng = np.random.default_rng(1)
    lengths = (7, 19, 4, 11)  # the second joins longer than the batch: the first row moves right
    prompts = [[int(t) for t in rng.integers(6, 200, n)] for n in lengths]
    steps = {0: 5, 1: 12, 2: 9, 3: 12}  # the first leaves early: the rest are cut left
    joins = {0: [0], 2: [1, 2], 6: [3]}
    references = [alone(model, prompt, steps[i]) for i, prompt in enumerate(prompts)]
    batch = RunningBatch(model, max_rows=4, headroom=3)  # small: the buffers also grow mid-run
    running: list[list[int]] = []  # [sequence, steps done]
    worst = 0.0
    for turn in range(40):
        together = joins.get(turn, [])  # prefilled in one left-padded call, then split
        for sequence, (logits, row) in zip(together, batch.prefill_rows([prompts[s] for s in together]) if together else []):
            batch.join(row)
            running.append([sequence, 0])
            worst = max(worst, float(np.abs(logits - references[sequence][1][0]).max()))
        finished = [i for i, (sequence, done) in enumerate(running) if done >= steps[sequence]]
        order = batch.leave(finished)
        running = [running[old] for old in order]
        if turn % 3 == 2:
            batch.cut()  # every row's leading padding: all rows move left
        longest = max((len(prompts[s]) + d for s, d in running), default=0)
        assert longest <= batch.length < longest + 16
        if not running and turn > max(joins):
            break
        if not running:
            continue
        feed = np.array([[references[s][0][d]] for s, d in running])
        logits = batch.decode(feed)
        for row, entry in enumerate(running):
            entry[1] += 1
            worst = max(worst, float(np.abs(logits[row, -1] - references[entry[0]][1][entry[1]]).max()))
    assert not running
    assert worst < 1e-4


def test_prefill_groups_keep_padding_bounded():
    lengths = [3, 100, 4, 90, 5, 2000, 80]
    handles = [Handle(Request([7] * n, max_tokens=1)) for n in lengths]
    groups = [[len(h.request.prompt_ids) for h in group] for group in prefill_groups(handles)]
    assert groups == [[3, 4, 5], [80, 90, 100], [2000]]
    assert sorted(sum(groups, [])) == sorted(lengths)


@pytest.mark.parametrize("pop", [False, True], ids=["dense", "pop"])
def test_concurrent_requests_get_what_generate_gives(exports, pop):
    model = exports["llama", True, pop]
    rng = np.random.default_rng(2)
    prompts = [[int(t) for t in rng.integers(6, 200, n)] for n in (5, 30, 12, 3, 21)]
    expected = [model.generate(p, max_new_tokens=10).generated_ids for p in prompts]
    engine = Engine(model, max_batch=3, max_queue=8)  # five requests, three rows
    # Queued before the engine starts: the first three are prefilled at once, 5 and 12
    # tokens together (left-padded), 30 alone; the last two join as rows free up.
    results = serve_all(engine, [Request(prompt, max_tokens=10) for prompt in prompts])
    for result, prompt, tokens in zip(results, prompts, expected):
        assert result["reason"] in ("stop", "length") and result["error"] is None
        assert result["usage"].prompt_tokens == len(prompt)
        assert result["usage"].completion_tokens == len(tokens)
        assert "".join(result["text"]) == model.decode(tokens)
    stats = engine.stats()
    assert (stats.finished, stats.failed, stats.running, stats.waiting) == (5, 0, 0, 0)


def test_sequences_that_fill_the_context_share_a_batch_with_short_ones(exports):
    model = exports["llama", True, True]
    context = model.max_positions
    rng = np.random.default_rng(3)
    long_prompt = [int(t) for t in rng.integers(6, 200, context - 12)]
    short_prompt = [int(t) for t in rng.integers(6, 200, 3)]
    requests = [(long_prompt, 12), (short_prompt, 30), (short_prompt[:2], 9)]  # the first ends at the context
    expected = [model.generate(p, max_new_tokens=n).generated_ids for p, n in requests]
    results = serve_all(Engine(model, max_batch=3), [Request(p, max_tokens=n) for p, n in requests])
    for result, tokens in zip(results, expected):
        assert result["error"] is None and "".join(result["text"]) == model.decode(tokens)


def test_bad_requests_and_a_full_queue_are_refused_at_once(exports):
    model = exports["llama", True, False]
    engine = Engine(model, max_batch=1, max_queue=1)  # not started: nothing leaves the queue
    with pytest.raises(BadRequest, match="context"):
        engine.submit(Request([7] * model.max_positions, max_tokens=1))
    with pytest.raises(BadRequest, match="max_tokens must be between 1 and"):
        engine.submit(Request([7, 8], max_tokens=model.max_positions))
    with pytest.raises(BadRequest, match="max_tokens"):
        engine.submit(Request([7, 8], max_tokens=0))
    with pytest.raises(BadRequest, match="empty"):
        engine.submit(Request([], max_tokens=3))
    engine.submit(Request([7, 8], max_tokens=3))  # the free slot
    engine.submit(Request([7, 8], max_tokens=3))  # the one queue place
    with pytest.raises(QueueFull):
        engine.submit(Request([7, 8], max_tokens=3))
    with pytest.raises(PopcError, match="--max-batch"):
        Engine(model, max_batch=0)


def test_a_cancelled_request_frees_its_slot_and_others_go_on(exports):
    model = exports["llama", True, True]
    engine = Engine(model, max_batch=2)  # both submitted before it starts: no race with its thread
    queued_done, queued = collect(engine, Request([9, 10], max_tokens=5))
    queued["handle"].cancel()  # cancelled while waiting: never prefilled
    running_done, running = collect(engine, Request([9, 10, 11], max_tokens=100))
    forward = running["handle"].request.on_event

    def cancel_at_first_text(event) -> None:  # a client leaving mid-stream
        forward(event)
        if event.text:
            running["handle"].cancel()

    running["handle"].request.on_event = cancel_at_first_text
    engine.start()
    try:
        assert queued_done.wait(10) and queued["reason"] == "cancelled"
        assert running_done.wait(10) and running["reason"] == "cancelled"
        assert running["usage"].completion_tokens < 100
        short = collect(engine, Request([12, 13], max_tokens=4))
        assert short[0].wait(10) and short[1]["reason"] in ("stop", "length")
        assert engine.stats().running == 0
    finally:
        engine.close()


def test_a_failing_step_fails_its_sequences_not_the_engine(exports, monkeypatch):
    model = exports["llama", True, False]
    engine = Engine(model, max_batch=2).start()
    try:
        original = RunningBatch.decode
        broken = {"left": 1}

        def decode_once_broken(self, next_ids, copy=True):
            if broken["left"]:
                broken["left"] -= 1
                raise RuntimeError("injected fault")
            return original(self, next_ids, copy)

        monkeypatch.setattr(RunningBatch, "decode", decode_once_broken)
        done, result = collect(engine, Request([9, 10, 11], max_tokens=5))
        assert done.wait(10) and result["reason"] == "error" and "injected fault" in result["error"]
        done, result = collect(engine, Request([9, 10, 11], max_tokens=5))
        assert done.wait(10) and result["reason"] in ("stop", "length")
    finally:
        engine.close()


def test_sampled_requests_are_reproducible_by_seed(exports):
    model = exports["llama", True, True]
    engine = Engine(model, max_batch=4).start()
    try:
        runs = [collect(engine, Request([20, 21, 22], 12, SamplingOptions(1.0, 0.9, seed=5))) for _ in range(3)]
        for done, _ in runs:
            assert done.wait(20)
    finally:
        engine.close()
    texts = {"".join(result["text"]) for _, result in runs}
    assert len(texts) == 1


def test_text_stream_stops_at_a_stop_string_split_across_tokens(exports):
    model = exports["llama", True, False]
    ids = model.encode("hello world, this is the end of it")
    full = model.decode(ids)
    stop = full[len(full) // 2 : len(full) // 2 + 5]
    stream = TextStream(model.decode, [stop])
    out = ""
    for token in ids:
        out += stream.push(token)
        if stream.stopped:
            break
    assert stream.stopped
    assert out == full[: full.index(stop)]
    plain = TextStream(model.decode, ["not in the text"])
    assert "".join(plain.push(t) for t in ids) + plain.flush() == full
