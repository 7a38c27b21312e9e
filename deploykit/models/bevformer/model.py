"""BEVFormer (camera stream) as released by fundamentalvision/BEVFormer.

Module names follow the release (``img_backbone``, ``img_neck``,
``pts_bbox_head.transformer.encoder.layers.N.attentions.0.sampling_offsets``...)
so its checkpoints load 1:1, and the math follows its forward_test path.

Deployment shape of the model:
  inputs   img (1, N, 3, H, W) normalised; can_bus (1, 18) relative to the
           previous frame; shift (1, 2) and prev_bev (1, bev_h*bev_w, C) already
           aligned to the ego motion on the host (deploykit.temporal); use_prev_bev
           (1,) 0 on a scene's first frame, else 1
  outputs  bev_embed (next frame's prev_bev), cls_scores (1, num_query, classes)
           logits and bbox_preds (1, num_query, 10) from the last decoder layer,
           centres in metres (BEVFormerHead's denormalisation).
The camera rig is fixed at build time, so BEVFormer's per-frame point_sampling
(lidar2img projection and bev_mask) becomes constants of the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from ..fpn import FPN, FPNConfig
from ..resnet import ResNet, ResNetConfig
from .transformer import PerceptionTransformer, inverse_sigmoid


@dataclass(frozen=True)
class VirtualBEVConfig:
    """Static sparse layout for SCA (see deploykit.camera.virtual_bev)."""

    virtual_bev_h: int = 64
    virtual_bev_w: int = 80
    max_numcam_overlap: int = 2


@dataclass(frozen=True)
class BEVFormerConfig:
    arch: ClassVar[str] = "bevformer"
    rig: str = "nuscenes_surround"
    # Network input (H, W) after resize and padding; BEVFormer normalises projected
    # points by this padded shape (PadMultiViewImage updates img_shape).
    image_size: tuple[int, int] = (480, 800)
    # Resize factor from the rig's raw images to the network input (lidar2img is scaled by it).
    image_scale: float = 0.5
    # (top, left) rows and columns cut from the resized images before padding (the
    # camera intrinsics shift with them): e.g. sky rows, to reach a network input the
    # resize alone cannot (900x1600 x 0.6 = 540x960, less 28 rows = 512x960).
    image_crop: tuple[int, int] = (0, 0)
    img_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    img_std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    backbone: ResNetConfig = ResNetConfig()
    neck: FPNConfig = FPNConfig()
    embed_dims: int = 256
    num_heads: int = 8
    ffn_dims: int = 512
    bev_h: int = 50
    bev_w: int = 50
    pc_range: tuple[float, float, float, float, float, float] = (-51.2, -51.2, -5.0, 51.2, 51.2, 3.0)
    num_points_in_pillar: int = 4
    encoder_layers: int = 3
    decoder_layers: int = 6
    tsa_points: int = 4
    sca_points: int = 8
    decoder_points: int = 4
    num_query: int = 900
    num_classes: int = 10
    # Label k is class_names[k]: BEVFormer's nuScenes config order.
    class_names: tuple[str, ...] = ("car", "truck", "construction_vehicle", "bus", "trailer", "barrier",
                                    "motorcycle", "bicycle", "pedestrian", "traffic_cone")
    code_size: int = 10
    # PerceptionTransformer always allocates 4 level embeddings, used or not.
    num_feature_levels: int = 4
    num_cams: int = 6
    rotate_center: tuple[float, float] = (100.0, 100.0)
    virtual_bev: VirtualBEVConfig = field(default_factory=VirtualBEVConfig)

    def __post_init__(self):
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"class_names names {len(self.class_names)} classes, num_classes is {self.num_classes}")
        if self.embed_dims % (2 * self.num_heads):
            raise ValueError(f"embed_dims {self.embed_dims} must be divisible by 2*num_heads")
        if self.sca_points % self.num_points_in_pillar:
            raise ValueError(f"sca_points {self.sca_points} must be a multiple of num_points_in_pillar "
                             f"{self.num_points_in_pillar} (each Z anchor owns the same number of samples)")
        if self.num_levels > self.num_feature_levels:
            raise ValueError(f"neck.num_outs {self.num_levels} exceeds num_feature_levels {self.num_feature_levels}")
        if any(s % 32 for s in self.image_size):
            raise ValueError(f"image_size {self.image_size} must be multiples of 32 (the padded network input)")

    @property
    def num_levels(self) -> int:
        return self.neck.num_outs

    @property
    def num_bev_queries(self) -> int:
        return self.bev_h * self.bev_w

    @property
    def grid_length(self) -> tuple[float, float]:
        r = self.pc_range
        return ((r[4] - r[1]) / self.bev_h, (r[3] - r[0]) / self.bev_w)


class LearnedPositionalEncoding(nn.Module):
    def __init__(self, num_feats: int, row_num_embed: int, col_num_embed: int):
        super().__init__()
        self.row_embed = nn.Embedding(row_num_embed, num_feats)
        self.col_embed = nn.Embedding(col_num_embed, num_feats)

    def forward(self, bs: int, h: int, w: int) -> torch.Tensor:
        x = self.col_embed.weight[:w]
        y = self.row_embed.weight[:h]
        pos = torch.cat((x[None].expand(h, w, -1), y[:, None].expand(h, w, -1)), -1)
        return pos.permute(2, 0, 1)[None].expand(bs, -1, -1, -1)


def _cls_branch(c: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(c, c), nn.LayerNorm(c), nn.ReLU(inplace=True), nn.Linear(c, c), nn.LayerNorm(c),
                         nn.ReLU(inplace=True), nn.Linear(c, out))


def _reg_branch(c: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(c, c), nn.ReLU(), nn.Linear(c, c), nn.ReLU(), nn.Linear(c, out))


class DetrPredictions:
    """BEVFormerHead's detection from a BEV embedding: decoder, then the last layer's
    branches, centres denormalised to metres. Needs ``cfg``, ``transformer.decode``,
    ``query_embedding``, ``cls_branches`` and ``reg_branches``."""

    def _build_branches(self, cfg: BEVFormerConfig) -> None:
        # with_box_refine: one branch per decoder layer.
        self.cls_branches = nn.ModuleList(_cls_branch(cfg.embed_dims, cfg.num_classes)
                                          for _ in range(cfg.decoder_layers))
        self.reg_branches = nn.ModuleList(_reg_branch(cfg.embed_dims, cfg.code_size)
                                          for _ in range(cfg.decoder_layers))

    def _build_queries(self, cfg: BEVFormerConfig) -> None:
        self.query_embedding = nn.Embedding(cfg.num_query, cfg.embed_dims * 2)

    def _build_code_weights(self, cfg: BEVFormerConfig) -> None:
        # A training loss weight, but a Parameter in the release, hence in its state dict.
        self.code_weights = nn.Parameter(torch.tensor([1.0] * 8 + [0.2] * 2)[: cfg.code_size], requires_grad=False)

    def predict(self, bev_embed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """bev_embed (bs, H*W, C) -> cls_scores (bs, num_query, classes), bbox_preds (bs, num_query, 10)."""
        cfg = self.cfg
        hs, reference = self.transformer.decode(bev_embed, self.query_embedding.weight, self.reg_branches,
                                                (cfg.bev_h, cfg.bev_w))
        hs = hs.permute(1, 0, 2)
        last = len(self.cls_branches) - 1
        cls_scores = self.cls_branches[last](hs)
        tmp = self.reg_branches[last](hs)
        reference = inverse_sigmoid(reference)
        xy = (tmp[..., 0:2] + reference[..., 0:2]).sigmoid()
        z = (tmp[..., 4:5] + reference[..., 2:3]).sigmoid()
        r = cfg.pc_range
        lo = torch.tensor([r[0], r[1]])
        span = torch.tensor([r[3] - r[0], r[4] - r[1]])
        bbox = torch.cat([xy * span + lo, tmp[..., 2:4], z * (r[5] - r[2]) + r[2], tmp[..., 5:]], -1)
        return cls_scores, bbox


class BEVFormerHead(DetrPredictions, nn.Module):
    """``detection=False`` keeps the BEV encoder only: BEVFusion's camera stream, whose
    decoder runs on the fused BEV instead (deploykit.models.bevfusion)."""

    def __init__(self, cfg: BEVFormerConfig, reference_points_cam: torch.Tensor, bev_mask: torch.Tensor,
                 detection: bool = True):
        super().__init__()
        self.cfg = cfg
        c = cfg.embed_dims
        # Registration order as the release's (the stand-in weights are drawn in module order).
        self.transformer = PerceptionTransformer(cfg, reference_points_cam, bev_mask, decoder=detection)
        if detection:
            self._build_branches(cfg)
        self.bev_embedding = nn.Embedding(cfg.num_bev_queries, c)
        if detection:
            self._build_queries(cfg)
        self.positional_encoding = LearnedPositionalEncoding(c // 2, cfg.bev_h, cfg.bev_w)
        if detection:
            self._build_code_weights(cfg)

    def bev_features(self, mlvl_feats, can_bus, prev_bev, shift, use_prev_bev) -> torch.Tensor:
        cfg = self.cfg
        bs = mlvl_feats[0].shape[0]
        bev_pos = self.positional_encoding(bs, cfg.bev_h, cfg.bev_w)
        return self.transformer.get_bev_features(mlvl_feats, self.bev_embedding.weight, bev_pos, can_bus,
                                                 prev_bev, shift, use_prev_bev)

    def forward(self, mlvl_feats, can_bus, prev_bev, shift, use_prev_bev):
        """(bev_embed, cls_scores, bbox_preds); bev_embed alone without the decoder."""
        bev_embed = self.bev_features(mlvl_feats, can_bus, prev_bev, shift, use_prev_bev)
        if not hasattr(self, "cls_branches"):
            return bev_embed
        return (bev_embed, *self.predict(bev_embed))


def rig_projection(cfg: BEVFormerConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """BEVFormer's point_sampling for the recipe's rig: (N, 1, Q, D, 2) and (N, 1, Q, D)."""
    from ...camera.rig import load_rig
    from ...camera.virtual_bev import bev_visibility, camera_coverage

    rig = load_rig(cfg.rig)
    if len(rig.cameras) != cfg.num_cams:
        from ...errors import RecipeError

        raise RecipeError(f"rig {rig.name} has {len(rig.cameras)} cameras, the recipe's model has num_cams="
                          f"{cfg.num_cams}")
    check_image_size(rig, cfg)
    ref_cam, mask = bev_visibility(rig, bev_h=cfg.bev_h, bev_w=cfg.bev_w, pc_range=cfg.pc_range,
                                   num_points_in_pillar=cfg.num_points_in_pillar, scale=cfg.image_scale,
                                   img_shape=cfg.image_size, crop=cfg.image_crop)
    camera_coverage(rig, mask)  # refuses a camera that sees none of the grid
    return torch.from_numpy(np.ascontiguousarray(ref_cam))[:, None], torch.from_numpy(mask)[:, None]


def check_image_size(rig, cfg: BEVFormerConfig) -> None:
    """The rig's raw images must become the network's input through the recipe's resize and crop."""
    from ...data.images import check_network_size
    from ...errors import InputError, RigError

    try:
        check_network_size(rig.image_size, cfg)
    except InputError as exc:
        raise RigError(f"rig {rig.name}: {exc}") from None


