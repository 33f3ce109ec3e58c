"""``popc serve DIR --ray``: the same server as a Ray Serve application, one engine per replica.

Each replica is a Ray actor that loads the export itself (``popc.load(DIR, threads=T)``),
starts one :class:`~popc.serve.engine.Engine` over it and serves the app of
:func:`popc.serve.app.build_app` through ``@serve.ingress`` (built late, in the replica, by
``__serve_build_asgi_app__``: the app needs the replica's own engine). Ray Serve's proxy
spreads requests over the replicas and passes streamed (SSE) responses through. Every
response names the replica that served it in an ``x-popc-replica`` header.

Ray is imported only when a deployment is built, so ``import popc`` works without it.

Three ways in:

- ``popc serve DIR --ray --replicas N`` calls :func:`run` (starts or joins a Ray cluster,
  deploys, blocks until Ctrl-C);
- ``serve run popc.serve.ray_app:app_builder directory=DIR replicas=2 threads=4``: Ray
  Serve's own CLI, through the application builder :func:`app_builder`;
- :func:`build_deployment` from Python, for ``serve.run(...)`` yourself.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from popc.errors import PopcError
from popc.serve.server import default_model_name

APP_NAME = "popc"
DEPLOYMENT_NAME = "PopcEngine"
REPLICA_HEADER = "x-popc-replica"


class ReplicaHeader:
    """ASGI middleware: every HTTP response carries ``x-popc-replica: <replica id>`` (pure ASGI,
    so streamed responses pass through untouched)."""

    def __init__(self, app: Any, replica: str):
        self.app = app
        self.header = (REPLICA_HEADER.encode(), replica.encode())

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001 - the ASGI signature
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message) -> None:  # noqa: ANN001
            if message["type"] == "http.response.start":
                message = dict(message)
                message["headers"] = [*message.get("headers", []), self.header]
            await send(message)

        await self.app(scope, receive, send_with_header)


class PopcReplica:
    """One replica: the export loaded in this process, one engine over it, the popc app."""

    def __init__(
        self,
        directory: str,
        max_batch: int = 8,
        max_queue: int = 64,
        threads: int | None = None,
        api_key: str | None = None,
        model_name: str | None = None,
    ):
        import popc
        from popc.serve.engine import Engine

        self.model = popc.load(directory, threads=threads)
        self.engine = Engine(self.model, max_batch=max_batch, max_queue=max_queue).start()
        self.model_name = model_name or default_model_name(directory)
        self.api_key = api_key
        self.replica_id = replica_id()

    def __serve_build_asgi_app__(self) -> Any:  # noqa: N807 - Ray Serve's late-bound ingress hook
        from popc.serve.app import build_app

        app = build_app(self.engine, self.model_name, self.api_key)
        app.add_middleware(ReplicaHeader, replica=self.replica_id)
        return app

    def check_health(self) -> None:
        """Ray Serve's health check: a replica whose engine thread died is replaced."""
        if not self.engine.thread.is_alive():
            raise RuntimeError("the popc engine thread is not running")

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()


def replica_id() -> str:
    """This Serve replica's id (``pid-<pid>`` outside a replica)."""
    try:
        from ray import serve

        return str(serve.get_replica_context().replica_id.unique_id)
    except Exception:  # noqa: BLE001 - not inside a replica (or an older Ray): any stable id
        return f"pid-{os.getpid()}"


@functools.cache
def deployment_class() -> Any:
    """``PopcReplica`` as a Serve deployment (built once, on first use: Ray stays unimported
    until then)."""
    from ray import serve

    return serve.deployment(name=DEPLOYMENT_NAME)(serve.ingress()(PopcReplica))


def check_args(directory: str | Path, replicas: int, max_batch: int, max_queue: int, threads: int | None) -> Path:
    from popc.artifact import read_export

    if replicas < 1:
        raise PopcError(f"--replicas must be at least 1, got {replicas}")
    if max_batch < 1:
        raise PopcError(f"--max-batch must be at least 1, got {max_batch}")
    if max_queue < 0:
        raise PopcError(f"--max-queue must be at least 0, got {max_queue}")
    if threads is not None and threads < 1:
        raise PopcError(f"--threads must be at least 1, got {threads}")
    path = Path(directory).resolve()
    read_export(path)  # a clear error here, not one per replica in Ray's logs
    return path


