"""The sensor data of one time step, as the readers hand it to preprocessing.

Poses are 4x4 rigid transforms in float64 (global positions are kilometres
from the map origin; float32 would lose centimetres). Quaternions are
(w, x, y, z), as nuScenes and pyquaternion write them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


def quaternion_to_rotation(q) -> np.ndarray:
    """(3, 3) rotation of a (w, x, y, z) quaternion; normalised first, as pyquaternion does."""
    w, x, y, z = np.asarray(q, dtype=np.float64) / np.linalg.norm(q)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def rotation_to_quaternion(r: np.ndarray) -> np.ndarray:
    """(w, x, y, z) of a proper rotation matrix, w >= 0."""
    r = np.asarray(r, dtype=np.float64)
    trace = np.trace(r)
    if trace > 0:
        s = 2.0 * np.sqrt(trace + 1.0)
        q = [0.25 * s, (r[2, 1] - r[1, 2]) / s, (r[0, 2] - r[2, 0]) / s, (r[1, 0] - r[0, 1]) / s]
    elif r[0, 0] > r[1, 1] and r[0, 0] > r[2, 2]:
        s = 2.0 * np.sqrt(1.0 + r[0, 0] - r[1, 1] - r[2, 2])
        q = [(r[2, 1] - r[1, 2]) / s, 0.25 * s, (r[0, 1] + r[1, 0]) / s, (r[0, 2] + r[2, 0]) / s]
    elif r[1, 1] > r[2, 2]:
        s = 2.0 * np.sqrt(1.0 + r[1, 1] - r[0, 0] - r[2, 2])
        q = [(r[0, 2] - r[2, 0]) / s, (r[0, 1] + r[1, 0]) / s, 0.25 * s, (r[1, 2] + r[2, 1]) / s]
    else:
        s = 2.0 * np.sqrt(1.0 + r[2, 2] - r[0, 0] - r[1, 1])
        q = [(r[1, 0] - r[0, 1]) / s, (r[0, 2] + r[2, 0]) / s, (r[1, 2] + r[2, 1]) / s, 0.25 * s]
    q = np.asarray(q)
    return q if q[0] >= 0 else -q


def yaw_quaternion(yaw: float) -> np.ndarray:
    """(w, x, y, z) of a rotation by ``yaw`` radians about +z."""
    return np.array([np.cos(yaw / 2), 0.0, 0.0, np.sin(yaw / 2)])


def quaternion_yaw(q) -> float:
    """Yaw of a quaternion as nuscenes-devkit's ``quaternion_yaw``: the x axis rotated
    by ``q``, its angle in the xy plane."""
    v = quaternion_to_rotation(q) @ np.array([1.0, 0.0, 0.0])
    return float(np.arctan2(v[1], v[0]))


def pose_matrix(translation, rotation) -> np.ndarray:
    """4x4 transform from a translation (3,) and a (w, x, y, z) quaternion or (3, 3) matrix."""
    rot = np.asarray(rotation, dtype=np.float64)
    m = np.eye(4)
    m[:3, :3] = quaternion_to_rotation(rot) if rot.shape == (4,) else rot
    m[:3, 3] = np.asarray(translation, dtype=np.float64)
    return m


def invert_pose(m: np.ndarray) -> np.ndarray:
    out = np.eye(4)
    out[:3, :3] = m[:3, :3].T
    out[:3, 3] = -m[:3, :3].T @ m[:3, 3]
    return out


def transform_points(m: np.ndarray, xyz: np.ndarray) -> np.ndarray:
    """(N, 3) points through a 4x4 transform, in float64."""
    xyz = np.asarray(xyz, dtype=np.float64)
    return xyz @ m[:3, :3].T + m[:3, 3]


@dataclass(frozen=True)
class Sweep:
    """One LiDAR sweep file and where the sensor was when it was taken."""

    path: Path
    timestamp_us: int
    sensor2ego: np.ndarray  # (4, 4)
    ego2global: np.ndarray  # (4, 4)
    # The file's column layout, for read_points: "nuscenes" (x, y, z, intensity 0-255,
    # ring), "kitti" (x, y, z, reflectance 0-1), or None to infer it from the name.
    layout: str | None = None

    @property
    def sensor2global(self) -> np.ndarray:
        return self.ego2global @ self.sensor2ego


@dataclass(frozen=True)
class CameraView:
    """One camera image of a frame, with its calibration."""

    name: str  # CAM_FRONT, ...
    path: Path
    intrinsic: np.ndarray  # (3, 3)
    sensor2ego: np.ndarray  # (4, 4)
    ego2global: np.ndarray  # (4, 4), the ego pose at this image's timestamp
    timestamp_us: int
    image_size: tuple[int, int] | None = None  # (H, W) where the dataset states it


@dataclass(frozen=True)
class Annotation:
    """A ground-truth box as nuscenes-devkit's ``load_gt`` makes it: global frame,
    size (w, l, h), rotation (w, x, y, z), global velocity (vx, vy) or NaN."""

    token: str
    translation: np.ndarray  # (3,)
    size: np.ndarray  # (3,) w, l, h
    rotation: np.ndarray  # (4,)
    velocity: np.ndarray  # (2,)
    detection_name: str  # nuScenes detection class ("car", "pedestrian", ...)
    attribute_name: str  # "" when the box has none
    num_pts: int  # num_lidar_pts + num_radar_pts


@dataclass
class SensorFrame:
    """Everything one time step of a drive brings; any sensor may be absent."""

    scene: str
    index: int  # position within the scene: 0, 1, 2, ...
    token: str  # nuScenes sample token, or the file stem
    timestamp_us: int
    lidar: Sweep | None = None
    sweeps: list[Sweep] = field(default_factory=list)  # earlier sweeps, newest first
    cameras: list[CameraView] = field(default_factory=list)
    # The ego pose and LiDAR extrinsics of the frame (the LiDAR's when there is one).
    ego2global: np.ndarray = field(default_factory=lambda: np.eye(4))
    lidar2ego: np.ndarray = field(default_factory=lambda: np.eye(4))
    can_bus: np.ndarray | None = None  # (18,) as BEVFormer's nuScenes converter builds it
    annotations: list[Annotation] | None = None  # None: no ground truth
    # static_object.bicycle_rack boxes: the devkit drops bicycles and motorcycles inside them.
    bike_racks: list[Annotation] = field(default_factory=list)
