"""BEVDepth as a static engine for a fixed rig (built by the bev_pool_op pass).

The release recomputes the previous key frame from its images on every call and
pools a frustum whose size depends on the matrices. With the rig fixed:

* the current key frame's frustum-to-BEV mapping is a constant: its ranks are
  computed once, by the release's own geometry code on the rig's matrices, and one
  ``deploykit::BEVPool`` node pools depth x context without building the frustum;
* the previous key frame's depth and context are what this engine returned for it
  (``key_depth``, ``key_context``); only its cells change, with the ego motion, so they
  are computed in the graph from the constant camera-frame frustum and the
  ``ego_motion`` input (previous key ego -> current key ego, per camera), by the same
  matrix products and truncation as the release, and pooled by a second BEVPool node
  in its unsorted mode. On a scene's first frame (``use_prev`` 0) the release fuses the
  frame with itself: the engine reuses the current BEV.

    inputs   img (1, N, 3, H, W); with 2 keys also prev_depth (1, N, D, fH, fW),
             prev_context (1, N, fH, fW, C), ego_motion (1, N, 4, 4), use_prev (1,)
    outputs  the head maps; with 2 keys also key_depth, key_context (the next frame's
             prev_depth / prev_context)
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ...errors import RigError
from ...ops.bev_pool import bev_pool, prepare_ranks
from .depth_net import mlp_input
from .lss import camera_points, in_grid, to_cells
from .model import BEVDepth, head_output_names

RANK_NAMES = ("ranks_depth", "ranks_feat", "ranks_bev", "interval_starts", "interval_lengths")


class BEVPoolNode(nn.Module):
    """One ``deploykit::BEVPool`` node as a module, so quantization finds its float inputs
    (depth probabilities and context: what an NPU or plugin kernel reads in int8)."""

    def __init__(self, grid: tuple[int, int, int]):
        super().__init__()
        self.grid = grid

    def forward(self, depth, feat, ranks_depth, ranks_feat, ranks_bev, interval_starts, interval_lengths):
        ranks = dict(zip(RANK_NAMES, (ranks_depth, ranks_feat, ranks_bev, interval_starts, interval_lengths)))
        return bev_pool(depth, feat, ranks, self.grid)[:, :, 0]


def key_frame_cells(model: BEVDepth) -> torch.Tensor:
    """(1, N, D, fH, fW, 3) integer cells of the rig's key-frame frustum, computed by the
    release's get_geometry on the rig's matrices (as the original model computes them)."""
    lss = model.backbone
    with torch.no_grad():
        geom = lss.get_geometry(model.rig_sensor2ego[:, 0], model.rig_intrin[:, 0], model.rig_ida[:, 0],
                                model.rig_bda)
        return lss.cells(geom)


def collapse_z(cells: np.ndarray, voxel_num) -> np.ndarray:
    """BEVDepth sums the z cells of a column: keep z's bounds check, then z = 0."""
    out = cells.copy()
    off = (out[..., 2] < 0) | (out[..., 2] >= int(voxel_num[2]))
    out[..., 0][off] = -1
    out[..., 2] = 0
    return out


def camera_coverage(cells: np.ndarray, voxel_num) -> list[float]:
    """Per camera, the fraction of its frustum points that land in the BEV grid."""
    inside = in_grid(cells, voxel_num)
    return inside.reshape(inside.shape[1], -1).mean(axis=1).tolist()


class PreviousCells(nn.Module):
    """The previous key frame's frustum points' cells in the current grid, from the ego
    motion: get_geometry with sensor2ego = ego_motion @ the rig's camera -> ego (the
    matrix products and `.int()` truncation of the release), -1 where a point is off the
    grid. The points in camera coordinates (ida undone, lifted by depth) are constants."""

    def __init__(self, lss, rig_sensor2ego: torch.Tensor, rig_intrin: torch.Tensor, rig_ida: torch.Tensor):
        super().__init__()
        with torch.no_grad():
            points = camera_points(lss.frustum, rig_ida)  # (1, N, D, fH, fW, 4, 1)
        self.register_buffer("cam_points", points, persistent=False)
        self.register_buffer("sensor2ego", rig_sensor2ego.clone(), persistent=False)
        self.register_buffer("inv_intrin", torch.inverse(rig_intrin), persistent=False)
        for name in ("voxel_size", "voxel_coord"):
            self.register_buffer(name, getattr(lss, name).clone(), persistent=False)
        self.voxel_num = tuple(int(v) for v in lss.voxel_num)

    def forward(self, ego_motion: torch.Tensor) -> torch.Tensor:
        n = self.sensor2ego.shape[1]
        combine = ego_motion.matmul(self.sensor2ego).matmul(self.inv_intrin)
        points = combine.view(1, n, 1, 1, 1, 4, 4).matmul(self.cam_points).squeeze(-1)[..., :3]
        cells = to_cells(points, self.voxel_coord, self.voxel_size)
        x, y = cells[..., 0], cells[..., 1]
        inside = in_grid(cells, self.voxel_num)
        return torch.where(inside, y * self.voxel_num[0] + x, torch.full_like(x, -1)).reshape(-1).int()


