import json
from collections import defaultdict
from types import SimpleNamespace

import numpy as np
import pytest

from deploykit.detection.decode import Boxes
from deploykit.detection.nuscenes_map import CLASS_RANGE, average_precision, mean_ap

CLASSES = ("car", "pedestrian", "barrier")
THS = (0.5, 1.0, 2.0, 4.0)


# ---------------------------------------------------------------------------------------------------------------
# REFERENCE: a transcription of nuscenes-devkit (nutonomy/nuscenes-devkit @ d9de17a, python-sdk/nuscenes/eval).
# Kept line for line where it matters; only the TP-error bookkeeping is cut down to what decides the AP
# (accumulate returns no_predictions() when match_data['trans_err'] is empty).
# ---------------------------------------------------------------------------------------------------------------

NELEM = 101  # detection/data_classes.py DetectionMetricData.nelem


class EvalBoxes:  # common/data_classes.py
    def __init__(self):
        self.boxes = defaultdict(list)

    def __getitem__(self, item):
        return self.boxes[item]

    @property
    def all(self):
        ab = []
        for sample_token in self.sample_tokens:
            ab.extend(self[sample_token])
        return ab

    @property
    def sample_tokens(self):
        return list(self.boxes.keys())

    def add_boxes(self, sample_token, boxes):
        self.boxes[sample_token].extend(boxes)


def ego_dist(box):  # common/data_classes.py EvalBox.ego_dist
    return np.sqrt(np.sum(np.array(box.ego_translation[:2]) ** 2))


def center_distance(gt_box, pred_box):  # common/utils.py
    return np.linalg.norm(np.array(pred_box.translation[:2]) - np.array(gt_box.translation[:2]))


def no_predictions_precision():  # DetectionMetricData.no_predictions().precision
    return np.zeros(NELEM)


def ref_load_prediction_check(all_results, max_boxes_per_sample):  # common/loaders.py load_prediction
    for sample_token in all_results.sample_tokens:
        assert len(all_results.boxes[sample_token]) <= max_boxes_per_sample, \
            "Error: Only <= %d boxes per sample allowed!" % max_boxes_per_sample


def ref_filter_eval_boxes(eval_boxes, max_dist):  # common/loaders.py, without the bike-rack part
    for ind, sample_token in enumerate(eval_boxes.sample_tokens):
        eval_boxes.boxes[sample_token] = [box for box in eval_boxes[sample_token] if
                                          ego_dist(box) < max_dist[box.detection_name]]
        eval_boxes.boxes[sample_token] = [box for box in eval_boxes[sample_token] if not box.num_pts == 0]
    return eval_boxes


def ref_accumulate(gt_boxes, pred_boxes, class_name, dist_fcn, dist_th):  # detection/algo.py; returns precision
    npos = len([1 for gt_box in gt_boxes.all if gt_box.detection_name == class_name])
    if npos == 0:
        return no_predictions_precision()

    pred_boxes_list = [box for box in pred_boxes.all if box.detection_name == class_name]
    pred_confs = [box.detection_score for box in pred_boxes_list]

    sortind = [i for (v, i) in sorted((v, i) for (i, v) in enumerate(pred_confs))][::-1]

    tp = []
    fp = []
    conf = []
    match_data = {'trans_err': [], 'conf': []}

    taken = set()
    for ind in sortind:
        pred_box = pred_boxes_list[ind]
        min_dist = np.inf
        match_gt_idx = None

        for gt_idx, gt_box in enumerate(gt_boxes[pred_box.sample_token]):
            if gt_box.detection_name == class_name and not (pred_box.sample_token, gt_idx) in taken:
                this_distance = dist_fcn(gt_box, pred_box)
                if this_distance < min_dist:
                    min_dist = this_distance
                    match_gt_idx = gt_idx

        is_match = min_dist < dist_th

        if is_match:
            taken.add((pred_box.sample_token, match_gt_idx))
            tp.append(1)
            fp.append(0)
            conf.append(pred_box.detection_score)
            gt_box_match = gt_boxes[pred_box.sample_token][match_gt_idx]
            match_data['trans_err'].append(center_distance(gt_box_match, pred_box))
            match_data['conf'].append(pred_box.detection_score)
        else:
            tp.append(0)
            fp.append(1)
            conf.append(pred_box.detection_score)

    if len(match_data['trans_err']) == 0:
        return no_predictions_precision()

    tp = np.cumsum(tp).astype(float)
    fp = np.cumsum(fp).astype(float)
    conf = np.array(conf)

    prec = tp / (fp + tp)
    rec = tp / float(npos)

    rec_interp = np.linspace(0, 1, NELEM)
    prec = np.interp(rec_interp, rec, prec, right=0)
    return prec


