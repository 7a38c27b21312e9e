import json
import math

import numpy as np
import pytest

from deploykit.data.frames import Annotation, SensorFrame, pose_matrix, yaw_quaternion
from deploykit.detection.nuscenes_eval import (DETECTION_NAMES, TP_METRICS, TP_SHORT, EvalConfig, evaluate_frames,
                                               evaluate_nuscenes, points_in_rack, quaternion_yaws, render_markdown)

ATTRS = {"car": ["vehicle.moving", "vehicle.parked", "vehicle.stopped"],
         "pedestrian": ["pedestrian.moving", "pedestrian.standing", "pedestrian.sitting_lying_down"],
         "bicycle": ["cycle.with_rider", "cycle.without_rider"]}
for _c in ("truck", "bus", "trailer", "construction_vehicle"):
    ATTRS[_c] = ATTRS["car"]
ATTRS["motorcycle"] = ATTRS["bicycle"]
ATTRS["barrier"] = ATTRS["traffic_cone"] = []
# Offsets of length exactly on the thresholds (0.5, 1, 2, 4 m), not exact in binary (0.3, 0.4), and zero.
OFFSETS = [(0.0, 0.0), (0.5, 0.0), (0.0, -1.0), (2.0, 0.0), (0.0, 4.0), (0.3, 0.4), (-1.2, 1.6), (0.25, 0.0)]


def _quat(rng, yaw):
    q = yaw_quaternion(yaw)
    if rng.random() < 0.2:  # a little roll/pitch, and not of unit norm
        q = q + rng.normal(0, 0.05, 4)
        q *= rng.uniform(0.9, 1.1) / np.linalg.norm(q)
    if rng.random() < 0.3:
        q = -q
    return q


def _yaw(q):
    v = np.array([q[0] ** 2 + q[1] ** 2 - q[2] ** 2 - q[3] ** 2, 2 * (q[1] * q[2] + q[0] * q[3])])
    return float(np.arctan2(v[1], v[0]))


def _attr(rng, name):
    options = ATTRS[name]
    if not options or rng.random() < 0.1:
        return ""
    return options[int(rng.integers(len(options)))]


def random_case(rng, classes=DETECTION_NAMES, n_samples=8, max_gt=24):
    """GT (Annotation), predictions (submission dicts), ego translations and bike racks over several samples."""
    gt, preds, ego, racks = {}, {}, {}, {}
    score_set = np.array([0.15, 0.4, 0.4, 0.6, 0.85])  # repeated values: confidence ties across samples
    for s in range(n_samples):
        token = f"tok{s:02d}"
        e = np.array([rng.integers(300, 1500) * 0.5, rng.integers(300, 1500) * 0.5, 0.0])
        ego[token] = e
        anns, boxes, rack_list = [], [], []
        for k in range(int(rng.integers(0, max_gt + 1))):
            name = classes[int(rng.integers(len(classes)))]
            if rng.random() < 0.6:  # a grid: distances land on the thresholds and the class ranges (30, 40, 50)
                off = np.append(rng.integers(-18, 19, 2) * 2.5, rng.normal())
            else:
                off = np.append(rng.uniform(-58, 58, 2), rng.normal())
            t = e + off
            size = rng.uniform([0.3, 0.3, 0.4], [3.0, 12.0, 4.0])
            yaw = rng.uniform(-np.pi, np.pi)
            vel = rng.normal(0, 3, 2) if rng.random() > 0.15 else np.array([np.nan, np.nan])
            pts = int(rng.choice([0, 1, 3, 40], p=[0.15, 0.25, 0.3, 0.3]))
            anns.append(Annotation(f"{token}_a{k}", t, size, _quat(rng, yaw), vel, name, _attr(rng, name), pts))
            if name in ("bicycle", "motorcycle") and rng.random() < 0.4:  # a rack around it (or just beside it)
                centre = t + (0 if rng.random() < 0.7 else rng.normal(0, 2, 3))
                rack_list.append(Annotation(f"{token}_r{k}", centre, np.array([2.0, 4.0, 1.5]),
                                            yaw_quaternion(rng.uniform(-np.pi, np.pi)), np.zeros(2),
                                            "bicycle", "", 5))
            for _ in range(int(rng.integers(0, 3))):
                o = OFFSETS[int(rng.integers(len(OFFSETS)))] if rng.random() < 0.6 else rng.normal(0, 1.2, 2)
                p_name = name if rng.random() < 0.85 else classes[int(rng.integers(len(classes)))]
                p_yaw = yaw + rng.normal(0, 0.3) + (np.pi if rng.random() < 0.2 else 0.0)
                p_vel = vel + rng.normal(0, 0.5, 2) if rng.random() > 0.1 else np.array([np.nan, np.nan])
                boxes.append((t + np.array([o[0], o[1], rng.normal(0, 0.2)]), size * rng.uniform(0.7, 1.3, 3),
                              _quat(rng, p_yaw), p_vel, p_name))
        for _ in range(int(rng.integers(0, 6))):
            p_name = classes[int(rng.integers(len(classes)))]
            boxes.append((e + np.append(rng.uniform(-60, 60, 2), 0.0), rng.uniform(0.3, 5, 3),
                          _quat(rng, rng.uniform(-np.pi, np.pi)), rng.normal(0, 2, 2), p_name))
        scores = rng.choice(score_set, len(boxes)) if rng.random() < 0.7 else rng.random(len(boxes))
        preds[token] = [{"sample_token": token, "translation": b[0].tolist(), "size": b[1].tolist(),
                         "rotation": b[2].tolist(), "velocity": b[3].tolist(), "detection_name": b[4],
                         "detection_score": float(sc), "attribute_name": _attr(rng, b[4])}
                        for b, sc in zip(boxes, scores)]
        gt[token] = anns
        racks[token] = rack_list
    return gt, preds, ego, racks


