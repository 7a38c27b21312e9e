"""voxelize/decorate/pack_pillars against line-by-line transcriptions of the references.

``_mmcv_hard_voxelize`` transcribes mmcv's CPU kernel (ops/csrc/pytorch/cpu/
voxelization.cpp) as a plain per-point loop, and ``_mmdet3d_decorate``
transcribes mmdet3d's ``PillarFeatureNet.forward`` (voxel_encoders/
pillar_encoder.py) up to the PFN layers in torch, so the vectorized numpy code
is checked against the semantics it claims, not against itself.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from deploykit.preprocess import voxelize as voxelize_module
from deploykit.preprocess.synthetic_lidar import make_scene
from deploykit.preprocess.voxelize import VoxelGrid, Voxels, decorate, pack_pillars, voxelize

NUSCENES_PILLARS = VoxelGrid((-51.2, -51.2, -5.0, 51.2, 51.2, 3.0), (0.2, 0.2, 8.0), 20, 30000)
# A grid whose voxel size is not a power of two and that is not centred, so
# float32 rounding at voxel boundaries actually matters.
SMALL_GRID = VoxelGrid((-3.2, -2.4, -1.0, 3.2, 2.4, 1.0), (0.32, 0.16, 0.5), 5, 400)
KITTI_PILLARS = VoxelGrid((0, -39.68, -3, 69.12, 39.68, 1), (0.16, 0.16, 4), 32, 16000)
# 83M cells and max_voxels above 2**16: the cell sort and the wide voxel-id sort.
NUSCENES_VOXELS = VoxelGrid((-54, -54, -5, 54, 54, 3), (0.075, 0.075, 0.2), 10, 90000)


def _mmcv_hard_voxelize(points: np.ndarray, grid: VoxelGrid) -> Voxels:
    """Per-point loop over mmcv's hard_voxelize_forward_cpu_kernel, float32 throughout."""
    f32 = np.float32
    lo = [f32(v) for v in grid.point_cloud_range[:3]]
    hi = [f32(v) for v in grid.point_cloud_range[3:]]
    size = [f32(v) for v in grid.voxel_size]
    grid_size = [int(math.floor(float((hi[j] - lo[j]) / size[j]) + 0.5)) for j in range(3)]

    num_features = points.shape[1]
    voxels = np.zeros((grid.max_voxels, grid.max_points, num_features), dtype=np.float32)
    coors = np.zeros((grid.max_voxels, 3), dtype=np.int32)
    num_points = np.zeros(grid.max_voxels, dtype=np.int32)
    coor_to_voxelidx: dict[tuple[int, ...], int] = {}
    voxel_num = 0
    for i in range(points.shape[0]):
        coor = [0, 0, 0]
        failed = False
        for j in range(3):
            c = math.floor((f32(points[i, j]) - lo[j]) / size[j])
            if c < 0 or c >= grid_size[j]:
                failed = True
                break
            coor[2 - j] = c
        if failed:
            continue
        key = tuple(coor)
        voxelidx = coor_to_voxelidx.get(key, -1)
        if voxelidx == -1:
            voxelidx = voxel_num
            if voxel_num >= grid.max_voxels:
                continue
            voxel_num += 1
            coor_to_voxelidx[key] = voxelidx
            coors[voxelidx] = coor
        num = num_points[voxelidx]
        if num < grid.max_points:
            voxels[voxelidx, num] = points[i]
            num_points[voxelidx] += 1
    return Voxels(voxels[:voxel_num], num_points[:voxel_num], coors[:voxel_num])


