"""Run an export with ONNX Runtime: ``popc.load(DIR).generate(...)``.

The runtime feeds the graph's KV cache back step by step: one prefill over the
(left-padded) prompt, then one-token decode steps, greedy unless a temperature
is given.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from popc.artifact import ExportLocation, check_interface, load_tokenizer, present_name, read_export
from popc.device_ops import NUMPY_TYPES, DeviceOps
from popc.errors import PopcError
from popc.evicting_steps import EvictingSteps, run_prefill
from popc.kv_eviction import LAYER_LENGTHS, LAYER_MASK, EvictionSettings, LayerAttention, read_layers
from popc.pop import PopSettings
from popc.sampling import SamplingOptions, check_sampling
from popc.steps import BoundSteps

__all__ = ["DEVICES", "BoundSteps", "GenerationResult", "PopcModel", "SamplingOptions", "check_sampling", "load"]

DEVICES = ("cpu", "cuda")


@dataclass
class GenerationResult:
    prompt_ids: list[int]
    generated_ids: list[int]
    text: str
    prefill_ms: float
    decode_ms_per_token: float
    # KV eviction: the cache entries (tokens x layers) kept after the prompt, of how many.
    kv_kept: int | None = None
    kv_prompt: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {key: value for key, value in asdict(self).items() if value is not None or not key.startswith("kv_")}


def _make_session(
    model_path: Path,
    device: str,
    use_oplib: bool = True,
    threads: int | None = None,
    model_bytes: bytes | None = None,
    dtype: str = "float32",
    stop_spinning: bool = False,
):
    """An ONNX Runtime session over ``model_path`` (or over ``model_bytes``, a rewritten copy of
    its graph whose external data stays beside ``model_path``) and whether the op library is in.
    ``dtype``: the export's element type (popc.json's ``dtype``). ``stop_spinning``: the
    intra-op workers stop spinning when a run returns (``session.force_spinning_stop``), for
    host work that follows a run on the same cores (KV eviction's scores after the prefill:
    spinning workers made them up to 2x slower)."""
    import onnxruntime as ort

    if device not in DEVICES:
        raise PopcError(f"unknown device {device!r}; choose one of: {', '.join(DEVICES)}")
    options = ort.SessionOptions()
    if threads is not None:
        if threads < 1:
            raise PopcError(f"--threads must be at least 1, got {threads}")
        options.intra_op_num_threads = threads
    if stop_spinning:
        options.add_session_config_entry("session.force_spinning_stop", "1")
    from popc.oplib import register_library

    # The popc op library when present; else the ops' ONNX bodies run. In a CUDA session it
    # registers only the ops it has CUDA kernels for (the others run their function bodies on
    # the GPU): a CPU-only kernel there would pull the FFNs onto the CPU.
    # The whole-FFN kernels are float32 only, and a registered op's types override its function
    # body (ORT refuses the graph rather than falling back): half exports run the body, whose
    # decode and partition ops have kernels for every float type.
    whole_ffn = None if dtype == "float32" else "0"
    with _scoped_env("POPC_OPLIB_PROVIDER", "cuda" if device == "cuda" else None), _scoped_env(
        "POPC_OPLIB_WHOLE_FFN", whole_ffn
    ):
        uses_oplib = use_oplib and register_library(options, device=device)
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
    if model_bytes is not None:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(model_path.parent))
    try:
        session = ort.InferenceSession(model_bytes or str(model_path), options, providers=providers)
    except Exception as error:  # ORT raises its own exception types for corrupt models
        raise PopcError(f"ONNX Runtime cannot load {model_path}: {str(error).splitlines()[0]}") from None
    if device == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
        # The provider is listed by onnxruntime-gpu even where no GPU or CUDA library exists.
        raise PopcError("the CUDA execution provider failed to start (no GPU, or CUDA/cuDNN libraries missing)")
    return session, uses_oplib


@contextlib.contextmanager
def _scoped_env(name: str, value: str | None) -> Iterator[None]:
    """``name=value`` in the environment for the block (nothing set when ``value`` is None)."""
    if value is None:
        yield
        return
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            del os.environ[name]
        else:
            os.environ[name] = previous


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
        # takes_padding: whether left-padded batches run (see _bias_free_graph).
        graph = _bias_free_graph(location.model_path) if _needs_bias_free_attention(device, config) else None
        self.takes_padding = graph is None
        self.session, self.uses_oplib = _make_session(
            location.model_path, device, use_oplib and has_popc_ops, threads, graph, config.get("dtype", "float32"),
            stop_spinning=bool(config.get("kv_eviction")),
        )
        graph_outputs = [o.name for o in self.session.get_outputs()]
        shapes = {v.name: v.shape for v in (*self.session.get_inputs(), *self.session.get_outputs())}
        inputs = {i.name: i.type for i in self.session.get_inputs()}
        check_interface(inputs, graph_outputs, config, location.model_path, shapes)
        self.tokenizer = load_tokenizer(location.directory)
        self.num_layers = int(config["num_layers"])
        # KV eviction (popc.kv_eviction): per-layer masks in, window queries out.
        self.kv_eviction = config.get("kv_eviction") or None
        # POP-prefill's deep layers under eviction: their prefill cache is an output of its own.
        self.prompt_layers: list[int] = list((self.kv_eviction or {}).get("prompt_layers") or [])
        self.last_kv_slots: list[int] | None = None  # per layer, after the last generate_ids' prompt
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
        kv_types = {i.type for i in self.state_inputs if i.name.startswith("past_key_values.")}
        self.kv_type = kv_types.pop() if len(kv_types) == 1 else "tensor(float)"
        self.logits_type = next(o.type for o in self.session.get_outputs() if o.name == "logits")
        # ORT's CUDA GroupQueryAttention is fp16/bf16 only: an fp32 fused graph runs it on the
        # CPU provider, copying the cache to and fro, so it gets no shared device buffers.
        self.shares_kv = self.fused_attention and (device == "cpu" or self.kv_type != "tensor(float)")
        if self.fused_attention and not self.shares_kv:
            import warnings

            warnings.warn(
                "this fp32 export uses ONNX Runtime's GroupQueryAttention, which has CUDA kernels for "
                "fp16/bf16 only: attention runs on the CPU. For CUDA, export with `popc export --dtype fp16` "
                "(or --no-fuse)",
                stacklevel=2,
            )
        # Small tensor operations (greedy pick, KV buffer fill and growth) on this device.
        self.device_ops = DeviceOps(device, self.session.get_providers())
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
        """Empty state for every ``past_*`` input: batch rows, zero-length dynamic dims. numpy
        has no bfloat16: a bf16 export's state lives in ONNX Runtime only (:meth:`bound`)."""
        state = []
        for meta in self.state_inputs:
            if meta.type not in NUMPY_TYPES:
                raise PopcError(
                    f"{self.location.directory} keeps its state as {meta.type}, which numpy (and so "
                    "PopcModel.step and popc eval) cannot hold: evaluate an fp16 or fp32 export; "
                    "generation (popc run, generate, bound()) runs it"
                )
            shape = [batch if i == 0 else (d if isinstance(d, int) else 0) for i, d in enumerate(meta.shape)]
            state.append(np.zeros(shape, NUMPY_TYPES[meta.type]))
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
        self.check_padding(attention_mask)
        batch, new = input_ids.shape
        extends = bool(state) and state[0].ndim == 4 and state[0].shape[2] > 0
        if self.fused_attention and batch > 1 and new > 1 and extends:
            rows = [
                self.step(input_ids[r : r + 1], attention_mask[r : r + 1], [s[r : r + 1] for s in state], pop, logits_to_keep)
                for r in range(batch)
            ]  # fmt: skip
            return np.concatenate([r[0] for r in rows]), [np.concatenate(parts) for parts in zip(*(r[1] for r in rows))]
        feed = {"input_ids": input_ids.astype(np.int64)} | self.mask_feed(attention_mask)
        feed |= {meta.name: value for meta, value in zip(self.state_inputs, state)}
        if self.has_pop_config:
            feed["pop_config"] = self.pop_counts(pop)
        if self.has_logits_to_keep:
            feed["logits_to_keep"] = np.array(logits_to_keep, np.int64)
        elif logits_to_keep:  # an export from before the input existed: slice here
            outputs = self.session.run(self.output_order, feed)
            return outputs[0][:, -logits_to_keep:], outputs[1:]
        outputs = run_prefill(self, feed) if not extends else self.session.run(self.output_order, feed)
        return outputs[0], outputs[1:]

    def mask_feed(self, attention_mask: np.ndarray) -> dict[str, np.ndarray]:
        """The mask inputs for ``attention_mask`` [B, T] (an eviction export's per-layer form,
        every layer's cache the same length: the full cache), or [B, L, T] (an eviction
        export's layers masked apart over a common length: popc serve's batch)."""
        mask = attention_mask.astype(np.int64)
        if not self.kv_eviction:
            return {"attention_mask": mask}
        if mask.ndim == 3:  # [B, L, T]: a mask per layer, every layer T slots long
            stacked = np.ascontiguousarray(mask.transpose(1, 0, 2))
        else:
            stacked = np.ascontiguousarray(np.broadcast_to(mask, (self.num_layers, *mask.shape)))
        return {LAYER_MASK: stacked, LAYER_LENGTHS: np.full(self.num_layers, mask.shape[-1], np.int64)}

    @functools.cached_property
    def attention_layers(self) -> list[LayerAttention]:
        """Each layer's attention as KV eviction scores it (read from the graph once)."""
        return read_layers(self.location.model_path)

    def bound(
        self, pop: PopSettings | None = None, capacity: int | None = None, kv: EvictionSettings | None = None
    ) -> BoundSteps:
        """A prefill-then-decode stepper whose state stays in ONNX Runtime (IOBinding).

        With fused attention the KV cache is one buffer per layer on the session's device,
        read and written in place; ``capacity`` (tokens, default: prompt + 256) sizes it,
        and it grows if outrun. An eviction export's stepper evicts after the prefill
        under ``kv`` (default: keep the full cache)."""
        if self.kv_eviction:
            return EvictingSteps(self, kv, pop, capacity)
        if kv is not None and kv.evicts:
            raise PopcError(
                f"{self.location.directory} was exported without KV eviction; re-export it with "
                "`popc export --kv-evict` to use --kv-budget"
            )
        return BoundSteps(self, pop, capacity)

    def check_padding(self, attention_mask: np.ndarray) -> None:
        """Refuse a left-padded batch where the graph runs without its padding mask (a fused
        fp16/bf16 export on CUDA: see ``_bias_free_graph``)."""
        if not self.takes_padding and not np.all(attention_mask):
            raise PopcError(
                "this fp16/bf16 export runs on CUDA without its padding mask (ONNX Runtime's CUDA "
                "GroupQueryAttention takes no attention_bias): give it prompts of equal length, one "
                "batch at a time, or run it with --device cpu"
            )

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
        kv: EvictionSettings | None = None,
    ) -> tuple[list[list[int]], float, float]:
        """Batched generation over left-padded prompts.

        Returns the new ids per prompt (stopping at EOS), prefill seconds and decode
        seconds per step. Greedy decoding picks the ids where the logits lie (on the GPU for
        CUDA) and copies only them to the host; sampling copies each step's logits to the
        host and draws there (:class:`SamplingOptions`).
        """
        sampling = sampling or SamplingOptions()
        if max_new_tokens < 1:
            raise PopcError("--max-new-tokens must be at least 1")
        if not prompts or any(len(p) == 0 for p in prompts):
            raise PopcError("the prompt is empty")
        if not self.takes_padding and len({len(p) for p in prompts}) > 1:
            # Unequal prompts would need left padding, which this graph cannot mask: one
            # prompt at a time (``on_tokens`` then sees each one's steps as a batch of one).
            runs = [self.generate_ids([p], max_new_tokens, sampling, on_tokens, pop, kv) for p in prompts]
            return [r[0][0] for r in runs], sum(r[1] for r in runs) / len(runs), sum(r[2] for r in runs) / len(runs)
        longest = max(len(p) for p in prompts)
        self.check_context(longest)
        max_new_tokens = min(max_new_tokens, self.max_positions - longest)
        batch = len(prompts)
        input_ids = np.full((batch, longest), self.pad_token_id, np.int64)
        attention_mask = np.zeros((batch, longest), np.int64)
        for row, ids in enumerate(prompts):
            input_ids[row, longest - len(ids) :] = ids
            attention_mask[row, longest - len(ids) :] = 1

        stepper = self.bound(pop, capacity=longest + max_new_tokens, kv=kv)
        started = time.perf_counter()
        greedy = sampling.temperature == 0
        logits = stepper.prefill(input_ids, attention_mask, logits=not greedy)
        prefill = time.perf_counter() - started
        self.last_kv_slots = stepper.kv_slots() if isinstance(stepper, EvictingSteps) else None

        generated: list[list[int]] = [[] for _ in range(batch)]
        finished = np.zeros(batch, bool)
        decode_started = time.perf_counter()
        steps = 0
        while True:
            next_ids = stepper.greedy() if greedy else sampling.pick(logits[:, -1, :])
            for row in range(batch):
                if not finished[row]:
                    generated[row].append(int(next_ids[row]))
                    finished[row] = int(next_ids[row]) in self.eos_token_ids
            if on_tokens is not None:
                on_tokens(next_ids)
            if finished.all() or steps + 1 >= max_new_tokens:
                break
            logits = stepper.decode(next_ids.reshape(batch, 1), copy=False, logits=not greedy)
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
        kv: EvictionSettings | None = None,
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

        (generated,), prefill, decode = self.generate_ids([prompt_ids], max_new_tokens, sampling, stream, pop, kv)
        kept = self.last_kv_slots
        return GenerationResult(
            prompt_ids=prompt_ids,
            generated_ids=generated,
            text=self.decode(generated),
            prefill_ms=prefill * 1000,
            decode_ms_per_token=decode * 1000,
            kv_kept=None if kept is None else sum(kept),
            kv_prompt=None if kept is None else len(prompt_ids) * len(kept),
        )


