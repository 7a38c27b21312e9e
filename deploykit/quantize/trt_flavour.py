"""The TensorRT flavour of a QDQ graph.

TensorRT has no int16: a region the recipe keeps in int16 runs there in fp16
(or fp32), so its Q/DQ pairs are removed and the region is a float island
between int8 layers. TensorRT also expects Q/DQ placed the way its fusions
read them:

* one Q/DQ pair per quantized tensor: several consumers of one tensor (the
  same query feeding sampling_offsets and attention_weights) share one pair;
* the quantized inputs of an Add or a Concat share one scale, so the op can
  run in int8 without rescaling each input: their pairs get the largest of
  their scales (a wider range, never a clipped one).

These are graph edits on the exported QDQ model; deploykit's ONNX Runtime
engine runs the result like any other graph.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx

from ..onnx_graph import constant_tensors, constant_value, set_constant
from .qdq_graph import qdq_pairs, remove_nodes, rename_input


def tensorrt_flavour(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
    """Return (a TensorRT-ready copy of ``model``, what was changed). ``model`` is
    best exported with the int16 quantizers off (deploykit's pipeline does), so it
    stays at its own opset; int16 pairs still present are removed here."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    removed16 = int16_pairs_to_float(model)
    merged = merge_duplicate_pairs(model)
    shared = share_add_concat_scales(model)
    changes = {"int16_pairs_to_float": removed16, "duplicate_pairs_merged": merged, "add_concat_scales_shared": shared}
    return model, changes


def int16_pairs_to_float(model: onnx.ModelProto) -> int:
    """Remove the int16 Q/DQ pairs (in place): the regions they quantize become float
    islands. Returns how many pairs."""
    consts = constant_tensors(model.graph)
    doomed = []
    for q, dq in qdq_pairs(model):
        if len(q.input) > 2 and q.input[2] and constant_value(consts, q.input[2]).dtype == np.int16:
            rename_input(model, dq.output[0], q.input[0])
            doomed += [q, dq]
    remove_nodes(model, doomed)
    return len(doomed) // 2


def merge_duplicate_pairs(model: onnx.ModelProto) -> int:
    """One pair per tensor: consumers of duplicate pairs (same tensor, scale and axis) share
    the first. Returns how many pairs were removed."""
    consts = constant_tensors(model.graph)
    doomed, seen = [], {}
    for q, dq in qdq_pairs(model):
        key = (q.input[0], constant_value(consts, q.input[1]).tobytes(), tuple((a.name, a.i) for a in q.attribute))
        if key in seen:
            rename_input(model, dq.output[0], seen[key])
            doomed += [q, dq]
        else:
            seen[key] = dq.output[0]
    remove_nodes(model, doomed)
    return len(doomed) // 2


def share_add_concat_scales(model: onnx.ModelProto) -> int:
    """Add / Concat inputs that are all dequantized (per tensor) share the largest of their
    scales (a wider range, never a clipped one). Returns how many ops were changed."""
    consts = constant_tensors(model.graph)
    dq_of = {dq.output[0]: (q, dq) for q, dq in qdq_pairs(model)}
    shared = 0
    for node in model.graph.node:
        if node.op_type not in ("Add", "Concat") or not node.input:
            continue
        if not all(i in dq_of for i in node.input):
            continue
        pairs = [dq_of[i] for i in node.input]
        scales = [constant_value(consts, q.input[1]) for q, _ in pairs]
        if any(s.size != 1 for s in scales) or len({float(s.reshape(-1)[0]) for s in scales}) == 1:
            continue
        widest = max(scales, key=lambda s: float(s.reshape(-1)[0]))  # 0-d or 1-element, as exported
        for q, dq in pairs:
            for name in {q.input[1], dq.input[1]}:
                set_constant(consts, name, widest)
        shared += 1
    return shared


def duplicate_pairs(model: onnx.ModelProto) -> int:
    per_tensor = defaultdict(int)
    for q, _ in qdq_pairs(model):
        per_tensor[q.input[0]] += 1
    return sum(c - 1 for c in per_tensor.values())
