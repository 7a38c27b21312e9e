"""A user's data as frames: nuScenes-layout datasets, point files, camera frame directories."""

import json

import numpy as np
import pytest
from PIL import Image

from deploykit.data.points import write_points_bin
from deploykit.data.sources import camera_frame, camera_warnings, lidar_feeds, open_source
from deploykit.preprocess.pillar_inputs import PillarFormat
from deploykit.errors import InputError
from deploykit.preprocess.camera_inputs import synthetic_images
from deploykit.preprocess.pillar_inputs import sample_scene
from deploykit.recipe import load_recipe


@pytest.fixture(scope="module")
def synth():
    return load_recipe("centerpoint_pillar_synth")


def test_nuscenes_source_keeps_scene_order_and_ground_truth(nuscenes_dir, synth):
    src = open_source(nuscenes_dir, synth)
    assert src.kind == "nuscenes" and src.has_ground_truth and len(src.frames) == 8
    assert [(f.scene, f.index) for f in src.frames] == [(s, i) for s in src.scenes() for i in range(4)]
    one = open_source(nuscenes_dir, synth, scenes=[src.scenes()[1]])
    assert {f.scene for f in one.frames} == {src.scenes()[1]}
    with pytest.raises(InputError, match="scene scene-9999 is not in"):
        open_source(nuscenes_dir, synth, scenes=["scene-9999"])


def test_multi_sweep_recipe_gets_the_sweeps_and_single_sweep_none(nuscenes_dir, synth):
    nus = load_recipe("centerpoint_pillar_nus")
    assert any(open_source(nuscenes_dir, nus).frames[-1].sweeps)
    assert not any(f.sweeps for f in open_source(nuscenes_dir, synth).frames)


def test_a_directory_of_kitti_bins_is_one_scene_in_name_order(tmp_path, synth):
    for i in (2, 0, 1):
        pts = sample_scene(synth.model, i).points[:, :4]  # x, y, z, reflectance 0-1: KITTI's layout
        write_points_bin(tmp_path / f"{i:06d}.bin", pts)
    src = open_source(tmp_path, synth)
    assert src.kind == "points" and [f.token for f in src.frames] == ["000000", "000001", "000002"]
    assert not src.has_ground_truth
    feeds, points, warnings = lidar_feeds(src.frames[1], synth.model, PillarFormat("CNP"))
    assert feeds["pillars"].shape == (1, 11, 16, 6000) and (feeds["coords"][:, -1] >= 0).sum() > 100
    np.testing.assert_array_equal(points[:, 4], 0)  # KITTI has no dt: a single sweep
    single = open_source(tmp_path / "000000.bin", synth)
    assert len(single.frames) == 1 and single.frames[0].scene == "000000"


def test_ring_index_in_an_npy_is_refused(tmp_path, synth):
    pts = sample_scene(synth.model, 0).points.copy()
    pts[:, 4] = np.arange(len(pts)) % 32  # a ring index where dt belongs
    np.save(tmp_path / "sweep.npy", pts)
    frame = open_source(tmp_path / "sweep.npy", synth).frames[0]
    with pytest.raises(InputError, match="ring index"):
        lidar_feeds(frame, synth.model, PillarFormat("CNP"))


def test_camera_frame_directories(tmp_path):
    bev = load_recipe("bevformer_small")
    from deploykit.camera.rig import load_rig

    rig = load_rig(bev.model.rig)
    images = synthetic_images(6, 900, 1600, seed=3).astype(np.uint8)
    for i in range(2):
        d = tmp_path / "frames" / f"{i:03d}"
        d.mkdir(parents=True)
        for name, img in zip(rig.names, images):
            Image.fromarray(img).save(d / f"{name}.jpg")
        (d / "ego_pose.json").write_text(json.dumps({"translation": [10.0 + i, 5.0, 0.0], "rotation": [1, 0, 0, 0]}))
    src = open_source(tmp_path / "frames", bev)
    assert src.kind == "cameras" and len(src.frames) == 2 and not camera_warnings(src)
    f = camera_frame(src.frames[1], bev.model, rig)
    assert f.img.shape == (1, 6, 3, 96, 160) and f.can_bus[0] == 11.0 and f.index == 1
    (tmp_path / "frames" / "001" / "CAM_BACK.jpg").unlink()
    with pytest.raises(InputError, match="has no image for CAM_BACK"):
        camera_frame(open_source(tmp_path / "frames", bev).frames[1], bev.model, rig)
    for d in (tmp_path / "frames").iterdir():
        (d / "ego_pose.json").unlink()
    assert "no ego_pose.json" in camera_warnings(open_source(tmp_path / "frames", bev))[0]


def test_nothing_there(tmp_path, synth):
    with pytest.raises(InputError, match="does not exist"):
        open_source(tmp_path / "none", synth)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no point-cloud files"):
        open_source(tmp_path / "empty", synth)
    with pytest.raises(InputError, match="no frame sub-directories"):
        open_source(tmp_path / "empty", load_recipe("bevformer_small"))
