"""The ONNX Runtime flavour of a QDQ graph: Q/DQ placed so ORT runs int8 kernels.

ONNX Runtime's CPU provider runs a quantized Conv as one QLinearConv (int8 in, int8 out)
only when its QDQ selector sees DQ(activation) and DQ(weight) [and DQ(int32 bias)] going
in and a single Q coming out; otherwise it dequantizes and runs the float Conv, which is
slower than the float model (the quantize.md figures). deploykit's QDQ export puts Q at
layer inputs (TensorRT's placement), so between a Conv and the next Q there is often a
ReLU, the bias is a float constant, and activations are signed int8, which ORT's x86
kernels run slower than uint8 activations (U8S8). This pass edits the exported graph (the
activation rewrites here, the weighted layers' in ort_layers, the float islands' in
ort_islands):

* weights: Q(constant) folded into an int8 initializer feeding the DQ (per-channel, as
  calibrated), which is what ORT's selectors look for;
* biases: a Conv's float bias becomes an int32 initializer at scale input_scale x
  weight_scale (per channel, zero point 0) behind a DequantizeLinear, as ORT's own
  quantizer writes it (rounding error: half a unit of that scale);
* activations: symmetric int8 (scale s, zero point 0) becomes uint8 with zero point 128:
  the same grid, exactly (the code -128 becomes representable, nothing else changes);
* ReLU folded into the range: a Q whose input is a Relu output (through ops that commute
  with it) gets uint8 with zero point 0 and scale amax / 255 (amax = 127 s, the calibrated
  range), so quantization clips at 0 as the Relu does (exact) and ORT drops the Relu and
  fuses DQ -> Conv -> Q; the [0, amax] range also gets 255 steps instead of 127;
* quantizers hoisted over ops that commute with them (MaxPool, Reshape, Expand, ...): a
  PointPillars PFN layer is Conv -> Relu -> max over points -> ... -> Q, which ORT cannot
  fuse; Q moved up to the Relu (exact: the max of quantized values is the quantized max)
  makes the Conv a QLinearConv and the max an int8 MaxPool. Shape nodes reading a tensor
  that has a quantizer read its dequantized copy instead (same shape), so they do not keep
  the float tensor alive;
* one Q/DQ pair per tensor and one scale shared by the quantized inputs of an Add or a
  Concat, as in the TensorRT flavour (QLinearAdd / QLinearConcat need them too), and a
  Concat's output quantizer given its inputs' scale (exact: the values are already on it);
* a Linear's bias Add and a Relu before a zero-point-0 uint8 Q are part of the layer: the Relu
  is removed (the Q clips at 0, exact), since on a 3-D input ORT fuses MatMul + Add into
  Reshape -> Gemm -> Reshape before its QDQ selectors and a Relu left there keeps a float Gemm;
  weights reached through Slice / Transpose / Identity (nn.MultiheadAttention's packed in_proj)
  are sliced and transposed once offline, the per-channel scales following;
* a MatMul of a quantized input whose output stays float (deformable attention's offsets and
  weights, a head's last Linear) becomes ORT's contrib MatMulIntegerToFloat, bias folded in:
  exact, and 1.3-1.6x faster than the DQ + float Gemm ORT runs otherwise (bevformer_small shapes);
* per-tensor scales and zero points are scalars: ORT's selectors for QLinearAdd and the other
  binary ops refuse the exporter's 1-element tensors (bevformer_small's residual Adds ran in
  float), and nodes nothing reads any more are removed (ORT runs a dead DequantizeLinear);
* Q(Concat(x1, .., xn) * Cast(mask)), a PointPillars decoration, becomes Concat(Q(x1), ..,
  Q(xn)) times the 0/1 mask in uint8 (ORT's QLinearMul): exact, the Concat and the masking on
  bytes instead of floats;
* ``output_ranges`` (a graph output's [min, max] on the calibration samples, which the QDQ
  graph does not hold): a head's last Conv gets a uint8 Q/DQ on its output, as ORT's own
  quantizer writes it, and runs as a QLinearConv instead of a float Conv (36 of them on
  centerpoint_pillar_nus, its gap to quantize_static). The output is then rounded to 255 steps
  of its range: measured, the worst-output SQNR moves by 0.01 dB there and by 0.5 dB on
  centerpoint_pillar_synth (18.8 -> 18.3; quantize_static's: 14.2), mAP by +0.0002.

int16 regions become float islands, as in the TensorRT flavour: ORT has int16 QuantizeLinear /
DequantizeLinear (opset 21) but no int16 kernels, and a float island is more precise than the
int16 grid. An island is made cheap rather than split into int8 pieces: a PFN layer's 1x1 Conv
with a float input becomes one Gemm (ORT's NCHWc Conv with 11 input channels plus the reorder
back is 1.6x slower), its quantizer is not hoisted over the max over points, and that max, a
MaxPool spanning the axis, becomes a float ReduceMax (ORT's uint8 NCHW MaxPool, which ran there,
takes 12x as long). On centerpoint_pillar_synth, whose int16 set holds the first PFN layer, the
int8 + int16 flavour then runs within 10% of the int8 one (0.730 against 0.673 of the float
model's latency, 60 interleaved rounds, ORT's thread spinning off; 0.576 against 0.484 in
bench_quantize), where it took 1.5x as long. Splitting an int16 activation into hi and lo bytes
for two U8S8 GEMMs (MatMulIntegerToFloat, as QLinearConv cannot sum the halves in int32) does
not pay on that memory-bound layer (11 channels in): measured 4.6 ms against the island's 1.4
ms, and with int8 weights (the recipe's are int16, which would take four products) 11% of the
output codes moved.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from ..onnx_graph import constant_tensors, constant_value
from .ort_islands import axis_maxpools_to_reducemax, float_layer_output, float_pointwise_convs_to_matmul
from .ort_layers import (biases_to_int32, dequantize_unfused_weights, drop_relus_before_uint8_quantizers,
                         fold_weight_layouts, matmuls_integer_to_float)
from .qdq_graph import (Initializers, channel_shape, element_type, node_consumers, node_producers, qdq_pairs,
                        remove_dead_nodes, remove_nodes, sort_topologically, static_shapes, use_contrib_ops)
from .trt_flavour import int16_pairs_to_float, merge_duplicate_pairs, share_add_concat_scales

# Ops that commute with a per-tensor quantizer: Q(op(x)) == op(Q(x)) exactly (they move or
# select values, and quantization is monotonic and elementwise).
COMMUTING = ("MaxPool", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Expand", "Identity")


def _after_relu(tensor: str, producer: dict, depth: int = 0) -> bool:
    """Whether ``tensor`` is a Relu output, possibly through COMMUTING ops, Q/DQ pairs (a
    hoisted chain) and Concats of such tensors: its quantizer then takes the ReLU range,
    consistently (ORT runs DQ -> MaxPool -> Q, or a Concat, in int8 without requantizing only
    when the scales agree)."""
    node = producer.get(tensor)
    if node is None or depth > 64:
        return False
    if node.op_type == "Relu":
        return True
    if node.op_type == "Concat":
        return all(_after_relu(i, producer, depth + 1) for i in node.input)
    if node.op_type in (*COMMUTING, "DequantizeLinear", "QuantizeLinear"):
        return _after_relu(node.input[0], producer, depth + 1)
    return False


def _concat_outputs_take_input_scale(model: onnx.ModelProto) -> int:
    """A Concat whose inputs are dequantized with one scale (share_add_concat_scales) and whose
    output only feeds quantizers: those quantizers take the inputs' scale and zero point. The
    output's values are the inputs', already on that grid and within its range, so this is
    exact, one rounding fewer than a second calibrated scale, and ORT's QLinearConcat then
    copies bytes instead of requantizing them."""
    pairs = qdq_pairs(model)
    dq_params = {dq.output[0]: tuple(dq.input[1:]) for _, dq in pairs}
    q_of = {q.name: (q, dq) for q, dq in pairs}
    consumers = node_consumers(model)
    consts = constant_tensors(model.graph)
    aligned = 0
    for node in model.graph.node:
        if node.op_type != "Concat" or not all(i in dq_params for i in node.input):
            continue
        params = {dq_params[i] for i in node.input}
        values = {tuple(constant_value(consts, n).tobytes() for n in p) for p in params}
        readers = consumers.get(node.output[0], [])
        if len(values) != 1 or not readers or any(r.op_type != "QuantizeLinear" or r.name not in q_of for r in readers):
            continue
        shared = next(iter(params))
        for reader in readers:
            q, dq = q_of[reader.name]
            for n in (q, dq):
                del n.input[1:]
                n.input.extend(shared)
            aligned += 1
    return aligned


def _hoist(model: onnx.ModelProto) -> int:
    """Copy each activation quantizer that sits behind a chain of COMMUTING ops up to the
    chain's start (the chain keeps its own pair, now idempotent); returns how many."""
    consts = constant_tensors(model.graph)
    producer = node_producers(model)
    consumers = node_consumers(model)
    outputs = {o.name for o in model.graph.output}
    hoisted = 0
    for q, _ in qdq_pairs(model):
        if q.input[0] in consts or constant_value(consts, q.input[1]).size != 1:
            continue
        chain, tensor = [], q.input[0]
        while tensor in producer and producer[tensor].op_type in COMMUTING:
            node = producer[tensor]
            readers = [c for c in consumers.get(tensor, []) if c.op_type != "Shape"]
            if tensor in outputs or (chain and readers != [chain[-1]]):
                break
            chain.append(node)
            tensor = node.input[0]
        if chain and float_layer_output(tensor, producer):
            # A float island's output (an int16 Conv's): ORT would run the max over uint8 in
            # its slow NCHW MaxPool (9 ms on [1, 16, 16, 6000]), where a float ReduceMax takes
            # 0.7 ms (axis_maxpools_to_reducemax); the quantizer stays below the MaxPool.
            pools = [k for k, op in enumerate(chain) if op.op_type == "MaxPool"]
            if pools:
                chain, tensor = chain[:pools[0]], chain[pools[0]].output[0]
        if not chain or tensor in consts:
            continue
        # A pair in front of every op of the chain (the last op's output has q already), so
        # each op sits between a DQ and a Q, which ORT runs as an int8 op or drops.
        for k, op in enumerate(reversed(chain)):
            source = op.input[0]
            out = f"{source}_hoisted_{hoisted}_{k}"
            new_q = helper.make_node("QuantizeLinear", [source, *q.input[1:]], [out + "_q"],
                                     name=f"{q.name}/hoisted_q{k}")
            new_dq = helper.make_node("DequantizeLinear", [out + "_q", *q.input[1:]], [out],
                                      name=f"{q.name}/hoisted_dq{k}")
            op.input[0] = out
            at = list(model.graph.node).index(op)
            model.graph.node.insert(at, new_dq)
            model.graph.node.insert(at, new_q)
        hoisted += 1
    return hoisted


