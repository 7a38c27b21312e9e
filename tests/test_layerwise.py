"""deploykit compare: layers pair across versions, and a planted bug is named first."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from deploykit import passes
from deploykit.cli import main
from deploykit.errors import CheckFailedError, InputError
from deploykit.export import convert
from deploykit.layerwise import compare
from deploykit.layerwise.profile import JUMP, _align
from deploykit.layerwise.scopes import component, is_quantizer, module_path, node_scope
from deploykit.onnx_graph import constant_tensors, constant_value
from tests.conftest import plant_scaled_conv


@pytest.fixture(scope="module")
def quantized_small(tmp_path_factory, converted_dir):
    from deploykit.quantize.pipeline import quantize

    out = tmp_path_factory.mktemp("layerwise") / "q"
    quantize(None, converted_dir, out, quiet=True)
    return out


def test_scopes_are_the_exporters_module_paths(converted_dir, small_recipe):
    from deploykit.layerwise.sides import rewritten_model

    assert component("pts_backbone.blocks.0.0") == "blocks.0.0"
    assert component("pts_bbox_head.task_heads.0.reg.0") == "reg.0"
    assert node_scope("/pts_backbone/blocks.0/blocks.0.0/Conv") == "/pts_backbone/blocks.0/blocks.0.0"
    assert node_scope("Constant_115") is None
    assert is_quantizer("/a/conv/input_quantizer") and is_quantizer("/a/concat/input_quantizer_1")
    assert not is_quantizer("/a/conv")
    # Every scope the exporter wrote names a module of the model it exported.
    modules = dict(rewritten_model(converted_dir).named_modules())
    scopes = {node_scope(n.name) for n in onnx.load(str(converted_dir / "model.onnx")).graph.node} - {None}
    assert len(scopes) > 30
    assert all(module_path(s) in modules for s in scopes), sorted(s for s in scopes if module_path(s) not in modules)


def test_a_permuted_layout_pairs_only_when_unambiguous():
    a = np.arange(24, dtype=np.float32).reshape(1, 2, 3, 4)
    b = a.reshape(2, 3, 4).transpose(2, 0, 1).copy()  # (4, 2, 3): a layout pass moved the last axis first
    aligned, perm = _align(a, b)
    np.testing.assert_array_equal(aligned, a)
    assert perm == [1, 2, 0]
    assert _align(np.zeros((3, 3)), np.zeros((3, 3)).T)[1] is None  # equal shapes: taken as is
    assert _align(np.zeros((2, 3, 3)), np.zeros((3, 2, 3))) is None  # two permutations fit: no guess
    assert _align(np.zeros((2, 3)), np.zeros((7,))) is None


def test_a_model_and_its_onnx_agree_layer_by_layer(converted_dir):
    """The equivalence of compare itself: the rewritten PyTorch model and its ONNX export pair
    on every layer within float32 rounding (1e-5 relative RMS), through the custom ops."""
    profile = compare(f"{converted_dir}:rewritten", str(converted_dir), quiet=True)
    names = [r.name for r in profile.rows]
    assert len(names) > 50 and "pts_middle_encoder" in names and "pts_backbone.blocks.1.3" in names
    assert max(r.error for r in profile.rows) < 1e-5
    assert profile.first_divergence is None
    # The original sees unpadded pillars: its pillar-level layers cannot pair, the BEV ones do.
    original = compare(f"{converted_dir}:torch", str(converted_dir), quiet=True)
    assert original.first_divergence is None and "pts_backbone.blocks.1.3" in [r.name for r in original.rows]


@pytest.mark.parametrize("fixture", ["bev_converted_dir", "fused_converted_dir", "lss_converted_dir"])
def test_every_architecture_pairs_through_its_custom_ops(fixture, request):
    """BEVFormer (MSDA, Linear layers onnxsim renames Gemm_N), BEVFusion (both streams) and
    BEVDepth (BEVPool, DCN): the released model and the rewritten one against the ONNX export,
    no layer past 1e-4, the custom ops' own layers among the rows."""
    converted = request.getfixturevalue(fixture)
    for view in ("torch", "rewritten"):
        profile = compare(f"{converted}:{view}", str(converted), quiet=True)
        assert len(profile.rows) > 80, (view, len(profile.rows))
        assert profile.first_divergence is None, (view, profile.first_divergence)
    ops = {n.op_type for n in onnx.load(str(converted / "model.onnx")).graph.node if n.domain == "deploykit"}
    custom = [r for r in profile.rows if r.name.endswith(("sampler", "pool", "dcn", "pts_middle_encoder"))
              or "sampler" in r.name]
    assert ops and custom, (ops, [r.name for r in profile.rows][:20])


