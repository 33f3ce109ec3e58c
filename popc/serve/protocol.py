"""The OpenAI wire format that ``popc serve`` speaks: request bodies, responses, errors.

Requests are validated strictly (``"max_tokens": "ten"`` or ``"10"`` is a 400, as OpenAI
answers) and unknown fields are ignored, so clients that send newer options still work.
Options that would change the answer and that popc cannot honour (``n > 1``, ``echo``,
``logprobs``, penalties, tools...) are refused with a 400 naming the field rather than
silently dropped.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field

# A chat request without max_tokens may use what remains of the context, up to this many
# tokens: enough for a long answer, short enough that a forgotten limit does not hold a
# batch slot for minutes.
DEFAULT_CHAT_MAX_TOKENS = 1024
# OpenAI's legacy completions default.
DEFAULT_COMPLETION_MAX_TOKENS = 16
MAX_STOP_STRINGS = 4


class OpenAIError(Exception):
    """An error answered as OpenAI does: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",  # noqa: A002 - OpenAI's field name
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


def from_validation_error(error: pydantic.ValidationError) -> OpenAIError:
    """The first problem pydantic found, as a 400 naming the field (``messages.0.role``)."""
    first = error.errors(include_url=False)[0]
    if first["type"] == "json_invalid":
        return bad_request(f"the request body is not valid JSON: {first['msg']}", code="invalid_json")
    # Union members add their type name to the location ("prompt.str"): keep the field path only.
    path = [str(part) for part in first["loc"] if isinstance(part, int) or not _is_type_name(part)]
    param = ".".join(path) or None
    message = first["msg"] if param is None else f"{param}: {first['msg']}"
    return bad_request(message, param=param)


def _is_type_name(part: str) -> bool:
    # Field names are lowercase identifiers; union members are "str", "list[int]", "ChatMessage"...
    return part in {"str", "int", "float", "bool", "dict"} or not part.isidentifier() or part[:1].isupper()


class Body(BaseModel):
    # Strict: no "10" -> 10 or true -> 1 coercion; unknown fields ignored.
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(Body):
    include_usage: bool = False


class Sampling(Body):
    """The fields both endpoints share."""

    model: str | None = None
    temperature: float | None = None  # OpenAI's default is 1.0 (sampling); 0 = greedy
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # popc's own (an export made with --kv-evict): this request's KV budget and method, as
    # `popc run --kv-budget/--kv-method` takes them; absent: the server's --kv-budget.
    kv_budget: float | int | str | None = None
    kv_method: str | None = None

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise bad_request(f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(stops)}", param="stop")
        return [s for s in stops if s]

    def refuse_unsupported(self) -> None:
        """Options popc cannot honour: a 400 naming the field, not a silently different answer."""
        if self.n not in (None, 1):
            raise bad_request(f"n must be 1 (popc serve returns one choice), got {self.n}", param="n")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise bad_request(f"{name} is not supported (only 0)", param=name)
        if self.logit_bias:
            raise bad_request("logit_bias is not supported", param="logit_bias")

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = DEFAULT_COMPLETION_MAX_TOKENS
    echo: bool | None = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.echo:
            raise bad_request("echo is not supported", param="echo")
        if self.logprobs is not None:
            raise bad_request("logprobs is not supported", param="logprobs")
        if self.best_of not in (None, 1):
            raise bad_request(f"best_of must be 1, got {self.best_of}", param="best_of")
        if self.suffix:
            raise bad_request("suffix is not supported", param="suffix")

    def single_prompt(self) -> str | list[int]:
        """The one prompt, as text or token ids (a batch of several prompts is refused)."""
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise bad_request(f"prompt takes one prompt per request, got {len(prompt)}", param="prompt")
            prompt = prompt[0]
        if not prompt:
            raise bad_request("the prompt is empty", param="prompt")
        return prompt


class ContentPart(Body):
    model_config = ConfigDict(strict=True, extra="allow")
    type: str
    text: str | None = None


class ChatMessage(Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def as_template_input(self, index: int) -> dict[str, str]:
        """``{"role", "content"}`` for the chat template; content parts must be text."""
        content = self.content
        if isinstance(content, list):
            for part in content:
                if part.type != "text" or part.text is None:
                    raise bad_request(
                        f"messages.{index}.content: only text parts are supported, got {part.type!r}",
                        param=f"messages.{index}.content",
                    )
            content = "".join(part.text or "" for part in content)
        return {"role": self.role, "content": content or ""}


class ChatRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    tools: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.logprobs:
            raise bad_request("logprobs is not supported", param="logprobs")
        if self.tools:
            raise bad_request("tools are not supported", param="tools")
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            raise bad_request("response_format other than text is not supported", param="response_format")

    def max_new_tokens(self, room: int) -> int:
        """The token limit asked for, else what remains of the context (``room``), capped."""
        for limit in (self.max_completion_tokens, self.max_tokens):
            if limit is not None:
                return limit
        return max(1, min(room, DEFAULT_CHAT_MAX_TOKENS))


# ---- responses ------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage_body(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class ResponseShape:
    """One request's response envelope: the same id, created and model in every chunk."""

    def __init__(self, chat: bool, model: str, include_usage: bool = False):
        self.chat = chat
        self.model = model
        self.include_usage = include_usage
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())

    def _envelope(self, object_name: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": object_name,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": choices,
        }

    def full(self, text: str, finish_reason: str, usage: dict[str, int]) -> dict[str, Any]:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None}}
        else:
            choice = {"index": 0, "text": text}
        choice.update(logprobs=None, finish_reason=finish_reason)
        body = self._envelope("chat.completion" if self.chat else "text_completion", [choice])
        body["usage"] = usage
        return body

    def chunk(self, text: str, finish_reason: str | None = None, first: bool = False) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": text} if first else {}
            if text and not first:
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta}
        else:
            choice = {"index": 0, "text": text}
        choice.update(logprobs=None, finish_reason=finish_reason)
        body = self._envelope("chat.completion.chunk" if self.chat else "text_completion", [choice])
        if self.include_usage:
            body["usage"] = None  # as OpenAI: null on every chunk but the last
        return body

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]:
        body = self._envelope("chat.completion.chunk" if self.chat else "text_completion", [])
        body["usage"] = usage
        return body
