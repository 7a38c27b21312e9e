"""How a quantized model's boxes agree with the float model's.

The float model's boxes are the reference: each quantized box, by descending
score, matches the nearest unmatched reference box of the same class whose
centre lies within the distance threshold on the ground plane (nuScenes'
centre-distance matching). Recall: matched / reference boxes; precision:
matched / quantized boxes. Reported at nuScenes' thresholds 0.5, 1, 2, 4 m.
"""

from __future__ import annotations

import numpy as np

from .decode import Boxes

THRESHOLDS_M = (0.5, 1.0, 2.0, 4.0)


def match_count(reference: Boxes, candidate: Boxes, threshold: float) -> int:
    matched = 0
    for label in np.union1d(reference.labels, candidate.labels):
        ref = reference.centers[reference.labels == label, :2]
        cand_idx = np.flatnonzero(candidate.labels == label)
        cand = candidate.centers[cand_idx[np.argsort(-candidate.scores[cand_idx], kind="stable")], :2]
        if not len(ref) or not len(cand):
            continue
        free = np.ones(len(ref), bool)
        dist = np.linalg.norm(cand[:, None, :] - ref[None, :, :], axis=-1)
        for row in dist:
            row = np.where(free, row, np.inf)
            j = int(row.argmin())
            if row[j] <= threshold:
                free[j] = False
                matched += 1
    return matched


def agreement(references: list[Boxes], candidates: list[Boxes], thresholds=THRESHOLDS_M) -> dict:
    n_ref = sum(len(b) for b in references)
    n_cand = sum(len(b) for b in candidates)
    out = {"reference_boxes": n_ref, "candidate_boxes": n_cand, "by_threshold": {}}
    for t in thresholds:
        tp = sum(match_count(r, c, t) for r, c in zip(references, candidates))
        out["by_threshold"][f"{t:g}m"] = {"recall": tp / n_ref if n_ref else 1.0,
                                          "precision": tp / n_cand if n_cand else 1.0}
    return out
