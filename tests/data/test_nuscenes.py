"""The plain-json nuScenes reader against nuscenes-devkit (and transcriptions of BEVFormer's
converter / dataset) on a synthetic nuScenes-layout dataset."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from deploykit.data.frames import SensorFrame
from deploykit.data.nuscenes import CAMERA_ORDER, NuScenesLayout, sensor2lidar
from deploykit.data.synthetic_nuscenes import write_synthetic_nuscenes
from deploykit.errors import InputError

VERSION = "v1.0-mini"
TOL = 1e-9


@pytest.fixture(scope="module")
def dataroot(tmp_path_factory) -> Path:
    return write_synthetic_nuscenes(tmp_path_factory.mktemp("nus") / "synthetic", seed=1)


@pytest.fixture(scope="module")
def layout(dataroot) -> NuScenesLayout:
    return NuScenesLayout(dataroot)


@pytest.fixture(scope="module")
def frames(layout) -> list[SensorFrame]:
    return list(layout.frames(sweeps=10))


@pytest.fixture(scope="module")
def nusc(dataroot):
    nuscenes = pytest.importorskip("nuscenes")
    return nuscenes.NuScenes(VERSION, str(dataroot), verbose=False)


# -- REFERENCE: transcriptions (fundamentalvision/BEVFormer tools/data_converter/nuscenes_converter.py and
# -- projects/mmdet3d_plugin/datasets/nuscenes_dataset.py), on devkit records and pyquaternion.

def ref_obtain_sensor2top(nusc, sensor_token, l2e_t, l2e_r_mat, e2g_t, e2g_r_mat):
    from pyquaternion import Quaternion

    sd_rec = nusc.get("sample_data", sensor_token)
    cs_record = nusc.get("calibrated_sensor", sd_rec["calibrated_sensor_token"])
    pose_record = nusc.get("ego_pose", sd_rec["ego_pose_token"])
    l2e_r_s, l2e_t_s = cs_record["rotation"], cs_record["translation"]
    e2g_r_s, e2g_t_s = pose_record["rotation"], pose_record["translation"]
    l2e_r_s_mat = Quaternion(l2e_r_s).rotation_matrix
    e2g_r_s_mat = Quaternion(e2g_r_s).rotation_matrix
    R = (l2e_r_s_mat.T @ e2g_r_s_mat.T) @ (np.linalg.inv(e2g_r_mat).T @ np.linalg.inv(l2e_r_mat).T)
    T = (l2e_t_s @ e2g_r_s_mat.T + e2g_t_s) @ (np.linalg.inv(e2g_r_mat).T @ np.linalg.inv(l2e_r_mat).T)
    T -= e2g_t @ (np.linalg.inv(e2g_r_mat).T @ np.linalg.inv(l2e_r_mat).T) + l2e_t @ np.linalg.inv(l2e_r_mat).T
    return R.T, T


def ref_lidar_records(nusc, sample):
    from pyquaternion import Quaternion

    sd_rec = nusc.get("sample_data", sample["data"]["LIDAR_TOP"])
    cs_record = nusc.get("calibrated_sensor", sd_rec["calibrated_sensor_token"])
    pose_record = nusc.get("ego_pose", sd_rec["ego_pose_token"])
    return (np.array(cs_record["translation"]), Quaternion(cs_record["rotation"]).rotation_matrix,
            np.array(pose_record["translation"]), Quaternion(pose_record["rotation"]).rotation_matrix)


def ref_can_bus(nusc, nusc_can_bus, sample):
    """_get_can_bus_info, then CustomNuScenesDataset.get_data_info's overwrite."""
    from nuscenes.eval.common.utils import Quaternion, quaternion_yaw

    scene_name = nusc.get("scene", sample["scene_token"])["name"]
    sample_timestamp = sample["timestamp"]
    try:
        pose_list = nusc_can_bus.get_messages(scene_name, "pose")
    except Exception:
        can_bus = np.zeros(18)
    else:
        can_bus = []
        last_pose = pose_list[0]
        for i, pose in enumerate(pose_list):
            if pose["utime"] > sample_timestamp:
                break
            last_pose = pose
        _ = last_pose.pop("utime")
        pos = last_pose.pop("pos")
        rotation = last_pose.pop("orientation")
        can_bus.extend(pos)
        can_bus.extend(rotation)
        for key in last_pose.keys():
            can_bus.extend(pose[key])
        can_bus.extend([0.0, 0.0])
        can_bus = np.array(can_bus)
    pose_record = nusc.get("ego_pose", nusc.get("sample_data", sample["data"]["LIDAR_TOP"])["ego_pose_token"])
    rotation = Quaternion(pose_record["rotation"])
    translation = pose_record["translation"]
    can_bus[:3] = translation
    can_bus[3:7] = rotation
    patch_angle = quaternion_yaw(rotation) / np.pi * 180
    if patch_angle < 0:
        patch_angle += 360
    can_bus[-2] = patch_angle / 180 * np.pi
    can_bus[-1] = patch_angle
    return can_bus


