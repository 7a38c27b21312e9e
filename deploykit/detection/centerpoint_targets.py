"""Training targets and loss for the CenterPoint head, as mmdet3d's CenterHead computes them.

Reproduces, value for value, what mmdet3d (1.x, checked against v1.4.0 and
v1.0.0rc6) trains ``deploykit.models.centerpoint_pillar`` with:

* ``mmdet3d/models/utils/gaussian.py`` (``mmdet3d/core/utils/gaussian.py`` in
  1.0.0rc): ``gaussian_2d``, ``draw_heatmap_gaussian`` and ``gaussian_radius``,
  the last with CornerNet's known slips kept (see ``gaussian_radius``);
* ``CenterHead.get_targets_single`` (``mmdet3d/models/dense_heads/centerpoint_head.py``):
  per task, a class heatmap with one Gaussian per object, and per object a
  10-vector (sub-cell x/y offset, gravity-centre z, log dx/dy/dz, sin/cos yaw,
  vx, vy) with its centre cell's flat index and a validity mask;
* ``CenterHead.loss_by_feat`` (``loss`` in 1.0.0rc) with the nuScenes pillar
  config's losses: mmdet's ``GaussianFocalLoss(reduction='mean')`` on
  ``clip_sigmoid`` heatmaps averaged over the peak cells, and
  ``L1Loss(reduction='mean', loss_weight=0.25)`` on the regression gathered at
  the object cells, weighted by ``code_weights`` and averaged over the objects.

Defaults are that config's ``train_cfg`` (gaussian_overlap 0.1, max_objs 500,
min_radius 2, code_weights 1 x 8 + 0.2 x 2, norm_bbox). Boxes come in mmdet3d's
LiDAR convention, already gravity-centred: x, y, z, dx (along x), dy (along y),
dz, yaw; labels index the classes of all tasks in task order.

Where mmdet3d's behaviour is odd it is kept, since a checkpoint trained with it
expects it: objects are slotted class by class within a task (not in input
order), ``max_objs`` cuts before off-grid objects are dropped (those leave empty
slots), a centre up to one cell below the grid's lower edge is kept (the cell
index is truncated toward zero) with a negative offset, and objects sharing a
cell all get a slot. One deviation: an object with dx or dy <= 0 is skipped, as
1.0.0rc does; 1.x draws it with the previous object's radius (or fails if it
comes first).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

CODE_WEIGHTS = (1.0,) * 8 + (0.2, 0.2)
# Column order of the 10-vector box target, and so of the concatenated head outputs.
BOX_HEADS = ("reg", "height", "dim", "rot", "vel")
# mmdet's weight_reduce_loss adds this to every avg_factor.
_AVG_EPS = float(torch.finfo(torch.float32).eps)


@dataclass
class TaskTargets:
    heatmap: torch.Tensor  # (C, H, W) float32
    boxes: torch.Tensor  # (max_objs, 10) float32
    inds: torch.Tensor  # (max_objs,) int64: y * W + x of the object's cell
    mask: torch.Tensor  # (max_objs,) uint8: 1 where the slot holds an object


def gaussian_2d(shape: tuple[int, int], sigma: float = 1.0) -> np.ndarray:
    m, n = [(ss - 1.0) / 2.0 for ss in shape]
    y, x = np.ogrid[-m:m + 1, -n:n + 1]
    h = np.exp(-(x * x + y * y) / (2 * sigma * sigma))
    h[h < np.finfo(h.dtype).eps * h.max()] = 0
    return h


@functools.lru_cache(maxsize=128)
def _gaussian_kernel(radius: int) -> torch.Tensor:
    diameter = 2 * radius + 1
    # float64 kernel cast to float32, as mmdet3d does per crop (the cast commutes with the crop).
    return torch.from_numpy(gaussian_2d((diameter, diameter), sigma=diameter / 6)).to(torch.float32)


def draw_heatmap_gaussian(heatmap: torch.Tensor, center, radius: int, k: int = 1) -> torch.Tensor:
    """Max a Gaussian of ``radius`` cells into ``heatmap`` (H, W) at cell ``center`` = (x, y), in place."""
    radius = int(radius)
    gaussian = _gaussian_kernel(radius)
    x, y = int(center[0]), int(center[1])
    height, width = heatmap.shape[0:2]
    left, right = min(x, radius), min(width - x, radius + 1)
    top, bottom = min(y, radius), min(height - y, radius + 1)
    masked_heatmap = heatmap[y - top:y + bottom, x - left:x + right]
    masked_gaussian = gaussian[radius - top:radius + bottom, radius - left:radius + right].to(heatmap.device)
    if min(masked_gaussian.shape) > 0 and min(masked_heatmap.shape) > 0:
        torch.max(masked_heatmap, masked_gaussian * k, out=masked_heatmap)
    return heatmap


def _radius(height: torch.Tensor, width: torch.Tensor, min_overlap: float) -> torch.Tensor:
    # mmdet3d's formula verbatim (CornerNet's, princeton-vl/CornerNet#110), slips
    # included because trained checkpoints depend on the radii they give: r1 takes
    # the quadratic's larger root (b1 + sq1) where the smaller one is meant, and r2,
    # r3 divide by 2 instead of 2 * a2, 2 * a3. Symmetric in (height, width), so
    # mmdet3d's (width, length) vs (length, width) argument order across versions
    # does not matter. Same float32 operations in the same order, so the same bits.
    a1 = 1
    b1 = (height + width)
    c1 = width * height * (1 - min_overlap) / (1 + min_overlap)
    sq1 = torch.sqrt(b1**2 - 4 * a1 * c1)
    r1 = (b1 + sq1) / 2

    a2 = 4
    b2 = 2 * (height + width)
    c2 = (1 - min_overlap) * width * height
    sq2 = torch.sqrt(b2**2 - 4 * a2 * c2)
    r2 = (b2 + sq2) / 2

    a3 = 4 * min_overlap
    b3 = -2 * min_overlap * (height + width)
    c3 = (min_overlap - 1) * width * height
    sq3 = torch.sqrt(b3**2 - 4 * a3 * c3)
    r3 = (b3 + sq3) / 2
    return torch.minimum(torch.minimum(r1, r2), r3)


def gaussian_radius(det_size: tuple[float, float], min_overlap: float = 0.5) -> float:
    """mmdet3d's gaussian_radius of a (height, width) box in heatmap cells, evaluated in
    float32 as mmdet3d does on box tensors (its known slips kept, see ``_radius``)."""
    height, width = (torch.as_tensor(s, dtype=torch.float32) for s in det_size)
    return float(_radius(height, width, min_overlap))


def feature_map_size(cfg) -> tuple[int, int]:
    """(W, H) of the head's maps: mmdet3d's grid_size[:2] // out_size_factor."""
    nx, ny, _ = cfg.voxelization.grid_size
    return nx // cfg.output_stride, ny // cfg.output_stride


