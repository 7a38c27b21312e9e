"""rig_from_nuscenes: a deploykit rig from a nuScenes scene, in the LIDAR_TOP frame, equal to
what BEVFormer's converter computes from the devkit records."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from deploykit.camera.rig import load_rig
from deploykit.data.nuscenes import CAMERA_ORDER, NuScenesLayout
from deploykit.data.rig_from_nuscenes import rig_from_nuscenes, write_rig
from deploykit.data.synthetic_nuscenes import write_synthetic_nuscenes
from deploykit.errors import InputError

VERSION = "v1.0-mini"
SCENE = "scene-0103"
TOL = 1e-9


@pytest.fixture(scope="module")
def dataroot(tmp_path_factory) -> Path:
    return write_synthetic_nuscenes(tmp_path_factory.mktemp("nus") / "synthetic", seed=2)


@pytest.fixture(scope="module")
def rig(dataroot) -> dict:
    return rig_from_nuscenes(dataroot, SCENE)


@pytest.fixture(scope="module")
def rig_file(rig, tmp_path_factory) -> Path:
    return write_rig(tmp_path_factory.mktemp("rig") / "from_nuscenes.json", rig)


def ref_obtain_sensor2top(nusc, sensor_token, l2e_t, l2e_r_mat, e2g_t, e2g_r_mat):
    """Transcription of BEVFormer tools/data_converter/nuscenes_converter.py obtain_sensor2top."""
    from pyquaternion import Quaternion

    sd_rec = nusc.get("sample_data", sensor_token)
    cs_record = nusc.get("calibrated_sensor", sd_rec["calibrated_sensor_token"])
    pose_record = nusc.get("ego_pose", sd_rec["ego_pose_token"])
    l2e_r_s_mat = Quaternion(cs_record["rotation"]).rotation_matrix
    e2g_r_s_mat = Quaternion(pose_record["rotation"]).rotation_matrix
    l2e_t_s, e2g_t_s = cs_record["translation"], pose_record["translation"]
    R = (l2e_r_s_mat.T @ e2g_r_s_mat.T) @ (np.linalg.inv(e2g_r_mat).T @ np.linalg.inv(l2e_r_mat).T)
    T = (l2e_t_s @ e2g_r_s_mat.T + e2g_t_s) @ (np.linalg.inv(e2g_r_mat).T @ np.linalg.inv(l2e_r_mat).T)
    T -= e2g_t @ (np.linalg.inv(e2g_r_mat).T @ np.linalg.inv(l2e_r_mat).T) + l2e_t @ np.linalg.inv(l2e_r_mat).T
    return R.T, T


def ref_lidar2img(sensor2lidar_rotation, sensor2lidar_translation, intrinsic):
    """BEVFormer CustomNuScenesDataset.get_data_info lidar2img."""
    lidar2cam_r = np.linalg.inv(sensor2lidar_rotation)
    lidar2cam_t = sensor2lidar_translation @ lidar2cam_r.T
    lidar2cam_rt = np.eye(4)
    lidar2cam_rt[:3, :3] = lidar2cam_r.T
    lidar2cam_rt[3, :3] = -lidar2cam_t
    viewpad = np.eye(4)
    viewpad[:intrinsic.shape[0], :intrinsic.shape[1]] = intrinsic
    return viewpad @ lidar2cam_rt.T


def test_rig_equals_bevformer_converter_on_devkit_records(rig, dataroot) -> None:
    """Rotation / translation tolerance 1e-9; intrinsics and image size exact."""
    nuscenes = pytest.importorskip("nuscenes")
    from pyquaternion import Quaternion

    nusc = nuscenes.NuScenes(VERSION, str(dataroot), verbose=False)
    scene = next(s for s in nusc.scene if s["name"] == SCENE)
    sample = nusc.get("sample", scene["first_sample_token"])
    lidar_sd = nusc.get("sample_data", sample["data"]["LIDAR_TOP"])
    cs = nusc.get("calibrated_sensor", lidar_sd["calibrated_sensor_token"])
    pose = nusc.get("ego_pose", lidar_sd["ego_pose_token"])
    l2e = (cs["translation"], Quaternion(cs["rotation"]).rotation_matrix)
    e2g = (pose["translation"], Quaternion(pose["rotation"]).rotation_matrix)

    assert [c["name"] for c in rig["cameras"]] == list(CAMERA_ORDER)
    for cam in rig["cameras"]:
        token = sample["data"][cam["name"]]
        r_ref, t_ref = ref_obtain_sensor2top(nusc, token, *l2e, *e2g)
        np.testing.assert_allclose(cam["sensor2lidar_rotation"], r_ref, atol=TOL, rtol=0)
        np.testing.assert_allclose(cam["sensor2lidar_translation"], t_ref, atol=TOL, rtol=0)
        _, _, intrinsic = nusc.get_sample_data(token)
        np.testing.assert_array_equal(cam["cam_intrinsic"], intrinsic)
        sd = nusc.get("sample_data", token)
        assert rig["image_size"] == [sd["height"], sd["width"]]


def test_written_rig_loads_and_projects_as_bevformer(rig, rig_file) -> None:
    """load_rig accepts it; its lidar2img equals BEVFormer's (tolerance 1e-9 relative)."""
    assert not list(rig_file.parent.glob(".*partial"))
    assert json.loads(rig_file.read_text()) == rig
    loaded = load_rig(rig_file)
    assert loaded.name == f"nuscenes_{SCENE.replace('-', '_')}" and loaded.image_size == (900, 1600)
    assert loaded.names == list(CAMERA_ORDER)
    for cam, entry in zip(loaded.cameras, rig["cameras"]):
        ref = ref_lidar2img(np.array(entry["sensor2lidar_rotation"]), np.array(entry["sensor2lidar_translation"]),
                            np.array(entry["cam_intrinsic"]))
        np.testing.assert_allclose(cam.lidar2img(), ref, rtol=1e-9, atol=1e-9)
    assert "LiDAR frame: nuScenes LIDAR_TOP, x right, y forward, z up" in rig["description"]
    assert SCENE in rig["description"]


