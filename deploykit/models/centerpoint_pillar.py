"""CenterPoint with a PointPillars encoder, as laid out in mmdet3d.

Submodule names equal mmdet3d's (``pts_voxel_encoder.pfn_layers.0.linear``,
``pts_backbone.blocks.0.0``, ``pts_bbox_head.task_heads.0.heatmap.1`` ...) so a
released checkpoint's state dict loads without renaming, and the forward math
follows mmdet3d's PillarFeatureNet / PointPillarsScatter / SECOND / SECONDFPN /
CenterHead exactly. This is the *original* model: the rewrite passes in
deploykit.passes turn it into the deployable one.

The original model's input is the decorated pillar tensor plus pillar coordinates, as
mmdet3d's PFN layers see them (decorated by ``deploykit.preprocess``); the
``decorate_in_graph`` pass moves the decoration into the network, which then takes the
raw padded voxels, their point counts and the coordinates.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Concat


@dataclass(frozen=True)
class VoxelizationConfig:
    point_cloud_range: tuple[float, float, float, float, float, float]
    voxel_size: tuple[float, float, float]
    max_points_per_pillar: int = 20
    max_pillars: int = 40000
    point_features: int = 5

    def __post_init__(self):
        r, v = self.point_cloud_range, self.voxel_size
        if any(r[i + 3] <= r[i] for i in range(3)) or min(v) <= 0:
            raise ValueError("point_cloud_range needs max > min and voxel_size > 0")
        if self.grid_size[2] != 1:
            raise ValueError(
                f"pillars need one voxel in z; voxel_size z={v[2]} gives {self.grid_size[2]} "
                f"over the range {r[2]}..{r[5]}: set voxel_size z to {r[5] - r[2]}"
            )

    @property
    def grid_size(self) -> tuple[int, int, int]:
        r, v = self.point_cloud_range, self.voxel_size
        return tuple(int(round((r[i + 3] - r[i]) / v[i])) for i in range(3))


POINT_FEATURES = ("x", "y", "z", "intensity", "dt")


@dataclass(frozen=True)
class PointsConfig:
    """The input contract: what each point column means to the checkpoint.

    x, y, z are metres in the LiDAR frame the model was trained in; intensity is
    in ``intensity_range`` (nuScenes files hold 0-255, KITTI's reflectance 0-1);
    dt is the time lag in seconds of a point's sweep behind the current one, 0
    for the current sweep, as mmdet3d's LoadPointsFromMultiSweeps fills it.
    """

    # Empty: the first ``point_features`` of x, y, z, intensity, dt.
    features: tuple[str, ...] = ()
    intensity_range: tuple[float, float] = (0.0, 255.0)
    # Sweeps aggregated per frame: the current one plus sweeps - 1 earlier ones
    # (mmdet3d's sweeps_num is this minus one); 1 = single sweeps, dt is 0.
    sweeps: int = 10
    # Earlier sweeps lose their points within this square radius (m) of the sensor (mmdet3d's remove_close).
    remove_close: float = 1.0
    # A frame with fewer or more points than this (after aggregation) is warned about.
    expected_points: tuple[int, int] = (5000, 500000)

    def __post_init__(self):
        unknown = [f for f in self.features if f not in POINT_FEATURES]
        if unknown:
            raise ValueError(f"points.features {unknown} unknown; each is one of {', '.join(POINT_FEATURES)}")
        if self.features and list(self.features[:3]) != ["x", "y", "z"]:
            raise ValueError("points.features must start with x, y, z")
        lo, hi = self.intensity_range
        if not hi > lo:
            raise ValueError(f"points.intensity_range needs max > min, got {self.intensity_range}")
        if self.sweeps < 1:
            raise ValueError("points.sweeps must be at least 1 (the current sweep)")
        if not 0 <= self.expected_points[0] < self.expected_points[1]:
            raise ValueError(f"points.expected_points needs 0 <= low < high, got {self.expected_points}")


@dataclass(frozen=True)
class PillarEncoderConfig:
    feat_channels: tuple[int, ...] = (64,)
    with_cluster_center: bool = True
    with_voxel_center: bool = True
    with_distance: bool = False
    legacy: bool = False
    bn_eps: float = 1e-3

    def decorated_channels(self, point_features: int) -> int:
        return (point_features + 3 * self.with_cluster_center + 3 * self.with_voxel_center
                + self.with_distance)


@dataclass(frozen=True)
class BackboneConfig:
    out_channels: tuple[int, ...] = (64, 128, 256)
    layer_nums: tuple[int, ...] = (3, 5, 5)
    layer_strides: tuple[int, ...] = (2, 2, 2)
    bn_eps: float = 1e-3


@dataclass(frozen=True)
class NeckConfig:
    out_channels: tuple[int, ...] = (128, 128, 128)
    upsample_strides: tuple[float, ...] = (0.5, 1.0, 2.0)
    use_conv_for_no_stride: bool = True
    bn_eps: float = 1e-3


@dataclass(frozen=True)
class TaskConfig:
    class_names: tuple[str, ...]


@dataclass(frozen=True)
class HeadConfig:
    tasks: tuple[TaskConfig, ...]
    common_heads: dict[str, tuple[int, int]]
    share_conv_channel: int = 64
    head_conv: int = 64
    final_kernel: int = 3
    num_heatmap_convs: int = 2
    bn_eps: float = 1e-5
    init_bias: float = -2.19
    # mmdet3d test_cfg for circle NMS after decoding: squared radius (m^2) per task,
    # empty = no NMS; used where deploykit scores detections (mAP), not in the engine.
    min_radius: tuple[float, ...] = ()
    post_max_size: int = 83
    # Class name -> nuScenes detection name, for classes named otherwise (a cyclist is
    # nuScenes' "bicycle"); used for the submission JSON and the nuScenes metrics.
    nuscenes_names: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if self.min_radius and len(self.min_radius) != len(self.tasks):
            raise ValueError(f"min_radius needs one entry per task ({len(self.tasks)}), got {len(self.min_radius)}")


@dataclass(frozen=True)
class PillarStreamConfig:
    """The LiDAR stream up to its BEV features: voxelization, PFN, scatter, SECOND, FPN.

    CenterPoint adds its head to it; BEVFusion fuses its BEV with the camera stream's."""

    voxelization: VoxelizationConfig
    pillar_encoder: PillarEncoderConfig = PillarEncoderConfig()
    backbone: BackboneConfig = BackboneConfig()
    neck: NeckConfig = NeckConfig()
    points: PointsConfig = PointsConfig()

    def __post_init__(self):
        b, n = self.backbone, self.neck
        if self.points.features and len(self.points.features) != self.voxelization.point_features:
            raise ValueError(f"points.features names {len(self.points.features)} columns, voxelization."
                             f"point_features is {self.voxelization.point_features}")
        if self.voxelization.point_features > len(POINT_FEATURES):
            raise ValueError(f"point_features {self.voxelization.point_features}: deploykit knows "
                             f"{len(POINT_FEATURES)} point features ({', '.join(POINT_FEATURES)})")
        if not len(b.out_channels) == len(b.layer_nums) == len(b.layer_strides):
            raise ValueError("backbone out_channels, layer_nums and layer_strides need one entry per stage")
        if not len(n.out_channels) == len(n.upsample_strides) == len(b.out_channels):
            raise ValueError("neck out_channels and upsample_strides need one entry per backbone stage")
        nx, ny, _ = self.voxelization.grid_size
        if nx % self.output_stride or ny % self.output_stride:
            raise ValueError(f"BEV grid {ny}x{nx} is not divisible by the head's stride {self.output_stride}")

    @property
    def point_columns(self) -> tuple[str, ...]:
        """The names of the network's point columns, in order."""
        return self.points.features or POINT_FEATURES[: self.voxelization.point_features]

    @property
    def pillar_channels(self) -> int:
        return self.pillar_encoder.decorated_channels(self.voxelization.point_features)

    @property
    def output_stride(self) -> int:
        down = 1
        for s in self.backbone.layer_strides:
            down *= s
        return int(round(down / self.neck.upsample_strides[-1]))

    @property
    def bev_size(self) -> tuple[int, int]:
        """(rows, columns) of the stream's BEV features: (y, x) cells of the grid over the stride."""
        nx, ny, _ = self.voxelization.grid_size
        return ny // self.output_stride, nx // self.output_stride

    @property
    def bev_channels(self) -> int:
        return sum(self.neck.out_channels)


@dataclass(frozen=True, kw_only=True)
class CenterPointPillarConfig(PillarStreamConfig):
    arch: ClassVar[str] = "centerpoint_pillar"
    head: HeadConfig


class PFNLayer(nn.Module):
    """Linear + BatchNorm1d + ReLU over each point, then max over a pillar's points."""

    def __init__(self, in_channels: int, out_channels: int, eps: float, last_layer: bool):
        super().__init__()
        self.last_vfe = last_layer
        units = out_channels if last_layer else out_channels // 2
        self.linear = nn.Linear(in_channels, units, bias=False)
        self.norm = nn.BatchNorm1d(units, eps=eps, momentum=0.01)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:  # (P, N, C)
        x = self.linear(inputs)
        x = self.norm(x.permute(0, 2, 1).contiguous()).permute(0, 2, 1).contiguous()
        x = F.relu(x)
        x_max = torch.max(x, dim=1, keepdim=True)[0]
        if self.last_vfe:
            return x_max
        return torch.cat([x, x_max.repeat(1, inputs.shape[1], 1)], dim=2)


class PillarFeatureNet(nn.Module):
    """The PFN layers of mmdet3d's PillarFeatureNet on host-decorated pillars.

    Input (P, N, C) like mmdet3d; output channel-first (1, C_out, P), the layout
    every pillar encoder in deploykit hands to the scatter.
    """

    input_layout = "PNC"

    def __init__(self, in_channels: int, cfg: PillarEncoderConfig, num_points: int):
        super().__init__()
        # Static points-per-pillar: the rewritten PFN pools over exactly this many.
        self.num_points = num_points
        chans = [in_channels, *cfg.feat_channels]
        self.pfn_layers = nn.ModuleList(
            PFNLayer(chans[i], chans[i + 1], cfg.bn_eps, last_layer=i == len(chans) - 2)
            for i in range(len(chans) - 1)
        )

    def forward(self, pillars: torch.Tensor) -> torch.Tensor:
        x = pillars
        for pfn in self.pfn_layers:
            x = pfn(x)
        return x.squeeze(1).t().unsqueeze(0)


class PointPillarsScatter(nn.Module):
    """Pillar features onto the BEV canvas by index assignment, as mmdet3d does.

    Static-shape inputs pad the pillar list with rows of -1 coordinates; those
    (and any coordinate off the grid) are routed to one spare cell that is cut
    off, so padding never writes into the canvas.
    """

    def __init__(self, in_channels: int, ny: int, nx: int):
        super().__init__()
        self.in_channels, self.ny, self.nx = in_channels, ny, nx

    def forward(self, feats: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        y, x = coords[:, 2].long(), coords[:, 3].long()
        valid = (y >= 0) & (y < self.ny) & (x >= 0) & (x < self.nx)
        cells = self.ny * self.nx
        index = torch.where(valid, y * self.nx + x, torch.full_like(y, cells))
        canvas = feats.new_zeros(self.in_channels, cells + 1)
        canvas[:, index] = feats[0]
        return canvas[:, :cells].reshape(1, self.in_channels, self.ny, self.nx)


def _bn(channels: int, eps: float) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=eps, momentum=0.01)


class SECOND(nn.Module):
    def __init__(self, in_channels: int, cfg: BackboneConfig):
        super().__init__()
        blocks = []
        c_in = in_channels
        for c_out, n, stride in zip(cfg.out_channels, cfg.layer_nums, cfg.layer_strides):
            layers = [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
                      _bn(c_out, cfg.bn_eps), nn.ReLU(inplace=True)]
            for _ in range(n):
                layers += [nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
                           _bn(c_out, cfg.bn_eps), nn.ReLU(inplace=True)]
            blocks.append(nn.Sequential(*layers))
            c_in = c_out
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for block in self.blocks:
            x = block(x)
            outs.append(x)
        return outs


class SECONDFPN(nn.Module):
    def __init__(self, in_channels: tuple[int, ...], cfg: NeckConfig):
        super().__init__()
        deblocks = []
        for c_in, c_out, stride in zip(in_channels, cfg.out_channels, cfg.upsample_strides):
            if stride > 1 or (stride == 1 and not cfg.use_conv_for_no_stride):
                k = int(stride)
                up = nn.ConvTranspose2d(c_in, c_out, k, stride=k, bias=False)
            else:
                k = int(round(1 / stride))
                up = nn.Conv2d(c_in, c_out, k, stride=k, bias=False)
            deblocks.append(nn.Sequential(up, _bn(c_out, cfg.bn_eps), nn.ReLU(inplace=True)))
        self.deblocks = nn.ModuleList(deblocks)
        self.concat = Concat(1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        ups = [deblock(f) for deblock, f in zip(self.deblocks, feats)]
        return self.concat(*ups) if len(ups) > 1 else ups[0]


class ConvModule(nn.Module):
    """mmcv's ConvModule as CenterHead uses it: conv (no bias) + BN + ReLU."""

    def __init__(self, c_in: int, c_out: int, kernel: int, eps: float):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=eps)
        self.activate = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.bn(self.conv(x)))


