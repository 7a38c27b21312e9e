"""Decoded boxes -> nuScenes detection submission boxes and the official results JSON.

Reproduces mmdet3d's NuScenesDataset._format_bbox (mmdet3d 1.x: NuScenesMetric._format_lidar_bbox; the
same in 0.17 / 1.0rc for LiDAR boxes), per box:

* ``output_to_nusc_box``: a nuScenes Box at the gravity centre, size (w, l, h) (the LiDAR box's
  (l, w, h) reordered), orientation ``Quaternion(axis=[0, 0, 1], radians=yaw)``, velocity (vx, vy, 0);
* ``lidar_nusc_box_to_global``: rotate (centre, orientation as ``q_lidar2ego * q``, velocity) and
  translate into the ego frame; drop the box if its ego xy distance is ``> class_range[class]`` (so one on
  the range is kept: the devkit's own filter then drops it); rotate and translate into the global frame.
  The rotations are the quaternions of the given 4x4 matrices as mmdet3d 1.x takes them
  (``pyquaternion.Quaternion(matrix=...)``'s sign convention), so the quaternion written is mmdet3d's;
* the attribute from the global velocity: speed ``> 0.2`` m/s gives vehicle.moving (car, truck, bus,
  trailer, construction_vehicle), cycle.with_rider (bicycle, motorcycle), else mmdet3d's DefaultAttribute;
  slower gives pedestrian.standing, vehicle.stopped for a bus, else DefaultAttribute (vehicle.parked,
  cycle.without_rider, pedestrian.moving, '' for barrier and traffic cone).

Boxes are in deploykit's convention (``deploykit.detection.decode``): LiDAR frame, dims (l, w, h), 1.x yaw.
``annotations_to_boxes`` goes the other way, for ground truth in the LiDAR frame (e.g. a BEV picture).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np

from ..artifacts import atomic_file
from ..data.frames import invert_pose
from .decode import Boxes
from .nuscenes_eval import ATTRIBUTE_NAMES, DETECTION_NAMES
from .nuscenes_map import CLASS_RANGE

# mmdet3d NuScenesDataset.DefaultAttribute
DEFAULT_ATTRIBUTE = {
    "car": "vehicle.parked", "pedestrian": "pedestrian.moving", "trailer": "vehicle.parked",
    "truck": "vehicle.parked", "bus": "vehicle.moving", "motorcycle": "cycle.without_rider",
    "construction_vehicle": "vehicle.parked", "bicycle": "cycle.without_rider", "barrier": "", "traffic_cone": "",
}
_VEHICLES = ("car", "construction_vehicle", "bus", "truck", "trailer")
META_KEYS = ("use_camera", "use_lidar", "use_radar", "use_map", "use_external")
SUBMISSION_FIELDS = ("sample_token", "translation", "size", "rotation", "velocity", "detection_name",
                     "detection_score", "attribute_name")


def default_attribute(name: str, velocity) -> str:
    """mmdet3d's attribute of a box of class ``name`` from its (global) velocity (vx, vy, ...)."""
    if name not in DEFAULT_ATTRIBUTE:
        raise ValueError(f"{name!r} is not a nuScenes detection class")
    if np.sqrt(velocity[0] ** 2 + velocity[1] ** 2) > 0.2:
        if name in _VEHICLES:
            return "vehicle.moving"
        if name in ("bicycle", "motorcycle"):
            return "cycle.with_rider"
        return DEFAULT_ATTRIBUTE[name]
    if name == "pedestrian":
        return "pedestrian.standing"
    if name == "bus":
        return "vehicle.stopped"
    return DEFAULT_ATTRIBUTE[name]


def nuscenes_class_names(model_cfg) -> list[str]:
    """Label k -> nuScenes detection name for a model config: CenterPoint's task classes through
    ``head.nuscenes_names`` (cyclist -> bicycle), BEVFormer's ``class_names``; a fused model's
    detection head's."""
    model_cfg = getattr(model_cfg, "detection", model_cfg)
    head = getattr(model_cfg, "head", None)
    if head is not None and hasattr(head, "tasks"):
        mapping = dict(getattr(head, "nuscenes_names", {}) or {})
        return [mapping.get(n, n) for task in head.tasks for n in task.class_names]
    return list(model_cfg.class_names)


