"""The ONNX Runtime flavour of a QDQ graph (deploykit.quantize.ort_flavour).

Small QDQ graphs as deploykit exports them (symmetric int8 Q/DQ at layer inputs, per-channel
int8 weights, float biases, Relu between a Conv and the next Q, a PointPillars-style max over
points before the Q) go through the pass; ONNX Runtime must then run the convolutions as
QLinearConv, and the outputs must match the exported graph's within the int8 step where the
pass is exact by construction, or within what QLinearConv's requantization adds.
"""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from deploykit.engines import ort
from deploykit.quantize.ort_flavour import COMMUTING, ort_flavour, qlinear_kernels, widen_output_ranges

RNG = np.random.default_rng(0)


def _qdq(name, tensor, scale, nodes, inits, zp_dtype=np.int8, axis=None):
    s, z = f"{name}_s", f"{name}_z"
    inits += [numpy_helper.from_array(np.asarray(scale, np.float32), s),
              numpy_helper.from_array(np.zeros(np.shape(scale), zp_dtype), z)]
    kw = {} if axis is None else {"axis": axis}
    nodes += [helper.make_node("QuantizeLinear", [tensor, s, z], [f"{name}_q"], name=f"{name}/Q", **kw),
              helper.make_node("DequantizeLinear", [f"{name}_q", s, z], [f"{name}_dq"], name=f"{name}/DQ", **kw)]
    return f"{name}_dq"


def _conv(name, x, cin, cout, nodes, inits, relu=True):
    w = RNG.standard_normal((cout, cin, 3, 3)).astype(np.float32) * 0.2
    inits += [numpy_helper.from_array(w, f"{name}_w"),
              numpy_helper.from_array(RNG.standard_normal(cout).astype(np.float32) * 0.1, f"{name}_b")]
    wq = _qdq(f"{name}_wq", f"{name}_w", np.abs(w).reshape(cout, -1).max(1) / 127, nodes, inits, axis=0)
    nodes.append(helper.make_node("Conv", [x, wq, f"{name}_b"], [f"{name}_out"], name=f"{name}/Conv", pads=[1] * 4))
    if not relu:
        return f"{name}_out"
    nodes.append(helper.make_node("Relu", [f"{name}_out"], [f"{name}_relu"], name=f"{name}/Relu"))
    return f"{name}_relu"


def _model(pfn_max=False):
    """x -> Q/DQ -> conv1 -> relu -> [max over the last axis] -> Q/DQ -> conv2 -> relu -> Q/DQ -> head conv -> y"""
    nodes, inits = [], []
    x = _qdq("x", "x", 4.0 / 127, nodes, inits)
    t = _conv("c1", x, 8, 16, nodes, inits)
    if pfn_max:
        nodes.append(helper.make_node("MaxPool", [t], ["c1_max"], kernel_shape=[1, 12], name="pfn/MaxPool"))
        nodes.append(helper.make_node("Shape", [t], ["c1_shape"], name="pfn/Shape"))
        nodes.append(helper.make_node("Expand", ["c1_max", "c1_shape"], ["c1_expanded"], name="pfn/Expand"))
        t = "c1_expanded"
    t = _qdq("a1", t, 3.0 / 127, nodes, inits)
    t = _conv("c2", t, 16, 16, nodes, inits)
    t = _qdq("a2", t, 3.0 / 127, nodes, inits)
    _conv("head", t, 16, 3, nodes, inits, relu=False)
    nodes.append(helper.make_node("Identity", ["head_out"], ["y"], name="out"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 10, 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 10, 12])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("pfn_max", [False, True], ids=["conv-relu", "conv-relu-max"])
