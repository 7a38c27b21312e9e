"""A deploykit camera rig (calib/rigs/*.json format) from a nuScenes-layout scene.

The cameras are taken relative to the scene's first LIDAR_TOP keyframe, through
each sensor's own ego pose, exactly as BEVFormer's converter builds
``sensor2lidar_rotation`` / ``sensor2lidar_translation`` (``obtain_sensor2top``).
The LiDAR frame stays nuScenes LIDAR_TOP (x right, y forward, z up), the frame the
released CenterPoint and BEVFormer checkpoints were trained in; cameras come in
BEVFormer's converter order (CAM_FRONT, CAM_FRONT_RIGHT, CAM_FRONT_LEFT, CAM_BACK,
CAM_BACK_LEFT, CAM_BACK_RIGHT), the order of BEVFormer's per-camera embeddings.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..artifacts import atomic_file
from ..errors import InputError
from .nuscenes import LIDAR_CHANNEL, NuScenesLayout, sensor2lidar


def rig_from_nuscenes(dataroot: str | Path | NuScenesLayout, scene: str, *, name: str | None = None,
                      version: str | None = None) -> dict:
    """The rig dict (name, description, image_size [H, W], cameras) of ``scene``'s first sample."""
    layout = dataroot if isinstance(dataroot, NuScenesLayout) else NuScenesLayout(dataroot, version)
    record = layout.scene(scene)  # InputError listing the scenes when unknown
    token = layout.sample_tokens(record["name"])[0]
    frame = layout.frame(token, sweeps=0, annotations=False)
    if frame.lidar is None:
        raise InputError(f"scene {record['name']}: its first sample {token} has no {LIDAR_CHANNEL} keyframe to "
                         "take the camera extrinsics relative to")
    if not frame.cameras:
        raise InputError(f"scene {record['name']}: its first sample {token} has no CAM_* keyframes")
    sizes = {cam.name: cam.image_size for cam in frame.cameras}
    if None in sizes.values() or len(set(sizes.values())) != 1:
        raise InputError(f"scene {record['name']}: a rig needs one image size for all cameras, the sample_data "
                         f"give (H, W) {sizes}")
    cameras = []
    for cam in frame.cameras:
        rotation, translation = sensor2lidar(cam, frame)
        cameras.append({"name": cam.name, "cam_intrinsic": cam.intrinsic.tolist(),
                        "sensor2lidar_rotation": rotation.tolist(),
                        "sensor2lidar_translation": translation.tolist()})
    height, width = frame.cameras[0].image_size
    return {
        "name": name or f"nuscenes_{record['name'].replace('-', '_')}",
        "description": (f"Cameras of nuScenes scene {record['name']} ({layout.version}), relative to its first "
                        f"LIDAR_TOP keyframe (sample {token}) through each sensor's ego pose, as BEVFormer's "
                        "converter computes them. LiDAR frame: nuScenes LIDAR_TOP, x right, y forward, z up."),
        "image_size": [int(height), int(width)],
        "cameras": cameras,
        # For models that predict in the ego frame (BEVDepth): the LiDAR's mounting.
        "lidar2ego_rotation": frame.lidar.sensor2ego[:3, :3].tolist(),
        "lidar2ego_translation": frame.lidar.sensor2ego[:3, 3].tolist(),
    }


def write_rig(path: str | Path, rig: dict) -> Path:
    """Write a rig dict as a rig JSON file, atomically."""
    path = Path(path)
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(rig, indent=1) + "\n")
    return path