def _shapes_read_dequantized(model: onnx.ModelProto) -> int:
    """Shape nodes reading a tensor that a Q/DQ pair also reads take the DQ's output."""
    dq_of = {q.input[0]: dq.output[0] for q, dq in qdq_pairs(model)}
    moved = 0
    for node in model.graph.node:
        if node.op_type == "Shape" and node.input[0] in dq_of:
            node.input[0] = dq_of[node.input[0]]
            moved += 1
    return moved


def ort_flavour(model: onnx.ModelProto, output_ranges: dict[str, tuple[float, float]] | None = None
                ) -> tuple[onnx.ModelProto, dict]:
    """Return (an ONNX Runtime-ready copy of ``model``, what was changed). ``output_ranges``: graph
    output name -> (min, max) seen on the calibration samples; outputs a quantized layer computes
    get a uint8 Q/DQ over that range, so ORT runs the layer as an int8 kernel (see the module doc)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    int16 = int16_pairs_to_float(model)
    hoisted = _hoist(model)
    merged = merge_duplicate_pairs(model)
    shapes = _shapes_read_dequantized(model)
    shared = share_add_concat_scales(model)
    concat_outputs = _concat_outputs_take_input_scale(model)
    consts = constant_tensors(model.graph)
    const_names = set(consts)
    producer = node_producers(model)
    inits = Initializers(model)
    changes = {"int16_pairs_to_float": int16, "quantizers_hoisted": hoisted, "shapes_moved": shapes,
               "duplicate_pairs_merged": merged, "add_concat_scales_shared": shared,
               "concat_outputs_aligned": concat_outputs, "weights_folded": 0, "activations_to_uint8": 0,
               "relu_ranges_folded": 0}
    weight_scale: dict[str, np.ndarray] = {}  # DQ output name -> its scale (weights)
    act_scale: dict[str, float] = {}  # DQ output name -> its scale (activations, per tensor)
    folded_q = []
    for q, dq in qdq_pairs(model):
        scale = constant_value(consts, q.input[1]).astype(np.float32)
        zp = constant_value(consts, q.input[2]) if len(q.input) > 2 and q.input[2] else np.zeros((), np.int8)
        if q.input[0] in const_names:  # a weight: fold Q(constant) into int8
            w = constant_value(consts, q.input[0]).astype(np.float32)
            shape = channel_shape(q, w.ndim, scale)
            quantized = np.clip(np.rint(w / scale.reshape(shape)) + zp.astype(np.float32).reshape(
                shape if zp.size > 1 else ()), -128, 127).astype(np.int8)
            dq.input[0] = inits.add(q.input[0] + "_int8", quantized)
            folded_q.append(q)
            weight_scale[dq.output[0]] = scale
            changes["weights_folded"] += 1
            continue
        if scale.size != 1 or zp.dtype != np.int8 or np.any(zp != 0):
            continue
        step = float(scale.reshape(-1)[0])
        if _after_relu(q.input[0], producer):
            new_scale, new_zp = step * 127 / 255, np.uint8(0)
            changes["relu_ranges_folded"] += 1
        else:
            new_scale, new_zp = step, np.uint8(128)
        changes["activations_to_uint8"] += 1
        # Scalars, not the exporter's 1-element tensors: ORT's selectors for QLinearAdd / Mul /
        # Softmax ... take only scalar scales (QLinearConv's takes either).
        s_name = inits.add(q.input[1] + "_scale", np.float32(new_scale))
        z_name = inits.add(q.input[1] + "_zp", np.uint8(new_zp))
        for node in (q, dq):
            node.input[1] = s_name
            if len(node.input) > 2:
                node.input[2] = z_name
            else:
                node.input.append(z_name)
        act_scale[dq.output[0]] = float(new_scale)
    remove_nodes(model, folded_q)
    changes["masked_concats_quantized_first"] = _masked_concats_quantized_first(model, inits)
    changes["outputs_quantized"] = _quantize_outputs(model, output_ranges or {}, act_scale, weight_scale, inits)
    changes["biases_to_int32"] = biases_to_int32(model, act_scale, weight_scale, inits)
    changes["weight_layouts_folded"] = fold_weight_layouts(model)
    changes["relus_dropped"] = drop_relus_before_uint8_quantizers(model)
    changes["matmuls_integer_to_float"] = matmuls_integer_to_float(model, set(act_scale))
    changes["float_convs_weights_dequantized"] = dequantize_unfused_weights(model, set(act_scale))
    shapes = static_shapes(model)
    changes["pointwise_convs_to_matmul"] = float_pointwise_convs_to_matmul(model, shapes, inits)
    changes["maxpools_to_reducemax"] = axis_maxpools_to_reducemax(model, shapes, inits)
    changes["dead_nodes_removed"] = remove_dead_nodes(model)
    sort_topologically(model)
    # Recorded types of quantized tensors are stale (int8 -> uint8): let ORT infer them. That
    # includes a Q's output now computed by a QLinear* contrib node (the masked decoration),
    # which an exporter that ran shape inference (opset 21, int16 present) has recorded.
    q_outputs = {o for n in model.graph.node if n.op_type == "QuantizeLinear" or n.domain == "com.microsoft"
                 for o in n.output}
    kept = [v for v in model.graph.value_info if v.name not in q_outputs]
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept)
    return model, changes


def _masked_concats_quantized_first(model: onnx.ModelProto, inits: Initializers) -> int:
    """Q(Concat(x1, .., xn) * Cast(mask)), a PointPillars decoration (point features, offsets
    to the pillar's mean and centre, padded points zeroed), becomes Concat(Q(x1), .., Q(xn))
    masked in uint8: per tensor, quantizing commutes with a Concat, and a 0/1 mask keeps Q(x)
    or gives Q(0) = the zero point (exact for finite features). The Concat and the masking then
    move bytes instead of floats ([1, 11, 20, 30000] on centerpoint_pillar_nus)."""
    consts = constant_tensors(model.graph)
    producer = node_producers(model)
    consumers = node_consumers(model)
    outputs = {o.name for o in model.graph.output}
    doomed, count = [], 0
    for q in [n for n in model.graph.node if n.op_type == "QuantizeLinear"]:
        mul = producer.get(q.input[0])
        if mul is None or mul.op_type != "Mul" or len(q.input) < 3 or q.input[2] not in consts or \
                constant_value(consts, q.input[1]).size != 1 or consumers.get(mul.output[0]) != [q]:
            continue
        by_op = {producer[i].op_type if i in producer else None: producer.get(i) for i in mul.input}
        concat, cast = by_op.get("Concat"), by_op.get("Cast")
        if concat is None or cast is None or len(by_op) != 2 or consumers.get(concat.output[0]) != [mul] or \
                mul.output[0] in outputs or concat.output[0] in outputs or \
                next(a.i for a in cast.attribute if a.name == "to") != onnx.TensorProto.FLOAT or \
                element_type(model, cast.input[0], producer) != onnx.TensorProto.BOOL:
            continue
        at = list(model.graph.node).index(q)
        quantized = []
        for k, x in enumerate(concat.input):
            quantized.append(inits.fresh(f"{x}_q{k}"))
            model.graph.node.insert(at, helper.make_node("QuantizeLinear", [x, *q.input[1:]], [quantized[-1]],
                                                         name=f"{q.name}/input{k}"))
            at += 1
        joined = inits.fresh(concat.output[0] + "_q")
        model.graph.node.insert(at, helper.make_node("Concat", quantized, [joined], name=f"{q.name}/concat",
                                                     axis=next(a.i for a in concat.attribute if a.name == "axis")))
        # The select as ORT's QLinearMul by the 0/1 mask in uint8 (scale 1, zero point 0): (q - zp) * m
        # + zp, exact; 12x faster than a uint8 Where, which ORT broadcasts element by element.
        mask = inits.fresh(cast.input[0] + "_u8")
        one, zero = inits.add(q.name + "_mask_scale", np.float32(1)), inits.add(q.name + "_mask_zp", np.uint8(0))
        model.graph.node.insert(at + 1, helper.make_node("Cast", [cast.input[0]], [mask], name=f"{q.name}/mask_u8",
                                                         to=onnx.TensorProto.UINT8))
        model.graph.node.insert(at + 2, helper.make_node("QLinearMul", [joined, *q.input[1:3], mask, one, zero,
                                                                        *q.input[1:3]], [q.output[0]],
                                                         name=f"{q.name}/mask", domain="com.microsoft"))
        doomed += [q, mul, concat]
        count += 1
    remove_nodes(model, doomed)
    use_contrib_ops(model, count)
    return count


def _quantize_outputs(model: onnx.ModelProto, ranges: dict, act_scale: dict, weight_scale: dict,
                      inits: Initializers) -> int:
    """A graph output computed by a Conv / Gemm / MatMul from a quantized input and an int8 weight
    gets a Q/DQ pair, uint8 over its calibrated [min, max] (widened to hold 0, as ORT's own
    quantizer does): ORT then fuses DQ -> Conv -> Q into a QLinearConv instead of a float Conv."""
    producer = node_producers(model)
    consumers = node_consumers(model)
    count = 0
    for out in model.graph.output:
        tensor, node = out.name, producer.get(out.name)
        while node is not None and node.op_type == "Identity" and len(consumers.get(node.input[0], [])) == 1:
            tensor, node = node.input[0], producer.get(node.input[0])
        if out.name not in ranges or node is None or node.op_type not in ("Conv", "Gemm", "MatMul") or \
                node.input[0] not in act_scale or node.input[1] not in weight_scale:
            continue
        lo, hi = min(float(ranges[out.name][0]), 0.0), max(float(ranges[out.name][1]), 0.0)
        if hi - lo <= 0:
            continue
        scale = np.float32((hi - lo) / 255)
        zp = np.uint8(np.clip(np.rint(-lo / scale), 0, 255))
        s_name, z_name = inits.add(out.name + "_out_scale", scale), inits.add(out.name + "_out_zp", zp)
        raw, q_out = inits.fresh(tensor + "_float"), inits.fresh(tensor + "_q")
        node.output[0] = raw
        at = list(model.graph.node).index(node) + 1
        model.graph.node.insert(at, helper.make_node("DequantizeLinear", [q_out, s_name, z_name], [tensor],
                                                     name=f"{tensor}/output_dq"))
        model.graph.node.insert(at, helper.make_node("QuantizeLinear", [raw, s_name, z_name], [q_out],
                                                     name=f"{tensor}/output_q"))
        count += 1
    return count


def widen_output_ranges(ranges: dict[str, tuple[float, float]], outputs: dict[str, np.ndarray]) -> None:
    """Fold one calibration sample's (float) outputs into ``ranges``, name -> (min, max): what
    ``ort_flavour(..., output_ranges=)`` takes."""
    for name, value in outputs.items():
        value = np.asarray(value)
        if value.size and np.issubdtype(value.dtype, np.floating):
            lo, hi = ranges.get(name, (np.inf, -np.inf))
            ranges[name] = (min(lo, float(value.min())), max(hi, float(value.max())))


def qlinear_kernels(model: onnx.ModelProto) -> dict[str, int]:
    """How many of each op ONNX Runtime (CPU, all optimizations) runs ``model`` with: the
    QLinear* and other int8 kernels it fused, next to the float ones left."""
    import collections
    import tempfile
    from pathlib import Path

    import onnxruntime as ort

    from ..engines.ort import _disabled_optimizers, prepare

    prepared = prepare(model, "function")
    with tempfile.TemporaryDirectory(prefix="deploykit-ort-") as tmp:
        path = Path(tmp) / "optimized.onnx"
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.optimized_model_filepath = str(path)
        opts.log_severity_level = 3
        ort.InferenceSession(prepared.SerializeToString(), opts, providers=["CPUExecutionProvider"],
                             disabled_optimizers=_disabled_optimizers(prepared))
        optimized = onnx.load(str(path), load_external_data=False)
    return dict(collections.Counter(n.op_type for n in optimized.graph.node))


