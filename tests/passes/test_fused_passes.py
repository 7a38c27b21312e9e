"""Every rewrite pass inside BEVFusion, both streams' together, and the point normalisation pass."""

from __future__ import annotations

import numpy as np
import pytest

from deploykit.errors import InputError, RecipeError
from deploykit.models import build_model, make_sample, pillar_format
from deploykit.passes import apply_passes
from deploykit.recipe import load_recipe
from deploykit.passes.normalise_points import channel_bounds, channel_scales, input_scale
from deploykit.samples import torch_outputs

# The fused model's passes are exact rewrites except for fp32 summation order in the
# custom ops' reference implementations.
TOL = 1e-4


def _worst(ref: dict, out: dict) -> float:
    return max(float(np.abs(ref[k] - out[k]).max() / max(np.abs(ref[k]).max(), 1e-12)) for k in ref)


def test_each_pass_applies_inside_the_fused_model(fused_recipe, fused_model):
    """The recipe's passes one after another, each checked against the original fused model."""
    samples = [make_sample(fused_recipe, seed, fused_model) for seed in (30, 31)]
    refs = [torch_outputs(fused_model, s.reference) for s in samples]
    model = fused_model
    for name in fused_recipe.convert.passes:
        model = apply_passes(model, [name]).eval()
        for seed, ref in zip((30, 31), refs):
            out = torch_outputs(model, make_sample(fused_recipe, seed, model).feeds)
            assert _worst(ref, out) < TOL, name
    kinds = {type(m).__name__ for m in model.modules()}
    assert {"ConvPillarFeatureNet", "PillarScatter", "QueueMeanConv", "VirtualBEVSpatialCrossAttention",
            "SamplerOp"} <= kinds
    assert model.input_layout == "CNP" and input_scale(model) is not None


def test_normalisation_is_bit_exact_with_power_of_two_scales(small_model, small_recipe):
    scales = channel_scales(small_recipe.model)
    assert np.all(np.log2(scales) == np.round(np.log2(scales)))  # powers of two
    assert np.all(scales >= channel_bounds(small_recipe.model))
    for passes in (["normalise_points"], ["pfn_linear_to_conv", "normalise_points", "max_to_maxpool", "pillars_on_w"],
                   ["normalise_points", "pfn_linear_to_conv", "pillars_on_w"]):
        model = apply_passes(small_model, passes).eval()
        np.testing.assert_array_equal(input_scale(model), scales)
        for seed in (3, 8):
            ref = torch_outputs(small_model, make_sample(small_recipe, seed, small_model).reference)
            sample = make_sample(small_recipe, seed, model)
            assert np.abs(sample.feeds["pillars"]).max() <= 1.0
            out = torch_outputs(model, sample.feeds)
            for k in ref:
                np.testing.assert_array_equal(ref[k], out[k], err_msg=f"{passes} {k}")


def test_normalised_engine_fed_raw_pillars_is_wrong(small_model, small_recipe):
    """The scale really is folded in: raw features into the normalised model change the output."""
    model = apply_passes(small_model, ["normalise_points"]).eval()
    raw = make_sample(small_recipe, 3, small_model).feeds
    ref = torch_outputs(small_model, raw)
    assert _worst(ref, torch_outputs(model, raw)) > 0.1


def test_normalisation_runs_once_and_the_bounds_follow_the_recipe(small_model, small_recipe):
    once = apply_passes(small_model, ["normalise_points"])
    with pytest.raises(RecipeError, match="already ran"):
        apply_passes(once, ["normalise_points"])
    nus = build_model(load_recipe("centerpoint_pillar_nus"))
    b = channel_bounds(nus.cfg)
    # x, y to the range edge, z, intensity 0-255, dt of ten sweeps, cluster and centre offsets.
    assert b[:5] == [51.2, 51.2, 5.0, 255.0, 0.5] and b[5:8] == [0.2, 0.2, 8.0] and b[8:] == [0.1, 0.1, 4.0]


def test_converted_fused_model_records_its_pillar_format(fused_converted_dir):
    import json

    from deploykit.export import pillar_format as manifest_format

    manifest = json.loads((fused_converted_dir / "manifest.json").read_text())
    layout, scale, in_graph = manifest_format(manifest)
    # normalise_points with decorate_in_graph: the graph divides, the host feeds raw voxels
    assert layout == "CNP" and scale is None and in_graph
    custom = {c["op_type"]: c["count"] for c in manifest["onnx"]["custom_ops"]}
    assert custom["PillarScatter"] == 1 and custom["MultiScaleDeformableAttn"] >= 4
    check = json.loads((fused_converted_dir / "check.json").read_text())
    assert check["passed"] and {o["name"] for o in check["onnxruntime"]["outputs"]} == {
        "bev_embed", "cls_scores", "bbox_preds", "occupancy"}


def test_calibration_set_of_raw_pillars_is_refused_for_a_normalised_model(tmp_path, small_recipe, small_model):
    import dataclasses

    from deploykit.quantize.calib_set import build_calib_set, load_calib_set

    # Host decoration (engines converted without decorate_in_graph), where normalising is the host's job.
    host = [p for p in small_recipe.convert.passes if p != "decorate_in_graph"]
    small_recipe = dataclasses.replace(small_recipe, convert=dataclasses.replace(small_recipe.convert, passes=host))
    raw = tmp_path / "raw"
    build_calib_set(small_recipe, raw, samples=2)  # the recipe's passes do not normalise
    model = apply_passes(small_model, [*small_recipe.convert.passes, "normalise_points"])
    layout, scale, _ = pillar_format(model)
    inputs = [{"name": "pillars", "shape": list(np.load(raw / "000000.npz")["pillars"].shape), "dtype": "float32",
               "scale": scale.tolist()},
              {"name": "coords", "shape": [small_recipe.model.voxelization.max_pillars, 4], "dtype": "int32"}]
    with pytest.raises(InputError, match=r"holds raw pillar features, the model takes them divided by"):
        load_calib_set(raw, recipe=small_recipe.name, inputs=inputs)
    normalised = dataclasses.replace(small_recipe, convert=dataclasses.replace(
        small_recipe.convert, passes=(*small_recipe.convert.passes, "normalise_points")))
    good = tmp_path / "normalised"
    build_calib_set(normalised, good, samples=2)
    assert len(load_calib_set(good, recipe=small_recipe.name, inputs=inputs)) == 2
    assert float(np.abs(np.load(good / "000000.npz")["pillars"]).max()) <= 1.0
