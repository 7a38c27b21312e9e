import dataclasses

import numpy as np
import pytest

from deploykit.detection import centerpoint_targets as ct
from deploykit.detection.decode import Boxes
from deploykit.detection.evaluate import centerpoint_detections, evaluate, labelled_scenes, points_in_boxes
from deploykit.errors import RecipeError
from deploykit.models import build_model
from deploykit.recipe import load_recipe


def test_points_in_boxes_matches_a_per_point_loop():
    rng = np.random.default_rng(0)
    boxes = np.column_stack([rng.uniform(-5, 5, (6, 3)), rng.uniform(0.5, 4, (6, 3)), rng.uniform(-np.pi, np.pi, 6)])
    points = rng.uniform(-8, 8, (3000, 3))
    expected = []
    for x, y, z, length, width, height, yaw in boxes:
        d = points - [x, y, z]
        along = d[:, 0] * np.cos(yaw) + d[:, 1] * np.sin(yaw)
        across = -d[:, 0] * np.sin(yaw) + d[:, 1] * np.cos(yaw)
        expected.append(int(np.sum((np.abs(along) <= length / 2) & (np.abs(across) <= width / 2)
                                   & (np.abs(d[:, 2]) <= height / 2))))
    assert points_in_boxes(points, boxes).tolist() == expected
    assert sum(expected) > 0


def test_circle_nms_runs_per_task_with_the_recipe_radii():
    cfg = load_recipe("centerpoint_pillar_synth").model  # min_radius = [4, 0.175]: car, pedestrian + cyclist
    # Two cars 1.5 m apart (within 2 m: one survives), a pedestrian and a cyclist 0.3 m apart
    # (within 0.42 m, same task: one survives) and a pedestrian on top of a car (other task: kept).
    centers = np.array([[0, 0, 0], [1.5, 0, 0], [10, 10, 0], [10.3, 10, 0], [0.1, 0, 0]], float)
    boxes = Boxes(centers, np.ones((5, 3)), np.zeros(5), np.array([0.9, 0.8, 0.7, 0.6, 0.5]), np.array([0, 0, 1, 2, 1]))
    import deploykit.detection.evaluate as ev

    original = ev.decode_centerpoint
    ev.decode_centerpoint = lambda cfg, outputs: boxes
    try:
        kept = centerpoint_detections(cfg, {})
    finally:
        ev.decode_centerpoint = original
    assert sorted(kept.scores.tolist()) == [0.5, 0.7, 0.9]
    no_nms = dataclasses.replace(cfg, head=dataclasses.replace(cfg.head, min_radius=()))
    ev.decode_centerpoint = lambda cfg, outputs: boxes
    try:
        assert len(centerpoint_detections(no_nms, {})) == 5
    finally:
        ev.decode_centerpoint = original


@pytest.fixture(scope="module")
def synth_scenes():
    recipe = load_recipe("centerpoint_pillar_synth")
    return recipe, labelled_scenes(recipe, build_model(recipe), range(3))


def test_an_oracle_scores_full_map_and_noise_scores_less(synth_scenes):
    recipe, scenes = synth_scenes
    cfg = recipe.model
    by_feeds = {id(s.feeds["pillars"]): (gt, n) for s, gt, n in scenes}

    def oracle(feeds, jitter=0.0, turn=0.0):
        gt, points = by_feeds[id(feeds["pillars"])]
        seen = points > 0  # the metric drops ground truth without LiDAR points; predicting them would be FPs
        boxes = np.column_stack([gt.centers, gt.dims, gt.yaw])[seen]
        boxes[:, :2] += jitter
        boxes[:, 6] += turn
        return ct.oracle_outputs(cfg, ct.targets(cfg, boxes, gt.labels[seen]))

    perfect = evaluate(recipe, scenes, oracle)
    assert perfect["mAP"] == pytest.approx(1.0) and perfect["nuscenes"]["mAP"] == pytest.approx(1.0)
    tp = perfect["tp_errors"]
    # Exact boxes: no translation, scale, orientation or velocity error (the oracle's sub-cell offsets and
    # log sizes round-trip to within float32); attributes follow mmdet3d's speed rule, so a standing cyclist
    # is "without rider" where the synthetic one rides: AAE 1 for that class, 1/3 over three.
    assert tp["mATE"] < 1e-3 and tp["mASE"] < 1e-4 and tp["mAOE"] < 1e-4 and tp["mAVE"] < 1e-6
    assert tp["mAAE"] == pytest.approx(1 / 3)
    assert perfect["NDS"] == pytest.approx((5 + 4 + 2 / 3) / 10, abs=1e-3)
    assert sum(perfect["num_gt"].values()) > 20
    # Headings 0.5 rad off: mAP cannot see it, AOE can.
    turned = evaluate(recipe, scenes, lambda feeds: oracle(feeds, turn=0.5))
    assert turned["mAP"] == pytest.approx(1.0) and turned["tp_errors"]["mAOE"] == pytest.approx(0.5, abs=1e-4)
    # Every centre 0.75 m off (1.06 m in the plane): a TP only at the 2 and 4 m thresholds.
    shifted = evaluate(recipe, scenes, lambda feeds: oracle(feeds, 0.75))
    assert shifted["mAP"] == pytest.approx(0.5)


def test_labelled_scenes_map_classes_by_name():
    nus = load_recipe("centerpoint_pillar_nus")  # has car and pedestrian, but bicycle, not cyclist
    names = [n for t in nus.model.head.tasks for n in t.class_names]
    (_, gt, _), = labelled_scenes(nus, build_model(nus), [4])
    assert set(gt.labels.tolist()) <= {names.index("car"), names.index("pedestrian")}
    synth = load_recipe("centerpoint_pillar_synth")
    (_, all_gt, _), = labelled_scenes(synth, build_model(synth), [4])
    assert len(gt) < len(all_gt)  # the cyclists are gone
    other = dataclasses.replace(nus, model=dataclasses.replace(nus.model, head=dataclasses.replace(
        nus.model.head, tasks=(dataclasses.replace(nus.model.head.tasks[1]),), min_radius=())))
    with pytest.raises(RecipeError, match="none of the synthetic scene classes"):
        labelled_scenes(other, None, [4])