def _needs_bias_free_attention(device: str, config: dict[str, Any]) -> bool:
    """A fused half-precision export on CUDA: its GroupQueryAttention runs on the GPU, where
    ORT's kernel rejects any ``attention_bias`` input (onnxruntime's
    contrib_ops/cuda/bert/group_query_attention.cc)."""
    return device == "cuda" and bool(config.get("ort_fusions")) and config.get("dtype") in ("float16", "bfloat16")


def _bias_free_graph(model_path: Path) -> bytes | None:
    """The export's graph with GroupQueryAttention's ``attention_bias`` inputs dropped (None when
    none has one). popc's graph feeds that bias only to mask left padding (0 at every real
    token; ORT applies the causal mask itself), so without padding the graph computes the
    same; padded batches are refused (:meth:`PopcModel.check_padding`)."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    nodes = [n for n in model.graph.node if n.op_type == "GroupQueryAttention" and len(n.input) > 10 and n.input[10]]
    for node in nodes:
        node.input[10] = ""
    return model.SerializeToString() if nodes else None


def load(path: str | Path, device: str = "cpu", use_oplib: bool = True, threads: int | None = None) -> PopcModel:
    """Open an export (its directory or its ``.onnx`` file) for generation.

    ``use_oplib=False`` runs the ai.popc ops' ONNX function bodies even where the op
    library is present. ``threads`` sets ONNX Runtime's intra-op threads (default: its own
    choice, one per physical core).
    """
    location, config = read_export(path)
    return PopcModel(location, config, device, use_oplib, threads)
