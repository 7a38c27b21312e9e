"""aggregate_sweeps against a transcription of mmdet3d's multi-sweep loading.

The reference below follows, step by step, mmdet3d's nuScenes converter
(``obtain_sensor2top``: sensor2lidar from the quaternion poses via pyquaternion)
and ``LoadPointsFromMultiSweeps.__call__`` with CenterPoint's nuScenes settings
(sweeps_num=9, pad_empty_sweeps=True, remove_close=True) and test_mode=True.
Poses are nuScenes-like: kilometre-scale global positions, a LiDAR mounted at
-90 degrees yaw with a small tilt, an ego that drives and turns with roll and
pitch. Tolerance: 1e-5 m on x, y, z (float32 rounding of ~50 m coordinates is
4e-6 m); intensity and dt must match exactly, point order included.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from pyquaternion import Quaternion

from deploykit.data.frames import SensorFrame, Sweep, pose_matrix
from deploykit.data.points import write_points_bin
from deploykit.data.sweeps import aggregate_sweeps, remove_close
from deploykit.errors import InputError
from deploykit.recipe import load_recipe

LIDAR2EGO_T = np.array([0.985793, 0.0, 1.84019])
LIDAR2EGO_Q = Quaternion(axis=[0, 0, 1], angle=-np.pi / 2) * Quaternion(axis=[1, 0.3, 0], angle=0.02)
T0_US = 1533151603547590


@pytest.fixture(scope="module")
def nus():
    return load_recipe("centerpoint_pillar_nus").model


def _ego_pose(k: int) -> tuple[np.ndarray, Quaternion]:
    """Ego pose k sweeps (50 ms each) before the current one: driving at 10 m/s while turning."""
    yaw = 2.1 - 0.01 * k
    q = (Quaternion(axis=[0, 0, 1], angle=yaw) * Quaternion(axis=[0, 1, 0], angle=0.015 + 0.002 * k)
         * Quaternion(axis=[1, 0, 0], angle=-0.01 * (k % 3)))
    t = np.array([600.123, 1647.456, 0.2]) - 0.5 * k * np.array([np.cos(yaw), np.sin(yaw), 0.0])
    return t, q


def _sweep_points(rng, n=600) -> np.ndarray:
    pts = np.empty((n, 5), np.float32)
    pts[:, :2] = rng.uniform(-45, 45, (n, 2))
    pts[: n // 10, :2] = rng.uniform(-1.2, 1.2, (n // 10, 2))  # some within remove_close of the sensor
    pts[:, 2] = rng.uniform(-2.5, 1.5, n)
    pts[:, 3] = rng.integers(0, 256, n)
    pts[:, 4] = rng.integers(0, 32, n)  # ring
    return pts


def _scene(tmp_path, num_sweeps: int, seed: int = 0):
    """Files plus both descriptions of one frame: mmdet3d's info dict and deploykit's SensorFrame."""
    rng = np.random.default_rng(seed)
    records = []
    for k in range(num_sweeps + 1):  # k = 0: the current sweep
        path = write_points_bin(tmp_path / f"sweep_{seed}_{k}.pcd.bin", _sweep_points(rng))
        t, q = _ego_pose(k)
        records.append((path, T0_US - 50_000 * k - int(rng.integers(-900, 900)) * (k > 0), t, q))
    (path, ts, e2g_t, e2g_q) = records[0]
    info = {"lidar_path": path, "timestamp": ts, "lidar2ego_translation": LIDAR2EGO_T,
            "lidar2ego_rotation": LIDAR2EGO_Q.elements, "ego2global_translation": e2g_t,
            "ego2global_rotation": e2g_q.elements,
            "sweeps": [_obtain_sensor2top(r, e2g_t, e2g_q) for r in records[1:]]}
    sweeps = [Sweep(p, us, pose_matrix(LIDAR2EGO_T, LIDAR2EGO_Q.elements), pose_matrix(t, q.elements))
              for p, us, t, q in records]
    frame = SensorFrame("scene-0001", 3, "tok", ts, lidar=sweeps[0], sweeps=sweeps[1:],
                        ego2global=sweeps[0].ego2global, lidar2ego=sweeps[0].sensor2ego)
    return info, frame


def _obtain_sensor2top(record, e2g_t, e2g_q) -> dict:
    """mmdet3d nuscenes_converter.obtain_sensor2top, written out for one LiDAR sweep."""
    path, ts, e2g_t_s, e2g_q_s = record
    l2e_r_mat, e2g_r_mat = LIDAR2EGO_Q.rotation_matrix, e2g_q.rotation_matrix
    l2e_r_s_mat, e2g_r_s_mat = LIDAR2EGO_Q.rotation_matrix, e2g_q_s.rotation_matrix
    to_lidar = np.linalg.inv(e2g_r_mat).T @ np.linalg.inv(l2e_r_mat).T
    r = (l2e_r_s_mat.T @ e2g_r_s_mat.T) @ to_lidar
    t = (LIDAR2EGO_T @ e2g_r_s_mat.T + e2g_t_s) @ to_lidar
    t -= e2g_t @ to_lidar + LIDAR2EGO_T @ np.linalg.inv(l2e_r_mat).T
    return {"data_path": path, "timestamp": ts, "sensor2lidar_rotation": r.T, "sensor2lidar_translation": t}


def _mmdet3d_multi_sweeps(info, sweeps_num=9, pad_empty_sweeps=True, remove_close=True) -> np.ndarray:
    """LoadPointsFromFile(load_dim=5, use_dim=5) + LoadPointsFromMultiSweeps(test_mode=True), line by line."""
    def _remove_close(points, radius=1.0):
        x_filt = np.abs(points[:, 0]) < radius
        y_filt = np.abs(points[:, 1]) < radius
        return points[np.logical_not(np.logical_and(x_filt, y_filt))]

    points = np.fromfile(info["lidar_path"], dtype=np.float32).reshape(-1, 5)
    points[:, 4] = 0
    sweep_points_list = [points]
    ts = info["timestamp"] / 1e6  # NuScenesDataset.get_data_info
    if pad_empty_sweeps and len(info["sweeps"]) == 0:
        for _ in range(sweeps_num):
            sweep_points_list.append(_remove_close(points) if remove_close else points)
    else:
        if len(info["sweeps"]) <= sweeps_num:
            choices = np.arange(len(info["sweeps"]))
        else:
            choices = np.arange(sweeps_num)  # test_mode
        for idx in choices:
            sweep = info["sweeps"][idx]
            points_sweep = np.copy(np.fromfile(sweep["data_path"], dtype=np.float32)).reshape(-1, 5)
            if remove_close:
                points_sweep = _remove_close(points_sweep)
            sweep_ts = sweep["timestamp"] / 1e6
            points_sweep[:, :3] = points_sweep[:, :3] @ sweep["sensor2lidar_rotation"].T
            points_sweep[:, :3] += sweep["sensor2lidar_translation"]
            points_sweep[:, 4] = ts - sweep_ts
            sweep_points_list.append(points_sweep)
    return np.concatenate(sweep_points_list)[:, [0, 1, 2, 3, 4]]


def _assert_matches(ours: np.ndarray, ref: np.ndarray):
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    np.testing.assert_allclose(ours[:, :3], ref[:, :3], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(ours[:, 3:], ref[:, 3:])


@pytest.mark.parametrize("num_sweeps", [12, 3])
def test_matches_mmdet3d(nus, tmp_path, num_sweeps):
    info, frame = _scene(tmp_path, num_sweeps)
    ours, warnings = aggregate_sweeps(frame, nus)
    ref = _mmdet3d_multi_sweeps(info)
    _assert_matches(ours, ref)
    assert not any("no earlier sweeps" in w or "not newest first" in w for w in warnings)
    used = min(num_sweeps, 9)
    dts = np.unique(ours[:, 4])
    assert len(dts) == used + 1 and 0.04 < dts[1] and dts[-1] < 0.05 * used + 0.002


def test_no_sweeps_repeats_the_current_one_as_pad_empty_sweeps(nus, tmp_path):
    info, frame = _scene(tmp_path, 0)
    ours, warnings = aggregate_sweeps(frame, nus)
    _assert_matches(ours, _mmdet3d_multi_sweeps(info))
    assert [w for w in warnings if "sweep is repeated 9 times with dt = 0 as mmdet3d's pad_empty_sweeps" in w]
    assert not [w for w in warnings if "every dt is 0" in w]  # said once, by the padding message


def test_single_sweep_checkpoint_and_remove_close_off(nus, tmp_path):
    info, frame = _scene(tmp_path, 4)
    one = dataclasses.replace(nus, points=dataclasses.replace(nus.points, sweeps=1))
    ours, _ = aggregate_sweeps(frame, one)
    _assert_matches(ours, _mmdet3d_multi_sweeps(info, sweeps_num=0))
    keep = dataclasses.replace(nus, points=dataclasses.replace(nus.points, remove_close=0.0))
    ours, _ = aggregate_sweeps(frame, keep)
    _assert_matches(ours, _mmdet3d_multi_sweeps(info, remove_close=False))


def test_remove_close_is_a_square():
    pts = np.array([[0.9, -0.9, 0], [0.9, 1.1, 0], [-1.0, 0.0, 0], [0.0, 0.99, 5]], np.float32)
    np.testing.assert_array_equal(remove_close(pts, 1.0), pts[[1, 2]])


def test_bad_timestamps_and_order(nus, tmp_path):
    _, frame = _scene(tmp_path, 3)
    newer = dataclasses.replace(frame.sweeps[0], timestamp_us=frame.lidar.timestamp_us + 50_000)
    with pytest.raises(InputError, match=r"the sweep is 0.05 s newer than the current sweep; SensorFrame.sweeps "
                                         r"must hold earlier sweeps"):
        aggregate_sweeps(dataclasses.replace(frame, sweeps=[newer]), nus)
    old = dataclasses.replace(frame.sweeps[0], timestamp_us=frame.lidar.timestamp_us - 50_000_000)
    with pytest.raises(InputError, match=r"the sweep is 50 s older than the current sweep.*microseconds"):
        aggregate_sweeps(dataclasses.replace(frame, sweeps=[old]), nus)
    _, warnings = aggregate_sweeps(dataclasses.replace(frame, sweeps=frame.sweeps[::-1]), nus)
    assert [w for w in warnings if "SensorFrame.sweeps are not newest first" in w]
    with pytest.raises(InputError, match=r"frame tok has no LiDAR sweep"):
        aggregate_sweeps(dataclasses.replace(frame, lidar=None), nus)


def test_kitti_sweeps_are_rescaled_and_said_once(nus, tmp_path):
    rng = np.random.default_rng(3)
    sweeps = []
    for k in range(4):
        pts = _sweep_points(rng)[:, :4]
        pts[:, 3] /= 255
        path = write_points_bin(tmp_path / f"{k:06d}.bin", pts)
        t, q = _ego_pose(k)
        sweeps.append(Sweep(path, T0_US - 50_000 * k, pose_matrix(LIDAR2EGO_T, LIDAR2EGO_Q.elements),
                            pose_matrix(t, q.elements)))
    frame = SensorFrame("s", 0, "tok", T0_US, lidar=sweeps[0], sweeps=sweeps[1:])
    ours, warnings = aggregate_sweeps(frame, nus)
    assert ours.shape[1] == 5 and 200 < ours[:, 3].max() <= 255
    rescaled = [w for w in warnings if "intensity rescaled from the kitti layout's 0-1" in w]
    assert rescaled == [f"note: {sweeps[0].path} and 3 more sweep files: intensity rescaled from the kitti layout's 0-1 "
                        "to the checkpoint's 0-255."]