def _sort_based_voxelize(points: np.ndarray, grid: VoxelGrid) -> Voxels:
    """The vectorized voxelize as it was before the dense cell table: np.unique plus stable argsorts.

    Kept as a second reference that is fast enough for full-size sweeps, where
    the per-point loop above would take seconds.
    """
    points = np.ascontiguousarray(points, dtype=np.float32)
    pcr = np.asarray(grid.point_cloud_range, dtype=np.float32)
    lo, size = pcr[:3], np.asarray(grid.voxel_size, dtype=np.float32)
    nx, ny, _ = grid.grid_size

    cell = np.floor((points[:, :3] - lo) / size)
    inside = ((cell >= 0) & (cell < np.asarray(grid.grid_size, dtype=np.float32))).all(axis=1)
    cell = np.where(inside[:, None], cell, 0).astype(np.int64)
    point_idx = np.flatnonzero(inside)
    cell = cell[point_idx]

    key = (cell[:, 2] * ny + cell[:, 1]) * nx + cell[:, 0]
    _, first_point, unique_of_point = np.unique(key, return_index=True, return_inverse=True)
    order = np.argsort(first_point, kind="stable")
    voxel_of_unique = np.empty_like(order)
    voxel_of_unique[order] = np.arange(order.size)
    voxel_of_point, first_point = voxel_of_unique[unique_of_point.reshape(-1)], first_point[order]

    kept_voxel = voxel_of_point < grid.max_voxels
    dropped_points = int(kept_voxel.size - np.count_nonzero(kept_voxel))
    point_idx, voxel_of_point = point_idx[kept_voxel], voxel_of_point[kept_voxel]
    num_voxels = min(len(first_point), grid.max_voxels)

    order = np.argsort(voxel_of_point, kind="stable")
    counts = np.bincount(voxel_of_point, minlength=num_voxels)
    group_start = np.cumsum(counts) - counts
    slot = np.empty_like(order)
    slot[order] = np.arange(order.size) - group_start[voxel_of_point[order]]
    kept_slot = slot < grid.max_points
    point_idx, voxel_of_point, slot = point_idx[kept_slot], voxel_of_point[kept_slot], slot[kept_slot]

    features = np.zeros((num_voxels, grid.max_points, points.shape[1]), dtype=np.float32)
    features[voxel_of_point, slot] = points[point_idx]
    num_points = np.bincount(voxel_of_point, minlength=num_voxels).astype(np.int32)
    coords = cell[first_point[:num_voxels]][:, ::-1].astype(np.int32)
    return Voxels(features=features, num_points=num_points, coords=np.ascontiguousarray(coords),
                  dropped_voxels=len(first_point) - num_voxels, dropped_points=dropped_points)


def _mmdet3d_decorate(
    features: torch.Tensor,
    num_points: torch.Tensor,
    coors: torch.Tensor,
    grid: VoxelGrid,
    *,
    with_cluster_center: bool,
    with_voxel_center: bool,
    with_distance: bool,
    legacy: bool,
) -> torch.Tensor:
    """PillarFeatureNet.forward before the PFN layers; ``coors`` is (P, 4) [batch, z, y, x]."""
    vx, vy, vz = grid.voxel_size
    x_offset = vx / 2 + grid.point_cloud_range[0]
    y_offset = vy / 2 + grid.point_cloud_range[1]
    z_offset = vz / 2 + grid.point_cloud_range[2]

    features_ls = [features]
    if with_cluster_center:
        points_mean = features[:, :, :3].sum(dim=1, keepdim=True) / num_points.type_as(features).view(
            -1, 1, 1
        )
        f_cluster = features[:, :, :3] - points_mean
        features_ls.append(f_cluster)

    dtype = features.dtype
    if with_voxel_center:
        if not legacy:
            f_center = torch.zeros_like(features[:, :, :3])
            f_center[:, :, 0] = features[:, :, 0] - (coors[:, 3].to(dtype).unsqueeze(1) * vx + x_offset)
            f_center[:, :, 1] = features[:, :, 1] - (coors[:, 2].to(dtype).unsqueeze(1) * vy + y_offset)
            f_center[:, :, 2] = features[:, :, 2] - (coors[:, 1].to(dtype).unsqueeze(1) * vz + z_offset)
        else:
            f_center = features[:, :, :3]
            f_center[:, :, 0] = f_center[:, :, 0] - (
                coors[:, 3].type_as(features).unsqueeze(1) * vx + x_offset
            )
            f_center[:, :, 1] = f_center[:, :, 1] - (
                coors[:, 2].type_as(features).unsqueeze(1) * vy + y_offset
            )
            f_center[:, :, 2] = f_center[:, :, 2] - (
                coors[:, 1].type_as(features).unsqueeze(1) * vz + z_offset
            )
        features_ls.append(f_center)

    if with_distance:
        points_dist = torch.norm(features[:, :, :3], 2, 2, keepdim=True)
        features_ls.append(points_dist)

    features = torch.cat(features_ls, dim=-1)
    voxel_count = features.shape[1]
    # get_paddings_indicator(num_points, voxel_count, axis=0)
    mask = num_points.int().unsqueeze(1) > torch.arange(voxel_count, dtype=torch.int).view(1, -1)
    features *= mask.unsqueeze(-1).type_as(features)
    return features


