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
from deploykit.quantize.ort_flavour import COMMUTING, ort_flavour, qlinear_kernels

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
    assert changes["weight_transposes_folded"] == 1
    assert "Transpose" not in {n.op_type for n in flavoured.graph.node}
    feeds = {"x": RNG.uniform(-2, 2, (3, 5)).astype(np.float32)}
    want = ort.build(model, threads=1, optimization="none").run(feeds)["out"]
    got = ort.build(flavoured, threads=1, optimization="none").run(feeds)["out"]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    kernels = qlinear_kernels(flavoured)
    assert "MatMul" not in kernels and "Gemm" not in kernels, kernels  # an int8 kernel (QGemm / QLinearMatMul)
