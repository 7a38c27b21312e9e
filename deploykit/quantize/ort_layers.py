"""The ONNX Runtime flavour's rewrites of weighted layers (Conv, Gemm, MatMul): int32 biases,
weight layouts folded offline, a layer's Relu and bias Add kept out of ORT's selectors' way,
float-output MatMuls as MatMulIntegerToFloat, and float constants for what ORT cannot fuse.
See deploykit.quantize.ort_flavour for the whole flavour and the measured reasons."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from ..onnx_graph import constant_tensors, constant_value
from .qdq_graph import (Initializers, axis_of, channel_shape, node_consumers, node_producers, remove_nodes,
                        rename_input, use_contrib_ops)


# Ops with constant weights (input 1) and bias (input 2) behind DequantizeLinear nodes
WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def fold_weight_layouts(model: onnx.ModelProto) -> int:
    """PyTorch exports Linear as MatMul(x, Transpose(W)), and nn.MultiheadAttention slices its
    packed in_proj weight first: with W behind a DequantizeLinear, the Slice and Transpose run
    on the dequantized weight at every call and hide the weight from ORT's MatMul / Gemm
    selectors. They are done once on the int8 weight instead, the DQ's per-channel scale and
    axis following (the same values)."""
    consts = constant_tensors(model.graph)
    producer = node_producers(model)
    consumers = node_consumers(model)
    outputs = {o.name for o in model.graph.output}
    inits = Initializers(model)
    doomed, count = [], 0
    for node in list(model.graph.node):
        if node.op_type not in ("Transpose", "Slice", "Identity") or node.output[0] in outputs or \
                not all(x in consts for x in node.input[1:] if x):
            continue
        if node.input[0] in consts:  # a plain constant (the packed in_proj bias): folded the same way
            value = constant_value(consts, node.input[0])
            value = value if node.op_type == "Identity" else _slice_or_transpose(node, value, consts)
            rename_input(model, node.output[0], inits.add(node.output[0], value))
            consts[model.graph.initializer[-1].name] = model.graph.initializer[-1]
            doomed.append(node)
            continue
        dq = producer.get(node.input[0]) if node.op_type != "Identity" else None
        if dq is None or dq.op_type != "DequantizeLinear" or not all(x in consts for x in dq.input if x):
            continue
        w = constant_value(consts, dq.input[0])
        axis = axis_of(dq)
        axis = (1 if axis is None else axis) % max(w.ndim, 1)
        params = [constant_value(consts, x) for x in dq.input[1:] if x]
        if node.op_type == "Transpose":
            perm = _perm(node, w.ndim)
            axis = perm.index(axis) if w.ndim > 1 else 0
        elif params[0].size > 1:  # per channel: the channels kept keep their scales
            params = [p[_slice_index(node, w.ndim, consts)[axis]] for p in params]
        w = _slice_or_transpose(node, w, consts)
        names = []
        for stem, value in zip(dq.input, [w, *params]):
            names.append(inits.add(stem + "_l", value))
            consts[names[-1]] = model.graph.initializer[-1]  # a later Transpose of this Slice reads it
        new_dq = helper.make_node("DequantizeLinear", names, [node.output[0]], name=f"{node.output[0]}/folded_dq",
                                  axis=axis)
        model.graph.node.insert(list(model.graph.node).index(node), new_dq)
        producer[node.output[0]] = new_dq
        doomed.append(node)
        if len(consumers.get(dq.output[0], [])) == 1:
            doomed.append(dq)
        count += 1
    remove_nodes(model, doomed)
    return count


def _perm(node: onnx.NodeProto, ndim: int) -> list[int]:
    return next((list(a.ints) for a in node.attribute if a.name == "perm"), list(range(ndim))[::-1])


def _slice_index(node: onnx.NodeProto, ndim: int, consts: dict) -> list[slice]:
    """A Slice node's constant starts / ends / axes / steps as numpy indices (the same clamping)."""
    starts, ends = (constant_value(consts, x).tolist() for x in node.input[1:3])
    axes = constant_value(consts, node.input[3]).tolist() if len(node.input) > 3 and node.input[3] \
        else list(range(len(starts)))
    steps = constant_value(consts, node.input[4]).tolist() if len(node.input) > 4 and node.input[4] \
        else [1] * len(starts)
    index = [slice(None)] * ndim
    for a, b, e, st in zip(axes, starts, ends, steps):
        index[a % ndim] = slice(b, e, st)
    return index


def _slice_or_transpose(node: onnx.NodeProto, value: np.ndarray, consts: dict) -> np.ndarray:
    if node.op_type == "Transpose":
        return np.transpose(value, _perm(node, value.ndim))
    return value[tuple(_slice_index(node, value.ndim, consts))]