class BEVFormer(nn.Module):
    input_names = ["img", "can_bus", "shift", "prev_bev", "use_prev_bev"]
    output_names = ["bev_embed", "cls_scores", "bbox_preds"]

    def __init__(self, cfg: BEVFormerConfig, detection: bool = True):
        super().__init__()
        self.config = cfg
        self.img_backbone = ResNet(cfg.backbone)
        self.img_neck = FPN(cfg.backbone.out_channels, cfg.neck)
        ref_cam, mask = rig_projection(cfg)
        self.pts_bbox_head = BEVFormerHead(cfg, ref_cam, mask, detection)

    def rig_coverage(self) -> dict[str, float]:
        """Fraction of the BEV grid each camera of the rig sees."""
        from ...camera.rig import load_rig
        from ...camera.virtual_bev import camera_coverage

        head = self.pts_bbox_head
        return camera_coverage(load_rig(head.cfg.rig), head.transformer.encoder.bev_mask[:, 0].numpy())

    def input_shapes(self) -> dict[str, tuple[int, ...]]:
        c = self.config
        return {"img": (1, c.num_cams, 3, *c.image_size), "can_bus": (1, 18), "shift": (1, 2),
                "prev_bev": (1, c.num_bev_queries, c.embed_dims), "use_prev_bev": (1,)}

    def extract_feat(self, img: torch.Tensor) -> list[torch.Tensor]:
        bs, n = img.shape[:2]
        feats = self.img_neck(self.img_backbone(img.flatten(0, 1)))
        return [f.view(bs, n, *f.shape[1:]) for f in feats]

    def bev_features(self, img, can_bus, shift, prev_bev, use_prev_bev) -> torch.Tensor:
        """The camera stream alone: the next frame's prev_bev, (bs, bev_h * bev_w, embed_dims)."""
        return self.pts_bbox_head.bev_features(self.extract_feat(img), can_bus, prev_bev, shift, use_prev_bev)

    def forward(self, img, can_bus, shift, prev_bev, use_prev_bev):
        return self.pts_bbox_head(self.extract_feat(img), can_bus, prev_bev, shift, use_prev_bev)
