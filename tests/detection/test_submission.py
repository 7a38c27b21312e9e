import json

import numpy as np
import pytest

from deploykit.data.frames import pose_matrix, quaternion_to_rotation, yaw_quaternion
from deploykit.detection.decode import Boxes, decode_bevformer, decode_centerpoint
from deploykit.detection.nuscenes_eval import DETECTION_NAMES
from deploykit.detection.nuscenes_map import CLASS_RANGE
from deploykit.detection.submission import (DEFAULT_ATTRIBUTE, META_KEYS, annotations_to_boxes, boxes_to_nuscenes,
                                            default_attribute, matrix_quaternion, nuscenes_class_names,
                                            write_submission)

NAMES = list(DETECTION_NAMES)


# ---------------------------------------------------------------------------------------------------------------
# REFERENCE: transcriptions of mmdet3d's nuScenes formatting on pyquaternion and the devkit's Box:
# 1.x (v1.4.0 mmdet3d/evaluation/metrics/nuscenes_metric.py: output_to_nusc_box for LiDARInstance3DBoxes,
# lidar_nusc_box_to_global with 4x4 matrices, the attribute rule of _format_lidar_bbox) and 0.17 (BEVFormer's
# base: mmdet3d/datasets/nuscenes_dataset.py output_to_nusc_box with yaw -> -yaw - pi/2, quaternion infos).
# ---------------------------------------------------------------------------------------------------------------

MMDET3D_DEFAULT_ATTRIBUTE = {
    'car': 'vehicle.parked', 'pedestrian': 'pedestrian.moving', 'trailer': 'vehicle.parked',
    'truck': 'vehicle.parked', 'bus': 'vehicle.moving', 'motorcycle': 'cycle.without_rider',
    'construction_vehicle': 'vehicle.parked', 'bicycle': 'cycle.without_rider', 'barrier': '', 'traffic_cone': '',
}


def ref_attr(name, box):
    if np.sqrt(box.velocity[0]**2 + box.velocity[1]**2) > 0.2:
        if name in ['car', 'construction_vehicle', 'bus', 'truck', 'trailer']:
            attr = 'vehicle.moving'
        elif name in ['bicycle', 'motorcycle']:
            attr = 'cycle.with_rider'
        else:
            attr = MMDET3D_DEFAULT_ATTRIBUTE[name]
    else:
        if name in ['pedestrian']:
            attr = 'pedestrian.standing'
        elif name in ['bus']:
            attr = 'vehicle.stopped'
        else:
            attr = MMDET3D_DEFAULT_ATTRIBUTE[name]
    return attr


def ref_format_1x(gravity_center, dims_lwh, yaw, vel, scores, labels, classes, lidar2ego, ego2global, token):
    from nuscenes.utils.data_classes import Box as NuScenesBox
    from pyquaternion import Quaternion

    nus_box_dims = dims_lwh[:, [1, 0, 2]]
    box_list = []
    for i in range(len(scores)):
        quat = Quaternion(axis=[0, 0, 1], radians=yaw[i])
        velocity = (*vel[i], 0.0)
        box_list.append(NuScenesBox(gravity_center[i], nus_box_dims[i], quat, label=labels[i], score=scores[i],
                                    velocity=velocity))
    out = []
    for box in box_list:
        box.rotate(Quaternion(matrix=lidar2ego, rtol=1e-05, atol=1e-07))
        box.translate(lidar2ego[:3, 3])
        radius = np.linalg.norm(box.center[:2], 2)
        if radius > CLASS_RANGE[classes[box.label]]:
            continue
        box.rotate(Quaternion(matrix=ego2global, rtol=1e-05, atol=1e-07))
        box.translate(ego2global[:3, 3])
        name = classes[box.label]
        out.append(dict(sample_token=token, translation=box.center.tolist(), size=box.wlh.tolist(),
                        rotation=box.orientation.elements.tolist(), velocity=box.velocity[:2].tolist(),
                        detection_name=name, detection_score=box.score, attribute_name=ref_attr(name, box)))
    return out


