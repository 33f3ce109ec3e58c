"""``popc serve``'s HTTP layer: a real uvicorn server on a loopback port over tiny exports,
driven by the official ``openai`` client and by raw HTTP for what a client must not send.

Every client call has a timeout; every server runs in a background thread and is stopped
by ``should_exit``.
"""

from __future__ import annotations

import concurrent.futures
import json
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

import uvicorn  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

import popc  # noqa: E402
from conftest import assert_clean_failure, make_tiny_model_dir  # noqa: E402
from popc.serve.app import build_app  # noqa: E402
from popc.serve.engine import Engine  # noqa: E402

TIMEOUT = 30.0
PROMPTS = ["Once upon a time", "hi", "The quick brown fox jumps over the lazy dog and", "abc def"]


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    from popc.defaults import settings_for_sparsity
    from popc.export import ExportPlan, export

    root = tmp_path_factory.mktemp("serve")
    source = make_tiny_model_dir(root, "llama")
    export(ExportPlan(model=str(source), out=root / "dense"))
    export(ExportPlan(model=str(source), out=root / "pop", pop=settings_for_sparsity(0.5)))
    export(ExportPlan(model=str(source), out=root / "kv", kv_window=4))
    return {"dense": root / "dense", "pop": root / "pop", "kv": root / "kv"}


@pytest.fixture(scope="module")
def models(exports) -> dict[str, popc.PopcModel]:
    return {name: popc.load(path, threads=1) for name, path in exports.items()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """An app over its own engine, served by uvicorn on a free loopback port."""

    def __init__(
        self, model, max_batch: int = 8, max_queue: int = 64, api_key: str | None = None, step_delay: float = 0.0
    ):
        self.engine = Engine(model, max_batch=max_batch, max_queue=max_queue).start()
        self.batch_sizes = slow_down(self.engine, step_delay)
        self.app = build_app(self.engine, "tiny", api_key=api_key)
        self.port = free_port()
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self, api_key: str = "x") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, timeout=TIMEOUT, max_retries=0)

    def post(self, path: str, body, **kwargs) -> httpx.Response:
        content = body if isinstance(body, (bytes, str)) else json.dumps(body)
        headers = {"Content-Type": "application/json", **kwargs.pop("headers", {})}
        return httpx.post(self.url + path, content=content, headers=headers, timeout=kwargs.pop("timeout", TIMEOUT))

    def wait_idle(self, seconds: float = 5.0) -> None:
        deadline = time.monotonic() + seconds
        while (stats := self.engine.stats()).running or stats.waiting:
            assert time.monotonic() < deadline, f"the engine is still busy: {stats}"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.engine.close()


def slow_down(engine: Engine, seconds: float) -> list[int]:
    """Make each decode step take ``seconds`` more (the tiny models decode 100 tokens in ~15 ms,
    faster than a disconnect or a burst of requests is noticed); returns each step's batch size."""
    decode = engine.batch.decode
    sizes: list[int] = []

    def slowed(next_ids, *args, **kwargs):
        sizes.append(len(next_ids))
        time.sleep(seconds)
        return decode(next_ids, *args, **kwargs)

    engine.batch.decode = slowed
    return sizes


@contextmanager
def serving(model, **options):
    server = Server(model, **options)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def dense(models):
    with serving(models["dense"]) as server:
        yield server


def greedy(model, prompt_ids: list[int], tokens: int):
    return model.generate(prompt_ids, max_new_tokens=tokens)


