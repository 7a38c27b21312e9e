import json

import numpy as np
import pytest

from deploykit.detection.agreement import agreement, match_count
from deploykit.detection.decode import Boxes, circle_nms, decode_bevformer, decode_centerpoint


def test_bevformer_decode_follows_nms_free_coder(bev_recipe):
    cfg = bev_recipe.model
    cls = np.full((1, 4, 3), -10.0, np.float32)
    cls[0, 2, 1] = 3.0  # best: query 2, class 1
    cls[0, 0, 2] = 1.0
    bbox = np.zeros((1, 4, 10), np.float32)
    bbox[0, 2] = [5.0, -3.0, np.log(2.0), np.log(4.0), 0.5, np.log(1.5), 1.0, 0.0, 0.1, 0.2]
    bbox[0, 0, :2] = [500.0, 0.0]  # outside post_center_range
    boxes = decode_bevformer(cfg, {"cls_scores": cls, "bbox_preds": bbox}, max_num=2)
    assert len(boxes) == 1 and boxes.labels.tolist() == [1]
    np.testing.assert_allclose(boxes.centers[0], [5.0, -3.0, 0.5])
    # denormalize_bbox gives w=2, l=4, h=1.5 and the 0.x rot atan2(sin=1, cos=0) = pi/2; deploykit's boxes are
    # (l, w, h) with the 1.x heading -rot - pi/2, as BEVFormer's output_to_nusc_box builds the nuScenes box.
    np.testing.assert_allclose(boxes.dims[0], [4.0, 2.0, 1.5], rtol=1e-6)
    assert boxes.yaw[0] == pytest.approx(-np.pi)
    np.testing.assert_allclose(boxes.velocity[0], [0.1, 0.2], rtol=1e-6)
    assert boxes.scores[0] == pytest.approx(1 / (1 + np.exp(-3.0)))


def test_centerpoint_decode_puts_peaks_in_metres(small_recipe):
    cfg = small_recipe.model
    v, stride = cfg.voxelization, cfg.output_stride
    outputs = {}
    for t, task in enumerate(cfg.head.tasks):
        h = w = v.grid_size[0] // stride
        heat = np.full((1, len(task.class_names), h, w), -10.0, np.float32)
        outputs.update({f"task{t}.heatmap": heat, f"task{t}.reg": np.zeros((1, 2, h, w), np.float32),
                        f"task{t}.height": np.zeros((1, 1, h, w), np.float32),
                        f"task{t}.dim": np.zeros((1, 3, h, w), np.float32),
                        f"task{t}.rot": np.zeros((1, 2, h, w), np.float32),
                        f"task{t}.vel": np.zeros((1, 2, h, w), np.float32)})
    outputs["task1.heatmap"][0, 1, 3, 5] = 4.0  # task 1, its second class
    outputs["task1.reg"][0, :, 3, 5] = [0.25, 0.5]
    outputs["task1.rot"][0, :, 3, 5] = [0.0, -1.0]
    outputs["task1.vel"][0, :, 3, 5] = [1.5, -0.5]
    outputs["task1.dim"][0, :, 3, 5] = np.log([4.0, 2.0, 1.5])  # log(l, w, h), as centerpoint_targets encodes
    boxes = decode_centerpoint(cfg, outputs)
    assert len(boxes) == 1
    assert boxes.labels[0] == len(cfg.head.tasks[0].class_names) + 1
    x = (5 + 0.25) * stride * v.voxel_size[0] + v.point_cloud_range[0]
    y = (3 + 0.5) * stride * v.voxel_size[1] + v.point_cloud_range[1]
    np.testing.assert_allclose(boxes.centers[0], [x, y, 0.0], rtol=1e-6)
    np.testing.assert_allclose(boxes.dims[0], [4.0, 2.0, 1.5], rtol=1e-6)
    assert boxes.yaw[0] == pytest.approx(np.pi)
    np.testing.assert_allclose(boxes.velocity[0], [1.5, -0.5])
    without_vel = {k: v for k, v in outputs.items() if not k.endswith(".vel")}
    np.testing.assert_array_equal(decode_centerpoint(cfg, without_vel).velocity, [[0.0, 0.0]])


