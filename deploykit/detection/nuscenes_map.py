"""nuScenes detection mAP (centre-distance matching), as nuscenes-devkit computes it.

Reproduces, for the AP part only (the TP errors and NDS are ``deploykit.detection.nuscenes_eval``, which
builds on the matching here), nuscenes-devkit
(nutonomy/nuscenes-devkit, python-sdk/nuscenes/eval, commit d9de17a):

* ``detection/algo.py`` ``accumulate``: the predictions of one class over all
  samples are taken by descending score; equal scores go later box first, as
  the devkit's ``sorted((score, index))[::-1]`` orders them (samples in list
  order, boxes in order within a sample). Each one takes the closest untaken GT
  box of its class in its sample (``common/utils.py`` ``center_distance``: xy
  only; on equal distances the first GT box); it is a TP iff that distance is
  ``< dist_th``. Cumulative precision and recall, precision interpolated at
  ``np.linspace(0, 1, 101)`` with ``np.interp(..., right=0)``. No GT of the
  class, or no TP at all: the devkit's ``no_predictions()``, precision 0.
* ``calc_ap``: drop the first ``round(100 * min_recall) + 1`` points, subtract
  ``min_precision``, clip at 0, mean, divide by ``1 - min_precision``. So a
  class without GT scores AP 0 and still counts in the mAP.
* ``DetectionMetrics.mean_ap``: mean over thresholds per class, then over
  classes.
* ``common/loaders.py`` ``filter_eval_boxes`` on GT and predictions: drop boxes
  whose xy distance from the ego is not ``< class_range[class]``, and GT boxes
  with ``num_pts == 0``. The devkit's ``num_pts`` is ``num_lidar_pts +
  num_radar_pts``; pass that sum as ``gt_num_points`` to get the same filter.

Deliberate differences:

* More than ``max_boxes_per_sample`` predictions in a sample: the devkit's
  ``load_prediction`` rejects the whole result file (an assert); here the
  top-scoring ones are kept (equal scores: earlier box first), before the range
  filter as the devkit's check is. Inputs the devkit accepts are unaffected.
* The bike-rack filter (bicycles and motorcycles inside a
  ``static_object.bicycle_rack`` box are dropped) needs those annotations and
  is not done here (``nuscenes_eval`` does it).
* Box centres are taken to be in the ego frame: the distance for the range
  filter is from the origin, where the devkit subtracts the ego pose from
  global coordinates.
* A label that does not index ``class_names`` raises ``ValueError``; the
  devkit has only valid detection names by construction.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .decode import Boxes

DIST_THS = (0.5, 1.0, 2.0, 4.0)
# detection_cvpr_2019.json
CLASS_RANGE = {"car": 50, "truck": 50, "bus": 50, "trailer": 50, "construction_vehicle": 50, "pedestrian": 40,
               "motorcycle": 40, "bicycle": 40, "traffic_cone": 30, "barrier": 30}
_NELEM = 101  # DetectionMetricData.nelem


def _calc_ap(precision: np.ndarray, min_recall: float, min_precision: float) -> float:
    if not (0 <= min_precision < 1 and 0 <= min_recall <= 1):
        raise ValueError(f"need 0 <= min_precision < 1 and 0 <= min_recall <= 1, got {min_precision}, {min_recall}")
    prec = precision[round(100 * min_recall) + 1:] - min_precision
    prec[prec < 0] = 0
    return float(np.mean(prec)) / (1.0 - min_precision)


def _xy_dist(pred_xy: np.ndarray, gt_xy: np.ndarray) -> np.ndarray:
    d = pred_xy[:, None, :] - gt_xy[None, :, :]
    # The devkit's np.linalg.norm of a 2-vector is sqrt(d.dot(d)), and dot goes through BLAS, which may fuse the
    # multiply-add (OpenBLAS does): sqrt(dx*dx + dy*dy) then differs in the last bit for a few percent of pairs,
    # enough to flip a box lying on a threshold. A (1,2) @ (2,1) matmul takes the same dot path.
    dist = np.sqrt(np.matmul(d[..., None, :], d[..., :, None])[..., 0, 0])
    dist[np.isnan(dist)] = np.inf  # NaN never passes the devkit's `<`, so it can neither match nor block
    return dist


def _greedy_match(gt_xy: list[np.ndarray], pred_xy: list[np.ndarray], pred_scores: list[np.ndarray],
                  dist_ths: Sequence[float]) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """The devkit's ``accumulate`` matching of one class, at each threshold.

    Per-sample float64 arrays in; returns ``order`` (the devkit's visiting order of the concatenated
    predictions: descending score, equal scores later box first), and per threshold ``gt_of`` (the GT box,
    as an index into the concatenated GT, each prediction took; -1 for a false positive) and ``dist`` (the
    devkit's ``center_distance`` to that GT box, the trans_err of the match; NaN for a false positive).
    """
    counts = [len(s) for s in pred_scores]
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(int)
    gt_starts = np.concatenate([[0], np.cumsum([len(g) for g in gt_xy])]).astype(int)
    scores = np.concatenate(pred_scores) if pred_scores else np.zeros(0)
    n = scores.size
    order = np.lexsort((np.arange(n), scores))[::-1]
    rank = np.empty(n, int)
    rank[order] = np.arange(n)

    # Greedy matching only interacts within a sample, and there it visits the boxes in the global order.
    per_sample = []
    for s, (g, p) in enumerate(zip(gt_xy, pred_xy)):
        if len(g) and len(p):
            visit = np.argsort(rank[starts[s]:starts[s + 1]])
            dist = _xy_dist(p, g)
            per_sample.append((starts[s], gt_starts[s], visit, dist, dist.min(1)))

    gt_of_all, dist_all = [], []
    for th in dist_ths:
        gt_of = np.full(n, -1, np.int64)
        match_dist = np.full(n, np.nan)
        for start, gt_start, visit, dist, nearest in per_sample:
            # A prediction with no GT box within th is a false positive that takes nothing: skip it.
            visit = visit[nearest[visit] < th]
            if not len(visit):
                continue
            free = np.ones(dist.shape[1], bool)
            for r in visit:
                row = np.where(free, dist[r], np.inf)
                j = int(np.argmin(row))  # first of equal minima, as the devkit's strict `<` keeps the first
                if row[j] < th:
                    free[j] = False
                    gt_of[start + r] = gt_start + j
                    match_dist[start + r] = row[j]
        gt_of_all.append(gt_of)
        dist_all.append(match_dist)
    return order, gt_of_all, dist_all


def _precision_curve(tp_sorted: np.ndarray, npos: int) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative precision and recall of the predictions in visiting order (``accumulate``)."""
    tp_cum = np.cumsum(tp_sorted).astype(float)
    fp_cum = np.cumsum(~tp_sorted).astype(float)
    return tp_cum / (fp_cum + tp_cum), tp_cum / float(npos)


def _class_aps(gt_xy: list[np.ndarray], pred_xy: list[np.ndarray], pred_scores: list[np.ndarray],
               dist_ths: Sequence[float], min_recall: float, min_precision: float) -> list[float]:
    """AP of one class at each threshold; per-sample lists of float64 arrays."""
    no_data = _calc_ap(np.zeros(_NELEM), min_recall, min_precision)
    npos = sum(len(g) for g in gt_xy)
    if npos == 0:
        return [no_data] * len(dist_ths)
    order, gt_of_all, _ = _greedy_match(gt_xy, pred_xy, pred_scores, dist_ths)
    aps = []
    for gt_of in gt_of_all:
        tp = gt_of >= 0
        if not tp.any():
            aps.append(no_data)
            continue
        prec, rec = _precision_curve(tp[order], npos)
        prec = np.interp(np.linspace(0, 1, _NELEM), rec, prec, right=0)
        aps.append(_calc_ap(prec, min_recall, min_precision))
    return aps


def _check_lengths(gts: list[Boxes], preds: list[Boxes]) -> None:
    if len(gts) != len(preds):
        raise ValueError(f"gts and preds must list the same samples: got {len(gts)} GT and {len(preds)} "
                         "prediction samples")


def _select(boxes: list[Boxes], label: int, keep: list[np.ndarray] | None = None):
    xy, scores = [], []
    for i, b in enumerate(boxes):
        m = np.asarray(b.labels) == label
        if keep is not None:
            m &= keep[i]
        xy.append(np.asarray(b.centers, np.float64).reshape(-1, 3)[m, :2])
        scores.append(np.asarray(b.scores, np.float64)[m])
    return xy, scores


def average_precision(gts: list[Boxes], preds: list[Boxes], label: int, dist_th: float, *,
                      min_recall: float = 0.1, min_precision: float = 0.1) -> float:
    """Devkit AP of class ``label`` at one centre-distance threshold, on the boxes as given (no filtering).

    ``gts[i]`` and ``preds[i]`` are the same sample; GT scores are ignored.
    """
    _check_lengths(gts, preds)
    gt_xy, _ = _select(gts, label)
    pred_xy, pred_scores = _select(preds, label)
    return _class_aps(gt_xy, pred_xy, pred_scores, [dist_th], min_recall, min_precision)[0]


def mean_ap(gts: list[Boxes], preds: list[Boxes], class_names: Sequence[str], *, dist_ths=DIST_THS,
            class_range: dict[str, float] | None = None, gt_num_points: list[np.ndarray] | None = None,
            max_boxes_per_sample: int | None = 500, min_recall: float = 0.1, min_precision: float = 0.1) -> dict:
    """Devkit mAP over ``class_names`` (label ``k`` is ``class_names[k]``), after the devkit's box filtering.

    ``class_range`` (e.g. ``CLASS_RANGE``) must cover every class when given; ``gt_num_points[i]`` holds one
    count per GT box of sample ``i``; ``max_boxes_per_sample=None`` keeps every prediction. ``num_gt`` and
    ``num_pred`` count the boxes left after filtering, i.e. those evaluated.
    """
    _check_lengths(gts, preds)
    class_names = list(class_names)
    dist_ths = [float(t) for t in dist_ths]
    if not class_names or not dist_ths:
        raise ValueError("need at least one class name and one distance threshold")
    if len(set(class_names)) != len(class_names):
        raise ValueError(f"class_names has duplicates: {class_names}")
    if gt_num_points is not None and len(gt_num_points) != len(gts):
        raise ValueError(f"gt_num_points has {len(gt_num_points)} entries for {len(gts)} samples")
    if class_range is not None:
        missing = [c for c in class_names if c not in class_range]
        if missing:
            raise ValueError(f"class_range has no entry for {missing}")
        max_dist = np.array([float(class_range[c]) for c in class_names])

    def keep_masks(boxes: list[Boxes], kind: str) -> list[np.ndarray]:
        masks = []
        for i, b in enumerate(boxes):
            labels = np.asarray(b.labels).astype(int, copy=False)
            bad = (labels < 0) | (labels >= len(class_names))
            if bad.any():
                raise ValueError(f"{kind} sample {i}: labels {sorted(set(labels[bad].tolist()))} do not index "
                                 f"class_names ({len(class_names)} classes)")
            keep = np.ones(len(labels), bool)
            if kind == "prediction" and max_boxes_per_sample is not None and len(labels) > max_boxes_per_sample:
                top = np.argsort(-np.asarray(b.scores, np.float64), kind="stable")[:max_boxes_per_sample]
                keep[:] = False
                keep[top] = True
            if class_range is not None:
                xy = np.asarray(b.centers, np.float64).reshape(-1, 3)[:, :2]
                keep &= np.sqrt(np.sum(xy ** 2, axis=1)) < max_dist[labels]  # DetectionBox.ego_dist, strict
            if kind == "GT" and gt_num_points is not None:
                pts = np.asarray(gt_num_points[i]).reshape(-1)
                if pts.shape[0] != len(labels):
                    raise ValueError(f"gt_num_points[{i}] has {pts.shape[0]} entries for {len(labels)} GT boxes")
                keep &= pts != 0
            masks.append(keep)
        return masks

    gt_keep = keep_masks(gts, "GT")
    pred_keep = keep_masks(preds, "prediction")

    per_class, num_gt, num_pred = {}, {}, {}
    for label, name in enumerate(class_names):
        gt_xy, _ = _select(gts, label, gt_keep)
        pred_xy, pred_scores = _select(preds, label, pred_keep)
        aps = _class_aps(gt_xy, pred_xy, pred_scores, dist_ths, min_recall, min_precision)
        per_class[name] = {"AP": float(np.mean(aps)),
                           "by_threshold": {f"{th}m": float(ap) for th, ap in zip(dist_ths, aps)}}
        num_gt[name] = int(sum(len(g) for g in gt_xy))
        num_pred[name] = int(sum(len(s) for s in pred_scores))
    return {"mAP": float(np.mean([c["AP"] for c in per_class.values()])), "per_class": per_class,
            "thresholds": dist_ths, "num_gt": num_gt, "num_pred": num_pred}