# ---- the openai client ----------------------------------------------------------------------
def test_completion_equals_generate_with_usage(dense, models):
    model = models["dense"]
    expected = greedy(model, model.encode(PROMPTS[0]), 12)
    reply = dense.client().completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=12, temperature=0)
    assert reply.object == "text_completion" and reply.model == "tiny"
    assert reply.choices[0].text == expected.text
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens == len(expected.prompt_ids)
    assert reply.usage.completion_tokens == len(expected.generated_ids)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_each_request_sets_its_own_kv_budget(models):
    """On an eviction export, ``kv_budget`` / ``kv_method`` in a request evict its cache as
    generate() does with those settings; a request without them keeps the whole cache."""
    from popc.kv_eviction import EvictionSettings

    model = models["kv"]
    prompt = [int(t) for t in np.random.default_rng(8).integers(6, 200, 40)]
    settings = {"full": None, "snapkv": EvictionSettings("snapkv", 0.3), "laprox": EvictionSettings("laprox", 12)}
    # Seeded sampling: the tiny random model's greedy text does not depend on its cache.
    expected = {
        name: model.generate(prompt, max_new_tokens=10, kv=kv, temperature=1.0, seed=5).text
        for name, kv in settings.items()
    }
    assert expected["snapkv"] != expected["full"]  # evicting changed what it samples
    bodies = {"full": {}, "snapkv": {"kv_budget": "0.3", "kv_method": "snapkv"}, "laprox": {"kv_budget": 12}}
    with serving(model) as server:
        for name, extra in bodies.items():
            body = {"model": "tiny", "prompt": prompt, "max_tokens": 10, "temperature": 1.0, "seed": 5} | extra
            reply = server.post("/v1/completions", body)
            assert reply.status_code == 200, reply.text
            assert reply.json()["choices"][0]["text"] == expected[name], name


def test_completion_streams_the_same_text(dense, models):
    model = models["dense"]
    expected = greedy(model, model.encode(PROMPTS[2]), 10)
    chunks = list(
        dense.client().completions.create(
            model="tiny", prompt=PROMPTS[2], max_tokens=10, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "text_completion" for c in chunks)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(expected.generated_ids)


def test_stop_string_ends_the_text_before_it(dense, models):
    model = models["dense"]
    text = greedy(model, model.encode(PROMPTS[0]), 12).text
    stop = text[3:5]
    reply = dense.client().completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=12, temperature=0, stop=stop)
    assert reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].text == text[: text.find(stop)] and stop not in reply.choices[0].text


def test_prompt_as_token_ids(dense, models):
    ids = models["dense"].encode(PROMPTS[1])
    expected = greedy(models["dense"], ids, 6)
    reply = dense.client().completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=0)
    assert reply.choices[0].text == expected.text and reply.usage.prompt_tokens == len(ids)


def test_chat_and_chat_streaming(dense, models):
    model = models["dense"]
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    ids = model.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    expected = greedy(model, ids, 8)
    client = dense.client()
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.role == "assistant" and reply.choices[0].message.content == expected.text
    assert reply.usage.prompt_tokens == len(ids) and reply.usage.completion_tokens == len(expected.generated_ids)

    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=messages, max_completion_tokens=8, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    with_choices = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in with_choices) == expected.text
    assert with_choices[-1].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].usage.prompt_tokens == len(ids)


def test_chat_without_max_tokens_and_sampling(dense):
    reply = dense.client().chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "x"}], temperature=0.8, top_p=0.9, seed=3
    )
    assert reply.usage.completion_tokens >= 1
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_models_and_health(dense):
    assert [m.id for m in dense.client().models.list()] == ["tiny"]
    health = httpx.get(dense.url + "/health", timeout=TIMEOUT)
    assert health.status_code == 200 and health.json()["status"] == "ok"


# ---- continuous batching --------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["dense", "pop"])
def test_concurrent_greedy_requests_equal_generate(kind, models):
    model = models[kind]
    lengths = [20, 30, 12, 25]
    expected = [greedy(model, model.encode(p), n) for p, n in zip(PROMPTS, lengths)]
    with serving(model, max_batch=4, step_delay=0.003) as server:
        client = server.client()

        def ask(index: int):
            return client.completions.create(
                model="tiny", prompt=PROMPTS[index], max_tokens=lengths[index], temperature=0
            )

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(ask, range(4), timeout=TIMEOUT))
        assert max(server.batch_sizes) >= 2, "the requests never shared a decode step"
    for reply, want in zip(replies, expected):
        assert reply.choices[0].text == want.text
        assert reply.usage.completion_tokens == len(want.generated_ids)


# ---- bad input ------------------------------------------------------------------------------
def assert_openai_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error