def test_onnx_runtime_fuses_the_flavour_into_int8_kernels(pfn_max):
    model = _model(pfn_max)
    flavoured, changes = ort_flavour(model)
    onnx.checker.check_model(flavoured)
    before, after = qlinear_kernels(model), qlinear_kernels(flavoured)
    assert before.get("QLinearConv", 0) == 0  # the TensorRT placement: ORT dequantizes and runs float convs
    assert after.get("QLinearConv", 0) == 2, after  # conv1 and conv2; the head's output stays float
    # a1 and a2, and in the PFN case the two pairs hoisted before the MaxPool and the Expand
    assert changes["relu_ranges_folded"] == (4 if pfn_max else 2) and changes["biases_to_int32"] == 3
    assert changes["float_convs_weights_dequantized"] == 2  # the head's weight and bias, back to float
    assert changes["quantizers_hoisted"] == (1 if pfn_max else 0)
    x = {"x": RNG.uniform(-4, 4, (1, 8, 10, 12)).astype(np.float32)}
    want = ort.build(model, threads=1, optimization="none").run(x)["y"]
    got = ort.build(flavoured, threads=1).run(x)["y"]
    # QLinearConv requantizes once per layer (half an output step) where the QDQ graph rounds
    # the float sum; two layers of that, relative to the output's range.
    assert np.abs(got - want).max() <= 0.03 * np.abs(want).max()


def test_the_rewrites_exact_by_construction_change_nothing_before_fusion():
    """Without ORT's fusions (optimization none) the flavour computes what the exported graph
    does: uint8 with zero point 128 is the int8 grid, a ReLU range on [0, amax] with 255 steps
    holds the 127 steps of the symmetric one, weights folded to int8 are the Q's output, int32
    biases are within half a step, the hoisted Q commutes with the max."""
    for pfn_max in (False, True):
        model = _model(pfn_max)
        flavoured, _ = ort_flavour(model)
        x = {"x": RNG.uniform(-4, 4, (1, 8, 10, 12)).astype(np.float32)}
        want = ort.build(model, threads=1, optimization="none").run(x)["y"]
        got = ort.build(flavoured, threads=1, optimization="none").run(x)["y"]
        # The finer ReLU grid moves values by at most half the coarse step: 1.5/127 on a 3.0 range.
        assert np.abs(got - want).max() <= 0.02 * np.abs(want).max()


def test_activations_become_uint8_and_weights_int8_initializers():
    flavoured, changes = ort_flavour(_model())
    consts = {t.name: numpy_helper.to_array(t) for t in flavoured.graph.initializer}
    qs = [n for n in flavoured.graph.node if n.op_type == "QuantizeLinear"]
    assert qs and all(consts[q.input[2]].dtype == np.uint8 for q in qs)  # activations only: weights are folded
    zps = {q.name: int(consts[q.input[2]].reshape(-1)[0]) for q in qs}
    assert zps == {"x/Q": 128, "a1/Q": 0, "a2/Q": 0}  # the input has no ReLU: the symmetric grid, shifted
    weights = [n for n in flavoured.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in consts
               and consts[n.input[0]].dtype == np.int8]
    assert len(weights) == 2 and changes["weights_folded"] == 3
    head = next(n for n in flavoured.graph.node if n.name == "head/Conv")
    assert head.input[1] in consts and consts[head.input[1]].dtype == np.float32  # its output is a graph output


def test_int16_pairs_become_float_islands():
    model = _model()
    for t in model.graph.initializer:
        if t.name == "a1_z":
            t.CopyFrom(numpy_helper.from_array(np.zeros((), np.int16), "a1_z"))
    model.opset_import[0].version = 21
    flavoured, changes = ort_flavour(model)
    assert changes["int16_pairs_to_float"] == 1
    assert "a1/Q" not in {n.name for n in flavoured.graph.node}
    # conv1's output and conv2's input are float now: neither can be a QLinearConv, and their
    # weights and biases (with the head's) are float constants rather than DQs run every call.
    assert qlinear_kernels(flavoured).get("QLinearConv", 0) == 0
    assert changes["float_convs_weights_dequantized"] == 5  # conv2's bias was never quantized (float input)
    x = {"x": RNG.uniform(-4, 4, (1, 8, 10, 12)).astype(np.float32)}
    ort.build(flavoured, threads=1).run(x)