def build_deployment(
    directory: str | Path,
    replicas: int = 1,
    max_batch: int = 8,
    max_queue: int = 64,
    threads: int | None = None,
    api_key: str | None = None,
    model_name: str | None = None,
    num_cpus: float | None = None,
) -> Any:
    """A bound Serve application: ``replicas`` engines over the export at ``directory``.

    ``threads`` is ONNX Runtime's intra-op threads in each replica; each replica reserves
    ``num_cpus`` of Ray's CPUs (default: ``threads``, or 1), so Ray places replicas where
    their threads have cores. The directory must exist at the same path on every node that
    runs a replica (or on shared storage).
    """
    path = check_args(directory, replicas, max_batch, max_queue, threads)
    cpus = float(num_cpus if num_cpus is not None else (threads or 1))
    deployment = deployment_class().options(
        num_replicas=replicas,
        # Each replica batches its own requests; let Serve hand it more than its batch so
        # that its own queue (and its 429s) decides, not Serve's default cap of 5.
        max_ongoing_requests=max_batch + max_queue,
        ray_actor_options={"num_cpus": cpus},
        health_check_period_s=10,
    )
    return deployment.bind(
        str(path),
        max_batch=max_batch,
        max_queue=max_queue,
        threads=threads,
        api_key=api_key,
        model_name=model_name or default_model_name(path),
    )


def _optional_int(value: Any) -> int | None:
    return None if value in (None, "", "none", "None") else int(value)


def app_builder(args: dict[str, Any]) -> Any:
    """Ray Serve's application builder: ``serve run popc.serve.ray_app:app_builder directory=DIR
    replicas=2 threads=4 max_batch=8 max_queue=64 api_key=... model_name=...`` (values arrive as
    strings; ``api_key`` may also come from ``POPC_API_KEY``)."""
    known = {"directory", "replicas", "max_batch", "max_queue", "threads", "api_key", "model_name", "num_cpus"}
    unknown = sorted(set(args) - known)
    if unknown:
        raise PopcError(f"unknown popc serve argument(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    if "directory" not in args:
        raise PopcError("popc's Serve application needs directory=DIR")
    num_cpus = args.get("num_cpus")
    return build_deployment(
        args["directory"],
        replicas=int(args.get("replicas", 1)),
        max_batch=int(args.get("max_batch", 8)),
        max_queue=int(args.get("max_queue", 64)),
        threads=_optional_int(args.get("threads")),
        api_key=args.get("api_key") or os.environ.get("POPC_API_KEY") or None,
        model_name=args.get("model_name") or None,
        num_cpus=None if num_cpus in (None, "") else float(num_cpus),
    )


def connect(num_cpus: int | None = None) -> bool:
    """Join the cluster at ``RAY_ADDRESS`` or start a local one; True when this call started
    Ray (and so should shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address="auto", logging_level="WARNING")
        return True
    ray.init(num_cpus=num_cpus, logging_level="WARNING")
    return True


def run(
    directory: str | Path,
    replicas: int = 1,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch: int = 8,
    max_queue: int = 64,
    threads: int | None = None,
    api_key: str | None = None,
    model_name: str | None = None,
    print_fn: Any = None,
) -> None:
    """Deploy ``replicas`` engines over the export behind Ray Serve's HTTP proxy at
    ``host:port``; block until Ctrl-C (or SIGTERM), then take the application down.

    With ``RAY_ADDRESS`` set this joins that cluster (``ray.init(address="auto")``) and on exit
    deletes only popc's application; otherwise it starts a local Ray and shuts it down.
    """
    say = print_fn or (lambda message: print(message, file=sys.stderr, flush=True))
    if not 0 <= port <= 65535:
        raise PopcError(f"--port must be in 0..65535, got {port}")
    try:
        import ray
        from ray import serve
    except ImportError as error:
        raise PopcError("popc serve --ray needs Ray Serve: pip install 'popc[ray]'") from error
    application = build_deployment(directory, replicas, max_batch, max_queue, threads, api_key, model_name)

    started_ray = False
    deployed = False
    previous = None
    try:
        started_ray = connect()
        if _main_thread():  # after ray.init, which installs its own SIGTERM handler
            previous = signal.signal(signal.SIGTERM, _terminate)
        cpus = ray.cluster_resources().get("CPU", 0)
        wanted = replicas * float(threads or 1)
        if wanted > cpus:
            say(
                f"warning: {replicas} replica(s) x {threads or 1} thread(s) need {wanted:g} CPUs and this Ray "
                f"cluster has {cpus:g}: replicas beyond its CPUs stay pending"
            )
        say(f"popc serve: starting {replicas} Ray Serve replica(s) of {Path(directory).resolve()}")
        serve.start(http_options={"host": host, "port": port})
        serve.run(application, name=APP_NAME, route_prefix="/")
        deployed = True
        say(f"popc serve: {replicas} replica(s) ready at http://{host}:{port}/v1 (Ctrl-C to stop)")
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        say("popc serve: stopping")
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        _take_down(started_ray and not os.environ.get("RAY_ADDRESS"), deployed)
        say("popc serve: stopped")


def _take_down(own_cluster: bool, deployed: bool) -> None:
    import ray
    from ray import serve

    try:
        if own_cluster:
            serve.shutdown()
        elif deployed:
            serve.delete(APP_NAME)  # someone else's cluster: leave Serve and their apps alone
    finally:
        if own_cluster and ray.is_initialized():
            ray.shutdown()


def _terminate(signum, frame) -> None:  # noqa: ANN001 - signal handler signature
    raise KeyboardInterrupt


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