def ref_bevformer_017(bbox_preds, scores, labels, classes, l2e_t, l2e_q, e2g_t, e2g_q, token):
    """BEVFormer's boxes through mmdet3d 0.17: denormalize_bbox, output_to_nusc_box, lidar_nusc_box_to_global."""
    from nuscenes.utils.data_classes import Box as NuScenesBox
    from pyquaternion import Quaternion

    b = bbox_preds.astype(np.float64)
    rot = np.arctan2(b[:, 6], b[:, 7])
    cx, cy, cz, w, l, h = b[:, 0], b[:, 1], b[:, 4], np.exp(b[:, 2]), np.exp(b[:, 3]), np.exp(b[:, 5])
    box_gravity_center = np.stack([cx, cy, cz], 1)
    box_dims = np.stack([w, l, h], 1)
    box_yaw = -rot - np.pi / 2
    out = []
    for i in range(len(b)):
        quat = Quaternion(axis=[0, 0, 1], radians=box_yaw[i])
        box = NuScenesBox(box_gravity_center[i], box_dims[i], quat, label=labels[i], score=scores[i],
                          velocity=(*b[i, 8:10], 0.0))
        box.rotate(Quaternion(l2e_q))
        box.translate(np.array(l2e_t))
        if np.linalg.norm(box.center[:2], 2) > CLASS_RANGE[classes[box.label]]:
            continue
        box.rotate(Quaternion(e2g_q))
        box.translate(np.array(e2g_t))
        name = classes[box.label]
        out.append(dict(sample_token=token, translation=box.center.tolist(), size=box.wlh.tolist(),
                        rotation=box.orientation.elements.tolist(), velocity=box.velocity[:2].tolist(),
                        detection_name=name, detection_score=box.score, attribute_name=ref_attr(name, box)))
    return out


def assert_same_boxes(mine, ref, tol=1e-9, up_to_sign=False):
    assert len(mine) == len(ref)
    for a, b in zip(mine, ref):
        for f in ("sample_token", "detection_name", "attribute_name"):
            assert a[f] == b[f], (f, a, b)
        for f in ("translation", "size", "velocity"):
            np.testing.assert_allclose(a[f], b[f], rtol=0, atol=tol)
        assert a["detection_score"] == pytest.approx(b["detection_score"], abs=1e-12)
        r, s = np.asarray(a["rotation"]), np.asarray(b["rotation"])
        if up_to_sign and np.dot(r, s) < 0:
            s = -s
        np.testing.assert_allclose(r, s, rtol=0, atol=tol)


def _random_pose(rng, tilt=0.02, yaw=None, scale=1.0):
    yaw = rng.uniform(-np.pi, np.pi) if yaw is None else yaw
    q = yaw_quaternion(yaw) + np.append(0.0, rng.normal(0, tilt, 3))
    q /= np.linalg.norm(q)
    return pose_matrix(rng.normal(0, scale, 3), q), q


@pytest.mark.parametrize("seed", range(4))
def test_boxes_to_nuscenes_equals_mmdet3d(seed):
    pytest.importorskip("nuscenes")
    rng = np.random.default_rng(seed)
    n = 60
    centers = np.column_stack([rng.uniform(-60, 60, (n, 2)), rng.normal(0, 1, n)])
    centers[:5, :2] = [[50, 0], [0, -40], [30, 0], [40, 0.0], [0, 30]]  # on a range, for identity poses
    dims = rng.uniform(0.3, 10, (n, 3))
    yaw = rng.uniform(-7, 7, n)  # unwrapped, as a decoder may leave it
    vel = rng.normal(0, 1, (n, 2)) * rng.choice([0.0, 0.05, 1.0], (n, 1))
    scores = rng.random(n)
    labels = rng.integers(0, len(NAMES), n)
    boxes = Boxes(centers, dims, yaw, scores, labels, vel)
    for pose_yaws in ((0.0, 0.0), (None, None), (np.pi - 0.01, -np.pi + 0.02), (np.pi / 2, 3.0)):
        if pose_yaws == (0.0, 0.0):
            l2e, e2g = np.eye(4), np.eye(4)
        else:
            l2e, _ = _random_pose(rng, yaw=pose_yaws[0])
            e2g, _ = _random_pose(rng, yaw=pose_yaws[1], scale=800)
        mine = boxes_to_nuscenes(boxes, NAMES, "tok", l2e, e2g)
        ref = ref_format_1x(centers, dims, yaw, vel, scores, labels, NAMES, l2e, e2g, "tok")
        assert 0 < len(ref) < n
        assert_same_boxes(mine, ref)
        assert {b["attribute_name"] for b in mine} > {"vehicle.moving", "vehicle.parked"}


