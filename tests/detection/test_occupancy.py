import math
import time

import numpy as np
import pytest
import torch

from deploykit.detection.evaluate import points_in_boxes
from deploykit.detection.occupancy import (
    OccGrid,
    occupancy_argmax,
    occupancy_labels,
    occupancy_miou,
    render_markdown,
    scene_occupancy,
)
from deploykit.preprocess.synthetic_lidar import GROUND_Z, make_scene

# 0.2 x 0.2 x 0.5 m voxels; centres sit at odd tenths in x and y, so the boxes below have no
# centre exactly on a face. GROUND_Z = -1.8 lies in layer 6, [-2.0, -1.5).
GRID = OccGrid((-10.0, -10.0, -5.0, 10.0, 10.0, 3.0), (100, 100, 16))
GROUND_LAYER = 6
CAR, GROUND, FREE = 1, 2, 3


def _car(x, y, yaw, length=4.0, width=2.0, height=1.5):
    return [x, y, GROUND_Z + height / 2, length, width, height, yaw]


def test_grid_geometry():
    assert GRID.voxel_size == pytest.approx((0.2, 0.2, 0.5))
    cx, cy, cz = GRID.axis_centers
    assert (cx[0], cx[-1], cz[0], cz[-1]) == pytest.approx((-9.9, 9.9, -4.75, 2.75))
    assert GRID.centers.shape == (100, 100, 16, 3)
    assert GRID.centers[3, 5, 7] == pytest.approx([cx[3], cy[5], cz[7]])
    assert OccGrid([0, 0, 0, 1, 1, 1], [np.int64(2), 2, 2]) == OccGrid((0.0, 0.0, 0.0, 1.0, 1.0, 1.0), (2, 2, 2))
    with pytest.raises(ValueError, match="max > min"):
        OccGrid((0, 0, 0, 1, -1, 1), (2, 2, 2))
    with pytest.raises(ValueError, match="positive integers"):
        OccGrid((0, 0, 0, 1, 1, 1), (2, 0, 2))


def test_box_fills_its_volume_ground_below_free_above():
    labels = occupancy_labels(np.array([_car(3.0, -2.0, 0.0)]), [CAR], GRID,
                              ground_z=GROUND_Z, ground_class=GROUND, free_class=FREE)
    assert labels.shape == (100, 100, 16) and labels.dtype == np.uint8
    car = labels == CAR
    voxel_volume = np.prod(GRID.voxel_size)
    footprint = (4.0 / 0.2) * (2.0 / 0.2)  # voxels in one layer of the box
    assert abs(car.sum() - 4.0 * 2.0 * 1.5 / voxel_volume) <= footprint
    ix, iy, iz = np.nonzero(car)
    assert (ix.max() - ix.min() + 1, iy.max() - iy.min() + 1) == (20, 10)  # length along x
    # The box stands on the plane: it takes the layer holding the surface (a box beats the ground) and up.
    assert sorted(set(iz)) == [GROUND_LAYER, GROUND_LAYER + 1, GROUND_LAYER + 2]

    outside = ~car.any(axis=2)
    assert (labels[outside][:, : GROUND_LAYER + 1] == GROUND).all()
    assert (labels[outside][:, GROUND_LAYER + 1 :] == FREE).all()
    assert (labels[:, :, GROUND_LAYER + 3 :] == FREE).all()


def test_yaw_90_swaps_the_x_and_y_extent():
    straight = occupancy_labels(np.array([_car(3.0, -2.0, 0.0)]), [CAR], GRID,
                                ground_z=GROUND_Z, ground_class=GROUND, free_class=FREE)
    turned = occupancy_labels(np.array([_car(3.0, -2.0, np.pi / 2)]), [CAR], GRID,
                              ground_z=GROUND_Z, ground_class=GROUND, free_class=FREE)
    ix, iy, _ = np.nonzero(turned == CAR)
    assert (ix.max() - ix.min() + 1, iy.max() - iy.min() + 1) == (10, 20)
    assert (turned == CAR).sum() == (straight == CAR).sum()
    # Rotated about the box's own centre: the two footprints share it.
    assert np.nonzero(straight == CAR)[0].mean() == pytest.approx(ix.mean())