def test_commuting_ops_really_commute_with_quantization():
    """Q(op(x)) == op(Q(x)) for what the hoist moves quantizers over (MaxPool shown)."""
    assert "MaxPool" in COMMUTING and "Relu" not in COMMUTING
    x = RNG.standard_normal((1, 4, 6, 12)).astype(np.float32)

    def q(v):
        return np.clip(np.rint(v / 0.02), -128, 127)

    pooled = x.reshape(1, 4, 6, 1, 12).max(-1)
    np.testing.assert_array_equal(q(pooled), q(x).reshape(1, 4, 6, 1, 12).max(-1))


def test_quantize_writes_the_ort_flavours(bev_quantized_dir):
    """quantize: model.ort.int8.qdq.onnx (and model.ort.qdq.onnx with int16 overrides) next to the
    other files, checked in ONNX Runtime against the fake-quant model like them."""
    import json

    report = json.loads((bev_quantized_dir / "fidelity.json").read_text())["onnxruntime_vs_fake_quant"]
    for key, name in (("ort_int8", "model.ort.int8.qdq.onnx"), ("ort_int8_int16", "model.ort.qdq.onnx")):
        assert report[key]["file"] == name and (bev_quantized_dir / name).is_file()
        assert min(o["cosine"] for o in report[key]["outputs"]) > 0.99, report[key]
        assert report[key]["changes"]["weights_folded"] > 0
    manifest = json.loads((bev_quantized_dir / "manifest.json").read_text())
    assert manifest["onnx"]["ort_int8"] == "model.ort.int8.qdq.onnx"


def test_a_linear_layer_gets_its_weight_transposed_offline_and_fused():
    """PyTorch's Linear export, MatMul(x, Transpose(DQ(W))) + Add(bias), with Q at the output:
    the flavour transposes the int8 weight once (the per-channel axis following) and ORT runs
    the layer in int8; unoptimized, the flavour computes what the export does."""
    nodes, inits = [], []
    x = _qdq("x", "x", 2.0 / 127, nodes, inits)
    w = RNG.standard_normal((6, 5)).astype(np.float32)  # (out, in), per-channel on axis 0
    inits += [numpy_helper.from_array(w, "w"), numpy_helper.from_array(RNG.standard_normal(6).astype(np.float32), "b")]
    wq = _qdq("wq", "w", np.abs(w).max(1) / 127, nodes, inits, axis=0)
    nodes += [helper.make_node("Transpose", [wq], ["wt"], perm=[1, 0]),
              helper.make_node("MatMul", [x, "wt"], ["mm"]), helper.make_node("Add", ["mm", "b"], ["lin"])]
    y = _qdq("y", "lin", 6.0 / 127, nodes, inits)
    nodes.append(helper.make_node("Identity", [y], ["out"]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 5])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [3, 6])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    flavoured, changes = ort_flavour(model)
    assert changes["weight_layouts_folded"] == 1
    assert "Transpose" not in {n.op_type for n in flavoured.graph.node}
    feeds = {"x": RNG.uniform(-2, 2, (3, 5)).astype(np.float32)}
    want = ort.build(model, threads=1, optimization="none").run(feeds)["out"]
    got = ort.build(flavoured, threads=1, optimization="none").run(feeds)["out"]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    kernels = qlinear_kernels(flavoured)
    assert "MatMul" not in kernels and "Gemm" not in kernels, kernels  # an int8 kernel (QGemm / QLinearMatMul)


def _dead_nodes(model):
    read = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    return [n.op_type for n in model.graph.node if not any(o in read for o in n.output)]


def test_calibrated_output_ranges_turn_the_head_convs_into_qlinearconv():
    """output_ranges: the head's last conv gets a uint8 Q/DQ over its calibrated [min, max] and
    ORT fuses it too; the output then moves by at most half an output step beyond what the
    other layers' requantization adds (the tolerance of the fusion test above)."""
    model = _model()
    x = {"x": RNG.uniform(-4, 4, (1, 8, 10, 12)).astype(np.float32)}
    want = ort.build(model, threads=1, optimization="none").run(x)["y"]
    ranges = {}
    widen_output_ranges(ranges, {"y": want})
    flavoured, changes = ort_flavour(model, output_ranges=ranges)
    onnx.checker.check_model(flavoured)
    assert changes["outputs_quantized"] == 1 and changes["float_convs_weights_dequantized"] == 0
    assert qlinear_kernels(flavoured).get("QLinearConv", 0) == 3
    got = ort.build(flavoured, threads=1).run(x)["y"]
    step = (ranges["y"][1] - min(ranges["y"][0], 0)) / 255
    assert np.abs(got - want).max() <= 0.03 * np.abs(want).max() + step / 2