def ref_calc_ap(precision, min_recall, min_precision):  # detection/algo.py calc_ap, on md.precision
    assert 0 <= min_precision < 1
    assert 0 <= min_recall <= 1

    prec = np.copy(precision)
    prec = prec[round(100 * min_recall) + 1:]
    prec -= min_precision
    prec[prec < 0] = 0
    return float(np.mean(prec)) / (1.0 - min_precision)


def ref_evaluate(gt_boxes, pred_boxes, class_names, dist_ths, min_recall=0.1, min_precision=0.1):
    """detection/evaluate.py DetectionEval.evaluate (AP part) + DetectionMetrics.mean_dist_aps / mean_ap."""
    label_aps = defaultdict(lambda: defaultdict(float))
    for class_name in class_names:
        for dist_th in dist_ths:
            md = ref_accumulate(gt_boxes, pred_boxes, class_name, center_distance, dist_th)
            label_aps[class_name][dist_th] = ref_calc_ap(md, min_recall, min_precision)
    mean_dist_aps = {class_name: np.mean(list(d.values())) for class_name, d in label_aps.items()}
    mean_ap = float(np.mean(list(mean_dist_aps.values())))
    return mean_ap, mean_dist_aps, label_aps


# ---------------------------------------------------------------------------------------------------------------
# Boxes -> the devkit's EvalBoxes (ego at the origin, so ego_translation == translation).
# ---------------------------------------------------------------------------------------------------------------

def to_eval_boxes(samples, is_gt, num_points=None):
    eb = EvalBoxes()
    for i, b in enumerate(samples):
        boxes = []
        for k in range(len(b)):
            t = [float(v) for v in b.centers[k]]
            boxes.append(SimpleNamespace(
                sample_token=f"s{i}", translation=t, ego_translation=tuple(t),
                detection_name=CLASSES[int(b.labels[k])],
                detection_score=-1.0 if is_gt else float(b.scores[k]),
                num_pts=int(num_points[i][k]) if (is_gt and num_points is not None) else -1))
        eb.add_boxes(f"s{i}", boxes)
    return eb


def make_boxes(centers, labels, scores=None):
    centers = np.asarray(centers, np.float64).reshape(-1, 3)
    k = len(centers)
    scores = np.zeros(k) if scores is None else np.asarray(scores, np.float64)
    return Boxes(centers, np.ones((k, 3)), np.zeros(k), scores, np.asarray(labels, int).reshape(k))


# Offsets of length exactly 0.5, 1, 2, 4 (on the thresholds), of a length that is not exact in binary (0.3, 0.4),
# and zero.
OFFSETS = [(0.0, 0.0), (0.5, 0.0), (0.0, -1.0), (2.0, 0.0), (0.0, 4.0), (0.3, 0.4), (-1.2, 1.6), (0.25, 0.0)]


def random_case(rng, n_classes_with_gt=2, n_classes_pred=3, max_gt=6, extra_pred=4, continuous=False):
    gts, preds, pts = [], [], []
    score_set = np.array([0.2, 0.5, 0.5, 0.7, 0.9])  # repeated values give confidence ties across samples
    for _ in range(int(rng.integers(1, 6))):
        n_gt = int(rng.integers(0, max_gt + 1))
        gl = rng.integers(0, n_classes_with_gt, n_gt)
        if continuous:
            gc = rng.uniform(-55, 55, (n_gt, 3))
        else:  # a coarse grid: distances land exactly on thresholds and on class ranges (30, 40, 50 m)
            gc = rng.integers(-20, 21, (n_gt, 3)) * 2.5
        gts.append(make_boxes(gc, gl))
        pts.append(rng.choice([0, 1, 5], n_gt, p=[0.2, 0.4, 0.4]))
        pc, pl = [], []
        for k in range(n_gt):
            for _ in range(int(rng.integers(0, 3))):
                off = OFFSETS[rng.integers(len(OFFSETS))] if rng.random() < 0.6 else rng.normal(0, 1.5, 2)
                pc.append([gc[k, 0] + off[0], gc[k, 1] + off[1], gc[k, 2] + rng.normal()])
                pl.append(gl[k] if rng.random() < 0.85 else rng.integers(0, n_classes_pred))
        for _ in range(int(rng.integers(0, extra_pred + 1))):
            pc.append(rng.integers(-20, 21, 3) * 2.5 if rng.random() < 0.5 else rng.uniform(-55, 55, 3))
            pl.append(rng.integers(0, n_classes_pred))
        n = len(pc)
        sc = rng.choice(score_set, n) if rng.random() < 0.7 else rng.random(n)
        preds.append(make_boxes(np.array(pc).reshape(n, 3), pl, sc))
    return gts, preds, pts


