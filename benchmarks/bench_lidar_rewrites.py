"""ONNX Runtime CPU latency of the LiDAR rewrites, measured side by side.

For each recipe, from one checkpoint:
  * the whole model exported without rewrites vs with each pass added in turn;
  * the pillar stage alone (PFN + scatter), where the rewrites act, the same way;
  * how ONNX Runtime runs the PillarScatter node: model-local function,
    inlined standard ops, or onnxruntime-extensions' Python kernel.
All variants of one table are timed interleaved in one process (see
deploykit.bench.interleaved) and reported as ratios of medians with 95%
bootstrap intervals. Writes benchmarks/results/lidar_rewrites.{md,json,png}.

    python benchmarks/bench_lidar_rewrites.py [--recipes a,b] [--rounds N]
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from common import run  # benchmarks/common.py also puts the repository on sys.path

from deploykit.compare import compare_outputs  # noqa: E402
from deploykit.bench import compare_engines  # noqa: E402
from deploykit.engines.ort import build  # noqa: E402
from deploykit.export import export_onnx, load_model, simplify  # noqa: E402
from deploykit.models import pillar_format  # noqa: E402
from deploykit.models.centerpoint_pillar import encoder_input  # noqa: E402
from deploykit.samples import torch_outputs  # noqa: E402
from deploykit.passes import apply_passes  # noqa: E402
from deploykit.preprocess.pillar_inputs import sample_inputs  # noqa: E402
from deploykit.recipe import load_recipe  # noqa: E402
from deploykit.report import ratio_rows_markdown, speedup_plot  # noqa: E402

DEFAULT_ROUNDS = {"centerpoint_pillar_small": 60, "centerpoint_pillar_nus": 12}
SAMPLE_SEED = 2000


class PillarStage(nn.Module):
    """Only the part the rewrites touch: pillar encoder + scatter."""

    def __init__(self, model):
        super().__init__()
        self.pts_voxel_encoder, self.pts_middle_encoder = model.pts_voxel_encoder, model.pts_middle_encoder
        self.pts_pillar_decoration = model.pts_pillar_decoration  # after decorate_in_graph, the stage's too
        self.input_layout, self.input_names, self.output_names = model.input_layout, model.input_names, ["canvas"]
        self.eval()

    def forward(self, pillars, coords, num_points=None):
        feats = self.pts_voxel_encoder(encoder_input(self, pillars, coords, num_points))
        return (self.pts_middle_encoder(feats, coords),)


def export(model, recipe, workdir: Path, name: str):
    sample = sample_inputs(recipe.model, SAMPLE_SEED, *pillar_format(model))
    path = workdir / f"{name}.onnx"
    export_onnx(model, sample.feeds, path, recipe.convert.opset)
    simplify(path)
    return path, sample


def bench_recipe(name: str, rounds: int, threads: int, workdir: Path) -> dict:
    recipe = load_recipe(name)
    original, _, _ = load_model(recipe, None)
    passes = list(recipe.convert.passes)
    whole, stage = {}, {}
    for k in range(len(passes) + 1):
        label = "no rewrites" if k == 0 else f"+ {passes[k - 1]}"
        model = apply_passes(original, passes[:k]).eval()
        path, sample = export(model, recipe, workdir, f"{name}-{k}")
        whole[label] = (path, sample.feeds, "function")
        path, _ = export(PillarStage(model), recipe, workdir, f"{name}-{k}-stage")
        stage[label] = (path, sample.feeds, "function")
        if k == len(passes):
            ref = torch_outputs(original, {"pillars": sample.pillars_pnc, "coords": sample.coords})
            out = build(whole[label][0]).run(sample.feeds)
            worst = max(a.max_rel_error for a in compare_outputs(ref, out))
    converted = whole[f"+ {passes[-1]}"]
    scatter = {f"PillarScatter as {mode}": (converted[0], converted[1], mode) for mode in ("function", "inline", "ortx")}
    print(f"{name}: timing {len(whole)} whole-model variants x {rounds} rounds", flush=True)
    return {
        "recipe": name,
        "pillars_in_sample": int(sample_inputs(recipe.model, SAMPLE_SEED, "PNC").num_pillars),
        "input_shape": list(converted[1]["pillars"].shape),
        "converted_vs_original_max_rel_error": worst,
        "whole_model": compare_engines(whole, "no rewrites", rounds=rounds, threads=threads),
        "pillar_stage": compare_engines(stage, "no rewrites", rounds=rounds * 3, threads=threads),
        "scatter_impl": compare_engines(scatter, "PillarScatter as function", rounds=rounds, threads=threads),
    }


def to_markdown(report: dict) -> str:
    m = report["machine"]
    out = [
        "# LiDAR rewrites on ONNX Runtime (CPU)",
        "",
        f"Measured {report['date']} by `benchmarks/bench_lidar_rewrites.py` on {m['cpu']}, "
        f"{m['cores']} cores, {m['memory_gib']} GiB, {m['os']}; ONNX Runtime {report['versions']['onnxruntime']}, "
        f"torch {report['versions']['torch']}, {report['threads']} intra-op threads, sequential execution. "
        "Variants of one table ran interleaved in one process; ratio = median latency / median of the "
        "first row, with a 95% bootstrap interval. Inputs: a synthetic 32-beam sweep voxelized on the host.",
        "",
    ]
    for r in report["recipes"]:
        out += [f"## {r['recipe']} (pillars input {r['input_shape']}, {r['pillars_in_sample']} non-empty)", "",
                f"Converted model vs original PyTorch: max relative error {r['converted_vs_original_max_rel_error']:.1e}.", ""]
        for key, title in (("whole_model", "Whole model, passes added in turn"),
                           ("pillar_stage", "Pillar stage only (PFN + scatter)"),
                           ("scatter_impl", "How ORT runs the PillarScatter node (whole converted model)")):
            out += [f"### {title}", "", ratio_rows_markdown(r[key]), ""]
    out += ["![latency ratios](lidar_rewrites.png)", ""]
    return "\n".join(out)


def plot(report: dict, path: Path) -> None:
    speedup_plot([(f"{r['recipe']}: {key.replace('_', ' ')}", r[key]) for r in report["recipes"]
                  for key in ("whole_model", "pillar_stage")], path, baseline="no rewrites")


def main() -> None:
    run(__doc__, "lidar_rewrites", "centerpoint_pillar_small,centerpoint_pillar_nus", DEFAULT_ROUNDS, 20, bench_recipe, to_markdown, plot)


if __name__ == "__main__":
    main()
