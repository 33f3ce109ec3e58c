"""The running batch of a server: sequences join after their own prefill and leave when
they finish, without re-prefilling anyone.

Every decode step runs the batch's rows as one left-padded batch (as ``generate_ids``
does for a fixed batch). A joining sequence is prefilled apart from the batch (with
whoever joins with it), then its KV cache and POP partitions are spliced in as a new row,
right-aligned to the batch's current length; a leaving row's place is taken by the last
row, and once every remaining row starts with enough padding, the common padding is cut
away.

Fused exports keep each layer's keys and values in one buffer of ``max_rows`` rows whose
first rows are bound as the graph's in-place cache (a numpy view shared with ONNX
Runtime), so a join writes one row and a leave moves at most as many rows as left.

Moving a row along the cache changes its slot indices. Unfused exports number positions
by real tokens (the attention mask's cumulative sum), so nothing else changes. Fused
exports rotate keys by slot index (GroupQueryAttention's rotary), so a row moved by ``d``
slots has its cached keys rotated by ``d`` more: ``R(a + d) k = R(d) R(a) k``, the
rotation read off the graph's own cos/sin tables, so attention sees the same relative
positions as before the move.

Joins right-align, so the batch is as long as its longest sequence plus the padding not
yet cut; a step that would pass the rotary tables' end cuts first (the engine admits no
sequence whose prompt plus ``max_tokens`` exceeds the context).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from popc.errors import PopcError
from popc.evicting_steps import EvictingSteps
from popc.kv_eviction import EvictionSettings
from popc.pop import PopSettings
from popc.rotary import rotate_keys
from popc.runtime import BoundSteps, PopcModel

KV_PREFIX = "past_key_values."


@dataclass
class RowState:
    """One sequence's state as numpy: its real tokens' KV (no padding) and the rest. After KV
    eviction every layer holds a length of its own (its array's axis 2)."""

    length: int  # real tokens in the longest layer's cache
    kv: dict[str, np.ndarray]  # past name -> [1, heads, tokens, head_dim]
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
        cos = cos_table[abs(offset)].astype(np.float32)
        sin = sin_table[abs(offset)].astype(np.float32) * (1 if offset > 0 else -1)
        return rotate_keys(keys, cos, sin)


class RunningBatch(BoundSteps):
    """A :class:`BoundSteps` whose rows come and go between decode steps."""

    def __init__(
        self,
        model: PopcModel,
        pop: PopSettings | None = None,
        max_rows: int = 8,
        headroom: int = 64,
        kv: EvictionSettings | None = None,
    ):
        super().__init__(model, pop)
        self.pop = pop
        # KV eviction after each sequence's prefill (an export made with --kv-evict): the
        # batch then masks every layer apart, [rows, layers, slots], over one slot count.
        self.kv = kv
        self.per_layer = bool(model.kv_eviction)
        if kv is not None and kv.evicts and not self.per_layer:
            raise PopcError(
                f"{model.location.directory} was exported without KV eviction; re-export it with "
                "`popc export --kv-evict` to serve it with --kv-budget"
            )
        self.max_rows = max_rows
        self.headroom = headroom
        self.rows = 0
        self.slots = 0
        # Fused exports: past key/value name -> [max_rows, heads, slots, dim]; rows [:self.rows]
        # are bound as the in-place cache. Every other state value is held as ONNX Runtime's.
        self.store: dict[str, np.ndarray] = {}
        self.rotation = KeyRotation(model.location.model_path) if self.shared_cache else None

    @property
    def shared_cache(self) -> bool:
        return bool(self.model.fused_attention) and self.device_type == "cpu"

    @property
    def length(self) -> int:
        return 0 if self.attention_mask is None else int(self.attention_mask.shape[-1])

    # ---- a sequence's own prefill --------------------------------------------------------
    def prefill_rows(
        self, prompts: list[list[int]], kv: EvictionSettings | None = None
    ) -> list[tuple[np.ndarray, RowState]]:
        """Prefill prompts together (left-padded, one graph call), apart from the batch: each
        one's last position's logits [vocab] and its state, as if it had run alone; evicted
        under ``kv`` (None: the batch's own setting)."""
        kv = self.kv if kv is None else kv
        if kv is not None and kv.evicts and not self.per_layer:
            raise PopcError(f"{self.model.location.directory} was exported without KV eviction")
        longest = max(len(p) for p in prompts)
        ids = np.full((len(prompts), longest), self.model.pad_token_id, np.int64)
        mask = np.zeros_like(ids)
        for row, prompt in enumerate(prompts):
            ids[row, longest - len(prompt) :] = prompt
            mask[row, longest - len(prompt) :] = 1
        # POP-prefill's deep layers under eviction: their prefill cache is EvictingSteps' to gather.
        if (kv is not None and kv.evicts) or self.model.prompt_layers:
            together: BoundSteps = EvictingSteps(self.model, kv, self.pop, capacity=longest + 1)
        else:
            together = BoundSteps(self.model, self.pop, capacity=longest)
        logits = together.prefill(ids, mask)
        # Copies throughout: an OrtValue's numpy() is a view of memory freed with it.
        values = {meta.name: np.array(value.numpy()) for meta, value in zip(self.model.state_inputs, together.state)}
        rows = []
        for row, prompt in enumerate(prompts):
            kv, other = {}, {}
            for name, array in values.items():
                if name.startswith(KV_PREFIX):
                    used, padding = self._used_slots(together, name, row, longest - len(prompt))
                    # Its tokens start at slot `padding`: as a row of its own they start at 0.
                    kv[name] = self._shift(name, array[row : row + 1, :, padding:used], -padding)
                else:
                    other[name] = array[row : row + 1]
            rows.append((logits[row, -1], RowState(max(v.shape[2] for v in kv.values()), kv, other)))
        return rows

    @staticmethod
    def _used_slots(together: BoundSteps, name: str, row: int, padding: int) -> tuple[int, int]:
        """Where a prefilled row's tokens lie in the layer's cache ``name``: (end, start)."""
        if not isinstance(together, EvictingSteps):
            return together.attention_mask.shape[1], padding
        layer_mask = together.masks[int(name[len(KV_PREFIX) :].split(".")[0])][row]
        return layer_mask.shape[0], int(layer_mask.shape[0] - layer_mask.sum())

    # ---- state bookkeeping -----------------------------------------------------------------
    def _shift(self, name: str, array: np.ndarray, offset: int) -> np.ndarray:
        """``array`` (slots on axis 2) as it reads ``offset`` slots later: keys re-rotated."""
        if self.rotation is not None and name.endswith(".key"):
            return self.rotation.rotate(name, array, offset)
        return array.copy()  # the caller may write it over overlapping slots

    def _held(self) -> dict[str, np.ndarray]:
        """Every state value ONNX Runtime holds (not the store), copied out as numpy."""
        return {
            meta.name: np.array(value.numpy())
            for meta, value in zip(self.model.state_inputs, self.state or [])
            if meta.name not in self.store
        }

    def _bind(self, held: dict[str, np.ndarray]) -> None:
        """Rebuild the state list: views of the store's first rows, then the held values."""
        value = self.ort.OrtValue.ortvalue_from_numpy
        self.kv_buffers = {name: value(array[: self.rows]) for name, array in self.store.items()}
        self._decode_binding = None
        self.state = [
            self.kv_buffers[meta.name] if meta.name in self.kv_buffers else value(np.ascontiguousarray(held[meta.name]))
            for meta in self.model.state_inputs
        ]

    def _allocate(self, batch: int, slots: int, keep: int = 0) -> None:
        """(Re)allocate the store with ``slots`` slots, keeping the first ``keep`` (BoundSteps
        calls this when a decode step outruns the buffers)."""
        for name in list(self.store) or [m.name for m in self.model.state_inputs if m.name.startswith(KV_PREFIX)]:
            shape = (self.max_rows, self.model.num_kv_heads, slots, self.model.head_dim)
            array = np.zeros(shape, np.float32)
            if keep and name in self.store:
                array[:, :, :keep] = self.store[name][:, :, :keep]
            self.store[name] = array
        self.slots = slots
        if self.rows:
            self._bind(self._held())

    # ---- membership ------------------------------------------------------------------------
    def join(self, row: RowState) -> int:
        """Add a prefilled sequence as the last row; returns its row index."""
        if self.rows >= self.max_rows:
            raise ValueError(f"the batch is full ({self.max_rows} rows)")
        held = self._held()
        old, length = self.length, max(self.length, row.length)
        grow = length - old
        if self.shared_cache and length + 1 > self.slots:
            self._allocate(self.max_rows, length + self.headroom, keep=old)
        layers = self.model.num_layers
        mask = np.zeros((self.rows + 1, layers, length) if self.per_layer else (self.rows + 1, length), np.int64)
        if self.rows:
            mask[:-1, ..., grow:] = self.attention_mask
        for name, kv in row.kv.items():  # each layer's tokens end at the batch's last slot
            place = length - kv.shape[2]
            if self.per_layer:
                mask[-1, int(name[len(KV_PREFIX) :].split(".")[0]), place:] = 1
            else:
                mask[-1, place:] = 1
        for name, array in self.store.items():
            if grow and self.rows:  # the new row is longer: everyone else moves right
                array[: self.rows, :, grow:length] = self._shift(name, array[: self.rows, :, :old], grow)
            place = length - row.kv[name].shape[2]
            array[self.rows, :, :place] = 0
            array[self.rows, :, place:length] = self._shift(name, row.kv[name], place)[0]
        for name, kv in row.kv.items():
            if name in self.store:
                continue
            joined = np.zeros((self.rows + 1, kv.shape[1], length, kv.shape[3]), kv.dtype)
            if self.rows:
                joined[:-1, :, grow:] = held[name]
            joined[-1:, :, length - kv.shape[2] :] = kv
            held[name] = joined
        for name, value in row.other.items():
            held[name] = np.concatenate([held[name], value]) if self.rows else value
        self.rows += 1
        self.attention_mask = mask
        self._bind(held)
        return self.rows - 1

    def leave(self, rows: list[int]) -> list[int]:
        """Drop ``rows``: the last rows move into their places. Returns the old row index of
        each new row, for the caller to reorder what it keeps per row."""
        leaving = set(rows)
        remaining = [r for r in range(self.rows) if r not in leaving]
        count = len(remaining)
        order = list(range(count))
        movers = [r for r in remaining if r >= count]
        for hole, mover in zip([r for r in sorted(leaving) if r < count], movers):
            order[hole] = mover
        if not count:
            self.clear()
            return []
        held = {name: value[order] for name, value in self._held().items()}
        for array in self.store.values():
            for new, old in enumerate(order):
                if new != old:
                    array[new, :, : self.length] = array[old, :, : self.length]
        self.rows = count
        self.attention_mask = self.attention_mask[order]
        self._bind(held)
        self.cut(minimum=max(16, self.length // 8))
        return order

    def clear(self) -> None:
        """No rows (the store's memory is kept for the next join)."""
        self.rows, self.attention_mask, self.state = 0, None, None
        self.kv_buffers, self._decode_binding = {}, None

    def cut(self, minimum: int = 1) -> None:
        """Drop the padding every row starts with, when it is at least ``minimum`` slots."""
        if not self.rows:
            return
        padding = int(np.argmax(self.attention_mask.reshape(-1, self.length).any(axis=0)))
        if padding < minimum:
            return
        kept = self.length - padding
        held = self._held()
        for name, array in self.store.items():
            array[: self.rows, :, :kept] = self._shift(name, array[: self.rows, :, padding : self.length], -padding)
        for name in held:
            if name.startswith(KV_PREFIX):
                held[name] = held[name][:, :, padding:]
        self.attention_mask = self.attention_mask[..., padding:]
        self._bind(held)

    def decode(self, next_ids: np.ndarray, copy: bool = True) -> np.ndarray:
        if self.length + 1 >= self.model.max_positions:
            self.cut()  # slots index the rotary tables: make room first
        return super().decode(next_ids, copy)
