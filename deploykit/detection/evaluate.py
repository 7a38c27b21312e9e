"""Score a detector against ground truth: nuScenes-style mAP on labelled synthetic scenes.

Fidelity numbers (SQNR, agreement with the float model) say how far a
quantized model moved; mAP says whether that mattered. Ground truth exists only
where deploykit makes the scene itself: CenterPoint recipes on ray-cast LiDAR
(deploykit.preprocess.synthetic_lidar). Detections go through the recipe's
post-processing (decode, then CenterPoint's circle NMS per task) as a deployed
detector's would.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from .decode import Boxes, circle_nms, decode_centerpoint
from .nuscenes_map import mean_ap

# Held-out scenes: far from the training pool (seed * 1e6 + i), the check samples and the calibration sets.
EVAL_SEED = 7_000_000


def centerpoint_detections(cfg, outputs: dict[str, np.ndarray]) -> Boxes:
    """Decoded boxes after circle NMS per task, when the recipe sets ``[model.head] min_radius``."""
    boxes = decode_centerpoint(cfg, outputs)
    head = cfg.head
    if not head.min_radius:
        return boxes
    parts, first = [], 0
    for task, radius in zip(head.tasks, head.min_radius):
        mine = (boxes.labels >= first) & (boxes.labels < first + len(task.class_names))
        parts.append(circle_nms(boxes.take(mine), radius, head.post_max_size))
        first += len(task.class_names)
    return Boxes.concat(parts)


def points_in_boxes(points: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """(K,) LiDAR points inside each (x, y, z_centre, l, w, h, yaw) box."""
    if not len(boxes):
        return np.zeros(0, np.int64)
    d = points[None, :, :3].astype(np.float64) - boxes[:, None, :3]
    c, s = np.cos(boxes[:, 6])[:, None], np.sin(boxes[:, 6])[:, None]
    local = np.stack([c * d[..., 0] + s * d[..., 1], c * d[..., 1] - s * d[..., 0], d[..., 2]], -1)
    return (np.abs(local) <= boxes[:, None, 3:6] / 2).all(-1).sum(1)


def labelled_scenes(recipe, model, seeds) -> list[tuple]:
    """(Sample, ground-truth Boxes, points per box) for each seed."""
    from ..errors import RecipeError
    from ..models import pillar_format
    from ..preprocess.pillar_inputs import pillar_inputs, sample_scene
    from ..preprocess.synthetic_lidar import CLASSES
    from ..samples import Sample

    cfg = recipe.model
    names = class_names(cfg)
    # Scene classes by name into the recipe's label order; those it does not detect are dropped.
    to_recipe = np.array([names.index(c) if c in names else -1 for c in CLASSES])
    if (to_recipe < 0).all():
        raise RecipeError(f"{recipe.name} detects none of the synthetic scene classes ({', '.join(CLASSES)})")
    out = []
    for seed in seeds:
        scene = sample_scene(cfg, int(seed))
        inputs = pillar_inputs(scene.points, cfg, *pillar_format(model))  # takes the features it needs
        labels = to_recipe[scene.labels]
        b = scene.boxes[labels >= 0].astype(np.float64)
        gt = Boxes(b[:, :3], b[:, 3:6], b[:, 6], np.ones(len(b)), labels[labels >= 0])
        out.append((Sample(inputs.feeds, {}, {"seed": int(seed)}), gt, points_in_boxes(scene.points, b)))
    return out


def class_names(cfg) -> list[str]:
    return [name for task in cfg.head.tasks for name in task.class_names]


def evaluate(recipe, scenes: list[tuple], predict: Callable[[dict], dict]) -> dict:
    """mAP of ``predict`` (engine feeds -> named outputs) on ``labelled_scenes``, and under
    "nuscenes" the full nuScenes metrics (TP errors, NDS; NDS also at the top): the scenes'
    headings and sizes are known, so orientation and scale errors show where mAP cannot."""
    cfg = recipe.model
    preds = [centerpoint_detections(cfg, predict(sample.feeds)) for sample, _, _ in scenes]
    result = mean_ap([gt for _, gt, _ in scenes], preds, class_names(cfg), gt_num_points=[n for _, _, n in scenes])
    full = nuscenes_metrics(cfg, [(gt, n) for _, gt, n in scenes], preds)
    return {**result, "NDS": full["NDS"], "tp_errors": full["tp_errors"], "nuscenes": full}


# Static synthetic objects: the attributes nuScenes gives such boxes (a synthetic cyclist rides).
_STATIC_ATTRIBUTE = {"car": "vehicle.parked", "pedestrian": "pedestrian.standing", "bicycle": "cycle.with_rider"}


def nuscenes_metrics(cfg, ground_truth: list[tuple[Boxes, np.ndarray]], predictions: list[Boxes]) -> dict:
    """The nuScenes evaluation of LiDAR-frame predictions on synthetic ground truth
    ((Boxes, points per box) per scene; static objects, the sensor at the origin)."""
    from ..data.frames import Annotation, yaw_quaternion
    from .nuscenes_eval import evaluate_nuscenes
    from .submission import boxes_to_nuscenes, evaluation_classes, nuscenes_class_names

    names = nuscenes_class_names(cfg)
    eye = np.eye(4)
    gt, preds, ego = {}, {}, {}
    for i, ((boxes, points), pred) in enumerate(zip(ground_truth, predictions)):
        token = f"synthetic-{i}"
        gt[token] = [Annotation(f"{token}-{k}", boxes.centers[k], boxes.dims[k, [1, 0, 2]], yaw_quaternion(boxes.yaw[k]),
                                np.zeros(2), names[int(boxes.labels[k])],
                                _STATIC_ATTRIBUTE.get(names[int(boxes.labels[k])], ""), int(points[k]))
                     for k in range(len(boxes))]
        preds[token] = boxes_to_nuscenes(pred, names, token, eye, eye)
        ego[token] = np.zeros(3)
    return evaluate_nuscenes(gt, preds, ego, class_names=evaluation_classes(cfg))