def targets(cfg, boxes: np.ndarray, labels: np.ndarray, velocities: np.ndarray | None = None, *,
            gaussian_overlap: float = 0.1, max_objs: int = 500, min_radius: int = 2) -> list[TaskTargets]:
    """One sample's targets, one TaskTargets per head task (mmdet3d's get_targets_single).

    ``boxes`` (K, 7): x, y, z (gravity centre), dx, dy, dz, yaw; ``labels`` (K,):
    class index over all tasks, anything outside 0..num_classes-1 ignored (as
    mmdet3d ignores labels no task claims); ``velocities`` (K, 2), zeros if None.
    """
    boxes = np.asarray(boxes)
    labels = np.asarray(labels)
    if boxes.ndim != 2 or boxes.shape[1] != 7:
        raise ValueError(f"boxes must be (K, 7) x, y, z, dx, dy, dz, yaw; got shape {boxes.shape}")
    if labels.shape != (boxes.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be ({boxes.shape[0]},) integers; got {labels.dtype} {labels.shape}")
    if velocities is None:
        velocities = np.zeros((boxes.shape[0], 2), np.float32)
    velocities = np.asarray(velocities)
    if velocities.shape != (boxes.shape[0], 2):
        raise ValueError(f"velocities must be ({boxes.shape[0]}, 2); got {velocities.shape}")

    # mmdet3d works on LiDARInstance3DBoxes.tensor, float32: every step below is float32 too.
    gt = torch.from_numpy(np.concatenate([boxes, velocities], 1).astype(np.float32))
    gt_labels = torch.from_numpy(labels.astype(np.int64))
    v = cfg.voxelization
    stride = cfg.output_stride
    pc_range = torch.tensor(v.point_cloud_range, dtype=torch.float32)
    voxel_size = torch.tensor(v.voxel_size, dtype=torch.float32)
    width, height = feature_map_size(cfg)

    out = []
    first = 0
    for task in cfg.head.tasks:
        num_classes = len(task.class_names)
        # Class by class, input order within a class: that is how mmdet3d numbers the slots.
        order = torch.cat([torch.where(gt_labels == first + c)[0] for c in range(num_classes)])[:max_objs]
        task_boxes, task_classes = gt[order], gt_labels[order] - first
        first += num_classes

        heatmap = torch.zeros((num_classes, height, width), dtype=torch.float32)
        anno_box = torch.zeros((max_objs, 10), dtype=torch.float32)
        ind = torch.zeros(max_objs, dtype=torch.int64)
        mask = torch.zeros(max_objs, dtype=torch.uint8)

        length_cells = task_boxes[:, 3] / voxel_size[0] / stride
        width_cells = task_boxes[:, 4] / voxel_size[1] / stride
        radius = _radius(width_cells, length_cells, gaussian_overlap)
        coor_x = (task_boxes[:, 0] - pc_range[0]) / voxel_size[0] / stride
        coor_y = (task_boxes[:, 1] - pc_range[1]) / voxel_size[1] / stride
        center = torch.stack([coor_x, coor_y], 1)
        # mmdet3d tests 0 <= int32(coor) < size; int32() truncates toward zero, so
        # coor in (-1, 0) passes. Comparing the floats is the same test without
        # int32 overflow for far-away boxes (and NaN fails it, as in mmdet3d).
        keep = ((length_cells > 0) & (width_cells > 0) & (coor_x > -1) & (coor_x < width)
                & (coor_y > -1) & (coor_y < height))

        for k in torch.nonzero(keep)[:, 0].tolist():
            center_int = center[k].to(torch.int32)
            x, y = int(center_int[0]), int(center_int[1])
            draw_heatmap_gaussian(heatmap[int(task_classes[k])], (x, y), max(min_radius, int(radius[k])))
            ind[k] = y * width + x
            mask[k] = 1
            box = task_boxes[k]
            # Per object, like mmdet3d: torch's vectorised log/sin/cos (used on
            # longer tensors) may differ from the scalar ones by an ulp.
            anno_box[k] = torch.cat([
                center[k] - center_int,
                box[2:3],
                box[3:6].log(),
                torch.sin(box[6:7]),
                torch.cos(box[6:7]),
                box[7:9],
            ])
        out.append(TaskTargets(heatmap, anno_box, ind, mask))
    return out


def collate(batch: Sequence[Sequence[TaskTargets]]) -> list[dict[str, torch.Tensor]]:
    """Samples' targets -> per task {'heatmap' (B,C,H,W), 'boxes' (B,N,10), 'inds' (B,N), 'mask' (B,N)}."""
    names = ("heatmap", "boxes", "inds", "mask")
    return [{n: torch.stack([getattr(sample[t], n) for sample in batch]) for n in names}
            for t in range(len(batch[0]))]


def clip_sigmoid(x: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    # mmdet3d's calls x.sigmoid_() in place; out of place here so the caller's outputs survive.
    return torch.clamp(x.sigmoid(), min=eps, max=1 - eps)


def gaussian_focal_loss(pred: torch.Tensor, gaussian_target: torch.Tensor, alpha: float = 2.0,
                        gamma: float = 4.0) -> torch.Tensor:
    """mmdet's element-wise gaussian_focal_loss (pos_weight = neg_weight = 1)."""
    eps = 1e-12
    pos_weights = gaussian_target.eq(1)
    neg_weights = (1 - gaussian_target).pow(gamma)
    pos_loss = -(pred + eps).log() * (1 - pred).pow(alpha) * pos_weights
    neg_loss = -(1 - pred + eps).log() * pred.pow(alpha) * neg_weights
    return pos_loss + neg_loss


def _l1_loss(pred, target, weight, avg_factor, loss_weight):
    # mmdet's L1Loss.forward: with no positive weight it returns (pred * weight).sum(),
    # a zero that keeps the graph, and skips loss_weight.
    if not torch.any(weight > 0):
        return (pred * weight).sum()
    return loss_weight * (((pred - target).abs() * weight).sum() / (avg_factor + _AVG_EPS))


def loss(cfg, outputs: Mapping[str, torch.Tensor], targets: Sequence[Mapping[str, torch.Tensor]], *,
         code_weights: Sequence[float] = CODE_WEIGHTS, bbox_weight: float = 0.25,
         heatmap_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """CenterHead's loss on batched head outputs (mmdet3d's loss_by_feat).

    ``outputs`` maps the model's output names to (B, C, H, W) maps, e.g.
    ``dict(zip(model.output_names, model(pillars, coords)))``; ``targets`` is
    ``collate`` of the batch's ``targets``. Returns 'task{t}.heatmap' and
    'task{t}.bbox' per task and their sum as 'total'.
    """
    tasks = cfg.head.tasks
    if len(code_weights) != 10:
        raise ValueError(f"code_weights needs one weight per box-target column (10), got {len(code_weights)}")
    if len(targets) != len(tasks):
        raise ValueError(f"{len(targets)} task targets for {len(tasks)} tasks")
    needed = [f"task{t}.{h}" for t in range(len(tasks)) for h in ("heatmap", *BOX_HEADS)]
    missing = [n for n in needed if n not in outputs]
    if missing:
        raise KeyError(f"outputs lack {', '.join(missing)}")

    losses: dict[str, torch.Tensor] = {}
    for t, target in enumerate(targets):
        logits = outputs[f"task{t}.heatmap"]
        device = logits.device
        heat_target = target["heatmap"].to(device)
        if heat_target.shape != logits.shape:
            raise ValueError(f"task{t}: heatmap target {tuple(heat_target.shape)} vs output {tuple(logits.shape)}")
        # avg_factor: peak cells over the whole batch (a host number in mmdet3d too).
        num_pos = heat_target.eq(1).float().sum().item()
        focal = gaussian_focal_loss(clip_sigmoid(logits), heat_target)
        losses[f"task{t}.heatmap"] = heatmap_weight * (focal.sum() / (max(num_pos, 1) + _AVG_EPS))

        box_target = target["boxes"].to(device)
        inds = target["inds"].to(device)
        masks = target["mask"].to(device)
        num = masks.float().sum()
        pred = torch.cat([outputs[f"task{t}.{h}"] for h in BOX_HEADS], dim=1)
        pred = pred.permute(0, 2, 3, 1).contiguous()
        pred = pred.view(pred.size(0), -1, pred.size(3))
        pred = pred.gather(1, inds.unsqueeze(2).expand(inds.size(0), inds.size(1), pred.size(2)))
        mask = masks.unsqueeze(2).expand_as(box_target).float()
        # mmdet3d's NaN guard; it zeroes the weight, but |pred - NaN| * 0 is still NaN.
        mask = mask * (~torch.isnan(box_target)).float()
        bbox_weights = mask * mask.new_tensor(code_weights)
        losses[f"task{t}.bbox"] = _l1_loss(pred, box_target, bbox_weights, num + 1e-4, bbox_weight)
    losses["total"] = sum(losses.values())
    return losses


def oracle_outputs(cfg, tasks: Sequence[TaskTargets]) -> dict[str, np.ndarray]:
    """Head outputs (batch 1) that decode exactly to the targets' boxes: heatmap logits
    of +-10 at and off the object centres, the box targets at the centre cells. The
    upper bound an evaluation pipeline must score perfectly."""
    w, h = feature_map_size(cfg)
    split = np.cumsum([0, *(cfg.head.common_heads[name][0] for name in BOX_HEADS)])
    outputs = {}
    for t, tt in enumerate(tasks):
        on = tt.mask.bool()
        outputs[f"task{t}.heatmap"] = torch.where(tt.heatmap == 1, 10.0, -10.0)[None].numpy()
        maps = torch.zeros(len(CODE_WEIGHTS), h * w)
        maps[:, tt.inds[on]] = tt.boxes[on].T
        maps = maps.view(-1, h, w)[None].numpy()
        for name, lo, hi in zip(BOX_HEADS, split[:-1], split[1:]):
            outputs[f"task{t}.{name}"] = maps[:, lo:hi]
    return outputs
