"""3D semantic occupancy: ground-truth voxel labels for the synthetic LiDAR scenes, and Occ3D's mIoU.

An occupancy head (FlashOcc-style, on BEVFusion's BEV features) predicts a class for every voxel
of a fixed grid in the LiDAR frame: logits (B, Dx, Dy, Dz, num_classes), axis 1 along x (forward),
2 along y, 3 along z; the last class is "free" (empty space). Ground truth exists only where
deploykit makes the scene itself, so ``scene_occupancy`` voxelises a ray-cast scene
(deploykit.preprocess.synthetic_lidar): voxels whose centre lies in a box take its class, the layer
holding the flat ground plane and those under it are "ground", the rest is free.

``occupancy_miou`` is the Occ3D-nuScenes benchmark metric, the ``Metric_mIoU`` class that FlashOcc
and the CVPR 2023 occupancy challenge evaluate with (the same code in both:
Yzichen/FlashOCC ``projects/mmdet3d_plugin/core/evaluation/occ_metrics.py`` lines 52-169 and
CVPR2023-3D-Occupancy-Prediction/CVPR2023-3D-Occupancy-Prediction
``projects/mmdet3d_plugin/datasets/occ_metrics.py`` lines 52-147). Per frame it keeps the voxels
inside the camera mask, drops those whose ground-truth label is outside [0, num_classes) (255 is
"unobserved"), and adds a num_classes x num_classes confusion histogram (rows ground truth,
columns prediction) into one running total. At the end IoU_c = diag / (row sum + column sum -
diag) of the pooled histogram, so a frame counts by its voxels, not equally with the others; the
mIoU is ``np.nanmean`` over every class but free: a class absent from both ground truth and
predictions is 0 / 0 = NaN and leaves the mean, while a class only predicted scores 0 and stays in.
Free voxels still enter the histogram, so calling a car voxel free costs the car class.
Occ3D prints IoU x 100 rounded to two decimals; here they are unrounded fractions.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# Guards the float comparison of a layer's bottom face with the ground height, so a ground plane
# exactly on a layer boundary does not claim the layer above it through rounding.
_GROUND_EPS = 1e-6


@dataclass(frozen=True)
class OccGrid:
    """A voxel grid in the LiDAR frame: ``range`` (xmin, ymin, zmin, xmax, ymax, zmax) in metres and
    ``size`` (Dx, Dy, Dz) voxels along x, y, z; voxel (i, j, k) spans
    [min + i * voxel, min + (i + 1) * voxel) on each axis."""

    range: tuple[float, float, float, float, float, float]
    size: tuple[int, int, int]

    def __post_init__(self) -> None:
        if len(self.range) != 6 or len(self.size) != 3:
            raise ValueError(f"OccGrid needs a range of 6 numbers and a size of 3, got {self.range} and {self.size}")
        rng = tuple(float(v) for v in self.range)
        size = tuple(int(v) for v in self.size)
        if any(s != v for s, v in zip(size, self.size)) or min(size) < 1:
            raise ValueError(f"OccGrid size must be three positive integers, got {self.size}")
        if not all(math.isfinite(v) for v in rng) or any(rng[i + 3] <= rng[i] for i in range(3)):
            raise ValueError(f"OccGrid range must be finite (xmin, ymin, zmin, xmax, ymax, zmax) with max > min, "
                             f"got {self.range}")
        # Plain tuples of Python numbers, so two grids built from lists or numpy scalars compare and hash alike.
        object.__setattr__(self, "range", rng)
        object.__setattr__(self, "size", size)

    @property
    def voxel_size(self) -> tuple[float, float, float]:
        return tuple((self.range[i + 3] - self.range[i]) / self.size[i] for i in range(3))

    @property
    def axis_centers(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Voxel centre coordinates along x (Dx,), y (Dy,) and z (Dz,)."""
        return tuple(self.range[i] + (np.arange(self.size[i]) + 0.5) * self.voxel_size[i] for i in range(3))

    @property
    def centers(self) -> np.ndarray:
        """(Dx, Dy, Dz, 3) float64 centre of every voxel."""
        return np.stack(np.meshgrid(*self.axis_centers, indexing="ij"), axis=-1)


