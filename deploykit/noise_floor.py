"""The convert check judged against float32's own noise, measured in float64.

A deep model in float32 differs from itself by summation order alone, and with some weights
that reaches a fixed bound: a BEVFormer-tiny checkpoint with random weights was reported
refused at 1.02e-4 against the bound of 1e-4 (the bundled synthetic weights and torch's default
initialisation stay near 5e-6). So the original model also runs in float64 on the same inputs,
and each engine output is judged by its error against that float64 reference:

    allowed = max(max_rel_error, noise_factor x (PyTorch float32's error against float64))

capped at ``max_rel_error_ceiling`` when the recipe sets one (0: no cap). A float32-noise-only
difference is then within a few times the noise, while a real bug (a wrong offset, a scaled
layer) is orders above it. Where the original model cannot run in float64 (an op without a
double kernel), the check falls back to float32 PyTorch as the reference with the fixed bound,
and says so.
"""

from __future__ import annotations

import copy

import numpy as np

from .compare import OutputAgreement


def float64_outputs(original, samples) -> list[dict[str, np.ndarray]] | None:
    """The original model's outputs in float64 on each sample's reference inputs, or None."""
    from .samples import torch_outputs

    try:
        model = copy.deepcopy(original).double()
        return [torch_outputs(model, {k: v.astype(np.float64) if np.issubdtype(v.dtype, np.floating) else v
                                      for k, v in s.reference.items()}) for s in samples]
    except (RuntimeError, TypeError, ValueError, NotImplementedError):  # e.g. no double kernel for an op
        return None


def allowances(tol, noise: dict[str, float]) -> dict[str, float]:
    """Output name -> the relative error it may have against the float64 reference."""
    out = {}
    for name, n in noise.items():
        allowed = max(tol.max_rel_error, tol.noise_factor * n)
        out[name] = min(allowed, tol.max_rel_error_ceiling) if tol.max_rel_error_ceiling > 0 else allowed
    return out


def judge(items: list[OutputAgreement], allowed: dict[str, float], min_cosine: float) -> dict:
    """check.json's block for one candidate: pass/fail per output against its allowance."""
    return {"passed": all(a.passes(allowed[a.name], min_cosine) for a in items),
            "worst_rel_error": max(a.max_rel_error for a in items),
            "min_cosine": min(a.cosine for a in items),
            "outputs": [{**a.to_dict(), "allowed_rel_error": allowed[a.name]} for a in items]}


def worst(items: list[OutputAgreement], allowed: dict[str, float]) -> OutputAgreement:
    """The output furthest beyond (or least within) its allowance."""
    return max(items, key=lambda a: a.max_rel_error / allowed[a.name] if allowed[a.name] > 0 else np.inf)
