import numpy as np
import pytest

from deploykit.errors import RecipeError
from deploykit.passes import apply_passes, pillar_scatter_op
from tests.conftest import max_rel_error, random_pillars, run, to_layout
from tests.passes.helpers import exported_graph, op_counts


def test_custom_op_scatter_is_exact(small_recipe, small_model):
    # Scatter only moves values: the result must be bit-identical.
    _, _, xp, coords_p = random_pillars(small_recipe, 900, 100, seed=3)
    after = pillar_scatter_op.apply(small_model)
    for a, b in zip(run(small_model, xp, coords_p), run(after, xp, coords_p)):
        np.testing.assert_array_equal(a, b)


def test_onnx_has_one_pillar_scatter_and_no_scatternd(small_recipe, small_model, tmp_path):
    _, _, xp, coords_p = random_pillars(small_recipe, 50, 10)
    assert op_counts(exported_graph(small_model, xp, coords_p, tmp_path))["ScatterND"] == 1
    graph = exported_graph(pillar_scatter_op.apply(small_model), xp, coords_p, tmp_path)
    ops = op_counts(graph)
    assert ops["PillarScatter"] == 1 and ops["ScatterND"] == 0 and ops["ScatterElements"] == 0
    node = next(n for n in graph.graph.node if n.op_type == "PillarScatter")
    assert node.domain == "deploykit"
    nx, ny, _ = small_recipe.model.voxelization.grid_size
    attrs = {a.name: a.i for a in node.attribute}
    assert attrs == {"height": ny, "width": nx}


def test_all_passes_together_match_the_original(small_recipe, small_model):
    x, coords, xp, coords_p = random_pillars(small_recipe, 1500, 500, seed=4)
    # Random pillars are decorated already: the chain with decorate_in_graph runs on raw voxels
    # in tests/passes/test_decorate_in_graph.py.
    model = apply_passes(small_model, [p for p in small_recipe.convert.passes if p != "decorate_in_graph"])
    assert max_rel_error(run(small_model, x, coords), run(model, to_layout(xp, "CNP"), coords_p)) <= 1e-5


def test_unknown_pass_names_the_closest(small_model):
    with pytest.raises(RecipeError, match="did you mean 'max_to_maxpool'"):
        apply_passes(small_model, ["max_to_maxpol"])


def test_runs_once(small_model):
    with pytest.raises(RecipeError, match="already converted"):
        pillar_scatter_op.apply(pillar_scatter_op.apply(small_model))
