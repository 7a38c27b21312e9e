"""Camera images to BEVFormer's network input, as its nuScenes test pipeline makes it.

BEVFormer's test pipeline is LoadMultiViewImageFromFiles(to_float32=True) ->
NormalizeMultiviewImage(mean, std, to_rgb=True) ->
RandomScaleImageMultiViewImage(scales=[image_scale]) ->
PadMultiViewImage(size_divisor=32). ``camera_input`` does the same steps in
that order: normalise, resize by mmcv.imresize's rule (cv2 INTER_LINEAR,
reimplemented here in numpy so the library needs no OpenCV), zero-pad
bottom/right. mmcv reads BGR and to_rgb swaps it, so the network sees RGB;
Pillow reads RGB directly, and ``img_mean``/``img_std`` are in RGB order.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..errors import InputError

SIZE_DIVISOR = 32  # PadMultiViewImage(size_divisor=32)
# Adjacent-pixel correlation below which an image is treated as noise: white noise
# sits near 0, photographs and deploykit's synthetic frames above 0.8.
NOISE_CORRELATION = 0.3


def read_image(path: str | Path) -> np.ndarray:
    """(H, W, 3) float32 RGB in 0-255 from a JPEG/PNG (any format Pillow reads).

    Grayscale, palette and RGBA images become RGB (alpha dropped, as cv2's
    IMREAD_COLOR does); EXIF orientation is not applied, as cv2 does not.
    JPEG decoders may differ from OpenCV's by a level or two per pixel.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such image file; expected a JPEG or PNG camera image")
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                raise InputError(f"{path}: a {image.mode} (16-bit or float) image; BEVFormer takes 8-bit RGB: "
                                 "convert it to 8 bits per channel")
            rgb = image if image.mode == "RGB" else image.convert("RGB")
            return np.asarray(rgb, dtype=np.float32)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise InputError(f"{path}: not a readable image ({type(exc).__name__}: {exc}); "
                         "expected a JPEG or PNG camera image") from None


def camera_input(images, cfg, rig_image_size: tuple[int, int]) -> np.ndarray:
    """(1, N, 3, H, W) float32 network input from N images (paths or (H, W, 3) RGB arrays).

    ``cfg`` is a BEVFormerConfig; ``rig_image_size`` (H, W) the rig's raw image
    size (or the CameraRig), which every image must have, because the rig's
    intrinsics are for it.
    """
    rig_image_size = getattr(rig_image_size, "image_size", rig_image_size)
    images = list(images)
    if len(images) != cfg.num_cams:
        raise InputError(f"got {len(images)} camera images but the checkpoint takes {cfg.num_cams} "
                         f"(one per rig camera, in the rig's order)")
    raw_h, raw_w = (int(v) for v in rig_image_size)
    scaled, padded = check_network_size((raw_h, raw_w), cfg)
    top, left = getattr(cfg, "image_crop", (0, 0))
    kept = (scaled[0] - top, scaled[1] - left)
    out = np.zeros((1, len(images), 3, *padded), np.float32)
    for k, image in enumerate(images):
        rgb = read_image(image) if isinstance(image, (str, Path)) else _as_rgb(image, k)
        if rgb.shape[:2] != (raw_h, raw_w):
            raise InputError(
                f"image {k} is {rgb.shape[0]}x{rgb.shape[1]} but the rig's raw images are {raw_h}x{raw_w}, "
                f"which image_scale {cfg.image_scale:g} takes to the network's {padded[0]}x{padded[1]}: give "
                f"{raw_h}x{raw_w} images, or a rig calibrated for yours"
            )
        normalised = normalize(rgb, cfg.img_mean, cfg.img_std)
        resized = resize_bilinear(normalised, scaled)[top:, left:]
        out[0, k, :, : kept[0], : kept[1]] = resized.transpose(2, 0, 1)  # padding stays 0
    return out


def check_network_size(raw: tuple[int, int], cfg) -> tuple[tuple[int, int], tuple[int, int]]:
    """(scaled, padded) (H, W) of ``raw`` images through the recipe's resize, crop
    (``image_crop`` (top, left) rows and columns cut after resizing) and padding to a
    multiple of 32; an InputError when that is not the network's ``image_size``."""
    scaled = scaled_size(raw, cfg.image_scale)
    top, left = getattr(cfg, "image_crop", (0, 0))
    padded = tuple(math.ceil((s - c) / SIZE_DIVISOR) * SIZE_DIVISOR for s, c in zip(scaled, (top, left)))
    if padded != tuple(cfg.image_size):
        raise InputError(_size_mismatch(raw, scaled, padded, cfg))
    return scaled, padded


def scaled_size(size: tuple[int, int], scale: float) -> tuple[int, int]:
    """(H, W) after RandomScaleImageMultiViewImage: int() truncates the scaled size."""
    return int(size[0] * scale), int(size[1] * scale)


