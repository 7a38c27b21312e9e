"""The convert check against float32's noise floor, on BEVFormer-tiny at its release size.

Three converts of bevformer_tiny (480x800 images, release-layout checkpoints): the bundled
synthetic weights, untrained DETR-style weights (``xavier_uniform_`` on every matrix, the
case issue 18 reported refused at 1.02e-4 by a fixed 1e-4 bound), and the latter with a 1e-3
bug planted in one decoder layer. For each output: float32 PyTorch's error against float64
(the noise), the ONNX Runtime engine's, the allowance and the verdict. Writes
benchmarks/results/noise_floor.{json,md}. Not timed: this measures a check, not a speed.

    python benchmarks/noise_floor.py
"""

from __future__ import annotations

import datetime
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import RESULTS  # benchmarks/common.py also puts the repository on sys.path

from deploykit import passes  # noqa: E402
from deploykit.artifacts import write_json  # noqa: E402
from deploykit.bench import machine_info  # noqa: E402
from deploykit.errors import CheckFailedError  # noqa: E402
from deploykit.export import convert  # noqa: E402
from deploykit.recipe import load_recipe  # noqa: E402
from deploykit.synthetic_checkpoint import write_synthetic_checkpoint  # noqa: E402

BUGGY = "pts_bbox_head.transformer.decoder.layers.1.attentions.1.output_proj"  # as tests/test_noise_floor_bevformer_tiny.py


def plant_bug():
    rewrite = passes.PASSES["msda_op"]

    def planted(model):
        model = rewrite(model)
        with torch.no_grad():
            model.get_submodule(BUGGY).weight.mul_(1 + 1e-3)
        return model

    passes.PASSES["msda_op"] = planted
    return lambda: passes.PASSES.__setitem__("msda_op", rewrite)


def case(name: str, init: str, bug: bool, tmp: Path) -> dict:
    recipe = load_recipe("bevformer_tiny")
    ckpt = write_synthetic_checkpoint(recipe, 0, tmp / f"{init}.pth", init=init)
    undo = plant_bug() if bug else (lambda: None)
    slug = f"{init}-bug" if bug else init
    start = time.perf_counter()
    try:
        check = convert(recipe, tmp / slug, checkpoint=ckpt, quiet=True).check
    except CheckFailedError as e:
        check = json.loads((tmp / f"{slug}.check-failed" / "check.json").read_text())
        check["error"] = str(e).splitlines()[0]
    finally:
        undo()
    print(f"{name}: {'passed' if check['passed'] else 'refused'} ({time.perf_counter() - start:.0f} s)", flush=True)
    return {"case": name, "init": init, "planted_bug": BUGGY if bug else None, "fixed_bound": recipe.check.max_rel_error,
            "passed": check["passed"], "error": check.get("error"), "noise": check["float32_noise"],
            "outputs": check["onnxruntime"]["outputs"]}


def markdown(report: dict) -> str:
    lines = ["# The convert check against float32's noise floor (bevformer_tiny, 480x800)", "",
             f"{report['date']}, {report['machine'].get('cpu', '')}; `python benchmarks/noise_floor.py`.", "",
             "Each output may err against the float64 original by max(1e-4, 4 x float32 PyTorch's own error).", "",
             "| case | output | float32 noise | engine error | allowed | a fixed 1e-4 | verdict |",
             "|---|---|---:|---:|---:|---|---|"]
    for c in report["cases"]:
        for o in c["outputs"]:
            fixed = "refuses" if o["max_rel_error"] > c["fixed_bound"] else "passes"
            ok = "pass" if o["max_rel_error"] <= o["allowed_rel_error"] else "**fail**"
            lines.append(f"| {c['case']} | {o['name']} | {c['noise'][o['name']]:.2e} | {o['max_rel_error']:.2e} | "
                         f"{o['allowed_rel_error']:.2e} | {fixed} | {ok} |")
    lines += ["", "Errors are max |a - b| / max |reference| over the check's two samples (a first frame and a "
              "later one); the engine is ONNX Runtime on CPU with the MSDA custom op as an ONNX function."]
    for c in report["cases"]:
        if c["error"]:
            lines += ["", f"{c['case']}: `{c['error']}`"]
    return "\n".join(lines) + "\n"


def main() -> None:
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        cases = [case("bundled synthetic weights", "synthetic", False, Path(tmp)),
                 case("untrained (xavier)", "xavier", False, Path(tmp)),
                 case("untrained + 1e-3 decoder bug", "xavier", True, Path(tmp))]
    report = {"date": datetime.date.today().isoformat(), "machine": machine_info(), "cases": cases}
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / "noise_floor.json", report)
    (RESULTS / "noise_floor.md").write_text(markdown(report))
    print((RESULTS / "noise_floor.md").read_text())


if __name__ == "__main__":
    sys.exit(main())
