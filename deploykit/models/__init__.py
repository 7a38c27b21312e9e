"""The architectures deploykit can build, in one explicit table.

A recipe's ``[model] arch = "..."`` picks an entry here; the entry says which
config dataclass validates the rest of the ``[model]`` table, which function
builds the PyTorch module, how to make a sample of its inputs and how to give
it realistic stand-in weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..detection import decode, evaluate
from . import bevformer, centerpoint_pillar


@dataclass(frozen=True)
class Architecture:
    config: type
    build: Callable[[Any], Any]
    # (config, seed, model) -> deploykit.samples.Sample
    make_sample: Callable[[Any, int, Any], Any]
    # (model, config, generator) -> None: architecture-specific stand-in weights
    synthetic_init: Callable[[Any, Any, torch.Generator], None]
    # (config, outputs) -> deploykit.detection.decode.Boxes, the network's boxes before any NMS
    decode: Callable[[Any, dict], Any]
    # (config, outputs) -> Boxes as the release reports them (CenterPoint: circle NMS per task;
    # BEVFormer: NMS-free top-k): what `deploykit detect` writes and the metrics score
    postprocess: Callable[[Any, dict], Any]
    # (recipe, model, seeds) -> [(Sample, ground-truth Boxes, points per box)], where the
    # synthetic data has ground truth (deploykit.detection.evaluate); None where not.
    labelled_scenes: Callable[[Any, Any, Any], list] | None = None
    # (module-path prefix, stage label) for the per-stage time breakdown (deploykit.profile)
    stages: tuple[tuple[str, str], ...] = ()


def _pillar_sample(cfg, seed, model):
    from ..preprocess.pillar_inputs import sample_inputs
    from ..samples import Sample

    s = sample_inputs(cfg, seed, getattr(model, "input_layout", "PNC"))
    return Sample(s.feeds, {"pillars": s.pillars_pnc, "coords": s.coords}, {"seed": seed, "pillars": s.num_pillars})


def _camera_sample(cfg, seed, model):
    from ..preprocess.camera_inputs import sample_inputs

    return sample_inputs(cfg, seed)


def _centerpoint_init(model, cfg, gen):
    for task in model.pts_bbox_head.task_heads:
        task.heatmap[-1].bias.data.fill_(cfg.head.init_bias)


ARCHITECTURES: dict[str, Architecture] = {
    "centerpoint_pillar": Architecture(
        config=centerpoint_pillar.CenterPointPillarConfig,
        build=centerpoint_pillar.CenterPointPillar,
        make_sample=_pillar_sample,
        synthetic_init=_centerpoint_init,
        decode=decode.decode_centerpoint,
        postprocess=evaluate.centerpoint_detections,
        labelled_scenes=evaluate.labelled_scenes,
        stages=(("pts_voxel_encoder", "pillar encoder"), ("pts_middle_encoder", "pillar scatter"),
                ("pts_backbone", "backbone"), ("pts_neck", "neck"), ("pts_bbox_head", "heads")),
    ),
    "bevformer": Architecture(
        config=bevformer.BEVFormerConfig,
        build=bevformer.BEVFormer,
        make_sample=_camera_sample,
        synthetic_init=bevformer.synthetic.synthetic_init,
        decode=decode.decode_bevformer,
        postprocess=decode.decode_bevformer,
        stages=(("img_backbone", "image backbone"), ("img_neck", "image neck"),
                ("pts_bbox_head/encoder", "BEV encoder"), ("pts_bbox_head/decoder", "decoder"),
                ("pts_bbox_head", "embeddings and heads")),
    ),
}


def build_model(recipe) -> Any:
    return ARCHITECTURES[recipe.arch].build(recipe.model).eval()


def make_sample(recipe, seed: int, model=None):
    return ARCHITECTURES[recipe.arch].make_sample(recipe.model, seed, model)
