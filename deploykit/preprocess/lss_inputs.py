"""BEVDepth inputs for one frame: the release's (two key frames of images and their
matrices) and the engine's (current images, the previous key frame's cached depth and
context, the ego motion between the two).

The ego motion is the previous key ego -> current key ego transform BEVDepth's
dataset puts into the previous frame's sensor2ego_mats (global2keyego @
prevego2global @ sensor2ego), here one pose per frame for all cameras.
"""

from __future__ import annotations

import numpy as np
import torch

from ..samples import Sample
from .camera_inputs import normalize_images, synthetic_images


def ego_motion_matrix(dx: float, dy: float, dyaw_deg: float) -> np.ndarray:
    """(4, 4) previous ego -> current ego, for a previous pose (dx, dy) metres and dyaw
    degrees off the current one (in the current ego frame)."""
    yaw = np.radians(dyaw_deg)
    out = np.eye(4)
    out[:2, :2] = [[np.cos(yaw), -np.sin(yaw)], [np.sin(yaw), np.cos(yaw)]]
    out[:2, 3] = [dx, dy]
    return out


def _state(model, img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        depth, context = model.key_frame_state(torch.from_numpy(img))
    return depth.numpy(), np.ascontiguousarray(context.numpy())


def sample_inputs(cfg, seed: int, model=None, first_frame: bool | None = None) -> Sample:
    """Even seeds are a scene's first frame (the release fuses it with itself), odd ones a
    later frame whose previous key frame is ~0.5 s (2-8 m, a few degrees) behind."""
    from ..models.bevdepth import rig_mats

    first = seed % 2 == 0 if first_frame is None else first_frame
    rng = np.random.default_rng(seed)
    h, w = cfg.image_size
    cur = normalize_images(synthetic_images(cfg.num_cams, h, w, seed), cfg.img_mean, cfg.img_std)
    prev = cur if first else normalize_images(synthetic_images(cfg.num_cams, h, w, seed + 7919), cfg.img_mean,
                                               cfg.img_std)
    motion = np.eye(4) if first else ego_motion_matrix(-rng.uniform(2, 8), rng.uniform(-0.5, 0.5),
                                                       rng.uniform(-4, 4))
    ego_motion = np.broadcast_to(motion.astype(np.float32), (1, cfg.num_cams, 4, 4)).copy()
    rig = rig_mats(cfg)
    key = rig["sensor2ego"][:, 0]
    reference = {
        "sweep_imgs": np.stack([cur, prev], 1)[:, :cfg.keys],
        # As the release's dataset: the previous key frame's cameras in the current ego frame
        # (multiplied in float32 torch, as the engine multiplies them).
        "sensor2ego_mats": np.stack([key, (torch.from_numpy(ego_motion) @ torch.from_numpy(key)).numpy()],
                                    1)[:, :cfg.keys],
        "intrin_mats": np.repeat(rig["intrin"], cfg.keys, 1),
        "ida_mats": np.repeat(rig["ida"], cfg.keys, 1),
        "bda_mat": rig["bda"],
    }
    feeds = dict(reference)
    if model is not None and hasattr(model, "key_frame_state"):
        feeds = {"img": cur}
        if cfg.keys == 2:
            prev_depth, prev_context = _state(model, prev)
            if first:  # nothing cached yet: the engine ignores these (use_prev = 0)
                prev_depth, prev_context = np.zeros_like(prev_depth), np.zeros_like(prev_context)
            feeds.update(prev_depth=prev_depth, prev_context=prev_context, ego_motion=ego_motion,
                         use_prev=np.array([0.0 if first else 1.0], np.float32))
    return Sample(feeds, reference, {"seed": seed, "first_frame": first})


def synthetic_scene(cfg, scene: str, frames: int, seed: int) -> list:
    """``frames`` consecutive key frames (0.5 s apart) of one drive: the ego moves ~4 m
    and turns 2 degrees per key frame; images differ per frame."""
    from ..temporal.two_key import KeyFrame

    rng = np.random.default_rng(seed)
    pose = ego_motion_matrix(*rng.uniform(-500, 500, 2), rng.uniform(-180, 180))
    out = []
    for i in range(frames):
        if i:
            pose = pose @ ego_motion_matrix(rng.uniform(3, 5), rng.uniform(-0.2, 0.2), 2.0)
        img = normalize_images(synthetic_images(cfg.num_cams, *cfg.image_size, seed * 100 + i), cfg.img_mean,
                               cfg.img_std)
        out.append(KeyFrame(img, pose.copy(), scene, i))
    return out
