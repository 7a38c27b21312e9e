"""Float vs int8 vs int8+int16 on ONNX Runtime (CPU), next to their fidelity.

For each recipe: convert, quantize (the recipe's int16 patterns, or
--int16-sensitive for the recipes in INT16_SENSITIVE; bundled calibration
set), then time model.onnx, model.int8.qdq.onnx
and model.qdq.onnx interleaved in one process (deploykit.bench.compare_engines)
and put the ratios beside the fidelity quantize measured (worst output SQNR
and cosine against the float model; mAP against ground truth where the recipe
scores it). Writes benchmarks/results/quantize.{md,json}.

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


def worst(outputs: list[dict]) -> dict:
    return min(outputs, key=lambda f: f["sqnr_db"])


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
    print(f"{name}: timing {len(variants)} variants x {rounds} rounds", flush=True)
    rows = compare_engines(variants, "float (model.onnx)", rounds=rounds, threads=threads)
    keys = {"float (model.onnx)": "float", "int8 (model.int8.qdq.onnx)": "int8",
            "int8 + int16 (model.qdq.onnx)": "int8_int16"}
    for row in rows:
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
           "one process; ratio = median latency / median of the float model, 95% bootstrap interval. Fidelity: "
           "the fake-quant model against the float one on the check samples (worst output). Synthetic weights except "
           "where mAP is given.", ""]
    for r in report["recipes"]:
        extra = {"worst output": lambda x: x.get("worst_output", ""),
                 "SQNR dB": lambda x: f"{x['worst_sqnr_db']:.1f}" if "worst_output" in x else "",
                 "cosine": lambda x: f"{x['worst_cosine']:.5f}" if "worst_output" in x else ""}
        if r.get("eval_scenes"):
            extra["mAP"] = lambda x: f"{x['mAP']:.4f}"
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
