"""The full nuScenes detection evaluation (mAP, TP errors, NDS), as nuscenes-devkit's DetectionEval computes it.

Reproduces nuscenes-devkit (python-sdk/nuscenes/eval, checked against 1.2.0) with the
``detection_cvpr_2019`` configuration, on boxes already loaded:

* ``DetectionEval.__init__``: the sample tokens of the predictions must be those of the ground truth;
  ``common/loaders.py`` ``add_center_dist`` (box translation minus the ego pose translation) and
  ``filter_eval_boxes`` on predictions and GT alike, in its order: xy distance from the ego ``<
  class_range[class]``, then ``num_pts != 0`` (predictions carry -1), then bicycles and motorcycles whose
  centre is inside a ``static_object.bicycle_rack`` box (``points_in_box``) are dropped.
* ``detection/algo.py`` ``accumulate`` at each ``dist_ths`` (matching and AP come from
  ``deploykit.detection.nuscenes_map``, which reproduces that part bit for bit): for each match its
  ``trans_err`` (``center_distance``), ``vel_err`` (``velocity_l2``, NaN when either velocity is),
  ``scale_err`` (1 - ``scale_iou``: IoU of the boxes aligned), ``orient_err`` (``yaw_diff``, period pi for
  barriers, 2 pi otherwise) and ``attr_err`` (1 - ``attr_acc``, NaN when the GT box has no attribute); then
  the devkit's NaN-aware cumulative mean of each error, re-sampled by confidence onto the 101 recall points.
  No GT of a class, or no match: ``DetectionMetricData.no_predictions()`` (errors 1).
* ``calc_ap`` per threshold and ``calc_tp`` at ``dist_th_tp`` (2 m): the errors between recall
  ``min_recall`` (excluded) and the highest recall reached, 1.0 when that is below ``min_recall``.
  Traffic cones have no orient/vel/attr error and barriers no vel/attr error (NaN, left out of the means).
* ``DetectionMetrics``: mAP is the mean over classes of the mean over thresholds; each mean TP error is the
  NaN-ignoring mean over classes (NaN when every class is NaN); its score is ``max(0, 1 - error)`` (0 for
  NaN); NDS = (``mean_ap_weight`` * mAP + sum of the five scores) / (``mean_ap_weight`` + 5).

``class_names`` evaluates a subset (a model that detects only some classes), as the devkit does with a
DetectionConfig whose ``class_range`` holds only those classes: boxes of other classes, GT or predicted, are
left out first (the devkit would fail on them), and the means run over the chosen classes.

Where it differs from the devkit:

* Inputs are Python objects, not a NuScenes database: GT boxes as ``deploykit.data.frames.Annotation`` (or
  mappings with the same fields, e.g. a serialized DetectionBox), predictions as nuScenes submission boxes,
  the ego translation and the bicycle racks of each sample given with them (``evaluate_frames`` takes them
  from ``SensorFrame`` s).
* Invalid input raises ``ValueError`` where the devkit asserts (more than ``max_boxes_per_sample`` boxes in
  a sample, an unknown detection or attribute name in a prediction, a NaN score, a box size <= 0 on a
  match). GT boxes whose name is no detection class are left out, as ``load_gt`` leaves out their
  categories.
* Yaw angles come from a closed form of pyquaternion's rotation matrix: equal to the devkit's to the last
  bit or so (orientation errors agree to ~1e-15; no decision depends on them).
* The result is a JSON-ready dict; NaN (a TP error that does not apply) is written as None.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from .nuscenes_map import _NELEM, _calc_ap, _greedy_match, _precision_curve
from .nuscenes_map import CLASS_RANGE as _CVPR_2019_RANGE
from .nuscenes_map import DIST_THS

# nuscenes/eval/detection/constants.py
DETECTION_NAMES = ("car", "truck", "bus", "trailer", "construction_vehicle", "pedestrian", "motorcycle", "bicycle",
                   "traffic_cone", "barrier")
ATTRIBUTE_NAMES = ("pedestrian.moving", "pedestrian.sitting_lying_down", "pedestrian.standing", "cycle.with_rider",
                   "cycle.without_rider", "vehicle.moving", "vehicle.parked", "vehicle.stopped")
TP_METRICS = ("trans_err", "scale_err", "orient_err", "vel_err", "attr_err")
# Per class ATE ... AAE, and the means over classes mATE ... mAAE.
TP_SHORT = {"trans_err": "ATE", "scale_err": "ASE", "orient_err": "AOE", "vel_err": "AVE", "attr_err": "AAE"}
# TP errors the devkit does not score for a class (DetectionEval.evaluate).
NOT_SCORED = {"traffic_cone": ("attr_err", "vel_err", "orient_err"), "barrier": ("attr_err", "vel_err")}
_CYCLES = ("bicycle", "motorcycle")


@dataclass(frozen=True)
class EvalConfig:
    """nuscenes-devkit's DetectionConfig; the defaults are ``detection_cvpr_2019.json``."""

    class_range: Mapping[str, float] = field(default_factory=lambda: dict(_CVPR_2019_RANGE))
    dist_ths: tuple[float, ...] = DIST_THS
    dist_th_tp: float = 2.0
    min_recall: float = 0.1
    min_precision: float = 0.1
    max_boxes_per_sample: int = 500
    mean_ap_weight: float = 5

    def __post_init__(self):
        if self.dist_th_tp not in self.dist_ths:
            raise ValueError(f"dist_th_tp {self.dist_th_tp} must be one of dist_ths {self.dist_ths}")
        if not (0 <= self.min_precision < 1 and 0 <= self.min_recall <= 1):
            raise ValueError(f"need 0 <= min_precision < 1 and 0 <= min_recall <= 1, got {self.min_precision}, "
                             f"{self.min_recall}")


