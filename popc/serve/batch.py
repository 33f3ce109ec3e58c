"""The running batch of a server: sequences join after their own prefill and leave when
they finish, without re-prefilling anyone.

Every decode step runs the batch's rows as one left-padded batch (as ``generate_ids``
does for a fixed batch). A joining sequence is prefilled alone, then its KV cache and POP
partitions are spliced in as a new row, right-aligned to the batch's current length; a
leaving row is dropped, and when every remaining row starts with padding the common
padding is cut away.

Moving a row along the cache changes its slot indices. Unfused exports number positions
by real tokens (the attention mask's cumulative sum), so nothing else changes. Fused
exports rotate keys by slot index (GroupQueryAttention's rotary), so a row moved by ``d``
slots has its cached keys rotated by ``d`` more: ``R(a + d) k = R(d) R(a) k``, the
rotation read off the graph's own cos/sin tables, so attention sees the same relative
positions as before the move.

Since joins right-align and leaves cut, the batch is exactly as long as its longest
sequence, so a slot index never outgrows the rotary tables (the engine admits no
sequence whose prompt plus ``max_tokens`` exceeds the context).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from popc.pop import PopSettings
from popc.runtime import BoundSteps, PopcModel

KV_PREFIX = "past_key_values."


@dataclass
class RowState:
    """One sequence's state as numpy: its real tokens' KV (no padding) and the rest."""

    length: int  # real tokens in the cache
    kv: dict[str, np.ndarray]  # past name -> [1, heads, length, head_dim]
    other: dict[str, np.ndarray]  # past name -> [1, ...] (POP partitions)


class KeyRotation:
    """Re-rotates cached keys of a fused export by a slot offset (per layer: its tables)."""

    def __init__(self, model_path: Path):
        import onnx
        from onnx import numpy_helper

        graph = onnx.load(str(model_path), load_external_data=False).graph
        initializers = {t.name: t for t in graph.initializer}
        base = str(model_path.parent)
        tables: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.by_past_key: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for node in graph.node:
            if node.op_type != "GroupQueryAttention" or len(node.input) < 9:
                continue
            interleaved = any(a.name == "rotary_interleaved" and a.i for a in node.attribute)
            if interleaved:  # popc's exports use the half layout; refuse rather than rotate wrongly
                raise ValueError("a GroupQueryAttention with interleaved rotary: popc serve cannot move its cache")
            cos_name, sin_name = node.input[7], node.input[8]
            if cos_name not in tables:
                cos = numpy_helper.to_array(initializers[cos_name], base).astype(np.float64)
                sin = numpy_helper.to_array(initializers[sin_name], base).astype(np.float64)
                # Row 0 holds cos(0) * scale = scale: divide it out, leaving the pure rotation.
                tables[cos_name] = (cos / cos[0], sin / cos[0])
            self.by_past_key[node.input[3]] = tables[cos_name]

    def rotate(self, name: str, keys: np.ndarray, offset: int) -> np.ndarray:
        """``keys`` [rows, heads, slots, head_dim] rotated by ``offset`` more slots."""
        if offset == 0 or name not in self.by_past_key:
            return keys
        cos_table, sin_table = self.by_past_key[name]
        half = cos_table.shape[1]
        cos = cos_table[abs(offset)].astype(np.float32)
        sin = sin_table[abs(offset)].astype(np.float32) * (1 if offset > 0 else -1)
        first, second = keys[..., :half], keys[..., half : 2 * half]
        rotated = keys.copy()
        rotated[..., :half] = first * cos - second * sin
        rotated[..., half : 2 * half] = second * cos + first * sin
        return rotated


class RunningBatch(BoundSteps):
    """A :class:`BoundSteps` whose rows come and go between decode steps."""

    def __init__(self, model: PopcModel, pop: PopSettings | None = None, headroom: int = 64):
        super().__init__(model, pop)
        self.pop = pop
        self.headroom = headroom
        self.rows = 0
        self.rotation = KeyRotation(model.location.model_path) if self.shared_cache else None

    @property
    def shared_cache(self) -> bool:
        return bool(self.model.fused_attention) and self.device_type == "cpu"

    @property
    def length(self) -> int:
        return 0 if self.attention_mask is None else int(self.attention_mask.shape[1])

    # ---- a sequence's own prefill --------------------------------------------------------
    def prefill_row(self, prompt_ids: list[int]) -> tuple[np.ndarray, RowState]:
        """Prefill one prompt alone: its last position's logits [vocab] and its state."""
        single = BoundSteps(self.model, self.pop, capacity=len(prompt_ids))
        ids = np.asarray([prompt_ids], np.int64)
        logits = single.prefill(ids, np.ones_like(ids))
        length = len(prompt_ids)
        kv, other = {}, {}
        for meta, value in zip(self.model.state_inputs, single.state):
            if meta.name in single.kv_buffers:
                kv[meta.name] = single.kv_buffers[meta.name].numpy()[:, :, :length].copy()
            elif meta.name.startswith(KV_PREFIX):
                kv[meta.name] = value.numpy()
            else:
                other[meta.name] = value.numpy()
        return logits[0, -1], RowState(length, kv, other)

    # ---- membership ------------------------------------------------------------------------
    def _current(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """The batch's KV ([rows, heads, length, dim], padding included) and other state."""
        kv, other = {}, {}
        for meta, value in zip(self.model.state_inputs, self.state or []):
            if meta.name in self.kv_buffers:  # a CPU OrtValue's numpy() shares its memory
                kv[meta.name] = self.kv_buffers[meta.name].numpy()[:, :, : self.length]
            elif meta.name.startswith(KV_PREFIX):
                kv[meta.name] = value.numpy()
            else:
                other[meta.name] = value.numpy()
        return kv, other

    def _shift(self, name: str, keys_or_values: np.ndarray, offset: int) -> np.ndarray:
        if self.rotation is None or not name.endswith(".key"):
            return keys_or_values
        return self.rotation.rotate(name, keys_or_values, offset)

    def _install(self, mask: np.ndarray, kv: dict[str, np.ndarray], other: dict[str, np.ndarray]) -> None:
        """Make (mask, kv, other) the batch's state; fused exports get fresh shared buffers."""
        value = self.ort.OrtValue.ortvalue_from_numpy
        self.rows, length = mask.shape
        self.attention_mask = np.ascontiguousarray(mask, np.int64)
        self.kv_buffers = {}
        self._decode_binding = None
        if self.shared_cache:
            self.slots = length + self.headroom
            for name, array in kv.items():
                buffer = np.zeros((self.rows, array.shape[1], self.slots, array.shape[3]), np.float32)
                buffer[:, :, :length] = array
                self.kv_buffers[name] = value(buffer)  # shares the numpy memory
        state = []
        for meta in self.model.state_inputs:
            if meta.name in self.kv_buffers:
                state.append(self.kv_buffers[meta.name])
            else:
                array = kv[meta.name] if meta.name in kv else other[meta.name]
                state.append(value(np.ascontiguousarray(array)))
        self.state = state

    def join(self, row: RowState) -> int:
        """Add a prefilled sequence as the last row; returns its row index."""
        if self.rows == 0:
            mask = np.ones((1, row.length), np.int64)
            self._install(mask, row.kv, row.other)
            return 0
        kv, other = self._current()
        length = max(self.length, row.length)
        grow, place = length - self.length, length - row.length
        mask = np.zeros((self.rows + 1, length), np.int64)
        mask[:-1, grow:] = self.attention_mask
        mask[-1, place:] = 1
        joined_kv = {}
        for name, array in kv.items():
            rows, heads, _, dim = array.shape
            out = np.zeros((rows + 1, heads, length, dim), np.float32)
            out[:-1, :, grow:] = self._shift(name, array, grow)
            out[-1:, :, place:] = self._shift(name, row.kv[name], place)
            joined_kv[name] = out
        joined_other = {name: np.concatenate([array, row.other[name]]) for name, array in other.items()}
        self._install(mask, joined_kv, joined_other)
        return self.rows - 1

    def leave(self, rows: list[int]) -> None:
        """Drop ``rows``; cut the padding every remaining row starts with."""
        keep = [r for r in range(self.rows) if r not in set(rows)]
        if not keep:
            self.rows, self.attention_mask, self.state = 0, None, None
            self.kv_buffers, self._decode_binding = {}, None
            return
        kv, other = self._current()
        mask = self.attention_mask[keep]
        cut = int(np.argmax(mask.any(axis=0)))  # leading columns that are padding in every row
        kv = {name: self._shift(name, array[keep][:, :, cut:], -cut) for name, array in kv.items()}
        other = {name: array[keep] for name, array in other.items()}
        self._install(mask[:, cut:], kv, other)
