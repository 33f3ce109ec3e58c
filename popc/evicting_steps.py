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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from popc import kv_eviction
from popc.errors import PopcError
from popc.kv_eviction import Compaction, EvictionSettings, layer_mask_inputs
from popc.pop import PopSettings
from popc.steps import KV_PREFIX, BoundSteps

if TYPE_CHECKING:
    from popc.runtime import PopcModel


def run_prefill(model: PopcModel, feed: dict[str, np.ndarray], extra: Sequence[str] = ()) -> list[np.ndarray]:
    """``session.run`` of a prefill: the values of ``model.output_order`` then ``extra``'s. An
    export with POP-prefill's deep layers (``kv_eviction.prompt_layers``) returns their prefill
    cache apart (``prompt_present.*``: the skipped tokens' independent K/V, then the window's);
    it stands in for their ``present.*``, which holds the decode path's."""
    prompts = {
        f"present.{i}.{kind}": kv_eviction.prompt_present_name(i, kind) for i in model.prompt_layers for kind in ("key", "value")
    }
    names = [prompts.get(name, name) for name in model.output_order]
    return model.session.run(names + list(extra), feed)


@dataclass
class PromptState:
    """What the prompt's full-cache run left: its last logits, the graph's state outputs
    (every layer's full cache, POP's partitions), the window queries and the mask."""

    logits: np.ndarray
    state: list[np.ndarray]
    queries: list[np.ndarray]
    attention_mask: np.ndarray
    seconds: float


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
        self.prompt: PromptState | None = None

    # ---- masks

    def _bind_masks(self, binding: Any) -> None:
        stacked, lengths = layer_mask_inputs(self.masks)
        binding.bind_ortvalue_input(kv_eviction.LAYER_MASK, self.ops.host(stacked))
        binding.bind_ortvalue_input(kv_eviction.LAYER_LENGTHS, self.ops.host(lengths))

    # ---- prefill and eviction

    def prefill(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, logits: bool = True, logits_to_keep: int = 1
    ) -> np.ndarray | None:
        """The prompt's last logits, as :meth:`BoundSteps.prefill`, then the eviction."""
        self.run_prompt(input_ids, attention_mask, logits_to_keep)
        self.apply(self.settings)
        return self.prompt.logits if logits else None

    def run_prompt(self, input_ids: np.ndarray, attention_mask: np.ndarray, logits_to_keep: int = 1) -> None:
        """Run the prompt with the full cache and keep what it leaves (:attr:`prompt`), so that
        :meth:`apply` can evict from it under one setting after another."""
        model = self.model
        attention_mask = np.ascontiguousarray(attention_mask, np.int64)
        batch, length = input_ids.shape
        layers = model.num_layers
        started = time.perf_counter()
        feed = {"input_ids": np.asarray(input_ids, np.int64)} | model.mask_feed(attention_mask)
        feed |= {meta.name: value for meta, value in zip(model.state_inputs, model.initial_state(batch))}
        if self.pop_config is not None:
            feed["pop_config"] = self.pop_config
        if model.has_logits_to_keep:
            feed["logits_to_keep"] = np.array(logits_to_keep, np.int64)
        windows = [kv_eviction.window_query_name(i) for i in range(layers)]
        outputs = run_prefill(model, feed, windows)
        count = len(model.output_order)
        self.prompt = PromptState(outputs[0], outputs[1:count], outputs[count:], attention_mask,
                                  time.perf_counter() - started)  # fmt: skip

    def apply(self, settings: EvictionSettings) -> Compaction:
        """Evict from the prompt's full cache under ``settings``; decoding starts afresh from
        the prompt's last logits."""
        model, prompt = self.model, self.prompt
        if prompt is None:
            raise PopcError("apply() before run_prompt()")
        layers = model.num_layers
        kv = {meta.name: value for meta, value in zip(model.state_inputs, prompt.state)}
        keys = [kv[f"{KV_PREFIX}{i}.key"] for i in range(layers)]
        values = [kv[f"{KV_PREFIX}{i}.value"] for i in range(layers)]
        self.settings = settings
        room = self.GROWTH if self.capacity is None else max(self.capacity - prompt.attention_mask.shape[1], 1)
        self.compaction = kv_eviction.evict(
            model.attention_layers, keys, values, prompt.queries, prompt.attention_mask, settings, room
        )
        self.masks = list(self.compaction.masks)
        self.kv_buffers = {}
        for index in range(layers):
            for kind, buffer in (("key", self.compaction.keys[index]), ("value", self.compaction.values[index])):
                self.kv_buffers[f"{KV_PREFIX}{index}.{kind}"] = self.ort.OrtValue.ortvalue_from_numpy(
                    buffer, self.device_type, 0
                )
        self.state = [
            self.kv_buffers[meta.name] if meta.name in self.kv_buffers else self.ops.host(np.array(value))
            for meta, value in zip(model.state_inputs, prompt.state)
        ]
        self._decode_binding = None
        self.logits = self.ops.host(np.ascontiguousarray(prompt.logits))
        return self.compaction

    # ---- decode

    def decode(self, next_ids: np.ndarray, copy: bool = True, logits: bool = True) -> np.ndarray | None:
        if self.state is None:
            raise PopcError("decode() before prefill()")
        batch = self.masks[0].shape[0]
        if next_ids.shape != (batch, 1):
            raise PopcError(f"decode() takes one token per row, [batch, 1]; got {list(next_ids.shape)}")
        ones = np.ones((batch, 1), np.int64)
        self.masks = [np.concatenate([mask, ones], axis=1) for mask in self.masks]
        self._grow_to_masks()
        return self._decode_step(next_ids, copy, logits)

    def extend(self, input_ids: np.ndarray) -> np.ndarray:
        """Logits [1, S, vocab] of ``input_ids`` [1, S] appended in one call (batch 1: ORT's
        GroupQueryAttention takes several new tokens over a cache one row at a time)."""
        if self.state is None:
            raise PopcError("extend() before prefill()")
        if input_ids.ndim != 2 or input_ids.shape[0] != 1 or self.masks[0].shape[0] != 1:
            raise PopcError("extend() takes one row of tokens [1, S] over a batch of one")
        ones = np.ones((1, input_ids.shape[1]), np.int64)
        self.masks = [np.concatenate([mask, ones], axis=1) for mask in self.masks]
        self._grow_to_masks()
        return self._run(input_ids, self.state, logits=True, keep=0)

    def _grow_to_masks(self) -> None:
        """Grow any layer's buffer that the masks outrun (by at least GROWTH slots)."""
        for index, mask in enumerate(self.masks):
            for kind in ("key", "value"):
                name = f"{KV_PREFIX}{index}.{kind}"
                buffer = self.kv_buffers[name]
                slots = buffer.shape()[2]
                if mask.shape[1] > slots:
                    self.kv_buffers[name] = self.ops.grow(buffer, max(slots + self.GROWTH, mask.shape[1]))
                    self._decode_binding = None

    # ---- what it holds

    def kv_slots(self) -> list[int]:
        """Slots in use per layer (past tokens, after eviction)."""
        return [int(mask.shape[1]) for mask in self.masks]