# ---------------------------------------------------------------------------------------------------------------
# (a) Against nuscenes-devkit itself.
# ---------------------------------------------------------------------------------------------------------------

class FakeNuScenes:
    """The few NuScenes.get look-ups add_center_dist and filter_eval_boxes make."""

    def __init__(self, ego, racks):
        self.ego, self.racks = ego, racks

    def get(self, table, token):
        if table == "sample":
            return {"data": {"LIDAR_TOP": token}, "anns": [f"{token}|{i}" for i in range(len(self.racks[token]))]}
        if table == "sample_data":
            return {"ego_pose_token": token}
        if table == "ego_pose":
            return {"translation": [float(x) for x in self.ego[token]]}
        if table == "sample_annotation":
            sample, i = token.split("|")
            r = self.racks[sample][int(i)]
            return {"category_name": "static_object.bicycle_rack", "translation": list(r.translation),
                    "size": list(r.size), "rotation": list(r.rotation)}
        raise KeyError(table)


def devkit_metrics(gt, preds, ego, racks, classes):
    from nuscenes.eval.common.data_classes import EvalBoxes
    from nuscenes.eval.common.loaders import add_center_dist, filter_eval_boxes
    from nuscenes.eval.detection.config import config_factory
    from nuscenes.eval.detection.data_classes import DetectionBox
    from nuscenes.eval.detection.evaluate import DetectionEval

    cfg = config_factory("detection_cvpr_2019")
    if list(classes) != list(cfg.class_range):  # the devkit's DetectionConfig insists on all ten: set it after
        cfg.class_range = {c: cfg.class_range[c] for c in classes}
        cfg.class_names = cfg.class_range.keys()
    nusc = FakeNuScenes(ego, racks)
    pred_eb, gt_eb = EvalBoxes(), EvalBoxes()
    for token, boxes in preds.items():  # load_prediction: EvalBoxes.deserialize of the results, in file order
        pred_eb.add_boxes(token, [DetectionBox.deserialize(b) for b in boxes if b["detection_name"] in classes])
    for token, anns in gt.items():  # load_gt
        gt_eb.add_boxes(token, [DetectionBox(sample_token=token, translation=list(a.translation), size=list(a.size),
                                             rotation=list(a.rotation), velocity=a.velocity, num_pts=a.num_pts,
                                             detection_name=a.detection_name, attribute_name=a.attribute_name)
                                for a in anns if a.detection_name in classes])
    ev = DetectionEval.__new__(DetectionEval)  # __init__ wants a database and a file; the rest is evaluate()
    ev.cfg, ev.verbose = cfg, False
    ev.pred_boxes = filter_eval_boxes(nusc, add_center_dist(nusc, pred_eb), cfg.class_range)
    ev.gt_boxes = filter_eval_boxes(nusc, add_center_dist(nusc, gt_eb), cfg.class_range)
    metrics, _ = ev.evaluate()
    return metrics, ev


