"""Host-side pillar preprocessing for PointPillars-style detectors.

The engine sees only the decorated, padded pillar tensor, so these functions
must reproduce what the PyTorch model saw during training bit for bit:

* ``voxelize`` follows mmcv's CPU ``hard_voxelize`` (voxelization.cpp),
* ``decorate`` follows mmdet3d's ``PillarFeatureNet.forward`` up to the PFN
  layers (pillar_encoder.py), including its ``legacy`` in-place quirk,
* ``pack_pillars`` pads to the static shapes an exported engine takes.

Everything is vectorized numpy; arithmetic is float32 like the reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

PILLAR_LAYOUTS = ("PNC", "CPN", "CNP")


@dataclass(frozen=True)
class VoxelGrid:
    """Voxelization parameters, named as in mmdet3d configs."""

    point_cloud_range: tuple[float, ...]  # xmin, ymin, zmin, xmax, ymax, zmax
    voxel_size: tuple[float, ...]  # vx, vy, vz
    max_points: int  # per voxel
    max_voxels: int

    def __post_init__(self) -> None:
        if len(self.point_cloud_range) != 6:
            raise ValueError(
                "point_cloud_range needs 6 values (xmin, ymin, zmin, xmax, ymax, zmax), "
                f"got {len(self.point_cloud_range)}"
            )
        if len(self.voxel_size) != 3:
            raise ValueError(f"voxel_size needs 3 values (vx, vy, vz), got {len(self.voxel_size)}")
        if not all(math.isfinite(v) for v in (*self.point_cloud_range, *self.voxel_size)):
            raise ValueError("point_cloud_range and voxel_size must be finite")
        if any(v <= 0 for v in self.voxel_size):
            raise ValueError(f"voxel_size must be positive, got {self.voxel_size}")
        lo, hi = self.point_cloud_range[:3], self.point_cloud_range[3:]
        if any(h <= l for l, h in zip(lo, hi)):
            raise ValueError(
                f"point_cloud_range max must exceed min on every axis, got {self.point_cloud_range}"
            )
        if self.max_points < 1 or self.max_voxels < 1:
            raise ValueError(
                f"max_points and max_voxels must be >= 1, got {self.max_points} and {self.max_voxels}"
            )
        if min(self.grid_size) < 1:
            raise ValueError(
                f"voxel_size {self.voxel_size} is larger than the range, grid would be {self.grid_size}"
            )

    @property
    def grid_size(self) -> tuple[int, int, int]:
        """(nx, ny, nz), computed as mmcv does: float32 division, rounded half away from zero."""
        lo, hi, size = _float32_range_and_size(self)
        nx, ny, nz = (int(math.floor(float(c) + 0.5)) for c in (hi - lo) / size)
        return nx, ny, nz


@dataclass
class Voxels:
    """Hard-voxelization output, shaped like mmcv's ``Voxelization`` returns."""

    features: np.ndarray  # (P, max_points, C) float32, zero-padded
    num_points: np.ndarray  # (P,) int32
    coords: np.ndarray  # (P, 3) int32, (z, y, x)
    # Non-empty voxels beyond max_voxels, and their in-range points, that mmcv drops.
    dropped_voxels: int = 0
    dropped_points: int = 0

    @property
    def num_voxels(self) -> int:
        return int(self.num_points.shape[0])


