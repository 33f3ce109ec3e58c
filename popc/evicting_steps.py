"""Prefill, evict, then decode over per-layer caches: :class:`EvictingSteps`.

For exports made with ``popc export --kv-evict`` (popc.kv_eviction). The prefill runs
once with every output, the window queries included; the caches are compacted on the
host under the session's :class:`~popc.kv_eviction.EvictionSettings`; then each layer's
compacted cache goes into a shared buffer of its own length plus room for the new
tokens, which GroupQueryAttention updates in place as :class:`popc.steps.BoundSteps`
runs a plain export. The full cache (budget 1) runs this same path, so a comparison of
budgets compares eviction alone.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np

from popc import kv_eviction
from popc.errors import PopcError
from popc.kv_eviction import Compaction, EvictionSettings, layer_mask_inputs
from popc.pop import PopSettings
from popc.steps import KV_PREFIX, BoundSteps

if TYPE_CHECKING:
    from popc.runtime import PopcModel


class EvictingSteps(BoundSteps):
    """:class:`BoundSteps` whose prefill is followed by KV eviction."""

    def __init__(
        self,
        model: PopcModel,
        settings: EvictionSettings | None = None,
        pop: PopSettings | None = None,
        capacity: int | None = None,
    ):
        super().__init__(model, pop, capacity)
        if not model.kv_eviction:
            raise PopcError(
                f"{model.location.directory} was exported without KV eviction; re-export it with "
                "`popc export --kv-evict` to use --kv-budget"
            )
        if not model.shares_kv:
            raise PopcError("KV eviction runs the fused graph's shared KV buffers: run it with --device cpu")
        self.settings = settings or EvictionSettings(method="full")
        self.masks: list[np.ndarray] = []
        self.compaction: Compaction | None = None
        self.prefill_seconds = 0.0

    # ---- masks

    def _bind_masks(self, binding: Any) -> None:
        stacked, lengths = layer_mask_inputs(self.masks)
        binding.bind_ortvalue_input(kv_eviction.LAYER_MASK, self.ops.host(stacked))
        binding.bind_ortvalue_input(kv_eviction.LAYER_LENGTHS, self.ops.host(lengths))

    # ---- prefill and eviction

    def prefill(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, logits: bool = True, logits_to_keep: int = 1
    ) -> np.ndarray | None:
        model = self.model
        attention_mask = np.ascontiguousarray(attention_mask, np.int64)
        batch, length = input_ids.shape
        layers = model.num_layers
        started = time.perf_counter()
        feed = {
            "input_ids": np.asarray(input_ids, np.int64),
            kv_eviction.LAYER_MASK: np.ascontiguousarray(np.broadcast_to(attention_mask, (layers, batch, length))),
            kv_eviction.LAYER_LENGTHS: np.full(layers, length, np.int64),
        }
        feed |= {meta.name: value for meta, value in zip(model.state_inputs, model.initial_state(batch))}
        if self.pop_config is not None:
            feed["pop_config"] = self.pop_config
        if model.has_logits_to_keep:
            feed["logits_to_keep"] = np.array(logits_to_keep, np.int64)
        windows = [kv_eviction.window_query_name(i) for i in range(layers)]
        outputs = model.session.run(model.output_order + windows, feed)
        self.prefill_seconds = time.perf_counter() - started
        first_logits, state, queries = outputs[0], outputs[1 : len(model.output_order)], outputs[len(model.output_order) :]

        kv = {meta.name: value for meta, value in zip(model.state_inputs, state) if meta.name.startswith(KV_PREFIX)}
        keys = [kv[f"{KV_PREFIX}{i}.key"] for i in range(layers)]
        values = [kv[f"{KV_PREFIX}{i}.value"] for i in range(layers)]
        self.compaction = kv_eviction.evict(model.attention_layers, keys, values, queries, attention_mask, self.settings)
        self.masks = list(self.compaction.masks)

        room = self.GROWTH if self.capacity is None else max(self.capacity - length, 1)
        self.kv_buffers = {}
        for index in range(layers):
            for kind, compacted in (("key", self.compaction.keys[index]), ("value", self.compaction.values[index])):
                used = compacted.shape[2]
                buffer = np.zeros(compacted.shape[:2] + (used + room,) + compacted.shape[3:], compacted.dtype)
                buffer[:, :, :used] = compacted
                self.kv_buffers[f"{KV_PREFIX}{index}.{kind}"] = self.ort.OrtValue.ortvalue_from_numpy(
                    buffer, self.device_type, 0
                )
        self.state = [
            self.kv_buffers[meta.name] if meta.name in self.kv_buffers else self.ops.host(np.ascontiguousarray(value))
            for meta, value in zip(model.state_inputs, state)
        ]
        self._decode_binding = None
        self.logits = self.ops.host(np.ascontiguousarray(first_logits))
        return first_logits if logits else None

    # ---- decode

    def decode(self, next_ids: np.ndarray, copy: bool = True, logits: bool = True) -> np.ndarray | None:
        if self.state is None:
            raise PopcError("decode() before prefill()")
        batch = self.masks[0].shape[0]
        if next_ids.shape != (batch, 1):
            raise PopcError(f"decode() takes one token per row, [batch, 1]; got {list(next_ids.shape)}")
        ones = np.ones((batch, 1), np.int64)
        self.masks = [np.concatenate([mask, ones], axis=1) for mask in self.masks]
        for index, mask in enumerate(self.masks):
            for kind in ("key", "value"):
                name = f"{KV_PREFIX}{index}.{kind}"
                buffer = self.kv_buffers[name]
                if mask.shape[1] > buffer.shape()[2]:
                    self.kv_buffers[name] = self.ops.grow(buffer, buffer.shape()[2] + self.GROWTH)
                    self._decode_binding = None
        return self._decode_step(next_ids, copy, logits)

    # ---- what it holds

    def kv_slots(self) -> list[int]:
        """Slots in use per layer (past tokens, after eviction)."""
        return [int(mask.shape[1]) for mask in self.masks]
