"""BEVFusion: a BEVFormer camera stream and a PointPillars LiDAR stream on one BEV grid,
fused by convolutions and a squeeze-and-excitation block, with a detection head and a
FlashOcc occupancy head sharing the fused BEV (Horizon's J6 reference, sections 4.1-4.5).

Both streams are deploykit's own modules, built under their release names in one flat
state dict, so the fused checkpoint layout is the two public layouts side by side:

    img_backbone.*, img_neck.*, pts_bbox_head.*     camera stream, as BEVFormer's release
                                                     (its BEV encoder only: no decoder)
    pts_voxel_encoder.*, pts_backbone.*, pts_neck.* LiDAR stream, as mmdet3d's CenterPoint
                                                     (no head)
    fusion_module.*                                  BevFuseModule (HAT's key names)
    det_head.*                                       BEVFormer's detection decoder
                                                     (transformer.decoder, cls/reg branches,
                                                     query_embedding) or CenterPoint's CenterHead
    occ_head.*                                       FlashOcc's BEVOCCHead2D (final_conv, predicter)

Deployment shape:
  inputs   the camera stream's (img, can_bus, shift, prev_bev, use_prev_bev) and the
           LiDAR stream's (pillars, coords)
  outputs  bev_embed (the camera BEV: the next frame's prev_bev), the detection head's
           outputs, and occupancy logits (1, Dx, Dy, Dz, classes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .bevformer.model import BEVFormer, BEVFormerConfig, BEVFormerHead, DetrPredictions, rig_projection
from .bevformer.transformer import DecoderTransformer
from .centerpoint_pillar import (CenterHead, CenterPointPillar, HeadConfig, PillarStreamConfig, build_pillar_stream,
                                pillar_input_names)
from .fpn import FPN
from .layers import Concat
from .resnet import ResNet

DET_HEADS = ("bevformer", "centerpoint")
# Occ3D-nuScenes' classes, label k = OCC3D_CLASSES[k]; "free" is last and is not scored.
OCC3D_CLASSES = ("others", "barrier", "bicycle", "bus", "car", "construction_vehicle", "motorcycle", "pedestrian",
                 "traffic_cone", "trailer", "truck", "driveable_surface", "other_flat", "sidewalk", "terrain",
                 "manmade", "vegetation", "free")


@dataclass(frozen=True)
class FuseConfig:
    # fuse_c: channels after the 1x1 reduce conv (and of everything downstream).
    channels: int = 256
    bn_eps: float = 1e-3


@dataclass(frozen=True)
class OccHeadConfig:
    # The occupancy grid, metres in the LiDAR frame: its x/y extent picks the RoI of the
    # BEV (a whole-cell centred window), its size (Dx, Dy, Dz) the output.
    range: tuple[float, float, float, float, float, float] = (-40.0, -40.0, -1.0, 40.0, 40.0, 5.4)
    size: tuple[int, int, int] = (200, 200, 16)
    class_names: tuple[str, ...] = OCC3D_CLASSES
    # out_dim of FlashOcc's final conv, the predicter's width.
    channels: int = 256
    # Optional (x1, y1, x2, y2) in BEV cells as Horizon's RoiResize writes it; when set it
    # must be the window ``range`` gives, so a copied config cannot silently disagree.
    roi_box: tuple[int, ...] = ()

    def __post_init__(self):
        r = self.range
        if any(r[i + 3] <= r[i] for i in range(3)) or min(self.size) < 1:
            raise ValueError("occ.range needs max > min and occ.size positive")
        if len(self.class_names) < 2 or self.class_names[-1] != "free":
            raise ValueError("occ.class_names must end with 'free' (the unscored empty class, as Occ3D's)")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclass(frozen=True)
class BEVFusionConfig:
    arch: ClassVar[str] = "bevfusion"
    camera: BEVFormerConfig
    lidar: PillarStreamConfig
    fusion: FuseConfig = FuseConfig()
    # "bevformer": BEVFormer's DETR decoder on the fused BEV (the reference's); "centerpoint":
    # the CenterPoint head the LiDAR stream comes with, configured in [model.centerpoint_head].
    det_head: str = "bevformer"
    centerpoint_head: HeadConfig | None = None
    occ: OccHeadConfig = OccHeadConfig()

    def __post_init__(self):
        if self.det_head not in DET_HEADS:
            raise ValueError(f"det_head '{self.det_head}' is not one of {', '.join(DET_HEADS)}")
        if self.det_head == "centerpoint" and self.centerpoint_head is None:
            raise ValueError("det_head = 'centerpoint' needs a [model.centerpoint_head] table (as CenterPoint's "
                             "[model.head])")
        if self.det_head == "bevformer" and self.fusion.channels != self.camera.embed_dims:
            raise ValueError(f"the BEVFormer decoder runs on the fused BEV, so fusion.channels "
                             f"({self.fusion.channels}) must equal camera.embed_dims ({self.camera.embed_dims})")
        check_grids(self.camera, self.lidar)
        box = occupancy_roi(self.camera, self.occ)
        if self.occ.roi_box and tuple(self.occ.roi_box) != box:
            raise ValueError(f"occ.roi_box {list(self.occ.roi_box)} is not the window of occ.range "
                             f"{list(self.occ.range[:2] + self.occ.range[3:5])}, which is {list(box)}: drop "
                             "roi_box or make the two agree")

    @property
    def centerpoint(self):
        """The LiDAR stream with the CenterPoint head, as a CenterPointPillarConfig: what
        CenterPoint's decoding and scoring read (det_head = "centerpoint" only)."""
        from .centerpoint_pillar import CenterPointPillarConfig

        lidar = {f: getattr(self.lidar, f) for f in ("voxelization", "pillar_encoder", "backbone", "neck", "points")}
        return CenterPointPillarConfig(**lidar, head=self.centerpoint_head)

    @property
    def detection(self):
        """The config the detection head's outputs are decoded and named by: the camera
        stream's (BEVFormer decoder) or the CenterPoint view."""
        return self.camera if self.det_head == "bevformer" else self.centerpoint

    @property
    def bev_shape(self) -> tuple[int, int]:
        return self.camera.bev_h, self.camera.bev_w

    @property
    def roi_box(self) -> tuple[int, int, int, int]:
        return occupancy_roi(self.camera, self.occ)