@pytest.mark.parametrize(
    "body, param",
    [
        ({"model": "tiny", "prompt": "hi", "max_tokens": "ten"}, "max_tokens"),
        ({"model": "tiny", "prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ({"model": "tiny", "prompt": "hi", "max_tokens": 10_000}, "max_tokens"),
        ({"model": "tiny", "prompt": "hi", "n": 2}, "n"),
        ({"model": "tiny", "prompt": "hi", "temperature": -1}, "temperature"),
        ({"model": "tiny", "prompt": "hi", "temperature": "hot"}, "temperature"),
        ({"model": "tiny", "prompt": "hi", "top_p": 0}, "top_p"),
        ({"model": "tiny", "prompt": "hi", "stream": "yes"}, "stream"),
        ({"model": "tiny", "prompt": "x" * 300}, "prompt"),
        ({"model": "tiny", "prompt": ""}, "prompt"),
        ({"model": "tiny", "prompt": [1, 99999]}, "prompt"),
        ({"model": "tiny", "prompt": ["a", "b"]}, "prompt"),
        ({"model": "tiny"}, "prompt"),
        ({"model": "tiny", "prompt": "hi", "kv_budget": 0.1}, "kv_budget"),  # a plain export keeps its cache
        ({"model": "tiny", "prompt": "hi", "kv_budget": "lots"}, "kv_budget"),
        ({"model": "tiny", "prompt": "hi", "kv_budget": 0.1, "kv_method": "h2o"}, "kv_budget"),
        ({"model": "tiny", "prompt": "hi", "kv_method": "snapkv"}, "kv_method"),
    ],
)
def test_bad_completion_requests_are_400(dense, body, param):
    assert_openai_error(dense.post("/v1/completions", body), 400, param)


def test_bad_chat_requests_are_400(dense):
    assert_openai_error(dense.post("/v1/chat/completions", {"model": "tiny", "messages": []}), 400, "messages")
    bad_role = {"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}
    assert_openai_error(dense.post("/v1/chat/completions", bad_role), 400, "messages.0.role")
    long = {"model": "tiny", "messages": [{"role": "user", "content": "y" * 300}]}
    assert assert_openai_error(dense.post("/v1/chat/completions", long), 400)["code"] == "context_length_exceeded"


def test_malformed_json_unknown_route_and_model(dense):
    error = assert_openai_error(dense.post("/v1/completions", b'{"prompt": "hi",'), 400)
    assert error["type"] == "invalid_request_error"
    assert_openai_error(dense.post("/v1/completions", b"[1, 2]"), 400)
    assert_openai_error(dense.post("/v1/nothing", {}), 404)
    assert_openai_error(httpx.get(dense.url + "/v1/completions", timeout=TIMEOUT), 405)
    assert_openai_error(dense.post("/v1/completions", {"model": "other", "prompt": "hi"}), 404, "model")
    # Unknown fields are ignored.
    ok = dense.post("/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 2, "whatever": [1]})
    assert ok.status_code == 200, ok.text


def test_api_key(models):
    with serving(models["dense"], api_key="sekret") as server:
        body = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
        assert_openai_error(server.post("/v1/completions", body), 401)
        assert_openai_error(server.post("/v1/completions", body, headers={"Authorization": "Bearer nope"}), 401)
        with pytest.raises(openai.AuthenticationError):
            server.client("wrong").models.list()
        assert server.client("sekret").completions.create(**body).usage.completion_tokens >= 1
        assert httpx.get(server.url + "/health", timeout=TIMEOUT).status_code == 200


def test_failures_are_500_and_the_server_keeps_serving(models):
    with serving(models["dense"]) as server:
        body = {"model": "tiny", "prompt": "hi", "max_tokens": 5, "temperature": 0}

        batch = server.engine.batch

        def broken_decode(*args, **kwargs):  # one broken step; the engine fails the batch and goes on
            del batch.decode
            raise RuntimeError("a broken step")

        batch.decode = broken_decode
        error = assert_openai_error(server.post("/v1/completions", body), 500)
        assert error["type"] == "server_error" and "a broken step" in error["message"]
        batch.decode = broken_decode
        streamed = server.post("/v1/completions", {**body, "stream": True})
        assert streamed.status_code == 200 and '"server_error"' in streamed.text and "[DONE]" not in streamed.text
        submit = server.engine.submit
        server.engine.submit = lambda request: 1 / 0  # a bug in the HTTP layer's path
        error = assert_openai_error(server.post("/v1/completions", body), 500)
        assert "ZeroDivisionError" in error["message"]
        server.engine.submit = submit
        assert server.post("/v1/completions", body).json()["usage"]["completion_tokens"] == 5
        assert_openai_error(server.post("/v1/completions", b"\xff\xfe"), 400)


# ---- disconnects and overload ---------------------------------------------------------------
def test_disconnect_mid_stream_frees_the_slot(models):
    with serving(models["dense"], step_delay=0.02) as server:
        body = {"model": "tiny", "prompt": "tell me a story", "max_tokens": 100, "temperature": 0, "stream": True}
        with httpx.Client(timeout=TIMEOUT) as client:
            with client.stream("POST", server.url + "/v1/completions", json=body) as response:
                assert response.status_code == 200
                first = next(line for line in response.iter_lines() if line.startswith("data: "))
                assert first.startswith("data: {")
            # Leaving the block closes the connection after the first chunk.
        server.wait_idle(seconds=3)
        stats = server.engine.stats()
        assert stats.finished == 1 and stats.generated_tokens < 100  # cancelled, not run to max_tokens
        reply = server.client().completions.create(model="tiny", prompt="hi", max_tokens=3, temperature=0)
        assert reply.usage.completion_tokens == 3


def test_disconnect_while_waiting_for_a_plain_response_frees_the_slot(models):
    with serving(models["dense"], step_delay=0.02) as server:
        body = {"model": "tiny", "prompt": "tell me a story", "max_tokens": 100, "temperature": 0}
        with pytest.raises(httpx.ReadTimeout):
            server.post("/v1/completions", body, timeout=0.2)
        server.wait_idle(seconds=3)
        assert server.engine.stats().generated_tokens < 100


def test_overload_is_429_at_once_and_accepted_requests_complete(models):
    with serving(models["dense"], max_batch=1, max_queue=1, step_delay=0.005) as server:
        body = {"model": "tiny", "prompt": "overload", "max_tokens": 60, "temperature": 0}

        def ask(_):
            started = time.monotonic()
            response = server.post("/v1/completions", body)
            return response, time.monotonic() - started

        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            results = list(pool.map(ask, range(6), timeout=TIMEOUT))
        statuses = sorted(r.status_code for r, _ in results)
        assert 200 in statuses and 429 in statuses and set(statuses) <= {200, 429}, statuses
        for response, seconds in results:
            if response.status_code == 429:
                error = assert_openai_error(response, 429)
                assert error["code"] == "rate_limit_exceeded" and seconds < 5
            else:
                assert response.json()["usage"]["completion_tokens"] >= 1
        server.wait_idle()


# ---- metrics --------------------------------------------------------------------------------
def test_metrics_parse_and_count(dense):
    dense.client().completions.create(model="tiny", prompt="count me", max_tokens=4, temperature=0)
    text = httpx.get(dense.url + "/metrics", timeout=TIMEOUT).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    value = {f: families[f].samples[0].value for f in ("popc_running_sequences", "popc_waiting_requests")}
    assert value == {"popc_running_sequences": 0, "popc_waiting_requests": 0}
    generated = next(s.value for s in families["popc_generated_tokens"].samples if s.name.endswith("_total"))
    assert generated == dense.engine.stats().generated_tokens > 0
    ok = [s for s in families["popc_requests"].samples
          if s.name == "popc_requests_total" and s.labels == {"route": "/v1/completions", "status": "200"}]
    assert ok and ok[0].value >= 1
    ttft = [s for s in families["popc_time_to_first_token_seconds"].samples if s.name.endswith("_count")]
    assert ttft[0].value >= 1
    assert "popc_time_per_output_token_seconds" in families


# ---- the command line -----------------------------------------------------------------------
def test_cli_serve_on_a_missing_directory_is_one_line(tmp_path):
    from popc.cli import app

    result = CliRunner().invoke(app, ["serve", str(tmp_path / "nope")], catch_exceptions=False)
    assert_clean_failure(result, contains="nope")