def _same(a, b, tol):
    if a is None or (isinstance(a, float) and math.isnan(a)):
        return b is None or math.isnan(b)
    return b is not None and not math.isnan(b) and abs(a - b) <= tol


def compare(res, metrics, classes, tol=1e-12):
    """Largest difference of any metric; asserts every one within ``tol``."""
    worst = 0.0

    def check(mine, ref, what):
        nonlocal worst
        assert _same(mine, ref, tol), (what, mine, ref)
        if mine is not None and not math.isnan(ref):
            worst = max(worst, abs(mine - ref))

    check(res["mAP"], metrics.mean_ap, "mAP")
    check(res["NDS"], metrics.nd_score, "NDS")
    tp_err, tp_sc = metrics.tp_errors, metrics.tp_scores
    for m in TP_METRICS:
        check(res["tp_errors"]["m" + TP_SHORT[m]], tp_err[m], m)
        check(res["tp_scores"]["m" + TP_SHORT[m]], tp_sc[m], m + " score")
    for c in classes:
        check(res["per_class"][c]["AP"], metrics.mean_dist_aps[c], f"{c} AP")
        for th in (0.5, 1.0, 2.0, 4.0):
            check(res["per_class"][c]["AP_by_threshold"][f"{th}m"], metrics.get_label_ap(c, th), f"{c} AP@{th}")
        for m in TP_METRICS:
            check(res["per_class"][c][TP_SHORT[m]], metrics.get_label_tp(c, m), f"{c} {m}")
    return worst


SUBSET = ("car", "pedestrian", "bicycle")


@pytest.mark.parametrize("seed", range(8))
def test_equals_devkit_all_classes_and_a_subset(seed):
    pytest.importorskip("nuscenes")
    rng = np.random.default_rng(seed)
    worst = 0.0
    for classes in (DETECTION_NAMES, SUBSET, ("barrier", "traffic_cone", "motorcycle")):
        gt, preds, ego, racks = random_case(rng, classes=DETECTION_NAMES if classes == SUBSET else classes)
        metrics, ev = devkit_metrics(gt, preds, ego, racks, classes)
        res = evaluate_nuscenes(gt, preds, ego, bike_racks=racks,
                                class_names=None if classes == DETECTION_NAMES else classes)
        worst = max(worst, compare(res, metrics, classes))
        for c in classes:
            assert res["num_gt"][c] == sum(b.detection_name == c for b in ev.gt_boxes.all)
            assert res["num_pred"][c] == sum(b.detection_name == c for b in ev.pred_boxes.all)
        json.dumps(res, allow_nan=False)
    print(f"max |deploykit - devkit| over every metric, seed {seed}: {worst:.3g}")


def test_devkit_cases_cover_what_they_should():
    # The random cases above exercise every filter, NaN velocities, ties and on-threshold distances.
    pytest.importorskip("nuscenes")
    rng = np.random.default_rng(0)
    seen = {"racks": 0, "rack_drops": 0, "zero_pts": 0, "nan_vel": 0, "out_of_range": 0}
    for _ in range(8):
        gt, preds, ego, racks = random_case(rng)
        res = evaluate_nuscenes(gt, preds, ego, bike_racks=racks)
        no_racks = evaluate_nuscenes(gt, preds, ego)
        seen["racks"] += sum(len(r) for r in racks.values())
        seen["rack_drops"] += no_racks["filtering"]["gt"]["after_bike_racks"] - res["filtering"]["gt"][
            "after_bike_racks"]
        seen["zero_pts"] += res["filtering"]["gt"]["after_range"] - res["filtering"]["gt"]["after_points"]
        seen["out_of_range"] += res["filtering"]["pred"]["total"] - res["filtering"]["pred"]["after_range"]
        seen["nan_vel"] += sum(np.isnan(a.velocity).any() for anns in gt.values() for a in anns)
    assert all(v > 0 for v in seen.values()), seen


