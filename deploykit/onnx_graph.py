"""Reading constants out of ONNX graphs.

A constant reaches a node either as an initializer or as the output of a
``Constant`` node, depending on the exporter and on onnxsim; every reader of
scales, zero points or spatial shapes needs both. Tensors are returned as the
graph's own TensorProto objects (nothing is converted until asked, so large
weights cost nothing), and editing one edits the graph.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper


def constant_tensors(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    tensors = {t.name: t for t in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            tensors[n.output[0]] = n.attribute[0].t
    return tensors


def constant_value(tensors: dict[str, onnx.TensorProto], name: str) -> np.ndarray:
    return numpy_helper.to_array(tensors[name])


def set_constant(tensors: dict[str, onnx.TensorProto], name: str, value: np.ndarray) -> None:
    """Overwrite a constant in place, keeping its dtype."""
    old = tensors[name]
    dtype = onnx.helper.tensor_dtype_to_np_dtype(old.data_type)
    old.CopyFrom(numpy_helper.from_array(np.asarray(value).astype(dtype), old.name))


def int16_quantize_nodes(graph: onnx.GraphProto) -> int:
    """QuantizeLinear nodes whose zero point is int16 (valid from opset 21)."""
    tensors = constant_tensors(graph)
    return sum(n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[2] in tensors
               and tensors[n.input[2]].data_type == onnx.TensorProto.INT16 for n in graph.node)
