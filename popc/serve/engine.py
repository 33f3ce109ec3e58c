"""The serving engine: continuous batching over one export.

One thread owns the ONNX Runtime session. Each turn it admits waiting requests (those
that waited together prefilled together, apart from the running batch, then joined to
it), runs one decode step for every running sequence together, hands each its new text,
and drops the finished and the cancelled at once. Submitters never wait for a slot: a
full queue is refused at once.
"""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass

import numpy as np

from popc.errors import PopcError
from popc.kv_eviction import EvictionSettings
from popc.pop import PopSettings
from popc.runtime import PopcModel
from popc.serve.batch import RowState, RunningBatch
from popc.serve.sequence import Event, Handle, Request, Running, TextStream, Usage


class QueueFull(PopcError):
    """The waiting queue is at ``max_queue``: retry later (HTTP 429)."""


class BadRequest(PopcError):
    """A request the model cannot serve as asked (HTTP 400); ``field`` is what to change."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field


@dataclass
class EngineStats:
    waiting: int
    running: int
    prompt_tokens: int  # totals since start
    generated_tokens: int
    finished: int
    failed: int


class Engine:
    """Serve one :class:`PopcModel`; ``submit`` from any thread, events arrive on the engine's."""

    def __init__(
        self,
        model: PopcModel,
        max_batch: int = 8,
        max_queue: int = 64,
        pop: PopSettings | None = None,
        kv: EvictionSettings | None = None,
    ):
        if max_batch < 1:
            raise PopcError(f"--max-batch must be at least 1, got {max_batch}")
        if max_queue < 0:
            raise PopcError(f"--max-queue must be at least 0, got {max_queue}")
        self.model = model
        self.max_batch = max_batch
        self.max_queue = max_queue
        # KV eviction (an export made with --kv-evict): each sequence's cache after its prefill.
        self.batch = RunningBatch(model, pop, max_rows=max_batch, kv=kv)
        self.running: list[Running] = []
        self.prefilling = 0  # admitted, not yet running nor finished: counted as running
        self.waiting: collections.deque[Handle] = collections.deque()
        self.lock = threading.Condition()
        self.stopping = False
        self.totals = collections.Counter()
        # The engine decodes while the event loop encodes: one tokenizer call at a time
        # (Hugging Face's fast tokenizers refuse concurrent use with "Already borrowed").
        self.tokenizer_lock = threading.Lock()
        self.thread = threading.Thread(target=self._loop, name="popc-engine", daemon=True)

    # ---- the submitter's side -------------------------------------------------------------
    def start(self) -> Engine:
        self.thread.start()
        return self

    def close(self) -> None:
        with self.lock:
            self.stopping = True
            self.lock.notify_all()
        if self.thread.is_alive():
            self.thread.join(timeout=30)

    def check(self, request: Request) -> None:
        """Refuse what cannot be served: an empty prompt, a prompt longer than the context,
        ``max_tokens`` outside 1 .. context - prompt."""
        length = len(request.prompt_ids)
        context = self.model.max_positions
        if length == 0:
            raise BadRequest("the prompt is empty", "prompt")
        if length >= context:
            raise BadRequest(f"the prompt is {length} tokens; this model's context is {context} tokens", "prompt")
        if request.kv is not None and request.kv.evicts and not self.model.kv_eviction:
            raise BadRequest(
                "kv_budget needs a model exported with `popc export --kv-evict`; this one keeps the whole cache",
                "kv_budget",
            )
        if not 1 <= request.max_tokens <= context - length:
            raise BadRequest(
                f"max_tokens must be between 1 and {context - length} (the context of {context} tokens "
                f"less the prompt's {length}), got {request.max_tokens}",
                "max_tokens",
            )

    def submit(self, request: Request) -> Handle:
        self.check(request)
        handle = Handle(request)
        with self.lock:
            if self.stopping:
                raise QueueFull("the server is shutting down")
            free_slots = max(0, self.max_batch - len(self.running))
            if len(self.waiting) >= self.max_queue + free_slots:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting (--max-queue {self.max_queue})")
            self.waiting.append(handle)
            self.lock.notify_all()
        return handle

    def stats(self) -> EngineStats:
        with self.lock:
            return EngineStats(
                waiting=len(self.waiting),
                running=len(self.running) + self.prefilling,
                prompt_tokens=self.totals["prompt_tokens"],
                generated_tokens=self.totals["generated_tokens"],
                finished=self.totals["finished"],
                failed=self.totals["failed"],
            )

    # ---- the engine's thread --------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self.lock:
                while not self.stopping and not self.waiting and not self.running:
                    self.lock.wait()
                if self.stopping:
                    break
            try:
                self._admit()
                if self.running:
                    self._step()
            except Exception as error:  # a failed step fails its sequences, never the server
                self._fail_all(f"{type(error).__name__}: {error}")
        self._fail_all("the server is shutting down", reason="cancelled")

    def _admit(self) -> None:
        """Prefill what waits, as many as there are free rows, in groups of similar length."""
        admitted: list[Handle] = []
        with self.lock:
            while self.waiting and len(self.running) + len(admitted) < self.max_batch:
                handle = self.waiting.popleft()
                if handle.cancelled.is_set():
                    self._finish_handle(handle, [], "cancelled")
                else:
                    admitted.append(handle)
            self.prefilling = len(admitted)
        for group in prefill_groups(admitted):
            prompts = [handle.request.prompt_ids for handle in group]
            try:
                prefilled = self.batch.prefill_rows(prompts, group[0].request.kv)
            except Exception as error:
                for handle in group:
                    self._finish_handle(handle, [], "error", f"{type(error).__name__}: {error}")
                    self.prefilling -= 1
                continue
            for handle, (logits, row) in zip(group, prefilled):
                try:
                    self._start(handle, logits, row)
                except Exception as error:  # this one fails; the rest of the group goes on
                    self._finish_handle(handle, [], "error", f"{type(error).__name__}: {error}")
                finally:
                    self.prefilling -= 1

    def _start(self, handle: Handle, logits: np.ndarray, row: RowState) -> None:
        """A prefilled request's first token; then it joins the batch unless already done."""
        request = handle.request
        self.totals["prompt_tokens"] += len(request.prompt_ids)
        sequence = Running(handle, TextStream(self._decode, request.stop))
        if self._emit(sequence, int(request.sampling.pick(logits[None])[0])):
            self._finish(sequence)
        else:
            self.batch.join(row)
            self.running.append(sequence)

    def _decode(self, ids: list[int]) -> str:
        with self.tokenizer_lock:
            return self.model.decode(ids)

    def _step(self) -> None:
        # Rows whose client left since the last step go first.
        self._leave([i for i, s in enumerate(self.running) if s.handle.cancelled.is_set()], "cancelled")
        if not self.running:
            return
        last = np.array([[s.generated[-1]] for s in self.running], np.int64)
        logits = self.batch.decode(last, copy=False)
        done = []
        for index, sequence in enumerate(self.running):
            token = int(sequence.request.sampling.pick(logits[index : index + 1, -1])[0])
            if self._emit(sequence, token):
                done.append(index)
        self._leave(done, None)

    def _emit(self, sequence: Running, token: int) -> bool:
        """Record a new token and send its text; True when the sequence is finished."""
        request = sequence.request
        eos = token in self.model.eos_token_ids
        sequence.generated.append(token)  # an EOS is counted, not shown
        self.totals["generated_tokens"] += 1
        text = "" if eos else sequence.stream.push(token)
        finished = eos or sequence.stream.stopped or len(sequence.generated) >= request.max_tokens
        if not finished:  # every token, text or not (held back): its time is the token's
            request.on_event(Event(text=text, token_ids=[token]))
        else:
            sequence.pending = text  # sent with the final event
        return finished

    def _leave(self, indices: list[int], reason: str | None) -> None:
        if not indices:
            return
        leaving = [self.running[i] for i in indices]
        order = self.batch.leave(indices)
        for sequence in leaving:  # finished (and counted) before they stop counting as running
            self._finish(sequence, reason)
        self.running = [self.running[old] for old in order]

    def _finish(self, sequence: Running, reason: str | None = None) -> None:
        text = sequence.pending
        if reason is None:
            eos = bool(sequence.generated) and sequence.generated[-1] in self.model.eos_token_ids
            reason = "stop" if eos or sequence.stream.stopped else "length"
            text += sequence.stream.flush()
        self._finish_handle(sequence.handle, sequence.generated, reason, text=text)

    def _finish_handle(
        self, handle: Handle, generated: list[int], reason: str, error: str | None = None, text: str = ""
    ) -> None:
        self.totals["finished" if reason != "error" else "failed"] += 1
        usage = Usage(len(handle.request.prompt_ids), len(generated))
        handle.request.on_event(Event(text=text, finish_reason=reason, usage=usage, error=error))

    def _fail_all(self, message: str, reason: str = "error") -> None:
        running, self.running = self.running, []
        self.prefilling = 0
        with self.lock:
            waiting = list(self.waiting) if reason != "error" else []
            if reason != "error":
                self.waiting.clear()
        self.batch.clear()
        for sequence in running:
            self._finish_handle(sequence.handle, sequence.generated, reason, message if reason == "error" else None)
        for handle in waiting:
            self._finish_handle(handle, [], reason)


def prefill_groups(handles: list[Handle], waste: float = 1.5, tokens: int = 4096) -> list[list[Handle]]:
    """Split requests into prefill groups of similar prompt length: a group's padded size
    (rows x longest prompt) stays within ``waste`` x its real tokens and ``tokens`` in all
    (one prompt alone may be longer)."""
    groups: list[list[Handle]] = []
    real = 0
    # One eviction setting per group (the group is prefilled, then evicted, together).
    for handle in sorted(handles, key=lambda h: (repr(h.request.kv), len(h.request.prompt_ids))):
        length = len(handle.request.prompt_ids)  # the longest so far: the order is ascending
        padded = (len(groups[-1]) + 1) * length if groups else 0
        same = groups and groups[-1][0].request.kv == handle.request.kv
        if same and padded <= waste * (real + length) and padded <= tokens:
            groups[-1].append(handle)
            real += length
        else:
            groups.append([handle])
            real = length
    return groups
