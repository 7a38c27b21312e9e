"""The synthetic nuScenes writer: a valid layout (checked with nuscenes-devkit), consistent
geometry, ray-cast points inside their boxes, deterministic for a seed."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from deploykit.data.synthetic_nuscenes import (CAMERAS, LIDAR_HEIGHT, SAMPLE_INTERVAL_US, SWEEP_INTERVAL_US, TABLES,
                                               write_synthetic_nuscenes)
from deploykit.errors import InputError, OutputExistsError

VERSION = "v1.0-mini"
NOISE_MARGIN = 6 * 0.02  # synthetic_lidar range noise, 6 sigma

# nuScenes v1.0 schema (https://www.nuscenes.org/nuscenes#data-format), field names per table.
SCHEMA = {
    "attribute": {"token", "name", "description"},
    "calibrated_sensor": {"token", "sensor_token", "translation", "rotation", "camera_intrinsic"},
    "category": {"token", "name", "description"},
    "ego_pose": {"token", "timestamp", "rotation", "translation"},
    "instance": {"token", "category_token", "nbr_annotations", "first_annotation_token", "last_annotation_token"},
    "log": {"token", "logfile", "vehicle", "date_captured", "location"},
    "map": {"token", "log_tokens", "category", "filename"},
    "sample": {"token", "timestamp", "prev", "next", "scene_token"},
    "sample_annotation": {"token", "sample_token", "instance_token", "visibility_token", "attribute_tokens",
                          "translation", "size", "rotation", "prev", "next", "num_lidar_pts", "num_radar_pts"},
    "sample_data": {"token", "sample_token", "ego_pose_token", "calibrated_sensor_token", "timestamp", "fileformat",
                    "is_key_frame", "height", "width", "filename", "prev", "next"},
    "scene": {"token", "log_token", "nbr_samples", "first_sample_token", "last_sample_token", "name", "description"},
    "sensor": {"token", "channel", "modality"},
    "visibility": {"token", "level", "description"},
}


@pytest.fixture(scope="module")
def dataroot(tmp_path_factory) -> Path:
    return write_synthetic_nuscenes(tmp_path_factory.mktemp("nus") / "synthetic", seed=3)


@pytest.fixture(scope="module")
def nusc(dataroot):
    nuscenes = pytest.importorskip("nuscenes")
    return nuscenes.NuScenes(VERSION, str(dataroot), verbose=False)


def _tables(root: Path) -> dict:
    return {name: json.loads((root / VERSION / f"{name}.json").read_text()) for name in TABLES}


def test_tables_have_the_v1_schema_and_hex_tokens(dataroot) -> None:
    tables = _tables(dataroot)
    assert set(tables) == set(SCHEMA) and len(tables) == 13
    for name, records in tables.items():
        assert records, name
        for record in records:
            assert set(record) == SCHEMA[name], (name, set(record) ^ SCHEMA[name])
            if name != "visibility":  # nuScenes' visibility tokens are "1".."4"
                assert re.fullmatch("[0-9a-f]{32}", record["token"]), (name, record["token"])
    assert [v["token"] for v in tables["visibility"]] == ["1", "2", "3", "4"]
    all_tokens = [r["token"] for name in TABLES if name != "visibility" for r in tables[name]]
    assert len(all_tokens) == len(set(all_tokens))


def test_devkit_loads_it_and_scenes_are_the_mini_val_split(nusc) -> None:
    from nuscenes.utils.splits import create_splits_scenes

    names = [s["name"] for s in nusc.scene]
    assert names == ["scene-0103", "scene-0916"]
    assert set(names) == set(create_splits_scenes()["mini_val"])
    for sample in nusc.sample:
        assert set(sample["data"]) == {"LIDAR_TOP", *CAMERAS}
    for record in nusc.sample_data:  # every file the tables name exists
        assert (Path(nusc.dataroot) / record["filename"]).is_file()


def test_more_scenes_take_mini_train_names(tmp_path) -> None:
    nuscenes = pytest.importorskip("nuscenes")
    from nuscenes.utils.splits import mini_train

    root = write_synthetic_nuscenes(tmp_path / "d", scenes=4, samples_per_scene=1, sweeps_between=0, cameras=False)
    nusc = nuscenes.NuScenes(VERSION, str(root), verbose=False)
    names = [s["name"] for s in nusc.scene]
    assert names[:2] == ["scene-0103", "scene-0916"] and set(names[2:]) <= set(mini_train)
    assert not any(r["channel"].startswith("CAM") for r in nusc.sensor)


def test_lidar_timing_files_and_calibration(nusc) -> None:
    lidar_cs = [nusc.get("calibrated_sensor", r["calibrated_sensor_token"]) for r in nusc.sample_data
                if r["channel"] == "LIDAR_TOP"]
    for cs in lidar_cs:  # nuScenes-like LIDAR_TOP: yaw -90 degrees (x right, y forward), SENSOR_HEIGHT up
        np.testing.assert_allclose(cs["rotation"], [np.sqrt(0.5), 0, 0, -np.sqrt(0.5)], atol=1e-12)
        assert cs["translation"][2] == LIDAR_HEIGHT
    for scene in nusc.scene:
        sample = nusc.get("sample", scene["first_sample_token"])
        sd = nusc.get("sample_data", sample["data"]["LIDAR_TOP"])
        while sd["prev"]:
            sd = nusc.get("sample_data", sd["prev"])
        chain = [sd]
        while sd["next"]:
            sd = nusc.get("sample_data", sd["next"])
            chain.append(sd)
        assert len(chain) == 3 * 3  # 3 samples, each after 2 sweeps
        gaps = set(np.diff([r["timestamp"] for r in chain]).tolist())  # 20 Hz sweeps, 2 Hz keyframes
        assert gaps == {SWEEP_INTERVAL_US, SAMPLE_INTERVAL_US - 2 * SWEEP_INTERVAL_US}
        keys = [r for r in chain if r["is_key_frame"]]
        assert np.all(np.diff([r["timestamp"] for r in keys]) == SAMPLE_INTERVAL_US)
        assert [r["sample_token"] for r in keys] == [s for s in _scene_samples(nusc, scene)]
        for r in chain:
            assert r["filename"].startswith("samples/LIDAR_TOP/" if r["is_key_frame"] else "sweeps/LIDAR_TOP/")
            assert r["filename"].endswith(".pcd.bin") and r["fileformat"] == "pcd"
            assert nusc.get("ego_pose", r["ego_pose_token"])["timestamp"] == r["timestamp"]
            if not r["is_key_frame"]:  # a sweep belongs to the next keyframe's sample
                key = nusc.get("sample_data", nusc.get("sample", r["sample_token"])["data"]["LIDAR_TOP"])
                assert 0 < key["timestamp"] - r["timestamp"] < SAMPLE_INTERVAL_US
                assert (key["timestamp"] - r["timestamp"]) % SWEEP_INTERVAL_US == 0
        points = np.fromfile(Path(nusc.dataroot) / keys[0]["filename"], np.float32).reshape(-1, 5)
        assert 15_000 < len(points) < 40_000
        assert points[:, 3].min() >= 0 and points[:, 3].max() <= 255
        np.testing.assert_array_equal(points[:, 3], np.round(points[:, 3]))
        assert set(np.unique(points[:, 4]).astype(int).tolist()) <= set(range(32))


def _scene_samples(nusc, scene) -> list[str]:
    tokens, token = [], scene["first_sample_token"]
    while token:
        tokens.append(token)
        token = nusc.get("sample", token)["next"]
    return tokens


def test_cameras_have_their_own_pose_and_jpegs(nusc) -> None:
    from PIL import Image

    sample = nusc.sample[0]
    lidar_ts = nusc.get("sample_data", sample["data"]["LIDAR_TOP"])["timestamp"]
    assert lidar_ts == sample["timestamp"]
    for name in CAMERAS:
        sd = nusc.get("sample_data", sample["data"][name])
        assert sd["timestamp"] != lidar_ts and abs(sd["timestamp"] - lidar_ts) < 50_000
        assert nusc.get("ego_pose", sd["ego_pose_token"])["timestamp"] == sd["timestamp"]
        with Image.open(Path(nusc.dataroot) / sd["filename"]) as image:
            assert image.format == "JPEG" and image.size == (sd["width"], sd["height"]) == (1600, 900)
        k = np.array(nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])["camera_intrinsic"])
        assert k.shape == (3, 3) and 0 < k[0, 2] < 1600 and 0 < k[1, 2] < 900


def _box_local(points: np.ndarray, box) -> np.ndarray:
    """(M, 3) |coordinates| of sensor-frame points in a devkit Box's frame (x along its length)."""
    return np.abs((points - box.center) @ box.rotation_matrix)


