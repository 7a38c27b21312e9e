"""Train a fused BEVFusion recipe's LiDAR stream, fusion and heads on synthetic scenes.

The stand-in weights (deploykit.synthetic_checkpoint) exercise every op but detect
nothing and call every voxel free, so they cannot say what quantization costs in mAP
or mIoU. This trains the model from ``deploykit.models.build_model`` (the original,
un-rewritten one) starting from those weights, on deploykit's ray-cast LiDAR scenes
(deploykit.preprocess.synthetic_lidar) with their boxes and the occupancy they voxelise
to (deploykit.detection.occupancy), in minutes on a CPU.

What is trained. The camera stream (img_backbone, img_neck, pts_bbox_head: BEVFormer's
BEV encoder) stays frozen at its synthetic weights, in eval mode: the synthetic camera
images are colour fields that carry no objects, so there is nothing for it to learn, and
training it would only fit noise. Since it is frozen and deterministic, each pool frame's
camera BEV is computed once. Everything after it trains: the LiDAR stream
(pts_voxel_encoder, pts_backbone, pts_neck; pts_middle_encoder has no weights), the fuse
module, the DETR detection head and the occupancy head, their BatchNorms in train mode.

Data. A fixed pool of scenes, seeds ``POOL_SEED + seed * 100_000 + i`` (far from the
held-out EVAL_SEED = 7_000_000, the check seeds 1000+, the int16 search 1100+, the
calibration sets 5000+ and the stand-in weights' BN samples 10_000+), ray cast once, each
with its own synthetic camera frame (a scene's first frame: no previous BEV, as the
evaluation's). Every step draws frames from the pool and augments the LiDAR side with
mmdet3d's RandomFlip3D (both axes) and GlobalRotScaleTrans' rotation (+-22.5 degrees),
recomputing the occupancy labels from the moved boxes. GlobalRotScaleTrans' scaling is
left out: scaling z would lift the ground plane off the fixed height the occupancy
labels put it at. The camera BEV is not augmented; it has no objects to move.

Losses, as the released heads train:

* Detection: BEVFormer's DETR set loss. HungarianAssigner3D matches queries to boxes per
  frame (scipy's linear_sum_assignment) on cost = 2.0 * FocalLossCost + 0.25 *
  BBox3DL1Cost, the L1 taken over the first 8 entries of the box code; then a sigmoid
  focal loss (alpha 0.25, gamma 2, weight 2.0) on every query's class logits, one-hot on
  the matched ones, and an L1 loss (weight 0.25) on the matched boxes' codes weighted by
  ``det_head.code_weights``, both divided by the number of boxes. The code is BEVFormer's
  normalize_bbox of the box in mmdet3d 0.17's convention, exactly what
  deploykit.detection.decode.decode_bevformer inverts (``encode_boxes``): (cx, cy, log w,
  log l, cz, log h, sin rot, cos rot, vx, vy), centres in metres (normalize_bbox does not
  scale them, and the model's bbox_preds are denormalised the same way). Velocity
  targets are 0: the scenes are static. Only the last decoder layer's predictions are
  supervised: the deployed decoder does not compute the earlier layers' class scores, so
  BEVFormer's auxiliary per-layer losses are not available.
* Occupancy: FlashOcc's cross-entropy over every voxel of the grid, with its class
  weights 1 / log(frequency + 0.001), the frequencies counted over the pool's labels
  (FlashOcc hard-codes nuScenes'), averaged over voxels as mmdet's CrossEntropyLoss does.
  Free space is about three quarters of the voxels; the weights temper that without
  the over-prediction of rare classes that inverse-frequency weights cause. The loss is
  scaled by ``occ_weight`` = 40: with weights between 1/16 and 1/8 and most voxels easy,
  the per-voxel mean is a few hundred times smaller than the DETR losses, and the head
  then learns little beyond the ground layers in the minutes this trains (trial runs,
  scored on 20 held-out scenes: weight 1 predicted no object voxels at all, 10 left
  pedestrians at IoU 0.0, 20 at 0.16, 40 reached 0.30 with detection mAP unharmed).

Heading: the synthetic boxes are plain cuboids at uniformly random yaw, so a box and its
180-degree turn give the same points; no model can tell the front from the back, and
nuScenes' orientation error (mAOE, full circle for these classes) stays near pi / 2 however
well the box axis is found. NDS is capped accordingly.

AdamW with BEVFormer's linear warm-up (from a third of the rate) and cosine decay, and
its gradient clipping (max norm 35).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..detection import fused_evaluate
from ..detection.occupancy import scene_occupancy
from ..preprocess.camera_inputs import sample_inputs as camera_inputs
from ..preprocess.pillar_inputs import pillar_inputs, sample_scene
from ..preprocess.synthetic_lidar import CLASSES, Scene
from ..progress import track
from .centerpoint import ROT_RANGE

POOL_SEED = 3_000_000
FROZEN = ("img_backbone", "img_neck", "pts_bbox_head")

# BEVFormer's HungarianAssigner3D and loss weights (bevformer_base.py).
FOCAL_ALPHA, FOCAL_GAMMA = 0.25, 2.0
CLS_COST_WEIGHT, REG_COST_WEIGHT = 2.0, 0.25
CLS_LOSS_WEIGHT, BBOX_LOSS_WEIGHT = 2.0, 0.25
# The assigner's L1 cost leaves out the velocities, whose targets it would not trust.
COST_CODE = 8


@dataclass
class TrainConfig:
    steps: int = 2000
    batch_size: int = 4
    scenes: int = 400  # ray-cast pool; each step augments draws from it
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup: int = 100
    min_lr_ratio: float = 1e-3
    grad_clip: float = 35.0
    occ_weight: float = 40.0
    seed: int = 0
    threads: int = 2
    log_every: int = 50


# ------------------------------------------------------------------ box codes


def encode_boxes(boxes: np.ndarray, velocity: np.ndarray | None = None) -> np.ndarray:
    """(K, 10) regression targets of (K, 7) boxes (x, y, z_centre, l, w, h, yaw in deploykit's
    1.x convention): BEVFormer's normalize_bbox of the 0.17 box, the inverse of decode_bevformer.
    mmdet3d's 1.x refactor swapped l and w and turned yaw into -yaw_0x - pi/2, so the 0.17 box
    has (w, l) = (l_1x, w_1x) in decode's naming and rot = -yaw - pi/2."""
    b = np.asarray(boxes, np.float64).reshape(-1, 7)
    rot = -b[:, 6] - np.pi / 2
    vel = np.zeros((len(b), 2)) if velocity is None else np.asarray(velocity, np.float64).reshape(-1, 2)
    return np.stack([b[:, 0], b[:, 1], np.log(b[:, 4]), np.log(b[:, 3]), b[:, 2], np.log(b[:, 5]),
                     np.sin(rot), np.cos(rot), vel[:, 0], vel[:, 1]], 1).astype(np.float32)


