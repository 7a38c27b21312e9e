import pytest
import torch

from deploykit.errors import RecipeError
from deploykit.models.centerpoint_pillar import PillarFeatureNet
from deploykit.passes import pfn_linear_to_conv
from deploykit.passes.pfn_linear_to_conv import ConvPillarFeatureNet
from tests.conftest import max_rel_error, random_pillars, run, to_layout
from tests.passes.helpers import exported_graph, op_counts

# Linear and a 1x1 convolution sum the same products in different orders:
# fp32 rounding, nothing more. 1e-5 of the output's scale is ~100x that.
TOL = 1e-5


def test_matches_linear_pfn_including_padded_pillars(small_recipe, small_model):
    x, coords, xp, coords_p = random_pillars(small_recipe, 700, 300)
    converted = pfn_linear_to_conv.apply(small_model)
    assert converted.input_layout == "CPN"
    ref = run(small_model, x, coords)
    out = run(converted, to_layout(xp, "CPN"), coords_p)
    assert max_rel_error(ref, out) <= TOL


def test_weights_are_transferred_not_reinitialised(small_model):
    converted = pfn_linear_to_conv.apply(small_model)
    old = small_model.pts_voxel_encoder.pfn_layers
    new = converted.pts_voxel_encoder.pfn_layers
    assert isinstance(converted.pts_voxel_encoder, ConvPillarFeatureNet)
    for a, b in zip(old, new):
        torch.testing.assert_close(b.conv.weight[:, :, 0, 0], a.linear.weight, rtol=0, atol=0)
        torch.testing.assert_close(b.norm.running_var, a.norm.running_var, rtol=0, atol=0)
        assert b.norm.eps == a.norm.eps
    # The input model is untouched: passes return a rewritten copy.
    assert isinstance(small_model.pts_voxel_encoder, PillarFeatureNet)


def test_onnx_pfn_has_no_matmul_or_gemm(small_recipe, small_model, tmp_path):
    _, _, xp, coords_p = random_pillars(small_recipe, 50, 10)
    naive = op_counts(exported_graph(small_model, xp, coords_p, tmp_path))
    assert naive["MatMul"] + naive["Gemm"] > 0  # what the pass removes
    converted = pfn_linear_to_conv.apply(small_model)
    ops = op_counts(exported_graph(converted, to_layout(xp, "CPN"), coords_p, tmp_path))
    assert ops["MatMul"] + ops["Gemm"] == 0


def test_refuses_a_model_without_linear_pfn(small_model):
    converted = pfn_linear_to_conv.apply(small_model)
    with pytest.raises(RecipeError, match="already converted"):
        pfn_linear_to_conv.apply(converted)
