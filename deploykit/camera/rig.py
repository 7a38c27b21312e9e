"""Camera rigs: intrinsics and camera-to-LiDAR extrinsics, fixed at export time.

A rig file (calib/rigs/*.json) uses the field names of the nuScenes info files
BEVFormer reads (``cam_intrinsic``, ``sensor2lidar_rotation``,
``sensor2lidar_translation``), so a user can paste values from their own infos.
Camera frames are OpenCV's (x right, y down, z forward).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import RigError
from ..recipe import REPO_ROOT

RIGS_DIR = REPO_ROOT / "calib" / "rigs"


@dataclass(frozen=True)
class Camera:
    name: str
    intrinsic: np.ndarray  # (3, 3)
    sensor2lidar_rotation: np.ndarray  # (3, 3), columns are the camera axes in the LiDAR frame
    sensor2lidar_translation: np.ndarray  # (3,)

    def lidar2img(self, scale: float = 1.0, crop: tuple[int, int] = (0, 0)) -> np.ndarray:
        """BEVFormer's lidar2img (nuScenes converter), then its image-resize scaling and a
        crop of ``crop`` = (top, left) pixels of the resized image."""
        lidar2cam_r = np.linalg.inv(self.sensor2lidar_rotation)
        lidar2cam_t = self.sensor2lidar_translation @ lidar2cam_r.T
        lidar2cam_rt = np.eye(4)
        lidar2cam_rt[:3, :3] = lidar2cam_r.T
        lidar2cam_rt[3, :3] = -lidar2cam_t
        viewpad = np.eye(4)
        viewpad[:3, :3] = self.intrinsic
        shift = np.eye(4)
        shift[:2, 2] = [-crop[1], -crop[0]]  # u, v are divided by depth (row 2) afterwards
        return shift @ np.diag([scale, scale, 1.0, 1.0]) @ viewpad @ lidar2cam_rt.T


@dataclass(frozen=True)
class CameraRig:
    name: str
    image_size: tuple[int, int]  # (H, W) of the raw camera images
    cameras: tuple[Camera, ...]
    # (4, 4) LiDAR frame -> ego frame (nuScenes' LIDAR_TOP calibrated_sensor), or None when
    # the rig does not say: models that predict in the ego frame (BEVDepth) need it.
    lidar2ego: np.ndarray | None = None

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.cameras]

    def lidar2img(self, scale: float = 1.0, crop: tuple[int, int] = (0, 0)) -> np.ndarray:
        return np.stack([c.lidar2img(scale, crop) for c in self.cameras])


def rig_path(name_or_path: str | Path) -> Path:
    """A rig file: a path, or the name of a bundled rig in calib/rigs/."""
    path = Path(name_or_path)
    if not path.is_file():
        path = RIGS_DIR / f"{Path(name_or_path).stem}.json"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in RIGS_DIR.glob("*.json")))
        raise RigError(f"camera rig '{name_or_path}' not found; bundled rigs: {known} (or pass a rig file, e.g. "
                       "from `deploykit rig --from-nuscenes`)")
    return path


def load_rig(name_or_path: str | Path) -> CameraRig:
    path = rig_path(name_or_path)
    try:
        data = json.loads(path.read_text())
        cameras = tuple(_camera(c, path) for c in data["cameras"])
        rig = CameraRig(str(data["name"]), tuple(int(v) for v in data["image_size"]), cameras, _lidar2ego(data, path))
    except (KeyError, TypeError, ValueError) as exc:
        raise RigError(f"{path}: malformed rig ({type(exc).__name__}: {exc}); see calib/rigs/README.md") from None
    if len(set(rig.names)) != len(rig.names):
        raise RigError(f"{path}: camera names repeat: {rig.names}")
    return rig


def _lidar2ego(data: dict, path: Path) -> np.ndarray | None:
    if "lidar2ego_rotation" not in data and "lidar2ego_translation" not in data:
        return None
    r = np.asarray(data["lidar2ego_rotation"], dtype=np.float64)
    t = np.asarray(data["lidar2ego_translation"], dtype=np.float64)
    if r.shape != (3, 3) or t.shape != (3,):
        raise RigError(f"{path}: lidar2ego_rotation must be a 3x3 matrix and lidar2ego_translation a 3-vector")
    _check_rotation(r, path, "lidar2ego_rotation")
    out = np.eye(4)
    out[:3, :3], out[:3, 3] = r, t
    return out


def _check_rotation(r: np.ndarray, path: Path, what: str) -> None:
    # The extrinsics are inverted to project: they must be a proper rotation.
    if not np.isfinite(r).all() or abs(np.linalg.det(r) - 1.0) > 1e-3 or not np.allclose(r @ r.T, np.eye(3), atol=1e-3):
        raise RigError(f"{path}: {what} is not a rotation (det {np.linalg.det(r):.4f}); extrinsics must be "
                       "orthonormal with determinant 1")


def _camera(data: dict, path: Path) -> Camera:
    name = str(data["name"])
    k = np.asarray(data["cam_intrinsic"], dtype=np.float64)
    r = np.asarray(data["sensor2lidar_rotation"], dtype=np.float64)
    t = np.asarray(data["sensor2lidar_translation"], dtype=np.float64)
    if k.shape != (3, 3) or r.shape != (3, 3) or t.shape != (3,):
        raise RigError(f"{path}: camera {name} needs a 3x3 cam_intrinsic, 3x3 rotation and 3-vector translation")
    if not (np.isfinite(k).all() and np.isfinite(r).all() and np.isfinite(t).all()):
        raise RigError(f"{path}: camera {name} has non-finite calibration values")
    if k[0, 0] <= 0 or k[1, 1] <= 0 or k[2, 2] != 1 or k[2, 0] != 0 or k[2, 1] != 0:
        raise RigError(f"{path}: camera {name} cam_intrinsic must be [[fx,0,cx],[0,fy,cy],[0,0,1]] with fx, fy > 0")
    _check_rotation(r, path, f"camera {name} sensor2lidar_rotation")
    return Camera(name, k, r, t)


def camera_looking(name: str, yaw_deg: float, position: tuple[float, float, float], fx: float, cx: float,
                   cy: float, pitch_deg: float = 0.0) -> dict:
    """Rig-file entry for a camera whose optical axis has the given yaw (0 = +x,
    counter-clockwise) and downward pitch, in a LiDAR frame with z up."""
    yaw, pitch = np.radians(yaw_deg), np.radians(pitch_deg)
    forward = np.array([np.cos(yaw) * np.cos(pitch), np.sin(yaw) * np.cos(pitch), -np.sin(pitch)])
    right = np.array([np.sin(yaw), -np.cos(yaw), 0.0])
    down = np.cross(forward, right)
    rotation = np.stack([right, down, forward], axis=1)
    return {"name": name, "cam_intrinsic": [[fx, 0, cx], [0, fx, cy], [0, 0, 1]],
            "sensor2lidar_rotation": rotation.round(9).tolist(), "sensor2lidar_translation": list(position)}