def check_grids(camera: BEVFormerConfig, lidar: PillarStreamConfig) -> None:
    """Both streams must make the same BEV grid: same x/y range, rows and columns (both
    index rows by y and columns by x in the LiDAR frame, the rig's frame)."""
    cam = (camera.pc_range[0], camera.pc_range[1], camera.pc_range[3], camera.pc_range[4])
    pr = lidar.voxelization.point_cloud_range
    lid = (pr[0], pr[1], pr[3], pr[4])
    if any(abs(a - b) > 1e-6 for a, b in zip(cam, lid)):
        raise ValueError(f"the camera and LiDAR BEV grids do not cover the same area: camera.pc_range x/y is "
                         f"{_fmt(cam)}, lidar.voxelization.point_cloud_range x/y is {_fmt(lid)}; set the x/y "
                         "bounds of one to the other's")
    rows, cols = lidar.bev_size
    if (camera.bev_h, camera.bev_w) != (rows, cols):
        nx, ny, _ = lidar.voxelization.grid_size
        raise ValueError(f"the camera BEV is camera.bev_h x camera.bev_w = {camera.bev_h}x{camera.bev_w} cells, "
                         f"the LiDAR stream's is {rows}x{cols} (a {ny}x{nx} pillar grid over its output stride "
                         f"{lidar.output_stride}): set camera.bev_h = {rows} and camera.bev_w = {cols}, or change "
                         "lidar.voxelization.voxel_size or the backbone/neck strides")


def _fmt(v) -> str:
    return "[" + ", ".join(f"{x:g}" for x in v) + "]"


def occupancy_roi(camera: BEVFormerConfig, occ: OccHeadConfig) -> tuple[int, int, int, int]:
    """(x1, y1, x2, y2) in BEV cells of the occupancy range: a window of whole cells,
    centred on the BEV (128 cells over +-51.2 m, +-40 m -> (14, 14, 114, 114))."""
    r, o = camera.pc_range, occ.range
    box = []
    for axis, cells in ((0, camera.bev_w), (1, camera.bev_h)):
        cell = (r[axis + 3] - r[axis]) / cells
        low, high = (o[axis] - r[axis]) / cell, (r[axis + 3] - o[axis + 3]) / cell
        whole = abs(low - round(low)) < 1e-6 and abs(high - round(high)) < 1e-6
        if not whole or round(low) != round(high) or round(low) < 0 or round(low) * 2 >= cells:
            name = "xy"[axis]
            sizes = ", ".join(f"+-{(cells / 2 - k) * cell:g} m ({cells - 2 * k} cells)"
                              for k in _nearest_margins(cells, cell, r[axis], o[axis], o[axis + 3]))
            raise ValueError(f"occ.range {name} {o[axis]:g}..{o[axis + 3]:g} m is not a whole-cell window centred "
                             f"on the BEV ({cells} cells of {cell:g} m over {r[axis]:g}..{r[axis + 3]:g} m); ranges "
                             f"that work near it: {sizes}")
        box.append(int(round(low)))
    (x1, y1) = box
    return x1, y1, camera.bev_w - x1, camera.bev_h - y1


