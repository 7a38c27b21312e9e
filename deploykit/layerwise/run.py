"""``deploykit compare``: two sides, shared inputs, one layer profile."""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError
from ..progress import Steps
from .profile import LayerProfile, profile_layers
from .sides import load_inputs, open_side


def compare(a: str, b: str, *, inputs: str | Path | None = None, samples: int = 1, threshold: float | None = None,
            report: str | Path | None = None, custom_ops: str = "function", ort_optimization: str = "all",
            overwrite: bool = False, quiet: bool = False) -> LayerProfile:
    """Run ``a`` (the reference) and ``b`` on the same inputs and profile B's error per layer
    (deploykit.layerwise.sides for what a side is). ``report`` writes compare.md/.json/.png there.
    ``ort_optimization`` is ONNX Runtime's graph optimization level for the ONNX sides ("none":
    the graph as written, without ORT's fused int8 kernels)."""
    if samples < 1:
        raise InputError(f"--samples must be 1 or more, got {samples}")
    if report is not None:
        from ..artifacts import ensure_writable

        ensure_writable(Path(report), overwrite=overwrite)
    steps = Steps(4 if report else 3, quiet=quiet)
    with steps.step(f"open {a} and {b}"):
        side_a, side_b = (open_side(x, custom_ops=custom_ops, optimization=ort_optimization) for x in (a, b))
        converted = side_a.converted or side_b.converted
        if converted is None and inputs is None:
            raise InputError("neither side is in a deploykit directory, so there are no default inputs: "
                             "pass --inputs FILE.npz")
        data = load_inputs(inputs, converted, samples)
        if inputs is not None and (side_a.original or side_b.original):
            raise_if_original_inputs_differ(side_a if side_a.original else side_b, converted,
                                            data[0].reference or None)
    with steps.step(f"run {a} on {len(data)} sample(s), recording every layer"):
        runs_a = side_a.run([s.reference if side_a.original else s.feeds for s in data])
    with steps.step(f"run {b} on {len(data)} sample(s), recording every layer"):
        runs_b = side_b.run([s.reference if side_b.original else s.feeds for s in data])
    result = profile_layers(runs_a, runs_b, a=a, b=b, threshold=threshold, a_quantized=side_a.quantized,
                            b_quantized=side_b.quantized)
    if not result.rows:
        raise InputError(f"no layer of {a} pairs with one of {b}: they share no module path with a tensor "
                         "of the same shape")
    if report is not None:
        from .report import write_report

        with steps.step(f"write {report}/compare.md, .json, .png"):
            write_report(result, Path(report), overwrite=overwrite)
    return result


def raise_if_original_inputs_differ(side, converted: Path, feeds: dict) -> None:
    """The original model takes its own inputs (CenterPoint's: unpadded pillars, another layout),
    which engine inputs from a file need not be."""
    expected = {k: v.shape for k, v in load_inputs(None, converted, 1)[0].reference.items()}
    got = {k: feeds[k].shape for k in expected if k in feeds} if feeds is not None else None
    if got != expected:
        raise InputError(f"{side.label} (the original model) takes "
                         + ", ".join(f"{k}{list(v)}" for k, v in expected.items())
                         + ", which --inputs does not hold; leave --inputs out (the check samples hold the "
                         "original's inputs) or compare the rewritten model (DIR:rewritten) instead")
