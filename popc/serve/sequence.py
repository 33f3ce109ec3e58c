"""One request's life in the engine: its tokens, its sampling, and its text as it streams
(stop strings matched on text, a partial UTF-8 character or a possible stop string's
beginning held back until it resolves)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from popc.kv_eviction import EvictionSettings
from popc.runtime import SamplingOptions


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Event:
    """What a request receives, from the engine's thread: one event per new token (its text
    may be empty while a partial character or a possible stop string is held back), then a
    last event with ``finish_reason`` ("stop", "length", "cancelled" or "error") and ``usage``."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    usage: Usage | None = None
    error: str | None = None


@dataclass
class Request:
    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    stop: Sequence[str] = ()
    on_event: Callable[[Event], None] = lambda event: None
    kv: EvictionSettings | None = None  # KV eviction after this prefill; None: the engine's


class Handle:
    """The submitter's side of a request: ``cancel()`` frees its slot at the next step."""

    def __init__(self, request: Request):
        self.request = request
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        self.cancelled.set()


class TextStream:
    """Token ids in, text deltas out; finds stop strings across token boundaries."""

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str]):
        self.decode = decode
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded text already emitted
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add a token; the text that is now safe to emit (stops at a stop string)."""
        self.ids.append(token_id)
        text = self.decode(self.ids)
        if text.endswith("\ufffd"):  # a multi-byte character not yet complete
            return ""
        for stop in self.stop:
            at = text.find(stop, max(0, self.sent - len(stop) + 1))
            if at >= 0:
                self.stopped = True
                delta, self.sent = text[self.sent : at], at
                return delta
        # Hold back a tail that could still grow into a stop string.
        hold = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        safe = len(text) - hold
        delta = text[self.sent : safe] if safe > self.sent else ""
        self.sent = max(self.sent, safe)
        return delta

    def flush(self) -> str:
        """Whatever was held back, at the end of a sequence that did not stop on a string."""
        if self.stopped:
            return ""
        text = self.decode(self.ids)
        delta, self.sent = text[self.sent :], len(text)
        return delta


@dataclass
class Running:
    """A request admitted into the running batch."""

    handle: Handle
    stream: TextStream
    generated: list[int] = field(default_factory=list)
    pending: str = ""  # the last step's text, sent with the final event

    @property
    def request(self) -> Request:
        return self.handle.request