def test_a_qdq_graph_run_as_written_is_its_fake_quant_model(quantized_small):
    """Without ORT's fused int8 kernels the int8 QDQ graph computes what the fake-quant model
    does, layer by layer: within float32 rounding in nearly every layer (torch multiplies by 1/scale where
    ONNX divides, which moves a rare value across a rounding boundary: < 1e-3). ORT's fused
    int8 kernels round differently in a few values per layer, which compounds."""
    exact = compare(f"{quantized_small}:fake-quant-int8", f"{quantized_small}:int8", ort_optimization="none",
                    quiet=True)
    errors = [r.error for r in exact.rows]
    assert len(errors) > 50 and max(errors) < 1e-3 and np.mean([e < 1e-6 for e in errors]) > 0.9
    fused = compare(f"{quantized_small}:fake-quant-int8", f"{quantized_small}:int8", quiet=True)
    assert max(r.error for r in fused.rows) > 10 * max(errors)


def test_the_converts_inputs_file_feeds_both_sides(converted_dir):
    profile = compare(f"{converted_dir}:rewritten", str(converted_dir), inputs=converted_dir / "inputs.npz",
                      quiet=True)
    assert profile.first_divergence is None and len(profile.rows) > 50
    with pytest.raises(InputError, match="the original model.*takes"):
        compare(f"{converted_dir}:torch", str(converted_dir), inputs=converted_dir / "inputs.npz", quiet=True)


def test_the_users_data_feeds_both_sides(synth_converted_dir, nuscenes_dir):
    """Frames of a nuScenes-layout dataset, read as `detect --inputs` reads them."""
    profile = compare(f"{synth_converted_dir}:rewritten", str(synth_converted_dir), inputs=nuscenes_dir, samples=2,
                      quiet=True)
    assert profile.samples == 2 and len(profile.rows) > 50 and profile.first_divergence is None
    with pytest.raises(InputError, match="the original model"):
        compare(f"{synth_converted_dir}:torch", str(synth_converted_dir), inputs=nuscenes_dir, quiet=True)


def test_a_scaled_conv_in_a_rewrite_is_named_first(tmp_path, small_recipe, monkeypatch):
    """A pass that scales one backbone conv by 1 + 1e-3: convert refuses it, names that conv as
    the first diverging layer, keeps a directory compare reads, and the command it prints
    reproduces the finding."""
    plant_scaled_conv(monkeypatch)
    with pytest.raises(CheckFailedError, match=r"first diverging layer: pts_backbone\.blocks\.1\.3 ") as info:
        convert(small_recipe, tmp_path / "bug", quiet=True)
    failed = tmp_path / "bug.check-failed"
    command = str(info.value).split("reproduce: deploykit ", 1)[1].split()
    assert command[:3] == ["compare", f"{failed}:torch", str(failed)]
    assert json.loads((failed / "compare.json").read_text())["first_divergence"] == "pts_backbone.blocks.1.3"
    result = CliRunner().invoke(main, command + ["-q"])
    assert result.exit_code == 0, result.output
    assert "part ways at `pts_backbone.blocks.1.3`" in result.output
    report = failed.with_name("bug.check-failed.compare")
    assert {p.name for p in report.iterdir()} == {"compare.md", "compare.json", "compare.png"}
    rows = json.loads((report / "compare.json").read_text())["layers"]
    before = [r["error"] for r in rows[: [r["name"] for r in rows].index("pts_backbone.blocks.1.3")]]
    assert max(before) < 1e-5  # nothing upstream of the planted layer moved
    # What a failed check left is not a model to quantize.
    from deploykit.quantize.pipeline import quantize

    with pytest.raises(InputError, match="failed `deploykit convert` check"):
        quantize(None, failed, tmp_path / "q", quiet=True)


