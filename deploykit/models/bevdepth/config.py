"""BEVDepth's sizes as a recipe states them, with the public config's names.

Field names follow Megvii-BaseDetection/BEVDepth's ``backbone_conf`` / ``head_conf``
(``x_bound``, ``d_bound``, ``final_dim`` as ``image_size``, ``downsample_factor``,
``output_channels``...); defaults are ``bev_depth_lss_r50_256x704_128x128_24e_2key``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

from ..centerpoint_pillar import HeadConfig, NeckConfig, TaskConfig, VoxelizationConfig
from ..resnet import ResNetConfig

NUSCENES_TASKS = (
    TaskConfig(("car",)), TaskConfig(("truck", "construction_vehicle")), TaskConfig(("bus", "trailer")),
    TaskConfig(("barrier",)), TaskConfig(("motorcycle", "bicycle")), TaskConfig(("pedestrian", "traffic_cone")),
)


def _head() -> HeadConfig:
    return HeadConfig(tasks=NUSCENES_TASKS,
                      common_heads={"reg": (2, 2), "height": (1, 2), "dim": (3, 2), "rot": (2, 2), "vel": (2, 2)},
                      min_radius=(4, 12, 10, 1, 0.85, 0.175))


@dataclass(frozen=True)
class TrunkConfig:
    """The BEV backbone: mmdet's BasicBlock ResNet without its max-pool (BEVDepthHead.trunk)."""

    stage_blocks: tuple[int, ...] = (2, 2, 2)
    strides: tuple[int, ...] = (1, 2, 2)
    base_channels: int = 160

    def __post_init__(self):
        if len(self.stage_blocks) != len(self.strides) or min(self.stage_blocks, default=0) < 1:
            raise ValueError("bev_backbone stage_blocks and strides need one positive entry per stage")


