"""``popc serve`` in one process: load the export, start the engine, run uvicorn over the app."""

from __future__ import annotations

from pathlib import Path

from popc.errors import PopcError
from popc.kv_eviction import EvictionSettings


def default_model_name(directory: str | Path) -> str:
    """The id clients name in ``model``: the export directory's name (here and in Ray replicas)."""
    from popc.artifact import read_export

    location, _ = read_export(directory)
    return Path(location.directory).resolve().name


def serve(
    directory: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch: int = 8,
    max_queue: int = 64,
    threads: int | None = None,
    api_key: str | None = None,
    model_name: str | None = None,
    kv: EvictionSettings | None = None,
) -> None:
    """Serve one export until interrupted (Ctrl-C / SIGTERM stop uvicorn, then the engine)."""
    try:
        import uvicorn
    except ImportError:
        raise PopcError("popc serve needs the serve extra: pip install 'popc[serve]'") from None

    import popc
    from popc.serve.app import build_app
    from popc.serve.engine import Engine

    if not 0 <= port <= 65535:
        raise PopcError(f"--port must be in 0..65535, got {port}")
    model = popc.load(directory, threads=threads)
    engine = Engine(model, max_batch=max_batch, max_queue=max_queue, kv=kv).start()
    try:
        app = build_app(engine, model_name or default_model_name(directory), api_key=api_key)
        uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5)
    finally:
        engine.close()