def assert_matches_reference(res, gts, preds, pts, class_range):
    gt_eb = to_eval_boxes(gts, True, pts)
    pred_eb = to_eval_boxes(preds, False)
    ref_load_prediction_check(pred_eb, 500)
    if class_range is not None or pts is not None:
        max_dist = class_range if class_range is not None else defaultdict(lambda: np.inf)
        gt_eb = ref_filter_eval_boxes(gt_eb, max_dist)
        pred_eb = ref_filter_eval_boxes(pred_eb, max_dist)
    ref_map, ref_class, ref_label = ref_evaluate(gt_eb, pred_eb, CLASSES, THS)
    assert res["mAP"] == ref_map
    for c in CLASSES:
        assert res["per_class"][c]["AP"] == ref_class[c]
        assert res["per_class"][c]["by_threshold"] == {f"{th}m": ref_label[c][th] for th in THS}
        assert res["num_gt"][c] == sum(b.detection_name == c for b in gt_eb.all)
        assert res["num_pred"][c] == sum(b.detection_name == c for b in pred_eb.all)


# ---------------------------------------------------------------------------------------------------------------
# Against the reference.
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(6))
def test_average_precision_equals_devkit(seed):
    rng = np.random.default_rng(seed)
    for case in range(40):
        gts, preds, _ = random_case(rng, continuous=case % 4 == 3)
        gt_eb, pred_eb = to_eval_boxes(gts, True), to_eval_boxes(preds, False)
        for label, name in enumerate(CLASSES):
            for th in THS:
                ref = ref_calc_ap(ref_accumulate(gt_eb, pred_eb, name, center_distance, th), 0.1, 0.1)
                assert average_precision(gts, preds, label, th) == ref, (seed, case, name, th)


@pytest.mark.parametrize("seed", range(6))
def test_mean_ap_with_filters_equals_devkit(seed):
    rng = np.random.default_rng(100 + seed)
    ranges = {"car": 50, "pedestrian": 40, "barrier": 30}
    for case in range(25):
        gts, preds, pts = random_case(rng, n_classes_with_gt=int(rng.integers(1, 4)),
                                      n_classes_pred=int(rng.integers(1, 4)))
        class_range = ranges if case % 2 else None
        gt_pts = pts if case % 3 else None
        res = mean_ap(gts, preds, CLASSES, class_range=class_range, gt_num_points=gt_pts)
        assert_matches_reference(res, gts, preds, gt_pts, class_range)


def test_min_recall_and_min_precision_as_devkit():
    rng = np.random.default_rng(7)
    for _ in range(20):
        gts, preds, _ = random_case(rng)
        gt_eb, pred_eb = to_eval_boxes(gts, True), to_eval_boxes(preds, False)
        for mr, mp in [(0.0, 0.0), (0.25, 0.3), (0.5, 0.05)]:
            ref = ref_calc_ap(ref_accumulate(gt_eb, pred_eb, "car", center_distance, 2.0), mr, mp)
            assert average_precision(gts, preds, 0, 2.0, min_recall=mr, min_precision=mp) == ref