# -- order, sweeps, poses -----------------------------------------------------------------------------------

def test_sample_order_and_indices_follow_the_scene_chains(layout, frames, nusc) -> None:
    expected = []
    for scene in nusc.scene:
        token = scene["first_sample_token"]
        while token:
            expected.append((scene["name"], token))
            token = nusc.get("sample", token)["next"]
    assert [(f.scene, f.token) for f in frames] == expected
    assert layout.scene_names() == [s["name"] for s in nusc.scene]
    assert layout.sample_tokens() == [t for _, t in expected]
    for name in layout.scene_names():
        scene_frames = [f for f in frames if f.scene == name]
        assert [f.index for f in scene_frames] == list(range(len(scene_frames)))
        assert layout.sample_tokens(name) == [f.token for f in scene_frames]
        assert layout.scene_description(name) == next(s for s in nusc.scene if s["name"] == name)["description"]
    for f in frames:
        assert f.timestamp_us == nusc.get("sample", f.token)["timestamp"]


@pytest.mark.parametrize("max_sweeps", [0, 3, 10])
def test_sweeps_follow_the_prev_chain_newest_first(layout, nusc, max_sweeps) -> None:
    for f in layout.frames(sweeps=max_sweeps, cameras=False, annotations=False):
        sd = nusc.get("sample_data", nusc.get("sample", f.token)["data"]["LIDAR_TOP"])
        assert f.lidar.path == Path(nusc.get_sample_data_path(sd["token"]))
        assert f.lidar.layout == "nuscenes" and f.lidar.timestamp_us == sd["timestamp"]
        chain = []
        while sd["prev"] and len(chain) < max_sweeps:
            sd = nusc.get("sample_data", sd["prev"])
            chain.append(sd)
        assert [(s.path, s.timestamp_us) for s in f.sweeps] == [
            (Path(nusc.get_sample_data_path(r["token"])), r["timestamp"]) for r in chain]
        assert any(not r["is_key_frame"] for r in chain) or max_sweeps == 0
        for sweep, record in zip(f.sweeps, chain):
            cs = nusc.get("calibrated_sensor", record["calibrated_sensor_token"])
            pose = nusc.get("ego_pose", record["ego_pose_token"])
            np.testing.assert_allclose(sweep.sensor2ego[:3, 3], cs["translation"], atol=TOL)
            np.testing.assert_allclose(sweep.ego2global[:3, 3], pose["translation"], atol=TOL)


def test_frame_poses_and_cameras_equal_the_devkit_records(frames, nusc) -> None:
    from pyquaternion import Quaternion

    def matrix(record):
        m = np.eye(4)
        m[:3, :3] = Quaternion(record["rotation"]).rotation_matrix
        m[:3, 3] = record["translation"]
        return m

    for f in frames:
        sample = nusc.get("sample", f.token)
        sd = nusc.get("sample_data", sample["data"]["LIDAR_TOP"])
        np.testing.assert_allclose(f.lidar2ego, matrix(nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])),
                                   atol=TOL)
        np.testing.assert_allclose(f.ego2global, matrix(nusc.get("ego_pose", sd["ego_pose_token"])), atol=TOL)
        assert [c.name for c in f.cameras] == list(CAMERA_ORDER)  # BEVFormer's converter order
        for cam in f.cameras:
            cam_sd = nusc.get("sample_data", sample["data"][cam.name])
            cs = nusc.get("calibrated_sensor", cam_sd["calibrated_sensor_token"])
            path, _, intrinsic = nusc.get_sample_data(cam_sd["token"])
            assert cam.path == Path(path) and cam.timestamp_us == cam_sd["timestamp"]
            assert cam.image_size == (cam_sd["height"], cam_sd["width"])
            np.testing.assert_array_equal(cam.intrinsic, intrinsic)
            np.testing.assert_allclose(cam.sensor2ego, matrix(cs), atol=TOL)
            np.testing.assert_allclose(cam.ego2global, matrix(nusc.get("ego_pose", cam_sd["ego_pose_token"])),
                                       atol=TOL)
            assert not np.allclose(cam.ego2global, f.ego2global)  # its own pose, not the LiDAR's


