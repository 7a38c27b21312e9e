"""A tiny builder for ONNX node lists, for op lowerings and function bodies.

    b = NodeBuilder("msda")
    y = b.op("Transpose", x, perm=[0, 2, 1])
    k = b.const([1, 2], np.int64)

Constants are Constant nodes (not initializers) so the same node list can be
a FunctionProto body or be spliced into a graph.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper


class NodeBuilder:
    def __init__(self, prefix: str):
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self._count = 0

    def _name(self, hint: str) -> str:
        self._count += 1
        return f"{self.prefix}/{hint}_{self._count}"

    def op(self, op_type: str, *inputs: str, outputs: int = 1, name: str | None = None, **attrs) -> str | list[str]:
        outs = [name] if name and outputs == 1 else [self._name(op_type) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=self._name(op_type), **attrs))
        return outs[0] if outputs == 1 else outs

    def const(self, values, dtype=np.int64) -> str:
        out = self._name("const")
        tensor = numpy_helper.from_array(np.asarray(values, dtype=dtype), out)
        self.nodes.append(helper.make_node("Constant", [], [out], name=self._name("Constant"), value=tensor))
        return out


def int64_constant(name: str, values: list[int]) -> onnx.NodeProto:
    """A Constant node with output ``name``: a rank-1 int64 tensor, for hand-written function bodies."""
    return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, onnx.TensorProto.INT64,
                                                                            [len(values)], values))


def attribute_constant(name: str, attr: str) -> onnx.NodeProto:
    """A Constant node with output ``name`` holding the function's int attribute ``attr`` (a scalar)."""
    node = helper.make_node("Constant", [], [name])
    node.attribute.append(onnx.AttributeProto(name="value_int", ref_attr_name=attr, type=onnx.AttributeProto.INT))
    return node
