"""Camera frames to BEVDepth's network input, as its test-time dataset makes it.

BEVDepth's NuscDetDataset (is_train False) opens each image with PIL, resizes it to
(int(W * r), int(H * r)) with r = max(fH / H, fW / W) (PIL's default filter,
bicubic), crops (crop_w, crop_h, crop_w + fW, crop_h + fH) with crop_h = newH - fH
(bot_pct_lim 0) and crop_w centred, then mmcv.imnormalize(to_rgb=True): on PIL's RGB
that swaps to B, G, R before subtracting the RGB means (``swap_rb``). Its ida
matrix is this resize and crop (deploykit.models.bevdepth.rig_mats).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import InputError


def release_ida(raw: tuple[int, int], final: tuple[int, int]) -> tuple[float, tuple[int, int]]:
    """(resize, (crop top, crop left)) BEVDepth's test-time augmentation picks for raw
    (H, W) images and the network's (fH, fW)."""
    (h, w), (fh, fw) = raw, final
    resize = max(fh / h, fw / w)
    new_w, new_h = int(w * resize), int(h * resize)
    return resize, (new_h - fh, int(max(0, new_w - fw) / 2))


def ida_warnings(cfg, raw: tuple[int, int]) -> list[str]:
    resize, crop = release_ida(raw, cfg.image_size)
    if abs(resize - cfg.image_scale) > 1e-9 or tuple(crop) != tuple(cfg.image_crop):
        return [f"the recipe resizes {raw[0]}x{raw[1]} images by {cfg.image_scale:g} and crops {tuple(cfg.image_crop)}"
                f"; BEVDepth's test pipeline would resize by {resize:g} and crop {crop} for {tuple(cfg.image_size)}: "
                "the checkpoint saw that geometry"]
    return []


def _read(path: Path, size: tuple[int, int]):
    from PIL import Image, UnidentifiedImageError

    if not Path(path).is_file():
        raise InputError(f"{path}: no such image file; expected a JPEG or PNG camera image")
    try:
        image = Image.open(path)
        image.load()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise InputError(f"{path}: not a readable image ({type(exc).__name__}: {exc})") from None
    if image.mode != "RGB":
        image = image.convert("RGB")
    if (image.height, image.width) != tuple(size):
        raise InputError(f"{path} is {image.height}x{image.width} but the rig's raw images are {size[0]}x{size[1]}: "
                         "give images of the rig's size, or a rig calibrated for yours")
    return image


def lss_camera_input(paths, cfg, rig) -> np.ndarray:
    """(1, N, 3, fH, fW) float32 from one image per rig camera (in the rig's order)."""
    paths = list(paths)
    if len(paths) != cfg.num_cams:
        raise InputError(f"got {len(paths)} camera images but the checkpoint takes {cfg.num_cams}")
    raw_h, raw_w = rig.image_size
    fh, fw = cfg.image_size
    top, left = cfg.image_crop
    new_w, new_h = int(raw_w * cfg.image_scale), int(raw_h * cfg.image_scale)
    if new_h - top < fh or new_w - left < fw or top < 0 or left < 0:
        raise InputError(f"{raw_h}x{raw_w} images resized by {cfg.image_scale:g} ({new_h}x{new_w}) and cropped at "
                         f"(top {top}, left {left}) cannot give the network's {fh}x{fw}: fix [model] image_scale / "
                         "image_crop for this rig")
    mean, std_inv = np.asarray(cfg.img_mean, np.float64), 1.0 / np.asarray(cfg.img_std, np.float64)
    out = np.empty((1, len(paths), 3, fh, fw), np.float32)
    for k, path in enumerate(paths):
        image = _read(path, (raw_h, raw_w)).resize((new_w, new_h)).crop((left, top, left + fw, top + fh))
        arr = np.asarray(image, dtype=np.float32)
        if cfg.swap_rb:
            arr = arr[..., ::-1]
        # mmcv.imnormalize: cv2.subtract the mean, cv2.multiply by 1 / std, in float32.
        arr = (arr - mean.astype(np.float32)) * std_inv.astype(np.float32)
        out[0, k] = arr.transpose(2, 0, 1)
    return out


def key_frame(frame, cfg, rig):
    """The two-key runner's KeyFrame of one SensorFrame: images in the rig's camera order,
    the ego pose per camera (each camera's own timestamp, as BEVDepth's dataset uses)."""
    from ..temporal.two_key import KeyFrame

    by_name = {c.name: c for c in frame.cameras}
    missing = [n for n in rig.names if n not in by_name]
    if missing:
        raise InputError(f"frame {frame.token} of scene {frame.scene} has no image for {', '.join(missing)} "
                         f"(it has {', '.join(by_name) or 'none'}); the rig {rig.name} needs {', '.join(rig.names)}")
    cams = [by_name[n] for n in rig.names]
    img = lss_camera_input([c.path for c in cams], cfg, rig)
    poses = np.stack([c.ego2global for c in cams]).astype(np.float64)
    return KeyFrame(img, poses, frame.scene, frame.index)
