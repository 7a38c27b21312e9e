"""Deterministic synthetic LiDAR scenes: a spinning sensor over a ground plane with boxes.

Real datasets cannot ship with the toolkit, yet sample inputs (and a small
detector trained on them) need point clouds with the structure of a real sweep:
range rings on the ground, dense returns on nearby objects, shadows behind
them and sparse far returns. Everything is ray cast in vectorized numpy and
depends only on the seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CLASSES = ("car", "pedestrian", "cyclist")

SENSOR_HEIGHT = 1.8  # metres above the ground; the sensor sits at the origin
GROUND_Z = -SENSOR_HEIGHT
ELEVATION_DEG = (-30.0, 10.0)  # lowest and highest beam
MAX_RANGE = 70.0

# Per class: mean (length, width, height), relative jitter, sampling weight,
# mean intensity. Intensities differ from the ground's so a detector can use them.
_CLASS_DIMS = np.array([[4.5, 1.9, 1.6], [0.7, 0.7, 1.75], [1.8, 0.6, 1.7]])
_DIM_JITTER = 0.1
_CLASS_WEIGHTS = np.array([0.6, 0.25, 0.15])
_CLASS_INTENSITY = np.array([0.6, 0.35, 0.45])
_GROUND_INTENSITY = 0.1
_INTENSITY_STD = 0.05

_SENSOR_CLEARANCE = 1.5  # metres between the sensor and any box
_OBJECT_GAP = 0.3  # metres between the bounding circles of two boxes
_MIN_OBJECT_DISTANCE = 4.0  # nearest box centre, keeps boxes out of the sensor's blind cone
_CANDIDATES_PER_OBJECT = 4


@dataclass
class Scene:
    points: np.ndarray  # (M, 5) float32: x, y, z, intensity, time_lag
    boxes: np.ndarray  # (K, 7) float32: x, y, z_center, length, width, height, yaw
    labels: np.ndarray  # (K,) int64 indices into CLASSES


def make_scene(
    seed: int,
    *,
    point_cloud_range: tuple[float, ...] = (-51.2, -51.2, -5.0, 51.2, 51.2, 3.0),
    num_objects: tuple[int, int] = (8, 20),
    beams: int = 32,
    azimuth_steps: int = 1024,
    noise_std: float = 0.02,
) -> Scene:
    """Ray cast one sweep of a ``beams`` x ``azimuth_steps`` LiDAR at the origin.

    ``num_objects`` is an inclusive (low, high) range for the number of boxes.
    Each ray returns its nearest hit among the ground and the boxes within
    ``MAX_RANGE``, with gaussian range noise; rays without a hit and points
    outside ``point_cloud_range`` (strict bounds, like mmdet3d's range filter)
    are dropped.
    """
    rng = np.random.default_rng(seed)
    boxes, labels = _place_objects(rng, point_cloud_range, num_objects)
    cast = cast_sweep(boxes, labels, rng, beams=beams, azimuth_steps=azimuth_steps, noise_std=noise_std)
    return Scene(points=cast.points[_in_range(cast.points, point_cloud_range)], boxes=boxes, labels=labels)


@dataclass
class CastSweep:
    """One ray-cast sweep, unfiltered: every ray with a return within ``MAX_RANGE``."""

    points: np.ndarray  # (M, 5) float32: x, y, z, intensity 0-1, time_lag (0)
    ring: np.ndarray  # (M,) int64 beam index, 0 = lowest beam
    box_index: np.ndarray  # (M,) int64 index of the box the ray hit, -1 for the ground
    rays_on_box: np.ndarray  # (K,) int64 rays that would reach each box if no other box occluded it


def cast_sweep(
    boxes: np.ndarray,
    labels: np.ndarray,
    rng: np.random.Generator,
    *,
    beams: int = 32,
    azimuth_steps: int = 1024,
    noise_std: float = 0.02,
) -> CastSweep:
    """Ray cast one sweep of a ``beams`` x ``azimuth_steps`` LiDAR at the origin (ground at
    ``GROUND_Z``) over the given boxes (K, 7: x, y, z_center, length, width, height, yaw in
    the sensor frame) with ``labels`` indices into CLASSES.

    ``rng`` draws the spin phase, the range noise and the intensity noise, in that
    order; make_scene passes its own generator, so its scenes depend on this order.
    """
    labels = np.asarray(labels, dtype=np.int64)
    directions = _ray_directions(rng, beams, azimuth_steps)
    ring = np.arange(len(directions), dtype=np.int64) // azimuth_steps

    ground_range = _ground_range(directions)
    box_range, box_index, rays_on_box = _nearest_box_hit(directions, boxes, ground_range)
    hits_box = box_range < ground_range
    ray_range = np.where(hits_box, box_range, ground_range)
    has_return = ray_range < MAX_RANGE

    directions, ray_range = directions[has_return], ray_range[has_return]
    hits_box, box_index, ring = hits_box[has_return], box_index[has_return], ring[has_return]
    ray_range = ray_range + rng.normal(0.0, noise_std, ray_range.shape)
    xyz = directions * ray_range[:, None]

    box_intensity = _CLASS_INTENSITY[labels[box_index]] if len(labels) else _GROUND_INTENSITY
    intensity = np.where(hits_box, box_intensity, _GROUND_INTENSITY)
    intensity = np.clip(intensity + rng.normal(0.0, _INTENSITY_STD, intensity.shape), 0.0, 1.0)
    points = np.column_stack([xyz, intensity, np.zeros_like(intensity)]).astype(np.float32)
    return CastSweep(points=points, ring=ring, box_index=np.where(hits_box, box_index, -1),
                     rays_on_box=rays_on_box)


def _place_objects(
    rng: np.random.Generator, point_cloud_range: tuple[float, ...], num_objects: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Sample boxes on the ground that overlap neither each other nor the sensor."""
    wanted = int(rng.integers(num_objects[0], num_objects[1] + 1))
    count = max(wanted * _CANDIDATES_PER_OBJECT, 1)
    labels = rng.choice(len(CLASSES), size=count, p=_CLASS_WEIGHTS)
    dims = _CLASS_DIMS[labels] * rng.uniform(1 - _DIM_JITTER, 1 + _DIM_JITTER, (count, 3))
    radius = 0.5 * np.hypot(dims[:, 0], dims[:, 1])  # bounding circle in the ground plane

    # Uniform in distance rather than area, so near objects (the well-sampled
    # ones) are as common as far ones, as on a road.
    half_extent = min(abs(v) for v in point_cloud_range[:2] + point_cloud_range[3:5])
    distance = rng.uniform(_MIN_OBJECT_DISTANCE, 0.9 * half_extent, count)
    bearing = rng.uniform(-np.pi, np.pi, count)
    centers = np.column_stack([distance * np.cos(bearing), distance * np.sin(bearing)])
    yaw = rng.uniform(-np.pi, np.pi, count)

    # Keep a candidate only if it clears the sensor and every earlier
    # candidate, accepted or not: stricter than greedy packing but free of loops.
    gaps = np.linalg.norm(centers[:, None] - centers[None], axis=2) - (radius[:, None] + radius[None])
    clashes = np.tril(gaps < _OBJECT_GAP, k=-1).any(axis=1)
    clear_of_sensor = distance - radius > _SENSOR_CLEARANCE
    keep = np.flatnonzero(~clashes & clear_of_sensor)[:wanted]

    z_center = GROUND_Z + dims[keep, 2] / 2
    boxes = np.column_stack([centers[keep], z_center, dims[keep], yaw[keep]]).astype(np.float32)
    return boxes, labels[keep].astype(np.int64)


def _ray_directions(rng: np.random.Generator, beams: int, azimuth_steps: int) -> np.ndarray:
    """Unit vectors (beams * azimuth_steps, 3); the spin starts at a random phase per scene."""
    elevation = np.deg2rad(np.linspace(*ELEVATION_DEG, beams))
    azimuth = rng.uniform(0, 2 * np.pi) + np.linspace(0, 2 * np.pi, azimuth_steps, endpoint=False)
    elevation, azimuth = np.meshgrid(elevation, azimuth, indexing="ij")
    cos_el = np.cos(elevation)
    directions = np.stack([cos_el * np.cos(azimuth), cos_el * np.sin(azimuth), np.sin(elevation)], axis=-1)
    return directions.reshape(-1, 3)


def _ground_range(directions: np.ndarray) -> np.ndarray:
    down = directions[:, 2] < 0
    safe_dz = np.where(down, directions[:, 2], -1.0)
    return np.where(down, GROUND_Z / safe_dz, np.inf)


def _nearest_box_hit(
    directions: np.ndarray, boxes: np.ndarray, ground_range: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Range to the nearest box along each ray from the origin (inf if none), that box's index,
    and per box the rays that reach it before the ground and ``MAX_RANGE`` (ignoring other boxes).

    Slab test in each box's frame: rotating by -yaw makes the box axis-aligned.
    """
    if len(boxes) == 0:
        return np.full(len(directions), np.inf), np.zeros(len(directions), dtype=np.int64), np.zeros(0, np.int64)
    boxes = boxes.astype(np.float64)
    cos_yaw, sin_yaw = np.cos(boxes[:, 6]), np.sin(boxes[:, 6])
    # The sensor sits at the world origin, so in box k's frame it is at -centre_k rotated.
    origin_xy = _rotate_by_minus_yaw(-boxes[:, 0], -boxes[:, 1], cos_yaw, sin_yaw)
    origin_local = np.stack([*origin_xy, -boxes[:, 2]], axis=-1)  # (K, 3)
    dx, dy, dz = (directions[:, i, None] for i in range(3))  # (R, 1) each
    dir_xy = _rotate_by_minus_yaw(dx, dy, cos_yaw, sin_yaw)
    dir_local = np.stack([*dir_xy, np.broadcast_to(dz, dir_xy[0].shape)], axis=-1)  # (R, K, 3)
    # A ray parallel to a slab would divide by zero; a tiny step gives the
    # same answer (the slab is either never or always entered).
    dir_local = np.where(np.abs(dir_local) < 1e-12, 1e-12, dir_local)

    half = boxes[:, 3:6] / 2
    t_low = (-half - origin_local) / dir_local
    t_high = (half - origin_local) / dir_local
    t_enter = np.minimum(t_low, t_high).max(axis=2)
    t_exit = np.maximum(t_low, t_high).min(axis=2)
    hit_range = np.where((t_enter <= t_exit) & (t_enter > 0), t_enter, np.inf)
    nearest = hit_range.argmin(axis=1)
    reachable = (hit_range < ground_range[:, None]) & (hit_range < MAX_RANGE)
    return hit_range[np.arange(len(directions)), nearest], nearest, reachable.sum(axis=0).astype(np.int64)


def _rotate_by_minus_yaw(
    x: np.ndarray, y: np.ndarray, cos_yaw: np.ndarray, sin_yaw: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    return cos_yaw * x + sin_yaw * y, cos_yaw * y - sin_yaw * x


def _in_range(points: np.ndarray, point_cloud_range: tuple[float, ...]) -> np.ndarray:
    lo = np.asarray(point_cloud_range[:3], dtype=np.float32)
    hi = np.asarray(point_cloud_range[3:], dtype=np.float32)
    return ((points[:, :3] > lo) & (points[:, :3] < hi)).all(axis=1)