@pytest.mark.filterwarnings("ignore:Mean of empty slice")  # the devkit's nanmean of all-NaN errors
def test_equals_devkit_with_sparse_classes():
    # Classes with no GT, with no matches, and a class whose TP errors are all NaN in the mean.
    pytest.importorskip("nuscenes")
    rng = np.random.default_rng(42)
    for classes in (("traffic_cone",), ("barrier", "car"), ("bus", "trailer")):
        gt, preds, ego, racks = random_case(rng, classes=classes, n_samples=3, max_gt=3)
        metrics, _ = devkit_metrics(gt, preds, ego, racks, classes)
        compare(evaluate_nuscenes(gt, preds, ego, bike_racks=racks, class_names=classes), metrics, classes)


def test_quaternion_yaw_and_rack_test_equal_devkit():
    pytest.importorskip("nuscenes")
    from nuscenes.eval.common.utils import quaternion_yaw
    from nuscenes.utils.data_classes import Box
    from nuscenes.utils.geometry_utils import points_in_box
    from pyquaternion import Quaternion

    rng = np.random.default_rng(5)
    q = rng.normal(0, 1, (500, 4))
    ref = np.array([quaternion_yaw(Quaternion(x)) for x in q])
    assert np.max(np.abs(quaternion_yaws(q) - ref)) < 1e-14
    for _ in range(20):
        rack = Annotation("r", rng.normal(0, 3, 3), rng.uniform(0.5, 4, 3), rng.normal(0, 1, 4), np.zeros(2),
                          "bicycle", "", 1)
        pts = rng.normal(0, 3, (200, 3))
        box = Box(rack.translation, rack.size, Quaternion(rack.rotation))
        np.testing.assert_array_equal(points_in_rack(rack, pts), points_in_box(box, pts.T))


# ---------------------------------------------------------------------------------------------------------------
# (b) By hand, without the devkit.
# ---------------------------------------------------------------------------------------------------------------

def _ann(name, t, size=(2.0, 4.0, 1.5), yaw=0.0, vel=(0.0, 0.0), attr="", pts=10):
    return Annotation("a", np.asarray(t, float), np.asarray(size, float), yaw_quaternion(yaw), np.asarray(vel, float),
                      name, attr, pts)


def _pred(token, name, t, score, size=(2.0, 4.0, 1.5), yaw=0.0, vel=(0.0, 0.0), attr=""):
    return {"sample_token": token, "translation": list(map(float, t)), "size": list(map(float, size)),
            "rotation": yaw_quaternion(yaw).tolist(), "velocity": list(map(float, vel)), "detection_name": name,
            "detection_score": float(score), "attribute_name": attr}


def test_one_match_by_hand():
    # One car, one prediction 0.3 m off, 10 % longer, 0.2 rad turned, velocity 0.5 m/s off, wrong attribute.
    e = np.array([100.0, 200.0, 0.0])
    gt = {"s": [_ann("car", e + [10, 0, 1], vel=(1.0, 0.0), attr="vehicle.moving")]}
    preds = {"s": [_pred("s", "car", e + [10.3, 0, 1.2], 0.7, size=(2.0, 4.4, 1.5), yaw=0.2, vel=(1.0, 0.5),
                         attr="vehicle.parked")]}
    res = evaluate_nuscenes(gt, preds, {"s": e}, class_names=["car"])
    car = res["per_class"]["car"]
    assert car["AP_by_threshold"] == pytest.approx({"0.5m": 1.0, "1.0m": 1.0, "2.0m": 1.0, "4.0m": 1.0})
    assert car["ATE"] == pytest.approx(0.3) and car["AOE"] == pytest.approx(0.2)
    assert car["ASE"] == pytest.approx(1 - 4.0 / 4.4) and car["AVE"] == pytest.approx(0.5)
    assert car["AAE"] == 1.0
    errs = [0.3, 1 - 4.0 / 4.4, 0.2, 0.5, 1.0]
    assert res["NDS"] == pytest.approx((5 * 1.0 + sum(1 - e for e in errs)) / 10)
    assert res["tp_errors"] == pytest.approx({"mATE": 0.3, "mASE": 1 - 4 / 4.4, "mAOE": 0.2, "mAVE": 0.5,
                                              "mAAE": 1.0})


