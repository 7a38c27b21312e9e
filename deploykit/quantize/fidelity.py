"""How far a quantized model's outputs are from the float model's."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ..compare import agreement


@dataclass(frozen=True)
class Fidelity:
    name: str
    sqnr_db: float  # 10 log10(signal power / error power); +inf when identical
    cosine: float
    max_rel_error: float

    def to_dict(self) -> dict:
        return asdict(self)


def sqnr_db(reference: np.ndarray, other: np.ndarray) -> float:
    ref = reference.astype(np.float64)
    noise = float(np.sum((ref - other.astype(np.float64)) ** 2))
    signal = float(np.sum(ref ** 2))
    if noise == 0.0:
        return float("inf")
    return float(10.0 * np.log10(max(signal, 1e-300) / noise))


def fidelity(references: list[dict[str, np.ndarray]], outputs: list[dict[str, np.ndarray]]) -> list[Fidelity]:
    """Per output, over all samples together (errors pooled, so one bad sample shows)."""
    result = []
    for name in references[0]:
        ref = np.concatenate([r[name].ravel() for r in references])
        out = np.concatenate([o[name].ravel() for o in outputs])
        agree = agreement(name, ref, out)
        result.append(Fidelity(name, sqnr_db(ref, out), agree.cosine, agree.max_rel_error))
    return result


def worst_output(items: list[dict], targets: list[str] | None = None) -> dict:
    """The lowest-SQNR output among ``targets`` (default all) of a fidelity report's
    list: the one figure the CLI summary and the gate quote, so both count the same
    outputs the recipe's ``[quantize] target_outputs`` declares."""
    chosen = [f for f in items if targets is None or f["name"] in targets]
    if not chosen:
        raise ValueError(f"none of the target outputs {targets} is in the report")
    return min(chosen, key=lambda f: f["sqnr_db"])