def test_rig_is_the_bundled_surround_rig(rig) -> None:
    """The generator mounts nuscenes_surround.json's cameras (LIDAR_TOP frame) on LIDAR_TOP:
    the rig read back is that one, in the same camera order, up to the ego motion between
    the LiDAR and camera timestamps (< 25 ms: 0.25 m, 0.3 degree)."""
    surround = load_rig("nuscenes_surround")
    assert [c["name"] for c in rig["cameras"]] == surround.names
    for cam, ref in zip(rig["cameras"], surround.cameras):
        np.testing.assert_allclose(cam["sensor2lidar_rotation"], ref.sensor2lidar_rotation, atol=6e-3)
        np.testing.assert_allclose(cam["sensor2lidar_translation"], ref.sensor2lidar_translation, atol=0.25)
        np.testing.assert_allclose(cam["cam_intrinsic"], ref.intrinsic, atol=1e-9)


def test_object_centres_project_into_the_expected_camera(rig_file, dataroot) -> None:
    """Every annotated centre of the first sample projects into some image; into the
    camera whose optical axis is nearest its bearing whenever it is 3 degrees or more
    inside that camera's horizontal field of view; never into a camera it is behind."""
    rig = load_rig(rig_file)
    frame = next(iter(NuScenesLayout(dataroot).frames(SCENE, sweeps=0)))
    global2lidar = np.linalg.inv(frame.ego2global @ frame.lidar2ego)
    height, width = rig.image_size
    checked = 0
    for ann in frame.annotations:
        centre = global2lidar[:3, :3] @ ann.translation + global2lidar[:3, 3]
        seen, angles = [], []
        for cam in rig.cameras:
            p = cam.lidar2img() @ np.append(centre, 1.0)
            in_image = p[2] > 0 and 0 <= p[0] / p[2] < width and 0 <= p[1] / p[2] < height
            seen.append(in_image)
            ray = centre - cam.sensor2lidar_translation
            axis = cam.sensor2lidar_rotation[:, 2]
            cos = (ray[:2] @ axis[:2]) / np.linalg.norm(ray[:2]) / np.linalg.norm(axis[:2])
            angles.append(np.degrees(np.arccos(np.clip(cos, -1, 1))))
            if angles[-1] > 90:
                assert not in_image, (ann.token, cam.name)
        assert any(seen), ann.token
        best = int(np.argmin(angles))
        half_fov = np.degrees(np.arctan(width / 2 / rig.cameras[best].intrinsic[0, 0]))
        if angles[best] < half_fov - 3:
            assert seen[best], (ann.token, rig.cameras[best].name, angles[best])
            checked += 1
    assert checked >= 8


def test_unknown_scene_and_custom_name(dataroot) -> None:
    with pytest.raises(InputError) as exc:
        rig_from_nuscenes(dataroot, "scene-0001")
    message = str(exc.value)
    assert "\n" not in message and "scene-0001" in message and "scene-0103" in message and "scene-0916" in message
    assert rig_from_nuscenes(dataroot, "scene-0916", name="mine")["name"] == "mine"


def test_lidar_only_dataset_has_no_rig(tmp_path) -> None:
    root = write_synthetic_nuscenes(tmp_path / "d", scenes=1, samples_per_scene=1, sweeps_between=0, cameras=False)
    with pytest.raises(InputError, match="no CAM_"):
        rig_from_nuscenes(root, SCENE)