def _random_cloud(
    rng: np.random.Generator, grid: VoxelGrid, count: int, channels: int = 4
) -> np.ndarray:
    """Points mostly inside the grid, some outside it, some exactly on its and its voxels' edges."""
    lo = np.array(grid.point_cloud_range[:3])
    hi = np.array(grid.point_cloud_range[3:])
    span = hi - lo
    points = rng.uniform(lo - 0.1 * span, hi + 0.1 * span, (count, 3))

    # On the range bounds (max is outside in mmcv, min inside) and on voxel
    # edges, give or take two float32 ulps: where float32 and float64
    # arithmetic put a point in different cells.
    on_edge = rng.random((count, 3)) < 0.15
    edge_index = rng.integers(0, np.array(grid.grid_size) + 1, (count, 3))
    edge_values = lo + edge_index * np.array(grid.voxel_size)
    range_bound = np.where(rng.random((count, 3)) < 0.5, lo, hi)
    edge_values = np.where(rng.random((count, 3)) < 0.3, range_bound, edge_values)
    edge_values = edge_values.astype(np.float32)
    edge_values += rng.integers(-2, 3, (count, 3)) * np.spacing(edge_values)
    points = np.where(on_edge, edge_values, points)

    # Clusters so that many points share voxels and max_points binds.
    cluster_rows = rng.random(count) < 0.5
    centers = rng.uniform(lo, hi, (8, 3))
    points[cluster_rows] = centers[rng.integers(0, 8, cluster_rows.sum())] + rng.normal(
        0, 0.05 * np.array(grid.voxel_size), (cluster_rows.sum(), 3)
    )
    extra = rng.uniform(0, 1, (count, channels - 3))
    return np.concatenate([points, extra], axis=1).astype(np.float32)


def _assert_voxels_equal(actual: Voxels, expected: Voxels) -> None:
    assert actual.features.dtype == np.float32
    assert actual.num_points.dtype == np.int32
    assert actual.coords.dtype == np.int32
    np.testing.assert_array_equal(actual.num_points, expected.num_points)
    np.testing.assert_array_equal(actual.coords, expected.coords)
    np.testing.assert_array_equal(actual.features, expected.features)


def _assert_identical(actual: Voxels, expected: Voxels) -> None:
    """Every field equal, dtypes and the dropped counts included."""
    for name in ("features", "num_points", "coords"):
        a, e = getattr(actual, name), getattr(expected, name)
        assert a.dtype == e.dtype and a.shape == e.shape, name
        assert a.flags.c_contiguous, name
        np.testing.assert_array_equal(a, e, err_msg=name)
    assert (actual.dropped_voxels, actual.dropped_points) == (expected.dropped_voxels, expected.dropped_points)


