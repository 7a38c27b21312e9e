import json

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from deploykit.engines import ort
from deploykit.onnx_graph import int16_quantize_nodes
from deploykit.quantize.qdq_graph import qdq_pairs
from deploykit.quantize.trt_flavour import duplicate_pairs, tensorrt_flavour


def _qdq(nodes, inits, src, name, scale, dtype):
    inits += [numpy_helper.from_array(np.array(scale, np.float32), f"{name}_s"),
              numpy_helper.from_array(np.array(0, dtype), f"{name}_z")]
    nodes += [helper.make_node("QuantizeLinear", [src, f"{name}_s", f"{name}_z"], [f"{name}_q"], name=f"{name}_Q"),
              helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_s", f"{name}_z"], [f"{name}_dq"],
                               name=f"{name}_DQ")]
    return f"{name}_dq"


def _graph():
    nodes, inits = [], []
    a = _qdq(nodes, inits, "x", "a", 0.02, np.int8)
    b = _qdq(nodes, inits, "y", "b", 0.05, np.int8)
    dup = _qdq(nodes, inits, "x", "a2", 0.02, np.int8)  # a second pair on x, same scale
    wide = _qdq(nodes, inits, "x", "c", 0.0001, np.int16)  # an int16 region
    nodes += [helper.make_node("Concat", [a, b], ["cat"], axis=1),
              helper.make_node("Relu", [dup], ["r"]),
              helper.make_node("Sigmoid", [wide], ["s"])]
    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4]) for n in ("x", "y", "r", "s")]
    graph = helper.make_graph(nodes, "g", vi[:2], [helper.make_tensor_value_info("cat", TensorProto.FLOAT, [1, 8]),
                                                    *vi[2:]], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def test_rules_on_a_small_graph(tmp_path):
    model = _graph()
    assert duplicate_pairs(model) == 2 and int16_quantize_nodes(model.graph) == 1
    out, changes = tensorrt_flavour(model)
    assert changes == {"int16_pairs_to_float": 1, "duplicate_pairs_merged": 1, "add_concat_scales_shared": 1}
    assert int16_quantize_nodes(out.graph) == 0 and duplicate_pairs(out) == 0
    consts = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    cat = next(n for n in out.graph.node if n.op_type == "Concat")
    dq = {n.output[0]: n for n in out.graph.node if n.op_type == "DequantizeLinear"}
    assert [float(consts[dq[i].input[1]]) for i in cat.input] == [np.float32(0.05)] * 2  # the wider one
    sig = next(n for n in out.graph.node if n.op_type == "Sigmoid")
    assert sig.input[0] == "x"  # the int16 region reads the float tensor
    path = tmp_path / "trt.onnx"
    onnx.save(out, str(path))
    x = np.linspace(-1, 1, 4, dtype=np.float32)[None]
    res = ort.build(path).run({"x": x, "y": x})
    np.testing.assert_allclose(res["s"], 1 / (1 + np.exp(-x)), rtol=1e-6)
    assert len(qdq_pairs(out)) == 2


def test_quantize_writes_a_tensorrt_flavour(bev_recipe, bev_quantized_dir):
    out = bev_quantized_dir
    graph = onnx.load(str(out / "model.trt.qdq.onnx"))
    assert int16_quantize_nodes(graph.graph) == 0 and duplicate_pairs(graph) == 0
    assert {o.domain: o.version for o in graph.opset_import}[""] == bev_recipe.convert.opset
    report = json.loads((out / "fidelity.json").read_text())["onnxruntime_vs_fake_quant"]["tensorrt"]
    # The same tensors as the fake-quant model with the int16 modules in float.
    assert all(f["cosine"] > 0.999 for f in report["outputs"]), report
    assert report["changes"]["int16_pairs_to_float"] == 0  # exported with those quantizers off


MOVES = ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity")


def test_the_tensorrt_flavour_binds_to_the_plugins(bev_quantized_dir):
    """What a TensorRT build of model.trt.qdq.onnx meets at each custom node: the plugins'
    declared outputs match it (check_plugins, through the Q/DQ graph's shapes), every float
    input is dequantized int8 with at most data movement (Reshape, Transpose, ...) between the
    DequantizeLinear and the node, which TensorRT moves the DQ across (int8 up to the plugin,
    the plugin on the float tensor), except where the recipe keeps the input in int16
    (bevformer_small: the sampling locations), which the flavour leaves in float (TensorRT has
    no int16); and no Q/DQ pair sits on an integer input."""
    from deploykit.engines.tensorrt_plugins import check_plugins, custom_nodes, with_plugin_attributes

    model = onnx.load(str(bev_quantized_dir / "model.trt.qdq.onnx"))
    assert check_plugins(with_plugin_attributes(model)) == []
    producer = {o: n for n in model.graph.node for o in n.output}
    nodes = custom_nodes(model)
    assert {n.op_type for n in nodes} == {"MultiScaleDeformableAttn"}
    for node in nodes:
        value, shapes, starts, locations, weights = node.input
        for name, int8 in ((value, True), (locations, False), (weights, True)):
            source = producer[name]
            while source.op_type in MOVES:
                source = producer[source.input[0]]
            assert (source.op_type == "DequantizeLinear") == int8, (node.name, name, source.op_type)
        for name in (shapes, starts):
            assert name not in producer or producer[name].op_type not in ("DequantizeLinear", "QuantizeLinear")
