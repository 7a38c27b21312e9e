import json
from collections import Counter

import numpy as np
import onnx
import pytest
import torch

from deploykit.artifacts import sha256_file
from deploykit.errors import CheckFailedError, CheckpointError, OutputExistsError
from deploykit.export import convert
from deploykit.recipe import load_recipe
from deploykit.synthetic_checkpoint import default_checkpoint


def ops(path):
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def test_converted_directory_is_complete(converted_dir, small_recipe):
    names = {p.name for p in converted_dir.iterdir()}
    assert names == {"model.onnx", "weights.safetensors", "inputs.npz", "check.json", "manifest.json"}
    manifest = json.loads((converted_dir / "manifest.json").read_text())
    assert manifest["recipe"]["name"] == small_recipe.name
    assert manifest["passes"] == list(small_recipe.convert.passes)
    assert manifest["checkpoint"]["sha256"] == sha256_file(default_checkpoint(small_recipe))
    assert manifest["onnx"]["custom_ops"] == [{"domain": "deploykit", "op_type": "PillarScatter", "count": 1}]
    v = small_recipe.model.voxelization
    pillars = next(i for i in manifest["inputs"] if i["name"] == "pillars")
    # Raw point features: the engine decorates them (decorate_in_graph).
    assert pillars["shape"] == [1, v.point_features, v.max_points_per_pillar, v.max_pillars]
    assert pillars["decoration"] == "graph"
    assert pillars["layout"] == "CNP"
    assert {"torch", "onnx", "onnxruntime", "onnxsim"} <= set(manifest["versions"])


def test_onnx_is_static_rewritten_and_simplified(converted_dir):
    model = onnx.load(str(converted_dir / "model.onnx"))
    onnx.checker.check_model(model)
    for value in [*model.graph.input, *model.graph.output]:
        assert all(d.HasField("dim_value") for d in value.type.tensor_type.shape.dim), value.name
    counts = ops(converted_dir / "model.onnx")
    assert counts["MatMul"] + counts["Gemm"] == 0
    assert counts["ReduceMax"] == 0
    assert counts["PillarScatter"] == 1
    assert counts["ScatterND"] + counts["ScatterElements"] == 0
    # BatchNorm folded into the convolutions by export + onnxsim.
    assert counts["BatchNormalization"] == 0


def test_naive_export_keeps_the_unfriendly_ops(naive_dir):
    counts = ops(naive_dir / "model.onnx")
    assert counts["MatMul"] > 0 and counts["ReduceMax"] > 0 and counts["ScatterND"] == 1
    assert counts["PillarScatter"] == 0


@pytest.mark.parametrize("which", ["converted_dir", "naive_dir"])
def test_engine_matches_original_pytorch(request, which):
    check = json.loads((request.getfixturevalue(which) / "check.json").read_text())
    assert check["passed"]
    # fp32 export: far tighter than the recipe's 1e-4.
    assert check["onnxruntime"]["worst_rel_error"] < 2e-5
    assert check["onnxruntime"]["min_cosine"] > 0.999999
    assert all(s["pillars"] > 1000 for s in check["samples"])


def test_weights_file_holds_the_rewritten_model(converted_dir, small_model):
    from safetensors.torch import load_file

    weights = load_file(str(converted_dir / "weights.safetensors"))
    w = weights["pts_voxel_encoder.pfn_layers.0.conv.weight"]
    assert w.shape[2:] == (1, 1)
    torch.testing.assert_close(w[:, :, 0, 0], small_model.pts_voxel_encoder.pfn_layers[0].linear.weight)


def test_existing_output_is_refused_and_untouched(converted_dir, small_recipe):
    before = (converted_dir / "manifest.json").read_bytes()
    with pytest.raises(OutputExistsError, match="--overwrite"):
        convert(small_recipe, converted_dir, quiet=True)
    assert (converted_dir / "manifest.json").read_bytes() == before


