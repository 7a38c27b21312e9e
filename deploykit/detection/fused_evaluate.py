"""Score a fused model on labelled synthetic frames: detection mAP/NDS and occupancy mIoU.

A frame is the ray-cast LiDAR scene (deploykit.preprocess.synthetic_lidar) with its
boxes, the occupancy the scene voxelises to (deploykit.detection.occupancy) and the
camera stream's synthetic images; the images carry no objects, so the camera stream
adds no information here (its weights stay synthetic: the LiDAR stream, fusion and
heads are what is trained and scored). Each frame is a scene's first: no previous BEV.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from .decode import Boxes

# Synthetic scene class -> the names a recipe may call it.
_ALIASES = {"cyclist": ("cyclist", "bicycle")}


def detection_class_names(cfg) -> list[str]:
    det = cfg.detection
    if hasattr(det, "head"):
        return [n for task in det.head.tasks for n in task.class_names]
    return list(det.class_names)


def occupancy_grid(cfg):
    from .occupancy import OccGrid

    return OccGrid(tuple(cfg.occ.range), tuple(cfg.occ.size))


def labelled_scenes(recipe, model, seeds) -> list[tuple]:
    """(Sample, ground-truth Boxes, points per box, occupancy labels (Dx, Dy, Dz)) per seed."""
    from ..errors import RecipeError
    from ..models import pillar_format
    from ..preprocess.camera_inputs import sample_inputs as camera_inputs
    from ..preprocess.pillar_inputs import pillar_inputs, sample_scene
    from ..preprocess.synthetic_lidar import CLASSES
    from ..samples import Sample
    from .evaluate import points_in_boxes
    from .occupancy import scene_occupancy

    cfg = recipe.model
    names = detection_class_names(cfg)
    to_recipe = np.array([next((names.index(a) for a in _ALIASES.get(c, (c,)) if a in names), -1) for c in CLASSES])
    if (to_recipe < 0).all():
        raise RecipeError(f"{recipe.name} detects none of the synthetic scene classes ({', '.join(CLASSES)})")
    grid = occupancy_grid(cfg)
    pillars = pillar_format(model)
    out = []
    for seed in seeds:
        scene = sample_scene(cfg.lidar, int(seed))
        lidar = pillar_inputs(scene.points, cfg.lidar, *pillars)
        camera = camera_inputs(cfg.camera, int(seed), first_frame=True)
        labels = to_recipe[scene.labels]
        b = scene.boxes[labels >= 0].astype(np.float64)
        gt = Boxes(b[:, :3], b[:, 3:6], b[:, 6], np.ones(len(b)), labels[labels >= 0])
        occ = scene_occupancy(scene, grid, cfg.occ.class_names)
        out.append((Sample({**camera.feeds, **lidar.feeds}, {}, {"seed": int(seed)}), gt,
                    points_in_boxes(scene.points, b), occ))
    return out


def evaluate(recipe, scenes: list[tuple], predict: Callable[[dict], dict]) -> dict:
    """Detection mAP (and NDS) of the recipe's post-processed boxes, and occupancy mIoU of
    the argmax of the occupancy logits, over ``labelled_scenes``."""
    from ..models import ARCHITECTURES
    from .evaluate import nuscenes_metrics
    from .nuscenes_map import mean_ap
    from .occupancy import occupancy_argmax, occupancy_miou

    cfg = recipe.model
    postprocess = ARCHITECTURES[recipe.arch].postprocess
    boxes, occ_pred = [], []
    for sample, _, _, _ in scenes:
        outputs = predict(sample.feeds)
        boxes.append(postprocess(cfg, outputs))
        occ_pred.append(occupancy_argmax(outputs["occupancy"][0]))
    result = mean_ap([gt for _, gt, _, _ in scenes], boxes, detection_class_names(cfg),
                     gt_num_points=[n for _, _, n, _ in scenes])
    full = nuscenes_metrics(cfg, [(gt, n) for _, gt, n, _ in scenes], boxes)
    occupancy = occupancy_miou(occ_pred, [o for _, _, _, o in scenes], cfg.occ.num_classes,
                               free_class=cfg.occ.num_classes - 1, class_names=list(cfg.occ.class_names))
    occupancy.pop("confusion", None)
    # NaN (a class in neither ground truth nor prediction) is not JSON: None.
    occupancy["per_class"] = {name: (None if np.isnan(iou) else float(iou))
                              for name, iou in zip(cfg.occ.class_names, occupancy["per_class"].values())}
    return {**result, "NDS": full["NDS"], "tp_errors": full["tp_errors"], "nuscenes": full,
            "mIoU": occupancy["mIoU"], "occupancy": occupancy}