def test_boxes_take_and_concat_keep_velocity():
    b = Boxes(np.zeros((3, 3)), np.ones((3, 3)), np.zeros(3), np.array([0.1, 0.5, 0.9]), np.array([0, 1, 2]),
              np.arange(6.0).reshape(3, 2))
    np.testing.assert_array_equal(b.take(np.array([2, 0])).velocity, [[4, 5], [0, 1]])
    both = Boxes.concat([b, b.take(np.array([1]))])
    assert len(both) == 4 and both.velocity.tolist()[-1] == [2.0, 3.0]
    assert Boxes.concat([b, _boxes([[0, 0, 0]], [0])]).velocity is None
    assert _boxes([[0, 0, 0]], [0]).take(np.array([0])).velocity is None


def _boxes(centers, labels, scores=None):
    c = np.asarray(centers, np.float64)
    n = len(c)
    return Boxes(c, np.ones((n, 3)), np.zeros(n), np.asarray(scores if scores is not None else np.ones(n)),
                 np.asarray(labels))


def test_agreement_matches_by_class_and_distance_one_to_one():
    ref = _boxes([[0, 0, 0], [10, 0, 0]], [0, 1])
    same = agreement([ref], [ref])["by_threshold"]
    assert all(v == {"recall": 1.0, "precision": 1.0} for v in same.values())
    moved = _boxes([[0.7, 0, 0], [10, 0, 0]], [0, 1])
    assert match_count(ref, moved, 0.5) == 1 and match_count(ref, moved, 1.0) == 2
    wrong_class = _boxes([[0, 0, 0]], [1])
    assert match_count(ref, wrong_class, 4.0) == 0
    # Two candidates near one reference: only the higher-scored one matches.
    two = _boxes([[0.1, 0, 0], [0.2, 0, 0]], [0, 0], scores=[0.2, 0.9])
    res = agreement([ref], [two])["by_threshold"]["0.5m"]
    assert res == {"recall": 0.5, "precision": 0.5}


def test_quantize_reports_detection_agreement(bev_quantized_dir):
    report = json.loads((bev_quantized_dir / "fidelity.json").read_text())["detection_agreement"]
    for key in ("int8", "int8_int16"):
        by = report[key]["by_threshold"]
        assert list(by) == ["0.5m", "1m", "2m", "4m"]
        recalls = [v["recall"] for v in by.values()]
        assert recalls == sorted(recalls) and recalls[-1] > 0.9


def _mmdet3d_circle_nms(dets, thresh, post_max_size=83):
    # Transcription of mmdet3d's circle_nms (box3d_nms.py), the reference.
    x1, y1, scores = dets[:, 0], dets[:, 1], dets[:, 2]
    order = scores.argsort()[::-1].astype(np.int32)
    suppressed = np.zeros(dets.shape[0], dtype=np.int32)
    keep = []
    for _i in range(dets.shape[0]):
        i = order[_i]
        if suppressed[i] == 1:
            continue
        keep.append(i)
        for _j in range(_i + 1, dets.shape[0]):
            j = order[_j]
            if suppressed[j] == 1:
                continue
            if (x1[i] - x1[j]) ** 2 + (y1[i] - y1[j]) ** 2 <= thresh:
                suppressed[j] = 1
    return keep[:post_max_size]


@pytest.mark.parametrize("seed", range(5))
def test_circle_nms_matches_mmdet3d(seed):
    rng = np.random.default_rng(seed)
    n = 200
    centers = rng.uniform(-10, 10, (n, 3)).astype(np.float32)
    centers[:20, :2] = np.round(centers[:20, :2])  # exact distance ties at the threshold
    scores = rng.choice(rng.uniform(0, 1, 150), n).astype(np.float32)  # score ties too
    boxes = _boxes(centers, rng.integers(0, 3, n), scores)
    for thresh, post in ((4.0, 83), (1.0, 500), (0.175, 10)):
        keep = _mmdet3d_circle_nms(np.column_stack([centers[:, :2], scores]), thresh, post)
        out = circle_nms(boxes, thresh, post)
        np.testing.assert_array_equal(out.centers, centers[keep])
        np.testing.assert_array_equal(out.scores, scores[keep])
        assert 0 < len(out) <= post