def test_failed_check_keeps_what_was_built_beside_out_never_at_it(tmp_path, small_recipe):
    import dataclasses

    strict = dataclasses.replace(small_recipe, check=dataclasses.replace(small_recipe.check, max_rel_error=0.0, min_cosine=1.1))
    out = tmp_path / "out"
    kept = tmp_path / "out.check-failed"
    for _ in range(2):  # a second failure replaces the first one's files
        with pytest.raises(CheckFailedError, match=f"differs from the float64 original.*kept in {kept}"):
            convert(strict, out, quiet=True)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out.check-failed"]
        assert {"model.onnx", "check.json"} <= {p.name for p in kept.iterdir()}
        assert json.loads((kept / "check.json").read_text())["passed"] is False


def test_wrong_checkpoint_leaves_nothing(tmp_path, small_recipe):
    nus = default_checkpoint(load_recipe("centerpoint_pillar_nus"))
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="does not fit recipe centerpoint_pillar_small"):
        convert(small_recipe, out, checkpoint=nus, quiet=True)
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_atomically(tmp_path, small_recipe):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    convert(small_recipe, out, overwrite=True, passes=["pillar_scatter_op"], quiet=True)
    assert not (out / "stale.txt").exists() and (out / "model.onnx").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert (out.stat().st_mode & 0o777) != 0o700  # readable like any directory the user makes
    # ... and so is every file in it (safetensors alone would create its file 0600)
    assert all((p.stat().st_mode & 0o044) == (out.stat().st_mode & 0o044) for p in out.iterdir())


def test_inputs_npz_feeds_the_engine(converted_dir):
    from deploykit.engines.ort import build

    engine = build(converted_dir / "model.onnx")
    with np.load(converted_dir / "inputs.npz") as data:
        outs = engine.run({k: data[k] for k in data.files})
    assert set(outs) == {o.name for o in engine.outputs}
    assert all(np.isfinite(v).all() for v in outs.values())


def test_export_of_a_wrapper_leaves_shared_modules_in_eval_mode(small_recipe, small_model, tmp_path):
    from deploykit.export import export_onnx
    from tests.conftest import random_pillars

    class Wrapper(torch.nn.Module):  # fresh modules start in train mode
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.input_names, self.output_names = inner.input_names, inner.output_names

        def forward(self, pillars, coords):
            return self.inner(pillars, coords)

    _, _, xp, coords = random_pillars(small_recipe, 20, 5)
    export_onnx(Wrapper(small_model), {"pillars": xp.numpy(), "coords": coords.numpy()}, tmp_path / "w.onnx", 17)
    assert not any(m.training for m in small_model.modules())


def test_bevformer_convert_writes_a_checked_static_engine(bev_converted_dir, bev_recipe):
    manifest = json.loads((bev_converted_dir / "manifest.json").read_text())
    check = json.loads((bev_converted_dir / "check.json").read_text())
    assert check["passed"] and check["onnxruntime"]["worst_rel_error"] <= bev_recipe.check.max_rel_error
    assert [s["first_frame"] for s in check["samples"]] == [True, False]
    cfg = bev_recipe.model
    assert manifest["onnx"]["custom_ops"] == [{"domain": "deploykit", "op_type": "MultiScaleDeformableAttn",
                                               "count": 2 * cfg.encoder_layers + cfg.decoder_layers}]
    assert [i["name"] for i in manifest["inputs"]] == ["img", "can_bus", "shift", "prev_bev", "use_prev_bev"]
    assert manifest["virtual_bev"]["hits_kept_fraction"] == 1.0
    graph = onnx.load(str(bev_converted_dir / "model.onnx"))
    ops = {n.op_type for n in graph.graph.node}
    assert not ops & {"NonZero", "ReduceMean", "GridSample", "ScatterND", "Loop", "If"}


def test_standard_ops_copy_has_no_custom_nodes_and_is_checked(tmp_path, bev_recipe):
    out = tmp_path / "std"
    result = convert(bev_recipe, out, standard_ops=True, quiet=True)
    graph = onnx.load(str(out / "model.standard_ops.onnx"))
    assert not [n for n in graph.graph.node if n.domain == "deploykit"] and not graph.functions
    assert any(n.op_type == "GridSample" for n in graph.graph.node)
    check = json.loads((out / "check.json").read_text())
    assert check["standard_ops"]["passed"] and check["standard_ops"]["worst_rel_error"] < 1e-5
    assert result.manifest["onnx"]["standard_ops_file"] == "model.standard_ops.onnx"