def _nearest_margins(cells: int, cell: float, start: float, low: float, high: float) -> list[int]:
    wanted = ((low - start) / cell + (start + cells * cell - high) / cell) / 2
    margins = sorted(range(cells // 2), key=lambda k: abs(k - wanted))[:3]
    return sorted(margins, reverse=True)  # smallest range first


class ConvBNReLU(nn.Sequential):
    """HAT's ConvModule2d as BevFuseModule uses it: keys .0 (conv with bias), .1 (BN), .2 (ReLU)."""

    def __init__(self, c_in: int, c_out: int, kernel: int, eps: float):
        super().__init__(nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2),
                         nn.BatchNorm2d(c_out, eps=eps, momentum=0.01), nn.ReLU(inplace=True))


class TinySEBlock(nn.Module):
    """Channel attention with one 1x1 conv: x * sigmoid(conv(avgpool(x)))."""

    def __init__(self, channels: int):
        super().__init__()
        self.att = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, channels, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.att(x)


class BevFuseModule(nn.Module):
    """concat(camera BEV, LiDAR BEV) -> 1x1 conv+BN+ReLU -> 3x3 conv+BN+ReLU -> SE."""

    def __init__(self, camera_channels: int, lidar_channels: int, cfg: FuseConfig):
        super().__init__()
        self.concat = Concat(1)
        self.reduce_conv = ConvBNReLU(camera_channels + lidar_channels, cfg.channels, 1, cfg.bn_eps)
        self.conv2 = ConvBNReLU(cfg.channels, cfg.channels, 3, cfg.bn_eps)
        self.seblock = TinySEBlock(cfg.channels)

    def forward(self, camera: torch.Tensor, lidar: torch.Tensor) -> torch.Tensor:
        return self.seblock(self.conv2(self.reduce_conv(self.concat(camera, lidar))))


class FinalConv(nn.Module):
    """mmcv's ConvModule without a norm: conv (bias) + ReLU, keys .conv and .activate."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=True)
        self.activate = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.conv(x))


class OccHead(nn.Module):
    """FlashOcc's BEVOCCHead2D behind Horizon's RoI crop: crop the BEV to the occupancy
    range, bilinear-resize to (Dx, Dy) when the crop has another size, 3x3 conv + ReLU,
    then the channel-to-height predicter (Linear, Softplus, Linear) per BEV cell."""

    def __init__(self, in_channels: int, cfg: BEVFusionConfig):
        super().__init__()
        occ = cfg.occ
        self.roi_box = cfg.roi_box
        self.size = tuple(occ.size)
        self.num_classes = occ.num_classes
        self.final_conv = FinalConv(in_channels, occ.channels)
        self.predicter = nn.Sequential(nn.Linear(occ.channels, occ.channels * 2), nn.Softplus(),
                                       nn.Linear(occ.channels * 2, occ.num_classes * occ.size[2]))

    def forward(self, bev: torch.Tensor) -> torch.Tensor:  # (B, C, H=y, W=x)
        x1, y1, x2, y2 = self.roi_box
        x = bev[:, :, y1:y2, x1:x2]
        dx, dy, dz = self.size
        if (x.shape[2], x.shape[3]) != (dy, dx):
            x = F.interpolate(x, size=(dy, dx), mode="bilinear", align_corners=False)
        x = self.final_conv(x).permute(0, 3, 2, 1)  # (B, Dx, Dy, C)
        x = self.predicter(x)
        return x.reshape(x.shape[0], dx, dy, dz, self.num_classes)


class BEVFormerDetHead(DetrPredictions, nn.Module):
    """BEVFormer's DETR decoder and branches, on the fused BEV instead of the camera's."""

    def __init__(self, cfg: BEVFormerConfig):
        super().__init__()
        self.cfg = cfg
        self.transformer = DecoderTransformer(cfg)
        self._build_branches(cfg)
        self._build_queries(cfg)
        self._build_code_weights(cfg)

    def forward(self, bev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # (B, C, H, W)
        return self.predict(bev.flatten(2).transpose(1, 2))


class BEVFusion(nn.Module):
    def __init__(self, cfg: BEVFusionConfig):
        super().__init__()
        self.config = cfg
        camera, lidar = cfg.camera, cfg.lidar
        # Camera stream: BEVFormer's modules and names, its head without the decoder.
        self.img_backbone = ResNet(camera.backbone)
        self.img_neck = FPN(camera.backbone.out_channels, camera.neck)
        ref_cam, mask = rig_projection(camera)
        self.pts_bbox_head = BEVFormerHead(camera, ref_cam, mask, detection=False)
        # LiDAR stream: CenterPoint's modules and names, without its head.
        build_pillar_stream(self, lidar)
        self.fusion_module = BevFuseModule(camera.embed_dims, lidar.bev_channels, cfg.fusion)
        if cfg.det_head == "bevformer":
            self.det_head = BEVFormerDetHead(camera)
        else:
            self.det_head = CenterHead(cfg.fusion.channels, cfg.centerpoint_head)
        self.occ_head = OccHead(cfg.fusion.channels, cfg)

    # The streams' own code, run on this module's submodules of the same names.
    extract_feat = BEVFormer.extract_feat
    lidar_bev = CenterPointPillar.bev_features
    rig_coverage = BEVFormer.rig_coverage

    @property
    def input_layout(self) -> str:
        return self.pts_voxel_encoder.input_layout

    @property
    def input_names(self) -> list[str]:
        return [*BEVFormer.input_names, *pillar_input_names(self)]

    @property
    def detection_names(self) -> list[str]:
        cfg = self.config
        if cfg.det_head == "bevformer":
            return ["cls_scores", "bbox_preds"]
        heads = [*cfg.centerpoint_head.common_heads, "heatmap"]
        return [f"task{t}.{h}" for t in range(len(cfg.centerpoint_head.tasks)) for h in heads]

    @property
    def output_names(self) -> list[str]:
        return ["bev_embed", *self.detection_names, "occupancy"]

    def camera_bev(self, img, can_bus, shift, prev_bev, use_prev_bev) -> torch.Tensor:
        """(bs, H*W, C) as BEVFormer's bev_embed."""
        return self.pts_bbox_head(self.extract_feat(img), can_bus, prev_bev, shift, use_prev_bev)

    def fuse(self, bev_embed: torch.Tensor, lidar: torch.Tensor) -> torch.Tensor:
        h, w = self.config.bev_shape
        camera = bev_embed.transpose(1, 2).reshape(bev_embed.shape[0], -1, h, w)
        return self.fusion_module(camera, lidar)

    def heads(self, fused: torch.Tensor) -> tuple[torch.Tensor, ...]:
        det = self.det_head(fused)
        return (*det, self.occ_head(fused))

    def forward(self, img, can_bus, shift, prev_bev, use_prev_bev, pillars, coords, num_points=None):
        bev_embed = self.camera_bev(img, can_bus, shift, prev_bev, use_prev_bev)
        fused = self.fuse(bev_embed, self.lidar_bev(pillars, coords, num_points))
        return (bev_embed, *self.heads(fused))


def synthetic_init(model: BEVFusion, cfg: BEVFusionConfig, gen: torch.Generator) -> None:
    from .bevformer import synthetic

    synthetic.init_camera_stream(model.pts_bbox_head, gen)
    if cfg.det_head == "bevformer":
        synthetic.init_attention_stack(model.det_head, gen)
        synthetic.init_detr_branches(model.det_head)
    else:
        for task in model.det_head.task_heads:
            task.heatmap[-1].bias.data.fill_(cfg.centerpoint_head.init_bias)
    with torch.no_grad():
        # SE starts near the identity's half-gain, not saturated.
        model.fusion_module.seblock.att[1].weight.mul_(0.1)
        # Occupancy starts at the free class's prior, as a trained head predicts mostly free.
        last = model.occ_head.predicter[-1]
        bias = last.bias.view(cfg.occ.size[2], cfg.occ.num_classes)
        bias.zero_()
        bias[:, -1] = math.log(0.9 / 0.1)
