"""POP-online: replace every FFN with a self-pruning ``ai.popc`` FFN node.

``PopOnlinePass`` applies the rules of ``passes/pop_rules.py`` in two phases -- routed
experts (Mixtral, Qwen-MoE) first, then dense SwiGLU / GeGLU FFNs and plain GELU / ReLU
MLPs -- with one ``PopRewriteState`` that the rules share: the partitions found, their
channel widths, the model-wide ``pop_config`` input and the token masks.

The rules apply when all of an FFN's weights are initializers of matching shapes (so the
attention MatMuls never match). Each replacement lays the weights out one row per
channel (gate and up transposed back to ``[H, D]`` rows; down already is), adds the
layer's partition as state (``past_partition.{i}`` -> ``present_partition.{i}``), and
reads the model-wide ``pop_config`` input. The op bodies live in ``templates/pop_ffn.py``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir
from onnxscript import rewriter

from popc.passes.pop_rules import dense_ffn_rules, expert_index, layer_index, routed_expert_rules
from popc.templates.ops import DOMAIN, VERSION
from popc.templates.pop_ffn import POP_FUNCTIONS


class PopOnlinePass(ir.passes.InPlacePass):
    """Insert POP-online into every matched FFN; fails if none matches.

    After the call, ``layers`` holds the FFN keys (``(layer,)`` or ``(layer, expert)``) in
    order and ``channels`` the FFN width.
    """

    def __init__(self, per_ffn_token_mask: bool = False) -> None:
        super().__init__()
        self.layers: list[tuple[int, ...]] = []
        self.channels: int | None = None
        # POP-prefill graphs feed deep FFNs fewer tokens than input_ids has at a prefill:
        # then each FFN's token mask is the last X.shape[1] columns of attention_mask.
        self.per_ffn_token_mask = per_ffn_token_mask

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        state = PopRewriteState.for_graph(model.graph, per_ffn_token_mask=self.per_ffn_token_mask)
        rewriter.rewrite(model, pattern_rewrite_rules=routed_expert_rules(state))
        rewriter.rewrite(model, pattern_rewrite_rules=dense_ffn_rules(state))
        state.add_to_model(model)
        self.layers = sorted(state.partitions)
        self.channels = next(iter(state.channels))
        return ir.passes.PassResult(model, modified=True)


@dataclasses.dataclass
class PopRewriteState:
    """What the POP rules of one pass share.

    ``partitions`` maps each rewritten FFN's key (``(layer,)`` or ``(layer, expert)``) to
    its partition state (``past_partition`` input, ``present_partition`` output);
    ``channels`` collects the FFN widths (one per model); ``config`` is the new
    ``pop_config`` input. The graph-wide token mask's nodes are made on first use: a
    rewrite round that matches nothing would otherwise remove them as unused before the
    next round needs them.
    """

    graph: ir.Graph
    input_ids: ir.Value
    attention_mask: ir.Value
    per_ffn_token_mask: bool = False
    # A KV-eviction export's per-layer mask (popc.kv_eviction): attention_mask is then
    # layer_attention_mask [L, B, T], whose layer 0 uses its first layer_lengths[0] slots.
    layer_lengths: ir.Value | None = None
    config: ir.Value = dataclasses.field(
        default_factory=lambda: ir.Value(name="pop_config", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([4]))
    )
    partitions: dict[tuple[int, ...], tuple[ir.Value, ir.Value]] = dataclasses.field(default_factory=dict)
    channels: set[int] = dataclasses.field(default_factory=set)
    _token_mask: ir.Value | None = None

    @classmethod
    def for_graph(cls, graph: ir.Graph, per_ffn_token_mask: bool = False) -> PopRewriteState:
        inputs = {value.name: value for value in graph.inputs}
        if "layer_attention_mask" in inputs and "layer_lengths" in inputs and "input_ids" in inputs:
            return cls(
                graph, inputs["input_ids"], inputs["layer_attention_mask"], per_ffn_token_mask, inputs["layer_lengths"]
            )
        if "attention_mask" not in inputs or "input_ids" not in inputs:
            raise ValueError("POP needs a popc-traced graph with input_ids and attention_mask inputs")
        return cls(graph, inputs["input_ids"], inputs["attention_mask"], per_ffn_token_mask)

    def new_partition(self, down_weight: ir.Value, x: ir.Value, width: int) -> tuple[tuple[int, ...], str, ir.Value]:
        """A new FFN's key (layer[, expert]), name label and partition state input."""
        layer = layer_index(down_weight, x, len(self.partitions))
        expert = expert_index(down_weight)
        key = (layer,) if expert is None else (layer, expert)
        label = ".".join(map(str, key))
        self.channels.add(width)
        partition_in = ir.Value(
            name=f"past_partition.{label}",
            type=ir.TensorType(ir.DataType.INT64),
            shape=ir.Shape(["batch", "partition_size"]),
        )
        self.graph.inputs.append(partition_in)
        return key, label, partition_in

    def record(self, key: tuple[int, ...], partition_in: ir.Value, partition_out: ir.Value) -> None:
        self.partitions[key] = (partition_in, partition_out)

    @property
    def token_mask(self) -> ir.Value:
        """float(attention_mask[:, -S:]) with S = input_ids.shape[1], made once per graph."""
        if self._token_mask is None:
            tape = ir.tape.Tape()
            sequence = tape.op("Shape", [self.input_ids], attributes={"start": 1, "end": 2})
            start = tape.op("Neg", [sequence])
            end = tape.op("Constant", [], attributes={"value": ir.tensor(np.array([np.iinfo(np.int64).max]))})
            axes = tape.op("Constant", [], attributes={"value": ir.tensor(np.array([1], np.int64))})
            mask = self.attention_mask
            if self.layer_lengths is not None:  # layer 0's slots in use: [B, layer_lengths[0]]
                first = tape.op("Constant", [], attributes={"value": ir.tensor(np.array(0, np.int64))})
                mask = tape.op("Gather", [mask, first], attributes={"axis": 0})
                zero = tape.op("Constant", [], attributes={"value": ir.tensor(np.array([0], np.int64))})
                used = tape.op("Slice", [self.layer_lengths, zero, tape.op("Constant", [], attributes={
                    "value": ir.tensor(np.array([1], np.int64))})])  # fmt: skip
                mask = tape.op("Slice", [mask, zero, used, axes])
            window = tape.op("Slice", [mask, start, end, axes])
            self._token_mask = tape.op("Cast", [window], attributes={"to": ir.DataType.FLOAT})
            self._token_mask.name = "pop_token_mask"
            for node in tape.nodes:
                node.name = f"/pop/{node.op_type}"
            self.graph.insert_before(self.graph.node(0), tape.nodes)
        return self._token_mask

    def token_mask_for(self, op, x: ir.Value) -> ir.Value:
        """The real-token mask of the tokens ``x`` holds: the graph-wide one, or with
        ``per_ffn_token_mask`` float(attention_mask[:, -S:]) with S = x.shape[1], built by ``op``."""
        if not self.per_ffn_token_mask:
            return self.token_mask
        start = op.Neg(op.Shape(x, start=1, end=2))
        end = op.Constant(value_ints=[np.iinfo(np.int64).max])
        if self.layer_lengths is not None:  # the graph-wide mask's last S columns (a skipped layer's window)
            return op.Slice(self.token_mask, start, end, op.Constant(value_ints=[1]))
        window = op.Slice(self.attention_mask, start, end, op.Constant(value_ints=[1]))
        return op.Cast(window, to=ir.DataType.FLOAT)

    def add_to_model(self, model: ir.Model) -> None:
        """Wire the partitions (layer order, after the KV cache) and ``pop_config`` into the
        graph's inputs and outputs and add the POP functions; fails if the rules found no
        FFN, or FFNs of more than one width."""
        if not self.partitions:
            raise ValueError("POP found no FFN block (SwiGLU, GeGLU or plain GELU/ReLU MLP) to rewrite in this graph")
        if len(self.channels) != 1:
            raise ValueError(
                f"POP needs one FFN width per model (pop_config holds counts); found {sorted(self.channels)}"
            )
        graph = model.graph
        for key in sorted(self.partitions):
            self.partitions[key][1].name = "present_partition." + ".".join(map(str, key))
            graph.outputs.append(self.partitions[key][1])
        ordered = [v for v in graph.inputs if not v.name.startswith("past_partition.")]
        ordered += [self.partitions[key][0] for key in sorted(self.partitions)]
        graph.inputs.clear()
        graph.inputs.extend([*ordered, self.config])
        add_functions(model)
        ir.passes.common.RemoveUnusedNodesPass()(model)


def add_functions(model: ir.Model, functions: Sequence = POP_FUNCTIONS, domains: tuple[str, ...] = (DOMAIN,)) -> None:
    """Add onnxscript ``functions`` to ``model`` as model-local functions, each importing
    ``domains`` (version 1 unless it names one), and import popc's domain in the model."""
    import onnx

    for function in functions:
        proto = function.to_function_proto()
        for domain in domains:
            if not any(o.domain == domain for o in proto.opset_import):
                proto.opset_import.append(onnx.helper.make_opsetid(domain, VERSION if domain == DOMAIN else 1))
        ir_function = ir.serde.deserialize_function(proto)
        model.functions[ir_function.identifier()] = ir_function
    model.opset_imports[DOMAIN] = VERSION