class StreamingBEVDepth(nn.Module):
    def __init__(self, original: BEVDepth):
        super().__init__()
        cfg = self.cfg = original.cfg
        self.backbone, self.head = original.backbone, original.head
        for name in ("sensor2ego", "intrin", "ida", "bda"):
            self.register_buffer(f"rig_{name}", getattr(original, f"rig_{name}"), persistent=False)
        lss = self.backbone
        nx, ny, _ = (int(v) for v in lss.voxel_num)
        self.grid = (1, ny, nx)
        self.pool_key = BEVPoolNode(self.grid)
        cells = key_frame_cells(original).numpy()
        coverage = camera_coverage(cells, lss.voxel_num)
        if max(coverage) == 0:
            raise RigError(f"rig {cfg.rig}: no camera's frustum (depths {cfg.d_bound[0]}-{cfg.d_bound[1]} m) reaches "
                           f"the BEV grid x {cfg.x_bound[:2]}, y {cfg.y_bound[:2]}, z {cfg.z_bound[:2]}; check the "
                           "rig's extrinsics (camera -> LiDAR -> ego) and the recipe's bounds")
        self.camera_coverage = coverage
        for name, value in prepare_ranks(collapse_z(cells, lss.voxel_num), self.grid).items():
            self.register_buffer(name, torch.from_numpy(value), persistent=False)
        self.register_buffer("camera_mats", mlp_input(self.rig_intrin, self.rig_ida, self.rig_sensor2ego,
                                                      self.rig_bda), persistent=False)
        if cfg.keys == 2:
            self.prev_cells = PreviousCells(lss, self.rig_sensor2ego[:, 0], self.rig_intrin[:, 0], self.rig_ida[:, 0])
            _, n, d, h, w = self.prev_cells.cam_points.shape[:5]
            m = n * d * h * w
            pixel = (np.arange(n)[:, None, None] * (h * w) + np.arange(h * w).reshape(1, 1, h * w))
            pixel = np.broadcast_to(pixel.reshape(n, 1, h * w), (n, d, h * w)).reshape(-1)
            self.register_buffer("prev_ranks_depth", torch.arange(m, dtype=torch.int32), persistent=False)
            self.register_buffer("prev_ranks_feat", torch.from_numpy(pixel.astype(np.int32)), persistent=False)
            self.register_buffer("no_intervals", torch.zeros(0, dtype=torch.int32), persistent=False)
            self.pool_prev = BEVPoolNode(self.grid)

    @property
    def input_names(self) -> list[str]:
        return ["img"] + (["prev_depth", "prev_context", "ego_motion", "use_prev"] if self.cfg.keys == 2 else [])

    @property
    def output_names(self) -> list[str]:
        return head_output_names(self.cfg) + (["key_depth", "key_context"] if self.cfg.keys == 2 else [])

    def key_frame_state(self, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(depth (1, N, D, fH, fW), context (1, N, fH, fW, C)) of one frame's images: what
        BEVPool takes, and what the next frame's engine call takes as prev_*."""
        depth, context = self.backbone(img, self.camera_mats)
        n = img.shape[1]
        depth = depth.reshape(1, n, *depth.shape[1:])
        context = context.reshape(1, n, *context.shape[1:]).permute(0, 1, 3, 4, 2)
        return depth, context

    def forward(self, img, prev_depth=None, prev_context=None, ego_motion=None, use_prev=None):
        depth, context = self.key_frame_state(img)
        bev = self.pool_key(depth, context, *(getattr(self, n) for n in RANK_NAMES))
        if self.cfg.keys == 1:
            return tuple(self.head(bev))
        pooled = self.pool_prev(prev_depth, prev_context, self.prev_ranks_depth, self.prev_ranks_feat,
                                self.prev_cells(ego_motion), self.no_intervals, self.no_intervals)
        prev = torch.where(use_prev.view(1, 1, 1, 1) > 0.5, pooled, bev)
        return (*self.head(torch.cat([bev, prev], 1)), depth, context)
