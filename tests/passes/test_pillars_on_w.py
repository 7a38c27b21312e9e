import pytest

from deploykit.errors import RecipeError
from deploykit.passes import max_to_maxpool, pfn_linear_to_conv, pillars_on_w
from tests.conftest import max_rel_error, random_pillars, run, to_layout
from tests.passes.helpers import exported_graph, input_shape

# Same weights, only the memory layout moves; the convolution kernel ORT/PyTorch
# pick may sum in another order, so fp32 rounding only.
TOL = 1e-5


@pytest.mark.parametrize("with_maxpool", [False, True])
def test_layout_move_keeps_outputs(small_recipe, small_model, with_maxpool):
    _, _, xp, coords_p = random_pillars(small_recipe, 800, 200, seed=2)
    before = pfn_linear_to_conv.apply(small_model)
    if with_maxpool:
        before = max_to_maxpool.apply(before)
    after = pillars_on_w.apply(before)
    assert after.input_layout == "CNP"
    ref = run(before, to_layout(xp, "CPN"), coords_p)
    assert max_rel_error(ref, run(after, to_layout(xp, "CNP"), coords_p)) <= TOL


def test_onnx_input_has_pillars_on_w(small_recipe, small_model, tmp_path):
    _, _, xp, coords_p = random_pillars(small_recipe, 50, 10)
    model = pillars_on_w.apply(max_to_maxpool.apply(pfn_linear_to_conv.apply(small_model)))
    graph = exported_graph(model, to_layout(xp, "CNP"), coords_p, tmp_path)
    c, n, p = small_recipe.model.pillar_channels, small_recipe.model.voxelization.max_points_per_pillar, 60
    assert input_shape(graph, "pillars") == [1, c, n, p]
    pool = next(x for x in graph.graph.node if x.op_type == "MaxPool")
    assert list(next(a.ints for a in pool.attribute if a.name == "kernel_shape")) == [n, 1]


def test_needs_the_conv_pass_and_runs_once(small_model):
    with pytest.raises(RecipeError, match="pfn_linear_to_conv"):
        pillars_on_w.apply(small_model)
    once = pillars_on_w.apply(pfn_linear_to_conv.apply(small_model))
    with pytest.raises(RecipeError, match="only once"):
        pillars_on_w.apply(once)