def test_ground_plane_on_a_layer_boundary_does_not_claim_the_layer_above():
    labels = occupancy_labels(np.zeros((0, 7)), [], GRID, ground_z=-2.0, ground_class=GROUND, free_class=FREE)
    assert (labels[:, :, :6] == GROUND).all() and (labels[:, :, 6:] == FREE).all()
    below = occupancy_labels(np.zeros((0, 7)), [], GRID, ground_z=-9.0, ground_class=GROUND, free_class=FREE)
    assert (below == FREE).all()


def test_labels_match_a_brute_force_test_of_every_voxel_centre():
    rng = np.random.default_rng(3)
    k = 12
    boxes = np.column_stack([rng.uniform(-9, 9, (k, 2)), rng.uniform(-3, 0, k), rng.uniform(0.5, 5, (k, 3)),
                             rng.uniform(-np.pi, np.pi, k)])
    classes = rng.integers(4, 9, k)
    labels = occupancy_labels(boxes, classes, GRID, ground_z=GROUND_Z, ground_class=GROUND, free_class=FREE)

    centers = GRID.centers
    expected = np.where(centers[..., 2] < GROUND_Z, GROUND, FREE)
    expected[:, :, GROUND_LAYER] = GROUND
    for (x, y, z, length, width, height, yaw), cls in list(zip(boxes, classes))[::-1]:  # the earlier box wins
        d = centers - [x, y, z]
        along = d[..., 0] * math.cos(yaw) + d[..., 1] * math.sin(yaw)
        across = -d[..., 0] * math.sin(yaw) + d[..., 1] * math.cos(yaw)
        inside = (np.abs(along) <= length / 2) & (np.abs(across) <= width / 2) & (np.abs(d[..., 2]) <= height / 2)
        expected[inside] = cls
    np.testing.assert_array_equal(labels, expected)
    # The rotation convention is the detector's: each box holds as many centres as points_in_boxes counts.
    alone = [occupancy_labels(b[None], [CAR], GRID, ground_z=-99, ground_class=GROUND, free_class=FREE)
             for b in boxes]
    counts = points_in_boxes(centers.reshape(-1, 3), boxes)
    assert [(a == CAR).sum() for a in alone] == counts.tolist() and counts.sum() > 0


def test_fast_on_a_full_size_grid():
    grid = OccGrid((-51.2, -51.2, -5.0, 51.2, 51.2, 3.0), (200, 200, 16))
    scene = make_scene(5, num_objects=(20, 20))
    assert len(scene.boxes) >= 15
    names = ("others", "car", "pedestrian", "cyclist", "ground", "free")
    scene_occupancy(scene, grid, names)
    best = min(_timed(lambda: scene_occupancy(scene, grid, names)) for _ in range(3))
    assert best < 0.1


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def test_scene_occupancy_maps_classes_by_name():
    grid = OccGrid((-51.2, -51.2, -5.0, 51.2, 51.2, 3.0), (200, 200, 16))
    scene = make_scene(11)
    assert {0, 2} <= set(scene.labels.tolist())  # a car and a cyclist
    names = ("others", "pedestrian", "car", "ground", "free")
    labels = scene_occupancy(scene, grid, names)
    per_box = [occupancy_labels(b[None], [1], grid, ground_z=-99, ground_class=0, free_class=0) == 1
               for b in scene.boxes]
    for inside, cls in zip(per_box, scene.labels):
        want = {0: names.index("car"), 1: names.index("pedestrian"), 2: names.index("others")}[int(cls)]
        assert inside.any() and (labels[inside] == want).all()
    assert (labels[:, :, 0] == names.index("ground")).all()
    assert (labels[:, :, -1] == names.index("free")).all()

    without_others = scene_occupancy(scene, grid, ("car", "ground", "free"))
    cyclist = per_box[list(scene.labels).index(2)]
    above = np.broadcast_to(np.arange(16) > GROUND_LAYER, grid.size)  # the same z layers as GRID
    # A class the grid lacks is dropped, not carved out as free: the ground under it stays.
    assert (without_others[cyclist & above] == 2).all() and (without_others[cyclist & ~above] == 1).all()
    assert (cyclist & ~above).any()

    with pytest.raises(ValueError, match="must end with 'free'"):
        scene_occupancy(scene, grid, ("car", "free", "ground"))
    with pytest.raises(ValueError, match="must include 'ground'"):
        scene_occupancy(scene, grid, ("car", "free"))