def _linear(nodes, inits, name, x, k, n, tail, bias=True):
    """PyTorch's Linear export: MatMul(x, Transpose(DQ(W))) [+ Add(bias)], W per-channel on axis 0."""
    w = RNG.standard_normal((n, k)).astype(np.float32)
    inits.append(numpy_helper.from_array(w, f"{name}_w"))
    wq = _qdq(f"{name}_wq", f"{name}_w", np.abs(w).max(1) / 127, nodes, inits, axis=0)
    nodes += [helper.make_node("Transpose", [wq], [f"{name}_wt"], perm=[1, 0]),
              helper.make_node("MatMul", [x, f"{name}_wt"], [f"{name}_mm"])]
    out = f"{name}_mm"
    if bias:
        inits.append(numpy_helper.from_array(RNG.standard_normal(n).astype(np.float32), f"{name}_b"))
        nodes.append(helper.make_node("Add", [out, f"{name}_b"], [f"{name}_lin"]))
        out = f"{name}_lin"
    for op in tail:
        nodes.append(helper.make_node(op, [out], [f"{out}_{op}"]))
        out = f"{out}_{op}"
    return out


def _graph_model(nodes, inits, shape, out):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_linear_on_a_3d_input_keeps_its_relu_out_of_the_way_of_qgemm():
    """MatMul + bias + Relu + Q on [1, tokens, channels]: ORT fuses MatMul + Add into Reshape ->
    Gemm -> Reshape before its QDQ selectors, and a Relu left between the Reshape and the Q
    keeps the Gemm float; the flavour drops the Relu (the zero-point-0 uint8 Q clips at 0,
    exact) and the layer runs as a QGemm with the calibrated per-channel weights."""
    nodes, inits = [], []
    x = _qdq("x", "x", 2.0 / 127, nodes, inits)
    t = _linear(nodes, inits, "fc", x, 8, 16, ["Relu"])
    y = _qdq("y", t, 6.0 / 127, nodes, inits)
    nodes.append(helper.make_node("Identity", [y], ["out"]))
    model = _graph_model(nodes, inits, [1, 20, 8], "out")
    flavoured, changes = ort_flavour(model)
    assert changes["relus_dropped"] == 1 and "Relu" not in {n.op_type for n in flavoured.graph.node}
    kernels = qlinear_kernels(flavoured)
    assert kernels.get("QGemm", 0) == 1 and "Gemm" not in kernels, kernels
    feeds = {"x": RNG.uniform(-2, 2, (1, 20, 8)).astype(np.float32)}
    want = ort.build(model, threads=1, optimization="none").run(feeds)["out"]
    # The output is on the ReLU range's finer grid (255 steps for the 127 of the export): the
    # two roundings differ by at most half a step of each.
    coarse = 6.0 / 127
    bound = coarse / 2 * (1 + 127 / 255) + 1e-6
    for level in ("none", "all"):
        assert np.abs(ort.build(flavoured, threads=1, optimization=level).run(feeds)["out"] - want).max() <= bound