class SeparateHead(nn.Module):
    def __init__(self, in_channels: int, heads: dict[str, tuple[int, int]], cfg: HeadConfig):
        super().__init__()
        self.heads = list(heads)
        for name, (classes, num_conv) in heads.items():
            layers: list[nn.Module] = []
            c_in = in_channels
            for _ in range(num_conv - 1):
                layers.append(ConvModule(c_in, cfg.head_conv, cfg.final_kernel, cfg.bn_eps))
                c_in = cfg.head_conv
            layers.append(nn.Conv2d(c_in, classes, cfg.final_kernel, padding=cfg.final_kernel // 2, bias=True))
            setattr(self, name, nn.Sequential(*layers))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [getattr(self, name)(x) for name in self.heads]


class CenterHead(nn.Module):
    def __init__(self, in_channels: int, cfg: HeadConfig):
        super().__init__()
        self.shared_conv = ConvModule(in_channels, cfg.share_conv_channel, 3, cfg.bn_eps)
        self.task_heads = nn.ModuleList()
        for task in cfg.tasks:
            heads = dict(cfg.common_heads)
            heads["heatmap"] = (len(task.class_names), cfg.num_heatmap_convs)
            self.task_heads.append(SeparateHead(cfg.share_conv_channel, heads, cfg))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.shared_conv(x)
        return [out for task in self.task_heads for out in task(x)]


def build_pillar_stream(module: nn.Module, cfg: PillarStreamConfig) -> None:
    """Give ``module`` the LiDAR stream's submodules under mmdet3d's names (pts_voxel_encoder,
    pts_middle_encoder, pts_backbone, pts_neck), so checkpoints load without renaming."""
    nx, ny, _ = cfg.voxelization.grid_size
    feat = cfg.pillar_encoder.feat_channels[-1]
    module.pts_voxel_encoder = PillarFeatureNet(cfg.pillar_channels, cfg.pillar_encoder,
                                                cfg.voxelization.max_points_per_pillar)
    module.pts_middle_encoder = PointPillarsScatter(feat, ny, nx)
    module.pts_backbone = SECOND(feat, cfg.backbone)
    module.pts_neck = SECONDFPN(cfg.backbone.out_channels, cfg.neck)
    # The decorate_in_graph pass sets a PillarDecoration here; None: the input is decorated.
    module.pts_pillar_decoration = None


def pillar_input_names(module: nn.Module) -> list[str]:
    """The LiDAR stream's inputs: pillars and coords, and the point counts when it decorates."""
    return ["pillars", "coords", *(["num_points"] if module.pts_pillar_decoration is not None else [])]


def encoder_input(module: nn.Module, pillars: torch.Tensor, coords: torch.Tensor,
                  num_points: torch.Tensor | None) -> torch.Tensor:
    """What the PFN layers take: ``pillars`` as given, or decorated by the stream itself."""
    decoration = module.pts_pillar_decoration
    if decoration is None:
        return pillars
    if num_points is None:
        raise ValueError("this model decorates its pillars in the graph and needs num_points")
    encoder = module.pts_voxel_encoder
    return decoration(pillars, num_points, coords, encoder.input_layout, getattr(encoder, "input_scale", None))


class CenterPointPillar(nn.Module):
    """forward(pillars, coords) -> flat tuple of head maps, see ``output_names``."""

    def __init__(self, cfg: CenterPointPillarConfig):
        super().__init__()
        self.cfg = cfg
        build_pillar_stream(self, cfg)
        self.pts_bbox_head = CenterHead(cfg.bev_channels, cfg.head)

    @property
    def input_layout(self) -> str:
        return self.pts_voxel_encoder.input_layout

    @property
    def input_names(self) -> list[str]:
        return pillar_input_names(self)

    @property
    def output_names(self) -> list[str]:
        heads = [*self.cfg.head.common_heads, "heatmap"]
        return [f"task{t}.{h}" for t in range(len(self.cfg.head.tasks)) for h in heads]

    def bev_features(self, pillars: torch.Tensor, coords: torch.Tensor,
                     num_points: torch.Tensor | None = None) -> torch.Tensor:
        """The LiDAR stream alone: (1, sum(neck.out_channels), ny / stride, nx / stride)."""
        feats = self.pts_voxel_encoder(encoder_input(self, pillars, coords, num_points))
        canvas = self.pts_middle_encoder(feats, coords)
        return self.pts_neck(self.pts_backbone(canvas))

    def forward(self, pillars: torch.Tensor, coords: torch.Tensor,
                num_points: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        return tuple(self.pts_bbox_head(self.bev_features(pillars, coords, num_points)))
