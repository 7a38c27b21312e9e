import numpy as np
import pytest

from deploykit.errors import InputError
from deploykit.preprocess.pillar_inputs import pillar_inputs, sample_points


def test_sample_inputs_have_engine_shapes(small_recipe):
    points = sample_points(small_recipe.model, seed=3)
    inputs = pillar_inputs(points, small_recipe.model, "CNP")
    v = small_recipe.model.voxelization
    assert inputs.feeds["pillars"].shape == (1, small_recipe.model.pillar_channels, v.max_points_per_pillar, v.max_pillars)
    assert inputs.feeds["coords"].shape == (v.max_pillars, 4)
    assert (inputs.feeds["coords"][inputs.num_pillars:] == -1).all()
    np.testing.assert_array_equal(inputs.feeds["coords"][: inputs.num_pillars], inputs.coords)


def test_nan_points_are_rejected_with_the_row(small_recipe):
    points = sample_points(small_recipe.model, seed=3)
    points[7, 1] = np.nan
    with pytest.raises(InputError, match="1 non-finite rows.*first at row 7"):
        pillar_inputs(points, small_recipe.model, "CNP")


def test_too_few_point_features(small_recipe):
    points = sample_points(small_recipe.model, seed=3)[:, :4]
    with pytest.raises(InputError, match=r"points must be \(M, >= 5\)"):
        pillar_inputs(points, small_recipe.model, "CNP")


def test_pillars_beyond_max_are_dropped_like_mmcv(small_recipe):
    import dataclasses

    v = dataclasses.replace(small_recipe.model.voxelization, max_pillars=100)
    model_cfg = dataclasses.replace(small_recipe.model, voxelization=v)
    points = sample_points(small_recipe.model, seed=3)
    # Voxelization caps at max_pillars like mmcv (max_voxels), so the engine input never overflows.
    inputs = pillar_inputs(points, model_cfg, "CNP")
    assert inputs.num_pillars == 100