def test_threshold_is_decided_by_the_devkit_norm():
    # Offsets of length ~th at random angles: where sqrt(dx*dx + dy*dy) and the devkit's np.linalg.norm disagree
    # in the last bit (BLAS dot with fused multiply-add), the devkit's value must decide.
    rng = np.random.default_rng(3)
    th = 1.0
    base = rng.uniform(-40, 40, (4000, 2))
    ang = rng.uniform(0, 2 * np.pi, 4000)
    pred = base + th * np.stack([np.cos(ang), np.sin(ang)], 1)
    d = pred - base
    plain = np.sqrt(d[:, 0] * d[:, 0] + d[:, 1] * d[:, 1])
    devkit = np.array([np.linalg.norm(v) for v in d])
    near = np.flatnonzero((devkit == th) | (plain == th) | (devkit != plain))[:60]
    assert len(near) > 5
    for i in near:
        gt = [make_boxes([[*base[i], 0.0]], [0])]
        pr = [make_boxes([[*pred[i], 0.0]], [0], [0.5])]
        gt_eb, pred_eb = to_eval_boxes(gt, True), to_eval_boxes(pr, False)
        ref = ref_calc_ap(ref_accumulate(gt_eb, pred_eb, "car", center_distance, th), 0.1, 0.1)
        assert average_precision(gt, pr, 0, th) == ref


def test_truncates_to_max_boxes_per_sample_where_devkit_rejects():
    rng = np.random.default_rng(11)
    gts, preds, _ = random_case(rng, max_gt=6, extra_pred=12)
    preds[0] = make_boxes(rng.integers(-8, 9, (9, 3)) * 0.5, rng.integers(0, 3, 9),
                          [0.3, 0.9, 0.5, 0.5, 0.1, 0.5, 0.8, 0.2, 0.5])
    with pytest.raises(AssertionError):
        ref_load_prediction_check(to_eval_boxes(preds, False), 5)
    res = mean_ap(gts, preds, CLASSES, max_boxes_per_sample=5)
    # What the devkit scores once the file is made valid: the 5 best of each sample, ties kept in box order.
    trimmed = []
    for b in preds:
        keep = np.sort(np.argsort(-b.scores, kind="stable")[:5])
        trimmed.append(make_boxes(b.centers[keep], b.labels[keep], b.scores[keep]))
    assert trimmed[0].scores.tolist() == [0.9, 0.5, 0.5, 0.5, 0.8]
    gt_eb, pred_eb = to_eval_boxes(gts, True), to_eval_boxes(trimmed, False)
    ref_load_prediction_check(pred_eb, 5)
    ref_map, _, _ = ref_evaluate(gt_eb, pred_eb, CLASSES, THS)
    assert res["mAP"] == ref_map
    assert mean_ap(gts, trimmed, CLASSES, max_boxes_per_sample=5) == res


# ---------------------------------------------------------------------------------------------------------------
# By hand.
# ---------------------------------------------------------------------------------------------------------------

def test_perfect_predictions_score_one():
    gts = [make_boxes([[1, 2, 0], [10, -3, 1]], [0, 1]), make_boxes([[-5, 5, 0]], [2])]
    preds = [make_boxes(g.centers, g.labels, [0.9] * len(g)) for g in gts]
    res = mean_ap(gts, preds, CLASSES)
    assert res["mAP"] == pytest.approx(1.0)
    assert all(ap == pytest.approx(1.0) for c in CLASSES for ap in res["per_class"][c]["by_threshold"].values())
    assert res["num_gt"] == res["num_pred"] == {"car": 1, "pedestrian": 1, "barrier": 1}
    json.dumps(res)


def test_far_predictions_score_zero():
    gts = [make_boxes([[1, 2, 0]], [0])]
    preds = [make_boxes([[6, 2, 0], [1, 6, 0]], [0, 0], [0.9, 0.8])]  # 5 and 4 m away: 4 is not < 4
    assert all(average_precision(gts, preds, 0, th) == 0.0 for th in THS)


def test_interpolation_and_clipping_by_hand():
    # 1 GT; TP (score 0.9) then FP (0.5): precision [1, .5] at recall [1, 1]. np.interp gives 1 below recall 1 and
    # 0.5 at recall 1 itself, so of the 90 points kept, 89 score 1 - 0.1 and the last 0.5 - 0.1.
    gts = [make_boxes([[0, 0, 0]], [0])]
    preds = [make_boxes([[0.2, 0, 0], [9, 9, 0]], [0, 0], [0.9, 0.5])]
    assert average_precision(gts, preds, 0, 0.5) == pytest.approx((89 * 0.9 + 0.4) / 90 / 0.9)
    # 2 GT; FP (0.9) then TP (0.8): precision [0, .5] at recall [0, .5] -> interpolated precision = recall up to
    # 0.5, then 0: sum over recall .11 .. .50 of (r - .1) = .01 * (1 + ... + 40) = 8.2.
    gts = [make_boxes([[0, 0, 0], [20, 0, 0]], [0, 0])]
    preds = [make_boxes([[9, 9, 0], [0.2, 0, 0]], [0, 0], [0.9, 0.8])]
    assert average_precision(gts, preds, 0, 0.5) == pytest.approx(8.2 / 90 / 0.9)


