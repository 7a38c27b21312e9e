"""The ONNX Runtime flavour of a QDQ graph: Q/DQ placed so ORT runs int8 kernels.

ONNX Runtime's CPU provider runs a quantized Conv as one QLinearConv (int8 in, int8 out)
only when its QDQ selector sees DQ(activation) and DQ(weight) [and DQ(int32 bias)] going
in and a single Q coming out; otherwise it dequantizes and runs the float Conv, which is
slower than the float model (the quantize.md figures). deploykit's QDQ export puts Q at
layer inputs (TensorRT's placement), so between a Conv and the next Q there is often a
ReLU, the bias is a float constant, and activations are signed int8, which ORT's x86
kernels run slower than uint8 activations (U8S8). This pass edits the exported graph:

* weights: Q(constant) folded into an int8 initializer feeding the DQ (per-channel, as
  calibrated), which is what ORT's selectors look for; a Linear's MatMul(x, Transpose(W))
  gets the int8 weight transposed offline;
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
  Concat's output quantizer given its inputs' scale (exact: the values are already on it).

int16 regions become float islands, as in the TensorRT flavour: ORT has int16
QuantizeLinear / DequantizeLinear (opset 21) but no int16 kernels, so an int16 region runs
float kernels between extra int16 Q/DQ passes over its tensors, slower than float and no
more precise (measured on centerpoint_pillar_synth, whose int16 set holds the first PFN
layer: 1.39x the float model's latency with the int16 pairs kept, against 0.79x for int8).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..onnx_graph import constant_tensors, constant_value
from .trt_flavour import _pairs, _remove, int16_pairs_to_float, merge_duplicate_pairs, share_add_concat_scales

# Ops with constant weights (input 1) and bias (input 2) behind DequantizeLinear nodes
WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# Ops that commute with a per-tensor quantizer: Q(op(x)) == op(Q(x)) exactly (they move or
# select values, and quantization is monotonic and elementwise).
COMMUTING = ("MaxPool", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Expand", "Identity")


class _Initializers:
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
        self.model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name


def _consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for name in n.input:
            out.setdefault(name, []).append(n)
    return out


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in model.graph.node for o in n.output}


def _axis(node: onnx.NodeProto) -> int | None:
    return next((a.i for a in node.attribute if a.name == "axis"), None)


def _channel_shape(node: onnx.NodeProto, ndim: int, scale: np.ndarray) -> list[int]:
    """The shape a Q/DQ node's scale broadcasts as against its ndim-D input: per tensor, or
    per channel along the node's axis (ONNX's default axis is 1)."""
    shape = [1] * ndim
    if scale.size > 1:
        axis = _axis(node)
        shape[1 if axis is None else axis] = -1
    return shape


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
    pairs = _pairs(model)
    dq_params = {dq.output[0]: tuple(dq.input[1:]) for _, dq in pairs}
    q_of = {q.name: (q, dq) for q, dq in pairs}
    consumers = _consumers(model)
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
    producer = _producers(model)
    consumers = _consumers(model)
    outputs = {o.name for o in model.graph.output}
    hoisted = 0
    for q, _ in _pairs(model):
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
    dq_of = {q.input[0]: dq.output[0] for q, dq in _pairs(model)}
    moved = 0
    for node in model.graph.node:
        if node.op_type == "Shape" and node.input[0] in dq_of:
            node.input[0] = dq_of[node.input[0]]
            moved += 1
    return moved


def ort_flavour(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
    """Return (an ONNX Runtime-ready copy of ``model``, what was changed)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    int16 = int16_pairs_to_float(model)
    hoisted = _hoist(model)
    merged = merge_duplicate_pairs(model)
    shapes = _shapes_read_dequantized(model)
    shared = share_add_concat_scales(model)
    concat_outputs = _concat_outputs_take_input_scale(model)
    consts = constant_tensors(model.graph)
    const_names = set(consts)
    producer = _producers(model)
    inits = _Initializers(model)
    changes = {"int16_pairs_to_float": int16, "quantizers_hoisted": hoisted, "shapes_moved": shapes,
               "duplicate_pairs_merged": merged, "add_concat_scales_shared": shared,
               "concat_outputs_aligned": concat_outputs, "weights_folded": 0, "biases_to_int32": 0,
               "activations_to_uint8": 0, "relu_ranges_folded": 0}
    weight_scale: dict[str, np.ndarray] = {}  # DQ output name -> its scale (weights)
    act_scale: dict[str, float] = {}  # DQ output name -> its scale (activations, per tensor)
    folded_q = []
    for q, dq in _pairs(model):
        scale = constant_value(consts, q.input[1]).astype(np.float32)
        zp = constant_value(consts, q.input[2]) if len(q.input) > 2 and q.input[2] else np.zeros((), np.int8)
        if q.input[0] in const_names:  # a weight: fold Q(constant) into int8
            w = constant_value(consts, q.input[0]).astype(np.float32)
            shape = _channel_shape(q, w.ndim, scale)
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
        s_name = inits.add(q.input[1] + "_scale", np.asarray(new_scale, np.float32).reshape(scale.shape))
        z_name = inits.add(q.input[1] + "_zp", np.asarray(new_zp, np.uint8).reshape(zp.shape))
        for node in (q, dq):
            node.input[1] = s_name
            if len(node.input) > 2:
                node.input[2] = z_name
            else:
                node.input.append(z_name)
        act_scale[dq.output[0]] = float(new_scale)
    _remove(model, folded_q)
    # Biases: int32 at input scale x weight scale, behind a DequantizeLinear on axis 0.
    for node in list(model.graph.node):
        if node.op_type != "Conv" or len(node.input) < 3 or not node.input[2]:
            continue
        x, w, b = node.input[:3]
        if x not in act_scale or w not in weight_scale or b not in const_names:
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
        changes["biases_to_int32"] += 1
    changes["weight_transposes_folded"] = _transpose_weights_offline(model)
    changes["float_convs_weights_dequantized"] = _dequantize_unfused_weights(model, set(act_scale))
    # Recorded types of quantized tensors are stale (int8 -> uint8): let ORT infer them.
    q_outputs = {n.output[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    kept = [v for v in model.graph.value_info if v.name not in q_outputs]
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept)
    return model, changes


def _transpose_weights_offline(model: onnx.ModelProto) -> int:
    """PyTorch exports Linear as MatMul(x, Transpose(W)): with W behind a DequantizeLinear,
    the Transpose runs on the dequantized weight at every call and hides the weight from
    ORT's MatMul selectors. The int8 weight is transposed once instead, its DQ's axis
    following (the same values)."""
    consts = constant_tensors(model.graph)
    producer = _producers(model)
    consumers = _consumers(model)
    inits = _Initializers(model)
    doomed, count = [], 0
    for node in list(model.graph.node):
        if node.op_type != "Transpose" or node.input[0] not in producer:
            continue
        dq = producer[node.input[0]]
        if dq.op_type != "DequantizeLinear" or not all(x in consts for x in dq.input if x):
            continue
        w = constant_value(consts, dq.input[0])
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), list(range(w.ndim))[::-1])
        axis = _axis(dq)
        axis = 1 if axis is None else axis
        new_dq = helper.make_node("DequantizeLinear", [inits.add(dq.input[0] + "_t", np.transpose(w, perm)),
                                                      *dq.input[1:]], [node.output[0]], name=f"{dq.name}/transposed",
                                  axis=perm.index(axis) if w.ndim > 1 else 0)
        model.graph.node.insert(list(model.graph.node).index(node), new_dq)
        doomed.append(node)
        if len(consumers.get(dq.output[0], [])) == 1:
            doomed.append(dq)
        count += 1
    _remove(model, doomed)
    return count