def test_sensor2lidar_equals_obtain_sensor2top(frames, nusc) -> None:
    """Cameras and sweeps, tolerance 1e-9 (global translations are ~1 km)."""
    checked = 0
    for f in frames:
        sample = nusc.get("sample", f.token)
        l2e_t, l2e_r_mat, e2g_t, e2g_r_mat = ref_lidar_records(nusc, sample)
        for cam in f.cameras:
            r_ref, t_ref = ref_obtain_sensor2top(nusc, sample["data"][cam.name], l2e_t, l2e_r_mat, e2g_t, e2g_r_mat)
            r, t = sensor2lidar(cam, f)
            np.testing.assert_allclose(r, r_ref, atol=TOL)
            np.testing.assert_allclose(t, t_ref, atol=TOL)
            checked += 1
        sd = nusc.get("sample_data", sample["data"]["LIDAR_TOP"])
        for sweep in f.sweeps:
            sd = nusc.get("sample_data", sd["prev"])
            r_ref, t_ref = ref_obtain_sensor2top(nusc, sd["token"], l2e_t, l2e_r_mat, e2g_t, e2g_r_mat)
            r, t = sensor2lidar(sweep, f)
            np.testing.assert_allclose(r, r_ref, atol=TOL)
            np.testing.assert_allclose(t, t_ref, atol=TOL)
            r2, t2 = sensor2lidar(sweep, f.lidar)  # a Sweep as the reference works the same
            np.testing.assert_allclose(r2, r, atol=TOL)
            np.testing.assert_allclose(t2, t, atol=TOL)
            checked += 1
    assert checked > 40


# -- CAN bus ------------------------------------------------------------------------------------------------

def test_can_bus_equals_bevformer(frames, nusc, dataroot) -> None:
    """Tolerance 1e-9; [7:16] come from the CAN-bus expansion, here written by the generator."""
    from nuscenes.can_bus.can_bus_api import NuScenesCanBus

    can = NuScenesCanBus(dataroot=str(dataroot))
    for f in frames:
        ref = ref_can_bus(nusc, can, nusc.get("sample", f.token))
        assert f.can_bus.shape == (18,) and f.can_bus.dtype == np.float64
        np.testing.assert_allclose(f.can_bus, ref, atol=TOL, rtol=0)
        assert np.abs(f.can_bus[7:16]).max() > 0  # the expansion fields are filled
        assert (f.can_bus[3:7] == f.can_bus[3]).all()  # BEVFormer's quirk: the rotation's w, four times
        assert 0 <= f.can_bus[-1] < 360 and f.can_bus[-2] == pytest.approx(np.radians(f.can_bus[-1]))


def test_can_bus_takes_accel_rate_vel_from_the_message_after_the_sample(layout, dataroot) -> None:
    """BEVFormer's loop-variable quirk, checked on the raw messages (exact)."""
    for name in layout.scene_names():
        messages = json.loads((dataroot / "can_bus" / f"{name}_pose.json").read_text())
        for f in (f for f in layout.frames(name, sweeps=0, cameras=False, annotations=False)):
            after = next(m for m in messages if m["utime"] > f.timestamp_us)
            np.testing.assert_array_equal(f.can_bus[7:16], after["accel"] + after["rotation_rate"] + after["vel"])
            np.testing.assert_allclose(f.can_bus[16], np.radians(f.can_bus[17]), rtol=1e-15)


def test_can_bus_of_a_blacklisted_scene_is_zeros(dataroot, tmp_path) -> None:
    """nuscenes-devkit refuses CAN data of scenes 161-176, 309-314; BEVFormer then uses zeros."""
    root = _copy_tables(dataroot, tmp_path)
    path = root / VERSION / "scene.json"
    scenes = json.loads(path.read_text())
    scenes[0]["name"] = "scene-0161"
    path.write_text(json.dumps(scenes))
    (root / "can_bus").mkdir()
    shutil.copy(dataroot / "can_bus" / "scene-0103_pose.json", root / "can_bus" / "scene-0161_pose.json")
    for f in NuScenesLayout(root).frames("scene-0161", cameras=False, annotations=False, sweeps=0):
        np.testing.assert_array_equal(f.can_bus[7:16], 0)


