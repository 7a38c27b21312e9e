"""Small graph helpers the QDQ flavours share (deploykit.quantize.trt_flavour, ort_flavour):
finding Q/DQ pairs, producers and consumers, adding initializers under fresh names, removing
and reordering nodes. Each edits the ModelProto in place."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper


def qdq_pairs(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, onnx.NodeProto]]:
    """(QuantizeLinear, DequantizeLinear) pairs where the DQ reads the Q directly."""
    q_by_output = {n.output[0]: n for n in model.graph.node if n.op_type == "QuantizeLinear"}
    return [(q_by_output[n.input[0]], n) for n in model.graph.node
            if n.op_type == "DequantizeLinear" and n.input[0] in q_by_output]


def rename_input(model: onnx.ModelProto, old: str, new: str) -> None:
    for n in model.graph.node:
        for i, name in enumerate(n.input):
            if name == old:
                n.input[i] = new
    for o in model.graph.output:
        if o.name == old:
            raise ValueError(f"cannot remove the Q/DQ pair producing graph output {old}")


def remove_nodes(model: onnx.ModelProto, nodes: list[onnx.NodeProto]) -> None:
    ids = {id(n) for n in nodes}
    keep = [n for n in model.graph.node if id(n) not in ids]
    del model.graph.node[:]
    model.graph.node.extend(keep)


class Initializers:
    """New initializers with fresh names (never edits a constant others may share)."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.used = {t.name for t in model.graph.initializer} | {o for n in model.graph.node for o in n.output}
        self.count = 0

    def fresh(self, stem: str) -> str:
        name = f"{stem}_ort"
        while name in self.used:
            self.count += 1
            name = f"{stem}_ort{self.count}"
        self.used.add(name)
        return name

    def add(self, stem: str, value: np.ndarray) -> str:
        name = self.fresh(stem)
        # np.ascontiguousarray would make a scalar 1-D, which some of ORT's selectors refuse
        value = np.asarray(value)
        self.model.graph.initializer.append(numpy_helper.from_array(value if value.flags.c_contiguous else
                                                                    value.copy(order="C"), name))
        return name


def node_consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for name in n.input:
            out.setdefault(name, []).append(n)
    return out


def node_producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in model.graph.node for o in n.output}


def axis_of(node: onnx.NodeProto) -> int | None:
    return next((a.i for a in node.attribute if a.name == "axis"), None)


def channel_shape(node: onnx.NodeProto, ndim: int, scale: np.ndarray) -> list[int]:
    """The shape a Q/DQ node's scale broadcasts as against its ndim-D input: per tensor, or
    per channel along the node's axis (ONNX's default axis is 1)."""
    shape = [1] * ndim
    if scale.size > 1:
        axis = axis_of(node)
        shape[1 if axis is None else axis] = -1
    return shape


def node_attributes(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def static_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, where ONNX shape inference finds every dimension."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False).graph
    except Exception:  # noqa: BLE001 - inference is best effort; the rewrites needing shapes are skipped
        inferred = model.graph
    out = {}
    for v in (*inferred.input, *inferred.value_info, *inferred.output):
        dims = v.type.tensor_type.shape.dim
        if v.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims):
            out[v.name] = tuple(d.dim_value for d in dims)
    return out


def element_type(model: onnx.ModelProto, tensor: str, producer: dict) -> int | None:
    """The element type of ``tensor`` where the graph says it (an input, a value_info, a
    comparison's or a Cast's output)."""
    for v in (*model.graph.input, *model.graph.value_info):
        if v.name == tensor:
            return v.type.tensor_type.elem_type
    node = producer.get(tensor)
    if node is not None and node.op_type in ("Less", "Greater", "LessOrEqual", "GreaterOrEqual", "Equal", "And",
                                             "Or", "Not", "Xor"):
        return onnx.TensorProto.BOOL
    if node is not None and node.op_type == "Cast":
        return next(a.i for a in node.attribute if a.name == "to")
    return None


def use_contrib_ops(model: onnx.ModelProto, used: int) -> None:
    """Declare ORT's contrib domain (MatMulIntegerToFloat, QLinearMul) where a rewrite used it."""
    if used and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))


def remove_dead_nodes(model: onnx.ModelProto) -> int:
    """Nodes nothing reads (a DQ whose consumers became MatMulIntegerToFloat or got float
    weights): ORT does not prune a DequantizeLinear, and runs it at every call."""
    outputs = {o.name for o in model.graph.output}
    removed = 0
    while True:
        read = {i for n in model.graph.node for i in n.input} | outputs
        dead = [n for n in model.graph.node if not any(o in read for o in n.output)]
        if not dead:
            return removed
        remove_nodes(model, dead)
        removed += sum(n.op_type != "Constant" for n in dead)


def sort_topologically(model: onnx.ModelProto) -> None:
    """Nodes in an order where each input is produced before it is read (the Shape nodes moved
    onto a DQ output, the pairs inserted before a node, may read a later node's output)."""
    ready = {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer} | {""}
    pending, ordered = list(model.graph.node), []
    while pending:
        rest = []
        for n in pending:
            if all(i in ready for i in n.input):
                ordered.append(n)
                ready.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):  # a cycle or a missing input: leave the order as it was
            return
        pending = rest
    del model.graph.node[:]
    model.graph.node.extend(ordered)
