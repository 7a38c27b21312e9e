"""Numeric agreement between two sets of named outputs."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class OutputAgreement:
    name: str
    max_abs_error: float
    max_rel_error: float  # max |a - b| / max |reference|: scale-free across heads
    cosine: float

    def passes(self, max_rel_error: float, min_cosine: float) -> bool:
        return self.max_rel_error <= max_rel_error and self.cosine >= min_cosine

    def to_dict(self) -> dict:
        return asdict(self)


def agreement(name: str, reference: np.ndarray, other: np.ndarray) -> OutputAgreement:
    ref = np.asarray(reference, dtype=np.float64).ravel()
    out = np.asarray(other, dtype=np.float64).ravel()
    if ref.shape != out.shape:
        raise ValueError(f"output {name}: shapes differ ({reference.shape} vs {other.shape})")
    err = np.abs(ref - out)
    max_abs = float(err.max()) if err.size else 0.0
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    norm = float(np.linalg.norm(ref) * np.linalg.norm(out))
    cosine = float(ref @ out / norm) if norm > 0 else float(np.array_equal(ref, out))
    return OutputAgreement(name, max_abs, max_abs / scale if scale > 0 else max_abs, cosine)


def compare_outputs(reference: dict[str, np.ndarray], other: dict[str, np.ndarray]) -> list[OutputAgreement]:
    missing = sorted(set(reference) - set(other))
    if missing:
        raise ValueError(f"outputs missing from the candidate: {', '.join(missing)}")
    return [agreement(name, reference[name], other[name]) for name in reference]