def test_cumulative_mean_interpolation_by_hand():
    # Two cars, TP (score .9, ATE a) then TP (.8, ATE b): recall .5 then 1. The interpolated confidence is .9 up to
    # recall .5 then falls linearly to .8; the ATE curve is the cumulative mean (a, then (a + b) / 2) interpolated
    # on confidence, so a up to recall .5 and linear to (a + b) / 2 at recall 1. ATE = its mean over recall .11-1.
    a, b = 0.2, 1.0
    gt = {"s": [_ann("car", [0, 0, 0]), _ann("car", [20, 0, 0])]}
    preds = {"s": [_pred("s", "car", [a, 0, 0], 0.9), _pred("s", "car", [20 + b, 0, 0], 0.8)]}
    res = evaluate_nuscenes(gt, preds, {"s": np.zeros(3)}, class_names=["car"])
    r = np.linspace(0, 1, 101)[11:]
    curve = np.where(r <= 0.5, a, a + (r - 0.5) / 0.5 * ((a + b) / 2 - a))
    assert res["per_class"]["car"]["ATE"] == pytest.approx(curve.mean(), abs=1e-12)
    # At 0.5 m only the first matches: precision 1 then .5, both at recall .5; interpolated, 1 below recall .5,
    # .5 at it, 0 above. Of recall .11 ... 1: 39 points at 1 - .1, one at .5 - .1.
    assert res["per_class"]["car"]["AP_by_threshold"]["0.5m"] == pytest.approx((39 * 0.9 + 0.4) / 90 / 0.9)


def test_class_rules_by_hand():
    # Barrier turned by pi: no orientation error (period pi), no vel/attr error. Traffic cone: only ATE/ASE.
    # Bus without GT: AP 0 and TP errors 1. Pedestrian matched with a NaN GT velocity: AVE NaN -> the cumulative
    # mean of only NaNs is 1. Pedestrian GT without an attribute: AAE from no values -> 1 as well.
    gt = {"s": [_ann("barrier", [5, 0, 0]), _ann("traffic_cone", [0, 5, 0]),
                _ann("pedestrian", [0, -5, 0], vel=(np.nan, np.nan))]}
    preds = {"s": [_pred("s", "barrier", [5, 0, 0], 0.5, yaw=np.pi), _pred("s", "traffic_cone", [0, 5.1, 0], 0.5,
                                                                           yaw=1.0),
                   _pred("s", "pedestrian", [0, -5, 0], 0.5, vel=(1.0, 1.0), attr="pedestrian.moving"),
                   _pred("s", "bus", [30, 0, 0], 0.5)]}
    res = evaluate_nuscenes(gt, preds, {"s": np.zeros(3)}, class_names=["barrier", "traffic_cone", "pedestrian",
                                                                        "bus"])
    pc = res["per_class"]
    assert pc["barrier"]["AOE"] == pytest.approx(0.0, abs=1e-12)
    assert pc["barrier"]["AVE"] is None and pc["barrier"]["AAE"] is None
    assert pc["traffic_cone"]["AOE"] is None and pc["traffic_cone"]["AVE"] is None
    assert pc["traffic_cone"]["ATE"] == pytest.approx(0.1)
    assert pc["bus"]["AP"] == 0.0 and all(pc["bus"][TP_SHORT[m]] == 1.0 for m in TP_METRICS)
    assert pc["pedestrian"]["AVE"] == 1.0 and pc["pedestrian"]["AAE"] == 1.0
    # Mean AVE over pedestrian and bus only (barrier and cone are NaN): (1 + 1) / 2.
    assert res["tp_errors"]["mAVE"] == 1.0 and res["tp_scores"]["mAVE"] == 0.0