def test_matrix_quaternion_equals_pyquaternion():
    pytest.importorskip("pyquaternion")
    from pyquaternion import Quaternion

    rng = np.random.default_rng(1)
    for _ in range(300):
        q = rng.normal(0, 1, 4)
        m = quaternion_to_rotation(q)
        np.testing.assert_allclose(matrix_quaternion(m), Quaternion(matrix=m, rtol=1e-05, atol=1e-07).elements,
                                   rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="rotation"):
        matrix_quaternion(np.diag([1.0, 1.0, -1.0]))


def test_bevformer_decode_gives_bevformers_own_submission(bev_recipe):
    pytest.importorskip("nuscenes")
    cfg = bev_recipe.model
    rng = np.random.default_rng(3)
    q_num, c = 12, cfg.num_classes
    cls = np.full((1, q_num, c), -10.0, np.float32)
    labels = rng.integers(0, c, q_num)
    logits = np.linspace(3.0, -1.0, q_num)  # distinct scores: query k is the k-th best
    cls[0, np.arange(q_num), labels] = logits
    bbox = np.zeros((1, q_num, 10), np.float32)
    rot = rng.uniform(-np.pi, np.pi, q_num)
    bbox[0, :, 0:2] = rng.uniform(-25, 25, (q_num, 2))  # inside post_center_range
    bbox[0, :, 2:4] = np.log(rng.uniform(0.4, 8, (q_num, 2)))  # log w, log l
    bbox[0, :, 4] = rng.normal(0, 1, q_num)
    bbox[0, :, 5] = np.log(rng.uniform(0.5, 4, q_num))
    bbox[0, :, 6], bbox[0, :, 7] = np.sin(rot), np.cos(rot)
    bbox[0, :, 8:10] = rng.normal(0, 2, (q_num, 2))
    boxes = decode_bevformer(cfg, {"cls_scores": cls, "bbox_preds": bbox}, max_num=q_num)
    assert len(boxes) == q_num and np.all(np.diff(boxes.scores) < 0)

    l2e_q = np.array([0.7071, 0.0, 0.0, 0.7071]) + rng.normal(0, 0.01, 4)  # LIDAR_TOP is turned by ~90 degrees
    l2e_q /= np.linalg.norm(l2e_q)
    e2g_q = yaw_quaternion(2.5)
    l2e_t, e2g_t = [0.94, 0.0, 1.84], [600.0, 1640.0, 0.0]
    names = nuscenes_class_names(cfg)
    mine = boxes_to_nuscenes(boxes, names, "tok", pose_matrix(l2e_t, l2e_q), pose_matrix(e2g_t, e2g_q))
    scores = 1 / (1 + np.exp(-cls[0, np.arange(q_num), labels].astype(np.float64)))
    ref = ref_bevformer_017(bbox[0], scores, labels, names, l2e_t, l2e_q, e2g_t, e2g_q, "tok")
    # Same float32 outputs on both sides; the quaternion's sign is the info's in 0.17, pyquaternion's from the
    # matrix here (1.x): the same rotation.
    assert_same_boxes(mine, ref, tol=1e-9, up_to_sign=True)


