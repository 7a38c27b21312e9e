"""Train a CenterPoint-PointPillars recipe on synthetic LiDAR scenes.

Synthetic stand-in weights exercise every op but detect nothing, so they
cannot say what quantization costs in mAP. This trains the same network on
deploykit's ray-cast scenes (deploykit.preprocess.synthetic_lidar) with
mmdet3d's CenterHead targets and losses and its nuScenes augmentation (global
rotation +-22.5 degrees, scaling 0.95-1.05, flips about both axes), in minutes
on a CPU. The scenes are ray cast once into a pool; every step draws from it
with fresh augmentation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..detection import centerpoint_targets as ct
from ..preprocess.pillar_inputs import pillar_inputs, sample_scene
from ..preprocess.synthetic_lidar import Scene
from ..progress import track

ROT_RANGE = (-0.3925, 0.3925)  # mmdet3d nuScenes GlobalRotScaleTrans
SCALE_RANGE = (0.95, 1.05)


@dataclass
class TrainConfig:
    steps: int = 1500
    batch_size: int = 4
    scenes: int = 800  # ray-cast pool; each step augments a draw from it
    lr: float = 2e-3
    weight_decay: float = 0.01
    seed: int = 0
    threads: int = 2
    log_every: int = 50


def scene_pool(cfg, seeds, *, progress: bool = True) -> list[Scene]:
    return [sample_scene(cfg, int(s)) for s in track(list(seeds), "ray cast scenes", quiet=not progress)]


def augment(scene: Scene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Points and boxes after mmdet3d's RandomFlip3D (both axes) and GlobalRotScaleTrans."""
    points, boxes = scene.points.copy(), scene.boxes.copy()
    if rng.random() < 0.5:  # horizontal flip: mirror y
        points[:, 1] *= -1
        boxes[:, 1] *= -1
        boxes[:, 6] = -boxes[:, 6]
    if rng.random() < 0.5:  # vertical flip: mirror x
        points[:, 0] *= -1
        boxes[:, 0] *= -1
        boxes[:, 6] = np.pi - boxes[:, 6]
    angle = rng.uniform(*ROT_RANGE)
    c, s = math.cos(angle), math.sin(angle)
    rot = np.array([[c, -s], [s, c]], np.float32)
    points[:, :2] = points[:, :2] @ rot.T
    boxes[:, :2] = boxes[:, :2] @ rot.T
    boxes[:, 6] += angle
    scale = rng.uniform(*SCALE_RANGE)
    points[:, :3] *= scale
    boxes[:, :6] *= scale
    boxes[:, 6] = (boxes[:, 6] + np.pi) % (2 * np.pi) - np.pi
    return points, boxes


def forward_batch(model, pillars: list[np.ndarray], coords: list[np.ndarray]) -> dict[str, torch.Tensor]:
    """The model on a batch: the PFN on all pillars at once, one scatter per sample.
    (The deployed model, like the engine, takes one sample.)"""
    feats = model.pts_voxel_encoder(torch.from_numpy(np.concatenate(pillars)))
    canvases, start = [], 0
    for c in coords:
        canvases.append(model.pts_middle_encoder(feats[:, :, start:start + len(c)], torch.from_numpy(c)))
        start += len(c)
    bev = model.pts_neck(model.pts_backbone(torch.cat(canvases)))
    return dict(zip(model.output_names, model.pts_bbox_head(bev)))


def make_batch(cfg, scenes: list[Scene], rng: np.random.Generator):
    pillars, coords, targets = [], [], []
    for scene in scenes:
        points, boxes = augment(scene, rng)
        inputs = pillar_inputs(points, cfg, "PNC")
        pillars.append(inputs.pillars_pnc)
        coords.append(inputs.coords)
        targets.append(ct.targets(cfg, boxes, scene.labels))
    return pillars, coords, ct.collate(targets)


def train(model, cfg, tc: TrainConfig, *, progress: bool = True) -> list[dict]:
    """Train ``model`` in place; returns the loss history (one entry per ``log_every`` steps)."""
    torch.manual_seed(tc.seed)
    torch.set_num_threads(tc.threads)
    rng = np.random.default_rng(tc.seed)
    pool = scene_pool(cfg, range(tc.seed * 1_000_000, tc.seed * 1_000_000 + tc.scenes), progress=progress)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    # mmdet3d trains CenterPoint with a one-cycle schedule; so does this.
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=tc.lr, total_steps=tc.steps, pct_start=0.4)
    model.train()
    history, running = [], {}
    for step in track(range(tc.steps), "train", quiet=not progress):
        chosen = [pool[i] for i in rng.choice(len(pool), tc.batch_size, replace=False)]
        pillars, coords, targets = make_batch(cfg, chosen, rng)
        losses = ct.loss(cfg, forward_batch(model, pillars, coords), targets)
        opt.zero_grad()
        losses["total"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 35.0)  # mmdet3d's grad_clip for CenterPoint
        opt.step()
        sched.step()
        for k, v in losses.items():
            running[k] = running.get(k, 0.0) + float(v.detach())
        if (step + 1) % tc.log_every == 0 or step + 1 == tc.steps:
            n = tc.log_every if (step + 1) % tc.log_every == 0 else (step + 1) % tc.log_every
            history.append({"step": step + 1, "lr": sched.get_last_lr()[0], **{k: v / n for k, v in running.items()}})
            running = {}
    model.eval()
    return history
