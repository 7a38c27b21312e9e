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
    cell, inside = _cell_indices(points, grid)
    point_idx = np.flatnonzero(inside)
    cell = cell[point_idx]

    voxel_of_point, first_point = _voxel_ids_by_first_appearance(cell, grid.grid_size)
    kept_voxel = voxel_of_point < grid.max_voxels
    dropped_points = int(kept_voxel.size - np.count_nonzero(kept_voxel))
    point_idx, voxel_of_point = point_idx[kept_voxel], voxel_of_point[kept_voxel]
    num_voxels = min(len(first_point), grid.max_voxels)

    slot = _rank_within_group(voxel_of_point, num_voxels)
    kept_slot = slot < grid.max_points
    point_idx, voxel_of_point, slot = point_idx[kept_slot], voxel_of_point[kept_slot], slot[kept_slot]

    features = np.zeros((num_voxels, grid.max_points, points.shape[1]), dtype=np.float32)
    features[voxel_of_point, slot] = points[point_idx]
    num_points = np.bincount(voxel_of_point, minlength=num_voxels).astype(np.int32)
    coords = cell[first_point[:num_voxels]][:, ::-1].astype(np.int32)  # xyz -> zyx
    return Voxels(features=features, num_points=num_points, coords=np.ascontiguousarray(coords),
                  dropped_voxels=len(first_point) - num_voxels, dropped_points=dropped_points)


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

    pnc = np.zeros((max_pillars, *decorated.shape[1:]), dtype=np.float32)
    pnc[:num_pillars] = decorated
    coords = np.full((max_pillars, 4), -1, dtype=np.int32)
    coords[:num_pillars, 0] = 0
    coords[:num_pillars, 1:] = coords_zyx
    return _to_layout(pnc, layout), coords


def _to_layout(pnc: np.ndarray, layout: str) -> np.ndarray:
    if layout == "PNC":
        return pnc
    if layout == "CPN":
        return np.ascontiguousarray(pnc.transpose(2, 0, 1)[None])
    return np.ascontiguousarray(pnc.transpose(2, 1, 0)[None])


def _validated_points(points: np.ndarray) -> np.ndarray:
    points = np.asarray(points)
    if points.ndim != 2 or points.shape[1] < 3:
        raise ValueError(
            f"points must be a 2-D array (M, C) with C >= 3 (x, y, z, ...), got shape {points.shape}"
        )
    if not np.issubdtype(points.dtype, np.floating):
        raise ValueError(f"points must be a float array, got dtype {points.dtype}")
    points = np.ascontiguousarray(points, dtype=np.float32)
    finite_rows = np.isfinite(points).all(axis=1)
    if not finite_rows.all():
        bad = np.flatnonzero(~finite_rows)
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


def _cell_indices(points: np.ndarray, grid: VoxelGrid) -> tuple[np.ndarray, np.ndarray]:
    """Integer (x, y, z) cell of every point and whether it lies inside the grid."""
    lo, _, size = _float32_range_and_size(grid)
    cell = np.floor((points[:, :3] - lo) / size)
    # Compare while still float so far-away points cannot overflow the int cast.
    inside = ((cell >= 0) & (cell < np.asarray(grid.grid_size, dtype=np.float32))).all(axis=1)
    cell = np.where(inside[:, None], cell, 0).astype(np.int64)
    return cell, inside


def _voxel_ids_by_first_appearance(
    cell: np.ndarray, grid_size: tuple[int, int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Voxel id of each point, voxels numbered by first appearance, and each voxel's first point."""
    nx, ny, _ = grid_size
    key = (cell[:, 2] * ny + cell[:, 1]) * nx + cell[:, 0]
    # np.unique's return_index gives the first occurrence of each key.
    _, first_point, unique_of_point = np.unique(key, return_index=True, return_inverse=True)
    order = np.argsort(first_point, kind="stable")
    voxel_of_unique = np.empty_like(order)
    voxel_of_unique[order] = np.arange(order.size)
    return voxel_of_unique[unique_of_point.reshape(-1)], first_point[order]


def _rank_within_group(group: np.ndarray, num_groups: int) -> np.ndarray:
    """Position of each element among the elements of its group, in input order."""
    order = np.argsort(group, kind="stable")
    counts = np.bincount(group, minlength=num_groups)
    group_start = np.cumsum(counts) - counts
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size) - group_start[group[order]]
    return rank


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