def _layer_output(node: onnx.NodeProto, consumers: dict, consts: dict, outputs: set) -> tuple[str, list]:
    """The tensor a weighted op's layer ends in, and its readers: a MatMul's bias Add (ORT
    fuses the two into a Gemm) and a Relu are part of the layer."""
    tensor, readers = node.output[0], consumers.get(node.output[0], [])
    for op in ("Add", "Relu"):
        if len(readers) == 1 and readers[0].op_type == op and tensor not in outputs and \
                (op == "Relu" or node.op_type == "MatMul" and any(i in consts for i in readers[0].input)):
            tensor = readers[0].output[0]
            readers = consumers.get(tensor, [])
    return tensor, readers


def int8_output(node: onnx.NodeProto, consumers: dict, consts: dict, outputs: set) -> bool:
    """Whether the layer's output is quantized to uint8, so ORT fuses the layer into an int8 kernel."""
    _, readers = _layer_output(node, consumers, consts, outputs)
    return len(readers) == 1 and readers[0].op_type == "QuantizeLinear" and len(readers[0].input) > 2 and \
        readers[0].input[2] in consts and consts[readers[0].input[2]].data_type == onnx.TensorProto.UINT8


def drop_relus_before_uint8_quantizers(model: onnx.ModelProto) -> int:
    """A Relu read only by uint8 quantizers with zero point 0 is removed: those clip at 0 as it
    does (exact). ORT drops it itself before a Conv's Q, but not when a Linear on a 3-D input
    is fused into Reshape -> Gemm -> Reshape, where the Relu then stands between the Reshape
    and the Q and the layer stays a float Gemm."""
    consts = constant_tensors(model.graph)
    consumers = node_consumers(model)
    outputs = {o.name for o in model.graph.output}
    doomed = []
    for node in model.graph.node:
        readers = consumers.get(node.output[0], []) if node.op_type == "Relu" else []
        if not readers or node.output[0] in outputs or any(
                r.op_type != "QuantizeLinear" or len(r.input) < 3 or r.input[2] not in consts or
                consts[r.input[2]].data_type != onnx.TensorProto.UINT8 or np.any(constant_value(consts, r.input[2]))
                for r in readers):
            continue
        for r in readers:
            r.input[0] = node.input[0]
        doomed.append(node)
    remove_nodes(model, doomed)
    return len(doomed)


def matmuls_integer_to_float(model: onnx.ModelProto, uint8_inputs: set[str]) -> int:
    """A MatMul of a uint8 activation by an int8 weight whose output stays float (a deformable
    attention's sampling offsets and weights, a head's last Linear) becomes ORT's contrib
    MatMulIntegerToFloat, its bias Add folded in: the int8 GEMM with float output, exact (the
    int32 sum times the two scales), where ORT would dequantize the input and run a float Gemm
    (ORT fuses MatMul + Add into a Gemm before its QDQ selectors, which then find nothing; on
    bevformer_small's shapes the contrib op is 1.3-1.6x faster than DQ + Gemm)."""
    consts = constant_tensors(model.graph)
    producer = node_producers(model)
    consumers = node_consumers(model)
    outputs = {o.name for o in model.graph.output}
    inits = Initializers(model)
    doomed, count = [], 0
    for node in list(model.graph.node):
        if node.op_type != "MatMul" or node.input[0] not in uint8_inputs or node.input[1] not in producer:
            continue
        a, b = producer[node.input[0]], producer[node.input[1]]
        if b.op_type != "DequantizeLinear" or not all(x in consts for x in b.input if x) or \
                consts[b.input[0]].data_type != onnx.TensorProto.INT8 or len(consts[b.input[0]].dims) != 2 or \
                int8_output(node, consumers, consts, outputs):
            continue
        n_out = consts[b.input[0]].dims[1]
        b_scale = constant_value(consts, b.input[1])
        if b_scale.size > 1 and (b_scale.size != n_out or (axis_of(b) or 1) % 2 != 1):
            continue  # per channel along K: not what MatMulIntegerToFloat's per-column scale means
        b_zp = b.input[2] if len(b.input) > 2 and b.input[2] else inits.add(b.input[0] + "_zp",
                                                                                np.zeros(b_scale.shape, np.int8))
        out, bias = node.output[0], ""
        readers = consumers.get(out, [])
        if len(readers) == 1 and readers[0].op_type == "Add" and out not in outputs:
            other = [i for i in readers[0].input if i != out]
            if len(other) == 1 and other[0] in consts and constant_value(consts, other[0]).shape == (n_out,):
                bias, out = other[0], readers[0].output[0]
                doomed.append(readers[0])
        new = helper.make_node("MatMulIntegerToFloat", [a.input[0], b.input[0], a.input[1], b.input[1],
                                                        a.input[2], b_zp, *([bias] if bias else [])], [out],
                               name=f"{out}/integer_to_float", domain="com.microsoft")
        model.graph.node.insert(list(model.graph.node).index(node), new)
        doomed.append(node)
        count += 1
    remove_nodes(model, doomed)
    use_contrib_ops(model, count)
    return count