def occupancy_labels(
    boxes: np.ndarray,
    box_classes: np.ndarray,
    grid: OccGrid,
    *,
    ground_z: float,
    ground_class: int,
    free_class: int,
) -> np.ndarray:
    """(Dx, Dy, Dz) uint8 labels: ``box_classes[k]`` where a voxel's centre lies in box k (inclusive
    faces, as ``evaluate.points_in_boxes``), else ``ground_class`` in the layer whose bottom face is
    below ``ground_z`` (the one holding the surface) and all layers under it, else ``free_class``.

    ``boxes`` (K, 7): x, y, z_center, length, width, height, yaw about z in the LiDAR frame. A box
    beats the ground, because the synthetic boxes stand on the plane and the layer holding it is
    mostly box where a centre is inside one; where boxes overlap the earlier one wins.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 7)
    box_classes = np.asarray(box_classes).reshape(-1)
    if len(box_classes) != len(boxes):
        raise ValueError(f"{len(boxes)} boxes but {len(box_classes)} box classes")
    values = [int(ground_class), int(free_class), *(int(c) for c in box_classes)]
    if any(v < 0 or v > 255 for v in values):
        raise ValueError(f"occupancy classes must fit uint8 (0-255), got {sorted(set(values))}")

    labels = np.full(grid.size, free_class, dtype=np.uint8)
    z_bottom = grid.range[2] + np.arange(grid.size[2]) * grid.voxel_size[2]
    labels[:, :, z_bottom < ground_z - _GROUND_EPS] = ground_class

    cx, cy, cz = grid.axis_centers
    # Reversed so that, where boxes overlap, the earlier box is written last and wins.
    for box, cls in zip(boxes[::-1], box_classes[::-1]):
        x, y, z, length, width, height, yaw = box
        c, s = math.cos(yaw), math.sin(yaw)
        # Only the voxels under the box's axis-aligned footprint can be inside; testing just those
        # keeps a 200 x 200 x 16 grid with 20 boxes to a few milliseconds.
        reach_x = abs(c) * length / 2 + abs(s) * width / 2
        reach_y = abs(s) * length / 2 + abs(c) * width / 2
        ix = _window(cx, x - reach_x, x + reach_x)
        iy = _window(cy, y - reach_y, y + reach_y)
        iz = _window(cz, z - height / 2, z + height / 2)
        if ix.stop <= ix.start or iy.stop <= iy.start or iz.stop <= iz.start:
            continue
        dx, dy = cx[ix, None] - x, cy[None, iy] - y
        inside_xy = (np.abs(c * dx + s * dy) <= length / 2) & (np.abs(c * dy - s * dx) <= width / 2)
        inside_z = np.abs(cz[iz] - z) <= height / 2
        region = labels[ix, iy, iz]  # a view: writing it writes labels
        region[inside_xy[:, :, None] & inside_z[None, None, :]] = cls
    return labels


def _window(centers: np.ndarray, lo: float, hi: float) -> slice:
    """Indices of the sorted ``centers`` in [lo, hi], widened by one each side against rounding."""
    start = max(int(np.searchsorted(centers, lo, side="left")) - 1, 0)
    stop = min(int(np.searchsorted(centers, hi, side="right")) + 1, len(centers))
    return slice(start, stop)


def scene_occupancy(scene, grid: OccGrid, class_names: Sequence[str]) -> np.ndarray:
    """Ground-truth labels (Dx, Dy, Dz) uint8 of a ``synthetic_lidar.Scene`` on ``grid``, as indices
    into ``class_names``: its last name must be "free" and one must be "ground" (the plane at
    ``GROUND_Z``). Scene classes map by name; one that ``class_names`` lacks becomes "others" when
    that is a class, else free (its box is dropped, leaving the ground under it)."""
    from ..preprocess.synthetic_lidar import CLASSES, GROUND_Z

    names = list(class_names)
    if len(names) < 2 or names[-1] != "free":
        raise ValueError(f"class_names must end with 'free' (the empty-space class), got {names}")
    if "ground" not in names:
        raise ValueError(f"class_names must include 'ground' (the synthetic scenes' ground plane), got {names}")
    if len(set(names)) != len(names):
        raise ValueError(f"class_names has duplicates: {names}")
    if len(names) > 256:
        raise ValueError(f"{len(names)} classes do not fit uint8 labels")
    free = len(names) - 1
    fallback = names.index("others") if "others" in names else free
    to_grid = np.array([names.index(c) if c in names else fallback for c in CLASSES], dtype=np.int64)
    classes = to_grid[np.asarray(scene.labels, dtype=np.int64)]
    # A box mapped to free is dropped rather than labelled: boxes beat the ground, so it would
    # otherwise carve a hole of free space into the ground layer under it.
    kept = classes != free
    return occupancy_labels(np.asarray(scene.boxes)[kept], classes[kept], grid,
                            ground_z=GROUND_Z, ground_class=names.index("ground"), free_class=free)


def occupancy_argmax(logits) -> np.ndarray:
    """Labels (...) from logits (..., num_classes): uint8 when the classes fit, else int64."""
    if hasattr(logits, "detach"):  # a torch tensor, possibly on an accelerator or needing grad
        logits = logits.detach().cpu().numpy()
    logits = np.asarray(logits)
    if logits.ndim < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits need a class axis last, got shape {logits.shape}")
    labels = np.argmax(logits, axis=-1)
    return labels.astype(np.uint8) if logits.shape[-1] <= 256 else labels.astype(np.int64)


def occupancy_miou(
    predictions,
    ground_truth,
    num_classes: int,
    *,
    free_class: int | None = None,
    mask=None,
    class_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Occ3D's ``Metric_mIoU`` over one frame or a list of frames (see the module docstring).

    ``predictions`` and ``ground_truth``: integer label arrays of one shape, or equal-length lists of
    them; ``mask``: a boolean array (or list, one per frame) of the voxels to score, Occ3D's
    ``mask_camera``, or None for all. ``free_class`` (default the last class, as in Occ3D) is kept
    in the histogram and left out of the mean. A stacked (B, ...) array pools exactly like a list
    of B frames but counts as one frame.

    Returns ``mIoU``; ``per_class`` {index: IoU, NaN where a class is in neither ground truth nor
    predictions}; ``frames``; ``voxels`` scored; ``free_class``; ``num_gt`` and ``num_pred``
    {index: voxels}; ``confusion`` (rows ground truth, columns prediction); ``class_names`` when
    given. Unlike Occ3D, which would bin a prediction outside [0, num_classes) into the wrong cell or
    fail reshaping, such a prediction raises ValueError.
    """
    num_classes = int(num_classes)
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2 (some class and free), got {num_classes}")
    free = num_classes - 1 if free_class is None else int(free_class)
    if not 0 <= free < num_classes:
        raise ValueError(f"free_class {free_class} is not a class index below num_classes={num_classes}")
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for num_classes={num_classes}")

    preds, gts = _frames(predictions), _frames(ground_truth)
    if len(preds) != len(gts):
        raise ValueError(f"{len(preds)} prediction frames but {len(gts)} ground-truth frames")
    masks = [None] * len(gts) if mask is None else _frames(mask)
    if len(masks) != len(gts):
        raise ValueError(f"{len(masks)} masks for {len(gts)} frames")

    hist = np.zeros((num_classes, num_classes), dtype=np.int64)
    for n, (pred, gt, m) in enumerate(zip(preds, gts, masks)):
        pred, gt = np.asarray(pred), np.asarray(gt)
        if pred.shape != gt.shape:
            hint = " (logits? take occupancy_argmax first)" if pred.shape[:-1] == gt.shape else ""
            raise ValueError(f"frame {n}: prediction shape {pred.shape} != ground truth {gt.shape}{hint}")
        for what, a in (("prediction", pred), ("ground truth", gt)):
            if not (np.issubdtype(a.dtype, np.integer) or a.dtype == bool):
                raise ValueError(f"frame {n}: {what} must hold integer labels, got {a.dtype}"
                                 + (" (take occupancy_argmax of logits first)" if what == "prediction" else ""))
        if m is not None:
            m = np.asarray(m)
            if m.shape != gt.shape:
                raise ValueError(f"frame {n}: mask shape {m.shape} != ground truth {gt.shape}")
            # Occ3D loads its masks as uint8 and casts; an integer array used as an index would gather instead.
            m = m.astype(bool)
            pred, gt = pred[m], gt[m]
        pred, gt = pred.reshape(-1).astype(np.int64), gt.reshape(-1).astype(np.int64)
        keep = (gt >= 0) & (gt < num_classes)  # Occ3D's "exclude 255": unobserved ground truth
        pred, gt = pred[keep], gt[keep]
        if len(pred) and (pred.min() < 0 or pred.max() >= num_classes):
            raise ValueError(f"frame {n}: predicted labels span {pred.min()}..{pred.max()}, "
                             f"outside 0..{num_classes - 1}")
        hist += np.bincount(num_classes * gt + pred, minlength=num_classes**2).reshape(num_classes, num_classes)

    iou = _per_class_iou(hist)
    scored = [c for c in range(num_classes) if c != free]
    with warnings.catch_warnings():
        # All of them NaN (nothing but free anywhere): Occ3D's nanmean gives NaN with a RuntimeWarning.
        warnings.simplefilter("ignore", RuntimeWarning)
        miou = float(np.nanmean(iou[scored]))
    result: dict[str, Any] = {
        "mIoU": miou,
        "per_class": {c: float(iou[c]) for c in range(num_classes)},
        "frames": len(gts),
        "voxels": int(hist.sum()),
        "free_class": free,
        "num_gt": {c: int(v) for c, v in enumerate(hist.sum(1))},
        "num_pred": {c: int(v) for c, v in enumerate(hist.sum(0))},
        "confusion": hist.tolist(),
    }
    if class_names is not None:
        result["class_names"] = list(class_names)
    return result


