import pytest

from deploykit.errors import RecipeError
from deploykit.passes import max_to_maxpool, pfn_linear_to_conv
from tests.conftest import random_pillars, run, to_layout
from tests.passes.helpers import exported_graph, op_counts

import numpy as np


def test_maxpool_equals_max_exactly(small_recipe, small_model):
    # A maximum is exact in any order: no tolerance.
    _, _, xp, coords_p = random_pillars(small_recipe, 600, 100, seed=1)
    before = pfn_linear_to_conv.apply(small_model)
    after = max_to_maxpool.apply(before)
    for a, b in zip(run(before, to_layout(xp, "CPN"), coords_p), run(after, to_layout(xp, "CPN"), coords_p)):
        np.testing.assert_array_equal(a, b)


def test_onnx_has_maxpool_and_no_reducemax(small_recipe, small_model, tmp_path):
    _, _, xp, coords_p = random_pillars(small_recipe, 50, 10)
    before = pfn_linear_to_conv.apply(small_model)
    assert op_counts(exported_graph(before, to_layout(xp, "CPN"), coords_p, tmp_path))["ReduceMax"] > 0
    graph = exported_graph(max_to_maxpool.apply(before), to_layout(xp, "CPN"), coords_p, tmp_path)
    ops = op_counts(graph)
    assert ops["ReduceMax"] == 0
    pools = [n for n in graph.graph.node if n.op_type == "MaxPool"]
    assert len(pools) == len(small_recipe.model.pillar_encoder.feat_channels)
    n = small_recipe.model.voxelization.max_points_per_pillar
    kernel = next(a.ints for a in pools[0].attribute if a.name == "kernel_shape")
    assert list(kernel) == [1, n]


def test_needs_the_conv_pass_first(small_model):
    with pytest.raises(RecipeError, match="pfn_linear_to_conv"):
        max_to_maxpool.apply(small_model)