# ------------------------------------------------------------------ matching and losses


def match_cost(cls_logits: torch.Tensor, bbox: torch.Tensor, labels: torch.Tensor,
               codes: torch.Tensor) -> torch.Tensor:
    """(Q, K) HungarianAssigner3D cost of query q for box k: FocalLossCost (weight 2.0) plus
    BBox3DL1Cost (weight 0.25) on the first 8 code entries."""
    eps = 1e-12  # FocalLossCost's
    p = cls_logits.sigmoid()
    neg = -(1 - p + eps).log() * (1 - FOCAL_ALPHA) * p.pow(FOCAL_GAMMA)
    pos = -(p + eps).log() * FOCAL_ALPHA * (1 - p).pow(FOCAL_GAMMA)
    cls_cost = (pos - neg)[:, labels]
    reg_cost = torch.cdist(bbox[:, :COST_CODE], codes[:, :COST_CODE], p=1)
    return CLS_COST_WEIGHT * cls_cost + REG_COST_WEIGHT * reg_cost


def hungarian_match(cls_logits: torch.Tensor, bbox: torch.Tensor, labels: torch.Tensor,
                    codes: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(query indices, box indices) of the minimum-cost one-to-one assignment."""
    from scipy.optimize import linear_sum_assignment

    if len(labels) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    with torch.no_grad():
        cost = match_cost(cls_logits, bbox, labels, codes).double()
    # As the assigner does: a NaN or infinite prediction must not break the assignment.
    cost = torch.nan_to_num(cost, nan=100.0, posinf=100.0, neginf=-100.0).numpy()
    rows, cols = linear_sum_assignment(cost)
    return rows.astype(np.int64), cols.astype(np.int64)


def sigmoid_focal_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mmdet's py_sigmoid_focal_loss, summed."""
    p = logits.sigmoid()
    pt = (1 - p) * target + p * (1 - target)
    weight = (FOCAL_ALPHA * target + (1 - FOCAL_ALPHA) * (1 - target)) * pt.pow(FOCAL_GAMMA)
    return (F.binary_cross_entropy_with_logits(logits, target, reduction="none") * weight).sum()


def detection_loss(cls_scores: torch.Tensor, bbox_preds: torch.Tensor, targets: list[tuple[torch.Tensor, torch.Tensor]],
                   code_weights: torch.Tensor) -> dict[str, torch.Tensor]:
    """BEVFormer's loss_single over a batch: cls_scores (B, Q, C) logits, bbox_preds (B, Q, 10),
    targets per frame (labels (K,), codes (K, 10))."""
    cls_target = torch.zeros_like(cls_scores)
    pred, want = [], []
    for b, (labels, codes) in enumerate(targets):
        q, k = hungarian_match(cls_scores[b], bbox_preds[b], labels, codes)
        q, k = torch.from_numpy(q), torch.from_numpy(k)
        cls_target[b, q, labels[k]] = 1.0
        pred.append(bbox_preds[b, q])
        want.append(codes[k])
    num_pos = max(sum(len(labels) for labels, _ in targets), 1)
    pred, want = torch.cat(pred), torch.cat(want)
    l1 = ((pred - want).abs() * code_weights).sum()
    return {"cls": CLS_LOSS_WEIGHT * sigmoid_focal_loss(cls_scores, cls_target) / num_pos,
            "bbox": BBOX_LOSS_WEIGHT * l1 / num_pos}


def occupancy_class_weights(counts: np.ndarray) -> torch.Tensor:
    """FlashOcc's class_weights: 1 / log(voxel count + 0.001)."""
    return torch.from_numpy(1.0 / np.log(np.asarray(counts, np.float64) + 0.001)).float()


def occupancy_loss(logits: torch.Tensor, labels: torch.Tensor, class_weights: torch.Tensor) -> torch.Tensor:
    """logits (B, Dx, Dy, Dz, C), labels (B, Dx, Dy, Dz): class-weighted cross-entropy, averaged
    over voxels (mmdet's CrossEntropyLoss: not divided by the weights' sum, as torch's would)."""
    c = logits.shape[-1]
    return F.cross_entropy(logits.reshape(-1, c), labels.reshape(-1), weight=class_weights,
                           reduction="none").mean()


# ------------------------------------------------------------------ data


@dataclass
class Frame:
    """A pool entry: the ray-cast scene and its frozen camera BEV (H*W, C)."""

    scene: Scene
    camera_bev: torch.Tensor


def freeze_camera_stream(model) -> list[torch.nn.Parameter]:
    """Freeze the camera stream (eval mode, no grad); returns the parameters that train."""
    for name in FROZEN:
        module = getattr(model, name)
        module.eval()
        for p in module.parameters():
            p.requires_grad_(False)
    return [p for p in model.parameters() if p.requires_grad]


def set_train_mode(model) -> None:
    model.train()
    for name in FROZEN:
        getattr(model, name).eval()


def camera_bev(model, cfg, seed: int) -> torch.Tensor:
    feeds = {k: torch.from_numpy(v) for k, v in camera_inputs(cfg.camera, seed, first_frame=True).feeds.items()}
    with torch.no_grad():
        return model.camera_bev(feeds["img"], feeds["can_bus"], feeds["shift"], feeds["prev_bev"],
                                feeds["use_prev_bev"])[0]


def frame_pool(model, cfg, seeds, *, progress: bool = True) -> list[Frame]:
    was_training = model.training
    model.eval()
    pool = [Frame(sample_scene(cfg.lidar, int(s)), camera_bev(model, cfg, int(s)))
            for s in track(list(seeds), "ray cast scenes, camera BEVs", quiet=not progress)]
    model.train(was_training)
    return pool


def augment(scene: Scene, rng: np.random.Generator, rot_range=ROT_RANGE) -> Scene:
    """The scene after mmdet3d's RandomFlip3D (both axes) and GlobalRotScaleTrans' rotation."""
    points, boxes = scene.points.copy(), scene.boxes.copy()
    if rng.random() < 0.5:  # mirror y
        points[:, 1] *= -1
        boxes[:, 1] *= -1
        boxes[:, 6] = -boxes[:, 6]
    if rng.random() < 0.5:  # mirror x
        points[:, 0] *= -1
        boxes[:, 0] *= -1
        boxes[:, 6] = np.pi - boxes[:, 6]
    angle = rng.uniform(*rot_range)
    c, s = math.cos(angle), math.sin(angle)
    rot = np.array([[c, -s], [s, c]], np.float32)
    points[:, :2] = points[:, :2] @ rot.T
    boxes[:, :2] = boxes[:, :2] @ rot.T
    boxes[:, 6] = (boxes[:, 6] + angle + np.pi) % (2 * np.pi) - np.pi
    return Scene(points, boxes, scene.labels.copy())


def recipe_labels(cfg) -> np.ndarray:
    """Synthetic scene class -> the recipe's detection class index (-1: not detected), as
    fused_evaluate.labelled_scenes maps them."""
    names = fused_evaluate.detection_class_names(cfg)
    aliases = fused_evaluate._ALIASES  # one table of the names a synthetic class may take
    return np.array([next((names.index(a) for a in aliases.get(c, (c,)) if a in names), -1) for c in CLASSES])


@dataclass
class Batch:
    camera_bev: torch.Tensor  # (B, H*W, C)
    pillars: list[np.ndarray]
    coords: list[np.ndarray]
    det: list[tuple[torch.Tensor, torch.Tensor]]  # per frame: labels (K,), codes (K, 10)
    occupancy: torch.Tensor  # (B, Dx, Dy, Dz) int64


def make_batch(cfg, frames: list[Frame], rng: np.random.Generator | None) -> Batch:
    """``rng`` None: the frames as they are, no augmentation."""
    grid = fused_evaluate.occupancy_grid(cfg)
    to_recipe = recipe_labels(cfg)
    r = cfg.camera.pc_range
    pillars, coords, det, occ = [], [], [], []
    for frame in frames:
        scene = frame.scene if rng is None else augment(frame.scene, rng)
        inputs = pillar_inputs(scene.points, cfg.lidar, "PNC")
        pillars.append(inputs.pillars_pnc)
        coords.append(inputs.coords)
        labels = to_recipe[scene.labels]
        b = scene.boxes
        # A rotation can carry a box centre out of the BEV, where no query can reach it.
        keep = (labels >= 0) & (b[:, 0] >= r[0]) & (b[:, 0] <= r[3]) & (b[:, 1] >= r[1]) & (b[:, 1] <= r[4])
        det.append((torch.from_numpy(labels[keep]).long(), torch.from_numpy(encode_boxes(b[keep]))))
        occ.append(torch.from_numpy(scene_occupancy(scene, grid, cfg.occ.class_names).astype(np.int64)))
    return Batch(torch.stack([f.camera_bev for f in frames]), pillars, coords, det, torch.stack(occ))


def forward_batch(model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(cls_scores, bbox_preds, occupancy) of a batch: the PFN on all pillars at once, one
    scatter per frame, then the model's own fuse and heads on the stacked BEVs."""
    feats = model.pts_voxel_encoder(torch.from_numpy(np.concatenate(batch.pillars)))
    canvases, start = [], 0
    for c in batch.coords:
        canvases.append(model.pts_middle_encoder(feats[:, :, start:start + len(c)], torch.from_numpy(c)))
        start += len(c)
    lidar = model.pts_neck(model.pts_backbone(torch.cat(canvases)))
    return model.heads(model.fuse(batch.camera_bev, lidar))


def losses(model, batch: Batch, class_weights: torch.Tensor,
           occ_weight: float = TrainConfig.occ_weight) -> dict[str, torch.Tensor]:
    cls_scores, bbox_preds, occupancy = forward_batch(model, batch)
    out = detection_loss(cls_scores, bbox_preds, batch.det, model.det_head.code_weights)
    out["occ"] = occ_weight * occupancy_loss(occupancy, batch.occupancy, class_weights)
    out["total"] = out["cls"] + out["bbox"] + out["occ"]
    return out


def pool_seeds(tc: TrainConfig) -> range:
    first = POOL_SEED + tc.seed * 100_000
    return range(first, first + tc.scenes)


def label_counts(cfg, frames: list[Frame]) -> np.ndarray:
    grid = fused_evaluate.occupancy_grid(cfg)
    n = cfg.occ.num_classes
    return sum(np.bincount(scene_occupancy(f.scene, grid, cfg.occ.class_names).reshape(-1), minlength=n)
               for f in frames)


# ------------------------------------------------------------------ training


def initial_model(recipe):
    """The original (un-rewritten) model with the recipe's synthetic stand-in weights."""
    from ..models import build_model
    from ..synthetic_checkpoint import synthetic_state_dict

    model = build_model(recipe)
    model.load_state_dict(synthetic_state_dict(recipe, 0))
    return model


def lr_factor(step: int, tc: TrainConfig) -> float:
    """BEVFormer's schedule: linear warm-up from 1/3, then cosine down to min_lr_ratio."""
    if step < tc.warmup:
        return 1 / 3 + (1 - 1 / 3) * step / tc.warmup
    t = (step - tc.warmup) / max(tc.steps - tc.warmup, 1)
    return tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def train(recipe, *, steps: int = TrainConfig.steps, seed: int = TrainConfig.seed,
          log_every: int = TrainConfig.log_every, progress: bool = True, model=None,
          **overrides) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Train ``recipe``'s fused model from its synthetic weights (or ``model``, trained in place);
    ``overrides`` are further TrainConfig fields. Returns (state_dict, log)."""
    tc = TrainConfig(steps=steps, seed=seed, log_every=log_every, **overrides)
    cfg = recipe.model
    torch.manual_seed(tc.seed)
    torch.set_num_threads(tc.threads)
    rng = np.random.default_rng(tc.seed)
    model = initial_model(recipe) if model is None else model
    frozen_before = {k: v.clone() for k, v in model.state_dict().items() if k.split(".")[0] in FROZEN}
    params = freeze_camera_stream(model)

    start = time.perf_counter()
    seeds = pool_seeds(tc)
    pool = frame_pool(model, cfg, seeds, progress=progress)
    counts = label_counts(cfg, pool)
    class_weights = occupancy_class_weights(counts)
    pool_s = time.perf_counter() - start

    opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, tc))
    set_train_mode(model)
    history, running, window = [], {}, 0
    start = time.perf_counter()
    for step in track(range(tc.steps), "train", quiet=not progress):
        chosen = [pool[i] for i in rng.choice(len(pool), min(tc.batch_size, len(pool)), replace=False)]
        batch = make_batch(cfg, chosen, rng)
        loss = losses(model, batch, class_weights, tc.occ_weight)
        opt.zero_grad()
        loss["total"].backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
        opt.step()
        sched.step()
        for k, v in loss.items():
            running[k] = running.get(k, 0.0) + float(v.detach())
        running["grad_norm"] = running.get("grad_norm", 0.0) + float(grad_norm)
        window += 1
        if (step + 1) % tc.log_every == 0 or step + 1 == tc.steps:
            history.append({"step": step + 1, "lr": sched.get_last_lr()[0],
                            **{k: v / window for k, v in running.items()}})
            running, window = {}, 0
    train_s = time.perf_counter() - start
    model.eval()

    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    changed = [k for k, v in frozen_before.items() if not torch.equal(v, state[k])]
    if changed:
        raise AssertionError(f"the frozen camera stream changed in training: {changed[:5]}")
    names = list(cfg.occ.class_names)
    log = {"config": asdict(tc), "pool": {"first_seed": seeds.start, "scenes": len(seeds)},
           "frozen": list(FROZEN), "trained": [n for n, m in model.named_children()
                                               if n not in FROZEN and any(True for _ in m.parameters())],
           "occupancy_voxels": dict(zip(names, (int(c) for c in counts))),
           "occupancy_class_weights": dict(zip(names, (float(w) for w in class_weights))),
           "seconds": {"pool": round(pool_s, 1), "train": round(train_s, 1)},
           "history": history}
    return state, log


def evaluate_model(recipe, model, scenes: int = 50, first_seed: int | None = None) -> dict:
    """Float mAP, NDS and occupancy mIoU on held-out labelled scenes (fused_evaluate)."""
    from ..detection.evaluate import EVAL_SEED
    from ..samples import torch_outputs

    first = EVAL_SEED if first_seed is None else first_seed
    model.eval()
    labelled = fused_evaluate.labelled_scenes(recipe, model, range(first, first + scenes))
    return fused_evaluate.evaluate(recipe, labelled, lambda feeds: torch_outputs(model, feeds))
