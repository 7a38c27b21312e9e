"""read_image / camera_input / image_looks_like_noise.

camera_input is compared with BEVFormer's test pipeline written out with the
libraries it runs on (cv2.imread BGR, mmcv.imnormalize's cvtColor / subtract /
multiply, mmcv.imresize = cv2.resize INTER_LINEAR, mmcv.impad_to_multiple):
within 1e-4 on normalised values. The numpy resize alone is held to cv2 within
1e-4 on 0-255 values (opencv-python's default IPP path) and 0.02 with IPP off.
"""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest
from PIL import Image

from deploykit.data.images import camera_input, image_looks_like_noise, read_image, resize_bilinear
from deploykit.errors import InputError
from deploykit.preprocess.camera_inputs import synthetic_images
from deploykit.recipe import load_recipe

RIG = (900, 1600)  # the bundled nuscenes_surround rig's raw image size


@pytest.fixture(scope="module")
def bev():
    return load_recipe("bevformer_small").model  # 96x160 input, image_scale 0.1, 6 cameras


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    """Six 900x1600 synthetic camera frames saved as PNG (lossless), and the arrays."""
    out = tmp_path_factory.mktemp("cams")
    images = synthetic_images(6, *RIG, seed=5).round().astype(np.uint8)
    paths = []
    for k, img in enumerate(images):
        paths.append(out / f"cam{k}.png")
        Image.fromarray(img).save(paths[-1], compress_level=1)
    return paths, images


def _bevformer_reference(paths, cfg) -> np.ndarray:
    """LoadMultiViewImageFromFiles(to_float32) -> NormalizeMultiviewImage(to_rgb) ->
    RandomScaleImageMultiViewImage([scale]) -> PadMultiViewImage(32), with cv2."""
    mean = np.float64(np.array(cfg.img_mean, np.float32).reshape(1, -1))
    stdinv = 1 / np.float64(np.array(cfg.img_std, np.float32).reshape(1, -1))
    out = []
    for path in paths:
        img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED).astype(np.float32)
        cv2.cvtColor(img, cv2.COLOR_BGR2RGB, img)
        cv2.subtract(img, mean, img)
        cv2.multiply(img, stdinv, img)
        h, w = int(img.shape[0] * cfg.image_scale), int(img.shape[1] * cfg.image_scale)
        img = cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)
        ph, pw = -(-h // 32) * 32, -(-w // 32) * 32
        padded = np.zeros((ph, pw, 3), np.float32)
        padded[:h, :w] = img
        out.append(padded.transpose(2, 0, 1))
    return np.stack(out)[None]


def test_camera_input_matches_bevformer_pipeline(bev, frames):
    paths, images = frames
    ours = camera_input(paths, bev, RIG)
    assert ours.shape == (1, 6, 3, 96, 160) and ours.dtype == np.float32
    ref = _bevformer_reference(paths, bev)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4)
    assert not ours[..., 90:, :].any()  # 90 rows scaled, 6 rows of zero padding
    # Arrays (RGB) give the same tensor as the files; the rig itself can stand for its size.
    from deploykit.camera.rig import load_rig

    np.testing.assert_array_equal(camera_input(list(images), bev, load_rig(bev.rig)), ours)


def test_camera_input_non_integer_scale_with_padding(bev, frames):
    paths, _ = frames
    cfg = dataclasses.replace(bev, image_size=(96, 128), image_scale=0.075)  # 67x120 -> 96x128
    ours = camera_input(paths, cfg, RIG)
    np.testing.assert_allclose(ours, _bevformer_reference(paths, cfg), rtol=0, atol=1e-4)


@pytest.mark.parametrize("src, dst", [((900, 1600), (540, 960)), ((900, 1600), (450, 800)), ((900, 1600), (90, 160)),
                                      ((37, 53), (80, 111)), ((50, 64), (50, 31)), ((7, 9), (3, 4))])
def test_resize_matches_cv2_inter_linear(src, dst):
    img = np.random.default_rng(0).uniform(0, 255, (*src, 3)).astype(np.float32)
    ours = resize_bilinear(img, dst)
    np.testing.assert_allclose(ours, cv2.resize(img, dst[::-1], interpolation=cv2.INTER_LINEAR), rtol=0, atol=1e-4)
    use_ipp = cv2.ipp.useIPP()
    try:
        cv2.ipp.setUseIPP(False)  # OpenCV's own C++ path rounds coordinates to float first
        plain = cv2.resize(img, dst[::-1], interpolation=cv2.INTER_LINEAR)
    finally:
        cv2.ipp.setUseIPP(use_ipp)
    np.testing.assert_allclose(ours, plain, rtol=0, atol=0.02)


