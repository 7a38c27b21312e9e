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

from ..detection import decode, evaluate, fused_evaluate
from . import bevdepth, bevformer, bevfusion, centerpoint_pillar


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
    # (recipe, labelled scenes, predict: feeds -> outputs) -> metrics (mAP, NDS, ... and for a
    # fused model occupancy mIoU): how labelled_scenes are scored.
    score: Callable[[Any, list, Callable], dict] = evaluate.evaluate
    # (module-path prefix, stage label) for the per-stage time breakdown (deploykit.profile)
    stages: tuple[tuple[str, str], ...] = ()
    # (state dict, meta) -> the object a release file holds, for synthetic checkpoints in the
    # release's own layout (default: mmcv's {"meta", "state_dict"})
    release_layout: Callable[[dict, dict], dict] | None = None
    # The frame the boxes come out in: "lidar" (mmdet3d models, BEVFormer) or "ego" (BEVDepth).
    box_frame: str = "lidar"


def pillar_format(model):
    """The PillarFormat (layout, scale, decorate_in_graph) of a model's pillar input: how the
    host packs the pillars it feeds (the rewrite passes decide it; an unbuilt model takes
    mmdet3d's raw PNC, decorated)."""
    from ..preprocess.pillar_inputs import PillarFormat

    if model is None:
        return PillarFormat()
    from ..passes.decorate_in_graph import decorates_in_graph
    from ..passes.normalise_points import input_scale

    layout = getattr(model, "input_layout", "PNC")
    if decorates_in_graph(model):  # the graph divides by the scale itself
        return PillarFormat(layout, None, True)
    return PillarFormat(layout, input_scale(model))


def _pillar_sample(cfg, seed, model):
    from ..preprocess.pillar_inputs import sample_inputs
    from ..samples import Sample

    s = sample_inputs(cfg, seed, *pillar_format(model))
    return Sample(s.feeds, {"pillars": s.pillars_pnc, "coords": s.coords}, {"seed": seed, "pillars": s.num_pillars})


def _camera_sample(cfg, seed, model):
    from ..preprocess.camera_inputs import sample_inputs

    return sample_inputs(cfg, seed)


def _fused_sample(cfg, seed, model):
    """Both sensors of one frame: the camera stream's feeds and a LiDAR sweep's pillars."""
    from ..preprocess.camera_inputs import sample_inputs as camera_inputs
    from ..preprocess.pillar_inputs import sample_inputs as pillar_inputs
    from ..samples import Sample

    camera = camera_inputs(cfg.camera, seed)
    lidar = pillar_inputs(cfg.lidar, seed, *pillar_format(model))
    return Sample({**camera.feeds, **lidar.feeds},
                  {**camera.reference, "pillars": lidar.pillars_pnc, "coords": lidar.coords},
                  {**camera.info, "pillars": lidar.num_pillars})


def _fused_detections(cfg, outputs):
    if cfg.det_head == "bevformer":
        return decode.decode_bevformer(cfg.detection, outputs)
    return evaluate.centerpoint_detections(cfg.detection, outputs)


def _fused_boxes(cfg, outputs):
    if cfg.det_head == "bevformer":
        return decode.decode_bevformer(cfg.detection, outputs)
    return decode.decode_centerpoint(cfg.detection, outputs)


def _lss_sample(cfg, seed, model):
    from ..preprocess.lss_inputs import sample_inputs

    return sample_inputs(cfg, seed, model)


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
    "bevfusion": Architecture(
        config=bevfusion.BEVFusionConfig,
        build=bevfusion.BEVFusion,
        make_sample=_fused_sample,
        synthetic_init=bevfusion.synthetic_init,
        decode=_fused_boxes,
        postprocess=_fused_detections,
        labelled_scenes=fused_evaluate.labelled_scenes,
        score=fused_evaluate.evaluate,
        stages=(("img_backbone", "camera stream"), ("img_neck", "camera stream"),
                ("pts_bbox_head", "camera stream"), ("pts_voxel_encoder", "LiDAR stream"),
                ("pts_middle_encoder", "LiDAR stream"), ("pts_backbone", "LiDAR stream"),
                ("pts_neck", "LiDAR stream"), ("fusion_module", "fusion"), ("det_head", "detection head"),
                ("occ_head", "occupancy head")),
    ),
    "bevdepth": Architecture(
        config=bevdepth.BEVDepthConfig,
        build=bevdepth.BEVDepth,
        make_sample=_lss_sample,
        synthetic_init=bevdepth.synthetic_init,
        decode=decode.decode_centerpoint,
        postprocess=evaluate.centerpoint_detections,
        stages=(("backbone/img_backbone", "image backbone"), ("backbone/img_neck", "image neck"),
                ("backbone/depth_net", "depth net"), ("backbone", "depth net"), ("pool_key", "view transform"),
                ("prev_cells", "view transform"), ("pool_prev", "view transform"), ("head/trunk", "BEV backbone"),
                ("head/neck", "BEV neck"), ("head", "heads")),
        release_layout=bevdepth.lightning_checkpoint,
        box_frame="ego",
    ),
}


def camera_config(cfg):
    """The camera stream's config of a model config (a BEVFormerConfig, or BEVDepth's own),
    or None (a LiDAR-only model): its rig, image size and normalisation."""
    if isinstance(cfg, (bevformer.BEVFormerConfig, bevdepth.BEVDepthConfig)):
        return cfg
    return getattr(cfg, "camera", None)


def lidar_config(cfg):
    """The LiDAR stream's config (voxelization, pillar encoder, points) of a model config, or None."""
    if isinstance(cfg, centerpoint_pillar.PillarStreamConfig):
        return cfg
    return getattr(cfg, "lidar", None)


def build_model(recipe) -> Any:
    return ARCHITECTURES[recipe.arch].build(recipe.model).eval()


def make_sample(recipe, seed: int, model=None):
    return ARCHITECTURES[recipe.arch].make_sample(recipe.model, seed, model)
