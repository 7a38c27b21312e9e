import json

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from deploykit.engines import ort
from deploykit.quantize.insert import insert_quantizers, quantizers, set_bits, set_mode
from deploykit.onnx_graph import int16_quantize_nodes


class Block(nn.Module):
    input_names, output_names = ["x"], ["y"]

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return (self.fc(torch.relu(self.conv(x)).mean((2, 3))),)


@pytest.mark.parametrize("bits", [8, 16])
def test_one_layer_matches_fake_quant_to_fp32_rounding(tmp_path, bits):
    # With identical inputs every Q/DQ pair rounds identically in ORT and PyTorch;
    # what is left is fp32 summation order in the conv and the matmul.
    torch.manual_seed(0)
    model = insert_quantizers(Block().eval())
    for q in quantizers(model).values():
        q.start_calibration()
    calib = torch.randn(8, 4, 6, 6)
    model(calib)
    for q in quantizers(model).values():
        q.finish_calibration()
    set_bits(model, list(quantizers(model)), bits)
    x = calib[:2]
    from deploykit.quantize.qdq_export import export_qdq

    graph = export_qdq(model, {"x": x.numpy()}, tmp_path / "b.onnx", 17)
    assert sum(n.op_type == "QuantizeLinear" for n in graph.graph.node) == 4
    assert int16_quantize_nodes(graph.graph) == (4 if bits == 16 else 0)
    assert graph.opset_import[0].version == (21 if bits == 16 else 17)
    with torch.no_grad():
        ref = model(x)[0].numpy()
    out = ort.build(tmp_path / "b.onnx").run({"x": x.numpy()})["y"]
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    set_mode(model, "off")
    with torch.no_grad():
        float_out = model(x)[0].numpy()
    # And the fake quantization is really there: int8 moves the result far more than fp32 rounding.
    assert np.abs(float_out - ref).max() > (1e-4 if bits == 8 else 1e-7) * np.abs(ref).max()


def test_quantize_writes_runnable_qdq_models(bev_quantized_dir):
    out = bev_quantized_dir
    manifest = json.loads((out / "manifest.json").read_text())
    active = manifest["quantizers"]["active"]
    names = [q["name"] for q in json.loads((out / "quantizers.json").read_text())]
    # A residual add's shared quantizer quantizes both of its inputs: two pairs, one scale.
    pairs = active + sum(n.endswith(".residual.input_quantizer") for n in names)
    int8 = onnx.load(str(out / "model.int8.qdq.onnx"))
    mixed = onnx.load(str(out / "model.qdq.onnx"))
    for graph in (int8, mixed):
        # One Q/DQ pair per quantized tensor, weights included (no constant folding of weight Q/DQ).
        assert sum(n.op_type == "QuantizeLinear" for n in graph.graph.node) == pairs
        assert sum(n.op_type == "DequantizeLinear" for n in graph.graph.node) == pairs
        assert sum(n.op_type == "MultiScaleDeformableAttn" for n in graph.graph.node) == 6
    assert int16_quantize_nodes(int8.graph) == 0 and int8.opset_import[0].version == 17
    assert int16_quantize_nodes(mixed.graph) == manifest["quantizers"]["int16"]
    assert {o.domain: o.version for o in mixed.opset_import}[""] == 21
    report = json.loads((out / "fidelity.json").read_text())["onnxruntime_vs_fake_quant"]
    for key in ("int8", "int8_int16"):
        for f in report[key]["outputs"]:
            # End to end, a value that lands on a rounding boundary in one runtime and not the
            # other flips by one step and the flip propagates; the outputs stay at quantization-noise level.
            assert f["cosine"] > 0.999 and f["sqnr_db"] > 25, (key, f)


class SelfAttention(nn.Module):
    input_names, output_names = ["x"], ["y"]

    def __init__(self, batch_first=False):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4, batch_first=batch_first)

    def forward(self, x):
        return (self.attn(x, x, x, need_weights=False)[0],)


def _calibrated(model, *inputs):
    for q in quantizers(model).values():
        q.start_calibration()
    with torch.no_grad():
        model(*inputs)
    for q in quantizers(model).values():
        q.finish_calibration()
    return model


@pytest.mark.parametrize("batch_first", [False, True])
def test_multihead_attention_is_torch_when_off_and_quantizes_both_matmuls(batch_first):
    torch.manual_seed(0)
    float_model = SelfAttention(batch_first).eval()
    model = insert_quantizers(float_model)
    names = sorted(quantizers(model))
    assert names == sorted([f"attn.{n}_quantizer" for n in ("query", "key", "value", "q", "k", "probs", "v",
                                                            "in_proj_weight")]
                           + ["attn.out_proj.input_quantizer", "attn.out_proj.weight_quantizer"])
    assert model.state_dict().keys() - {f"{n}.amax" for n in names} == float_model.state_dict().keys()
    x = torch.randn(7, 2, 16)
    with torch.no_grad():
        np.testing.assert_allclose(model(x)[0], float_model(x)[0], rtol=0, atol=1e-6)
        _calibrated(model, x)
        quantized = model(x)[0]
        err = (quantized - float_model(x)[0]).abs().max() / quantized.abs().max()
    assert 1e-4 < err < 0.05  # int8 on every operand: visible but small
    for q in quantizers(model).values():  # each quantizer matters on its own
        before = q.mode
        q.mode = "off"
        with torch.no_grad():
            assert not torch.equal(model(x)[0], quantized), q.qname
        q.mode = before


def test_quantized_multihead_attention_runs_in_ort_like_fake_quant(tmp_path):
    from deploykit.quantize.qdq_export import export_qdq

    torch.manual_seed(1)
    x = torch.randn(9, 1, 16)
    model = _calibrated(insert_quantizers(SelfAttention().eval()), x)
    graph = export_qdq(model, {"x": x.numpy()}, tmp_path / "mha.onnx", 17)
    producer = {o: n for n in graph.graph.node for o in n.output}

    def source(name):  # look through layout ops to the op that computed a tensor
        n = producer[name]
        return source(n.input[0]) if n.op_type in ("Transpose", "Reshape", "Slice") else n.op_type

    matmuls = [n for n in graph.graph.node if n.op_type == "MatMul"]
    assert len(matmuls) == 6  # q, k, v and output projections, Q @ K^T, P @ V
    assert all(source(i) == "DequantizeLinear" for n in matmuls for i in n.input)
    with torch.no_grad():
        ref = model(x)[0].numpy()
    out = ort.build(tmp_path / "mha.onnx").run({"x": x.numpy()})["y"]
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5 * np.abs(ref).max())
