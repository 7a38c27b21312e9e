"""Float vs every quantized flavour vs ONNX Runtime's own quantizer on ONNX Runtime (CPU).

For each recipe: convert, quantize (the recipe's int16 patterns, or
--int16-sensitive for the recipes in INT16_SENSITIVE; bundled calibration
set), then time model.onnx, model.int8.qdq.onnx, model.qdq.onnx, their ONNX
Runtime flavours (model.ort.int8.qdq.onnx, model.ort.qdq.onnx) and the model
ORT's ``quantize_static`` makes from the same float graph and the same
calibration samples (a temporal model's with the state the float engine gives
each frame; QDQ, its CPU defaults: per-channel int8 weights, uint8 activations,
MinMax), all interleaved in one process
(deploykit.bench.compare_engines). Fidelity beside each: for the TensorRT-placed
files the fake-quant model against the float one (what quantize measured); for
the ORT flavours and ORT's model, the engine itself against the float engine on
the same check samples; mAP against ground truth where the recipe scores it (the
ORT rows scored by running the ORT engine). Writes benchmarks/results/quantize.{md,json}.

    python benchmarks/bench_quantize.py [--recipes centerpoint_pillar_small,bevformer_small] [--rounds N]
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from common import run  # benchmarks/common.py also puts the repository on sys.path

from deploykit.bench import compare_engines  # noqa: E402
from deploykit.export import convert  # noqa: E402
from deploykit.quantize.pipeline import quantize  # noqa: E402
from deploykit.report import ratio_rows_markdown  # noqa: E402

DEFAULT_ROUNDS = {"centerpoint_pillar_small": 40, "centerpoint_pillar_synth": 40, "bevformer_small": 40,
                  "bevfusion_small": 40, "bevdepth_small": 40,
                  "centerpoint_pillar_nus": 12, "bevformer_tiny": 8}
# Recipes whose int16 set is chosen by measurement (--int16-sensitive) rather than by hand.
INT16_SENSITIVE = {"centerpoint_pillar_synth", "bevdepth_small"}
# Recipes whose mAP the ORT rows are scored in (trained weights; scoring runs every engine over the scenes).
MAP_RECIPES = {"centerpoint_pillar_synth"}


def worst(outputs: list[dict]) -> dict:
    return min(outputs, key=lambda f: f["sqnr_db"])


ORT_TOOL = "ORT quantize_static (int8)"


def calibration_feeds(name: str, conv: Path, quant: Path) -> list[dict]:
    """The quantize run's calibration samples as whole engine feeds: as stored, or, for a
    temporal model, with the state each frame gets when the float engine runs the scenes in
    order (what deploykit's own calibration does with the fake-quant model)."""
    from deploykit.engines.ort import build
    from deploykit.quantize.calib_set import load_calib_set
    from deploykit.recipe import load_recipe
    from deploykit.temporal import sequence_runner

    calib = load_calib_set(Path(json.loads((quant / "manifest.json").read_text())["calibration"]["path"]))
    if not calib.temporal:
        return [s.arrays for s in calib]
    runner = sequence_runner(load_recipe(name).model, build(conv / "model.onnx"))
    feeds = []
    for sample in calib:
        frame = runner.frame_from_arrays(sample.arrays, sample.scene, sample.index)
        feeds.append(runner.feeds(frame))
        runner.step(frame)
    return feeds


def ort_tool_model(name: str, conv: Path, quant: Path, out: Path) -> Path:
    """ONNX Runtime's quantize_static on the float model (custom ops inlined, which its
    calibrator needs), calibrated on the quantize run's calibration samples."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from deploykit.engines.ort import prepare

    model = onnx.load(str(conv / "model.onnx"))
    names = [i.name for i in model.graph.input]
    samples = calibration_feeds(name, conv, quant)
    inlined = out.with_suffix(".float.onnx")
    onnx.save(prepare(model, "inline"), str(inlined))

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{n: a[n] for n in names} for a in samples])

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(inlined), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out


def engine_fidelity(name: str, conv: Path, variants: dict[str, Path], threads: int) -> dict[str, dict]:
    """Worst output (SQNR, cosine) of each engine against the float engine on the check samples,
    and mAP where the recipe scores it, by running the ORT engines."""
    from deploykit.detection.evaluate import EVAL_SEED
    from deploykit.engines.ort import build
    from deploykit.export import CHECK_SEED
    from deploykit.models import ARCHITECTURES, make_sample
    from deploykit.quantize.fidelity import fidelity as measure
    from deploykit.quantize.pipeline import load_converted
    from deploykit.recipe import load_recipe

    recipe = load_recipe(name)
    model, _ = load_converted(recipe, conv)
    samples = [make_sample(recipe, CHECK_SEED + i, model).feeds for i in range(recipe.check.samples)]
    engines = {k: build(p, threads=threads) for k, p in {"float": conv / "model.onnx", **variants}.items()}
    ref = [engines["float"].run(f) for f in samples]
    out = {}
    arch = ARCHITECTURES[recipe.arch]
    scenes = None
    if recipe.quantize.eval_scenes and arch.labelled_scenes is not None and name in MAP_RECIPES:
        scenes = arch.labelled_scenes(recipe, model, range(EVAL_SEED, EVAL_SEED + recipe.quantize.eval_scenes))
    for key, engine in engines.items():
        if key == "float":
            continue
        w = worst([f.to_dict() for f in measure(ref, [engine.run(f) for f in samples])])
        out[key] = {"worst_output": w["name"], "worst_sqnr_db": w["sqnr_db"], "worst_cosine": w["cosine"]}
        if scenes is not None:
            task = arch.score(recipe, scenes, engine.run)
            out[key]["mAP"] = task["mAP"]
    return out


def bench_recipe(name: str, rounds: int, threads: int, workdir: Path) -> dict:
    print(f"{name}: convert and quantize", flush=True)
    conv = workdir / f"{name}-float"
    convert(name, conv, quiet=True)
    quant = workdir / f"{name}-quant"
    quantize(name, conv, quant, int16_sensitive=name in INT16_SENSITIVE, quiet=True)
    fidelity = json.loads((quant / "fidelity.json").read_text())
    feeds = dict(np.load(conv / "inputs.npz"))
    variants = {"float (model.onnx)": (conv / "model.onnx", feeds, "function"),
                "int8 (model.int8.qdq.onnx)": (quant / "model.int8.qdq.onnx", feeds, "function")}
    if (quant / "model.qdq.onnx").exists():
        variants["int8 + int16 (model.qdq.onnx)"] = (quant / "model.qdq.onnx", feeds, "function")
    measured = {}
    for label, file in (("int8, ORT flavour (model.ort.int8.qdq.onnx)", "model.ort.int8.qdq.onnx"),
                        ("int8 + int16, ORT flavour (model.ort.qdq.onnx)", "model.ort.qdq.onnx")):
        if (quant / file).exists():
            measured[label] = quant / file
    measured[ORT_TOOL] = ort_tool_model(name, conv, quant, workdir / f"{name}-ort-tool.onnx")
    variants.update({k: (p, feeds, "function") for k, p in measured.items()})
    print(f"{name}: fidelity of {len(measured)} ORT engines", flush=True)
    engine_rows = engine_fidelity(name, conv, measured, threads)
    print(f"{name}: timing {len(variants)} variants x {rounds} rounds", flush=True)
    rows = compare_engines(variants, "float (model.onnx)", rounds=rounds, threads=threads)
    keys = {"float (model.onnx)": "float", "int8 (model.int8.qdq.onnx)": "int8",
            "int8 + int16 (model.qdq.onnx)": "int8_int16"}
    for row in rows:
        if row["variant"] in engine_rows:
            row.update(engine_rows[row["variant"]], fidelity_of="engine")
            continue
        key = keys[row["variant"]]
        if key != "float":
            w = worst(fidelity[key])
            row.update({"worst_output": w["name"], "worst_sqnr_db": w["sqnr_db"], "worst_cosine": w["cosine"]})
        if "task_map" in fidelity:
            row["mAP"] = fidelity["task_map"][key]["mAP"]
            if "mIoU" in fidelity["task_map"][key]:  # a fused model's occupancy
                row["occupancy_mIoU"] = fidelity["task_map"][key]["mIoU"]
    return {"recipe": name, "rows": rows, "int16_sensitive": name in INT16_SENSITIVE,
            "int16_quantizers": json.loads((quant / "manifest.json").read_text())["quantizers"]["int16"],
            "eval_scenes": fidelity.get("task_map", {}).get("scenes")}


def to_markdown(report: dict) -> str:
    m = report["machine"]
    out = ["# Quantized models on ONNX Runtime (CPU)", "",
           f"Measured {report['date']} by `benchmarks/bench_quantize.py` on {m['cpu']}, {m['cores']} cores; ONNX "
           f"Runtime {report['versions']['onnxruntime']}, {report['threads']} threads, all variants interleaved in "
           "one process; ratio = median latency / median of the float model, 95% bootstrap interval. Fidelity "
           "(worst output, check samples): for model.int8.qdq.onnx and model.qdq.onnx the fake-quant model "
           "against the float one; for the ORT flavours and ORT's quantize_static the ONNX Runtime engine against "
           "the float engine (their mAP too is the engine's). ORT's tool: same float graph (custom ops inlined) "
           "and calibration samples, QDQ, per-channel int8 weights, uint8 activations, MinMax. Synthetic weights "
           "except where mAP is given.", ""]
    for r in report["recipes"]:
        extra = {"worst output": lambda x: x.get("worst_output", ""),
                 "SQNR dB": lambda x: f"{x['worst_sqnr_db']:.1f}" if "worst_output" in x else "",
                 "cosine": lambda x: f"{x['worst_cosine']:.5f}" if "worst_output" in x else ""}
        if r.get("eval_scenes"):
            extra["mAP"] = lambda x: f"{x['mAP']:.4f}" if "mAP" in x else ""
        if any("occupancy_mIoU" in x for x in r["rows"]):
            extra["occupancy mIoU"] = lambda x: f"{x['occupancy_mIoU']:.4f}"
        how = "chosen by `--int16-sensitive`" if r.get("int16_sensitive") else "from the recipe's patterns"
        notes = [f"int16: {r.get('int16_quantizers', 0)} quantizers, {how}."]
        if r.get("eval_scenes"):
            notes.append(f"mAP: nuScenes-style, against ground truth on {r['eval_scenes']} held-out synthetic "
                         "scenes (trained weights, checkpoints/).")
        out += [f"## {r['recipe']}", "", " ".join(notes), "", ratio_rows_markdown(r["rows"], extra), ""]
    return "\n".join(out)


def main() -> None:
    run(__doc__, "quantize",
        "centerpoint_pillar_synth,centerpoint_pillar_small,bevformer_small,bevfusion_small,bevdepth_small,"
        "centerpoint_pillar_nus",
        DEFAULT_ROUNDS, 10, bench_recipe, to_markdown)


if __name__ == "__main__":
    main()
