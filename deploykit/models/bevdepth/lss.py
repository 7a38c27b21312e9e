"""BEVDepth's LSS view transform (BaseLSSFPN): image features, depth, geometry, pooling.

Module and buffer names follow the release (``backbone.img_backbone``,
``backbone.img_neck``, ``backbone.depth_net``, buffers ``frustum``, ``voxel_size``,
``voxel_coord``, ``voxel_num``); the math follows ``_forward_single_sweep`` in
inference mode: softmax depth, ``get_geometry`` (undo ida, lift by depth, camera to
ego, bda), cells by ``.int()`` truncation toward zero (a point up to one cell below
the grid's low edge lands in cell 0, as in the release), then its CUDA
``voxel_pooling_inference``: points outside any axis of the grid dropped, z
collapsed, depth x context summed per (y, x) cell.
"""

from __future__ import annotations

import torch
from torch import nn

from ..centerpoint_pillar import SECONDFPN
from ..resnet import ResNet
from .config import BEVDepthConfig
from .depth_net import DepthNet


def create_frustum(cfg: BEVDepthConfig) -> torch.Tensor:
    """(D, fH, fW, 4): (u, v) of each feature cell in input pixels, depth, 1."""
    og_h, og_w = cfg.image_size
    f_h, f_w = cfg.feature_size
    d_coords = torch.arange(*cfg.d_bound, dtype=torch.float).view(-1, 1, 1).expand(-1, f_h, f_w)
    d = d_coords.shape[0]
    x_coords = torch.linspace(0, og_w - 1, f_w, dtype=torch.float).view(1, 1, f_w).expand(d, f_h, f_w)
    y_coords = torch.linspace(0, og_h - 1, f_h, dtype=torch.float).view(1, f_h, 1).expand(d, f_h, f_w)
    return torch.stack((x_coords, y_coords, d_coords, torch.ones_like(d_coords)), -1)


def camera_points(frustum: torch.Tensor, ida_mat: torch.Tensor) -> torch.Tensor:
    """get_geometry's first half: (B, N, D, H, W, 4, 1) frustum points in camera
    coordinates scaled by depth (x * d, y * d, d, 1), the image augmentation undone."""
    b, n = ida_mat.shape[:2]
    points = ida_mat.view(b, n, 1, 1, 1, 4, 4).inverse().matmul(frustum.unsqueeze(-1))
    return torch.cat((points[:, :, :, :, :, :2] * points[:, :, :, :, :, 2:3], points[:, :, :, :, :, 2:]), 5)


def ego_points(points: torch.Tensor, sensor2ego_mat: torch.Tensor, intrin_mat: torch.Tensor,
               bda_mat: torch.Tensor | None) -> torch.Tensor:
    """get_geometry's second half: camera points to (B, N, D, H, W, 3) ego coordinates."""
    b, n = sensor2ego_mat.shape[:2]
    combine = sensor2ego_mat.matmul(torch.inverse(intrin_mat))
    points = combine.view(b, n, 1, 1, 1, 4, 4).matmul(points)
    if bda_mat is not None:
        bda_mat = bda_mat.unsqueeze(1).repeat(1, n, 1, 1).view(b, n, 1, 1, 1, 4, 4)
        points = (bda_mat @ points).squeeze(-1)
    else:
        points = points.squeeze(-1)
    return points[..., :3]


def to_cells(geom, voxel_coord, voxel_size):
    """Integer (x, y, z) cells of ego-frame points, truncated toward zero as the release's
    ``.int()`` does (a point up to one cell below the grid's low edge lands in cell 0)."""
    return ((geom - (voxel_coord - voxel_size / 2.0)) / voxel_size).int()


def in_grid(cells, voxel_num):
    """Which cells (..., 3) lie in the (X, Y, Z) grid: the points the release pools (torch or numpy)."""
    nx, ny, nz = (int(v) for v in voxel_num)
    x, y, z = cells[..., 0], cells[..., 1], cells[..., 2]
    return (x >= 0) & (x < nx) & (y >= 0) & (y < ny) & (z >= 0) & (z < nz)


class LSSFPN(nn.Module):
    def __init__(self, cfg: BEVDepthConfig):
        super().__init__()
        self.cfg = cfg
        bounds = (cfg.x_bound, cfg.y_bound, cfg.z_bound)
        self.register_buffer("voxel_size", torch.Tensor([row[2] for row in bounds]))
        self.register_buffer("voxel_coord", torch.Tensor([row[0] + row[2] / 2.0 for row in bounds]))
        self.register_buffer("voxel_num", torch.LongTensor([int(round((row[1] - row[0]) / row[2])) for row in bounds]))
        self.register_buffer("frustum", create_frustum(cfg))
        self.depth_channels = cfg.depth_bins
        self.output_channels = cfg.output_channels
        self.img_backbone = ResNet(cfg.backbone)
        self.img_neck = SECONDFPN(cfg.backbone.out_channels, cfg.img_neck)
        self.depth_net = DepthNet(sum(cfg.img_neck.out_channels), cfg.depth_mid_channels, cfg.output_channels,
                                  self.depth_channels, cfg.dcn_groups)

    def cells(self, geom: torch.Tensor) -> torch.Tensor:
        return to_cells(geom, self.voxel_coord, self.voxel_size)

    def get_geometry(self, sensor2ego_mat, intrin_mat, ida_mat, bda_mat) -> torch.Tensor:
        return ego_points(camera_points(self.frustum, ida_mat), sensor2ego_mat, intrin_mat, bda_mat)

    def image_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B * N, C, fH, fW) neck features of (B, N, 3, H, W) images."""
        b, n = imgs.shape[:2]
        return self.img_neck(self.img_backbone(imgs.reshape(b * n, *imgs.shape[2:])))

    def forward(self, imgs: torch.Tensor, mats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(softmax depth (B * N, D, fH, fW), context (B * N, C, fH, fW)) of (B, N, 3, H, W)
        images and the (B * N, 27) camera-aware vector: one key frame through
        _forward_single_sweep up to the pooling. (A module's forward, so exported nodes
        are named by its path: backbone/img_backbone/..., backbone/depth_net/...)"""
        depth, context = self.depth_net(self.image_features(imgs), mats)
        return depth.softmax(dim=1, dtype=depth.dtype), context

    def voxel_pooling(self, cells: torch.Tensor, depth: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """voxel_pooling_inference in PyTorch: (B, C, Y, X) from (B, N, D, H, W, 3) cells,
        (B * N, D, H, W) depth and (B * N, C, H, W) context."""
        b, n, d, h, w, _ = cells.shape
        nx, ny, _ = (int(v) for v in self.voxel_num)
        c = context.shape[1]
        flat = cells.reshape(-1, 3).long()
        x, y = flat[:, 0], flat[:, 1]
        point = torch.nonzero(in_grid(flat, self.voxel_num)).squeeze(1)
        batch = point // (n * d * h * w)
        pixel = (point // (d * h * w)) * (h * w) + point % (h * w)  # (b, n, h, w) of the point
        feats = context.reshape(b * n, c, h * w).permute(0, 2, 1).reshape(-1, c)[pixel]
        values = depth.reshape(-1)[point][:, None] * feats
        cell = (batch * ny + y[point]) * nx + x[point]
        # scatter_add, not index_add: the TorchScript exporter writes index_add as a
        # ScatterElements without reduction, which keeps one point per cell.
        out = values.new_zeros(b * ny * nx, c).scatter_add(0, cell[:, None].expand(-1, c), values)
        return out.reshape(b, ny, nx, c).permute(0, 3, 1, 2)