@dataclass(frozen=True)
class BEVDepthConfig:
    arch: ClassVar[str] = "bevdepth"
    rig: str = "nuscenes_surround"
    num_cams: int = 6
    # final_dim: the network input (H, W) after the test-time resize and crop.
    image_size: tuple[int, int] = (256, 704)
    # The test-time image augmentation (ida) BEVDepth applies: resize by max(fH / H, fW / W)
    # of the raw images, then crop (top, left) = (resized H - fH, centred): nuScenes'
    # 900x1600 -> 396x704, less the top 140 rows.
    image_scale: float = 0.44
    image_crop: tuple[int, int] = (140, 0)
    img_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    img_std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    # The release reads images with PIL (RGB) and normalises them with mmcv.imnormalize(
    # to_rgb=True), which swaps the channels again: the network sees B, G, R minus the
    # RGB means. Its checkpoints are trained so; false feeds R, G, B.
    swap_rb: bool = True
    backbone: ResNetConfig = ResNetConfig(depth=50, out_indices=(0, 1, 2, 3))
    img_neck: NeckConfig = NeckConfig(out_channels=(128, 128, 128, 128), upsample_strides=(0.25, 0.5, 1.0, 2.0),
                                      use_conv_for_no_stride=False)
    downsample_factor: int = 16
    x_bound: tuple[float, float, float] = (-51.2, 51.2, 0.8)
    y_bound: tuple[float, float, float] = (-51.2, 51.2, 0.8)
    z_bound: tuple[float, float, float] = (-5.0, 3.0, 8.0)
    d_bound: tuple[float, float, float] = (2.0, 58.0, 0.5)
    output_channels: int = 80
    depth_mid_channels: int = 512
    dcn_groups: int = 4
    # Key frames fused: 2 = the current one and the previous key frame (key_idxes = [-1]).
    keys: int = 2
    bev_backbone: TrunkConfig = TrunkConfig()
    bev_neck: NeckConfig = NeckConfig(out_channels=(64, 64, 64, 64), upsample_strides=(1.0, 2.0, 4.0, 8.0),
                                      use_conv_for_no_stride=False)
    head: HeadConfig = field(default_factory=_head)
    # bbox_coder: boxes are decoded on a grid of voxel_size x out_size_factor metres.
    bbox_voxel_size: tuple[float, float, float] = (0.2, 0.2, 8.0)
    out_size_factor: int = 4

    def __post_init__(self):
        h, w = self.image_size
        deepest = 4 * 2 ** max(self.backbone.out_indices)
        if h % deepest or w % deepest:
            raise ValueError(f"image_size {self.image_size} must be multiples of {deepest}, the deepest image "
                             "backbone level's stride (its features are upsampled to the others')")
        if len(self.img_neck.out_channels) != len(self.backbone.out_indices) or len(
                self.img_neck.upsample_strides) != len(self.backbone.out_indices):
            raise ValueError("img_neck out_channels and upsample_strides need one entry per backbone out_indices")
        strides = {4 * 2 ** i / s for i, s in zip(self.backbone.out_indices, self.img_neck.upsample_strides)}
        if strides != {float(self.downsample_factor)}:
            raise ValueError(f"img_neck upsample_strides {self.img_neck.upsample_strides} do not bring every "
                             f"backbone level to downsample_factor {self.downsample_factor}")
        if self.depth_bins < 1:
            raise ValueError(f"d_bound {self.d_bound} gives no depth bins")
        for name in ("x_bound", "y_bound", "z_bound"):
            lo, hi, step = getattr(self, name)
            cells = (hi - lo) / step
            if step <= 0 or abs(cells - round(cells)) > 1e-6 or round(cells) < 1:
                raise ValueError(f"{name} {getattr(self, name)} must split into whole cells")
        if self.keys not in (1, 2):
            raise ValueError(f"keys {self.keys}: deploykit runs one key frame or two (key_idxes = [-1])")
        if len(self.bev_neck.out_channels) != len(self.bev_backbone.strides) + 1:
            raise ValueError("bev_neck needs one entry for the BEV input plus one per bev_backbone stage")
        if self.mid_stride_mismatch:
            raise ValueError(self.mid_stride_mismatch)
        if self.dcn_groups < 1 or self.depth_mid_channels % self.dcn_groups:
            raise ValueError(f"depth_mid_channels {self.depth_mid_channels} must be divisible by dcn_groups")
        cell = self.x_bound[2]
        if abs(self.bbox_voxel_size[0] * self.out_size_factor - cell) > 1e-6:
            raise ValueError(f"bbox_voxel_size x out_size_factor ({self.bbox_voxel_size[0]} x "
                             f"{self.out_size_factor}) must equal the BEV cell x_bound[2] = {cell}")

    @property
    def mid_stride_mismatch(self) -> str:
        strides = [1]
        for s in self.bev_backbone.strides:
            strides.append(strides[-1] * s * (2 if len(strides) == 1 else 1))
        ups = {st / u for st, u in zip(strides, self.bev_neck.upsample_strides)}
        if len(ups) != 1:
            return (f"bev_neck upsample_strides {self.bev_neck.upsample_strides} do not bring the trunk's outputs "
                    f"(strides {strides}) to one resolution")
        return ""

    @property
    def depth_bins(self) -> int:
        lo, hi, step = self.d_bound  # torch.arange(*d_bound), as create_frustum makes the bins
        return max(0, math.ceil((hi - lo) / step - 1e-9)) if step > 0 else 0

    @property
    def feature_size(self) -> tuple[int, int]:
        return self.image_size[0] // self.downsample_factor, self.image_size[1] // self.downsample_factor

    @property
    def voxel_num(self) -> tuple[int, int, int]:
        return tuple(int(round((b[1] - b[0]) / b[2])) for b in (self.x_bound, self.y_bound, self.z_bound))

    @property
    def bev_size(self) -> tuple[int, int]:
        x, y, _ = self.voxel_num
        return y, x

    @property
    def bev_neck_in_channels(self) -> tuple[int, ...]:
        t = self.bev_backbone
        return (self.output_channels * self.keys, *(t.base_channels * 2 ** i for i in range(len(t.strides))))

    @property
    def pc_range(self) -> tuple[float, ...]:
        """The BEV grid's (x0, y0, z0, x1, y1, z1) in metres, ego frame."""
        return (self.x_bound[0], self.y_bound[0], self.z_bound[0], self.x_bound[1], self.y_bound[1], self.z_bound[1])

    # CenterPoint's decoding and scoring read these (deploykit.detection.decode).
    @property
    def voxelization(self) -> VoxelizationConfig:
        return VoxelizationConfig(
            point_cloud_range=self.pc_range,
            voxel_size=(self.bbox_voxel_size[0], self.bbox_voxel_size[1], self.z_bound[1] - self.z_bound[0]))

    @property
    def output_stride(self) -> int:
        return self.out_size_factor