def test_read_image_modes(tmp_path):
    rgb = synthetic_images(1, 40, 64, seed=1)[0].round().astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    out = read_image(tmp_path / "rgb.png")
    assert out.dtype == np.float32 and out.shape == (40, 64, 3)
    np.testing.assert_array_equal(out, rgb)
    # Same pixels as mmcv's cv2.imread (BGR) turned to RGB.
    np.testing.assert_array_equal(out, cv2.imread(str(tmp_path / "rgb.png"))[..., ::-1])

    Image.fromarray(rgb[..., 0]).save(tmp_path / "gray.png")
    gray = read_image(tmp_path / "gray.png")
    np.testing.assert_array_equal(gray, np.repeat(rgb[..., :1], 3, axis=2))
    rgba = np.concatenate([rgb, np.full((40, 64, 1), 7, np.uint8)], axis=2)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(read_image(tmp_path / "rgba.png"), rgb)  # alpha dropped

    Image.fromarray(rgb).save(tmp_path / "rgb.jpg", quality=95)
    # JPEG: Pillow's and OpenCV's libjpeg builds may round the IDCT differently.
    diff = np.abs(read_image(tmp_path / "rgb.jpg") - cv2.imread(str(tmp_path / "rgb.jpg"))[..., ::-1])
    assert diff.max() <= 4 and diff.mean() < 0.5


def test_read_image_failures(tmp_path):
    with pytest.raises(InputError, match=r"missing.jpg: no such image file"):
        read_image(tmp_path / "missing.jpg")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(InputError, match=r"broken.jpg: not a readable image .*expected a JPEG or PNG"):
        read_image(tmp_path / "broken.jpg")
    Image.fromarray(np.zeros((8, 8), np.uint16) + 4000).save(tmp_path / "deep.png")
    with pytest.raises(InputError, match=r"deep.png: a I;16 \(16-bit or float\) image; BEVFormer takes 8-bit RGB"):
        read_image(tmp_path / "deep.png")


def test_camera_input_size_checks(bev, frames):
    paths, images = frames
    with pytest.raises(InputError, match=r"got 5 camera images but the checkpoint takes 6"):
        camera_input(paths[:5], bev, RIG)
    small = [img[:720, :1280] for img in images]
    with pytest.raises(InputError, match=r"image 0 is 720x1280 but the rig's raw images are 900x1600, which "
                                         r"image_scale 0.1 takes to the network's 96x160"):
        camera_input(small, bev, RIG)
    # 512x960 at scale 0.6 without the recipe's crop: 900x1600 gives 540x960 -> 544x960
    npu = dataclasses.replace(load_recipe("bevformer_npu").model, image_crop=(0, 0))
    with pytest.raises(InputError, match=r"raw 900x1600 images scaled by 0.6 give 540x960, padded to 544x960, but "
                                         r"the checkpoint's image_size is 512x960: set image_size = \[544, 960\]$"):
        camera_input(paths, npu, RIG)  # no single scale gives 512x960 from 900x1600
    assert camera_input(paths, load_recipe("bevformer_npu").model, RIG).shape[-2:] == (512, 960)  # with the crop
    twice = dataclasses.replace(bev, image_scale=0.2)
    with pytest.raises(InputError, match=r"give 180x320, padded to 192x320, but the checkpoint's image_size is "
                                         r"96x160: set image_size = \[192, 320\], or an image_scale from 0.0807 to "
                                         r"below 0.1006"):
        camera_input(paths, twice, RIG)
    with pytest.raises(InputError, match=r"image 2 must be \(H, W, 3\) RGB, got shape \[900, 1600\]"):
        camera_input([*images[:2], images[2][..., 0], *images[3:]], bev, RIG)


def test_noise_detector():
    rng = np.random.default_rng(0)
    noise = rng.uniform(0, 255, (96, 160, 3))
    assert image_looks_like_noise(noise)
    assert image_looks_like_noise(noise.transpose(2, 0, 1))  # (C, H, W) too
    for img in synthetic_images(6, 96, 160, seed=3):
        assert not image_looks_like_noise(img)
    assert not image_looks_like_noise(np.full((32, 32, 3), 128.0))  # flat: no variation, not noise


def test_image_crop_cuts_the_resized_images_and_shifts_the_projection(bev, frames):
    """image_crop (top, left) removes rows and columns after resizing; lidar2img moves the
    projected pixels by the same amount, so image and BEV sampling stay registered."""
    from deploykit.camera.rig import load_rig

    paths, _ = frames
    full = camera_input(paths, bev, RIG)  # 90x160 resized, padded to 96x160
    cropped_cfg = dataclasses.replace(bev, image_crop=(26, 0), image_size=(64, 160))
    cropped = camera_input(paths, cropped_cfg, RIG)
    assert cropped.shape == (1, 6, 3, 64, 160)
    np.testing.assert_array_equal(cropped[..., :64, :], full[..., 26:90, :])
    cam = load_rig("nuscenes_surround").cameras[0]
    p = np.array([12.0, 3.0, 0.4, 1.0])
    a, b = cam.lidar2img(0.1) @ p, cam.lidar2img(0.1, (26, 0)) @ p
    np.testing.assert_allclose(b[:2] / b[2], a[:2] / a[2] - [0.0, 26.0], atol=1e-9)
    with pytest.raises(InputError, match="cropped by 26 rows"):
        camera_input(paths, dataclasses.replace(cropped_cfg, image_size=(96, 160)), RIG)
