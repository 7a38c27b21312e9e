"""BEVFusion on ONNX Runtime (CPU): the converted fused model against a naive export of
the same checkpoint, whole model and per stage, in one run.

* Whole model: the naive export (no passes: Linear PFN with ReduceMax, index-assignment
  scatter, dense SCA, the TSA mean, deformable attention as PyTorch's GridSample chain)
  and the converted one (the recipe's passes, custom ops run as ORT functions) timed
  interleaved (deploykit.bench.compare_engines): ratio of medians with a 95% bootstrap
  interval.
* Per stage: ONNX Runtime's node profile of each model grouped by the architecture's
  stage table (camera stream, LiDAR stream, fusion, detection head, occupancy head;
  deploykit.profile), profiles of the two models alternating, median of ``--rounds // 4``
  profiles each. The converted model's custom ops form their own group (what a plugin
  replaces), so the stream rows of the converted model exclude their custom ops.

Both models' outputs are compared with the PyTorch model. Writes
benchmarks/results/bevfusion.{md,json,png}.

    python benchmarks/bench_bevfusion.py [--recipes bevfusion_small,bevfusion_npu] [--rounds N]
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from common import export_simplified, original_and_converted, run  # also puts the repository on sys.path

from deploykit.bench import compare_engines  # noqa: E402
from deploykit.compare import compare_outputs  # noqa: E402
from deploykit.engines.ort import build  # noqa: E402
from deploykit.models import ARCHITECTURES  # noqa: E402
from deploykit.profile import stage_breakdown  # noqa: E402
from deploykit.recipe import load_recipe  # noqa: E402
from deploykit.report import markdown_table, ratio_rows_markdown, speedup_plot  # noqa: E402

SAMPLE_SEED = 2001  # odd: a frame with a previous BEV
DEFAULT_ROUNDS = {"bevfusion_small": 40, "bevfusion_npu": 6}


def _stages(paths: dict[str, Path], profiles: int, threads: int, stages) -> dict[str, dict[str, float]]:
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in paths}
    for _ in range(profiles):
        for label, path in paths.items():
            rows = stage_breakdown(path, runs=3, threads=threads, stages=stages)
            runs[label].append({r["stage"]: r["ms_per_run"] for r in rows})
    out = {}
    for label, items in runs.items():
        names = {s for item in items for s in item}
        out[label] = {s: float(np.median([item.get(s, 0.0) for item in items])) for s in names}
    return out


def bench_recipe(name: str, rounds: int, threads: int, workdir: Path) -> dict:
    recipe = load_recipe(name)
    original, converted, raw, sample, reference = original_and_converted(recipe, SAMPLE_SEED)
    print(f"{name}: exporting the naive and the converted model", flush=True)
    paths = {"naive export": export_simplified(original, raw.feeds, workdir / "naive" / "model.onnx",
                                               recipe.convert.opset),
             "converted": export_simplified(converted, sample.feeds, workdir / "converted" / "model.onnx",
                                            recipe.convert.opset)}
    feeds = {"naive export": raw.feeds, "converted": sample.feeds}
    errors = {k: max(a.max_rel_error for a in compare_outputs(reference, build(p).run(feeds[k])))
              for k, p in paths.items()}
    del original, converted
    print(f"{name}: timing the whole models x {rounds} rounds, then per-stage profiles", flush=True)
    whole = compare_engines({k: (p, feeds[k], "function") for k, p in paths.items()}, "naive export", rounds=rounds,
                            threads=threads, warmup=1)
    for row in whole:
        row["max_rel_error_vs_pytorch"] = errors[row["variant"]]
    per_stage = _stages(paths, max(1, rounds // 4), threads, ARCHITECTURES[recipe.arch].stages)
    cfg = recipe.model
    return {"recipe": name, "bev": list(cfg.bev_shape), "image": list(cfg.camera.image_size),
            "pillars": list(sample.feeds["pillars"].shape), "occupancy": list(cfg.occ.size),
            "passes": list(recipe.convert.passes), "whole_model": whole, "stages_ms": per_stage}


STAGE_ORDER = ("camera stream", "LiDAR stream", "fusion", "detection head", "occupancy head", "custom ops")


def stage_rows(r: dict) -> list[list[str]]:
    naive, conv = r["stages_ms"]["naive export"], r["stages_ms"]["converted"]
    names = [s for s in STAGE_ORDER if s in naive or s in conv]
    names += sorted(s for s in set(naive) | set(conv) if s not in names)
    rows = []
    for s in names:
        a, b = naive.get(s, 0.0), conv.get(s, 0.0)
        rows.append([s, f"{a:.2f}", f"{b:.2f}", f"{a / b:.2f}x" if a and b else "-"])
    rows.append(["total (profiled kernels)", f"{sum(naive.values()):.2f}", f"{sum(conv.values()):.2f}",
                 f"{sum(naive.values()) / sum(conv.values()):.2f}x"])
    return rows


def to_markdown(report: dict) -> str:
    m = report["machine"]
    out = ["# BEVFusion on ONNX Runtime (CPU): converted vs naive export", "",
           f"Measured {report['date']} by `benchmarks/bench_bevfusion.py` on {m['cpu']}, {m['cores']} cores, "
           f"{m['memory_gib']} GiB, {m['os']}; ONNX Runtime {report['versions']['onnxruntime']}, torch "
           f"{report['versions']['torch']}, {report['threads']} intra-op threads. The recipe's bundled weights; "
           "input: a frame with a previous BEV. Whole model: the two engines interleaved in one process, ratio = median latency / "
           "median of the naive export, 95% bootstrap interval. Per stage: median of ONNX Runtime node profiles "
           "(kernel time per run) grouped by stage; in the converted model the custom ops (MSDA, pillar scatter) "
           "are their own row, the time a plugin replaces.", ""]
    for r in report["recipes"]:
        out += [f"## {r['recipe']} (BEV {r['bev'][0]}x{r['bev'][1]}, images 6x3x{r['image'][0]}x{r['image'][1]}, "
                f"pillars {'x'.join(map(str, r['pillars']))}, occupancy {'x'.join(map(str, r['occupancy']))})", "",
                f"Passes: {', '.join(r['passes'])}.", "", "### Whole model", "",
                ratio_rows_markdown(r["whole_model"], {
                    "max rel error": lambda x: f"{x['max_rel_error_vs_pytorch']:.1e}"}), "",
                "### Per stage (ms per run, ONNX Runtime profile)", "",
                markdown_table(["stage", "naive export", "converted", "naive / converted"], stage_rows(r)), ""]
    out += ["![speed-ups](bevfusion.png)", ""]
    return "\n".join(out)


def plot(report: dict, path: Path) -> None:
    speedup_plot([(f"{r['recipe']}: whole model", r["whole_model"]) for r in report["recipes"]], path,
                 baseline="naive export")


def main() -> None:
    run(__doc__, "bevfusion", "bevfusion_small", DEFAULT_ROUNDS, 10, bench_recipe, to_markdown, plot)


if __name__ == "__main__":
    main()
