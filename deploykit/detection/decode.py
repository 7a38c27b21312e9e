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
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Boxes:
    centers: np.ndarray  # (K, 3) metres
    dims: np.ndarray  # (K, 3)
    yaw: np.ndarray  # (K,)
    scores: np.ndarray  # (K,)
    labels: np.ndarray  # (K,) class index over all tasks

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def take(self, index: np.ndarray) -> "Boxes":
        """The boxes at ``index`` (indices or a boolean mask)."""
        return Boxes(self.centers[index], self.dims[index], self.yaw[index], self.scores[index], self.labels[index])


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
    centers = np.stack([b[:, 0], b[:, 1], b[:, 4]], 1)
    dims = np.exp(np.stack([b[:, 2], b[:, 3], b[:, 5]], 1))
    yaw = np.arctan2(b[:, 6], b[:, 7])
    r = cfg.pc_range
    keep = _in_range(centers, post_center_range or (r[0] - 10, r[1] - 10, -10.0, r[3] + 10, r[4] + 10, 10.0))
    if score_threshold is not None:
        keep &= scores > score_threshold
    return Boxes(centers, dims, yaw, scores, labels).take(keep)


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
        dims = np.exp(outputs[f"task{t}.dim"][0][:, ys, xs].T.astype(np.float64))
        rot = outputs[f"task{t}.rot"][0][:, ys, xs]
        parts.append((np.stack([x, y, z], 1), dims, np.arctan2(rot[0], rot[1]), scores, cls + offset))
        offset += len(task.class_names)
    centers, dims, yaw, scores, labels = (np.concatenate(p) for p in zip(*parts))
    keep = scores > score_threshold
    keep &= _in_range(centers, post_center_range or (rng[0] - 10, rng[1] - 10, -10.0, rng[3] + 10, rng[4] + 10, 10.0))
    return Boxes(centers, dims, yaw, scores, labels).take(keep)


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