def test_centerpoint_decode_and_training_targets_agree_on_the_convention(small_recipe):
    from deploykit.detection import centerpoint_targets as ct

    cfg = small_recipe.model
    # One car, 4.5 m long (along its heading, yaw 0.6), 1.9 m wide: deploykit's targets take mmdet3d 1.x boxes
    # (x, y, z, dx = l, dy = w, dz, yaw) and velocities.
    gt = np.array([[6.0, -4.0, -0.5, 4.5, 1.9, 1.6, 0.6]], np.float32)
    tasks = ct.targets(cfg, gt, np.array([0]), np.array([[2.0, -1.0]], np.float32))
    boxes = decode_centerpoint(cfg, ct.oracle_outputs(cfg, tasks))
    assert len(boxes) == 1
    np.testing.assert_allclose(boxes.dims[0], [4.5, 1.9, 1.6], rtol=1e-5)
    assert boxes.yaw[0] == pytest.approx(0.6, abs=1e-5)
    np.testing.assert_allclose(boxes.velocity[0], [2.0, -1.0], rtol=1e-6)
    sub = boxes_to_nuscenes(boxes, nuscenes_class_names(cfg), "t", np.eye(4), np.eye(4))[0]
    np.testing.assert_allclose(sub["size"], [1.9, 4.5, 1.6], rtol=1e-5)  # nuScenes w, l, h
    np.testing.assert_allclose(sub["rotation"], yaw_quaternion(0.6), atol=1e-5)
    assert sub["detection_name"] == "car" and sub["attribute_name"] == "vehicle.moving"


def test_nuscenes_class_names_maps_cyclists():
    from deploykit.recipe import load_recipe

    assert nuscenes_class_names(load_recipe("centerpoint_pillar_synth").model) == ["car", "pedestrian", "bicycle"]
    assert nuscenes_class_names(load_recipe("centerpoint_pillar_small").model) == ["car", "pedestrian", "cyclist"]
    with pytest.raises(ValueError, match="nuscenes_names"):
        boxes_to_nuscenes(Boxes(np.zeros((1, 3)), np.ones((1, 3)), np.zeros(1), np.ones(1), np.array([2])),
                          ["car", "pedestrian", "cyclist"], "t", np.eye(4), np.eye(4))


def test_range_filter_and_attributes_by_hand():
    # car range 50: 50 m is kept (mmdet3d drops only radius > range), 50.01 m dropped; in the ego frame, after
    # the LiDAR's 1 m forward offset.
    l2e = pose_matrix([1.0, 0.0, 1.8], yaw_quaternion(0.0))
    b = Boxes(np.array([[49.0, 0, 0], [49.01, 0, 0], [0, 30.0, 0], [0, 29.9, 0]]), np.ones((4, 3)), np.zeros(4),
              np.array([0.9, 0.8, 0.7, 0.6]), np.array([0, 0, 9, 9]),
              np.array([[0.3, 0.0], [0.0, 0.0], [1.0, 0.0], [0.0, 0.0]]))
    out = boxes_to_nuscenes(b, NAMES, "t", l2e, np.eye(4))
    # The barriers are sqrt(1 + 30^2) > 30 and sqrt(1 + 29.9^2) < 30 m from the ego.
    assert [o["detection_score"] for o in out] == [0.9, 0.6]
    assert out[0]["attribute_name"] == "vehicle.moving"
    for name in NAMES:
        assert default_attribute(name, (0.0, 0.0)) == {"pedestrian": "pedestrian.standing",
                                                       "bus": "vehicle.stopped"}.get(name, DEFAULT_ATTRIBUTE[name])
    assert default_attribute("bicycle", (0.2, 0.1)) == "cycle.with_rider"
    assert default_attribute("bicycle", (0.2, 0.0)) == "cycle.without_rider"  # 0.2 is not > 0.2
    assert default_attribute("pedestrian", (0.0, -1.0)) == "pedestrian.moving"
    assert default_attribute("bus", (5.0, 0.0)) == "vehicle.moving"
    assert default_attribute("traffic_cone", (5.0, 0.0)) == ""