def test_a_float_output_linear_becomes_matmul_integer_to_float():
    """A Linear whose output stays float (sampling offsets, attention weights before a Softmax)
    runs as ORT's MatMulIntegerToFloat with the bias folded in: the int8 GEMM with a float
    result, equal to DQ + float MatMul + Add up to float rounding; the input's DQ, read by
    nothing else now, is removed (ORT would run it anyway)."""
    nodes, inits = [], []
    x = _qdq("x", "x", 2.0 / 127, nodes, inits)
    out = _linear(nodes, inits, "offsets", x, 8, 12, ["Softmax"])
    model = _graph_model(nodes, inits, [1, 30, 8], out)
    flavoured, changes = ort_flavour(model)
    assert changes["matmuls_integer_to_float"] == 1 and not _dead_nodes(flavoured)
    kernels = qlinear_kernels(flavoured)
    assert kernels.get("MatMulIntegerToFloat") == 1 and not {"Gemm", "MatMul", "DequantizeLinear"} & set(kernels)
    feeds = {"x": RNG.uniform(-2, 2, (1, 30, 8)).astype(np.float32)}
    want = ort.build(model, threads=1, optimization="none").run(feeds)[out]
    got = ort.build(flavoured, threads=1).run(feeds)[out]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_a_sliced_packed_weight_and_bias_are_folded_and_fused():
    """nn.MultiheadAttention's q projection: MatMul(x, Transpose(Slice(DQ(in_proj_weight)))) +
    Slice(in_proj_bias), then Q: the slices are taken once offline (the per-channel scales of
    the rows kept with them) and ORT runs a QGemm; unoptimized, the same values."""
    nodes, inits = [], []
    x = _qdq("x", "x", 2.0 / 127, nodes, inits)
    w = RNG.standard_normal((24, 8)).astype(np.float32)  # q, k, v packed: 3 x 8 rows
    inits += [numpy_helper.from_array(w, "in_w"), numpy_helper.from_array(RNG.standard_normal(24).astype(np.float32),
                                                                          "in_b")]
    wq = _qdq("wq", "in_w", np.abs(w).max(1) / 127, nodes, inits, axis=0)
    for name, value in (("starts", [8]), ("ends", [16]), ("axes", [0])):
        inits.append(numpy_helper.from_array(np.array(value, np.int64), name))
    nodes += [helper.make_node("Slice", [wq, "starts", "ends", "axes"], ["wk"]),
              helper.make_node("Transpose", ["wk"], ["wkt"], perm=[1, 0]),
              helper.make_node("Slice", ["in_b", "starts", "ends", "axes"], ["bk"]),
              helper.make_node("MatMul", [x, "wkt"], ["mm"]), helper.make_node("Add", ["mm", "bk"], ["k"])]
    y = _qdq("y", "k", 6.0 / 127, nodes, inits)
    nodes.append(helper.make_node("Identity", [y], ["out"]))
    model = _graph_model(nodes, inits, [5, 8], "out")
    flavoured, changes = ort_flavour(model)
    assert changes["weight_layouts_folded"] == 2  # the weight's Slice, then its Transpose
    assert not {"Slice", "Transpose"} & {n.op_type for n in flavoured.graph.node}
    feeds = {"x": RNG.uniform(-2, 2, (5, 8)).astype(np.float32)}
    want = ort.build(model, threads=1, optimization="none").run(feeds)["out"]
    np.testing.assert_allclose(ort.build(flavoured, threads=1, optimization="none").run(feeds)["out"], want, atol=1e-6)
    assert qlinear_kernels(flavoured).get("QGemm") == 1


def test_one_element_scales_become_scalars_so_ort_fuses_a_qlinear_add():
    """The exporter writes per-tensor scales as 1-element tensors; ORT's QLinearAdd selector
    takes only scalars, so a residual DQ + DQ -> Add -> Q stayed float. Scalars, the same
    values: a QLinearAdd."""
    nodes, inits = [], []
    a = _qdq("a", "x", [3.0 / 127], nodes, inits)
    b = _qdq("b", "x2", [2.0 / 127], nodes, inits)
    nodes += [helper.make_node("Neg", ["x"], ["x2"]), helper.make_node("Add", [a, b], ["s"])]
    y = _qdq("y", "s", [4.0 / 127], nodes, inits)
    nodes.append(helper.make_node("Identity", [y], ["out"]))
    model = _graph_model(nodes, inits, [1, 4, 6, 6], "out")
    assert "QLinearAdd" not in qlinear_kernels(model)
    flavoured, _ = ort_flavour(model)
    assert qlinear_kernels(flavoured).get("QLinearAdd") == 1
    feeds = {"x": RNG.uniform(-2, 2, (1, 4, 6, 6)).astype(np.float32)}
    want = ort.build(model, threads=1, optimization="none").run(feeds)["out"]
    assert np.abs(ort.build(flavoured, threads=1).run(feeds)["out"] - want).max() <= 4.0 / 127 + 1e-6


