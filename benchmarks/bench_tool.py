"""How long deploykit itself takes: convert, quantize and bench per recipe, and how
that grows with the number of pillars and the BEV size.

Cases are recipes ("centerpoint_pillar_nus") or scaled variants of one:
"pillars:N" is centerpoint_pillar_nus with max_pillars = N (the static pillar
dimension every stage carries), "bev:S" is bevformer_small with an S x S BEV
(virtual-BEV grid scaled with it). Each case is converted, quantized (recipe
int16 patterns, bundled synthetic calibration set) and benchmarked
(`deploykit bench` defaults but 2 + 10 runs), each step timed wall-clock in this
process; synthetic checkpoints and calibration sets are generated before the
clock starts. Writes benchmarks/results/tool.{json,md,png}.

    python benchmarks/bench_tool.py [--recipes CASE,CASE,...]
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from common import run  # benchmarks/common.py also puts the repository on sys.path

from deploykit.bench import bench_model  # noqa: E402
from deploykit.export import convert  # noqa: E402
from deploykit.quantize.pipeline import default_calib_set, quantize  # noqa: E402
from deploykit.recipe import load_recipe  # noqa: E402
from deploykit.report import markdown_table  # noqa: E402
from deploykit.synthetic_checkpoint import default_checkpoint  # noqa: E402

CASES = ("centerpoint_pillar_small,bevformer_small,centerpoint_pillar_nus,"
         "pillars:10000,pillars:20000,pillars:40000,bev:50,bev:128,bev:200")
# bev size -> virtual-BEV grid (h, w) per camera: about the pillars one camera sees, as in the recipes.
VIRTUAL = {50: (25, 26), 128: (64, 80), 200: (100, 120)}


def case_recipe(case: str):
    kind, _, value = case.partition(":")
    if not value:
        return load_recipe(case)
    n = int(value)
    if kind == "pillars":
        base = load_recipe("centerpoint_pillar_nus")
        vox = dataclasses.replace(base.model.voxelization, max_pillars=n)
        return dataclasses.replace(base, name=f"{base.name}-p{n}", model=dataclasses.replace(base.model,
                                                                                             voxelization=vox))
    if kind == "bev":
        base = load_recipe("bevformer_small")
        vh, vw = VIRTUAL[n]
        virtual = dataclasses.replace(base.model.virtual_bev, virtual_bev_h=vh, virtual_bev_w=vw)
        return dataclasses.replace(base, name=f"{base.name}-bev{n}", model=dataclasses.replace(
            base.model, bev_h=n, bev_w=n, virtual_bev=virtual))
    raise SystemExit(f"unknown case {case}: a recipe name, pillars:N or bev:S")


def bench_case(case: str, rounds: int, threads: int, workdir: Path) -> dict:
    recipe = case_recipe(case)
    print(f"{case}: preparing the synthetic checkpoint and calibration set", flush=True)
    default_checkpoint(recipe)
    default_calib_set(recipe)
    timings = {}
    start = time.perf_counter()
    convert(recipe, workdir / recipe.name, quiet=True)
    timings["convert_s"] = time.perf_counter() - start
    print(f"{case}: convert {timings['convert_s']:.1f} s", flush=True)
    start = time.perf_counter()
    quantize(recipe, workdir / recipe.name, workdir / f"{recipe.name}-q", quiet=True)
    timings["quantize_s"] = time.perf_counter() - start
    print(f"{case}: quantize {timings['quantize_s']:.1f} s", flush=True)
    start = time.perf_counter()
    result = bench_model(workdir / recipe.name / "model.onnx", threads=threads, warmup=2, iterations=10)
    timings["bench_s"] = time.perf_counter() - start
    m = recipe.model
    size = {"max_pillars": m.voxelization.max_pillars} if hasattr(m, "voxelization") else {"bev": [m.bev_h, m.bev_w]}
    return {"recipe": case, "recipe_name": recipe.name, **size, **timings,
            "latency_p50_ms": result["latency"]["p50_ms"], "model_mb": result["model_bytes"] / 2**20,
            "peak_memory_mb": (result["peak_memory_bytes"] or 0) / 2**20}


def to_markdown(report: dict) -> str:
    m = report["machine"]
    rows = [[r["recipe"], f"{r['convert_s']:.1f}", f"{r['quantize_s']:.1f}", f"{r['bench_s']:.1f}",
             f"{r['latency_p50_ms']:.1f}", f"{r['model_mb']:.1f}", f"{r['peak_memory_mb']:.0f}"]
            for r in report["recipes"]]
    return "\n".join([
        "# How long deploykit takes", "",
        f"Measured {report['date']} by `benchmarks/bench_tool.py` on {m['cpu']}, {m['cores']} cores, "
        f"{report['threads']} threads. Wall-clock seconds per command (library calls, progress output off); "
        "`pillars:N` is centerpoint_pillar_nus with N static pillars, `bev:S` bevformer_small with an SxS BEV. "
        "Latency and peak memory: the float engine on ONNX Runtime.", "",
        markdown_table(["case", "convert s", "quantize s", "bench s", "engine p50 ms", "model MB", "peak MB"],
                       rows), ""])


def plot(report: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, key, label, xs in ((axes[0], "pillars", "static pillars", lambda r: r["max_pillars"]),
                               (axes[1], "bev", "BEV side (cells)", lambda r: r["bev"][0])):
        rows = sorted((r for r in report["recipes"] if r["recipe"].startswith(key + ":")), key=xs)
        if not rows:
            ax.set_visible(False)
            continue
        for step, marker in (("convert_s", "o"), ("quantize_s", "s"), ("bench_s", "^")):
            ax.plot([xs(r) for r in rows], [r[step] for r in rows], marker=marker, label=step[:-2])
        ax.set_xlabel(label)
        ax.set_ylabel("seconds")
        ax.set_title({"pillars": "centerpoint_pillar_nus", "bev": "bevformer_small"}[key], fontsize=9)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    run(__doc__, "tool", CASES, {}, 1, bench_case, to_markdown, plot)


if __name__ == "__main__":
    main()
