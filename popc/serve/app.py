"""The HTTP layer of ``popc serve``: OpenAI's completions and chat completions routes over an
:class:`~popc.serve.engine.Engine`, plus /v1/models, /health and /metrics.

Each request is checked, tokenized and submitted on the event loop; the engine's thread
sends its events back through ``loop.call_soon_threadsafe``. A full queue is a 429 at
once, never a wait. A client that leaves (mid-stream or while a plain response is being
generated) cancels its sequence, so its batch slot is freed at the next step.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import time
from collections.abc import AsyncIterator
from typing import Any

import pydantic
from fastapi import APIRouter, Depends, FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from popc.errors import PopcError
from popc.kv_eviction import EvictionSettings, parse_budget, parse_method
from popc.runtime import SamplingOptions
from popc.serve.engine import BadRequest, Engine, QueueFull
from popc.serve.metrics import ServerMetrics
from popc.serve.protocol import (
    DEFAULT_COMPLETION_MAX_TOKENS,
    ChatRequest,
    CompletionRequest,
    OpenAIError,
    ResponseShape,
    Sampling,
    bad_request,
    from_validation_error,
    usage_body,
)
from popc.serve.sequence import Event, Handle, Request

ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")
OPENAI_DEFAULT_TEMPERATURE = 1.0  # OpenAI samples unless told temperature 0


class Generation:
    """One submitted request: the engine thread's events, queued on the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, metrics: ServerMetrics, started: float):
        self.loop = loop
        self.metrics = metrics
        self.started = started
        self.queue: asyncio.Queue[tuple[float, Event]] = asyncio.Queue()
        self.first_at: float | None = None
        self.handle: Handle | None = None

    def on_event(self, event: Event) -> None:  # runs on the engine's thread
        now = time.perf_counter()
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (now, event))
        except RuntimeError:  # the event loop has closed: the server is stopping
            pass

    async def next(self) -> Event:
        at, event = await self.queue.get()
        if self.first_at is None and (event.token_ids or event.finish_reason):  # the first token, shown or not
            self.first_at = at
        if event.finish_reason in ("stop", "length") and event.usage is not None:
            self.metrics.observe_request(self.first_at, at, self.started, event.usage.completion_tokens)
        return event

    def cancel(self) -> None:
        if self.handle is not None:
            self.handle.cancel()


def failure(event: Event) -> OpenAIError:
    """The error a final event of reason "error" or "cancelled" answers with."""
    if event.finish_reason == "cancelled":
        return OpenAIError(503, "the request was cancelled: the server is shutting down", type="server_error")
    return OpenAIError(500, f"generation failed: {event.error or 'unknown error'}", type="server_error")


def sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


class CancellingStream(StreamingResponse):
    """A streaming response that cancels its sequence however it ends: finished, client gone
    (Starlette cancels the stream), or the send failing."""

    def __init__(self, content: AsyncIterator[str], generation: Generation):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.generation = generation

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001 - ASGI
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.generation.cancel()


class CountResponses:
    """ASGI middleware: every answer counted by route and status (unknown paths as "other",
    so that scanners cannot blow up the label set)."""

    def __init__(self, app, metrics: ServerMetrics):  # noqa: ANN001 - ASGI
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001 - ASGI
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = scope["path"] if scope["path"] in ROUTES else "other"
        status = 500  # an exception before the response started ends as a 500

        async def send_counting(message) -> None:  # noqa: ANN001
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_counting)
        finally:
            self.metrics.requests.labels(route, str(status)).inc()


