"""Camera-stream engine inputs: normalised multi-view images plus temporal state.

The synthetic frames are smooth colour fields with edges (not white noise), so
backbone activations and batch-norm statistics look like those of real images.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from ..samples import Sample


def synthetic_images(num_cams: int, height: int, width: int, seed: int) -> np.ndarray:
    """(N, H, W, 3) RGB float32 in [0, 255]."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    images = np.empty((num_cams, height, width, 3), np.float32)
    for cam in range(num_cams):
        img = np.full((height, width, 3), 110.0, np.float32)
        for _ in range(6):
            freq = rng.uniform(0.5, 6.0, size=2) * 2 * np.pi / np.array([width, height])
            phase = rng.uniform(0, 2 * np.pi)
            wave = np.sin(x * freq[0] + y * freq[1] + phase)
            img += wave[..., None] * rng.uniform(5, 30, size=3)
        for _ in range(4):  # boxes: sharp edges, like objects and lane marks
            h, w = rng.integers(height // 10, height // 3), rng.integers(width // 10, width // 3)
            top, left = rng.integers(0, height - h), rng.integers(0, width - w)
            img[top:top + h, left:left + w] = rng.uniform(0, 255, size=3)
        img += rng.normal(0, 4, size=img.shape).astype(np.float32)
        images[cam] = np.clip(img, 0, 255)
    return images


def normalize_images(images: np.ndarray, mean, std) -> np.ndarray:
    """(N, H, W, 3) RGB -> (1, N, 3, H, W) as BEVFormer's NormalizeMultiviewImage (to_rgb=True) gives."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise InputError(f"images must be (num_cams, H, W, 3) RGB, got shape {list(images.shape)}")
    if not np.isfinite(images).all():
        raise InputError("images contain NaN or Inf")
    out = (images.astype(np.float32) - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2)[None])


def synthetic_can_bus(rng: np.random.Generator) -> np.ndarray:
    """A plausible nuScenes can_bus vector, laid out as BEVFormer builds it from an ego
    pose (deploykit.data.can_bus): position, the rotation's w (four times), accel,
    rotation rate, velocity, then yaw in radians and degrees at [-2] and [-1]."""
    from ..data.can_bus import can_bus_from_pose
    from ..data.frames import yaw_quaternion

    position = rng.uniform(-500, 500, 3) * [1, 1, 0]
    yaw = rng.uniform(-np.pi, np.pi)
    fields = np.concatenate([rng.normal(0, 0.5, 3), rng.normal(0, 0.05, 3), [rng.uniform(0, 12), 0, 0]])
    return can_bus_from_pose(position, yaw_quaternion(yaw), fields)


def sample_inputs(cfg, seed: int, first_frame: bool | None = None) -> Sample:
    """Engine feeds for one frame. Even seeds are a scene's first frame (no previous
    BEV), odd seeds a later frame with a previous BEV and ego motion."""
    from ..temporal.ego_motion import EgoPose, bev_shift, relative_can_bus

    first = seed % 2 == 0 if first_frame is None else first_frame
    rng = np.random.default_rng(seed)
    img = normalize_images(synthetic_images(cfg.num_cams, *cfg.image_size, seed), cfg.img_mean, cfg.img_std)
    raw = synthetic_can_bus(rng)
    previous = None
    if not first:
        step = rng.uniform(0.5, 2.0) * np.array([np.cos(raw[16]), np.sin(raw[16]), 0.0])
        previous = EgoPose(raw[:3] - step, float(raw[17] - rng.uniform(-3, 3)))
    can_bus, _ = relative_can_bus(raw, previous)
    shift = bev_shift(can_bus, bev_h=cfg.bev_h, bev_w=cfg.bev_w, grid_length=cfg.grid_length)
    prev_bev = np.zeros((1, cfg.num_bev_queries, cfg.embed_dims), np.float32)
    if not first:
        # The previous BEV is a LayerNorm output: roughly unit scale per channel.
        prev_bev = rng.normal(0, 1, prev_bev.shape).astype(np.float32)
    feeds = {"img": img, "can_bus": can_bus[None].astype(np.float32), "shift": shift[None].astype(np.float32),
             "prev_bev": prev_bev, "use_prev_bev": np.array([0.0 if first else 1.0], np.float32)}
    return Sample(feeds, feeds, {"seed": seed, "first_frame": first})


def synthetic_scene(cfg, scene: str, frames: int, seed: int) -> list:
    """``frames`` consecutive camera frames of one drive: the ego moves ~1.5 m and
    turns 2 degrees per frame; images differ per frame."""
    from ..temporal.runner import Frame

    rng = np.random.default_rng(seed)
    start = synthetic_can_bus(rng)
    out = []
    for i in range(frames):
        bus = start.copy()
        bus[:2] += i * 1.5 * np.array([np.cos(bus[16]), np.sin(bus[16])])
        bus[16] += np.radians(2.0 * i)
        bus[17] += 2.0 * i
        img = normalize_images(synthetic_images(cfg.num_cams, *cfg.image_size, seed * 100 + i), cfg.img_mean,
                               cfg.img_std)
        out.append(Frame(img, bus, scene, i))
    return out
