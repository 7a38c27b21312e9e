"""Train the centerpoint_pillar_synth checkpoint on synthetic LiDAR scenes.

This is the script that made checkpoints/centerpoint_pillar_synth.pth: the
small CenterPoint-PointPillars trained from scratch on deploykit's ray-cast
scenes (deploykit.training.centerpoint), then scored in nuScenes-style mAP on
held-out scenes. It writes the checkpoint in mmdet3d's release layout
({"meta", "state_dict"}), so deploykit loads it like any downloaded one, plus
a training report next to it (.json, .md). On two CPU cores it takes about ten
minutes.

    python tools/train_synthetic_centerpoint.py [--steps N] [--out checkpoints/centerpoint_pillar_synth.pth]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deploykit.artifacts import atomic_file, write_json  # noqa: E402
from deploykit.detection.evaluate import EVAL_SEED, evaluate, labelled_scenes  # noqa: E402
from deploykit.models import ARCHITECTURES, build_model  # noqa: E402
from deploykit.recipe import REPO_ROOT, load_recipe  # noqa: E402
from deploykit.report import markdown_table  # noqa: E402
from deploykit.samples import torch_outputs  # noqa: E402
from deploykit.training.centerpoint import TrainConfig, train  # noqa: E402

RECIPE = "centerpoint_pillar_synth"
EVAL_SCENES = 100


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    parser.add_argument("--scenes", type=int, default=TrainConfig.scenes)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "checkpoints" / f"{RECIPE}.pth")
    args = parser.parse_args()

    recipe = load_recipe(RECIPE)
    model = build_model(recipe)
    # Default PyTorch init plus CenterPoint's heatmap prior bias, as mmdet3d starts.
    ARCHITECTURES[recipe.arch].synthetic_init(model, recipe.model, torch.Generator().manual_seed(0))
    tc = TrainConfig(steps=args.steps, scenes=args.scenes)
    start = time.perf_counter()
    history = train(model, recipe.model, tc)
    train_s = time.perf_counter() - start

    scenes = labelled_scenes(recipe, model, range(EVAL_SEED, EVAL_SEED + EVAL_SCENES))
    result = evaluate(recipe, scenes, lambda feeds: torch_outputs(model, feeds))
    meta = {"recipe": RECIPE, "trained_by": "tools/train_synthetic_centerpoint.py",
            "date": datetime.date.today().isoformat(), "train": dataclasses.asdict(tc),
            "train_seconds": round(train_s, 1), "machine": f"{platform.processor() or platform.machine()}, "
            f"{torch.get_num_threads()} threads", "eval": {"scenes": EVAL_SCENES, "first_seed": EVAL_SEED,
                                                         "mAP": result["mAP"]}}
    with atomic_file(args.out) as tmp:
        torch.save({"meta": meta, "state_dict": model.state_dict()}, tmp)
    report = {"meta": meta, "history": history, "eval": result}
    write_json(args.out.with_suffix(".json"), report)
    args.out.with_suffix(".md").write_text(to_markdown(report))
    print(f"mAP {result['mAP']:.3f} after {train_s / 60:.1f} min; wrote {args.out}")


def to_markdown(report: dict) -> str:
    meta, result = report["meta"], report["eval"]
    thresholds = list(next(iter(result["per_class"].values()))["by_threshold"])
    rows = [[name, result["num_gt"][name], *(f"{v['by_threshold'][t]:.3f}" for t in thresholds), f"{v['AP']:.3f}"]
            for name, v in result["per_class"].items()]
    t = meta["train"]
    return "\n".join([
        f"# {meta['recipe']}: trained on synthetic LiDAR", "",
        f"Made by `{meta['trained_by']}` on {meta['date']} ({meta['machine']}): {t['steps']} steps of batch "
        f"{t['batch_size']} from {t['scenes']} ray-cast scenes with mmdet3d's nuScenes augmentation, AdamW "
        f"{t['lr']:g} one-cycle, {meta['train_seconds'] / 60:.1f} min.", "",
        f"nuScenes-style AP (centre distance) on {meta['eval']['scenes']} held-out scenes (seeds from "
        f"{meta['eval']['first_seed']}), after CenterPoint's circle NMS; mAP **{result['mAP']:.3f}**.", "",
        markdown_table(["class", "GT boxes", *thresholds, "AP"], rows), "",
        "Loss (mean over the logged window):", "",
        markdown_table(["step", "lr", "total"], [[h["step"], f"{h['lr']:.2e}", f"{h['total']:.3f}"]
                                                 for h in report["history"][4::5]]), ""])


if __name__ == "__main__":
    main()