def voxelize(points: np.ndarray, grid: VoxelGrid) -> Voxels:
    """Group points into voxels with mmcv ``hard_voxelize`` semantics.

    Voxels are numbered in the order their first point appears; once
    ``max_voxels`` exist, points that would open a new voxel are dropped, while
    points of existing voxels are still added up to ``max_points`` each, in
    input order; ``dropped_voxels`` / ``dropped_points`` count what did not
    fit, so callers can say so (mmcv drops it silently). Float64 input is
    cast to float32 first, because the deployed model was trained on float32
    point tensors.
    """
    points = _validated_points(points)
    point_idx, key = _cell_keys(points, grid)
    voxel_of_point, first_point = _voxel_ids_by_first_appearance(key, math.prod(grid.grid_size))
    num_voxels = min(first_point.size, grid.max_voxels)
    if num_voxels < first_point.size:
        kept_voxel = voxel_of_point < num_voxels
        point_idx, voxel_of_point = point_idx[kept_voxel], voxel_of_point[kept_voxel]
    dropped_points = key.size - point_idx.size

    # A point's slot is its rank among its voxel's points in input order: group
    # the points by voxel with a stable sort and count from each group's start.
    order = _stable_argsort(voxel_of_point, num_voxels)
    voxel_sorted = voxel_of_point[order]
    counts = np.bincount(voxel_of_point, minlength=num_voxels)
    slot = np.arange(order.size)
    slot -= (np.cumsum(counts) - counts)[voxel_sorted]
    # point_idx is arange(M) when every point was kept: skip that gather.
    src = order if point_idx.size == points.shape[0] else point_idx[order]
    dest = voxel_sorted  # intp; reused in place, as it is not needed after this
    dest *= grid.max_points
    dest += slot
    if counts.max(initial=0) > grid.max_points:
        fits = slot < grid.max_points
        src, dest = src[fits], dest[fits]

    channels = points.shape[1]
    features = np.zeros((num_voxels, grid.max_points, channels), dtype=np.float32)
    # Move whole points as opaque C*4-byte items: numpy then copies each with
    # one memcpy, where a (K, C) float scatter loops over the C values of
    # every row and takes several times as long. Both arrays are C-contiguous.
    row = np.dtype((np.void, 4 * channels))
    np.put(features.view(row), dest, np.take(points.view(row), src))

    nx, ny, _ = grid.grid_size
    first_key = key[first_point[:num_voxels]]
    coords = np.stack([first_key // (nx * ny), first_key // nx % ny, first_key % nx], axis=1).astype(np.int32)
    return Voxels(features=features, num_points=np.minimum(counts, grid.max_points).astype(np.int32),
                  coords=coords, dropped_voxels=first_point.size - num_voxels, dropped_points=dropped_points)


def decorate(
    voxels: Voxels,
    grid: VoxelGrid,
    *,
    with_cluster_center: bool = True,
    with_voxel_center: bool = True,
    with_distance: bool = False,
    legacy: bool = False,
) -> np.ndarray:
    """Append PillarFeatureNet's point decorations; returns (P, max_points, C_dec) float32.

    Channel order is [raw features, cluster offset (3), voxel-center offset (3),
    distance (1)], each block present only when enabled. With ``legacy=True``
    mmdet3d writes the voxel-center offsets into the raw xyz columns in place,
    so the first three channels repeat the center offsets and the distance is
    measured from the pillar center, not from the sensor; this reproduces it.
    """
    features = voxels.features.astype(np.float32, copy=True)
    xyz = features[:, :, :3]  # a view: legacy mode writes through it
    blocks = [features]
    if with_cluster_center:
        blocks.append(_cluster_offsets(xyz, voxels.num_points))
    if with_voxel_center:
        center_offsets = _voxel_center_offsets(xyz, voxels.coords, grid)
        if legacy:
            xyz[...] = center_offsets
        blocks.append(center_offsets)
    if with_distance:
        blocks.append(np.sqrt(np.sum(xyz * xyz, axis=2, keepdims=True)))
    decorated = np.concatenate(blocks, axis=2)
    decorated *= _padding_mask(voxels.num_points, features.shape[1])[:, :, None]
    return decorated


def pack_pillars(
    decorated: np.ndarray, coords_zyx: np.ndarray, max_pillars: int, layout: str
) -> tuple[np.ndarray, np.ndarray]:
    """Pad pillars to the engine's static shapes.

    Returns ``pillars`` in ``layout`` ("PNC": (max_pillars, N, C), "CPN":
    (1, C, max_pillars, N), "CNP": (1, C, N, max_pillars)), zero for unused
    pillars, and ``coords`` (max_pillars, 4) int32 rows [batch=0, z, y, x]
    with every column -1 for unused pillars, so a scatter can skip them.
    """
    if layout not in PILLAR_LAYOUTS:
        raise ValueError(f"unknown pillar layout {layout!r}; valid layouts are {', '.join(PILLAR_LAYOUTS)}")
    if decorated.ndim != 3:
        raise ValueError(f"decorated must be (P, N, C), got shape {decorated.shape}")
    num_pillars = decorated.shape[0]
    if coords_zyx.shape != (num_pillars, 3):
        raise ValueError(f"coords_zyx must be ({num_pillars}, 3) to match decorated, got {coords_zyx.shape}")
    if num_pillars > max_pillars:
        raise ValueError(
            f"{num_pillars} non-empty pillars do not fit max_pillars={max_pillars}; "
            "raise max_pillars (and re-export the engine) or crop the point cloud range"
        )

    n, c = decorated.shape[1:]
    # Written straight into the layout, only where there are pillars: padding a PNC copy and
    # transposing all of it took 6x as long (15 ms for the nuScenes CenterPoint's 40k pillars).
    if layout == "PNC":
        pillars = np.zeros((max_pillars, n, c), dtype=np.float32)
        pillars[:num_pillars] = decorated
    elif layout == "CPN":
        pillars = np.zeros((1, c, max_pillars, n), dtype=np.float32)
        pillars[0, :, :num_pillars] = decorated.transpose(2, 0, 1)
    else:
        pillars = np.zeros((1, c, n, max_pillars), dtype=np.float32)
        pillars[0, :, :, :num_pillars] = decorated.transpose(2, 1, 0)
    coords = np.full((max_pillars, 4), -1, dtype=np.int32)
    coords[:num_pillars, 0] = 0
    coords[:num_pillars, 1:] = coords_zyx
    return pillars, coords


def _validated_points(points: np.ndarray) -> np.ndarray:
    points = np.asarray(points)
    if points.ndim != 2 or points.shape[1] < 3:
        raise ValueError(
            f"points must be a 2-D array (M, C) with C >= 3 (x, y, z, ...), got shape {points.shape}"
        )
    if not np.issubdtype(points.dtype, np.floating):
        raise ValueError(f"points must be a float array, got dtype {points.dtype}")
    points = np.ascontiguousarray(points, dtype=np.float32)
    # One flat pass answers "all finite?"; the per-row reductions that the
    # message needs are ~15x slower, so they run only when it is "no".
    if not np.isfinite(points).all():
        bad = np.flatnonzero(~np.isfinite(points).all(axis=1))
        num_nan = int(np.isnan(points).any(axis=1).sum())
        raise ValueError(
            f"points contain {bad.size} non-finite rows ({num_nan} with NaN, "
            f"{bad.size - num_nan} with only inf), first at row {bad[0]}; drop them before voxelizing"
        )
    return points


def _float32_range_and_size(grid: VoxelGrid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # mmcv hands range and size to the kernel as std::vector<float>.
    pcr = np.asarray(grid.point_cloud_range, dtype=np.float32)
    return pcr[:3], pcr[3:], np.asarray(grid.voxel_size, dtype=np.float32)


def _cell_keys(points: np.ndarray, grid: VoxelGrid) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the points inside the grid, and their cells as flat keys ``(z * ny + y) * nx + x``."""
    lo, _, size = _float32_range_and_size(grid)
    scaled = []
    inside = np.ones(points.shape[0], dtype=bool)
    for axis, cells in enumerate(grid.grid_size):
        # mmcv's cell is floor((p - lo) / size) in float32. As the bound is a
        # whole number, floor(v) is in [0, cells) exactly when v is, so the
        # test needs no floor, and casting such a v to int truncates it to its
        # floor; one column at a time, as strided (M, 3) ops are much slower.
        v = points[:, axis] - lo[axis]
        v /= size[axis]
        inside &= v >= 0
        inside &= v < np.float32(cells)
        scaled.append(v)
    point_idx = np.flatnonzero(inside)
    if point_idx.size < points.shape[0]:
        scaled = [v[point_idx] for v in scaled]  # far-away values may not fit an int
    # In place and with int32 temporaries: fewer, smaller fresh arrays (~7% of the voxelize time).
    nx, ny, _ = grid.grid_size
    key = scaled[2].astype(np.intp)
    key *= ny
    key += scaled[1].astype(np.int32)
    key *= nx
    key += scaled[0].astype(np.int32)
    return point_idx, key


# A table with an entry per grid cell finds every cell's first point in one
# pass over the points, 3-9x faster than sorting the keys at 200k points. But
# filling it and reading it at random costs per cell, so it is used while the
# grid has at most _DENSE_CELLS_PER_POINT cells per point (uniformly random
# clouds, the worst case for its cache, broke even at 16-64) and at most
# _DENSE_MAX_CELLS, a 16 MiB int32 table: at 2**22.6 cells and 200k points
# the table was already slower than the sort (8.7 vs 6.1 ms), at 2**23.6 ~3x.
# nuScenes and KITTI pillar grids (262k and 214k cells) use the table from
# about 8k points on; 3-D voxel grids (tens of millions of cells) sort.
_DENSE_CELLS_PER_POINT = 32
_DENSE_MAX_CELLS = 2**22


def _voxel_ids_by_first_appearance(key: np.ndarray, num_cells: int) -> tuple[np.ndarray, np.ndarray]:
    """Voxel id of each point, voxels numbered by first appearance, and each voxel's first point."""
    first = _first_point_in_cell(key, num_cells)
    is_first = first == np.arange(key.size)
    # A voxel's number is how many cells were opened up to its first point.
    voxel_of_point = np.cumsum(is_first)[first]
    voxel_of_point -= 1
    return voxel_of_point, np.flatnonzero(is_first)


def _first_point_in_cell(key: np.ndarray, num_cells: int) -> np.ndarray:
    """For each point, the index of the first point with the same key."""
    n = key.size
    if num_cells <= min(_DENSE_MAX_CELLS, _DENSE_CELLS_PER_POINT * n):
        # ufunc.at applies every (cell, index) pair, repeated cells included,
        # and min does not care in which order; a plain fancy assignment
        # (table[key[::-1]] = ...) would need a write order numpy does not
        # promise. int32 entries halve the memory traffic (1.5-2x faster).
        first = np.full(num_cells, n, dtype=np.int32 if n < 2**31 else np.intp)
        np.minimum.at(first, key, np.arange(n, dtype=first.dtype))
        return first[key]
    order = _stable_argsort(key, num_cells)
    sorted_key = key[order]
    opens = np.ones(n, dtype=bool)
    np.not_equal(sorted_key[1:], sorted_key[:-1], out=opens[1:])
    # Sorted position where each point's run of equal keys starts; the sort is
    # stable, so the point there is the key's first.
    run_start = np.maximum.accumulate(np.where(opens, np.arange(n), 0))
    first = np.empty_like(order)
    first[order] = order[run_start]
    return first


def _stable_argsort(values: np.ndarray, bound: int) -> np.ndarray:
    """``np.argsort(values, kind="stable")`` for ints in [0, bound), by the fastest way numpy has."""
    if bound <= 2**16:
        # numpy's stable sort is a radix sort for 16-bit ints: 2-4x faster than
        # the timsort it uses for wider ones.
        return np.argsort(values.astype(np.uint16), kind="stable")
    shift = max(values.size - 1, 0).bit_length()
    if bound << shift <= 2**63:
        # The index in the low bits makes all keys distinct, so numpy's
        # (unstable, SIMD) sort gives the stable order, 2-10x faster than timsort.
        keyed = values.astype(np.int64, copy=False) << shift
        keyed |= np.arange(values.size)
        keyed.sort()
        return keyed & ((1 << shift) - 1)
    return np.argsort(values, kind="stable")


def _cluster_offsets(xyz: np.ndarray, num_points: np.ndarray) -> np.ndarray:
    # Padded slots are zero, so summing all slots sums the real points.
    mean = xyz.sum(axis=1, keepdims=True) / num_points.astype(np.float32)[:, None, None]
    return xyz - mean


def _voxel_center_offsets(xyz: np.ndarray, coords_zyx: np.ndarray, grid: VoxelGrid) -> np.ndarray:
    # Python-float offsets as mmdet3d computes them; numpy then rounds them to
    # float32 the way torch rounds a Python scalar for a float32 tensor.
    size = grid.voxel_size
    offsets = [size[axis] / 2 + grid.point_cloud_range[axis] for axis in range(3)]
    coords_xyz = coords_zyx[:, ::-1].astype(np.float32)
    center = np.stack(
        [coords_xyz[:, axis] * size[axis] + offsets[axis] for axis in range(3)], axis=1
    )
    return xyz - center[:, None, :]


def _padding_mask(num_points: np.ndarray, max_points: int) -> np.ndarray:
    return (np.arange(max_points)[None, :] < num_points[:, None]).astype(np.float32)