def dequantize_unfused_weights(model: onnx.ModelProto, uint8_inputs: set[str]) -> int:
    """A Conv, Gemm or MatMul that ORT cannot fuse (its output not quantized, as a head's last
    layer's, whose outputs stay float, or a transformer projection feeding a residual Add; a
    float input; any ConvTranspose, which has no int8 kernel on ORT's CPU provider) runs in
    float in ORT whatever its inputs: its weight and bias DQs would run at every call, so they
    become the float constants they compute (the same values). (Measured alternatives: a
    ConvInteger + scale keeps the int8 input but ORT's ConvInteger is slower than the DQ and
    float Conv; a Q/DQ on the output, as ORT's own quantizer writes, rounds every output to
    8 bits: ``output_ranges`` does that where asked.)"""
    consts = constant_tensors(model.graph)
    producer = node_producers(model)
    consumers = node_consumers(model)
    outputs = {o.name for o in model.graph.output}
    inits = Initializers(model)
    doomed, count = [], 0
    for node in model.graph.node:
        if node.op_type not in WEIGHTED:
            continue
        if int8_output(node, consumers, consts, outputs) and node.input[0] in uint8_inputs and \
                node.op_type != "ConvTranspose":
            continue  # ORT fuses it into a QLinearConv / QGemm / QLinearMatMul (dropping a Relu)
        for i in (1, 2):
            if i >= len(node.input) or node.input[i] not in producer:
                continue
            dq = producer[node.input[i]]
            if dq.op_type != "DequantizeLinear" or not all(x in consts for x in dq.input if x):
                continue
            x = constant_value(consts, dq.input[0]).astype(np.float64)
            scale = constant_value(consts, dq.input[1]).astype(np.float64)
            zp = constant_value(consts, dq.input[2]).astype(np.float64) if len(dq.input) > 2 else np.zeros(())
            shape = channel_shape(dq, x.ndim, scale)
            value = ((x - zp.reshape(shape if zp.size > 1 else ())) * scale.reshape(shape)).astype(np.float32)
            node.input[i] = inits.add(dq.output[0], value)
            if len(consumers.get(dq.output[0], [])) == 1:
                doomed.append(dq)
            count += 1
    remove_nodes(model, doomed)
    return count


def biases_to_int32(model: onnx.ModelProto, act_scale: dict[str, float], weight_scale: dict[str, np.ndarray],
                    inits: Initializers) -> int:
    """A quantized Conv's float bias becomes int32 at input scale x weight scale (per channel, zero
    point 0) behind a DequantizeLinear on axis 0, as ORT's own quantizer writes it and its
    QLinearConv selector wants (rounding error: half a unit of that scale). ``act_scale`` /
    ``weight_scale``: DQ output name -> scale of the quantized activations and weights."""
    consts = constant_tensors(model.graph)
    count = 0
    for node in list(model.graph.node):
        if node.op_type != "Conv" or len(node.input) < 3 or not node.input[2]:
            continue
        x, w, b = node.input[:3]
        if x not in act_scale or w not in weight_scale or b not in consts:
            continue
        bias = constant_value(consts, b).astype(np.float64)
        scale = (act_scale[x] * weight_scale[w].astype(np.float64)).reshape(-1)
        scale = np.broadcast_to(scale, bias.shape).astype(np.float32)
        if np.any(scale == 0):
            continue
        q = np.rint(bias / scale.astype(np.float64))
        if np.any(np.abs(q) >= 2**31):
            continue
        q_name = inits.add(b + "_int32", q.astype(np.int32))
        s_name = inits.add(b + "_scale", scale)
        z_name = inits.add(b + "_zp", np.zeros(bias.shape, np.int32))
        out = inits.fresh(b + "_dq")
        dq = helper.make_node("DequantizeLinear", [q_name, s_name, z_name], [out], name=f"{node.name}/bias_dq",
                              axis=0)
        node.input[2] = out
        model.graph.node.insert(list(model.graph.node).index(node), dq)
        count += 1
    return count
