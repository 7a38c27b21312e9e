import time

import numpy as np
import pytest
from PIL import Image

from deploykit.detection.bev_picture import bev_picture, box_corners_bev, class_colors, heading_ticks
from deploykit.detection.decode import Boxes

NAMES = ["car", "pedestrian", "bicycle", "barrier"]
RANGE = (-40.0, -40.0, -5.0, 40.0, 40.0, 3.0)


def _boxes(centers, dims, yaw, labels, scores=None):
    centers = np.asarray(centers, float).reshape(-1, 3)
    n = len(centers)
    return Boxes(centers, np.asarray(dims, float).reshape(n, 3), np.asarray(yaw, float).reshape(n),
                 np.asarray(scores if scores is not None else np.linspace(0.9, 0.3, n)), np.asarray(labels))


def test_geometry_corners_and_heading_tick():
    # A 4 m x 2 m box at (10, 0) heading +y (yaw pi/2): its front edge is at y = 2, its left side at x = 9.
    c = box_corners_bev([[10, 0, 0]], [[4, 2, 1.5]], [np.pi / 2])[0]
    np.testing.assert_allclose(c, [[9, 2], [11, 2], [11, -2], [9, -2]], atol=1e-12)
    tick = heading_ticks([[10, 0, 0]], [[4, 2, 1.5]], [np.pi / 2])[0]
    np.testing.assert_allclose(tick, [[10, 0], [10, 2]], atol=1e-12)
    # yaw 0: front along +x; yaw pi: along -x.
    np.testing.assert_allclose(heading_ticks([[0, 0, 0]] * 2, [[4, 2, 1]] * 2, [0.0, np.pi])[:, 1],
                               [[2, 0], [-2, 0]], atol=1e-12)
    # The tick ends on the middle of the front edge (corners 0 and 1).
    rng = np.random.default_rng(0)
    cen, dims, yaw = rng.normal(0, 5, (20, 3)), rng.uniform(0.5, 5, (20, 3)), rng.uniform(-4, 4, 20)
    np.testing.assert_allclose(heading_ticks(cen, dims, yaw)[:, 1], box_corners_bev(cen, dims, yaw)[:, :2].mean(1),
                               atol=1e-12)


def test_class_colours_differ():
    ten = ["car", "truck", "bus", "trailer", "construction_vehicle", "pedestrian", "motorcycle", "bicycle",
           "traffic_cone", "barrier", "extra1", "extra2"]
    colors = class_colors(ten)
    assert len(set(colors.values())) == len(ten)


def _colour_pixels(img, rgb, tol=12):
    a = np.asarray(img.convert("RGB")).astype(int)
    return int((np.abs(a - np.array(rgb) * 255).max(-1) <= tol).sum())


def test_writes_png_with_boxes_in_their_class_colours(tmp_path):
    rng = np.random.default_rng(1)
    pts = np.column_stack([rng.uniform(-50, 50, (20000, 2)), rng.uniform(-3, 2, 20000), rng.random(20000)])
    pred = _boxes([[10, 5, 0], [-15, -10, 0], [20, -20, 0]], [[4.5, 1.9, 1.6], [0.8, 0.8, 1.8], [1.8, 0.6, 1.4]],
                  [0.3, 0.0, -1.0], [0, 1, 2])
    gt = _boxes([[10.5, 5, 0]], [[4.4, 1.9, 1.6]], [0.25], [0])
    info = bev_picture(tmp_path / "f.png", pts, pred, gt, point_cloud_range=RANGE, class_names=NAMES,
                       title="scene-0001 frame 3", show_scores=True, figsize=(9, 8), dpi=100)
    img = Image.open(info["path"])
    assert img.format == "PNG" and img.size == (900, 800) == info["size"]
    # Only the classes drawn, in class order, then the line styles.
    assert info["legend"] == ["car", "pedestrian", "bicycle", "prediction", "ground truth"]
    colors = class_colors(NAMES)
    drawn = {n: _colour_pixels(img, colors[n]) for n in NAMES}
    assert drawn["car"] > 20 and drawn["pedestrian"] > 5 and drawn["bicycle"] > 5 and drawn["barrier"] == 0


def test_car_is_drawn_where_it_is(tmp_path):
    # Empty frame but one long car at the top right: its colour shows up only in that quadrant.
    pred = _boxes([[25, 25, 0]], [[10, 3, 2]], [0.0], [0])
    info = bev_picture(tmp_path / "q.png", None, pred, point_cloud_range=RANGE, class_names=NAMES)
    a = np.asarray(Image.open(info["path"]).convert("RGB")).astype(int)
    mask = np.abs(a - np.array(class_colors(NAMES)["car"]) * 255).max(-1) <= 12
    ys, xs = np.nonzero(mask)
    # x = 25 m is 65/80 of the way from the left of the plot area, y = 25 m 15/80 from its top.
    left, top, right, bottom = info["plot_area"]
    assert right - left == pytest.approx(bottom - top, abs=1.5)  # equal aspect on a square range
    legend = xs > right + 2  # the legend patch, outside the plot
    assert legend.any()
    cx, cy = left + (right - left) * 65 / 80, top + (bottom - top) * 15 / 80
    assert abs(xs[~legend].mean() - cx) < 3 and abs(ys[~legend].mean() - cy) < 3
    # Heading +x: on the centre row the tick colours the half from the centre to the front edge, not the rear half.
    half = (right - left) * 5 / 80  # l / 2 = 5 m in pixels
    near = np.abs(np.arange(a.shape[0]) - cy) <= 1
    band = mask[near].any(0)
    cols = np.arange(a.shape[1])
    assert band[(cols > cx + 3) & (cols < cx + half - 3)].all()
    assert not band[(cols > cx - half + 3) & (cols < cx - 3)].any()
    assert info["legend"] == ["car", "prediction"]


def test_fast_and_rejects_bad_labels(tmp_path):
    rng = np.random.default_rng(2)
    pts = np.column_stack([rng.uniform(-50, 50, (250000, 2)), rng.uniform(-3, 2, 250000)])
    pred = _boxes(rng.uniform(-35, 35, (150, 3)), rng.uniform(0.5, 5, (150, 3)), rng.uniform(-3, 3, 150),
                  rng.integers(0, 4, 150))
    bev_picture(tmp_path / "warm.png", pts[:10], pred, point_cloud_range=RANGE, class_names=NAMES)
    start = time.perf_counter()
    bev_picture(tmp_path / "t.png", pts, pred, pred, point_cloud_range=RANGE, class_names=NAMES, show_scores=True)
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0, elapsed  # ~0.3 s here; the budget is 0.5 s per frame
    with pytest.raises(ValueError, match="class_names"):
        bev_picture(tmp_path / "x.png", None, _boxes([[0, 0, 0]], [[1, 1, 1]], [0], [7]), point_cloud_range=RANGE,
                    class_names=NAMES)
    assert not (tmp_path / "x.png").exists()