class _Occ3DMetric:
    """Occ3D's Metric_mIoU (CVPR2023-3D-Occupancy-Prediction, projects/mmdet3d_plugin/datasets/
    occ_metrics.py; FlashOCC's copy is identical) as the source writes it, camera mask on."""

    def __init__(self, num_classes):
        self.num_classes = num_classes
        self.hist = np.zeros((num_classes, num_classes))

    def add_batch(self, semantics_pred, semantics_gt, mask_camera):
        pred, gt = semantics_pred[mask_camera].flatten(), semantics_gt[mask_camera].flatten()
        n_cl = self.num_classes
        k = (gt >= 0) & (gt < n_cl)
        self.hist += np.bincount(n_cl * gt[k].astype(int) + pred[k].astype(int), minlength=n_cl**2).reshape(n_cl, n_cl)

    def count_miou(self):
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = np.diag(self.hist) / (self.hist.sum(1) + self.hist.sum(0) - np.diag(self.hist))
        return iou, np.nanmean(iou[: self.num_classes - 1])


def test_metric_matches_the_occ3d_source():
    rng = np.random.default_rng(0)
    n = 6  # class 3 appears in neither ground truth nor predictions; class 4 only in predictions
    reference = _Occ3DMetric(n)
    preds, gts, masks = [], [], []
    for _ in range(4):
        gt = rng.choice([0, 1, 2, 5, 255], size=(20, 20, 8), p=[0.1, 0.15, 0.05, 0.6, 0.1]).astype(np.uint8)
        pred = np.where(rng.random(gt.shape) < 0.7, gt, rng.choice([0, 1, 2, 4, 5], size=gt.shape))
        pred = np.where(gt == 255, rng.integers(0, n, gt.shape), pred).astype(np.uint8)
        mask = rng.random(gt.shape) < 0.8
        reference.add_batch(pred, gt, mask)
        preds.append(pred)
        gts.append(gt)
        masks.append(mask)
    iou, miou = reference.count_miou()
    assert np.isnan(iou[3]) and iou[4] == 0.0

    result = occupancy_miou(preds, gts, n, mask=masks)
    np.testing.assert_allclose([result["per_class"][c] for c in range(n)], iou, rtol=1e-12, equal_nan=True)
    assert result["mIoU"] == pytest.approx(miou, rel=1e-12)
    assert result["frames"] == 4
    assert result["voxels"] == sum(int(((g != 255) & m).sum()) for g, m in zip(gts, masks))
    np.testing.assert_array_equal(result["confusion"], reference.hist)


def test_perfect_prediction_scores_one():
    labels = occupancy_labels(np.array([_car(3.0, -2.0, 0.3)]), [CAR], GRID,
                              ground_z=GROUND_Z, ground_class=GROUND, free_class=FREE)
    result = occupancy_miou(labels, labels.copy(), 4)
    assert result["mIoU"] == 1.0
    assert math.isnan(result["per_class"][0])  # class 0 is nowhere


def test_absent_class_leaves_the_mean_and_a_predicted_only_class_scores_zero():
    gt = np.array([1, 1, 1, 1, 2, 2, 3, 3])
    pred = np.array([1, 1, 1, 2, 2, 2, 3, 3])
    result = occupancy_miou(pred, gt, 4)
    car, ground = 3 / 4, 2 / 3
    assert math.isnan(result["per_class"][0])
    assert result["per_class"][1] == pytest.approx(car) and result["per_class"][2] == pytest.approx(ground)
    assert result["mIoU"] == pytest.approx((car + ground) / 2)  # not / 3: class 0 is NaN and skipped

    # Predicting class 0 once, where it is not in the ground truth, makes its IoU 0 and keeps it in the mean.
    pred_zero = pred.copy()
    pred_zero[0] = 0
    result = occupancy_miou(pred_zero, gt, 4)
    assert result["per_class"][0] == 0.0
    assert result["mIoU"] == pytest.approx((0 + 2 / 4 + 2 / 3) / 3)

    # Free (the last class) is scored but left out of the mean.
    free_wrong = np.array([1, 1, 1, 1, 2, 2, 3, 1])
    result = occupancy_miou(free_wrong, gt, 4)
    assert result["per_class"][3] == pytest.approx(1 / 2)
    assert result["mIoU"] == pytest.approx((4 / 5 + 1) / 2)
    assert occupancy_miou(free_wrong, gt, 4, free_class=1)["mIoU"] == pytest.approx((1 + 1 / 2) / 2)


