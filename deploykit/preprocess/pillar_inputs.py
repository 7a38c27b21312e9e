"""From a point cloud to the tensors a pillar network takes, for one recipe."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import numpy as np

from ..errors import InputError
from .synthetic_lidar import make_scene
from .voxelize import VoxelGrid, decorate, pack_pillars, voxelize


class PillarFormat(NamedTuple):
    """How the host packs pillars for an engine: the layout, the per-channel divisor of an
    engine converted with ``normalise_points`` (None: none, or applied in the graph), and
    whether the engine decorates the points itself (``decorate_in_graph``: the host then
    feeds raw voxels and ``num_points``). ``pillar_inputs(points, cfg, *fmt)`` packs for it."""

    layout: str = "PNC"
    scale: np.ndarray | None = None
    decorate_in_graph: bool = False


@dataclass
class PillarInputs:
    """Engine feeds (static shapes) plus the unpadded pillars they came from.

    The unpadded form is what the original mmdet3d model sees; comparing it
    with the padded engine path proves padding never leaks into the output.
    """

    feeds: dict[str, np.ndarray]
    coords: np.ndarray  # (P_real, 4) int32 [0, z, y, x]
    # The decoration of the unpadded pillars, run when first asked for: an engine that
    # decorates in the graph does not need it, and it is the costly part on the host.
    decorate: Callable[[], np.ndarray] = field(repr=False)
    # Non-empty pillars beyond max_pillars, dropped as mmcv does, and what to do about it.
    dropped_pillars: int = 0
    warnings: list[str] = field(default_factory=list)

    @functools.cached_property
    def pillars_pnc(self) -> np.ndarray:
        """(P_real, N, C) decorated, as the original model takes them."""
        return self.decorate()

    @property
    def num_pillars(self) -> int:
        return int(self.coords.shape[0])


def voxel_grid(model_cfg) -> VoxelGrid:
    v = model_cfg.voxelization
    return VoxelGrid(tuple(v.point_cloud_range), tuple(v.voxel_size), v.max_points_per_pillar, v.max_pillars)


def pillar_inputs(points: np.ndarray, model_cfg, layout: str, scale: np.ndarray | None = None,
                  decorate_in_graph: bool = False) -> PillarInputs:
    """``scale``: the per-channel divisor of an engine converted with ``normalise_points``
    (the engine feeds are divided by it; the unpadded reference pillars are not).
    ``decorate_in_graph``: the engine decorates (the decorate_in_graph pass), so the feeds
    are the raw padded voxels, ``num_points`` (max_pillars,) int32 and ``coords``; the
    reference pillars are decorated all the same, for the original model."""
    want = model_cfg.voxelization.point_features
    if points.ndim != 2 or points.shape[1] < want:
        raise InputError(f"points must be (M, >= {want}) for this recipe, got shape {list(points.shape)}")
    grid = voxel_grid(model_cfg)
    try:
        voxels = voxelize(points[:, :want], grid)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    enc = model_cfg.pillar_encoder
    decorated = functools.partial(decorate, voxels, grid, with_cluster_center=enc.with_cluster_center,
                                  with_voxel_center=enc.with_voxel_center, with_distance=enc.with_distance,
                                  legacy=enc.legacy)
    if decorate_in_graph:
        if scale is not None:
            raise ValueError("an engine that decorates in the graph applies its scale there; pass scale=None")
        pillars, coords = pack_pillars(voxels.features, voxels.coords, grid.max_voxels, layout)
        num_points = np.zeros(grid.max_voxels, np.int32)
        num_points[: voxels.num_voxels] = voxels.num_points
        feeds = {"pillars": pillars, "coords": coords, "num_points": num_points}
    else:
        host = decorated()
        decorated = functools.partial(lambda d: d, host)  # computed already
        packed = host if scale is None else host / np.asarray(scale, np.float32)
        pillars, coords = pack_pillars(packed, voxels.coords, grid.max_voxels, layout)
        feeds = {"pillars": pillars, "coords": coords}
    real = np.concatenate([np.zeros((voxels.num_voxels, 1), np.int32), voxels.coords], axis=1)
    return PillarInputs(feeds, real, decorated, voxels.dropped_voxels, _overflow_warnings(voxels, grid.max_voxels))


def _overflow_warnings(voxels, max_pillars: int) -> list[str]:
    if not voxels.dropped_voxels:
        return []
    total = voxels.num_voxels + voxels.dropped_voxels
    return [f"{voxels.dropped_voxels} of {total} non-empty pillars ({voxels.dropped_points} points) did not fit "
            f"max_pillars={max_pillars} and were dropped, the last ones in point order as mmcv does; raise "
            f"[model.voxelization] max_pillars to at least {total} and re-export the engine."]


def sample_scene(model_cfg, seed: int):
    """A deterministic synthetic sweep (with its boxes) inside the recipe's range."""
    v = model_cfg.voxelization
    if v.point_features > 5:
        raise InputError(f"the synthetic scene has 5 point features, the recipe wants {v.point_features}")
    scene = make_scene(seed, point_cloud_range=tuple(v.point_cloud_range))
    # The generator's intensities are 0-1; give them the checkpoint's range (0-255 for nuScenes).
    lo, hi = model_cfg.points.intensity_range
    if (lo, hi) != (0.0, 1.0):
        scene.points[:, 3] = lo + scene.points[:, 3] * np.float32(hi - lo)
    return scene


def sample_points(model_cfg, seed: int) -> np.ndarray:
    """The points of ``sample_scene``, as many features as the recipe takes."""
    return sample_scene(model_cfg, seed).points[:, : model_cfg.voxelization.point_features]


def sample_inputs(model_cfg, seed: int, layout: str, scale: np.ndarray | None = None,
                  decorate_in_graph: bool = False) -> PillarInputs:
    return pillar_inputs(sample_points(model_cfg, seed), model_cfg, layout, scale, decorate_in_graph)
