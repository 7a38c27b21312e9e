"""decorate_in_graph: the pillar decoration as a layer of the exported graph.

The layer is checked against the host decoration (deploykit.preprocess.voxelize.decorate)
and against the line-by-line transcription of mmdet3d's PillarFeatureNet.forward in
tests/preprocess/test_voxelize.py, in every layout, with and without each decoration and
mmdet3d's legacy quirk. Tolerance: 4 float32 steps at the largest point norm (a sum over a
pillar's points, in another order than numpy's, is the only difference), elsewhere exact.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import onnx
import pytest
import torch

from deploykit.errors import RecipeError
from deploykit.export import convert, pillar_format as manifest_format
from deploykit.models import build_model, make_sample, pillar_format
from deploykit.models.pillar_decoration import PillarDecoration
from deploykit.passes import apply_passes
from deploykit.preprocess.pillar_inputs import PillarFormat, pillar_inputs
from deploykit.preprocess.voxelize import decorate, pack_pillars, voxelize
from deploykit.recipe import load_recipe
from deploykit.samples import torch_outputs
from tests.preprocess.test_voxelize import NUSCENES_PILLARS, SMALL_GRID, _mmdet3d_decorate, _random_cloud

LAYOUTS = ("PNC", "CPN", "CNP")
STANDARD = {"", "ai.onnx"}


class _Cfg:
    """The slice of a LiDAR stream config PillarDecoration reads."""

    def __init__(self, grid, **encoder):
        self.voxelization = type("V", (), {"voxel_size": grid.voxel_size, "point_cloud_range": grid.point_cloud_range})
        self.pillar_encoder = type("E", (), encoder)


def _to_pnc(x: np.ndarray, layout: str) -> np.ndarray:
    if layout == "PNC":
        return x
    return x[0].transpose(1, 2, 0) if layout == "CPN" else x[0].transpose(2, 1, 0)


def _graph_decoration(voxels, grid, layout, extra_pillars=7, scale=None, **flags):
    """The layer on the padded engine feeds, back in PNC, cut to the real pillars."""
    p = voxels.num_voxels
    raw, coords = pack_pillars(voxels.features, voxels.coords, p + extra_pillars, layout)
    num_points = np.zeros(p + extra_pillars, np.int32)
    num_points[:p] = voxels.num_points
    layer = PillarDecoration(_Cfg(grid, **flags))
    with torch.no_grad():
        out = layer(torch.from_numpy(raw), torch.from_numpy(num_points), torch.from_numpy(coords), layout,
                    None if scale is None else torch.from_numpy(scale))
    full = _to_pnc(out.numpy(), layout)
    return full[:p], full[p:]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("with_distance", [False, True])
@pytest.mark.parametrize(("with_cluster_center", "with_voxel_center"), [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("grid", [NUSCENES_PILLARS, SMALL_GRID], ids=["nuscenes", "small"])
def test_the_layer_matches_the_host_and_mmdet3d(grid, with_cluster_center, with_voxel_center, with_distance, legacy,
                                                layout):
    rng = np.random.default_rng(7)
    voxels = voxelize(_random_cloud(rng, grid, 3000), grid)
    flags = dict(with_cluster_center=with_cluster_center, with_voxel_center=with_voxel_center,
                 with_distance=with_distance, legacy=legacy)
    got, padding = _graph_decoration(voxels, grid, layout, **flags)
    host = decorate(voxels, grid, **flags)
    coors = np.concatenate([np.zeros((voxels.num_voxels, 1), np.int32), voxels.coords], axis=1)
    mmdet3d = _mmdet3d_decorate(torch.from_numpy(voxels.features.copy()), torch.from_numpy(voxels.num_points),
                                torch.from_numpy(coors), grid, **flags).numpy()
    largest = np.linalg.norm(voxels.features[:, :, :3], axis=2).max()
    tol = 4 * float(np.spacing(np.float32(largest)))
    assert got.shape == host.shape == mmdet3d.shape
    np.testing.assert_allclose(got, host, rtol=0, atol=tol)
    np.testing.assert_allclose(got, mmdet3d, rtol=0, atol=tol)
    # Padding pillars (no points, coords -1) come out zero, not NaN from 0 / 0.
    assert np.all(padding == 0)


def test_the_layer_divides_by_the_normalisation_scale():
    grid = NUSCENES_PILLARS
    voxels = voxelize(_random_cloud(np.random.default_rng(3), grid, 2000), grid)
    flags = dict(with_cluster_center=True, with_voxel_center=True, with_distance=False, legacy=False)
    scale = (2.0 ** np.arange(-2, 8)).astype(np.float32)[: voxels.features.shape[2] + 6]
    plain, _ = _graph_decoration(voxels, grid, "CNP", **flags)
    scaled, _ = _graph_decoration(voxels, grid, "CNP", scale=scale, **flags)
    np.testing.assert_array_equal(scaled, plain / scale)  # powers of two: exact


@pytest.fixture(scope="module")
def small():
    recipe = load_recipe("centerpoint_pillar_small")
    return recipe, build_model(recipe).eval()


def test_the_pass_changes_the_input_contract_not_the_output(small):
    recipe, original = small
    assert "decorate_in_graph" in recipe.convert.passes  # the recipes decorate in the graph by default
    host = [p for p in recipe.convert.passes if p != "decorate_in_graph"]
    for passes in (["decorate_in_graph"], [*host, "decorate_in_graph"], ["decorate_in_graph", "normalise_points", *host]):
        model = apply_passes(original, passes).eval()
        fmt = pillar_format(model)
        assert fmt.decorate_in_graph and fmt.scale is None
        sample = make_sample(recipe, 11, model)
        c = recipe.model.voxelization.point_features
        assert model.input_names == ["pillars", "coords", "num_points"]
        assert sample.feeds["pillars"].shape[(2 if fmt.layout == "PNC" else 1)] == c  # raw point features
        ref, out = torch_outputs(original, sample.reference), torch_outputs(model, sample.feeds)
        for name in ref:
            np.testing.assert_allclose(out[name], ref[name], rtol=1e-5, atol=1e-5 * np.abs(ref[name]).max(),
                                       err_msg=f"{passes}: {name}")


def test_the_pass_refuses_a_second_run_and_models_without_pillars(small):
    _, original = small
    once = apply_passes(original, ["decorate_in_graph"])
    with pytest.raises(RecipeError, match="already ran"):
        apply_passes(once, ["decorate_in_graph"])
    with pytest.raises(RecipeError, match="pillar LiDAR stream"):
        apply_passes(torch.nn.Linear(2, 2), ["decorate_in_graph"])
    assert original.pts_pillar_decoration is None  # passes never mutate their input


def test_the_converted_engine_decorates_with_standard_ops(tmp_path, small):
    recipe, _ = small
    recipe = replace(recipe, check=replace(recipe.check, samples=1))
    result = convert(recipe, tmp_path / "conv", quiet=True)
    out = result.out_dir
    manifest = json.loads((out / "manifest.json").read_text())
    entry = next(i for i in manifest["inputs"] if i["name"] == "pillars")
    assert entry["decoration"] == "graph" and manifest_format(manifest).decorate_in_graph
    assert [i["name"] for i in manifest["inputs"]] == ["pillars", "coords", "num_points"]
    graph = onnx.load(str(out / "model.onnx"))
    decoration = [n for n in graph.graph.node if "pts_pillar_decoration" in n.name]
    assert decoration and all(n.domain in STANDARD for n in decoration)
    assert result.check["passed"]  # the ORT engine on raw voxels against mmdet3d's model on decorated pillars


def test_manifests_before_the_pass_keep_the_host_decoration():
    old = {"inputs": [{"name": "pillars", "shape": [1, 11, 20, 100], "layout": "CNP", "scale": [2.0] * 11},
                      {"name": "coords", "shape": [100, 4]}]}
    fmt = manifest_format(old)
    assert fmt == PillarFormat("CNP", fmt.scale, False) and fmt.scale.tolist() == [2.0] * 11


def test_host_feeds_for_the_graph_are_raw_voxels_and_counts(small):
    recipe, _ = small
    cfg = recipe.model
    points = np.random.default_rng(0).uniform(-20, 20, (4000, cfg.voxelization.point_features)).astype(np.float32)
    host = pillar_inputs(points, cfg, "CNP")
    graph = pillar_inputs(points, cfg, *PillarFormat("CNP", None, True))
    p = graph.num_pillars
    assert set(graph.feeds) == {"pillars", "coords", "num_points"}
    np.testing.assert_array_equal(graph.feeds["coords"], host.feeds["coords"])
    assert graph.feeds["num_points"].dtype == np.int32 and np.all(graph.feeds["num_points"][p:] == 0)
    assert graph.feeds["num_points"][:p].min() >= 1
    np.testing.assert_array_equal(graph.pillars_pnc, host.pillars_pnc)  # the reference is decorated all the same
    with pytest.raises(ValueError, match="applies its scale there"):
        pillar_inputs(points, cfg, "CNP", np.ones(11, np.float32), True)


def test_a_calibration_set_of_decorated_pillars_is_refused_with_the_reason(tmp_path, small):
    from deploykit.errors import InputError
    from deploykit.quantize.calib_set import build_calib_set, load_calib_set

    recipe, original = small
    host = replace(recipe, convert=replace(recipe.convert, passes=tuple(
        p for p in recipe.convert.passes if p != "decorate_in_graph")))
    build_calib_set(host, tmp_path / "old", samples=1)
    feeds = make_sample(recipe, 0, apply_passes(original, recipe.convert.passes)).feeds
    inputs = [{"name": k, "shape": list(v.shape), "dtype": v.dtype.name} for k, v in feeds.items()]
    with pytest.raises(InputError, match="holds decorated pillars, the model takes raw voxels.*with the decorate_in_graph"):
        load_calib_set(tmp_path / "old", recipe=recipe.name, inputs=inputs)
