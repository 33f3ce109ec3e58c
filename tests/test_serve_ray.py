"""``popc serve --ray``: two Ray Serve replicas of a tiny export on a local Ray cluster,
answered through the official ``openai`` client; greedy output equals ``generate``'s, and
both replicas serve (the ``x-popc-replica`` header)."""

from __future__ import annotations

import concurrent.futures
import socket
import sys
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("popc.serve.app")

sys.path.insert(0, str(Path(__file__).parent))
from conftest import make_tiny_model_dir  # noqa: E402
from popc.serve import ray_app  # noqa: E402

MAX_TOKENS = 12
PROMPTS = ["Hello there", "The quick brown fox jumps over", "a", "Once upon a time, in a land far away,"]
DEPLOY_TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from popc.export import ExportPlan, export

    root = tmp_path_factory.mktemp("serve-ray")
    src = make_tiny_model_dir(root, "llama", seed=3)
    out = root / "export"
    export(ExportPlan(model=str(src), out=str(out)))
    return out


@pytest.fixture(scope="module")
def reference(export_dir: Path):
    import popc

    model = popc.load(export_dir, threads=1)

    def generate(prompt: str, chat: bool = False) -> str:
        ids = model.encode(prompt, chat)
        return model.generate(ids, max_new_tokens=MAX_TOKENS).text

    return generate


@pytest.fixture(scope="module")
def server(export_dir: Path):
    """Base URL of a 2-replica deployment on a fresh local Ray (torn down afterwards)."""
    if ray.is_initialized():
        pytest.skip("Ray is already initialized in this process")
    port = free_port()
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=100 * 1024 * 1024,
        logging_level="WARNING",
        log_to_driver=False,
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        application = ray_app.build_deployment(export_dir, replicas=2, max_batch=4, max_queue=16, threads=1)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:  # serve.run waits for the replicas
            pool.submit(serve.run, application, name=ray_app.APP_NAME, route_prefix="/").result(DEPLOY_TIMEOUT_S)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while httpx.get(f"{base}/health", timeout=10).status_code != 200:
            assert time.monotonic() < deadline, "the deployment never became healthy"
            time.sleep(0.5)
        yield base
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


@pytest.fixture(scope="module")
def client(server: str):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", timeout=60, max_retries=0)


def model_id(client) -> str:  # noqa: ANN001
    return client.models.list().data[0].id


def test_models_lists_the_export(client) -> None:  # noqa: ANN001
    assert model_id(client) == "export"


def test_completion_is_greedy_generate(client, reference) -> None:  # noqa: ANN001
    response = client.completions.create(
        model=model_id(client), prompt=PROMPTS[1], max_tokens=MAX_TOKENS, temperature=0
    )
    assert response.choices[0].text == reference(PROMPTS[1])
    assert response.usage.completion_tokens <= MAX_TOKENS


def test_streamed_completion_is_greedy_generate(client, reference) -> None:  # noqa: ANN001
    stream = client.completions.create(
        model=model_id(client), prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0, stream=True
    )
    pieces = [chunk.choices[0].text for chunk in stream if chunk.choices]
    assert len(pieces) > 1  # streamed, not one final block
    assert "".join(pieces) == reference(PROMPTS[0])


def test_chat_is_greedy_generate_through_the_template(client, reference) -> None:  # noqa: ANN001
    question = "What is a fox?"
    response = client.chat.completions.create(
        model=model_id(client), messages=[{"role": "user", "content": question}], max_tokens=MAX_TOKENS, temperature=0
    )
    assert response.choices[0].message.content == reference(question, chat=True)
    stream = client.chat.completions.create(
        model=model_id(client),
        messages=[{"role": "user", "content": question}],
        max_tokens=MAX_TOKENS,
        temperature=0,
        stream=True,
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == reference(question, chat=True)


def test_concurrent_requests_spread_over_both_replicas(server: str, client, reference) -> None:  # noqa: ANN001
    name = model_id(client)

    def ask(prompt: str) -> tuple[str, str]:
        response = httpx.post(
            f"{server}/v1/completions",
            json={"model": name, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0},
            timeout=60,
        )
        assert response.status_code == 200, response.text
        return response.headers[ray_app.REPLICA_HEADER], response.json()["choices"][0]["text"]

    replicas: set[str] = set()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        for _ in range(5):  # Serve's router picks by queue length; a few rounds of 8 reach both
            prompts = PROMPTS * 2
            for prompt, (replica, text) in zip(prompts, pool.map(ask, prompts)):
                assert text == reference(prompt)  # batched with others, still greedy generate's
                replicas.add(replica)
            if len(replicas) == 2:
                break
    assert len(replicas) == 2, replicas

    status = serve.status().applications[ray_app.APP_NAME]
    deployment = status.deployments[ray_app.DEPLOYMENT_NAME]
    assert deployment.replica_states.get("RUNNING") == 2, deployment


def test_bad_request_is_refused_and_the_replicas_stay_up(server: str, client) -> None:  # noqa: ANN001
    response = httpx.post(f"{server}/v1/completions", content=b"{not json", timeout=30)
    assert 400 <= response.status_code < 500
    too_long = httpx.post(
        f"{server}/v1/completions",
        json={"model": model_id(client), "prompt": "x " * 400, "max_tokens": 4},
        timeout=30,
    )
    assert 400 <= too_long.status_code < 500
    assert httpx.get(f"{server}/health", timeout=10).status_code == 200
