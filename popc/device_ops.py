"""Small tensor operations on the device where a model's state lives, done by ONNX Runtime.

A CUDA session keeps its KV cache, POP partitions and logits on the GPU; numpy cannot
touch them there (and has no bfloat16 at all). Each operation here is a one- or two-node
ONNX model run by its own ONNX Runtime session on the model's execution provider, its
inputs and outputs bound to OrtValues through IOBinding, so data stays on the device:

- :meth:`DeviceOps.greedy`: ArgMax of the last position's logits; only the [batch] int64
  ids come back to the host (the token choice of greedy decoding);
- :meth:`DeviceOps.zeros`: a zero-filled buffer (ConstantOfShape);
- :meth:`DeviceOps.grow`: a buffer with zero slots appended on its axis 2 (ConstantOfShape +
  Concat): the shared KV cache outgrowing its capacity is copied on the device.

Why sessions and not OrtValue methods: the Python OrtValue API allocates and copies whole
values between host and device, but has no device-side fill, slice or copy. The CPU
execution provider runs the very same models, so CPU tests cover this code.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from popc.errors import PopcError

# ONNX Runtime's type strings -> onnx.TensorProto element types.
ELEMENT_TYPES = {"tensor(float)": 1, "tensor(float16)": 10, "tensor(bfloat16)": 16, "tensor(int64)": 7}
# numpy dtypes where numpy has one (it has no bfloat16: such values live in ONNX Runtime only).
NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}
OPSET = 17


def element_type(type_string: str) -> int:
    """The onnx.TensorProto element type of an ONNX Runtime type string (``tensor(float16)``)."""
    if type_string not in ELEMENT_TYPES:
        raise PopcError(f"popc's runtime does not handle graph values of type {type_string}")
    return ELEMENT_TYPES[type_string]


class DeviceOps:
    """The operations above on ``device`` ("cpu" or "cuda", device 0), through ``providers``."""

    def __init__(self, device: str, providers: list[str]):
        import onnxruntime as ort

        self.ort = ort
        self.device = device
        self.providers = providers
        self._sessions: dict[tuple[str, int], Any] = {}

    def empty(self, shape: list[int], type_string: str, on_host: bool = False) -> Any:
        """An uninitialised OrtValue on the device (or the host), for values that a graph
        overwrites before reading or that have a zero-size dimension."""
        elem = element_type(type_string)
        # numpy dtypes work on every ONNX Runtime; the onnx integer form only for bfloat16.
        kind = NUMPY_TYPES.get(type_string, elem)
        return self.ort.OrtValue.ortvalue_from_shape_and_type(list(shape), kind, "cpu" if on_host else self.device, 0)

    def host(self, array: np.ndarray) -> Any:
        """A host OrtValue of ``array`` (small inputs: ids, masks, shapes, ``pop_config``)."""
        return self.ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array))

    def greedy(self, logits: Any) -> np.ndarray:
        """The argmax over the vocabulary of the last position of ``logits`` [batch, positions,
        vocab] (an OrtValue on the device): int64 [batch], the first maximum on ties as
        numpy's argmax. Only those ids leave the device."""
        binding = self._session("argmax", element_type(logits.data_type())).io_binding()
        binding.bind_ortvalue_input("logits", logits)
        binding.bind_output("ids", "cpu")
        return self._run("argmax", element_type(logits.data_type()), binding).numpy()

    def zeros(self, shape: list[int], type_string: str) -> Any:
        """A zero-filled OrtValue of ``shape`` (any rank) on the device."""
        elem = element_type(type_string)
        binding = self._session("zeros", elem).io_binding()
        binding.bind_ortvalue_input("shape", self.host(np.asarray(shape, np.int64)))
        binding.bind_output("zeros", self.device)
        return self._run("zeros", elem, binding)

    def grow(self, buffer: Any, slots: int) -> Any:
        """``buffer`` [batch, heads, old, head_dim] with zero slots appended up to ``slots`` on
        axis 2: a new OrtValue on the device, the copy made there."""
        batch, heads, old, dim = buffer.shape()
        if slots < old:
            raise ValueError(f"grow() to {slots} slots from {old}")
        elem = element_type(buffer.data_type())
        binding = self._session("grow", elem).io_binding()
        binding.bind_ortvalue_input("buffer", buffer)
        binding.bind_ortvalue_input("extra", self.host(np.asarray([batch, heads, slots - old, dim], np.int64)))
        binding.bind_output("grown", self.device)
        return self._run("grow", elem, binding)

    # ---- the models ------------------------------------------------------------------------
    def _run(self, name: str, elem: int, binding: Any) -> Any:
        self._sessions[(name, elem)].run_with_iobinding(binding)
        return binding.get_outputs()[0]

    def _session(self, name: str, elem: int) -> Any:
        if (name, elem) not in self._sessions:
            options = self.ort.SessionOptions()
            # One thread: no pool of spinning workers to compete with the model's own.
            options.intra_op_num_threads = 1
            options.log_severity_level = 3
            model = _BUILDERS[name](elem)
            self._sessions[(name, elem)] = self.ort.InferenceSession(
                model.SerializeToString(), options, providers=self.providers
            )
        return self._sessions[(name, elem)]

def _model(nodes: list[Any], inputs: list[Any], outputs: list[Any], initializers: list[Any] = ()) -> Any:
    from onnx import helper

    graph = helper.make_graph(nodes, "popc_device_op", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    return model


def _argmax_model(elem: int) -> Any:
    from onnx import TensorProto, helper

    last = [
        helper.make_tensor("starts", TensorProto.INT64, [1], [-1]),
        helper.make_tensor("ends", TensorProto.INT64, [1], [np.iinfo(np.int64).max]),
        helper.make_tensor("axes", TensorProto.INT64, [1], [1]),
        helper.make_tensor("flat", TensorProto.INT64, [1], [-1]),
    ]
    nodes = [
        helper.make_node("Slice", ["logits", "starts", "ends", "axes"], ["last"]),
        helper.make_node("ArgMax", ["last"], ["picked"], axis=2, keepdims=0, select_last_index=0),
        helper.make_node("Reshape", ["picked", "flat"], ["ids"]),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("logits", elem, ["batch", "positions", "vocab"])],
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch"])],
        last,
    )


def _zero_value(elem: int) -> Any:
    from onnx import helper

    return helper.make_tensor("value", elem, [1], [0])


def _zeros_model(elem: int) -> Any:
    from onnx import TensorProto, helper

    return _model(
        [helper.make_node("ConstantOfShape", ["shape"], ["zeros"], value=_zero_value(elem))],
        [helper.make_tensor_value_info("shape", TensorProto.INT64, ["rank"])],
        [helper.make_tensor_value_info("zeros", elem, None)],
    )


def _grow_model(elem: int) -> Any:
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("ConstantOfShape", ["extra"], ["tail"], value=_zero_value(elem)),
        helper.make_node("Concat", ["buffer", "tail"], ["grown"], axis=2),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("buffer", elem, ["b", "h", "s", "d"]),
         helper.make_tensor_value_info("extra", TensorProto.INT64, [4])],
        [helper.make_tensor_value_info("grown", elem, ["b", "h", "t", "d"])],
    )  # fmt: skip


_BUILDERS = {"argmax": _argmax_model, "zeros": _zeros_model, "grow": _grow_model}