def _pfn_model(int16: bool):
    """A PointPillars PFN layer on [1, C, points, pillars]: Q(x) -> 1x1 conv -> Relu -> max over
    the points -> Expand -> Concat with the per-point features -> Q -> 1x1 conv -> y, with the
    first layer's quantizers int16 (a sensitivity search's choice) or int8."""
    nodes, inits = [], []
    x = _qdq("x", "x", 25.0 / (32767 if int16 else 127), nodes, inits, zp_dtype=np.int16 if int16 else np.int8)
    w = RNG.standard_normal((16, 11, 1, 1)).astype(np.float32)
    inits += [numpy_helper.from_array(w, "c1_w"), numpy_helper.from_array(RNG.standard_normal(16).astype(np.float32),
                                                                          "c1_b")]
    wq = _qdq("c1_wq", "c1_w", np.abs(w).reshape(16, -1).max(1) / (32767 if int16 else 127), nodes, inits, axis=0,
              zp_dtype=np.int16 if int16 else np.int8)
    nodes += [helper.make_node("Conv", [x, wq, "c1_b"], ["c1"]), helper.make_node("Relu", ["c1"], ["r1"]),
              helper.make_node("MaxPool", ["r1"], ["m1"], kernel_shape=[8, 1], strides=[8, 1]),
              helper.make_node("Shape", ["r1"], ["r1_shape"]), helper.make_node("Expand", ["m1", "r1_shape"], ["e1"])]
    pa, pb = _qdq("cat_a", "r1", 20.0 / 127, nodes, inits), _qdq("cat_b", "e1", 20.0 / 127, nodes, inits)
    nodes.append(helper.make_node("Concat", [pa, pb], ["cat"], axis=1))
    t = _qdq("c2_in", "cat", 20.0 / 127, nodes, inits)
    w2 = RNG.standard_normal((4, 32, 1, 1)).astype(np.float32) * 0.2
    inits.append(numpy_helper.from_array(w2, "c2_w"))
    nodes.append(helper.make_node("Conv", [t, _qdq("c2_wq", "c2_w", np.abs(w2).reshape(4, -1).max(1) / 127, nodes,
                                                   inits, axis=0)], ["y"]))
    graph = helper.make_graph(nodes, "pfn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 11, 8, 50])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 50])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def test_an_int16_pfn_layer_runs_as_a_gemm_and_a_float_reducemax():
    """The int16 first PFN layer, a float island: its 1x1 Conv becomes one Gemm over the
    channels (ORT's NCHWc float Conv with 11 input channels, plus the reorder back, is 1.6x
    slower), and the max over the points stays float (the quantizer is not hoisted over it)
    and becomes a ReduceMax, where ORT would run a uint8 NCHW MaxPool 12x slower. Against the
    exported graph: the island skips the int16 rounding, then the same int8 grids."""
    model = _pfn_model(int16=True)
    flavoured, changes = ort_flavour(model)
    onnx.checker.check_model(flavoured)
    assert changes["int16_pairs_to_float"] == 2 and changes["pointwise_convs_to_matmul"] == 1
    assert changes["maxpools_to_reducemax"] == 1
    kernels = qlinear_kernels(flavoured)
    assert {"Gemm", "ReduceMax", "QLinearConcat"} <= set(kernels) and "MaxPool" not in kernels, kernels
    x = {"x": RNG.uniform(-25, 25, (1, 11, 8, 50)).astype(np.float32)}
    want = ort.build(model, threads=1, optimization="none").run(x)["y"]
    for level in ("none", "all"):
        got = ort.build(flavoured, threads=1, optimization=level).run(x)["y"]
        # an int8 step of the concat's grid (20 / 127) can flip where the int16 rounding sat on
        # a tie; through the second conv that is at most its weights' row sum of it
        assert np.abs(got - want).max() <= 0.02 * np.abs(want).max(), level


def test_an_int8_pfn_layer_keeps_its_max_in_int8_after_the_qlinearconv():
    """In int8 the max follows a QLinearConv, in ORT's NHWC layout: it stays an int8 MaxPool
    (faster there than a ReduceMax) and the conv stays a QLinearConv, not a Gemm."""
    flavoured, changes = ort_flavour(_pfn_model(int16=False))
    assert changes["pointwise_convs_to_matmul"] == 0 and changes["maxpools_to_reducemax"] == 0
    kernels = qlinear_kernels(flavoured)
    assert kernels.get("QLinearConv") == 1 and kernels.get("NhwcMaxPool") == 1, kernels


@pytest.mark.parametrize("types_recorded", [False, True], ids=["types inferred", "types recorded"])
def test_a_masked_decoration_concat_is_quantized_before_the_concat(types_recorded):
    """Q(Concat(points, offsets) * Cast(mask)) -> QLinearMul(Concat(Q(points), Q(offsets)), mask):
    the Concat and the masking move bytes; quantization commutes with both, so the codes are
    the same ones, bit for bit. With the graph's tensor types recorded (the exporter does so at
    opset 21, when an int16 set is present elsewhere) the int8 type of the Q's output, now the
    QLinearMul's uint8, must not survive: ORT refused such a graph."""
    nodes, inits = [], []
    inits += [numpy_helper.from_array(np.arange(8, dtype=np.float32).reshape(1, 1, 8, 1), "slot"),
              numpy_helper.from_array(np.float32(0.5), "half")]
    nodes += [helper.make_node("Sub", ["x", "half"], ["offsets"]),
              helper.make_node("Concat", ["x", "offsets"], ["features"], axis=1),
              helper.make_node("Less", ["slot", "count"], ["valid"]),
              helper.make_node("Cast", ["valid"], ["mask"], to=TensorProto.FLOAT),
              helper.make_node("Mul", ["features", "mask"], ["decorated"])]
    t = _qdq("pfn_in", "decorated", 4.0 / 127, nodes, inits)
    w = RNG.standard_normal((6, 8, 1, 1)).astype(np.float32)
    inits.append(numpy_helper.from_array(w, "c_w"))
    nodes.append(helper.make_node("Conv", [t, _qdq("c_wq", "c_w", np.abs(w).reshape(6, -1).max(1) / 127, nodes, inits,
                                                   axis=0)], ["y"]))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 30]),
              helper.make_tensor_value_info("count", TensorProto.FLOAT, [1, 1, 1, 30])]
    graph = helper.make_graph(nodes, "decoration", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 8, 30])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    if types_recorded:
        model = onnx.shape_inference.infer_shapes(model)
        assert any(v.name == t and v.type.tensor_type.elem_type == TensorProto.INT8 for v in model.graph.value_info
                   for t in [n.output[0] for n in model.graph.node if n.op_type == "QuantizeLinear"])
    flavoured, changes = ort_flavour(model)
    onnx.checker.check_model(flavoured)
    assert changes["masked_concats_quantized_first"] == 1
    ops = {n.op_type for n in flavoured.graph.node}
    assert "QLinearMul" in ops and "Mul" not in ops
    feeds = {"x": RNG.uniform(-4, 4, (1, 4, 8, 30)).astype(np.float32),
             "count": RNG.integers(0, 9, (1, 1, 1, 30)).astype(np.float32)}
    want = ort.build(model, threads=1, optimization="none").run(feeds)["y"]
    np.testing.assert_array_equal(ort.build(flavoured, threads=1, optimization="none").run(feeds)["y"], want)
    kernels = qlinear_kernels(flavoured)
    assert kernels.get("QLinearMul") == 1 and "Mul" not in kernels, kernels
    np.testing.assert_allclose(ort.build(flavoured, threads=1).run(feeds)["y"], want, atol=1e-5)