def test_ray_cast_points_lie_in_their_gt_boxes(nusc) -> None:
    """Keyframe points off the ground lie inside a GT box (margin: 6 sigma of the range noise)."""
    for sample in nusc.sample:
        path, boxes, _ = nusc.get_sample_data(sample["data"]["LIDAR_TOP"])
        points = np.fromfile(path, np.float32).reshape(-1, 5)[:, :3].astype(np.float64)
        above_ground = points[points[:, 2] > -LIDAR_HEIGHT + 0.1]
        assert len(above_ground) > 500
        inside = np.zeros(len(above_ground), bool)
        for box in boxes:
            half = np.array([box.wlh[1], box.wlh[0], box.wlh[2]]) / 2 + NOISE_MARGIN
            inside |= (_box_local(above_ground, box) <= half).all(axis=1)
        assert inside.all(), f"{(~inside).sum()} points outside every box"


def test_num_lidar_pts_counts_the_keyframe_points(nusc) -> None:
    """num_lidar_pts equals devkit's points_in_box count on the keyframe (tolerance: 1 point per
    box, for a point on a face that float rounding puts on the other side); near, not
    heavily occluded objects have points."""
    from nuscenes.utils.geometry_utils import points_in_box

    near_with_points = 0
    for sample in nusc.sample:
        path, boxes, _ = nusc.get_sample_data(sample["data"]["LIDAR_TOP"])
        points = np.fromfile(path, np.float32).reshape(-1, 5)[:, :3].T.astype(np.float64)
        for box in boxes:
            ann = nusc.get("sample_annotation", box.token)
            assert abs(int(points_in_box(box, points).sum()) - ann["num_lidar_pts"]) <= 1, ann["token"]
            if np.hypot(*box.center[:2]) < 25 and ann["visibility_token"] != "1":
                assert ann["num_lidar_pts"] > 0, ann["token"]
                near_with_points += 1
    assert near_with_points >= 10