def normalize(image: np.ndarray, mean, std) -> np.ndarray:
    """(H, W, 3) RGB minus mean, times 1/std, as mmcv.imnormalize (it multiplies by the inverse)."""
    mean = np.asarray(mean, np.float32)
    stdinv = (1.0 / np.asarray(std, np.float32).astype(np.float64)).astype(np.float32)
    return (image.astype(np.float32) - mean) * stdinv


def resize_bilinear(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W, C) float32 resized to ``size`` (h, w) like cv2.resize(INTER_LINEAR) on float32.

    Half-pixel centres, taps clamped at the border, no antialiasing; rows are
    interpolated first, then columns, in float32. This matches opencv-python's
    default build (which resizes float32 through Intel IPP on x86) to ~5e-5 on
    0-255 values, and OpenCV without IPP to ~0.01. (cv2 takes its area path for
    an exact 2x reduction, which averages the same four pixels.)
    """
    if image.shape[:2] == tuple(size):
        return image.astype(np.float32, copy=True)
    x0, x1, fx = _linear_taps(image.shape[1], size[1])
    y0, y1, fy = _linear_taps(image.shape[0], size[0])
    image = image.astype(np.float32, copy=False)
    rows = image[:, x0] * (1 - fx)[None, :, None] + image[:, x1] * fx[None, :, None]
    return rows[y0] * (1 - fy)[:, None, None] + rows[y1] * fy[:, None, None]


def image_looks_like_noise(image: np.ndarray, threshold: float = NOISE_CORRELATION) -> bool:
    """True when neighbouring pixels are nearly uncorrelated, as in white noise.

    Calibration frames that are noise give an int8 engine activation ranges no
    real camera produces. Takes (H, W), (H, W, C) or (C, H, W); a flat image is
    not noise (it has no variation to correlate).
    """
    gray = _gray(np.asarray(image, np.float64))
    corr = [_correlation(gray[:, :-1], gray[:, 1:]), _correlation(gray[:-1], gray[1:])]
    corr = [c for c in corr if c is not None]
    return bool(corr) and float(np.mean(corr)) < threshold


def _linear_taps(src: int, dst: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # Source coordinate (d + 0.5) * src / dst - 0.5 and its fraction in double, as
    # OpenCV's IPP path does; its own C++ path rounds the coordinate to float first,
    # which moves weights by up to 6e-5 at coordinates near 1000.
    scale = 1.0 / (dst / src)
    f = (np.arange(dst) + 0.5) * scale - 0.5
    i0 = np.floor(f).astype(np.int64)
    frac = (f - i0).astype(np.float32)
    low, high = i0 < 0, i0 >= src - 1
    frac[low | high] = 0
    i0 = np.clip(i0, 0, src - 1)
    return i0, np.minimum(i0 + 1, src - 1), frac


def _as_rgb(image, index: int) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise InputError(f"image {index} must be (H, W, 3) RGB, got shape {list(image.shape)}")
    if not np.issubdtype(image.dtype, np.number) or not np.isfinite(image).all():
        raise InputError(f"image {index} holds NaN, Inf or non-numbers; expected RGB values in 0-255")
    return image.astype(np.float32, copy=False)


def _size_mismatch(raw, scaled, padded, cfg) -> str:
    want = tuple(cfg.image_size)
    crop = tuple(getattr(cfg, "image_crop", (0, 0)))
    cropped = f", cropped by {crop[0]} rows and {crop[1]} columns" if any(crop) else ""
    msg = (f"raw {raw[0]}x{raw[1]} images scaled by {cfg.image_scale:g} give {scaled[0]}x{scaled[1]}{cropped}, "
           f"padded to {padded[0]}x{padded[1]}, but the checkpoint's image_size is {want[0]}x{want[1]}: set "
           f"image_size = [{padded[0]}, {padded[1]}]")
    if any(crop):
        return msg + " or change image_crop"
    # pad32(int(n * s)) == m  <=>  m - 31 <= n * s < m + 1 (for m a multiple of 32)
    lo = max((m - SIZE_DIVISOR + 1) / n for m, n in zip(want, raw))
    hi = min((m + 1) / n for m, n in zip(want, raw))
    if lo < hi:
        msg += f", or an image_scale from {math.ceil(lo * 1e4) / 1e4:g} to below {hi:.4f}"
    return msg


def _gray(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        return image
    if image.ndim == 3 and image.shape[-1] in (1, 3, 4):
        return image[..., :3].mean(axis=-1)
    if image.ndim == 3 and image.shape[0] in (1, 3, 4):
        return image[:3].mean(axis=0)
    raise InputError(f"an image must be (H, W), (H, W, C) or (C, H, W), got shape {list(image.shape)}")


def _correlation(a: np.ndarray, b: np.ndarray) -> float | None:
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else None