def _per_class_iou(hist: np.ndarray) -> np.ndarray:
    diag = np.diag(hist).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):  # 0 / 0 is the NaN Occ3D's nanmean skips
        return diag / (hist.sum(1) + hist.sum(0) - diag)


def _frames(x) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def render_markdown(result: Mapping[str, Any], class_names: Sequence[str] | None = None) -> str:
    """A markdown table of ``occupancy_miou``'s result: IoU x 100 per class (two decimals, as Occ3D
    prints), ground-truth and predicted voxels, then the mIoU; "-" for a class in neither."""
    names = list(class_names if class_names is not None else result.get("class_names") or [])
    per_class = result["per_class"]
    if names and len(names) != len(per_class):
        raise ValueError(f"{len(names)} class names for {len(per_class)} classes")
    free = result["free_class"]

    def pct(x: float) -> str:
        return "-" if math.isnan(x) else f"{100 * x:.2f}"

    lines = [f"**mIoU** {pct(result['mIoU'])} | {result['frames']} frames | {result['voxels']} voxels", "",
             "| Class | IoU | GT voxels | Pred voxels |", "|---|---:|---:|---:|"]
    for c, value in per_class.items():
        label = names[c] if names else str(c)
        if c == free:
            label += " (not in mIoU)"
        lines.append(f"| {label} | {pct(value)} | {result['num_gt'][c]} | {result['num_pred'][c]} |")
    lines.append(f"| **mIoU** | {pct(result['mIoU'])} | | |")
    return "\n".join(lines) + "\n"