def test_can_bus_without_the_expansion_is_zeros_there(tmp_path) -> None:
    root = write_synthetic_nuscenes(tmp_path / "d", scenes=1, samples_per_scene=2, sweeps_between=0, cameras=False,
                                    can_bus=False)
    for f in NuScenesLayout(root).frames():
        np.testing.assert_array_equal(f.can_bus[7:16], 0)
        np.testing.assert_allclose(f.can_bus[:3], f.ego2global[:3, 3], atol=TOL)


# -- ground truth -------------------------------------------------------------------------------------------

def test_annotations_equal_devkit_load_gt(frames, nusc) -> None:
    """Against load_gt(nusc, 'mini_val', DetectionBox) + add_center_dist: tolerance 1e-9 on
    translation, size, rotation, velocity (NaN where the devkit's is), ego_translation; exact
    names, attributes and num_pts."""
    from nuscenes.eval.common.loaders import add_center_dist, load_gt
    from nuscenes.eval.detection.data_classes import DetectionBox

    gt = add_center_dist(nusc, load_gt(nusc, "mini_val", DetectionBox))
    assert set(gt.sample_tokens) == {f.token for f in frames}
    total = 0
    for f in frames:
        ref = gt[f.token]
        assert len(f.annotations) == len(ref) > 0
        for ann, box in zip(f.annotations, ref):
            np.testing.assert_allclose(ann.translation, box.translation, atol=TOL, rtol=0)
            np.testing.assert_allclose(ann.size, box.size, atol=TOL, rtol=0)
            np.testing.assert_allclose(ann.rotation, box.rotation, atol=TOL, rtol=0)
            np.testing.assert_allclose(ann.velocity, box.velocity, atol=TOL, rtol=0, equal_nan=True)
            np.testing.assert_allclose(ann.translation - f.ego2global[:3, 3], box.ego_translation, atol=TOL, rtol=0)
            assert (ann.detection_name, ann.attribute_name, ann.num_pts) == (
                box.detection_name, box.attribute_name, box.num_pts)
            total += 1
    names = {a.detection_name for f in frames for a in f.annotations}
    assert names == {"car", "pedestrian", "bicycle"}
    assert any(np.isnan(a.velocity).all() for f in frames for a in f.annotations)
    assert total == sum(len(gt[t]) for t in gt.sample_tokens)


def test_bike_racks_are_the_devkit_filter_boxes(frames, nusc) -> None:
    for f in frames:
        racks = [nusc.get("sample_annotation", a) for a in nusc.get("sample", f.token)["anns"]
                 if nusc.get("sample_annotation", a)["category_name"] == "static_object.bicycle_rack"]
        assert len(f.bike_racks) == len(racks) == 1
        for ours, rec in zip(f.bike_racks, racks):
            assert ours.token == rec["token"] and ours.detection_name == ""
            np.testing.assert_array_equal(ours.translation, rec["translation"])
            np.testing.assert_array_equal(ours.size, rec["size"])
            np.testing.assert_array_equal(ours.rotation, rec["rotation"])
        assert all(a.token != racks[0]["token"] for a in f.annotations)  # not a detection class


def test_box_velocity_nan_cases_match_devkit(tmp_path) -> None:
    """Sample gaps of 1.6 s then 1.0 s: one-sided differences over 1.5 s and lone annotations
    are NaN, a centred difference over 2.6 s (< 2 x 1.5) is not. Tolerance 1e-12."""
    nuscenes = pytest.importorskip("nuscenes")
    root = write_synthetic_nuscenes(tmp_path / "d", scenes=1, samples_per_scene=3, sweeps_between=0, cameras=False)
    path = root / VERSION / "sample.json"
    samples = json.loads(path.read_text())
    t0 = samples[0]["timestamp"]
    for sample, offset in zip(samples, (0, 1_600_000, 2_600_000)):
        sample["timestamp"] = t0 + offset
    path.write_text(json.dumps(samples))
    nusc = nuscenes.NuScenes(VERSION, str(root), verbose=False)
    layout = NuScenesLayout(root)
    kinds = set()
    for ann in nusc.sample_annotation:
        ref = nusc.box_velocity(ann["token"])
        ours = layout.box_velocity(ann["token"])
        np.testing.assert_allclose(ours, ref, atol=1e-12, rtol=0, equal_nan=True)
        kinds.add((ann["prev"] != "", ann["next"] != "", bool(np.isnan(ref).all())))
    assert {(False, True, True), (True, True, False), (True, False, False), (False, False, True)} <= kinds