def test_mask_excludes_voxels():
    gt = np.full((4, 4, 2), 3, np.uint8)
    gt[:2] = 1
    pred = gt.copy()
    pred[3, :, :] = 1  # wrong, but outside the mask
    mask = np.ones(gt.shape, bool)
    mask[3] = False
    assert occupancy_miou(pred, gt, 4)["mIoU"] < 1.0
    masked = occupancy_miou(pred, gt, 4, mask=mask)
    assert masked["mIoU"] == 1.0 and masked["voxels"] == int(mask.sum())
    # A 0/1 uint8 mask, as Occ3D stores it, selects the same voxels instead of gathering by index.
    assert occupancy_miou(pred, gt, 4, mask=mask.astype(np.uint8))["voxels"] == int(mask.sum())


def test_frames_pool_into_one_histogram_not_a_mean_of_frames():
    gt_a = np.array([1] * 10 + [2] * 10 + [3] * 5)
    gt_b = np.array([1] * 2 + [2] * 10 + [3] * 5)
    pred_a = gt_a.copy()
    pred_b = np.where(gt_b == 1, 3, gt_b)  # frame b misses both of its car voxels
    pooled = occupancy_miou([pred_a, pred_b], [gt_a, gt_b], 4)
    per_frame = [occupancy_miou(p, g, 4)["mIoU"] for p, g in ((pred_a, gt_a), (pred_b, gt_b))]
    car = 10 / (12 + 10 - 10)
    assert pooled["per_class"][1] == pytest.approx(car)
    assert pooled["mIoU"] == pytest.approx((car + 1) / 2)
    assert pooled["mIoU"] == pytest.approx(occupancy_miou(np.concatenate([pred_a, pred_b]),
                                                          np.concatenate([gt_a, gt_b]), 4)["mIoU"])
    assert np.mean(per_frame) == pytest.approx(0.75) and abs(pooled["mIoU"] - 0.75) > 0.1
    assert pooled["frames"] == 2


def test_metric_rejects_what_occ3d_would_miscount():
    gt = np.zeros((2, 2, 2), np.uint8)
    with pytest.raises(ValueError, match="outside 0..3"):
        occupancy_miou(np.full_like(gt, 4), gt, 4)
    with pytest.raises(ValueError, match="occupancy_argmax"):
        occupancy_miou(np.zeros((2, 2, 2, 4)), gt, 4)
    with pytest.raises(ValueError, match="integer labels"):
        occupancy_miou(gt.astype(np.float32), gt, 4)
    with pytest.raises(ValueError, match="2 prediction frames but 1"):
        occupancy_miou([gt, gt], [gt], 4)
    # A wrong prediction where the ground truth is 255 (unobserved) is ignored, as in Occ3D.
    gt255 = gt.copy()
    gt255[0, 0, 0] = 255
    pred = np.zeros_like(gt)
    pred[0, 0, 0] = 2
    assert occupancy_miou(pred, gt255, 4)["mIoU"] == 1.0


def test_argmax_of_head_logits():
    logits = torch.randn(2, 5, 6, 3, 4)
    labels = occupancy_argmax(logits)
    assert labels.shape == (2, 5, 6, 3) and labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, logits.argmax(-1).numpy())
    assert occupancy_argmax(np.eye(300)[[7, 299]]).tolist() == [7, 299]


def test_render_markdown_names_the_classes():
    gt = np.array([1, 1, 2, 2, 3, 3])
    pred = np.array([1, 2, 2, 2, 3, 3])
    names = ["others", "car", "ground", "free"]
    result = occupancy_miou(pred, gt, 4, class_names=names)
    text = render_markdown(result)
    assert "| car | 50.00 | 2 | 1 |" in text
    assert "| others | - | 0 | 0 |" in text
    assert "free (not in mIoU)" in text
    assert f"**mIoU** {100 * (0.5 + 2 / 3) / 2:.2f}" in text
    assert "| 1 | 50.00 |" in render_markdown(occupancy_miou(pred, gt, 4))
    with pytest.raises(ValueError, match="3 class names for 4"):
        render_markdown(result, names[:3])
