"""conform_points: each rule of the [model.points] contract and its message.

Values that pass through are compared bit-exactly (float32 copies); rescaled
intensities within 1 float32 ulp of value * (hi - lo) / (source hi - lo).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from deploykit.data.contract import conform_points
from deploykit.data.points import from_array, read_points, write_points_bin
from deploykit.errors import InputError
from deploykit.preprocess.pillar_inputs import sample_points
from deploykit.recipe import load_recipe


@pytest.fixture(scope="module")
def small():  # intensity 0-1, one sweep
    return load_recipe("centerpoint_pillar_small").model


@pytest.fixture(scope="module")
def nus():  # intensity 0-255, ten sweeps
    return load_recipe("centerpoint_pillar_nus").model


def _scene(cfg, seed=0) -> np.ndarray:
    return sample_points(cfg, seed).copy()  # (N, 5): x, y, z, intensity in cfg's range, dt 0


def _messages(warnings, text):
    return [w for w in warnings if text in w]


def test_contract_cloud_passes_unchanged(small):
    pts = _scene(small)
    out, warnings = conform_points(pts, small)
    assert out.dtype == np.float32 and out.shape == pts.shape
    np.testing.assert_array_equal(out, pts)
    assert warnings == []


def test_non_finite_rows_are_dropped_and_counted(small):
    pts = _scene(small)
    pts[[7, 11], 1] = np.nan
    pts[20, 3] = np.inf
    out, warnings = conform_points(pts, small)
    np.testing.assert_array_equal(out, np.delete(pts, [7, 11, 20], axis=0))
    assert _messages(warnings, f"3 of {len(pts)} points have NaN or Inf and were dropped (first at row 7)")
    pts[:, 0] = np.nan
    with pytest.raises(InputError, match=r"every one of the \d+ points has NaN or Inf"):
        conform_points(pts, small)


def test_nuscenes_file_into_a_0_1_checkpoint_is_rescaled_and_ring_becomes_dt0(small, tmp_path):
    pts = _scene(small)
    raw = pts.copy()
    raw[:, 3] = np.round(pts[:, 3] * 255)
    raw[:, 4] = np.arange(len(pts)) % 32  # ring index
    out, warnings = conform_points(read_points(write_points_bin(tmp_path / "s.pcd.bin", raw)), small)
    np.testing.assert_array_equal(out[:, :3], raw[:, :3])
    np.testing.assert_array_equal(out[:, 3], raw[:, 3] / np.float32(255))  # exactly value / 255
    assert not out[:, 4].any()
    assert _messages(warnings, "intensity rescaled from the nuscenes layout's 0-255 to the checkpoint's 0-1.")
    assert _messages(warnings, "column 5 of a nuScenes-layout file is the ring index, not dt, so dt is 0")


def test_kitti_file_into_the_nuscenes_checkpoint(nus, small, tmp_path):
    pts = _scene(small)[:, :4]  # reflectance 0-1
    out, warnings = conform_points(read_points(write_points_bin(tmp_path / "k.bin", pts)), nus)
    np.testing.assert_allclose(out[:, 3], pts[:, 3] * 255, rtol=1.2e-7, atol=0)
    assert not out[:, 4].any()
    assert _messages(warnings, "rescaled from the kitti layout's 0-1 to the checkpoint's 0-255")
    assert _messages(warnings, "the checkpoint was trained on 10 aggregated sweeps but every dt is 0 (one sweep)")


def test_known_layout_with_values_outside_it_is_refused(small, tmp_path):
    pts = _scene(small)[:, :4]
    pts[:, 3] *= 255  # a 0-255 cloud saved under a KITTI (0-1) name
    path = write_points_bin(tmp_path / "wrong.bin", pts)
    with pytest.raises(InputError, match=r"wrong.bin: intensity of the kitti layout is 0-1 but spans 0\.\.2\d\d.*, "
                                         r"so the file is likely in another layout"):
        conform_points(read_points(path), small)


def test_unknown_intensity_scale_beyond_the_contract_is_refused(small, nus):
    pts = _scene(small)
    pts[:, 3] = np.linspace(0, 255, len(pts))
    with pytest.raises(InputError, match=r"intensity reaches 255 but the checkpoint takes 0-1: divide it by 255"):
        conform_points(pts, small)
    pts[:, 3] = np.linspace(0, 60000, len(pts))
    with pytest.raises(InputError, match=r"intensity reaches 60000 but the checkpoint takes 0-255: 16-bit intensity "
                                         r"needs scaling to 0-255 \(divide it by 257\)"):
        conform_points(pts, nus)
    pts[:, 3] = -20
    with pytest.raises(InputError, match=r"intensity goes down to -20 but the checkpoint takes 0-255"):
        conform_points(pts, nus)
    # Within the 5% slack: accepted as is.
    pts[:, 3] = np.linspace(0, 1.04, len(pts))
    out, _ = conform_points(pts, small)
    np.testing.assert_array_equal(out[:, 3], pts[:, 3])


def test_normalised_intensity_for_a_0_255_checkpoint_is_warned(nus):
    pts = _scene(nus)
    pts[:, 3] /= 255
    _, warnings = conform_points(pts, nus)
    assert _messages(warnings, "but the checkpoint takes 0-255, so it looks normalised to 0-1: multiply it by 255")


def test_missing_intensity_is_refused(small):
    with pytest.raises(InputError, match=r"takes intensity as column 4 but the cloud has only x, y, z"):
        conform_points(_scene(small)[:, :3], small)


def test_ring_index_in_the_dt_slot_is_refused(nus):
    pts = _scene(nus)
    pts[:, 4] = np.arange(len(pts)) % 32
    with pytest.raises(InputError, match=r"column col4 holds only whole numbers 0\.\.31 where the checkpoint takes "
                                         r"dt in seconds, so it is likely a ring index"):
        conform_points(pts, nus)


@pytest.mark.parametrize("low, high", [(-0.05, 0.4), (0.0, 1500.5)])
def test_dt_out_of_range_is_refused(nus, low, high):
    pts = _scene(nus)
    pts[:, 4] = np.linspace(low, high, len(pts))
    with pytest.raises(InputError, match=rf"dt \(column col4\) spans {low:g}\.\.{high:g} s but the checkpoint takes "
                                         r"the lag .* 0\.\.2 s"):
        conform_points(pts, nus)


def test_aggregated_dt_is_kept(nus, small):
    pts = _scene(nus)
    pts[:, 4] = (np.arange(len(pts)) % 10) * np.float32(0.05)
    out, warnings = conform_points(pts, nus, multi_sweep=True)
    np.testing.assert_array_equal(out, pts)
    assert warnings == []
    # The same cloud for a single-sweep checkpoint: kept, but said.
    pts[:, 3] /= 255
    _, warnings = conform_points(pts, small)
    assert _messages(warnings, "trained on single sweeps (dt = 0) but dt reaches 0.45 s")


def test_multi_sweep_needs_a_dt_column(nus, tmp_path):
    raw = _scene(nus)
    path = write_points_bin(tmp_path / "one.pcd.bin", raw)
    with pytest.raises(InputError, match=r"multi_sweep=True needs a dt column .* but the columns are x, y, z, "
                                         r"intensity, ring; aggregate the sweeps"):
        conform_points(read_points(path), nus, multi_sweep=True)


def test_cloud_outside_the_range_or_all_zero_is_refused(small):
    pts = _scene(small)
    mm = pts.copy()
    mm[:, :3] *= 1000  # millimetres
    mm[:, :3] += [30000, 0, 0]
    with pytest.raises(InputError, match=r"no point lies inside the checkpoint's point_cloud_range \(x -25.6..25.6, "
                                         r"y -25.6..25.6, z -5.0..3.0\); the cloud spans x \d+"):
        conform_points(mm, small)
    zeros = np.zeros_like(pts)
    with pytest.raises(InputError, match=r"all \d+ points are at \(0, 0, 0\)"):
        conform_points(zeros, small)


def test_point_count_outside_expected_is_warned(small):
    pts = _scene(small)
    few = dataclasses.replace(small, points=dataclasses.replace(small.points, expected_points=(len(pts) + 1, 10**6)))
    _, warnings = conform_points(pts, few)
    assert _messages(warnings, f"the frame has {len(pts)} points, fewer than the {len(pts) + 1} expected")
    many = dataclasses.replace(small, points=dataclasses.replace(small.points, expected_points=(0, len(pts) - 1)))
    _, warnings = conform_points(pts, many)
    assert _messages(warnings, f"more than the {len(pts) - 1} expected ([model.points] expected_points)")


def test_pcd_time_field_is_not_dt(nus, tmp_path):
    from pypcd4 import PointCloud

    pts = _scene(nus)
    t = np.linspace(0, 0.1, len(pts), dtype=np.float32)
    PointCloud.from_points([*pts[:, :4].T, t], ("x", "y", "z", "intensity", "t"),
                           (np.float32,) * 5).save(tmp_path / "os1.pcd")
    out, warnings = conform_points(read_points(tmp_path / "os1.pcd"), nus)
    np.testing.assert_array_equal(out[:, :4], pts[:, :4])
    assert not out[:, 4].any()
    assert _messages(warnings, "PCD field 't' is a per-point capture time within the sweep, not the sweep lag dt")


def test_explicit_columns(nus):
    pts = _scene(nus)
    cloud = from_array(pts[:, [0, 1, 2, 4, 3]], columns=("x", "y", "z", "dt", "intensity"))
    out, _ = conform_points(cloud, nus)
    np.testing.assert_array_equal(out, pts)
    with pytest.raises(InputError, match=r"the columns a, y, z, intensity, dt lack x"):
        conform_points(from_array(pts, columns=("a", "y", "z", "intensity", "dt")), nus)


def test_pillar_overflow_is_counted_and_warned(small):
    """Beyond max_pillars mmcv drops whole pillars silently; pillar_inputs now says how many (exact counts)."""
    import math

    from deploykit.preprocess.pillar_inputs import pillar_inputs, voxel_grid

    pts = _scene(small)
    v = dataclasses.replace(small.voxelization, max_pillars=300)
    cfg = dataclasses.replace(small, voxelization=v)
    inputs = pillar_inputs(pts, cfg, "PNC")
    assert inputs.num_pillars == 300

    # Plain loop: cells in order of first appearance; points of cells past the 300th are dropped.
    grid = voxel_grid(cfg)
    lo = np.asarray(grid.point_cloud_range[:3], np.float32)
    size = np.asarray(grid.voxel_size, np.float32)
    order, dropped_points = {}, 0
    for p in pts:
        cell = tuple(math.floor(c) for c in (p[:3] - lo) / size)
        if not all(0 <= c < n for c, n in zip(cell, grid.grid_size)):
            continue
        order.setdefault(cell, len(order))
        dropped_points += order[cell] >= 300
    assert inputs.dropped_pillars == len(order) - 300
    assert inputs.warnings == [
        f"{len(order) - 300} of {len(order)} non-empty pillars ({dropped_points} points) did not fit max_pillars=300 "
        "and were dropped, the last ones in point order as mmcv does; raise [model.voxelization] max_pillars to at "
        f"least {len(order)} and re-export the engine."]
    # Within max_pillars: nothing dropped, nothing said.
    fits = pillar_inputs(pts, small, "PNC")
    assert fits.dropped_pillars == 0 and fits.warnings == []
