"""BEVDepth on ONNX Runtime (CPU): the converted two-key engine against the best naive
export of the public model, in one run.

The public model cannot be exported as it is: its voxel pooling is a CUDA extension
and its DCN is mmcv's. deploykit's ``BEVDepth`` is the release's forward in PyTorch
(the pooling as the CUDA kernel computes it, on a mask of the points inside the grid:
NonZero, so dynamic shapes inside the graph; the DCN as ONNX DeformConv). Exporting
it still stops at ``torch.inverse`` (``aten::linalg_inv`` has no ONNX op), so the naive
export maps it to ONNX Runtime's contrib ``com.microsoft::Inverse`` (one registered
symbolic, the least a user has to change). Like the release it runs both key frames'
images through the backbone on every call and pools a frustum built from the matrices.

The converted engine (the recipe's passes: camera_mlp_fold, bev_pool_op) runs the
current frame's images only, takes the previous key frame's depth and context from its
own previous call, and pools with two ``deploykit::BEVPool`` nodes (constant ranks for
the current frame; ranks from the ego motion for the previous one), run as their
ONNX-function lowering and as the onnxruntime-extensions kernel.

Timed interleaved (deploykit.bench.compare_engines): ratio of medians with a 95%
bootstrap interval; every engine is checked against the PyTorch release model.
Writes benchmarks/results/bevdepth.{md,json,png}.

    python benchmarks/bench_bevdepth.py [--recipes bevdepth_small,bevdepth_r50] [--rounds N]
"""

from __future__ import annotations

from pathlib import Path

import torch

from common import export_simplified, original_and_converted, run  # also puts the repository on sys.path

from deploykit.bench import compare_engines  # noqa: E402
from deploykit.compare import compare_outputs  # noqa: E402
from deploykit.engines.ort import build  # noqa: E402
from deploykit.recipe import load_recipe  # noqa: E402
from deploykit.report import ratio_rows_markdown, speedup_plot  # noqa: E402

SAMPLE_SEED = 2001  # odd: a frame with a previous key frame
DEFAULT_ROUNDS = {"bevdepth_small": 40, "bevdepth_r50": 6}
NAIVE = "naive export (release forward)"


def _inverse_symbolic(g, x):
    return g.op("com.microsoft::Inverse", x)


def bench_recipe(name: str, rounds: int, threads: int, workdir: Path) -> dict:
    recipe = load_recipe(name)
    original, converted, raw, sample, reference = original_and_converted(recipe, SAMPLE_SEED)
    print(f"{name}: exporting the naive and the converted model", flush=True)
    torch.onnx.register_custom_op_symbolic("aten::linalg_inv", _inverse_symbolic, 1)
    try:
        naive = export_simplified(original, raw.reference, workdir / name / "naive" / "model.onnx", recipe.convert.opset)
    finally:
        torch.onnx.unregister_custom_op_symbolic("aten::linalg_inv", 1)
    conv = export_simplified(converted, sample.feeds, workdir / name / "converted" / "model.onnx",
                             recipe.convert.opset)
    variants = {NAIVE: (naive, raw.reference, "function"),
                "converted, BEVPool as ORT function": (conv, sample.feeds, "function"),
                "converted, BEVPool ortx kernel": (conv, sample.feeds, "ortx")}
    errors = {}
    for label, (path, feeds, mode) in variants.items():
        out = build(path, custom_ops=mode).run(feeds)
        errors[label] = max(a.max_rel_error for a in compare_outputs(reference, {k: out[k] for k in reference}))
    del original, converted
    print(f"{name}: timing x {rounds} rounds", flush=True)
    rows = compare_engines(variants, NAIVE, rounds=rounds, threads=threads, warmup=1)
    for row in rows:
        row["max_rel_error_vs_pytorch"] = errors[row["variant"]]
    cfg = recipe.model
    return {"recipe": name, "image": list(cfg.image_size), "cams": cfg.num_cams, "depth_bins": cfg.depth_bins,
            "feature": list(cfg.feature_size), "bev": list(cfg.bev_size), "keys": cfg.keys,
            "passes": list(recipe.convert.passes), "whole_model": rows}


def to_markdown(report: dict) -> str:
    m = report["machine"]
    out = ["# BEVDepth on ONNX Runtime (CPU): converted two-key engine vs naive export", "",
           f"Measured {report['date']} by `benchmarks/bench_bevdepth.py` on {m['cpu']}, {m['cores']} cores, "
           f"{m['memory_gib']} GiB, {m['os']}; ONNX Runtime {report['versions']['onnxruntime']}, torch "
           f"{report['versions']['torch']}, {report['threads']} intra-op threads. The recipe's bundled (synthetic) "
           "weights; input: a frame with a previous key frame. Interleaved in one process, ratio = median latency / "
           "median of the naive export, 95% bootstrap interval; max rel error = worst head output against the "
           "PyTorch release model.", "",
           "The naive export is the release's forward (both key frames through the image backbone, the frustum "
           "pooled on a NonZero mask of the in-grid points, DCN as ONNX DeformConv) with `torch.inverse` mapped to "
           "ONNX Runtime's contrib `Inverse`, without which it does not export at all.", ""]
    for r in report["recipes"]:
        out += [f"## {r['recipe']} ({r['cams']} cameras x 3x{r['image'][0]}x{r['image'][1]}, {r['depth_bins']} depth "
                f"bins on {r['feature'][0]}x{r['feature'][1]}, BEV {r['bev'][0]}x{r['bev'][1]}, {r['keys']} keys)",
                "", f"Passes: {', '.join(r['passes'])}.", "",
                ratio_rows_markdown(r["whole_model"], {
                    "max rel error": lambda x: f"{x['max_rel_error_vs_pytorch']:.1e}"}), ""]
    out += ["![speed-ups](bevdepth.png)", ""]
    return "\n".join(out)


def plot(report: dict, path: Path) -> None:
    speedup_plot([(f"{r['recipe']}: whole model", r["whole_model"]) for r in report["recipes"]], path,
                 baseline=NAIVE)


def main() -> None:
    run(__doc__, "bevdepth", "bevdepth_small,bevdepth_r50", DEFAULT_ROUNDS, 10, bench_recipe, to_markdown, plot)


if __name__ == "__main__":
    main()