@pytest.fixture(params=["default", "table", "sort"])
def cell_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with the threshold as shipped, with the cell table forced on, or with it off."""
    if request.param == "table":
        monkeypatch.setattr(voxelize_module, "_DENSE_MAX_CELLS", 2**62)
        monkeypatch.setattr(voxelize_module, "_DENSE_CELLS_PER_POINT", 2**40)
    elif request.param == "sort":
        monkeypatch.setattr(voxelize_module, "_DENSE_MAX_CELLS", 0)
    return request.param


# The small grid with loose caps, with both caps binding, and as pillars (one voxel in z).
SMALL_GRIDS = pytest.mark.parametrize(
    "grid",
    [
        SMALL_GRID,
        VoxelGrid(SMALL_GRID.point_cloud_range, SMALL_GRID.voxel_size, max_points=3, max_voxels=40),
        VoxelGrid(SMALL_GRID.point_cloud_range, (0.32, 0.16, 2.0), max_points=32, max_voxels=12000),
    ],
    ids=["caps-loose", "caps-bind", "pillars"],
)


@pytest.mark.parametrize("seed", range(6))
@SMALL_GRIDS
def test_voxelize_matches_mmcv_loop(seed: int, grid: VoxelGrid) -> None:
    points = _random_cloud(np.random.default_rng(seed), grid, 1500)
    expected = _mmcv_hard_voxelize(points, grid)
    actual = voxelize(points, grid)
    _assert_voxels_equal(actual, expected)
    assert actual.num_voxels > 0


@pytest.mark.parametrize("seed", range(3))
@SMALL_GRIDS
def test_both_cell_paths_match_mmcv_loop(seed: int, grid: VoxelGrid, cell_path: str) -> None:
    points = _random_cloud(np.random.default_rng(100 + seed), grid, 1500)
    expected = _mmcv_hard_voxelize(points, grid)
    actual = voxelize(points, grid)
    _assert_voxels_equal(actual, expected)
    _assert_identical(actual, _sort_based_voxelize(points, grid))


@pytest.mark.parametrize(
    "grid", [NUSCENES_PILLARS, KITTI_PILLARS, NUSCENES_VOXELS], ids=["nuscenes-pillars", "kitti-pillars", "voxels"]
)
@pytest.mark.parametrize("source", ["random", "scene"])
def test_full_size_sweeps_match_the_sort_based_reference(grid: VoxelGrid, source: str, cell_path: str) -> None:
    # The sizes the fast paths are for; the mmcv loop would take minutes here.
    if cell_path == "table" and grid is NUSCENES_VOXELS:
        pytest.skip("a table for 83M cells takes 330 MB; the shipped threshold never builds one")
    if source == "scene":
        points = make_scene(0).points  # a nuScenes-range sweep; for KITTI part of it is outside
    else:
        points = _random_cloud(np.random.default_rng(11), grid, 200_000, channels=5)
    expected = _sort_based_voxelize(points, grid)
    _assert_identical(voxelize(points, grid), expected)
    if source == "random" and grid is not NUSCENES_VOXELS:
        # Guard: both caps bind, so the drop bookkeeping is compared too.
        assert expected.dropped_voxels > 0 and expected.dropped_points > 0
        assert (expected.num_points == grid.max_points).sum() > 5


def test_shipped_threshold_picks_the_table_for_pillars_and_the_sort_for_voxels(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The sort path sorts the cell keys (bound = number of cells); the table
    # path only sorts voxel ids (bound = number of voxels).
    bounds: list[int] = []
    real_stable_argsort = voxelize_module._stable_argsort

    def recording_stable_argsort(values: np.ndarray, bound: int) -> np.ndarray:
        bounds.append(bound)
        return real_stable_argsort(values, bound)

    monkeypatch.setattr(voxelize_module, "_stable_argsort", recording_stable_argsort)
    points = _random_cloud(np.random.default_rng(12), NUSCENES_PILLARS, 20_000, channels=5)
    num_cells = {grid: math.prod(grid.grid_size) for grid in (NUSCENES_PILLARS, NUSCENES_VOXELS)}

    voxelize(points, NUSCENES_PILLARS)
    assert num_cells[NUSCENES_PILLARS] not in bounds
    bounds.clear()
    voxelize(points[:1000], NUSCENES_PILLARS)  # 262 cells a point: sorting is cheaper
    assert bounds[0] == num_cells[NUSCENES_PILLARS]
    bounds.clear()
    voxelize(points, NUSCENES_VOXELS)  # 83M cells: a table would be 330 MB
    assert bounds[0] == num_cells[NUSCENES_VOXELS]


def test_negative_zero_and_cell_edges_follow_mmcv(cell_path: str) -> None:
    # -0.0 - 0.0 is -0.0, whose floor is -0.0 >= 0: mmcv puts it in cell 0, so
    # a sign-bit or truncation shortcut would get it wrong. The rest sit on,
    # or one float32 step either side of, cell and range edges.
    grid = VoxelGrid((0, -1, 0, 1, 1, 1), (0.25, 0.5, 1), max_points=4, max_voxels=100)
    below, above = np.nextafter(np.float32(0.5), np.float32(0)), np.nextafter(np.float32(0.5), np.float32(1))
    points = np.array(
        [
            [-0.0, 0.0, 0.5],
            [-np.float32(1e-45), 0.0, 0.5],  # the smallest negative float32: outside
            [0.5, 0.0, 0.5],
            [below, 0.0, 0.5],
            [above, 0.0, 0.5],
            [0.25, -0.5, -0.0],
            [1.0, 0.0, 0.5],  # x == max: outside
            [np.nextafter(np.float32(1), np.float32(0)), np.nextafter(np.float32(1), np.float32(0)), 0.99],
            [0.5, -1.0, 0.0],
        ],
        dtype=np.float32,
    )
    voxels = voxelize(points, grid)
    assert voxels.coords.tolist()[0] == [0, 2, 0]
    _assert_voxels_equal(voxels, _mmcv_hard_voxelize(points, grid))
    _assert_identical(voxels, _sort_based_voxelize(points, grid))


@pytest.mark.parametrize("count", [0, 5])
def test_nothing_inside_matches_the_reference_on_both_paths(count: int, cell_path: str) -> None:
    points = np.full((count, 4), 100.0, np.float32)
    _assert_identical(voxelize(points, NUSCENES_PILLARS), _sort_based_voxelize(points, NUSCENES_PILLARS))


def test_huge_finite_points_are_not_mistaken_for_non_finite() -> None:
    # The fast finiteness test must not be a sum, which overflows to inf here.
    points = np.array([[0.5, 0.5, 0.5, 3e38, 3e38], [0.55, 0.55, 0.5, 3e38, -3e38]], np.float32)
    voxels = voxelize(points, NUSCENES_PILLARS)
    assert voxels.num_points.tolist() == [2]
    np.testing.assert_array_equal(voxels.features[0, :2], points)


@pytest.mark.parametrize(
    ("bound", "count"),
    [(1, 10), (2**16, 5000), (2**16 + 1, 5000), (2**30, 5000), (2**62, 8), (2**62, 1), (5, 0)],
)
def test_stable_argsort_is_numpys_stable_argsort(bound: int, count: int) -> None:
    # Radix sort on uint16, the index packed into an int64 key, and plain timsort.
    values = np.random.default_rng(bound % 97).integers(0, bound, count, dtype=np.int64)
    values[: count // 2] = values[0] if count else 0  # long runs of equal values: stability matters
    np.testing.assert_array_equal(voxelize_module._stable_argsort(values, bound), np.argsort(values, kind="stable"))


def test_caps_bind_in_the_random_clouds() -> None:
    # Guards the parametrized test above against silently testing nothing.
    grid = VoxelGrid(SMALL_GRID.point_cloud_range, SMALL_GRID.voxel_size, max_points=3, max_voxels=40)
    points = _random_cloud(np.random.default_rng(0), grid, 1500)
    voxels = voxelize(points, grid)
    assert voxels.num_voxels == grid.max_voxels
    assert (voxels.num_points == grid.max_points).sum() > 5


def test_points_of_existing_voxels_are_kept_after_max_voxels() -> None:
    grid = VoxelGrid((0, 0, 0, 4, 4, 4), (1, 1, 4), max_points=3, max_voxels=2)
    points = np.array(
        [
            [0.5, 0.5, 1, 0],  # voxel 0
            [1.5, 0.5, 1, 1],  # voxel 1
            [2.5, 0.5, 1, 2],  # would be voxel 2: dropped
            [1.6, 0.6, 1, 3],  # voxel 1 again: kept
            [2.6, 0.6, 1, 4],  # still dropped
            [0.6, 0.6, 1, 5],  # voxel 0
            [0.7, 0.7, 1, 6],  # voxel 0, third point
            [0.8, 0.8, 1, 7],  # voxel 0 is full
        ],
        dtype=np.float32,
    )
    voxels = voxelize(points, grid)
    np.testing.assert_array_equal(voxels.num_points, [3, 2])
    np.testing.assert_array_equal(voxels.coords, [[0, 0, 0], [0, 0, 1]])
    np.testing.assert_array_equal(voxels.features[0, :, 3], [0, 5, 6])
    np.testing.assert_array_equal(voxels.features[1, :, 3], [1, 3, 0])
    np.testing.assert_array_equal(voxels.features[1, 2], 0)


def test_boundaries_follow_float32_floor() -> None:
    grid = VoxelGrid((0, 0, 0, 1, 1, 1), (0.25, 0.25, 1), max_points=4, max_voxels=10)
    points = np.array(
        [
            [0.0, 0.0, 0.0],  # min corner: inside, cell 0
            [1.0, 0.5, 0.5],  # x == max: outside
            [np.nextafter(np.float32(1), np.float32(0)), 0.5, 0.5],  # just below max: last cell
            [-1e-7, 0.5, 0.5],  # just below min: outside
            [0.25, 0.75, 0.5],  # on an inner edge: the upper cell
        ],
        dtype=np.float32,
    )
    voxels = voxelize(points, grid)
    np.testing.assert_array_equal(voxels.coords, [[0, 0, 0], [0, 2, 3], [0, 3, 1]])
    _assert_voxels_equal(voxels, _mmcv_hard_voxelize(points, grid))


def test_voxel_index_uses_float32_arithmetic() -> None:
    # (x - xmin) / vx is 4.99999... in float64 but rounds to 5.0 in float32.
    points = np.array([[-50.20000076293945, 0.0, 0.0]], dtype=np.float32)
    assert math.floor((float(points[0, 0]) - -51.2) / 0.2) == 4
    np.testing.assert_array_equal(voxelize(points, NUSCENES_PILLARS).coords, [[0, 256, 5]])


def test_empty_and_all_outside_inputs_give_zero_voxels() -> None:
    for points in (np.zeros((0, 5), np.float32), np.full((4, 5), 100.0, np.float32)):
        voxels = voxelize(points, NUSCENES_PILLARS)
        assert voxels.features.shape == (0, 20, 5)
        assert voxels.num_points.shape == (0,)
        assert voxels.coords.shape == (0, 3)
        assert voxels.features.dtype == np.float32 and voxels.coords.dtype == np.int32


def test_float64_input_is_voxelized_as_float32() -> None:
    points = _random_cloud(np.random.default_rng(7), SMALL_GRID, 500).astype(np.float64) + 1e-9
    _assert_voxels_equal(voxelize(points, SMALL_GRID), voxelize(points.astype(np.float32), SMALL_GRID))


@pytest.mark.parametrize(
    ("points", "message"),
    [
        (np.zeros((4,), np.float32), "2-D"),
        (np.zeros((4, 2), np.float32), "C >= 3"),
        (np.zeros((4, 4), np.int32), "float"),
        (
            np.array([[0, 0, np.nan], [1, 1, 1], [np.nan, 0, 0], [0, np.inf, 0]], np.float32),
            "3 non-finite rows (2 with NaN, 1 with only inf), first at row 0",
        ),
    ],
)
def test_voxelize_rejects_bad_points(points: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        voxelize(points, NUSCENES_PILLARS)


@pytest.mark.parametrize(
    ("pcr", "voxel_size", "expected"),
    [
        ((-51.2, -51.2, -5.0, 51.2, 51.2, 3.0), (0.2, 0.2, 8.0), (512, 512, 1)),  # nuScenes pillars
        ((0, -39.68, -3, 69.12, 39.68, 1), (0.16, 0.16, 4), (432, 496, 1)),  # KITTI pillars
        ((-54, -54, -5, 54, 54, 3), (0.075, 0.075, 0.2), (1440, 1440, 40)),  # nuScenes voxels
        ((0, 0, 0, 1.25, 1.25, 1), (0.5, 0.5, 1), (3, 3, 1)),  # C++ round: half away from zero
    ],
)
def test_grid_size_matches_mmcv_configs(pcr: tuple, voxel_size: tuple, expected: tuple) -> None:
    assert VoxelGrid(pcr, voxel_size, 20, 1000).grid_size == expected


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(voxel_size=(0.2, 0.0, 8.0)), "voxel_size must be positive"),
        (dict(point_cloud_range=(0, 0, 0, 1, -1, 1)), "max must exceed min"),
        (dict(point_cloud_range=(0, 0, 0, 1, 1)), "needs 6 values"),
        (dict(max_points=0), "max_points and max_voxels must be >= 1"),
        (dict(voxel_size=(300.0, 0.2, 8.0)), "larger than the range"),
    ],
)
def test_voxel_grid_validation(kwargs: dict, message: str) -> None:
    args = dict(
        point_cloud_range=(-51.2, -51.2, -5.0, 51.2, 51.2, 3.0),
        voxel_size=(0.2, 0.2, 8.0),
        max_points=20,
        max_voxels=10,
    )
    with pytest.raises(ValueError, match=message):
        VoxelGrid(**{**args, **kwargs})


def _reduction_channels(
    num_raw: int, with_cluster_center: bool, with_voxel_center: bool, with_distance: bool
) -> np.ndarray:
    """Which decorated channels come from a sum over several values (cluster offset, distance)."""
    blocks = [
        (num_raw, False),
        (3 * with_cluster_center, True),
        (3 * with_voxel_center, False),
        (with_distance, True),
    ]
    return np.concatenate([np.full(int(width), is_reduction) for width, is_reduction in blocks])


def _float32_ulps_of_points(voxels: Voxels, ulps: int) -> float:
    """``ulps`` float32 steps at the largest point norm: the scale the rounding errors live at."""
    largest = np.linalg.norm(voxels.features[:, :, :3], axis=2).max(initial=1.0)
    return ulps * float(np.spacing(np.float32(largest)))


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("with_distance", [False, True])
@pytest.mark.parametrize(
    ("with_cluster_center", "with_voxel_center"), [(True, True), (True, False), (False, True), (False, False)]
)
@pytest.mark.parametrize(
    ("grid", "source"),
    [(NUSCENES_PILLARS, "random"), (SMALL_GRID, "random"), (NUSCENES_PILLARS, "scene")],
    ids=["nuscenes-random", "small-random", "nuscenes-scene"],
)
def test_decorate_matches_mmdet3d(
    grid: VoxelGrid,
    source: str,
    with_cluster_center: bool,
    with_voxel_center: bool,
    with_distance: bool,
    legacy: bool,
) -> None:
    if source == "scene":
        points = make_scene(1).points
    else:
        points = _random_cloud(np.random.default_rng(3), grid, 4000, channels=5)
    voxels = voxelize(points, grid)
    coors = np.concatenate([np.zeros((voxels.num_voxels, 1), np.int32), voxels.coords], axis=1)
    flags = dict(
        with_cluster_center=with_cluster_center,
        with_voxel_center=with_voxel_center,
        with_distance=with_distance,
    )
    expected = _mmdet3d_decorate(
        torch.from_numpy(voxels.features.copy()),
        torch.from_numpy(voxels.num_points),
        torch.from_numpy(coors),
        grid,
        legacy=legacy,
        **flags,
    ).numpy()

    actual = decorate(voxels, grid, legacy=legacy, **flags)
    expected_channels = 5 + 3 * with_cluster_center + 3 * with_voxel_center + with_distance
    assert actual.shape == (voxels.num_voxels, grid.max_points, expected_channels)
    assert actual.dtype == np.float32
    # Raw and voxel-center channels are elementwise float32 ops done in the
    # same order as torch, so they must match bit for bit.
    reduced = _reduction_channels(5, **flags)
    np.testing.assert_array_equal(actual[:, :, ~reduced], expected[:, :, ~reduced])
    # Cluster mean and norm are sums; torch's reduction kernels add in another
    # order (SIMD partial sums), which moves results by an ulp or two of the
    # point coordinates, even where the result itself is small. An absolute
    # 1e-6 is below one ulp at nuScenes ranges (7.6e-6 at 64 m), so the bound
    # is 4 ulps of the largest point norm (3e-5 there, 1e-6 on the small
    # grid); a wrong offset, column or mask is off by orders of magnitude more.
    np.testing.assert_allclose(actual, expected, rtol=0, atol=_float32_ulps_of_points(voxels, 4))


def test_decorate_legacy_overwrites_raw_xyz_with_center_offsets() -> None:
    # Pins down the quirk itself, independent of the torch transcription.
    voxels = voxelize(_random_cloud(np.random.default_rng(4), SMALL_GRID, 800), SMALL_GRID)
    new = decorate(voxels, SMALL_GRID, with_distance=True, legacy=False)
    old = decorate(voxels, SMALL_GRID, with_distance=True, legacy=True)
    center = new[:, :, 7:10]
    np.testing.assert_array_equal(old[:, :, :3], center)
    np.testing.assert_array_equal(old[:, :, 3:10], new[:, :, 3:10])
    np.testing.assert_allclose(old[:, :, 10], np.linalg.norm(center, axis=2), atol=1e-6)
    np.testing.assert_allclose(new[:, :, 10], np.linalg.norm(new[:, :, :3], axis=2), atol=1e-6)
    assert np.abs(center).max(axis=(0, 1))[:2].max() <= 0.5 * max(SMALL_GRID.voxel_size[:2]) + 1e-6


def test_decorate_zeroes_padding_and_leaves_input_alone() -> None:
    voxels = voxelize(_random_cloud(np.random.default_rng(5), SMALL_GRID, 800), SMALL_GRID)
    before = voxels.features.copy()
    decorated = decorate(voxels, SMALL_GRID, with_distance=True, legacy=True)
    np.testing.assert_array_equal(voxels.features, before)
    padding = np.arange(SMALL_GRID.max_points)[None, :] >= voxels.num_points[:, None]
    assert padding.any()
    assert not decorated[padding].any()
    assert decorated[~padding][:, 5:8].any()


def _decorated_example(num_pillars: int = 7) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    decorated = rng.normal(size=(num_pillars, 4, 10)).astype(np.float32)
    coords = rng.integers(0, 100, (num_pillars, 3)).astype(np.int32)
    return decorated, coords


def test_pack_pillars_layouts_hold_the_same_numbers() -> None:
    decorated, coords_zyx = _decorated_example()
    pnc, coords = pack_pillars(decorated, coords_zyx, 12, "PNC")
    cpn, coords_cpn = pack_pillars(decorated, coords_zyx, 12, "CPN")
    cnp, coords_cnp = pack_pillars(decorated, coords_zyx, 12, "CNP")

    assert pnc.shape == (12, 4, 10)
    assert cpn.shape == (1, 10, 12, 4)
    assert cnp.shape == (1, 10, 4, 12)
    assert all(a.dtype == np.float32 and a.flags.c_contiguous for a in (pnc, cpn, cnp))
    np.testing.assert_array_equal(pnc[:7], decorated)
    np.testing.assert_array_equal(pnc[7:], 0)
    np.testing.assert_array_equal(cpn[0].transpose(1, 2, 0), pnc)
    np.testing.assert_array_equal(cnp[0].transpose(2, 1, 0), pnc)

    assert coords.shape == (12, 4) and coords.dtype == np.int32
    np.testing.assert_array_equal(coords[:7, 0], 0)
    np.testing.assert_array_equal(coords[:7, 1:], coords_zyx)
    np.testing.assert_array_equal(coords[7:], -1)
    np.testing.assert_array_equal(coords_cpn, coords)
    np.testing.assert_array_equal(coords_cnp, coords)


def test_pack_pillars_exact_fit_and_empty() -> None:
    decorated, coords_zyx = _decorated_example(5)
    pillars, coords = pack_pillars(decorated, coords_zyx, 5, "PNC")
    np.testing.assert_array_equal(pillars, decorated)
    assert (coords[:, 0] == 0).all()

    pillars, coords = pack_pillars(decorated[:0], coords_zyx[:0], 3, "CPN")
    assert pillars.shape == (1, 10, 3, 4) and not pillars.any()
    np.testing.assert_array_equal(coords, -1)


def test_pack_pillars_rejects_too_many_pillars() -> None:
    decorated, coords_zyx = _decorated_example(7)
    with pytest.raises(ValueError, match="7 non-empty pillars do not fit max_pillars=6; raise max_pillars"):
        pack_pillars(decorated, coords_zyx, 6, "PNC")


def test_pack_pillars_rejects_unknown_layout() -> None:
    decorated, coords_zyx = _decorated_example()
    with pytest.raises(ValueError, match="unknown pillar layout 'NCP'; valid layouts are PNC, CPN, CNP"):
        pack_pillars(decorated, coords_zyx, 12, "NCP")


def test_pack_pillars_rejects_mismatched_coords() -> None:
    decorated, coords_zyx = _decorated_example()
    with pytest.raises(ValueError, match="coords_zyx must be"):
        pack_pillars(decorated, coords_zyx[:-1], 12, "PNC")


def test_pipeline_on_a_synthetic_scene() -> None:
    scene = make_scene(0)
    voxels = voxelize(scene.points, NUSCENES_PILLARS)
    _assert_voxels_equal(voxels, _mmcv_hard_voxelize(scene.points, NUSCENES_PILLARS))
    pillars, coords = pack_pillars(decorate(voxels, NUSCENES_PILLARS), voxels.coords, 30000, "CPN")
    assert pillars.shape == (1, 11, 30000, 20)
    assert (coords[: voxels.num_voxels] >= 0).all() and (coords[voxels.num_voxels :] == -1).all()
