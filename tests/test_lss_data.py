"""BEVDepth on a user's data: its image transform, detect and calibration over key frames."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from deploykit.data.lss_images import ida_warnings, lss_camera_input, release_ida
from deploykit.data.synthetic_nuscenes import write_synthetic_nuscenes
from deploykit.errors import InputError
from deploykit.camera.rig import load_rig


def test_release_test_time_ida():
    """BEVDepth's sample_ida_augmentation (is_train False) for nuScenes at 256x704."""
    assert release_ida((900, 1600), (256, 704)) == (0.44, (140, 0))
    assert release_ida((900, 1600), (64, 192)) == (0.12, (44, 0))


def test_image_transform_is_the_release_one(tmp_path, lss_recipe):
    """PIL resize (bicubic) and crop, then mmcv.imnormalize(to_rgb=True) on PIL's RGB: the
    network gets B, G, R minus the RGB means, divided by the RGB stds."""
    cfg = lss_recipe.model
    rig = load_rig(cfg.rig)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(cfg.num_cams):
        arr = rng.integers(0, 256, (*rig.image_size, 3), dtype=np.uint8)
        arr[:, :, 0] = 250  # a red cast: the swap must show
        paths.append(tmp_path / f"cam{i}.png")
        Image.fromarray(arr).save(paths[-1])
    got = lss_camera_input(paths, cfg, rig)
    image = Image.open(paths[2]).resize((192, 108), Image.BICUBIC).crop((0, 44, 192, 108))
    bgr = np.asarray(image, np.float32)[..., ::-1]
    want = ((bgr - np.float32(cfg.img_mean)) * (1 / np.float64(cfg.img_std)).astype(np.float32)).transpose(2, 0, 1)
    assert got.shape == (1, cfg.num_cams, 3, 64, 192)
    np.testing.assert_allclose(got[0, 2], want, atol=1e-5)
    assert ida_warnings(cfg, rig.image_size) == []


def test_wrong_image_size_is_named(tmp_path, lss_recipe):
    cfg = lss_recipe.model
    paths = []
    for i in range(cfg.num_cams):
        paths.append(tmp_path / f"cam{i}.png")
        Image.fromarray(np.zeros((450, 800, 3), np.uint8)).save(paths[-1])
    with pytest.raises(InputError, match="450x800 but the rig's raw images are 900x1600"):
        lss_camera_input(paths, cfg, load_rig(cfg.rig))


@pytest.fixture(scope="module")
def nuscenes_cameras(tmp_path_factory):
    return write_synthetic_nuscenes(tmp_path_factory.mktemp("nus") / "data", scenes=2, samples_per_scene=3,
                                    sweeps_between=0, seed=4)


def test_detect_runs_key_frames_in_scene_order(tmp_path, lss_converted_dir, nuscenes_cameras):
    from deploykit.detect import detect

    result = detect(lss_converted_dir, nuscenes_cameras, tmp_path / "out", quiet=True)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["frames"] == 6 and len(summary["scenes"]) == 2
    submission = json.loads((tmp_path / "out" / "detections.json").read_text())
    assert len(submission["results"]) == 6 and submission["meta"]["use_camera"]
    assert len(list((tmp_path / "out" / "bev").glob("*.png"))) == 6
    assert result.metrics is not None  # the synthetic dataset is annotated


def test_calibration_from_data_holds_key_frames(tmp_path, lss_recipe, lss_converted_dir, nuscenes_cameras):
    from deploykit.quantize.calib_set import calib, load_calib_set
    from deploykit.temporal.two_key import TwoKeyRunner

    out = calib(lss_recipe, tmp_path / "calib", source=nuscenes_cameras, samples=6, frames_per_scene=3, quiet=True)
    manifest = json.loads((lss_converted_dir / "manifest.json").read_text())
    inputs = [{k: i[k] for k in ("name", "shape", "dtype")} for i in manifest["inputs"]]
    made = load_calib_set(out, recipe=lss_recipe.name, inputs=inputs, runner=TwoKeyRunner)
    assert made.temporal and len(made) == 6
    sample = next(iter(made))
    assert set(sample.arrays) == {"img", "ego2global"} and sample.arrays["ego2global"].shape == (6, 4, 4)
    assert [e["index"] for e in made.entries] == [0, 1, 2, 0, 1, 2]


def test_a_gap_in_a_scene_starts_cold_with_a_warning(lss_converted_dir, nuscenes_cameras):
    from deploykit.data.sources import open_source
    from deploykit.detect import Predictor, open_model_dir
    from deploykit.engines.ort import build

    md = open_model_dir(lss_converted_dir)
    frames = open_source(nuscenes_cameras, md.recipe).frames
    predictor = Predictor(md.recipe, build(md.onnx), rig=md.rig)
    first = predictor(frames[0])
    assert not any("missing" in w for w in first.warnings)
    third = predictor(frames[2])  # frame 1 left out
    assert any("frame 2 follows frame 0" in w and "starts cold" in w for w in third.warnings)
    cold = Predictor(md.recipe, build(md.onnx), rig=md.rig)(frames[2])
    np.testing.assert_allclose(third.boxes.scores, cold.boxes.scores, rtol=1e-6)