DETECTION_CVPR_2019 = EvalConfig()


# ---------------------------------------------------------------------------------------------------------------
# Boxes as arrays.
# ---------------------------------------------------------------------------------------------------------------

def _get(box: Any, key: str, default: Any = None) -> Any:
    if isinstance(box, dict) or (not hasattr(box, key) and isinstance(box, Mapping)):
        return box.get(key, default)
    return getattr(box, key, default)


@dataclass
class _Sample:
    """One sample's boxes of the evaluated classes, as float64 arrays (row order = input order)."""

    translation: np.ndarray  # (n, 3)
    size: np.ndarray  # (n, 3) w, l, h
    rotation: np.ndarray  # (n, 4) w, x, y, z
    velocity: np.ndarray  # (n, 2)
    label: np.ndarray  # (n,) index into class_names
    score: np.ndarray  # (n,)
    attribute: np.ndarray  # (n,) str
    num_pts: np.ndarray  # (n,)

    def take(self, keep: np.ndarray) -> "_Sample":
        return _Sample(*(getattr(self, f)[keep] for f in _FIELDS))

    def __len__(self) -> int:
        return len(self.label)


_FIELDS = ("translation", "size", "rotation", "velocity", "label", "score", "attribute", "num_pts")
_NUMBER = (float, int, np.floating, np.integer)


def _vector(value: Any, n: int, what: str) -> list[float]:
    v = [float(x) for x in np.asarray(value, dtype=np.float64).reshape(-1)]
    if len(v) != n:
        raise ValueError(f"{what} must have {n} elements, got {len(v)}")
    return v