def test_equal_scores_go_later_box_first():
    # Same score in two samples: the devkit's sorted((score, index))[::-1] takes sample 1's TP before sample 0's
    # FP, giving the first hand case above rather than the worse FP-first curve.
    gts = [make_boxes(np.zeros((0, 3)), []), make_boxes([[0, 0, 0]], [0])]
    preds = [make_boxes([[5, 5, 0]], [0], [0.5]), make_boxes([[0, 0, 0]], [0], [0.5])]
    assert average_precision(gts, preds, 0, 1.0) == pytest.approx((89 * 0.9 + 0.4) / 90 / 0.9)
    swapped = [make_boxes([[0, 0, 0]], [0]), make_boxes(np.zeros((0, 3)), [])]
    preds = [make_boxes([[0, 0, 0]], [0], [0.5]), make_boxes([[5, 5, 0]], [0], [0.5])]
    assert average_precision(swapped, preds, 0, 1.0) < 0.9


def test_equidistant_gt_goes_to_the_first():
    # The 0.9 box is 0.5 m from both GTs and takes the first (the devkit's strict `<`); the 0.8 box is then
    # 1.4 m from the free one: FP at 1 m. Taking the second GT instead would have made both TPs.
    gts = [make_boxes([[0, 0, 0], [1, 0, 0]], [0, 0])]
    preds = [make_boxes([[0.5, 0, 0], [-0.4, 0, 0]], [0, 0], [0.9, 0.8])]
    gt_eb, pred_eb = to_eval_boxes(gts, True), to_eval_boxes(preds, False)
    ref = ref_calc_ap(ref_accumulate(gt_eb, pred_eb, "car", center_distance, 1.0), 0.1, 0.1)
    assert average_precision(gts, preds, 0, 1.0) == ref < 0.9


def test_class_without_gt_scores_zero_and_counts_in_map():
    gts = [make_boxes([[0, 0, 0]], [0])]
    preds = [make_boxes([[0, 0, 0], [3, 3, 0]], [0, 1], [0.9, 0.9])]
    res = mean_ap(gts, preds, CLASSES)
    assert res["per_class"]["pedestrian"]["AP"] == 0.0 and res["per_class"]["barrier"]["AP"] == 0.0
    assert res["mAP"] == pytest.approx(1.0 / 3)
    assert res["num_gt"]["pedestrian"] == 0 and res["num_pred"]["barrier"] == 0


def test_range_and_point_filters():
    # car range 50: a GT at exactly 50 m is dropped (the devkit keeps ego_dist < range), so is one with 0 points;
    # the unmatched prediction at 60 m is dropped too.
    gts = [make_boxes([[30, 40, 0], [0, 10, 0], [5, 5, 0]], [0, 0, 0])]
    preds = [make_boxes([[0, 10, 0], [60, 0, 0]], [0, 0], [0.9, 0.95])]
    res = mean_ap(gts, preds, ["car"], class_range=CLASS_RANGE, gt_num_points=[np.array([3, 2, 0])])
    assert res["num_gt"] == {"car": 1} and res["num_pred"] == {"car": 1}
    assert res["mAP"] == pytest.approx(1.0)


def test_rejects_bad_input():
    g = [make_boxes([[0, 0, 0]], [0])]
    with pytest.raises(ValueError, match="same samples"):
        mean_ap(g, [], CLASSES)
    with pytest.raises(ValueError, match="same samples"):
        average_precision(g, g + g, 0, 1.0)
    with pytest.raises(ValueError, match="do not index"):
        mean_ap(g, [make_boxes([[0, 0, 0]], [3], [0.5])], CLASSES)
    with pytest.raises(ValueError, match="class_range"):
        mean_ap(g, g, CLASSES, class_range={"car": 50})
    with pytest.raises(ValueError, match="gt_num_points"):
        mean_ap(g, g, CLASSES, gt_num_points=[np.array([1, 2])])