def evaluation_classes(model_cfg) -> list[str]:
    """The nuScenes detection classes the model predicts, in its label order."""
    from ..data.nuscenes import DETECTION_NAME

    known = set(DETECTION_NAME.values())
    return list(dict.fromkeys(n for n in nuscenes_class_names(model_cfg) if n in known))


def matrix_quaternion(m: np.ndarray) -> np.ndarray:
    """(w, x, y, z) of the rotation of a 3x3 or 4x4 matrix with ``pyquaternion.Quaternion(matrix=...)``'s
    choice of sign (its trace method: the component it solves for from the diagonal is positive)."""
    r = np.asarray(m, np.float64)[:3, :3]
    if not np.allclose(r @ r.T, np.eye(3), rtol=1e-5, atol=1e-7) or not np.isclose(np.linalg.det(r), 1.0,
                                                                                     rtol=1e-5, atol=1e-7):
        raise ValueError("not a rotation matrix (pyquaternion checks orthogonality at rtol 1e-5, atol 1e-7)")
    a = r.T  # pyquaternion works on the transpose
    if a[2, 2] < 0:
        if a[0, 0] > a[1, 1]:
            t = 1 + a[0, 0] - a[1, 1] - a[2, 2]
            q = [a[1, 2] - a[2, 1], t, a[0, 1] + a[1, 0], a[2, 0] + a[0, 2]]
        else:
            t = 1 - a[0, 0] + a[1, 1] - a[2, 2]
            q = [a[2, 0] - a[0, 2], a[0, 1] + a[1, 0], t, a[1, 2] + a[2, 1]]
    elif a[0, 0] < -a[1, 1]:
        t = 1 - a[0, 0] - a[1, 1] + a[2, 2]
        q = [a[0, 1] - a[1, 0], a[2, 0] + a[0, 2], a[1, 2] + a[2, 1], t]
    else:
        t = 1 + a[0, 0] + a[1, 1] + a[2, 2]
        q = [t, a[1, 2] - a[2, 1], a[2, 0] - a[0, 2], a[0, 1] - a[1, 0]]
    return np.asarray(q, np.float64) * (0.5 / math.sqrt(t))


def _quat_rotation(q: np.ndarray) -> np.ndarray:
    w, x, y, z = np.asarray(q, np.float64) / np.linalg.norm(q)
    return np.array([[w * w + x * x - y * y - z * z, 2 * (x * y - w * z), 2 * (x * z + w * y)],
                     [2 * (x * y + w * z), w * w - x * x + y * y - z * z, 2 * (y * z - w * x)],
                     [2 * (x * z - w * y), 2 * (y * z + w * x), w * w - x * x - y * y + z * z]])