def _array(values: list, n: int, what: str, where: str) -> np.ndarray:
    if not values:
        return np.zeros((0, n))
    try:
        a = np.array(values, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: every box's {what} must be {n} numbers ({e})") from None
    if a.shape != (len(values), n):
        raise ValueError(f"{where}: every box's {what} must be {n} numbers")
    return a


def _to_sample(boxes: Sequence[Any], class_index: Mapping[str, int], *, is_gt: bool, where: str) -> _Sample:
    names = [_get(b, "detection_name") for b in boxes]
    attrs = [_get(b, "attribute_name", "") or "" for b in boxes]
    for k, (name, attr) in enumerate(zip(names, attrs)):
        if name not in DETECTION_NAMES and not is_gt:  # GT of other categories: left out, as load_gt does
            raise ValueError(f"{where} box {k}: unknown detection_name {name!r}")
        if attr and attr not in ATTRIBUTE_NAMES:
            raise ValueError(f"{where} box {k}: unknown attribute_name {attr!r}")
    kept = [k for k, name in enumerate(names) if name in class_index]  # classes not evaluated are left out
    rows = [boxes[k] for k in kept]
    n = len(rows)
    t = _array([_get(b, "translation") for b in rows], 3, "translation", where).reshape(n, 3)
    s = _array([_get(b, "size") for b in rows], 3, "size", where).reshape(n, 3)
    r = _array([_get(b, "rotation") for b in rows], 4, "rotation", where).reshape(n, 4)
    v = _array([_get(b, "velocity", (np.nan, np.nan)) for b in rows], 2, "velocity", where).reshape(n, 2)
    if np.isnan(t).any() or np.isnan(s).any() or np.isnan(r).any():
        raise ValueError(f"{where}: translation, size and rotation may not be NaN")
    if is_gt:
        score = np.full(n, -1.0)
    else:
        raw = [_get(b, "detection_score") for b in rows]
        for k, x in zip(kept, raw):
            if isinstance(x, bool) or not isinstance(x, _NUMBER):
                raise ValueError(f"{where} box {k}: detection_score must be a number, got {x!r}")
        score = np.array(raw, np.float64).reshape(n)
        if np.isnan(score).any():
            raise ValueError(f"{where}: detection_score may not be NaN")
    pts = np.array([int(_get(b, "num_pts", -1)) for b in rows], np.int64).reshape(n)
    labels = np.array([class_index[names[k]] for k in kept], np.int64).reshape(n)
    attribute = np.array([attrs[k] for k in kept], dtype=object).reshape(n)
    return _Sample(t, s, r, v, labels, score, attribute, pts)


# ---------------------------------------------------------------------------------------------------------------
# Filtering (common/loaders.py add_center_dist + filter_eval_boxes).
# ---------------------------------------------------------------------------------------------------------------

def _rotation(q: np.ndarray) -> np.ndarray:
    """(3, 3) of a (w, x, y, z) quaternion, normalised first as pyquaternion does."""
    w, x, y, z = np.asarray(q, np.float64) / np.sqrt(np.dot(q, q))
    return np.array([[w * w + x * x - y * y - z * z, 2 * (x * y - w * z), 2 * (x * z + w * y)],
                     [2 * (x * y + w * z), w * w - x * x + y * y - z * z, 2 * (y * z - w * x)],
                     [2 * (x * z - w * y), 2 * (y * z + w * x), w * w - x * x - y * y + z * z]])


def points_in_rack(rack: Any, points: np.ndarray) -> np.ndarray:
    """(n,) whether each (n, 3) point is inside the ``rack`` box (translation, size wlh, rotation wxyz): the
    devkit's ``points_in_box``, projections onto the box edges from one corner, bounds included."""
    w, l, h = _vector(_get(rack, "size"), 3, "bike rack size")
    rot = _rotation(np.asarray(_vector(_get(rack, "rotation"), 4, "bike rack rotation")))
    centre = np.asarray(_vector(_get(rack, "translation"), 3, "bike rack translation"))
    local = np.array([[l / 2, l / 2, l / 2, -l / 2], [w / 2, -w / 2, w / 2, w / 2], [h / 2, h / 2, -h / 2, h / 2]])
    p1, p_y, p_z, p_x = (np.dot(rot, local) + centre[:, None]).T  # the devkit's corners 0, 1, 3 and 4
    v = np.asarray(points, np.float64).reshape(-1, 3) - p1
    mask = np.ones(len(v), bool)
    for edge in (p_x - p1, p_y - p1, p_z - p1):
        proj = v @ edge
        mask &= (0 <= proj) & (proj <= np.dot(edge, edge))
    return mask


def _filter(sample: _Sample, ego: np.ndarray, max_dist: np.ndarray, racks: Sequence[Any],
            cycle_labels: np.ndarray, counts: list[int]) -> _Sample:
    counts[0] += len(sample)
    ego_xy = sample.translation[:, :2] - ego[:2]
    sample = sample.take(np.sqrt(np.sum(ego_xy ** 2, axis=1)) < max_dist[sample.label])  # EvalBox.ego_dist
    counts[1] += len(sample)
    sample = sample.take(sample.num_pts != 0)
    counts[2] += len(sample)
    if racks and len(sample):
        cycle = np.isin(sample.label, cycle_labels)
        if cycle.any():
            in_rack = np.zeros(len(sample), bool)
            for rack in racks:
                in_rack[cycle] |= points_in_rack(rack, sample.translation[cycle])
            sample = sample.take(~in_rack)
    counts[3] += len(sample)
    return sample


# ---------------------------------------------------------------------------------------------------------------
# TP errors (common/utils.py) and metric data (detection/algo.py accumulate, calc_tp).
# ---------------------------------------------------------------------------------------------------------------

def _norm2(d: np.ndarray) -> np.ndarray:
    # np.linalg.norm of a 2-vector is sqrt(dot), through BLAS: the same path as nuscenes_map._xy_dist.
    return np.sqrt(np.matmul(d[..., None, :], d[..., :, None])[..., 0, 0])


def quaternion_yaws(q: np.ndarray) -> np.ndarray:
    """(n,) the devkit's ``quaternion_yaw`` of (n, 4) quaternions: the angle of the rotated x axis in the xy
    plane (pyquaternion's rotation matrix, first column; its positive scale does not change the angle)."""
    q = np.asarray(q, np.float64).reshape(-1, 4)
    q = q / np.sqrt(np.sum(q * q, axis=1))[:, None]
    w, x, y, z = q.T
    r00 = x * x + w * w - z * z - y * y
    r10 = y * x + z * w + w * z + x * y
    return np.arctan2(r10, r00)


def _angle_diff(x: np.ndarray, y: np.ndarray, period: float) -> np.ndarray:
    diff = (x - y + period / 2) % period - period / 2
    return np.where(diff > np.pi, diff - 2 * np.pi, diff)


def _cummean(x: np.ndarray) -> np.ndarray:
    if np.isnan(x).all():
        return np.ones(len(x))
    sums = np.nancumsum(x.astype(float))
    counts = np.cumsum(~np.isnan(x))
    return np.divide(sums, counts, out=np.zeros_like(sums), where=counts != 0)


def _match_errors(gt: _Sample, pred: _Sample, gt_rows: np.ndarray, pred_rows: np.ndarray, trans: np.ndarray,
                  barrier: bool) -> dict[str, np.ndarray]:
    """The five errors of matched pairs (rows into the concatenated GT and predictions of one class)."""
    gs, ps = gt.size[gt_rows], pred.size[pred_rows]
    if not ((gs > 0).all() and (ps > 0).all()):
        raise ValueError("box sizes must be > 0 (the devkit's scale_iou asserts so on every match)")
    inter = np.minimum(gs, ps)
    inter = inter[:, 0] * inter[:, 1] * inter[:, 2]
    union = gs[:, 0] * gs[:, 1] * gs[:, 2] + ps[:, 0] * ps[:, 1] * ps[:, 2] - inter
    period = np.pi if barrier else 2 * np.pi
    orient = np.abs(_angle_diff(quaternion_yaws(gt.rotation[gt_rows]), quaternion_yaws(pred.rotation[pred_rows]),
                                period))
    g_attr, p_attr = gt.attribute[gt_rows], pred.attribute[pred_rows]
    attr = np.where(g_attr == "", np.nan, 1.0 - (g_attr == p_attr).astype(float))
    return {"trans_err": trans, "vel_err": _norm2(pred.velocity[pred_rows] - gt.velocity[gt_rows]),
            "scale_err": 1 - inter / union, "orient_err": orient, "attr_err": attr.astype(float)}


def _no_predictions() -> dict[str, np.ndarray]:
    md = {"precision": np.zeros(_NELEM), "confidence": np.zeros(_NELEM)}
    md.update({m: np.ones(_NELEM) for m in TP_METRICS})
    return md


def _metric_data(order: np.ndarray, gt_of: np.ndarray, scores: np.ndarray, npos: int,
                 errors: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    """DetectionMetricData of one class and threshold: interpolated precision, confidence, and the TP errors
    (``errors`` holds them per prediction in ``order``'s positions of TPs, or None when not needed)."""
    tp = gt_of[order] >= 0
    if npos == 0 or not tp.any():
        return _no_predictions()
    prec, rec = _precision_curve(tp, npos)
    conf = scores[order]
    rec_interp = np.linspace(0, 1, _NELEM)
    md = {"precision": np.interp(rec_interp, rec, prec, right=0), "confidence": np.interp(rec_interp, rec, conf,
                                                                                          right=0)}
    if errors is not None:
        match_conf = conf[tp]
        for m in TP_METRICS:
            tmp = _cummean(errors[m])
            md[m] = np.interp(md["confidence"][::-1], match_conf[::-1], tmp[::-1])[::-1]
    return md


def _calc_tp(md: dict[str, np.ndarray], min_recall: float, metric: str) -> float:
    first = round(100 * min_recall) + 1
    nonzero = np.nonzero(md["confidence"])[0]
    last = nonzero[-1] if len(nonzero) else 0  # DetectionMetricData.max_recall_ind
    if last < first:
        return 1.0
    return float(np.mean(md[metric][first:last + 1]))


# ---------------------------------------------------------------------------------------------------------------
# The evaluation.
# ---------------------------------------------------------------------------------------------------------------

def _json_float(x: float) -> float | None:
    return None if x is None or math.isnan(x) else float(x)


def evaluate_nuscenes(gt: Mapping[str, Sequence[Any]], predictions: Mapping[str, Any],
                      ego_translations: Mapping[str, Any], *, class_names: Sequence[str] | None = None,
                      bike_racks: Mapping[str, Sequence[Any]] | None = None,
                      config: EvalConfig = DETECTION_CVPR_2019) -> dict:
    """nuScenes detection metrics of ``predictions`` against ``gt``, as the devkit's DetectionEval.

    ``gt``: sample token -> GT boxes in the global frame (``Annotation`` s or mappings with the fields
    translation, size (w, l, h), rotation (w, x, y, z), velocity, detection_name, attribute_name, num_pts).
    ``predictions``: sample token -> submission boxes ({sample_token, translation, size, rotation, velocity,
    detection_name, detection_score, attribute_name}), or a whole submission {"meta", "results"}; its sample
    order decides the order among equal scores, as the result file's does for the devkit.
    ``ego_translations``: sample token -> the ego pose translation (3,) of the sample's LIDAR_TOP, or the
    4x4 ego2global. ``bike_racks``: sample token -> its ``static_object.bicycle_rack`` boxes.
    ``class_names``: the classes evaluated (default all ten, in the devkit's order).

    Returns mAP, NDS, per class the AP (mean and per threshold) and TP errors (ATE, ASE, AOE, AVE, AAE; None
    where the devkit does not score one), the mean TP errors (mATE ...) and their scores, the box counts
    after filtering, and the filter counts of the devkit's verbose output.
    """
    cfg = config
    if isinstance(predictions, Mapping) and "results" in predictions and isinstance(predictions["results"],
                                                                                   Mapping):
        predictions = predictions["results"]
    names = list(DETECTION_NAMES if class_names is None else class_names)
    unknown = [c for c in names if c not in DETECTION_NAMES]
    if unknown:
        raise ValueError(f"class_names {unknown} are not nuScenes detection classes ({', '.join(DETECTION_NAMES)})")
    if not names or len(set(names)) != len(names):
        raise ValueError(f"class_names must be non-empty and without duplicates, got {names}")
    missing = [c for c in names if c not in cfg.class_range]
    if missing:
        raise ValueError(f"config.class_range has no entry for {missing}")
    class_index = {c: i for i, c in enumerate(names)}
    max_dist = np.array([float(cfg.class_range[c]) for c in names])
    cycle_labels = np.array([class_index[c] for c in _CYCLES if c in class_index], np.int64)

    tokens = list(predictions.keys())
    if not tokens:
        raise ValueError("no samples to evaluate")
    if set(tokens) != set(gt.keys()):
        only_pred = sorted(set(tokens) - set(gt.keys()))[:3]
        only_gt = sorted(set(gt.keys()) - set(tokens))[:3]
        raise ValueError(f"the samples of the predictions must be those of the ground truth "
                         f"({len(tokens)} vs {len(gt)}; only predicted e.g. {only_pred}, only in GT e.g. {only_gt})")
    bike_racks = bike_racks or {}

    gt_counts, pred_counts = [0, 0, 0, 0], [0, 0, 0, 0]
    gts, preds = [], []
    for token in tokens:
        boxes = list(predictions[token])
        if len(boxes) > cfg.max_boxes_per_sample:
            raise ValueError(f"sample {token}: {len(boxes)} predicted boxes, the devkit allows at most "
                             f"{cfg.max_boxes_per_sample} per sample")
        if token not in ego_translations:
            raise ValueError(f"no ego translation for sample {token}")
        ego = np.asarray(ego_translations[token], np.float64)
        ego = ego[:3, 3] if ego.shape == (4, 4) else ego.reshape(-1)[:3]
        racks = list(bike_racks.get(token, ()))
        p = _to_sample(boxes, class_index, is_gt=False, where=f"prediction sample {token}")
        g = _to_sample(list(gt[token] or ()), class_index, is_gt=True, where=f"GT sample {token}")
        preds.append(_filter(p, ego, max_dist, racks, cycle_labels, pred_counts))
        gts.append(_filter(g, ego, max_dist, racks, cycle_labels, gt_counts))

    per_class, label_aps, label_tp = {}, {}, {}
    num_gt, num_pred = {}, {}
    for label, name in enumerate(names):
        g_sel = [g.label == label for g in gts]
        p_sel = [p.label == label for p in preds]
        gt_xy = [g.translation[m, :2] for g, m in zip(gts, g_sel)]
        pred_xy = [p.translation[m, :2] for p, m in zip(preds, p_sel)]
        pred_scores = [p.score[m] for p, m in zip(preds, p_sel)]
        npos = int(sum(len(x) for x in gt_xy))
        num_gt[name], num_pred[name] = npos, int(sum(len(s) for s in pred_scores))
        cls_gt = _Sample(*(np.concatenate([getattr(g, f)[m] for g, m in zip(gts, g_sel)]) for f in _FIELDS))
        cls_pred = _Sample(*(np.concatenate([getattr(p, f)[m] for p, m in zip(preds, p_sel)]) for f in _FIELDS))
        scores = cls_pred.score

        mds = {}
        if npos:
            order, gt_of_all, dist_all = _greedy_match(gt_xy, pred_xy, pred_scores, cfg.dist_ths)
        for k, th in enumerate(cfg.dist_ths):
            if not npos:
                mds[th] = _no_predictions()
                continue
            gt_of = gt_of_all[k]
            errors = None
            if th == cfg.dist_th_tp:
                tp_rows = order[gt_of[order] >= 0]  # predictions matched, in visiting order
                errors = _match_errors(cls_gt, cls_pred, gt_of[tp_rows], tp_rows, dist_all[k][tp_rows],
                                       name == "barrier")
            mds[th] = _metric_data(order, gt_of, scores, npos, errors)
        aps = [_calc_ap(mds[th]["precision"], cfg.min_recall, cfg.min_precision) for th in cfg.dist_ths]
        label_aps[name] = aps
        label_tp[name] = {}
        for m in TP_METRICS:
            label_tp[name][m] = (np.nan if m in NOT_SCORED.get(name, ())
                                 else _calc_tp(mds[cfg.dist_th_tp], cfg.min_recall, m))

    mean_dist_aps = {name: np.mean(aps) for name, aps in label_aps.items()}
    mean_ap = float(np.mean(list(mean_dist_aps.values())))
    tp_errors, tp_scores = {}, {}
    for m in TP_METRICS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all NaN: nanmean says so and gives NaN
            tp_errors[m] = float(np.nanmean([label_tp[name][m] for name in names]))
        score = 1.0 - tp_errors[m]
        tp_scores[m] = score if score > 0.0 else 0.0  # max(0.0, score), NaN -> 0 as Python's max gives
    nds = float(cfg.mean_ap_weight * mean_ap + np.sum(list(tp_scores.values())))
    nds = nds / float(cfg.mean_ap_weight + len(tp_scores))

    for name in names:
        per_class[name] = {
            "AP": float(mean_dist_aps[name]),
            "AP_by_threshold": {f"{th}m": float(ap) for th, ap in zip(cfg.dist_ths, label_aps[name])},
            **{TP_SHORT[m]: _json_float(label_tp[name][m]) for m in TP_METRICS},
            "num_gt": num_gt[name], "num_pred": num_pred[name],
        }
    stages = ("total", "after_range", "after_points", "after_bike_racks")
    return {
        "mAP": mean_ap,
        "NDS": nds,
        "tp_errors": {f"m{TP_SHORT[m]}": _json_float(tp_errors[m]) for m in TP_METRICS},
        "tp_scores": {f"m{TP_SHORT[m]}": float(tp_scores[m]) for m in TP_METRICS},
        "per_class": per_class,
        "class_names": names,
        "num_samples": len(tokens),
        "num_gt": num_gt,
        "num_pred": num_pred,
        "filtering": {"gt": dict(zip(stages, gt_counts)), "pred": dict(zip(stages, pred_counts))},
        "config": {"class_range": {c: float(cfg.class_range[c]) for c in names},
                   "dist_ths": [float(t) for t in cfg.dist_ths], "dist_th_tp": float(cfg.dist_th_tp),
                   "min_recall": cfg.min_recall, "min_precision": cfg.min_precision,
                   "max_boxes_per_sample": cfg.max_boxes_per_sample, "mean_ap_weight": cfg.mean_ap_weight},
    }


def evaluate_frames(frames: Sequence[Any], predictions: Mapping[str, Any], **kwargs) -> dict:
    """``evaluate_nuscenes`` on ``SensorFrame`` s: their annotations, ego translations and bike racks, keyed
    by frame token (the nuScenes sample token)."""
    gt, ego, racks = {}, {}, {}
    for f in frames:
        if f.annotations is None:
            raise ValueError(f"frame {f.token} ({f.scene} #{f.index}) has no ground truth")
        gt[f.token] = f.annotations
        ego[f.token] = np.asarray(f.ego2global, np.float64)[:3, 3]
        racks[f.token] = list(f.bike_racks or ())
    return evaluate_nuscenes(gt, predictions, ego, bike_racks=racks, **kwargs)


def render_markdown(result: Mapping[str, Any]) -> str:
    """A markdown summary of ``evaluate_nuscenes``' result: mAP, NDS and mean TP errors, then one row per
    class (AP per threshold, TP errors, box counts); "-" where an error does not apply."""

    def fmt(x: Any) -> str:
        return "-" if x is None else f"{x:.4f}"

    ths = list(next(iter(result["per_class"].values()))["AP_by_threshold"])
    errs = [f"m{TP_SHORT[m]}" for m in TP_METRICS]
    lines = [f"**mAP** {result['mAP']:.4f} | **NDS** {result['NDS']:.4f} | "
             + " | ".join(f"{e} {fmt(result['tp_errors'][e])}" for e in errs)
             + f" | {result['num_samples']} samples", ""]
    head = ["Class", "AP", *(f"AP@{t}" for t in ths), *(TP_SHORT[m] for m in TP_METRICS), "GT", "Pred"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|")
    for name, c in result["per_class"].items():
        row = [name, fmt(c["AP"]), *(fmt(c["AP_by_threshold"][t]) for t in ths),
               *(fmt(c[TP_SHORT[m]]) for m in TP_METRICS), str(c["num_gt"]), str(c["num_pred"])]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("| **mean** | " + fmt(result["mAP"]) + " | " + " | ".join("" for _ in ths) + " | "
                 + " | ".join(fmt(result["tp_errors"][e]) for e in errs) + " | "
                 + f"{sum(result['num_gt'].values())} | {sum(result['num_pred'].values())} |")
    return "\n".join(lines) + "\n"