def test_all_nan_tp_error_scores_zero():
    gt = {"s": [_ann("traffic_cone", [0, 5, 0])]}
    preds = {"s": [_pred("s", "traffic_cone", [0, 5, 0], 0.5)]}
    res = evaluate_nuscenes(gt, preds, {"s": np.zeros(3)}, class_names=["traffic_cone"])
    assert res["tp_errors"]["mAOE"] is None and res["tp_scores"]["mAOE"] == 0.0
    assert res["NDS"] == pytest.approx((5 * 1.0 + 1 + 1 + 0 + 0 + 0) / 10)


def test_filters_by_hand():
    # car range 50 m from the ego (not the origin); zero-point GT dropped; a bicycle in a rack dropped, GT and
    # prediction alike; classes not evaluated ignored.
    e = np.array([1000.0, -300.0, 2.0])
    gt = {"s": [_ann("car", e + [30, 40, 0]), _ann("car", e + [0, 10, 0]), _ann("car", e + [5, 5, 0], pts=0),
                _ann("bicycle", e + [3, 3, 0]), _ann("bicycle", e + [-3, 3, 0]), _ann("truck", e + [1, 1, 0])]}
    preds = {"s": [_pred("s", "car", e + [0, 10, 0], 0.9), _pred("s", "car", e + [60, 0, 0], 0.95),
                   _pred("s", "bicycle", e + [3.2, 3, 0], 0.8), _pred("s", "bicycle", e + [-3, 3, 0], 0.7),
                   _pred("s", "truck", e + [1, 1, 0], 0.6)]}
    rack = _ann("bicycle", e + [3, 3, 0], size=(1.0, 2.0, 2.0))
    res = evaluate_nuscenes(gt, preds, {"s": pose_matrix(e, yaw_quaternion(0.3))}, class_names=["car", "bicycle"],
                            bike_racks={"s": [rack]})
    assert res["num_gt"] == {"car": 1, "bicycle": 1} and res["num_pred"] == {"car": 1, "bicycle": 1}
    assert res["mAP"] == pytest.approx(1.0)
    assert res["filtering"]["gt"] == {"total": 5, "after_range": 4, "after_points": 3, "after_bike_racks": 2}


def test_evaluate_frames_and_markdown():
    e = np.array([10.0, 20.0, 0.0])
    frame = SensorFrame("scene-1", 0, "tok", 0, ego2global=pose_matrix(e, yaw_quaternion(1.0)),
                        annotations=[_ann("car", e + [3, 0, 0])], bike_racks=[])
    preds = {"meta": {"use_lidar": True}, "results": {"tok": [_pred("tok", "car", e + [3, 0, 0], 0.5)]}}
    res = evaluate_frames([frame], preds)
    assert res["per_class"]["car"]["AP"] == pytest.approx(1.0) and res["num_samples"] == 1
    assert set(res["per_class"]) == set(DETECTION_NAMES)
    md = render_markdown(res)
    assert md.count("\n| ") == 12 and "| car | 1.0000 |" in md and "**NDS**" in md
    assert "| traffic_cone |" in md and " - |" in md


def test_rejects_what_the_devkit_rejects():
    e = {"s": np.zeros(3)}
    gt = {"s": [_ann("car", [1, 0, 0])]}
    with pytest.raises(ValueError, match="samples"):
        evaluate_nuscenes(gt, {"t": []}, e)
    with pytest.raises(ValueError, match="at most"):
        evaluate_nuscenes(gt, {"s": [_pred("s", "car", [0, 0, 0], 0.1)] * 3}, e, config=EvalConfig(
            max_boxes_per_sample=2))
    with pytest.raises(ValueError, match="detection_name"):
        evaluate_nuscenes(gt, {"s": [_pred("s", "cyclist", [0, 0, 0], 0.1)]}, e)
    with pytest.raises(ValueError, match="NaN"):
        evaluate_nuscenes(gt, {"s": [_pred("s", "car", [0, 0, 0], float("nan"))]}, e)
    with pytest.raises(ValueError, match="not nuScenes"):
        evaluate_nuscenes(gt, {"s": []}, e, class_names=["cyclist"])
    with pytest.raises(ValueError, match="dist_th_tp"):
        EvalConfig(dist_th_tp=3.0)