def _dequantize_unfused_weights(model: onnx.ModelProto, uint8_inputs: set[str]) -> int:
    """A Conv, Gemm or MatMul that ORT cannot fuse (its output not quantized, as a head's last
    layer's, whose outputs stay float, or a transformer projection feeding a residual Add; a
    float input; any ConvTranspose, which has no int8 kernel on ORT's CPU provider) runs in
    float in ORT whatever its inputs: its weight and bias DQs would run at every call, so they
    become the float constants they compute (the same values). (Measured alternatives: a
    ConvInteger + scale keeps the int8 input but ORT's ConvInteger is slower than the DQ and
    float Conv; a Q/DQ on the output, as ORT's own quantizer writes, rounds every output to
    8 bits.)"""
    consts = constant_tensors(model.graph)
    producer = _producers(model)
    consumers = _consumers(model)
    outputs = {o.name for o in model.graph.output}
    inits = _Initializers(model)
    doomed, count = [], 0
    for node in model.graph.node:
        if node.op_type not in WEIGHTED:
            continue
        readers = consumers.get(node.output[0], [])
        if len(readers) == 1 and readers[0].op_type == "Relu" and node.output[0] not in outputs:
            readers = consumers.get(readers[0].output[0], [])
        uint8_out = len(readers) == 1 and readers[0].op_type == "QuantizeLinear" and len(readers[0].input) > 2 and \
            readers[0].input[2] in consts and consts[readers[0].input[2]].data_type == onnx.TensorProto.UINT8
        if uint8_out and node.input[0] in uint8_inputs and node.op_type != "ConvTranspose":
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
            shape = _channel_shape(dq, x.ndim, scale)
            value = ((x - zp.reshape(shape if zp.size > 1 else ())) * scale.reshape(shape)).astype(np.float32)
            node.input[i] = inits.add(dq.output[0], value)
            if len(consumers.get(dq.output[0], [])) == 1:
                doomed.append(dq)
            count += 1
    _remove(model, doomed)
    return count


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