def build_app(engine: Engine, model_id: str, api_key: str | None = None) -> FastAPI:
    """The OpenAI-compatible app over a started ``engine``; the caller closes the engine."""
    model = engine.model
    vocab_size = int(model.config.get("vocab_size") or len(model.tokenizer))
    metrics = ServerMetrics(engine)
    app = FastAPI(title="popc serve", version="1", docs_url=None, redoc_url=None)
    app.add_middleware(CountResponses, metrics=metrics)
    install_error_handlers(app)

    async def require_key(request: HttpRequest) -> None:
        given = request.headers.get("authorization", "")
        if api_key is not None and not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise OpenAIError(401, "Incorrect or missing API key: send `Authorization: Bearer KEY`.",
                              code="invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_key)])

    def check_model(body: Sampling) -> None:
        if body.model is not None and body.model != model_id:
            raise OpenAIError(404, f"The model `{body.model}` does not exist; this server serves `{model_id}`.",
                              param="model", code="model_not_found")

    def sampling_of(body: Sampling) -> SamplingOptions:
        temperature = OPENAI_DEFAULT_TEMPERATURE if body.temperature is None else body.temperature
        top_p = 1.0 if body.top_p is None else body.top_p
        if not (math.isfinite(temperature) and 0 <= temperature <= 2):
            raise bad_request(f"temperature must be between 0 and 2, got {temperature}", param="temperature")
        if not (math.isfinite(top_p) and 0 < top_p <= 1):
            raise bad_request(f"top_p must be in (0, 1], got {top_p}", param="top_p")
        if body.seed is not None and body.seed < 0:
            raise bad_request(f"seed must be >= 0, got {body.seed}", param="seed")
        try:
            return SamplingOptions(temperature, top_p, body.seed)
        except PopcError as error:
            raise bad_request(str(error)) from None

    def eviction_of(body: Sampling) -> EvictionSettings | None:
        """The request's own KV eviction (``kv_budget``, ``kv_method``), or None: the server's."""
        if body.kv_budget is None:
            if body.kv_method is not None:
                raise bad_request("kv_method needs kv_budget", param="kv_method")
            return None
        try:
            return parse_method(body.kv_method or "laprox", parse_budget(str(body.kv_budget)))
        except PopcError as error:
            raise bad_request(str(error).replace("--kv-", "kv_"), param="kv_budget") from None

    def submit(
        prompt_ids: list[int], max_tokens: int, body: Sampling, prompt_param: str, limit_param: str = "max_tokens"
    ) -> Generation:
        started = time.perf_counter()
        if len(prompt_ids) >= model.max_positions:
            raise bad_request(
                f"This model's maximum context length is {model.max_positions} tokens; the prompt is "
                f"{len(prompt_ids)} tokens.", param=prompt_param, code="context_length_exceeded")
        stop = body.stop_strings()
        generation = Generation(asyncio.get_running_loop(), metrics, started)
        request = Request(
            prompt_ids, max_tokens, sampling_of(body), stop, on_event=generation.on_event, kv=eviction_of(body)
        )
        try:
            generation.handle = engine.submit(request)
        except QueueFull as error:
            raise OpenAIError(429, f"The server is busy: {error}. Retry shortly.", type="requests",
                              code="rate_limit_exceeded") from None
        except BadRequest as error:
            param = {"max_tokens": limit_param, "prompt": prompt_param}.get(error.field, error.field)
            raise bad_request(str(error), param=param) from None
        return generation

    async def respond(http: HttpRequest, generation: Generation, shape: ResponseShape, stream: bool) -> Response:
        if stream:
            return CancellingStream(stream_events(generation, shape), generation)
        watcher = asyncio.create_task(cancel_on_disconnect(http, generation))
        parts = []
        try:
            while (event := await generation.next()).finish_reason is None:
                parts.append(event.text)
        finally:
            watcher.cancel()
            generation.cancel()  # no-op when finished; frees the slot if this task was cancelled
        if event.finish_reason not in ("stop", "length"):
            raise failure(event)
        parts.append(event.text)
        usage = usage_body(event.usage.prompt_tokens, event.usage.completion_tokens)
        return JSONResponse(shape.full("".join(parts), event.finish_reason, usage))

    @v1.post("/completions")
    async def completions(http: HttpRequest) -> Response:
        body = await parse(http, CompletionRequest)
        check_model(body)
        body.refuse_unsupported()
        prompt = body.single_prompt()
        if isinstance(prompt, str):
            with engine.tokenizer_lock:
                prompt_ids = [int(i) for i in model.tokenizer(prompt)["input_ids"]]
        else:
            if any(not 0 <= i < vocab_size for i in prompt):
                raise bad_request(f"prompt token ids must be in [0, {vocab_size})", param="prompt")
            prompt_ids = list(prompt)
        max_tokens = DEFAULT_COMPLETION_MAX_TOKENS if body.max_tokens is None else body.max_tokens
        generation = submit(prompt_ids, max_tokens, body, "prompt")
        return await respond(http, generation, ResponseShape(False, model_id, body.include_usage), bool(body.stream))

    @v1.post("/chat/completions")
    async def chat_completions(http: HttpRequest) -> Response:
        body = await parse(http, ChatRequest)
        check_model(body)
        body.refuse_unsupported()
        messages = [message.as_template_input(i) for i, message in enumerate(body.messages)]
        with engine.tokenizer_lock:
            prompt_ids = chat_ids(model, messages)
        max_tokens = body.max_new_tokens(model.max_positions - len(prompt_ids))
        limit_param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        generation = submit(prompt_ids, max_tokens, body, "messages", limit_param)
        return await respond(http, generation, ResponseShape(True, model_id, body.include_usage), bool(body.stream))

    created = int(time.time())
    card = {"id": model_id, "object": "model", "created": created, "owned_by": "popc"}

    @v1.get("/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [card]}

    @v1.get("/models/{name:path}")
    async def model_card(name: str) -> dict[str, Any]:
        if name != model_id:
            raise OpenAIError(404, f"The model `{name}` does not exist.", param="model", code="model_not_found")
        return card

    app.include_router(v1)

    @app.get("/health")
    async def health() -> Response:
        if not engine.thread.is_alive():
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        stats = engine.stats()
        return JSONResponse({"status": "ok", "model": model_id, "running": stats.running, "waiting": stats.waiting})

    @app.get("/metrics")
    async def prometheus() -> Response:
        payload, content_type = metrics.render()
        return Response(payload, media_type=content_type)

    app.state.metrics = metrics
    app.state.engine = engine
    return app


async def parse(http: HttpRequest, kind: type[pydantic.BaseModel]) -> Any:
    try:
        return kind.model_validate_json(await http.body())
    except pydantic.ValidationError as error:
        raise from_validation_error(error) from None


def chat_ids(model, messages: list[dict[str, str]]) -> list[int]:  # noqa: ANN001 - a PopcModel
    if not getattr(model.tokenizer, "chat_template", None):
        raise bad_request("this model's tokenizer has no chat template; use /v1/completions", param="messages")
    try:
        return model.chat_ids(messages)
    except Exception as error:  # noqa: BLE001 - a template may refuse a conversation (role order...)
        raise bad_request(f"the chat template refused these messages: {error}", param="messages") from None


async def cancel_on_disconnect(http: HttpRequest, generation: Generation) -> None:
    """For a plain (non-streaming) response: cancel the sequence when the client leaves."""
    while (await http.receive())["type"] != "http.disconnect":
        pass
    generation.cancel()


async def stream_events(generation: Generation, shape: ResponseShape) -> AsyncIterator[str]:
    """Server-sent events as OpenAI streams them, ending with ``data: [DONE]``."""
    try:
        if shape.chat:
            yield sse(shape.chunk("", first=True))  # the role comes first, alone
        while (event := await generation.next()).finish_reason is None:
            if event.text:
                yield sse(shape.chunk(event.text))
        if event.finish_reason not in ("stop", "length"):
            yield sse(failure(event).body())
            return
        if event.text:
            yield sse(shape.chunk(event.text))
        yield sse(shape.chunk("", finish_reason=event.finish_reason))
        if shape.include_usage:
            yield sse(shape.usage_chunk(usage_body(event.usage.prompt_tokens, event.usage.completion_tokens)))
        yield sse("[DONE]")
    except Exception as error:  # noqa: BLE001 - after the 200 has gone, an error can only be an event
        yield sse(OpenAIError(500, f"{type(error).__name__}: {error}", type="server_error").body())


def install_error_handlers(app: FastAPI) -> None:
    """Every error answers with OpenAI's body; malformed input is a 400, never FastAPI's 422."""

    @app.exception_handler(OpenAIError)
    async def openai_error(_: HttpRequest, error: OpenAIError) -> JSONResponse:
        headers = {"Retry-After": "1"} if error.status == 429 else None
        return JSONResponse(error.body(), status_code=error.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: HttpRequest, error: RequestValidationError) -> JSONResponse:
        first = (error.errors() or [{}])[0]
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        body = OpenAIError(400, f"invalid request: {first.get('msg', 'malformed')}", param=param).body()
        return JSONResponse(body, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(http: HttpRequest, error: StarletteHTTPException) -> JSONResponse:
        if error.status_code == 404:
            message = f"Invalid URL ({http.method} {http.url.path})"
        elif error.status_code == 405:
            message = f"Method {http.method} is not allowed on {http.url.path}"
        else:
            message = str(error.detail)
        return JSONResponse(OpenAIError(error.status_code, message).body(), status_code=error.status_code,
                            headers=getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(_: HttpRequest, error: Exception) -> JSONResponse:
        message = f"internal error: {type(error).__name__}: {error}"
        return JSONResponse(OpenAIError(500, message, type="server_error").body(), status_code=500)