# -- errors -------------------------------------------------------------------------------------------------

def _copy_tables(dataroot: Path, tmp_path: Path) -> Path:
    root = tmp_path / "copy"
    shutil.copytree(dataroot / VERSION, root / VERSION)
    for folder in ("samples", "sweeps"):
        (root / folder).symlink_to(dataroot / folder)
    return root


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_missing_table_names_it(dataroot, tmp_path) -> None:
    root = _copy_tables(dataroot, tmp_path)
    (root / VERSION / "ego_pose.json").unlink()
    with pytest.raises(InputError) as exc:
        NuScenesLayout(root)
    assert "ego_pose.json" in _one_line(exc) and "missing" in str(exc.value)
    (root / VERSION / "map.json").unlink()  # optional tables may be absent
    shutil.copy(dataroot / VERSION / "ego_pose.json", root / VERSION / "ego_pose.json")
    assert len(list(NuScenesLayout(root).frames(cameras=False))) == 6


def test_dangling_token_names_record_and_field(dataroot, tmp_path) -> None:
    root = _copy_tables(dataroot, tmp_path)
    path = root / VERSION / "sample_data.json"
    records = json.loads(path.read_text())
    records[0]["calibrated_sensor_token"] = "f" * 32
    path.write_text(json.dumps(records))
    with pytest.raises(InputError) as exc:
        NuScenesLayout(root)
    message = _one_line(exc)
    assert records[0]["token"] in message and "calibrated_sensor_token" in message and "f" * 32 in message

    records[0]["calibrated_sensor_token"] = json.loads((dataroot / VERSION / "sample_data.json").read_text())[0][
        "calibrated_sensor_token"]
    records[0]["ego_pose_token"] = "e" * 32
    path.write_text(json.dumps(records))
    layout = NuScenesLayout(root)  # ego poses are looked up lazily: the error comes with the frame
    with pytest.raises(InputError) as exc:
        list(layout.frames())
    assert "ego_pose_token" in _one_line(exc) and "e" * 32 in str(exc.value)


def test_unknown_scene_lists_scenes(layout) -> None:
    with pytest.raises(InputError) as exc:
        layout.frames("scene-9999")
    message = _one_line(exc)
    assert "scene-9999" in message and "scene-0103" in message and "scene-0916" in message


def test_version_and_dataroot_errors(dataroot, tmp_path) -> None:
    with pytest.raises(InputError) as exc:
        NuScenesLayout(tmp_path / "nowhere")
    assert "nowhere" in _one_line(exc)
    root = _copy_tables(dataroot, tmp_path)
    shutil.copytree(root / VERSION, root / "v1.0-trainval")
    with pytest.raises(InputError) as exc:
        NuScenesLayout(root)
    assert "v1.0-mini" in _one_line(exc) and "v1.0-trainval" in str(exc.value)
    assert NuScenesLayout(root, "v1.0-mini").version == "v1.0-mini"
    with pytest.raises(InputError) as exc:
        NuScenesLayout(root, "v1.0-test")
    assert "v1.0-test" in _one_line(exc)
    (root / VERSION / "scene.json").write_text("{not json")
    with pytest.raises(InputError) as exc:
        NuScenesLayout(root, VERSION)
    assert "scene.json" in _one_line(exc)


def test_missing_data_file_is_named(dataroot, tmp_path) -> None:
    root = tmp_path / "copy"
    shutil.copytree(dataroot / VERSION, root / VERSION)
    shutil.copytree(dataroot / "samples", root / "samples")  # no sweeps/
    layout = NuScenesLayout(root)
    assert len(list(layout.frames(sweeps=0))) == 6
    with pytest.raises(InputError) as exc:
        next(iter(layout.frames(sweeps=2)))
    assert "sweeps/LIDAR_TOP" in _one_line(exc) and "sweeps=0" in str(exc.value)


def test_reader_does_not_need_the_devkit(dataroot) -> None:
    code = ("import sys; sys.modules['nuscenes'] = None; sys.modules['pyquaternion'] = None\n"
            "from deploykit.data.nuscenes import NuScenesLayout\n"
            f"frames = list(NuScenesLayout({str(dataroot)!r}).frames())\n"
            "assert len(frames) == 6 and frames[0].annotations\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])
