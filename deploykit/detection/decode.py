"""Decode head outputs into 3D boxes, as the released box coders do (without NMS).

* BEVFormer: mmdet3d-plugin's NMSFreeCoder: sigmoid class scores, top
  ``max_num`` over all (query, class) pairs, boxes denormalised from
  (cx, cy, log w, log l, cz, log h, sin, cos, vx, vy), kept inside
  ``post_center_range``.
* CenterPoint: mmdet3d's CenterPointBBoxCoder per task: sigmoid heatmap, top
  ``max_num`` peaks, sub-cell offsets, exp dims, atan2 yaw, grid -> metres,
  score threshold and ``post_center_range``.

Both skip the final NMS: agreement between a float and a quantized model is
measured on what the network itself says, before a post-process that would
hide (or add) differences.

Box convention (``Boxes``), the same for every architecture: mmdet3d >= 1.0's
LiDAR convention, in the LiDAR frame of the frame the model saw.

* ``centers`` (K, 3): x, y, z of the box's gravity centre, metres.
* ``dims`` (K, 3): l, w, h; l is the extent along the heading, w across it.
* ``yaw`` (K,): the heading, radians counter-clockwise from +x (about +z);
  not wrapped into a range (a decoder's value is kept as it comes out, so the
  nuScenes quaternion built from it is the released code's, sign included).
* ``velocity`` (K, 2) or None: vx, vy in m/s in the LiDAR frame; both decoders
  fill it (zeros where the head has no velocity output), None is allowed for
  boxes made elsewhere (e.g. ground truth without velocities).

CenterPoint's coder emits this convention directly (deploykit's training
targets encode log(dx, dy, dz) = log(l, w, h) and sin/cos of the 1.x yaw).
BEVFormer is built on mmdet3d 0.17, whose LiDAR boxes are (w, l, h) with the
0.x yaw; its ``output_to_nusc_box`` turns them into a nuScenes box of size
(w, l, h) and heading ``-yaw - pi/2``, which is exactly the 1.x conversion
(mmdet3d's coordinate refactor): l, w swapped and yaw_1x = -yaw_0x - pi/2.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Boxes:
    """Decoded boxes in the LiDAR frame, in the convention of the module docstring."""

    centers: np.ndarray  # (K, 3) gravity centre x, y, z, metres
    dims: np.ndarray  # (K, 3) l, w, h (l along the heading)
    yaw: np.ndarray  # (K,) heading, radians from +x counter-clockwise
    scores: np.ndarray  # (K,)
    labels: np.ndarray  # (K,) class index over all tasks
    velocity: np.ndarray | None = None  # (K, 2) vx, vy in m/s, LiDAR frame

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def take(self, index: np.ndarray) -> "Boxes":
        """The boxes at ``index`` (indices or a boolean mask)."""
        return Boxes(self.centers[index], self.dims[index], self.yaw[index], self.scores[index], self.labels[index],
                     None if self.velocity is None else self.velocity[index])

    @staticmethod
    def concat(parts: "list[Boxes]") -> "Boxes":
        """The boxes of ``parts`` one after the other; velocity kept if every part has it."""
        if not parts:
            raise ValueError("Boxes.concat needs at least one part")
        vel = None
        if all(p.velocity is not None for p in parts):
            vel = np.concatenate([np.asarray(p.velocity).reshape(-1, 2) for p in parts])
        return Boxes(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("centers", "dims", "yaw", "scores",
                                                                                 "labels")), vel)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x.astype(np.float64)))


def _in_range(centers: np.ndarray, post_center_range) -> np.ndarray:
    r = np.asarray(post_center_range)
    return np.all((centers >= r[:3]) & (centers <= r[3:]), axis=1)


def decode_bevformer(cfg, outputs: dict[str, np.ndarray], *, max_num: int = 300, score_threshold: float | None = None,
                     post_center_range=None) -> Boxes:
    cls = _sigmoid(outputs["cls_scores"][0])  # (Q, C)
    bbox = outputs["bbox_preds"][0].astype(np.float64)
    num_classes = cls.shape[1]
    flat = cls.reshape(-1)
    k = min(max_num, flat.size)
    order = np.argsort(-flat, kind="stable")[:k]
    scores, labels, query = flat[order], order % num_classes, order // num_classes
    b = bbox[query]
    # denormalize_bbox: (cx, cy, cz, w, l, h, rot, vx, vy), mmdet3d 0.17 LiDAR boxes (cz the gravity centre:
    # get_bboxes moves it to the bottom and LiDARInstance3DBoxes.gravity_center moves it back).
    centers = np.stack([b[:, 0], b[:, 1], b[:, 4]], 1)
    w, l, h = np.exp(b[:, 2]), np.exp(b[:, 3]), np.exp(b[:, 5])
    rot = np.arctan2(b[:, 6], b[:, 7])
    # To the 1.x convention, as output_to_nusc_box does for the nuScenes box: heading -rot - pi/2, length l.
    dims = np.stack([l, w, h], 1)
    yaw = -rot - np.pi / 2
    velocity = b[:, 8:10] if b.shape[1] >= 10 else np.zeros((len(b), 2))
    r = cfg.pc_range
    keep = _in_range(centers, post_center_range or (r[0] - 10, r[1] - 10, -10.0, r[3] + 10, r[4] + 10, 10.0))
    if score_threshold is not None:
        keep &= scores > score_threshold
    return Boxes(centers, dims, yaw, scores, labels, velocity).take(keep)


def decode_centerpoint(cfg, outputs: dict[str, np.ndarray], *, max_num: int = 500, score_threshold: float = 0.1,
                       post_center_range=None) -> Boxes:
    v = cfg.voxelization
    stride = cfg.output_stride
    rng = v.point_cloud_range
    parts, offset = [], 0
    for t, task in enumerate(cfg.head.tasks):
        heat = _sigmoid(outputs[f"task{t}.heatmap"][0])  # (C, H, W)
        classes, h, w = heat.shape
        flat = heat.reshape(-1)
        order = np.argsort(-flat, kind="stable")[:min(max_num, flat.size)]
        scores = flat[order]
        cls, pix = order // (h * w), order % (h * w)
        ys, xs = pix // w, pix % w
        reg = outputs[f"task{t}.reg"][0][:, ys, xs]
        x = (xs + reg[0]) * stride * v.voxel_size[0] + rng[0]
        y = (ys + reg[1]) * stride * v.voxel_size[1] + rng[1]
        z = outputs[f"task{t}.height"][0][0, ys, xs]
        # log(l, w, h) and (sin, cos) of the 1.x yaw, as centerpoint_targets encodes them.
        dims = np.exp(outputs[f"task{t}.dim"][0][:, ys, xs].T.astype(np.float64))
        rot = outputs[f"task{t}.rot"][0][:, ys, xs]
        vel_map = outputs.get(f"task{t}.vel")
        # No velocity head: zeros, as mmdet3d's output_to_nusc_box does with_velocity=False.
        vel = np.zeros((len(order), 2)) if vel_map is None else vel_map[0][:2, ys, xs].T.astype(np.float64)
        parts.append((np.stack([x, y, z], 1), dims, np.arctan2(rot[0], rot[1]), scores, cls + offset, vel))
        offset += len(task.class_names)
    centers, dims, yaw, scores, labels, velocity = (np.concatenate(p) for p in zip(*parts))
    keep = scores > score_threshold
    keep &= _in_range(centers, post_center_range or (rng[0] - 10, rng[1] - 10, -10.0, rng[3] + 10, rng[4] + 10, 10.0))
    return Boxes(centers, dims, yaw, scores, labels, velocity).take(keep)


def circle_nms(boxes: Boxes, thresh: float, post_max_size: int = 83) -> Boxes:
    """CenterPoint's circle NMS (mmdet3d ``circle_nms``): by descending score, keep a
    box and drop every later one whose squared ground-plane centre distance is at
    most ``thresh`` (so ``thresh`` is a squared radius, as in mmdet3d's
    ``test_cfg.min_radius``); then keep the first ``post_max_size``."""
    order = boxes.scores.argsort()[::-1]  # numpy's default sort, for mmdet3d's order among ties
    xy = boxes.centers[order, :2]
    suppressed = np.zeros(len(order), bool)
    keep = []
    for rank in range(len(order)):
        if suppressed[rank]:
            continue
        keep.append(order[rank])
        later = slice(rank + 1, None)
        suppressed[later] |= ((xy[later] - xy[rank]) ** 2).sum(1) <= thresh
    return boxes.take(np.asarray(keep[:post_max_size], dtype=np.int64))
