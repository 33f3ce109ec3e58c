"""Run an export with ONNX Runtime: ``popc.load(DIR).generate(...)``.

The runtime feeds the graph's KV cache back step by step: one prefill over the
(left-padded) prompt, then one-token decode steps, greedy unless a temperature
is given.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from popc.artifact import ExportLocation, check_interface, load_tokenizer, present_name, read_export
from popc.errors import PopcError
from popc.pop import PopSettings

DEVICES = ("cpu", "cuda")
_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}


@dataclass
class GenerationResult:
    prompt_ids: list[int]
    generated_ids: list[int]
    text: str
    prefill_ms: float
    decode_ms_per_token: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def check_sampling(temperature: float, top_p: float, seed: int | None) -> None:
    """Refuse sampling values numpy would reject with a traceback (a negative seed) or turn
    into nonsense without a word (a NaN or infinite temperature)."""
    if not (math.isfinite(temperature) and temperature >= 0):
        raise PopcError(f"--temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    if not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise PopcError(f"--top-p must be in (0, 1], got {top_p}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise PopcError(f"--seed must be an integer >= 0, got {seed}")


@dataclass
class SamplingOptions:
    """Greedy when ``temperature`` is 0; otherwise temperature + nucleus (top-p) sampling."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    rng: np.random.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        check_sampling(self.temperature, self.top_p, self.seed)
        self.rng = np.random.default_rng(self.seed)

    def pick(self, logits: np.ndarray) -> np.ndarray:
        """Next token per row of ``logits`` [batch, vocab]."""
        if self.temperature == 0:
            return logits.argmax(-1)
        scaled = logits.astype(np.float64) / self.temperature
        probs = np.exp(scaled - scaled.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        chosen = []
        for row in probs:
            keep = self._nucleus(row)
            cumulative = np.cumsum(row[keep])  # an inverse-CDF draw (rng.choice checks p at length)
            at = int(np.searchsorted(cumulative, self.rng.random() * cumulative[-1], side="right"))
            chosen.append(keep[min(at, keep.size - 1)])
        return np.asarray(chosen)

    def _nucleus(self, row: np.ndarray) -> np.ndarray:
        """The most probable tokens whose mass first reaches ``top_p``, most probable first.
        Sorting a 50k-token vocabulary costs milliseconds per row; the nucleus is nearly
        always among the top few hundred, so those are sorted first."""
        if self.top_p >= 1:
            return np.arange(row.size)  # every token: no order needed
        if row.size > 256:
            top = np.argpartition(-row, 255)[:256]
            if (nucleus := self._mass_reaching_top_p(row, top)) is not None:
                return nucleus
        return self._mass_reaching_top_p(row, np.arange(row.size), whole=True)

    def _mass_reaching_top_p(self, row: np.ndarray, tokens: np.ndarray, whole: bool = False) -> np.ndarray | None:
        """``tokens`` by falling probability, cut where their mass reaches ``top_p``; None
        when their whole mass falls short (and they are not the whole vocabulary)."""
        order = tokens[np.argsort(-row[tokens], kind="stable")]
        cumulative = np.cumsum(row[order])
        if cumulative[-1] < self.top_p and not whole:
            return None
        return order[: int(np.searchsorted(cumulative, self.top_p) + 1)]


def _make_session(model_path: Path, device: str, use_oplib: bool = True, threads: int | None = None):
    import onnxruntime as ort

    if device not in DEVICES:
        raise PopcError(f"unknown device {device!r}; choose one of: {', '.join(DEVICES)}")
    options = ort.SessionOptions()
    if threads is not None:
        if threads < 1:
            raise PopcError(f"--threads must be at least 1, got {threads}")
        options.intra_op_num_threads = threads
    from popc.oplib import register_library

    # The popc op library (fused ai.popc kernels) when present; else the ops' ONNX bodies run.
    if device == "cuda":
        # The fused PopSwiGLUDecode/PopGeGLUDecode/PopPartition kernels are CPU-only; in a CUDA
        # session they would pull the FFNs onto the CPU. Without them the ops' function bodies
        # run on the GPU, with the library's CUDA GatherMatMul(T) kernels inside.
        import os

        previous = os.environ.get("POPC_OPLIB_FUSED")
        os.environ["POPC_OPLIB_FUSED"] = "0"
        try:
            uses_oplib = use_oplib and register_library(options)
        finally:
            if previous is None:
                del os.environ["POPC_OPLIB_FUSED"]
            else:
                os.environ["POPC_OPLIB_FUSED"] = previous
    else:
        uses_oplib = use_oplib and register_library(options)
    options.log_severity_level = 3
    if device == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise PopcError(
                "the CUDA execution provider is not available: install popc[gpu] (onnxruntime-gpu, "
                "not onnxruntime) on a machine with an NVIDIA GPU and CUDA libraries"
            )
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
    try:
        session = ort.InferenceSession(str(model_path), options, providers=providers)
    except Exception as error:  # ORT raises its own exception types for corrupt models
        raise PopcError(f"ONNX Runtime cannot load {model_path}: {str(error).splitlines()[0]}") from None
    if device == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
        # The provider is listed by onnxruntime-gpu even where no GPU or CUDA library exists.
        raise PopcError("the CUDA execution provider failed to start (no GPU, or CUDA/cuDNN libraries missing)")
    return session, uses_oplib


class PopcModel:
    """An exported model ready to generate. Build it with :func:`popc.load`."""

    def __init__(
        self,
        location: ExportLocation,
        config: dict[str, Any],
        device: str = "cpu",
        use_oplib: bool = True,
        threads: int | None = None,
    ):
        self.location = location
        self.config = config
        self.device = device
        self.threads = threads
        # uses_oplib: whether the popc op library's kernels run the ai.popc ops.
        # Dense exports have no ai.popc ops: no need to load (or first build) the op library.
        has_popc_ops = config.get("pop") is not None
        self.session, self.uses_oplib = _make_session(location.model_path, device, use_oplib and has_popc_ops, threads)
        graph_outputs = [o.name for o in self.session.get_outputs()]
        shapes = {v.name: v.shape for v in (*self.session.get_inputs(), *self.session.get_outputs())}
        inputs = {i.name: i.type for i in self.session.get_inputs()}
        check_interface(inputs, graph_outputs, config, location.model_path, shapes)
        self.tokenizer = load_tokenizer(location.directory)
        self.num_layers = int(config["num_layers"])
        self.num_kv_heads = int(config["num_kv_heads"])
        self.head_dim = int(config["head_dim"])
        self.max_positions = int(config["max_positions"])
        self.eos_token_ids = set(config.get("eos_token_ids") or [])
        pad = config.get("pad_token_id")
        self.pad_token_id = int(pad) if pad is not None else 0
        inputs = self.session.get_inputs()
        self.state_inputs = [i for i in inputs if i.name.startswith("past_")]
        self.has_pop_config = any(i.name == "pop_config" for i in inputs)
        # An input with a default: ORT lists it among the overridable initializers.
        optional = [i.name for i in self.session.get_overridable_initializers()]
        self.has_logits_to_keep = "logits_to_keep" in optional + [i.name for i in inputs]
        # ORT's GroupQueryAttention takes several new tokens over a non-empty cache for one
        # row at a time only: such calls run row by row (see step()).
        self.fused_attention = bool(config.get("ort_fusions"))
        if self.fused_attention and device == "cuda":
            import warnings

            warnings.warn(
                "this export uses ONNX Runtime's fp32 GroupQueryAttention, which runs on the CPU "
                "execution provider only; for CUDA, re-export with `popc export --no-fuse`",
                stacklevel=2,
            )
        self.output_order = ["logits"] + [present_name(i.name) for i in self.state_inputs]
        pop = config.get("pop") or {}
        self.pop_channels = int(pop.get("intermediate_size", 0))
        # The channel scores the graph can compute: exports made before the output-aware score
        # have no `scores` entry (and their FFN nodes no output_norm input).
        scores = pop.get("scores")
        self.pop_scores = tuple(scores) if isinstance(scores, list) else ("activation",)
        self.pop_defaults = PopSettings(
            retain=pop.get("retain", 1.0),
            candidate=pop.get("candidate", 0.0),
            keep=pop.get("keep", 0.0),
            score=pop.get("score", "activation"),
        )
        if self.has_pop_config:
            self.pop_counts(self.pop_defaults)  # refuse a split that rounds to nothing now

    def pop_counts(self, pop: PopSettings | None = None) -> np.ndarray:
        """The ``pop_config`` input for ``pop`` (default: the export's), refusing a score the
        export's graph cannot compute."""
        settings = pop or self.pop_defaults
        if settings.score not in self.pop_scores:
            raise PopcError(
                f"score {settings.score!r} is not available in {self.location.directory}: it was exported by an "
                "older popc, whose FFN nodes have no output_norm input; re-export it with `popc export`"
            )
        return settings.counts(self.pop_channels)

    # ---- tokens -------------------------------------------------------------------------
    def encode(self, prompt: str, chat: bool = False) -> list[int]:
        """Prompt text -> token ids (through the chat template when ``chat``)."""
        if not prompt or not prompt.strip():
            raise PopcError("the prompt is empty; pass some text with --prompt or --prompt-file")
        if chat:
            if not getattr(self.tokenizer, "chat_template", None):
                raise PopcError("this model's tokenizer has no chat template; drop --chat")
            return self.chat_ids([{"role": "user", "content": prompt}])
        return [int(i) for i in self.tokenizer(prompt)["input_ids"]]

    def chat_ids(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """A conversation -> token ids through the tokenizer's chat template, ready for the
        assistant's turn."""
        ids = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return [int(i) for i in ids]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    # ---- one graph call -----------------------------------------------------------------
    def initial_state(self, batch: int) -> list[np.ndarray]:
        """Empty state for every ``past_*`` input: batch rows, zero-length dynamic dims."""
        state = []
        for meta in self.state_inputs:
            shape = [batch if i == 0 else (d if isinstance(d, int) else 0) for i, d in enumerate(meta.shape)]
            state.append(np.zeros(shape, _NUMPY_TYPES[meta.type]))
        return state

    def step(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        state: list[np.ndarray],
        pop: PopSettings | None = None,
        logits_to_keep: int = 0,
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """Run the graph once: logits for ``input_ids`` and the next state.

        ``state`` is the list of ``past_*`` inputs (KV cache, then POP partitions) in
        graph order. With an empty state the call is a prefill; otherwise it extends.
        ``logits_to_keep`` > 0 returns only the last that many positions' logits (the LM
        head runs on those alone); 0 returns every position's.
        """
        batch, new = input_ids.shape
        extends = bool(state) and state[0].ndim == 4 and state[0].shape[2] > 0
        if self.fused_attention and batch > 1 and new > 1 and extends:
            rows = [
                self.step(input_ids[r : r + 1], attention_mask[r : r + 1], [s[r : r + 1] for s in state], pop, logits_to_keep)
                for r in range(batch)
            ]  # fmt: skip
            return np.concatenate([r[0] for r in rows]), [np.concatenate(parts) for parts in zip(*(r[1] for r in rows))]
        feed = {"input_ids": input_ids.astype(np.int64), "attention_mask": attention_mask.astype(np.int64)}
        feed |= {meta.name: value for meta, value in zip(self.state_inputs, state)}
        if self.has_pop_config:
            feed["pop_config"] = self.pop_counts(pop)
        if self.has_logits_to_keep:
            feed["logits_to_keep"] = np.array(logits_to_keep, np.int64)
        elif logits_to_keep:  # an export from before the input existed: slice here
            outputs = self.session.run(self.output_order, feed)
            return outputs[0][:, -logits_to_keep:], outputs[1:]
        outputs = self.session.run(self.output_order, feed)
        return outputs[0], outputs[1:]

    def bound(self, pop: PopSettings | None = None, capacity: int | None = None) -> BoundSteps:
        """A prefill-then-decode stepper whose state stays in ONNX Runtime (IOBinding).

        With fused attention the KV cache is one buffer per layer, read and written in
        place; ``capacity`` (tokens, default: prompt + 256) sizes it, and it grows if
        outrun."""
        return BoundSteps(self, pop, capacity)

    def check_context(self, prompt_length: int) -> None:
        if prompt_length >= self.max_positions:
            raise PopcError(
                f"the prompt is {prompt_length} tokens, longer than the model's context of "
                f"{self.max_positions}; shorten it"
            )

    # ---- generation ---------------------------------------------------------------------
    def generate_ids(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int = 64,
        sampling: SamplingOptions | None = None,
        on_tokens: Callable[[np.ndarray], None] | None = None,
        pop: PopSettings | None = None,
    ) -> tuple[list[list[int]], float, float]:
        """Batched generation over left-padded prompts.

        Returns the new ids per prompt (stopping at EOS), prefill seconds and decode
        seconds per step.
        """
        sampling = sampling or SamplingOptions()
        if max_new_tokens < 1:
            raise PopcError("--max-new-tokens must be at least 1")
        if not prompts or any(len(p) == 0 for p in prompts):
            raise PopcError("the prompt is empty")
        longest = max(len(p) for p in prompts)
        self.check_context(longest)
        max_new_tokens = min(max_new_tokens, self.max_positions - longest)
        batch = len(prompts)
        input_ids = np.full((batch, longest), self.pad_token_id, np.int64)
        attention_mask = np.zeros((batch, longest), np.int64)
        for row, ids in enumerate(prompts):
            input_ids[row, longest - len(ids) :] = ids
            attention_mask[row, longest - len(ids) :] = 1

        stepper = self.bound(pop, capacity=longest + max_new_tokens)
        started = time.perf_counter()
        logits = stepper.prefill(input_ids, attention_mask)
        prefill = time.perf_counter() - started

        generated: list[list[int]] = [[] for _ in range(batch)]
        finished = np.zeros(batch, bool)
        decode_started = time.perf_counter()
        steps = 0
        while True:
            next_ids = sampling.pick(logits[:, -1, :])
            for row in range(batch):
                if not finished[row]:
                    generated[row].append(int(next_ids[row]))
                    finished[row] = int(next_ids[row]) in self.eos_token_ids
            if on_tokens is not None:
                on_tokens(next_ids)
            if finished.all() or steps + 1 >= max_new_tokens:
                break
            logits = stepper.decode(next_ids.reshape(batch, 1), copy=False)
            steps += 1
        decode = (time.perf_counter() - decode_started) / max(steps, 1)
        return generated, prefill, decode

    def generate(
        self,
        prompt: str | Sequence[int],
        max_new_tokens: int = 64,
        chat: bool = False,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        on_text: Callable[[str], None] | None = None,
        pop: PopSettings | None = None,
    ) -> GenerationResult:
        """Generate from one prompt (text, or token ids); ``on_text`` receives text as it streams."""
        prompt_ids = self.encode(prompt, chat) if isinstance(prompt, str) else [int(i) for i in prompt]
        sampling = SamplingOptions(temperature, top_p, seed)
        streamed: list[int] = []
        shown = ""

        def stream(next_ids: np.ndarray) -> None:
            nonlocal shown
            if on_text is None:
                return
            streamed.append(int(next_ids[0]))
            text = self.decode(streamed)
            # Hold back a trailing partial UTF-8 character until it completes.
            if text.startswith(shown) and not text.endswith("\ufffd"):
                on_text(text[len(shown) :])
                shown = text

        (generated,), prefill, decode = self.generate_ids([prompt_ids], max_new_tokens, sampling, stream, pop)
        return GenerationResult(
            prompt_ids=prompt_ids,
            generated_ids=generated,
            text=self.decode(generated),
            prefill_ms=prefill * 1000,
            decode_ms_per_token=decode * 1000,
        )


class BoundSteps:
    """One prefill, then one-token decode steps, with the graph's state kept as ONNX Runtime
    values (IOBinding): each step's ``present*`` outputs are bound as the next step's
    ``past*`` inputs, so the KV cache and the POP partitions never pass through numpy;
    only the logits are copied out.

    Fused exports go further: each layer's keys and values live in one ``capacity``-slot
    buffer bound as both ``past`` input and ``present`` output, which GroupQueryAttention
    then updates in place (its shared-buffer mode, as onnxruntime-genai runs it): a step
    writes the new token's slot instead of copying the whole cache."""

    GROWTH = 256  # slots added beyond the prompt when no capacity is given

    def __init__(self, model: PopcModel, pop: PopSettings | None = None, capacity: int | None = None):
        import onnxruntime as ort

        self.model = model
        self.capacity = capacity
        self.kv_buffers: dict[str, Any] = {}  # past name -> shared OrtValue (fused exports)
        self.session = model.session
        self.ort = ort
        self.device_type = "cuda" if model.device == "cuda" else "cpu"
        self.pop_config = model.pop_counts(pop) if model.has_pop_config else None
        self.state: list[Any] | None = None
        self.attention_mask: np.ndarray | None = None
        # The decode steps' binding, made once per cache: only input_ids (updated in place),
        # the growing attention_mask and any non-shared state are rebound per step.
        self._decode_binding: Any = None
        self._next_ids: Any = None
        self._logits: Any = None

    def _run(self, input_ids: np.ndarray, state: list[Any], logits: bool = True, keep: int = 0) -> np.ndarray | None:
        binding = self.session.io_binding()
        value = self.ort.OrtValue.ortvalue_from_numpy
        binding.bind_ortvalue_input("input_ids", value(np.ascontiguousarray(input_ids, np.int64)))
        binding.bind_ortvalue_input("attention_mask", value(self.attention_mask))
        if self.model.has_logits_to_keep:
            binding.bind_ortvalue_input("logits_to_keep", value(np.array(keep, np.int64)))
        for meta, item in zip(self.model.state_inputs, state):
            shared = self.kv_buffers.get(meta.name)
            if shared is not None:
                binding.bind_ortvalue_input(meta.name, shared)
                continue
            binding.bind_ortvalue_input(meta.name, item if isinstance(item, self.ort.OrtValue) else value(item))
        if self.pop_config is not None:
            binding.bind_ortvalue_input("pop_config", value(self.pop_config))
        shared_outputs = {present_name(name): buffer for name, buffer in self.kv_buffers.items()}
        for name in self.model.output_order:  # get_outputs() keeps this order
            if name in shared_outputs:
                binding.bind_ortvalue_output(name, shared_outputs[name])
            else:
                binding.bind_output(name, self.device_type)
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        self.state = list(outputs[1:])
        return outputs[0].numpy() if logits else None

    def prefill(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, logits: bool = True, logits_to_keep: int = 1
    ) -> np.ndarray | None:
        """Logits [batch, logits_to_keep, vocab] of the prompt's last positions (every
        position's with 0; None with ``logits=False``: they stay in ONNX Runtime); starts
        a new state. The default 1 runs the LM head on the last token only."""
        self.attention_mask = np.ascontiguousarray(attention_mask, np.int64)
        batch, length = input_ids.shape
        self.kv_buffers = {}
        self._decode_binding = None
        if self.model.fused_attention and self.device_type == "cpu":
            self._allocate(batch, length + self.GROWTH if self.capacity is None else max(self.capacity, length))
        return self._run(input_ids, self.model.initial_state(batch), logits, logits_to_keep)

    def _allocate(self, batch: int, slots: int, keep: int = 0) -> None:
        """(Re)allocate the shared KV buffers with ``slots`` slots, keeping the first ``keep``."""
        for meta in self.model.state_inputs:
            if not meta.name.startswith("past_key_values."):
                continue
            array = np.zeros((batch, self.model.num_kv_heads, slots, self.model.head_dim), np.float32)
            if keep:
                array[:, :, :keep] = self.kv_buffers[meta.name].numpy()[:, :, :keep]
            self.kv_buffers[meta.name] = self.ort.OrtValue.ortvalue_from_numpy(array)
        self.slots = slots
        self._decode_binding = None

    def _decode_step(self, next_ids: np.ndarray, copy: bool) -> np.ndarray:
        """One decode step on the persistent binding (built at the first step after a
        prefill or a buffer growth)."""
        ort = self.ort
        batch = next_ids.shape[0]
        if self._decode_binding is None:
            binding = self.session.io_binding()
            self._next_ids = ort.OrtValue.ortvalue_from_numpy(np.zeros((batch, 1), np.int64))
            binding.bind_ortvalue_input("input_ids", self._next_ids)
            if self.model.has_logits_to_keep:
                binding.bind_ortvalue_input("logits_to_keep", ort.OrtValue.ortvalue_from_numpy(np.array(1, np.int64)))
            if self.pop_config is not None:
                binding.bind_ortvalue_input("pop_config", ort.OrtValue.ortvalue_from_numpy(self.pop_config))
            for name, buffer in self.kv_buffers.items():
                binding.bind_ortvalue_input(name, buffer)
            vocab = int(self.model.config.get("vocab_size") or 0)
            self._logits = ort.OrtValue.ortvalue_from_shape_and_type([batch, 1, vocab], np.float32, self.device_type)
            shared = {present_name(name): buffer for name, buffer in self.kv_buffers.items()}
            # Output positions are fixed by this first binding (rebinding a name keeps its slot).
            binding.bind_ortvalue_output("logits", self._logits)
            for name in self.model.output_order[1:]:
                if name in shared:
                    binding.bind_ortvalue_output(name, shared[name])
                else:
                    binding.bind_output(name, self.device_type)
            self._decode_binding = binding
        binding = self._decode_binding
        self._next_ids.update_inplace(np.ascontiguousarray(next_ids, np.int64))
        binding.bind_ortvalue_input("attention_mask", ort.OrtValue.ortvalue_from_numpy(self.attention_mask))
        for meta, item in zip(self.model.state_inputs, self.state):
            if meta.name not in self.kv_buffers:
                binding.bind_ortvalue_input(meta.name, item)
                binding.bind_output(present_name(meta.name), self.device_type)
        self.session.run_with_iobinding(binding)
        if len(self.kv_buffers) < len(self.state):  # else every state value is a shared buffer
            self.state = list(binding.get_outputs()[1:])
        logits = self._logits.numpy()  # a view of the buffer the next step overwrites
        return np.array(logits) if copy else logits

    def decode(self, next_ids: np.ndarray, copy: bool = True) -> np.ndarray:
        """Logits [batch, 1, vocab] after appending ``next_ids`` [batch, 1]. ``copy=False``
        returns a view of the output buffer, valid until the next ``decode`` (saves copying
        batch x vocab floats per step when the caller picks the token at once)."""
        if self.state is None:
            raise PopcError("decode() before prefill()")
        ones = np.ones((self.attention_mask.shape[0], 1), np.int64)
        self.attention_mask = np.concatenate([self.attention_mask, ones], axis=1)
        if self.kv_buffers and self.attention_mask.shape[1] > self.slots:
            self._allocate(self.attention_mask.shape[0], self.slots + self.GROWTH, keep=self.slots)
        if next_ids.shape != (self.attention_mask.shape[0], 1):
            raise PopcError(f"decode() takes one token per row, [batch, 1]; got {list(next_ids.shape)}")
        return self._decode_step(next_ids, copy)


def load(path: str | Path, device: str = "cpu", use_oplib: bool = True, threads: int | None = None) -> PopcModel:
    """Open an export (its directory or its ``.onnx`` file) for generation.

    ``use_oplib=False`` runs the ai.popc ops' ONNX function bodies even where the op
    library is present. ``threads`` sets ONNX Runtime's intra-op threads (default: its own
    choice, one per physical core).
    """
    location, config = read_export(path)
    return PopcModel(location, config, device, use_oplib, threads)
