"""Static "virtual BEV" layout for spatial cross-attention.

BEVFormer's spatial cross-attention gathers, per camera, the BEV queries whose
pillar projects into that image (``bev_mask``), pads them to the longest list,
attends, and scatters back dividing by how many cameras saw each query. The
gather indices depend only on the camera rig, so for a rig fixed at export
time they are constants. This module computes them once:

* ``bev_visibility``: BEVFormer's ``get_reference_points`` + ``point_sampling``
  (eps 1e-5, normalisation by ``img_shape``, open (0, 1) bounds), in numpy;
* ``plan_virtual_bev``: keep at most ``max_cams_per_pillar`` cameras per pillar
  (those that see most of its height anchors), lay each camera's pillars into a
  ``virtual_h x virtual_w`` slot grid, and report coverage; a grid too small
  fails with the sizes that would fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import RigError
from .rig import CameraRig

EPS = 1e-5


def reference_points_3d(bev_h: int, bev_w: int, pc_range, num_points_in_pillar: int) -> np.ndarray:
    """(D, H*W, 3) pillar anchors in metres, query index = row * bev_w + col."""
    z_span = pc_range[5] - pc_range[2]
    zs = np.linspace(0.5, z_span - 0.5, num_points_in_pillar, dtype=np.float32) / np.float32(z_span)
    xs = np.linspace(0.5, bev_w - 0.5, bev_w, dtype=np.float32) / np.float32(bev_w)
    ys = np.linspace(0.5, bev_h - 0.5, bev_h, dtype=np.float32) / np.float32(bev_h)
    z, y, x = np.meshgrid(zs, ys, xs, indexing="ij")
    ref = np.stack([x, y, z], axis=-1).reshape(num_points_in_pillar, bev_h * bev_w, 3)
    lo = np.asarray(pc_range[:3], np.float32)
    return ref * (np.asarray(pc_range[3:], np.float32) - lo) + lo


def bev_visibility(rig: CameraRig, *, bev_h: int, bev_w: int, pc_range, num_points_in_pillar: int,
                   scale: float, img_shape: tuple[int, int],
                   crop: tuple[int, int] = (0, 0)) -> tuple[np.ndarray, np.ndarray]:
    """Return (reference_points_cam (N, Q, D, 2) in [0, 1], bev_mask (N, Q, D)); ``crop`` is
    the (top, left) cut of the resized images."""
    ref = reference_points_3d(bev_h, bev_w, pc_range, num_points_in_pillar)
    homo = np.concatenate([ref, np.ones_like(ref[..., :1])], axis=-1)  # (D, Q, 4)
    lidar2img = rig.lidar2img(scale, crop).astype(np.float32)  # (N, 4, 4)
    cam = np.einsum("nij,dqj->ndqi", lidar2img, homo)  # (N, D, Q, 4)
    depth = cam[..., 2:3]
    mask = depth > EPS
    uv = cam[..., 0:2] / np.maximum(depth, np.float32(EPS))
    uv[..., 0] /= img_shape[1]
    uv[..., 1] /= img_shape[0]
    mask = mask & (uv[..., 1:2] > 0) & (uv[..., 1:2] < 1) & (uv[..., 0:1] < 1) & (uv[..., 0:1] > 0)
    mask = np.nan_to_num(mask)
    return uv.transpose(0, 2, 1, 3), mask[..., 0].transpose(0, 2, 1)


# A camera that sees less of the BEV grid than this is probably mis-calibrated.
LOW_COVERAGE = 0.03


def camera_coverage(rig, bev_mask: np.ndarray) -> dict[str, float]:
    """Fraction of the BEV pillars each camera sees (any height anchor in its image);
    a camera that sees none is an error: nothing it takes in could reach the BEV."""
    seen = np.asarray(bev_mask).any(-1).mean(-1)  # (N,)
    for name, fraction in zip(rig.names, seen):
        if fraction == 0:
            raise RigError(f"camera {name} sees none of the {bev_mask.shape[1]} BEV pillars (rig {rig.name}): it faces "
                           "away from the grid, or its extrinsics are not camera-to-LiDAR in the checkpoint's LiDAR "
                           "frame; build the rig with `deploykit rig --from-nuscenes`, or check its "
                           "sensor2lidar_rotation")
    return {name: float(f) for name, f in zip(rig.names, seen)}


def coverage_warnings(coverage: dict[str, float]) -> list[str]:
    return [f"camera {name} sees only {f:.1%} of the BEV grid: is it facing away from the grid, or are its "
            "extrinsics in another frame than the checkpoint's LiDAR frame?"
            for name, f in coverage.items() if f < LOW_COVERAGE]


@dataclass
class VirtualBEV:
    """Per camera, which BEV query fills each of its ``virtual_h * virtual_w`` slots.

    ``indices[c, s]`` is a query index, or ``num_queries`` (a zero row appended
    to the queries) for an unused slot; ``kept`` is the (N, Q) camera-pillar
    pairs that attend; ``count`` how many kept cameras each query averages over
    (at least 1, as BEVFormer clamps it).
    """

    indices: np.ndarray  # (N, S) int64
    kept: np.ndarray  # (N, Q) bool
    count: np.ndarray  # (Q,) float32
    virtual_h: int
    virtual_w: int
    coverage: dict

    @property
    def slots(self) -> int:
        return self.virtual_h * self.virtual_w


def plan_virtual_bev(rig: CameraRig, bev_mask: np.ndarray, *, max_cams_per_pillar: int, virtual_h: int,
                     virtual_w: int) -> VirtualBEV:
    num_cams, num_queries, _ = bev_mask.shape
    anchors = bev_mask.sum(-1)  # (N, Q) height anchors seen
    seen = anchors > 0
    camera_coverage(rig, bev_mask)  # a camera that sees nothing is a rig error, not a slot-grid one
    kept = _cap_cameras(anchors, max_cams_per_pillar)
    per_cam = kept.sum(1)
    slots = virtual_h * virtual_w
    if per_cam.max() > slots:
        worst = int(per_cam.argmax())
        need = int(per_cam.max())
        h = math.ceil(need / virtual_w)
        side = math.ceil(math.sqrt(need))
        raise RigError(
            f"camera {rig.names[worst]} keeps {need} BEV pillars but the virtual BEV has "
            f"{virtual_h}x{virtual_w}={slots} slots; use virtual_bev_h={h} with virtual_bev_w={virtual_w} "
            f"(or {side}x{side}), or lower max_numcam_overlap"
        )
    indices = np.full((num_cams, slots), num_queries, dtype=np.int64)
    for c in range(num_cams):
        q = np.flatnonzero(kept[c])  # ascending, as BEVFormer's nonzero() gives
        indices[c, : q.size] = q
    count = np.maximum(kept.sum(0), 1).astype(np.float32)
    hits = int(seen.sum())
    coverage = {
        "cameras": rig.names,
        "pillars": num_queries,
        "camera_pillar_hits": hits,
        "hits_kept": int(kept.sum()),
        "hits_kept_fraction": float(kept.sum() / hits),
        "pillars_seen_by_no_camera": int((~seen.any(0)).sum()),
        "pillars_losing_a_camera": int((seen.sum(0) > kept.sum(0)).sum()),
        "max_cameras_per_pillar_before_cap": int(seen.sum(0).max()),
        "slots_per_camera": slots,
        "slots_used": per_cam.tolist(),
        "slot_fill_max": float(per_cam.max() / slots),
    }
    return VirtualBEV(indices, kept, count, virtual_h, virtual_w, coverage)


def _cap_cameras(anchors: np.ndarray, max_cams: int) -> np.ndarray:
    """Keep, per pillar, the ``max_cams`` cameras that see most of its height
    anchors; ties go to the lower camera index, so the plan is deterministic."""
    if max_cams < 1:
        raise RigError(f"max_numcam_overlap must be >= 1, got {max_cams}")
    num_cams = anchors.shape[0]
    # Stable sort on (-anchors) keeps camera order among equals.
    order = np.argsort(-anchors, axis=0, kind="stable")  # (N, Q)
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(num_cams)[:, None].repeat(anchors.shape[1], 1), axis=0)
    return (anchors > 0) & (rank < max_cams)
