"""Float vs int8 vs int8+int16 on ONNX Runtime (CPU), next to their fidelity.

For each recipe: convert (synthetic weights), quantize (the recipe's int16
patterns, bundled calibration set), then time model.onnx, model.int8.qdq.onnx
and model.qdq.onnx interleaved in one process (deploykit.bench.compare_engines)
and put the ratios beside the fidelity quantize measured (worst output SQNR
and cosine against the float model). Writes benchmarks/results/quantize.{md,json}.

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

DEFAULT_ROUNDS = {"centerpoint_pillar_small": 40, "bevformer_small": 40, "centerpoint_pillar_nus": 12,
                  "bevformer_tiny": 8}


def worst(outputs: list[dict]) -> dict:
    return min(outputs, key=lambda f: f["sqnr_db"])


def bench_recipe(name: str, rounds: int, threads: int, workdir: Path) -> dict:
    print(f"{name}: convert and quantize", flush=True)
    conv = workdir / f"{name}-float"
    convert(name, conv, quiet=True)
    quant = workdir / f"{name}-quant"
    quantize(name, conv, quant, quiet=True)
    fidelity = json.loads((quant / "fidelity.json").read_text())
    feeds = dict(np.load(conv / "inputs.npz"))
    variants = {"float (model.onnx)": (conv / "model.onnx", feeds, "function"),
                "int8 (model.int8.qdq.onnx)": (quant / "model.int8.qdq.onnx", feeds, "function")}
    if (quant / "model.qdq.onnx").exists():
        variants["int8 + int16 (model.qdq.onnx)"] = (quant / "model.qdq.onnx", feeds, "function")
    print(f"{name}: timing {len(variants)} variants x {rounds} rounds", flush=True)
    rows = compare_engines(variants, "float (model.onnx)", rounds=rounds, threads=threads)
    keys = {"int8 (model.int8.qdq.onnx)": "int8", "int8 + int16 (model.qdq.onnx)": "int8_int16"}
    for row in rows:
        key = keys.get(row["variant"])
        if key:
            w = worst(fidelity[key])
            row.update({"worst_output": w["name"], "worst_sqnr_db": w["sqnr_db"], "worst_cosine": w["cosine"]})
    return {"recipe": name, "rows": rows}


def to_markdown(report: dict) -> str:
    m = report["machine"]
    out = ["# Quantized models on ONNX Runtime (CPU)", "",
           f"Measured {report['date']} by `benchmarks/bench_quantize.py` on {m['cpu']}, {m['cores']} cores; ONNX "
           f"Runtime {report['versions']['onnxruntime']}, {report['threads']} threads, all variants interleaved in "
           "one process; ratio = median latency / median of the float model, 95% bootstrap interval. Fidelity: "
           "the fake-quant model against the float one on the check samples (worst output). Synthetic weights.", ""]
    for r in report["recipes"]:
        table = ratio_rows_markdown(r["rows"], {
            "worst output": lambda x: x.get("worst_output", ""),
            "SQNR dB": lambda x: f"{x['worst_sqnr_db']:.1f}" if "worst_output" in x else "",
            "cosine": lambda x: f"{x['worst_cosine']:.5f}" if "worst_output" in x else ""})
        out += [f"## {r['recipe']}", "", table, ""]
    return "\n".join(out)


def main() -> None:
    run(__doc__, "quantize", "centerpoint_pillar_small,bevformer_small,centerpoint_pillar_nus", DEFAULT_ROUNDS, 10, bench_recipe, to_markdown)


if __name__ == "__main__":
    main()