def test_a_wrong_msda_offset_is_named_first(tmp_path, bev_recipe, monkeypatch):
    """Half a pixel on x in the sampling locations (the align_corners slip) inside the MSDA
    custom op: compare names the first deformable sampler, not the encoder layer or the heads."""
    from deploykit.models.bevformer.attention import Sampler
    from deploykit.passes import msda_op

    class Shifted(msda_op.SamplerOp):
        def forward(self, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
            width = spatial_shapes[:, 1].to(sampling_locations.dtype).view(1, 1, 1, -1, 1, 1)
            shift = torch.zeros_like(sampling_locations)
            shift[..., :1] = 0.5 / width
            return super().forward(value, spatial_shapes, level_start_index, sampling_locations + shift,
                                   attention_weights)

    monkeypatch.setitem(passes.PASSES, "msda_op", lambda model: msda_op.replace_modules(
        model, Sampler, lambda m: Shifted(), "msda_op", "no sampler"))
    with pytest.raises(CheckFailedError, match=r"first diverging layer: pts_bbox_head\.transformer\.encoder\.layers\.0\.attentions\.0\.sampler "):
        convert(bev_recipe, tmp_path / "bug", quiet=True)
    failed = tmp_path / "bug.check-failed"
    profile = compare(f"{failed}:torch", str(failed), quiet=True)
    first = profile.first_divergence
    from deploykit.layerwise.sides import original_model

    samplers = [n for n, m in original_model(failed).named_modules() if isinstance(m, Sampler)]
    assert first.name == samplers[0], (first.name, samplers[:2])
    assert first.growth >= JUMP and max(r.error for r in profile.rows[: profile.rows.index(first)]) < 1e-5


def test_a_bad_int8_scale_is_named_first(tmp_path, quantized_small):
    """One activation scale in the int8 QDQ graph divided by 4 (the tensor clips at a quarter
    of its range): against the fake-quant model, compare names that quantizer's layer first;
    the graph as written has no layer that jumps."""
    good = compare(f"{quantized_small}:fake-quant-int8", f"{quantized_small}:int8", quiet=True)
    assert len(good.rows) > 50
    assert not any(r.error > good.threshold and r.growth >= JUMP for r in good.rows)

    qdir = tmp_path / "q"
    shutil.copytree(quantized_small, qdir)
    model = onnx.load(str(qdir / "model.int8.qdq.onnx"))
    target = "/pts_backbone/blocks.1/blocks.1.3/input_quantizer/"
    consts = constant_tensors(model.graph)
    bad_scale = None
    for node in model.graph.node:
        if node.name.startswith(target) and node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            if bad_scale is None:
                bad_scale = onnx.numpy_helper.from_array(constant_value(consts, node.input[1]) / 4, "planted_scale")
                model.graph.initializer.append(bad_scale)
            node.input[1] = "planted_scale"  # its own constant: the exporter shares equal scales
    assert bad_scale is not None
    onnx.save(model, str(qdir / "bad.onnx"))
    profile = compare(f"{qdir}:fake-quant-int8", str(qdir / "bad.onnx"), quiet=True)
    first = profile.first_divergence
    assert first.quantizer == "pts_backbone.blocks.1.3.input_quantizer", first
    assert first.name == "pts_backbone.blocks.1.2" and first.growth >= JUMP


def test_quantize_reports_where_the_error_enters(quantized_small):
    fidelity = json.loads((quantized_small / "fidelity.json").read_text())
    layers = fidelity["layers"]["int8"]["layers"]
    assert len(layers) > 50
    # The fake-quant model's first quantized layer is where the error enters; it grows along depth.
    assert layers[0]["growth"] is None and layers[0]["error"] > 0
    sqnr = [r["sqnr_db"] for r in layers if r["sqnr_db"] is not None]
    assert np.mean(sqnr[:5]) > np.mean(sqnr[-5:])
    assert (quantized_small / "layers.png").stat().st_size > 1000
    text = (quantized_small / "fidelity.md").read_text()
    assert "## Where the quantization error enters, layer by layer" in text
    assert "| `pts_backbone.blocks.1` |" in text and "SQNR dB at its end, int8" in text


def test_bad_sides_are_one_line_errors(converted_dir, quantized_small, tmp_path):
    runner = CliRunner()
    for args, message in (([f"{converted_dir}:bogus", str(converted_dir)], "views are onnx"),
                          ([str(tmp_path / "missing"), str(converted_dir)], "does not exist"),
                          ([str(tmp_path), str(converted_dir)], "neither a `deploykit convert`"),
                          ([f"{quantized_small}:tensorrt", str(converted_dir)], "views are")):
        result = runner.invoke(main, ["compare", *args, "-q"])
        assert result.exit_code != 0 and message in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1
