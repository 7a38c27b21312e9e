"""BEVFormer rewrites on ONNX Runtime (CPU): what each pass buys, in one run.

For each recipe (default: bevformer_tiny and bevformer_npu, synthetic weights,
a later frame with a previous BEV), two tables. Each variant is timed
interleaved with the naive export in one process (deploykit.bench.compare_pairwise:
two sessions at a time, as the 128x128 dense model needs GBs of arena) and
reported as the ratio of medians with a 95% bootstrap interval:

* the BEV encoder stage (TSA + SCA layers, the part the passes touch; image
  features are inputs): the naive export (dense SCA, ReduceMean, GridSample
  lowering as PyTorch exports it), each pass alone, and all three, with the
  MSDA custom op run as an ORT function and inlined;
* the whole model: naive export vs the converted one.

Every variant's output is compared with the naive PyTorch model. Writes
benchmarks/results/bevformer_rewrites.{md,json,png}.

    python benchmarks/bench_bevformer.py [--recipes bevformer_tiny] [--rounds N]
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from common import run  # benchmarks/common.py also puts the repository on sys.path

from deploykit.bench import compare_pairwise  # noqa: E402
from deploykit.compare import compare_outputs  # noqa: E402
from deploykit.engines.ort import build  # noqa: E402
from deploykit.export import export_onnx, load_model, simplify  # noqa: E402
from deploykit.models import make_sample  # noqa: E402
from deploykit.passes import apply_passes  # noqa: E402
from deploykit.passes.sca_virtual_bev import coverage  # noqa: E402
from deploykit.recipe import load_recipe  # noqa: E402
from deploykit.report import ratio_rows_markdown, speedup_plot  # noqa: E402
from deploykit.samples import torch_outputs  # noqa: E402

SAMPLE_SEED = 2001  # odd: a frame with a previous BEV, so TSA does its temporal work
DEFAULT_ROUNDS = {"bevformer_small": 40, "bevformer_tiny": 16, "bevformer_npu": 6}
STAGE_VARIANTS = [
    ("naive: dense SCA, mean, GridSample lowering", [], "function"),
    ("tsa_mean_to_conv only", ["tsa_mean_to_conv"], "function"),
    ("sca_virtual_bev only", ["sca_virtual_bev"], "function"),
    ("msda_op only (ORT function)", ["msda_op"], "function"),
    ("all three (converted)", ["tsa_mean_to_conv", "sca_virtual_bev", "msda_op"], "function"),
    ("all three, MSDA op inlined", ["tsa_mean_to_conv", "sca_virtual_bev", "msda_op"], "inline"),
]


class EncoderStage(nn.Module):
    """The BEV encoder alone: image features in, bev_embed out."""

    def __init__(self, model, num_levels: int):
        super().__init__()
        self.head = model.pts_bbox_head
        self.input_names = [f"feat{i}" for i in range(num_levels)] + ["can_bus", "shift", "prev_bev", "use_prev_bev"]
        self.output_names = ["bev_embed"]
        self.eval()

    def forward(self, *args):
        n = len(self.input_names) - 4
        can_bus, shift, prev_bev, use_prev_bev = args[n:]
        cfg = self.head.cfg
        bev_pos = self.head.positional_encoding(1, cfg.bev_h, cfg.bev_w)
        return (self.head.transformer.get_bev_features(list(args[:n]), self.head.bev_embedding.weight, bev_pos,
                                                       can_bus, prev_bev, shift, use_prev_bev),)


def exported(model, feeds, path: Path, opset: int) -> Path:
    export_onnx(model, feeds, path, opset)
    simplify(path)
    return path


def worst_error(reference: dict, path: Path, feeds: dict, custom_ops: str) -> float:
    out = build(path, custom_ops=custom_ops).run(feeds)
    return max(a.max_rel_error for a in compare_outputs(reference, out))


def bench_recipe(name: str, rounds: int, threads: int, workdir: Path) -> dict:
    recipe = load_recipe(name)
    opset = recipe.convert.opset
    original, _, _ = load_model(recipe, None)
    sample = make_sample(recipe, SAMPLE_SEED, original)
    with torch.no_grad():
        feats = original.extract_feat(torch.from_numpy(sample.feeds["img"]))
    stage_feeds = {f"feat{i}": f.numpy() for i, f in enumerate(feats)}
    stage_feeds.update({k: sample.feeds[k] for k in ("can_bus", "shift", "prev_bev", "use_prev_bev")})
    stage_ref = torch_outputs(EncoderStage(original, len(feats)), stage_feeds)
    print(f"{name}: exporting {len(STAGE_VARIANTS)} encoder-stage variants and 2 whole models", flush=True)
    stage, errors, models = {}, {}, {}
    for label, passes, mode in STAGE_VARIANTS:
        key = ",".join(passes)
        if key not in models:
            models[key] = apply_passes(original, passes).eval()
            exported(EncoderStage(models[key], len(feats)), stage_feeds, workdir / f"{name}-stage-{len(models)}.onnx",
                     opset)
        path = workdir / f"{name}-stage-{list(models).index(key) + 1}.onnx"
        stage[label] = (path, stage_feeds, mode)
        errors[label] = worst_error(stage_ref, path, stage_feeds, mode)
    converted = models[",".join(recipe.convert.passes)]
    virtual_bev = coverage(converted)
    whole_ref = torch_outputs(original, sample.feeds)
    whole = {"naive export": (exported(original, sample.feeds, workdir / f"{name}-naive.onnx", opset), sample.feeds,
                              "function"),
             "converted": (exported(converted, sample.feeds, workdir / f"{name}-converted.onnx", opset),
                           sample.feeds, "function")}
    whole_errors = {k: worst_error(whole_ref, p, f, m) for k, (p, f, m) in whole.items()}
    print(f"{name}: timing the encoder stage x {rounds * 2} rounds, whole model x {rounds} rounds", flush=True)
    del models, converted, original
    # Pairwise: at 128x128 the dense SCA alone needs GBs of ORT arena; six
    # sessions side by side do not fit in 24 GiB.
    stage_rows = compare_pairwise(stage, STAGE_VARIANTS[0][0], rounds=rounds * 2, threads=threads)
    whole_rows = compare_pairwise(whole, "naive export", rounds=rounds, threads=threads, warmup=1)
    for row in stage_rows:
        row["max_rel_error_vs_pytorch"] = errors[row["variant"]]
    for row in whole_rows:
        row["max_rel_error_vs_pytorch"] = whole_errors[row["variant"]]
    cfg = recipe.model
    return {"recipe": name, "bev": [cfg.bev_h, cfg.bev_w], "image": list(cfg.image_size),
            "feature_shapes": [list(f.shape) for f in feats], "virtual_bev": virtual_bev,
            "encoder_stage": stage_rows, "whole_model": whole_rows}


def to_markdown(report: dict) -> str:
    m = report["machine"]
    out = [
        "# BEVFormer rewrites on ONNX Runtime (CPU)", "",
        f"Measured {report['date']} by `benchmarks/bench_bevformer.py` on {m['cpu']}, {m['cores']} cores, "
        f"{m['memory_gib']} GiB, {m['os']}; ONNX Runtime {report['versions']['onnxruntime']}, torch "
        f"{report['versions']['torch']}, {report['threads']} intra-op threads. Variants of one table ran interleaved "
        "in one process, each variant against the first row (pairwise); ratio = median latency / median of the "
        "first row in that pairing, with a 95% bootstrap interval. "
        "Synthetic weights; input: a frame with a previous BEV and ego motion. The error column is the worst "
        "|ORT - PyTorch| / max|PyTorch| over outputs, against the naive PyTorch model.", "",
    ]
    for r in report["recipes"]:
        cov = r["virtual_bev"]
        out += [f"## {r['recipe']} (BEV {r['bev'][0]}x{r['bev'][1]}, images 6x3x{r['image'][0]}x{r['image'][1]}, "
                f"features {r['feature_shapes']})", "",
                f"Virtual BEV: {cov['slots_per_camera']} slots per camera, most used {max(cov['slots_used'])}; "
                f"{cov['hits_kept']}/{cov['camera_pillar_hits']} camera-pillar hits kept; "
                f"{cov['pillars_seen_by_no_camera']} pillars seen by no camera.", ""]
        for key, title in (("encoder_stage", "BEV encoder stage (TSA + SCA layers)"),
                           ("whole_model", "Whole model")):
            table = ratio_rows_markdown(r[key], {
                # ratio = median / baseline median of the same pairing, so the baseline is recoverable.
                "naive ms, same run": lambda x: f"{x.get('baseline_median_ms', x['median_ms'] / x['ratio_to_baseline']):.2f}",
                "max rel error": lambda x: f"{x['max_rel_error_vs_pytorch']:.1e}"})
            out += [f"### {title}", "", table, ""]
    out += ["![speed-ups](bevformer_rewrites.png)", ""]
    return "\n".join(out)


def plot(report: dict, path: Path) -> None:
    speedup_plot([(f"{r['recipe']}: {key.replace('_', ' ')}", r[key]) for r in report["recipes"]
                  for key in ("encoder_stage", "whole_model")], path, baseline="naive export")


def main() -> None:
    run(__doc__, "bevformer_rewrites", "bevformer_tiny,bevformer_npu", DEFAULT_ROUNDS, 10, bench_recipe, to_markdown,
        plot)


if __name__ == "__main__":
    main()