def test_barrier_range_is_in_the_ego_frame():
    l2e = pose_matrix([0.0, 1.5, 0.0], yaw_quaternion(np.pi / 2))  # LiDAR x is ego y
    b = Boxes(np.array([[28.0, 0, 0], [29.0, 0, 0]]), np.ones((2, 3)), np.zeros(2), np.array([0.9, 0.8]),
              np.array([9, 9]))
    out = boxes_to_nuscenes(b, NAMES, "t", l2e, np.eye(4))
    assert [o["translation"][1] for o in out] == [pytest.approx(29.5)]  # 30.5 m from the ego: dropped
    np.testing.assert_allclose(out[0]["rotation"], yaw_quaternion(np.pi / 2), atol=1e-12)


def test_annotations_to_boxes_inverts_boxes_to_nuscenes():
    rng = np.random.default_rng(9)
    n = 30
    boxes = Boxes(np.column_stack([rng.uniform(-18, 18, (n, 2)), rng.normal(0, 1, n)]), rng.uniform(0.5, 6, (n, 3)),
                  rng.uniform(-np.pi, np.pi, n), rng.random(n), rng.integers(0, 10, n), rng.normal(0, 2, (n, 2)))
    l2e, _ = _random_pose(rng, tilt=0.0)
    e2g, _ = _random_pose(rng, tilt=0.0, scale=500)
    sub = boxes_to_nuscenes(boxes, NAMES, "t", l2e, e2g)
    assert len(sub) == n
    back = annotations_to_boxes(sub, NAMES, l2e, e2g)
    for f in ("centers", "dims", "scores", "labels", "velocity"):
        np.testing.assert_allclose(getattr(back, f), getattr(boxes, f), rtol=0, atol=1e-9)
    np.testing.assert_allclose(np.angle(np.exp(1j * (back.yaw - boxes.yaw))), 0, atol=1e-9)
    assert len(annotations_to_boxes(sub, ["car"], l2e, e2g)) == int(np.sum(boxes.labels == 0))


def test_write_submission(tmp_path):
    b = Boxes(np.array([[5.0, 0, 0]]), np.ones((1, 3)), np.zeros(1), np.array([0.5]), np.array([0]),
              np.array([[np.nan, np.nan]]))
    results = {"tok": boxes_to_nuscenes(b, NAMES, "tok", np.eye(4), np.eye(4)), "empty": []}
    path = tmp_path / "sub" / "results_nusc.json"
    doc = write_submission(path, results, {"use_lidar": True})
    back = json.loads(path.read_text())
    assert back == json.loads(json.dumps(doc)) and list(back["meta"]) == list(META_KEYS)
    assert back["meta"]["use_lidar"] is True and back["meta"]["use_camera"] is False
    assert list(back["results"]) == ["tok", "empty"] and back["results"]["tok"][0]["detection_name"] == "car"
    assert np.isnan(back["results"]["tok"][0]["velocity"]).all()  # NaN velocity, as Python's json reads it
    assert [p.name for p in path.parent.iterdir()] == ["results_nusc.json"]  # no partial file left
    with pytest.raises(ValueError, match="meta"):
        write_submission(path, results, {"use_lidr": True})
    with pytest.raises(ValueError, match="at most"):
        write_submission(path, {"tok": results["tok"] * 3}, max_boxes_per_sample=2)
    bad = dict(results["tok"][0], detection_name="cyclist")
    with pytest.raises(ValueError, match="detection_name"):
        write_submission(path, {"tok": [bad]})
    with pytest.raises(ValueError, match="sample_token"):
        write_submission(path, {"other": results["tok"]})
    assert json.loads(path.read_text()) == back  # failed writes left the file as it was