def test_attributes_velocities_and_instances_are_consistent(nusc) -> None:
    categories = set()
    for ann in nusc.sample_annotation:
        attrs = [nusc.get("attribute", t)["name"] for t in ann["attribute_tokens"]]
        category = ann["category_name"]
        categories.add(category)
        speed = np.hypot(*nusc.box_velocity(ann["token"])[:2])
        moving = {"vehicle.moving", "pedestrian.moving", "cycle.with_rider"}
        if category == "static_object.bicycle_rack":
            assert attrs == []
        elif np.isnan(speed):
            assert ann["prev"] == ann["next"] == ""
        else:
            assert len(attrs) == 1
            assert (attrs[0] in moving) == (speed > 0.5), (attrs, speed)
        yaw = 2 * np.arctan2(ann["rotation"][3], ann["rotation"][0])
        if not np.isnan(speed) and speed > 0.5:  # heading along the velocity
            v = nusc.box_velocity(ann["token"])
            assert abs(np.cos(yaw) * v[1] - np.sin(yaw) * v[0]) < 1e-6 * speed + 1e-9
        assert ann["translation"][2] == pytest.approx(ann["size"][2] / 2)  # standing on the ground
    assert categories == {"vehicle.car", "human.pedestrian.adult", "vehicle.bicycle", "static_object.bicycle_rack"}
    for instance in nusc.instance:
        chain, token = [], instance["first_annotation_token"]
        while token:
            chain.append(nusc.get("sample_annotation", token))
            token = chain[-1]["next"]
        assert len(chain) == instance["nbr_annotations"] and chain[-1]["token"] == instance["last_annotation_token"]
        assert {a["instance_token"] for a in chain} == {instance["token"]}
    lone = [i for i in nusc.instance if i["nbr_annotations"] == 1]
    assert len(lone) == 2  # one per scene: a NaN velocity in devkit's evaluation


def test_same_seed_same_dataset_other_seed_differs(tmp_path) -> None:
    kwargs = dict(scenes=1, samples_per_scene=2, sweeps_between=1, cameras=False)
    a = write_synthetic_nuscenes(tmp_path / "a", seed=5, **kwargs)
    b = write_synthetic_nuscenes(tmp_path / "b", seed=5, **kwargs)
    c = write_synthetic_nuscenes(tmp_path / "c", seed=6, **kwargs)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    assert _tables(a)["sample_annotation"] != _tables(c)["sample_annotation"]


def test_bad_arguments_and_existing_output(tmp_path) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(OutputExistsError):
        write_synthetic_nuscenes(tmp_path / "full")
    for kwargs in (dict(scenes=11), dict(version="v2.0"), dict(sweeps_between=10), dict(samples_per_scene=0)):
        with pytest.raises(InputError):
            write_synthetic_nuscenes(tmp_path / "new", **kwargs)
    assert not (tmp_path / "new").exists()
    (tmp_path / "empty_ok").mkdir()  # an empty directory is fine
    root = write_synthetic_nuscenes(tmp_path / "empty_ok", scenes=1, samples_per_scene=1, sweeps_between=0,
                                    cameras=False, can_bus=False)
    assert (root / VERSION / "scene.json").is_file() and not (root / "can_bus").exists()
