"""A user's data as a sequence of frames, and the engine inputs a recipe makes of each.

``open_source(path, recipe)`` accepts:

* a nuScenes-layout dataset directory (``v1.0-*/`` tables, ``samples/``, ``sweeps/``):
  scenes in order with their sweeps, six cameras, ego poses and, where the split has
  them, annotations;
* one point-cloud file (``.bin``, ``.pcd.bin``, ``.npy``, ``.pcd``), or a directory of
  them: one frame per file in name order, one scene (the directory), no poses;
* a directory of camera frames: one sub-directory per frame, in name order, holding
  one image per rig camera named after it (``CAM_FRONT.jpg``, ...) and optionally
  ``ego_pose.json`` (``{"translation": [x, y, z], "rotation": [w, x, y, z]}``, the
  ego-to-global pose BEVFormer's CAN bus is built from).

``lidar_feeds`` and ``camera_frame`` turn a frame into what the engine takes, with
the recipe's input contract enforced (deploykit.data.contract).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from .frames import CameraView, SensorFrame, Sweep, pose_matrix

POINT_SUFFIXES = (".bin", ".npy", ".pcd")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass
class Source:
    path: Path
    kind: str  # "nuscenes", "points" or "cameras"
    frames: list[SensorFrame]

    @property
    def has_ground_truth(self) -> bool:
        return bool(self.frames) and all(f.annotations is not None for f in self.frames)

    @property
    def has_poses(self) -> bool:
        return self.kind == "nuscenes"

    def scenes(self) -> list[str]:
        return list(dict.fromkeys(f.scene for f in self.frames))

    def describe(self) -> dict:
        return {"path": str(self.path), "kind": self.kind, "frames": len(self.frames), "scenes": len(self.scenes()),
                "ground_truth": self.has_ground_truth}


def is_nuscenes(path: Path) -> bool:
    return path.is_dir() and any(p.is_dir() and p.name.startswith("v1.0-") for p in path.iterdir())


def open_source(path: str | Path, recipe, *, scenes: list[str] | None = None) -> Source:
    """The frames at ``path`` that ``recipe``'s model can take; ``scenes`` picks nuScenes scenes."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path} does not exist; give a point-cloud file, a directory of them, a directory of "
                         "camera frames or a nuScenes-layout dataset")
    from ..models import camera_config, lidar_config

    camera, lidar = camera_config(recipe.model) is not None, lidar_config(recipe.model)
    if is_nuscenes(path):
        return _nuscenes(path, lidar, scenes, camera)
    if scenes:
        raise InputError(f"--scene picks scenes of a nuScenes-layout dataset; {path} is not one (no v1.0-* tables)")
    if camera:
        return Source(path, "cameras", _camera_frames(path, with_points=lidar is not None))
    return Source(path, "points", _point_frames(path))


def _nuscenes(path: Path, lidar, scenes: list[str] | None, camera: bool) -> Source:
    from .nuscenes import NuScenesLayout

    layout = NuScenesLayout(path)
    names = layout.scene_names()
    for s in scenes or []:
        if s not in names:
            raise InputError(f"scene {s} is not in {path} (it has {', '.join(names)})")
    sweeps = 0 if lidar is None else lidar.points.sweeps - 1
    frames = [f for name in (scenes or names) for f in layout.frames(name, sweeps=sweeps, cameras=camera)]
    if not frames:
        raise InputError(f"{path} holds no samples")
    return Source(path, "nuscenes", frames)


def _point_frames(path: Path) -> list[SensorFrame]:
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file() and _is_points(p))
    if not files:
        raise InputError(f"{path} holds no point-cloud files ({', '.join(POINT_SUFFIXES)})")
    scene = path.stem if path.is_file() else path.name
    eye = np.eye(4)
    return [SensorFrame(scene, i, _stem(f), 0, lidar=Sweep(f, 0, eye, eye)) for i, f in enumerate(files)]


def _is_points(p: Path) -> bool:
    return p.suffix.lower() in POINT_SUFFIXES


def _stem(p: Path) -> str:
    return p.name.removesuffix(".bin").removesuffix(".pcd").removesuffix(".npy")


