"""The repository's own regression gate, run by .ci/run (`make gate`).

Converts the small recipes (and quantizes the trained synthetic-LiDAR one) with
this checkout's code into build/gate/, then gates each model against the
committed baseline in benchmarks/baselines/: latency against the baseline model
stored there, timed interleaved in this process (so it holds on any machine),
and the quantized models' fidelity (worst output SQNR, mAP). A regression fails
CI with exit code 10.

    python benchmarks/ci_gate.py            # gate
    python benchmarks/ci_gate.py --update   # rewrite the baselines on purpose
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rich.console import Console  # noqa: E402

from deploykit.errors import DeployError, GateFailedError  # noqa: E402
from deploykit.export import convert  # noqa: E402
from deploykit.gate import gate, update_baseline  # noqa: E402
from deploykit.quantize.pipeline import quantize  # noqa: E402
from deploykit.recipe import REPO_ROOT  # noqa: E402
from deploykit.report import gate_table  # noqa: E402

BASELINES = REPO_ROOT / "benchmarks" / "baselines"
BUILD = REPO_ROOT / "build" / "gate"
# recipe -> the model files gated; quantized ones come from `deploykit quantize`.
GATED = {
    "centerpoint_pillar_small": ["model.onnx"],
    "bevformer_small": ["model.onnx"],
    "centerpoint_pillar_synth": ["model.onnx", "model.qdq.onnx"],  # the deployed int8 + int16 model
    "bevfusion_small": ["model.onnx", "model.qdq.onnx"],  # both streams, fusion, DETR and occupancy heads
    "bevdepth_small": ["model.onnx"],  # LSS with the two BEVPool nodes, ONNX DeformConv, two key frames
}


def build(recipe: str, files: list[str]) -> list[Path]:
    converted = BUILD / recipe
    convert(recipe, converted, overwrite=True, quiet=True)
    if any(f != "model.onnx" for f in files):
        quantize(recipe, converted, BUILD / f"{recipe}-quant", overwrite=True, quiet=True)
    return [(converted if f == "model.onnx" else BUILD / f"{recipe}-quant") / f for f in files]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--update", action="store_true", help="write new baselines instead of gating")
    parser.add_argument("--recipes", default=",".join(GATED))
    args = parser.parse_args()
    results = []
    try:
        for recipe in args.recipes.split(","):
            print(f"{recipe}: convert{' and quantize' if len(GATED[recipe]) > 1 else ''}", flush=True)
            models = build(recipe, GATED[recipe])
            baseline = BASELINES / f"{recipe}.json"
            if args.update:
                update_baseline(baseline, models, store_models=True)
                print(f"wrote {baseline.relative_to(REPO_ROOT)}", flush=True)
            else:
                results += [gate(baseline, m) for m in models]
    except DeployError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    if results:
        Console(width=160).print(gate_table(results))
        if not all(r.passed for r in results):
            print("error: regression beyond the recipes' [gate] limits", file=sys.stderr)
            return GateFailedError.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
