"""Prefill-then-decode steps whose state never leaves ONNX Runtime: :class:`BoundSteps`.

The same code runs a CPU and a CUDA session: every value lives where the session's
provider puts it (``device_type``), and what must change there (a fresh or grown KV
buffer, the greedy token choice) is done by :class:`popc.device_ops.DeviceOps` on that
device. Per step only the new token ids, the attention mask and ``pop_config`` (tiny
host inputs) go in, and, for greedy decoding, only the [batch] chosen ids come out.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from popc.artifact import present_name
from popc.errors import PopcError
from popc.pop import PopSettings

if TYPE_CHECKING:
    from popc.runtime import PopcModel

KV_PREFIX = "past_key_values."


class BoundSteps:
    """One prefill, then one-token decode steps, with the graph's state kept as ONNX Runtime
    values (IOBinding): each step's ``present*`` outputs are bound as the next step's
    ``past*`` inputs, so the KV cache and the POP partitions never pass through numpy, and
    the logits stay where the session computed them until asked for (:meth:`greedy` picks
    the next ids there; ``logits=True`` copies them to the host).

    Fused exports go further (``model.shares_kv``): each layer's keys and values live in
    one ``capacity``-slot buffer on the session's device, bound as both ``past`` input and
    ``present`` output, which GroupQueryAttention then updates in place (its shared-buffer
    mode, as onnxruntime-genai runs it): a step writes the new token's slot instead of
    copying the whole cache. Outrun, the buffers grow by :attr:`GROWTH` slots, copied on
    the device."""

    GROWTH = 256  # slots added beyond the prompt when no capacity is given, and per growth

    def __init__(self, model: PopcModel, pop: PopSettings | None = None, capacity: int | None = None):
        import onnxruntime as ort

        self.model = model
        self.capacity = capacity
        self.kv_buffers: dict[str, Any] = {}  # past name -> shared OrtValue (fused exports)
        self.slots = 0
        self.session = model.session
        self.ort = ort
        self.ops = model.device_ops
        self.device_type = model.device
        self.pop_config = model.pop_counts(pop) if model.has_pop_config else None
        self.state: list[Any] | None = None
        self.attention_mask: np.ndarray | None = None
        self.logits: Any = None  # the last step's logits, an OrtValue on the session's device
        # The decode steps' binding, made once per cache: only input_ids, the growing
        # attention_mask and any non-shared state are rebound per step.
        self._decode_binding: Any = None
        self._logits: Any = None

    def initial_state(self, batch: int) -> list[Any]:
        """Empty state for every ``past_*`` input as OrtValues of its element type (bfloat16
        included): batch rows, zero-length dynamic dims. Zero-size values are made on the host
        (nothing to copy), any other on the device."""
        state = []
        for meta in self.model.state_inputs:
            shape = [batch if i == 0 else (d if isinstance(d, int) else 0) for i, d in enumerate(meta.shape)]
            empty = 0 in shape
            state.append(self.ops.empty(shape, meta.type, on_host=True) if empty else self.ops.zeros(shape, meta.type))
        return state

    def _bind_masks(self, binding: Any) -> None:
        """The mask inputs of a step: ``attention_mask``, or an eviction export's per-layer
        form of it, every layer as long (the full cache; popc.evicting_steps evicts)."""
        for name, value in self.model.mask_feed(self.attention_mask).items():
            binding.bind_ortvalue_input(name, self.ops.host(value))

    def _run(self, input_ids: np.ndarray, state: list[Any], logits: bool = True, keep: int = 0) -> np.ndarray | None:
        binding = self.session.io_binding()
        host = self.ops.host
        binding.bind_ortvalue_input("input_ids", host(np.asarray(input_ids, np.int64)))
        self._bind_masks(binding)
        if self.model.has_logits_to_keep:
            binding.bind_ortvalue_input("logits_to_keep", host(np.array(keep, np.int64)))
        for meta, item in zip(self.model.state_inputs, state):
            shared = self.kv_buffers.get(meta.name)
            if shared is not None:
                binding.bind_ortvalue_input(meta.name, shared)
                continue
            binding.bind_ortvalue_input(meta.name, item if isinstance(item, self.ort.OrtValue) else host(item))
        if self.pop_config is not None:
            binding.bind_ortvalue_input("pop_config", host(self.pop_config))  # a CPU input of the kernels
        shared_outputs = {present_name(name): buffer for name, buffer in self.kv_buffers.items()}
        for name in self.model.output_order:  # get_outputs() keeps this order
            if name in shared_outputs:
                binding.bind_ortvalue_output(name, shared_outputs[name])
            else:
                binding.bind_output(name, self.device_type)
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        self.logits = outputs[0]
        self.state = list(outputs[1:])
        return self.logits.numpy() if logits else None

    def prefill(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, logits: bool = True, logits_to_keep: int = 1
    ) -> np.ndarray | None:
        """Logits [batch, logits_to_keep, vocab] of the prompt's last positions (every
        position's with 0; None with ``logits=False``: they stay on the device, for
        :meth:`greedy`); starts a new state. The default 1 runs the LM head on the last
        token only."""
        self.model.check_padding(attention_mask)
        if self.model.prompt_layers:
            raise PopcError(
                f"{self.model.location.directory} skips layers at prefill (POP-prefill) under KV eviction: "
                "its prefill cache comes apart from its decode cache; prefill it with model.bound()"
            )
        self.attention_mask = np.ascontiguousarray(attention_mask, np.int64)
        batch, length = input_ids.shape
        self.kv_buffers = {}
        self._decode_binding = None
        if self.model.shares_kv:
            self._allocate(batch, length + self.GROWTH if self.capacity is None else max(self.capacity, length))
        return self._run(input_ids, self.initial_state(batch), logits, logits_to_keep)

    def _allocate(self, batch: int, slots: int, keep: int = 0) -> None:
        """(Re)allocate the shared KV buffers with ``slots`` slots on the device, zero-filled;
        ``keep`` > 0 keeps the buffers' first ``keep`` slots (all they hold), copied on the
        device."""
        for meta in self.model.state_inputs:
            if not meta.name.startswith(KV_PREFIX):
                continue
            if keep:
                old = self.kv_buffers[meta.name]
                if old.shape()[2] != keep:
                    raise ValueError(f"_allocate keeps every slot of the buffer ({old.shape()[2]}), not {keep}")
                self.kv_buffers[meta.name] = self.ops.grow(old, slots)
            else:
                shape = [batch, self.model.num_kv_heads, slots, self.model.head_dim]
                self.kv_buffers[meta.name] = self.ops.zeros(shape, meta.type)
        self.slots = slots
        self._decode_binding = None

    def _decode_step(self, next_ids: np.ndarray, copy: bool, logits: bool = True) -> np.ndarray | None:
        """One decode step on the persistent binding (built at the first step after a
        prefill or a buffer growth)."""
        batch = next_ids.shape[0]
        host = self.ops.host
        if self._decode_binding is None:
            binding = self.session.io_binding()
            if self.model.has_logits_to_keep:
                binding.bind_ortvalue_input("logits_to_keep", host(np.array(1, np.int64)))
            if self.pop_config is not None:
                binding.bind_ortvalue_input("pop_config", host(self.pop_config))
            for name, buffer in self.kv_buffers.items():
                binding.bind_ortvalue_input(name, buffer)
            vocab = int(self.model.config.get("vocab_size") or 0)
            self._logits = self.ops.empty([batch, 1, vocab], self.model.logits_type)
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
        # Bound afresh each step, never updated in place: IOBinding copies a host value bound
        # to a GPU session's input when it is bound, so an in-place update would go unseen.
        binding.bind_ortvalue_input("input_ids", host(np.asarray(next_ids, np.int64)))
        self._bind_masks(binding)
        for meta, item in zip(self.model.state_inputs, self.state):
            if meta.name not in self.kv_buffers:
                binding.bind_ortvalue_input(meta.name, item)
                binding.bind_output(present_name(meta.name), self.device_type)
        self.session.run_with_iobinding(binding)
        if len(self.kv_buffers) < len(self.state):  # else every state value is a shared buffer
            self.state = list(binding.get_outputs()[1:])
        self.logits = self._logits
        if not logits:
            return None
        # On the CPU a view of the buffer the next step overwrites; from a GPU, a copy.
        values = self._logits.numpy()
        return np.array(values) if copy else values

    def decode(self, next_ids: np.ndarray, copy: bool = True, logits: bool = True) -> np.ndarray | None:
        """Logits [batch, 1, vocab] after appending ``next_ids`` [batch, 1]. ``copy=False``
        returns a view of the output buffer, valid until the next ``decode`` (saves copying
        batch x vocab floats per step when the caller picks the token at once);
        ``logits=False`` returns None and leaves them on the device (see :meth:`greedy`)."""
        if self.state is None:
            raise PopcError("decode() before prefill()")
        # [batch, slots], or an eviction export's per-layer [batch, layers, slots] (popc serve).
        ones = np.ones((*self.attention_mask.shape[:-1], 1), np.int64)
        self.attention_mask = np.concatenate([self.attention_mask, ones], axis=-1)
        if self.kv_buffers and self.attention_mask.shape[-1] > self.slots:
            self._allocate(self.attention_mask.shape[0], self.slots + self.GROWTH, keep=self.slots)
        if next_ids.shape != (self.attention_mask.shape[0], 1):
            raise PopcError(f"decode() takes one token per row, [batch, 1]; got {list(next_ids.shape)}")
        return self._decode_step(next_ids, copy, logits)

    def greedy(self) -> np.ndarray:
        """The greedy next ids, int64 [batch]: the argmax of the last step's last-position
        logits, computed on the session's device (only the ids are copied to the host)."""
        if self.logits is None:
            raise PopcError("greedy() before prefill()")
        return self.ops.greedy(self.logits)