def _quat_mul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamilton products a * b of (4,) and (n, 4) quaternions (pyquaternion's ``a * b``)."""
    w, x, y, z = a
    left = np.array([[w, -x, -y, -z], [x, w, -z, y], [y, z, w, -x], [z, -y, x, w]])
    return b @ left.T


def boxes_to_nuscenes(boxes: Boxes, class_names: Sequence[str], sample_token: str, lidar2ego: np.ndarray,
                      ego2global: np.ndarray, *, class_range: Mapping[str, float] | None = None) -> list[dict]:
    """nuScenes submission boxes (global frame) of one sample's ``boxes`` (LiDAR frame), as mmdet3d writes them.

    ``class_names[label]`` is the nuScenes detection name of a label (``nuscenes_class_names``);
    ``lidar2ego`` and ``ego2global`` are the sample's 4x4 poses (``SensorFrame``); ``class_range`` the
    ego-frame range per class (default detection_cvpr_2019's). Boxes without velocity get (0, 0), as
    mmdet3d's with_velocity=False.
    """
    class_range = CLASS_RANGE if class_range is None else class_range
    names = list(class_names)
    n = len(boxes)
    labels = np.asarray(boxes.labels).astype(np.int64).reshape(n)
    if n and (labels.min() < 0 or labels.max() >= len(names)):
        raise ValueError(f"labels {sorted(set(labels[(labels < 0) | (labels >= len(names))].tolist()))} do not "
                         f"index class_names ({len(names)} names)")
    used = sorted({names[k] for k in labels.tolist()})
    bad = [c for c in used if c not in DETECTION_NAMES]
    if bad:
        raise ValueError(f"classes {bad} are not nuScenes detection classes: map them (HeadConfig.nuscenes_names)")
    no_range = [c for c in used if c not in class_range]
    if no_range:
        raise ValueError(f"class_range has no entry for {no_range}")

    centers = np.asarray(boxes.centers, np.float64).reshape(n, 3)
    dims = np.asarray(boxes.dims, np.float64).reshape(n, 3)
    yaw = np.asarray(boxes.yaw, np.float64).reshape(n)
    scores = np.asarray(boxes.scores, np.float64).reshape(n)
    vel = np.zeros((n, 3))
    if boxes.velocity is not None:
        vel[:, :2] = np.asarray(boxes.velocity, np.float64).reshape(n, 2)
    # output_to_nusc_box: size w, l, h and Quaternion(axis=[0, 0, 1], radians=yaw).
    size = dims[:, [1, 0, 2]]
    quat = np.zeros((n, 4))
    quat[:, 0], quat[:, 3] = np.cos(yaw / 2.0), np.sin(yaw / 2.0)

    out = []
    for pose, frame in ((lidar2ego, "ego"), (ego2global, "global")):
        pose = np.asarray(pose, np.float64)
        if pose.shape != (4, 4):
            raise ValueError(f"poses must be 4x4, got {pose.shape}")
        q = matrix_quaternion(pose)
        rot = _quat_rotation(q)
        # NuScenesBox.rotate: centre and velocity by the rotation matrix, orientation q * orientation.
        centers = centers @ rot.T + pose[:3, 3]
        vel = vel @ rot.T
        quat = _quat_mul(q, quat)
        if frame == "ego":
            d = centers[:, :2]
            radius = np.sqrt(np.matmul(d[:, None, :], d[:, :, None])[:, 0, 0])  # np.linalg.norm(center[:2], 2)
            keep = ~(radius > np.array([float(class_range[names[k]]) for k in labels.tolist()]))
            centers, vel, quat, size, labels, scores = (a[keep] for a in (centers, vel, quat, size, labels, scores))
    for k in range(len(labels)):
        name = names[labels[k]]
        out.append({
            "sample_token": sample_token,
            "translation": centers[k].tolist(),
            "size": size[k].tolist(),
            "rotation": quat[k].tolist(),
            "velocity": vel[k, :2].tolist(),
            "detection_name": name,
            "detection_score": float(scores[k]),
            "attribute_name": default_attribute(name, vel[k]),
        })
    return out


def annotations_to_boxes(annotations: Sequence[Any], class_names: Sequence[str], lidar2ego: np.ndarray,
                         ego2global: np.ndarray) -> Boxes:
    """Global-frame boxes (``Annotation`` s or submission dicts) -> ``Boxes`` in the LiDAR frame, deploykit's
    convention (dims l, w, h; 1.x yaw; velocity rotated, NaN kept). Classes outside ``class_names`` are left
    out; the score is ``detection_score`` where there is one, else 1."""
    names = list(class_names)
    rows = [a for a in annotations if _field(a, "detection_name") in names]
    n = len(rows)
    g2l = invert_pose(np.asarray(ego2global, np.float64) @ np.asarray(lidar2ego, np.float64))
    t = np.array([np.asarray(_field(a, "translation"), np.float64) for a in rows]).reshape(n, 3)
    s = np.array([np.asarray(_field(a, "size"), np.float64) for a in rows]).reshape(n, 3)
    q = np.array([np.asarray(_field(a, "rotation"), np.float64) for a in rows]).reshape(n, 4)
    v = np.array([np.asarray(_field(a, "velocity"), np.float64)[:2] for a in rows]).reshape(n, 2)
    centers = t @ g2l[:3, :3].T + g2l[:3, 3]
    # The heading: the box's x axis in the LiDAR frame (quaternion_yaw of the LiDAR-frame orientation).
    heading = np.stack([_quat_rotation(x)[:, 0] for x in q]).reshape(n, 3) @ g2l[:3, :3].T
    yaw = np.arctan2(heading[:, 1], heading[:, 0])
    vel = np.column_stack([v, np.zeros(n)]) @ g2l[:3, :3].T
    scores = np.array([float(_field(a, "detection_score", 1.0)) for a in rows]).reshape(n)
    labels = np.array([names.index(_field(a, "detection_name")) for a in rows], np.int64).reshape(n)
    return Boxes(centers, s[:, [1, 0, 2]], yaw, scores, labels, vel[:, :2])


def _field(box: Any, key: str, default: Any = None) -> Any:
    if isinstance(box, Mapping):
        return box.get(key, default)
    return getattr(box, key, default)


def _check_box(box: Mapping, token: str, k: int) -> None:
    missing = [f for f in SUBMISSION_FIELDS if f not in box]
    if missing:
        raise ValueError(f"sample {token} box {k}: missing {missing}")
    if box["sample_token"] != token:
        raise ValueError(f"sample {token} box {k}: sample_token is {box['sample_token']!r}")
    if box["detection_name"] not in DETECTION_NAMES:
        raise ValueError(f"sample {token} box {k}: unknown detection_name {box['detection_name']!r}")
    if box["attribute_name"] not in ATTRIBUTE_NAMES and box["attribute_name"] != "":
        raise ValueError(f"sample {token} box {k}: unknown attribute_name {box['attribute_name']!r}")
    for f, size in (("translation", 3), ("size", 3), ("rotation", 4), ("velocity", 2)):
        if len(box[f]) != size:
            raise ValueError(f"sample {token} box {k}: {f} needs {size} elements")
    score = box["detection_score"]
    if isinstance(score, bool) or not isinstance(score, (int, float, np.integer, np.floating)) or math.isnan(score):
        raise ValueError(f"sample {token} box {k}: detection_score must be a number, not NaN (got {score!r})")
    if any(not math.isfinite(float(x)) for f in ("translation", "size", "rotation") for x in box[f]):
        raise ValueError(f"sample {token} box {k}: translation, size and rotation must be finite")


def _plain(box: Mapping) -> dict:
    out = {f: box[f] for f in SUBMISSION_FIELDS}
    for f in ("translation", "size", "rotation", "velocity"):
        out[f] = [float(x) for x in box[f]]
    out["detection_score"] = float(box["detection_score"])
    out["sample_token"], out["detection_name"] = str(box["sample_token"]), str(box["detection_name"])
    out["attribute_name"] = str(box["attribute_name"])
    return out


def write_submission(path: str | os.PathLike, results: Mapping[str, Sequence[Mapping]],
                     meta: Mapping[str, bool] | None = None, *, max_boxes_per_sample: int = 500) -> dict:
    """Write the nuScenes results JSON ``{"meta": ..., "results": {sample_token: [boxes]}}`` atomically.

    ``meta`` sets the modality flags (use_camera, use_lidar, use_radar, use_map, use_external); those not
    given are False. Boxes are checked as the devkit's loader would (fields, names, at most
    ``max_boxes_per_sample`` per sample) and written as plain floats and strings, in the order given
    (samples and boxes: the devkit breaks score ties by it). Returns the written document.
    """
    meta = dict(meta or {})
    unknown = [k for k in meta if k not in META_KEYS]
    if unknown:
        raise ValueError(f"unknown meta keys {unknown}; the submission format has {', '.join(META_KEYS)}")
    meta = {k: bool(meta.get(k, False)) for k in META_KEYS}
    doc_results = {}
    for token, boxes in results.items():
        boxes = list(boxes)
        if len(boxes) > max_boxes_per_sample:
            raise ValueError(f"sample {token}: {len(boxes)} boxes, the devkit allows at most {max_boxes_per_sample}")
        for k, box in enumerate(boxes):
            _check_box(box, token, k)
        doc_results[str(token)] = [_plain(box) for box in boxes]
    doc = {"meta": meta, "results": doc_results}
    # Compact (a full val split is ~3M boxes); NaN velocities are written as NaN, which Python's json (the
    # devkit's loader) reads back.
    with atomic_file(path) as tmp:
        with open(tmp, "w") as fh:
            json.dump(doc, fh, separators=(",", ":"))
    return doc