def _camera_frames(path: Path, with_points: bool = False) -> list[SensorFrame]:
    """Frame sub-directories of camera images; ``with_points`` (a fused model): each also
    holds its LiDAR sweep as one point-cloud file."""
    if not path.is_dir():
        raise InputError(f"{path} is a file; a camera model takes a directory of frames (one sub-directory per "
                         "frame with one image per camera, CAM_FRONT.jpg ...) or a nuScenes-layout dataset")
    dirs = sorted(d for d in path.iterdir() if d.is_dir())
    if not dirs:
        raise InputError(f"{path} has no frame sub-directories; put each frame's camera images (named after the rig's "
                         "cameras, e.g. CAM_FRONT.jpg) in a sub-directory of its own")
    frames = []
    for i, d in enumerate(dirs):
        images = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise InputError(f"frame {d} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        ego = _ego_pose(d / "ego_pose.json")
        cams = [CameraView(p.stem, p, np.eye(3), np.eye(4), ego, 0) for p in images]
        lidar = None
        if with_points:
            clouds = sorted(p for p in d.iterdir() if p.is_file() and _is_points(p))
            if len(clouds) != 1:
                raise InputError(f"frame {d} holds {len(clouds)} point-cloud files; a camera + LiDAR model needs "
                                 f"exactly one per frame ({', '.join(POINT_SUFFIXES)}) beside the images")
            lidar = Sweep(clouds[0], 0, np.eye(4), ego)
        frames.append(SensorFrame(path.name, i, d.name, 0, cameras=cams, ego2global=ego, lidar=lidar))
    return frames


def _ego_pose(path: Path) -> np.ndarray:
    if not path.is_file():
        return np.eye(4)
    try:
        data = json.loads(path.read_text())
        return pose_matrix(data["translation"], data["rotation"])
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{path}: expected {{\"translation\": [x, y, z], \"rotation\": [w, x, y, z]}} "
                         f"({type(exc).__name__}: {exc})") from None


def lidar_feeds(frame: SensorFrame, cfg, pillars) -> tuple[dict[str, np.ndarray], np.ndarray, list[str]]:
    """(engine feeds, the conformed points, warnings) of one frame for a pillar model
    (``pillars``: the engine's PillarFormat, deploykit.models.pillar_format)."""
    from ..preprocess.pillar_inputs import pillar_inputs
    from .sweeps import aggregate_sweeps

    points, warnings = aggregate_sweeps(frame, cfg)
    inputs = pillar_inputs(points, cfg, *pillars)
    return inputs.feeds, points, warnings + inputs.warnings


def camera_frame(frame: SensorFrame, cfg, rig):
    """The temporal runner's Frame (normalised images in the rig's camera order, the raw
    CAN bus) of one frame for a BEVFormer model."""
    from ..temporal.runner import Frame
    from .can_bus import can_bus_from_pose
    from .frames import rotation_to_quaternion
    from .images import camera_input

    by_name = {c.name: c for c in frame.cameras}
    missing = [n for n in rig.names if n not in by_name]
    if missing:
        raise InputError(f"frame {frame.token} of scene {frame.scene} has no image for {', '.join(missing)} "
                         f"(it has {', '.join(by_name) or 'none'}); the rig {rig.name} needs {', '.join(rig.names)}")
    img = camera_input([by_name[n].path for n in rig.names], cfg, rig)
    can_bus = frame.can_bus
    if can_bus is None:
        ego = frame.ego2global
        can_bus = can_bus_from_pose(ego[:3, 3], rotation_to_quaternion(ego[:3, :3]))
    return Frame(img, np.asarray(can_bus, np.float64), frame.scene, frame.index)


def runner_frame(frame: SensorFrame, cfg, rig, pillars=None):
    """(the temporal runner's Frame, LiDAR points or None, warnings) of one frame for a
    camera model: for a fused one (camera + LiDAR) the Frame also carries the sweep's pillars,
    packed in ``pillars`` (the engine's PillarFormat; default mmdet3d's)."""
    from ..models import camera_config, lidar_config
    from ..models.bevdepth import BEVDepthConfig
    from ..preprocess.pillar_inputs import PillarFormat

    if isinstance(cfg, BEVDepthConfig):
        from .lss_images import ida_warnings, key_frame

        return key_frame(frame, cfg, rig), None, ida_warnings(cfg, rig.image_size)
    f = camera_frame(frame, camera_config(cfg), rig)
    lidar = lidar_config(cfg)
    if lidar is None:
        return f, None, []
    feeds, points, warnings = lidar_feeds(frame, lidar, pillars or PillarFormat())
    f.sensors = feeds
    return f, points, warnings


def camera_warnings(source: Source) -> list[str]:
    """What a camera source lacks that the model uses: ego motion."""
    if source.kind == "cameras" and all(np.array_equal(f.ego2global, np.eye(4)) for f in source.frames):
        return [f"{source.path}: no ego_pose.json in the frames, so the ego stands still between frames: the "
                "previous BEV is carried unmoved; give each frame its ego pose for BEVFormer's temporal alignment"]
    return []
