"""The ONNX Runtime flavour's float islands (int16 regions, which ORT has no kernels for) made
cheap: a 1x1 Conv on few channels as one Gemm, a max over a pillar's points as a ReduceMax.
See deploykit.quantize.ort_flavour for the measured reasons."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from ..onnx_graph import constant_tensors, constant_value
from .qdq_graph import Initializers, node_attributes, remove_nodes


def float_layer_output(tensor: str, producer: dict) -> bool:
    """Whether ``tensor`` is (a Relu of) a Conv whose input is not dequantized: a float island."""
    node = producer.get(tensor)
    if node is not None and node.op_type == "Relu":
        node = producer.get(node.input[0])
    if node is None or node.op_type != "Conv":
        return False
    source = producer.get(node.input[0])
    return source is None or source.op_type != "DequantizeLinear"


def float_pointwise_convs_to_matmul(model: onnx.ModelProto, shapes: dict, inits: Initializers) -> int:
    """A 1x1 Conv (batch 1) with a float input and float weights (in a float island: the first
    PFN layer of centerpoint_pillar_synth's int16 set, 11 channels in) becomes Gemm(W, x, b)
    over the channel axis: ORT runs a float Conv with so few channels through its NCHWc layout
    and reorders the output back, 1.6x slower than the one GEMM (measured on [1, 11, 16, 6000]
    -> 16 channels). The same sums, in another order (float rounding)."""
    consts = constant_tensors(model.graph)
    dequantized = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    doomed, count = [], 0
    for node in list(model.graph.node):
        if node.op_type != "Conv" or node.input[1] not in consts or node.input[0] in dequantized or \
                node.input[0] not in shapes or len(shapes[node.input[0]]) != 4 or node.output[0] not in shapes:
            continue
        a = node_attributes(node)
        w = constant_value(consts, node.input[1])
        if w.shape[2:] != (1, 1) or a.get("group", 1) != 1 or any(a.get("pads", [0]) ) or \
                any(v != 1 for v in (*a.get("strides", [1]), *a.get("dilations", [1]))) or \
                a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            continue
        n, c, h, wd = shapes[node.input[0]]
        has_bias = len(node.input) > 2 and node.input[2]
        if n != 1 or (has_bias and node.input[2] not in consts):
            continue
        out = node.output[0]
        flat, product = inits.fresh(out + "_in2d"), inits.fresh(out + "_mm")
        # Gemm adds the bias (broadcast along the pixels) in the GEMM's output pass: a separate
        # Add over the [16, 96000] result took as long as the GEMM.
        bias = [inits.add(out + "_b2d", constant_value(consts, node.input[2]).reshape(-1, 1))] if has_bias else []
        nodes = [helper.make_node("Reshape", [node.input[0], inits.add(out + "_in_shape", np.array([c, h * wd]))],
                                  [flat], name=f"{out}/reshape_in"),
                 helper.make_node("Gemm", [inits.add(out + "_w2d", w.reshape(w.shape[0], c)), flat, *bias], [product],
                                  name=f"{out}/gemm")]
        nodes.append(helper.make_node("Reshape", [product, inits.add(out + "_out_shape", np.array(shapes[out]))], [out],
                                      name=f"{out}/reshape_out"))
        at = list(model.graph.node).index(node)
        for k, new in enumerate(nodes):
            model.graph.node.insert(at + k, new)
        doomed.append(node)
        count += 1
    remove_nodes(model, doomed)
    return count


def axis_maxpools_to_reducemax(model: onnx.ModelProto, shapes: dict, inits: Initializers) -> int:
    """A float MaxPool whose window spans one whole axis (a PointPillars max over a pillar's
    points, in a float island) becomes a ReduceMax over that axis (the same values, the axis
    kept): 0.7 ms against 1.8 ms for ORT's MaxPool on [1, 16, 16, 6000]."""
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    dequantized = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    doomed, count = [], 0
    for node in list(model.graph.node):
        if node.op_type != "MaxPool" or len(node.output) != 1 or node.input[0] not in shapes or \
                node.input[0] in dequantized:
            continue  # a DQ -> MaxPool -> Q runs as ORT's NHWC int8 MaxPool after a QLinearConv: faster
        a, shape = node_attributes(node), shapes[node.input[0]]
        kernel = list(a.get("kernel_shape", []))
        strides = list(a.get("strides", [1] * len(kernel)))
        spans = [i for i, k in enumerate(kernel) if k != 1]
        if len(spans) != 1 or any(a.get("pads", [0])) or a.get("ceil_mode", 0) or \
                any(d != 1 for d in a.get("dilations", [1])) or a.get("storage_order", 0) or \
                a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            continue
        i = spans[0]
        if kernel[i] != shape[2 + i] or strides[i] != kernel[i] or any(s != 1 for j, s in enumerate(strides) if j != i):
            continue
        axis = 2 + i
        args = {"keepdims": 1} if opset >= 18 else {"keepdims": 1, "axes": [axis]}
        inputs = [node.input[0], inits.add(node.output[0] + "_axes", np.array([axis]))] if opset >= 18 else \
            [node.input[0]]
        model.graph.node.insert(list(model.graph.node).index(node), helper.make_node(
            "ReduceMax", inputs, [node.output[0]], name=f"{node.output[0]}/reduce_max", **args))
        doomed.append(node)
        count += 1
    remove_nodes(model, doomed)
    return count
