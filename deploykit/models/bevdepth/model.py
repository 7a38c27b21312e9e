"""BEVDepth (Megvii-BaseDetection/BEVDepth ``BaseBEVDepth``) as released.

    forward(sweep_imgs (B, K, N, 3, H, W), sensor2ego_mats (B, K, N, 4, 4),
            intrin_mats (B, K, N, 4, 4), ida_mats (B, K, N, 4, 4), bda_mat (B, 4, 4))
      -> per task: reg, height, dim, rot, vel, heatmap (B, *, 128, 128)

K key frames (2: the current one, then the previous key frame, whose
sensor2ego_mats take its cameras into the *current* ego frame, as BEVDepth's dataset
builds them). Every key frame goes through the image backbone, DepthNet (with the
current frame's camera-aware input, as the release does) and voxel pooling; the
BEVs are concatenated along channels for the head. This is the *original* model,
with the matrices as inputs and a pooling whose point count depends on them; the
passes in deploykit.passes turn it into a static engine for a fixed rig.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .config import BEVDepthConfig
from .depth_net import mlp_input
from .head import BEVDepthHead
from .lss import LSSFPN, in_grid


class BEVDepth(nn.Module):
    def __init__(self, cfg: BEVDepthConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = LSSFPN(cfg)
        self.head = BEVDepthHead(cfg)
        mats = rig_mats(cfg)
        for name, value in mats.items():
            # The rig the engine will be fixed to; not checkpoint keys.
            self.register_buffer(f"rig_{name}", torch.from_numpy(value), persistent=False)

    input_names = ["sweep_imgs", "sensor2ego_mats", "intrin_mats", "ida_mats", "bda_mat"]

    @property
    def output_names(self) -> list[str]:
        return head_output_names(self.cfg)

    def rig_coverage(self) -> dict[str, float]:
        """Fraction of the BEV grid's cells each camera's frustum reaches (the rig's key frame)."""
        from ...camera.rig import load_rig
        from .streaming import key_frame_cells

        cells = key_frame_cells(self).numpy()[0]  # (N, D, H, W, 3)
        nx, ny, _ = (int(v) for v in self.backbone.voxel_num)
        out = {}
        for cam, c in zip(load_rig(self.cfg.rig).names, cells):
            c = c.reshape(-1, 3)[in_grid(c.reshape(-1, 3), self.backbone.voxel_num)]
            out[cam] = len(np.unique(c[:, 1] * nx + c[:, 0])) / (nx * ny)
        return out

    def key_frame_bev(self, imgs, sensor2ego, intrin, ida, bda, camera_mats) -> torch.Tensor:
        """One key frame's pooled BEV (B, C, Y, X): (B, N, 3, H, W) images, its (B, N, 4, 4)
        matrices, and the camera-aware vector DepthNet takes (the current frame's)."""
        lss = self.backbone
        depth, context = lss(imgs, camera_mats)
        cells = lss.cells(lss.get_geometry(sensor2ego, intrin, ida, bda))
        return lss.voxel_pooling(cells, depth, context)

    def forward(self, sweep_imgs, sensor2ego_mats, intrin_mats, ida_mats, bda_mat):
        if sweep_imgs.shape[1] != self.cfg.keys:
            raise ValueError(f"sweep_imgs holds {sweep_imgs.shape[1]} key frames, the recipe fuses {self.cfg.keys}")
        camera_mats = mlp_input(intrin_mats, ida_mats, sensor2ego_mats, bda_mat)
        bevs = [self.key_frame_bev(sweep_imgs[:, k], sensor2ego_mats[:, k], intrin_mats[:, k], ida_mats[:, k],
                                   bda_mat, camera_mats) for k in range(self.cfg.keys)]
        return tuple(self.head(torch.cat(bevs, 1) if len(bevs) > 1 else bevs[0]))


def head_output_names(cfg: BEVDepthConfig) -> list[str]:
    heads = [*cfg.head.common_heads, "heatmap"]
    return [f"task{t}.{h}" for t in range(len(cfg.head.tasks)) for h in heads]


def rig_mats(cfg: BEVDepthConfig) -> dict[str, np.ndarray]:
    """The key frame's matrices for the recipe's rig, as BEVDepth's test-time dataset
    builds them: (1, 1, N, 4, 4) sensor2ego (camera -> ego), intrin, ida (resize by
    image_scale, crop image_crop) and a (1, 4, 4) identity bda (no BEV augmentation)."""
    from ...camera.rig import load_rig
    from ...errors import RigError

    rig = load_rig(cfg.rig)
    if len(rig.cameras) != cfg.num_cams:
        raise RigError(f"rig {rig.name} has {len(rig.cameras)} cameras, the recipe's num_cams is {cfg.num_cams}")
    if rig.lidar2ego is None:
        raise RigError(f"rig {rig.name} has no lidar2ego_rotation / lidar2ego_translation: BEVDepth predicts in the "
                       "ego frame; add the LiDAR's mounting to the rig (nuScenes: LIDAR_TOP's calibrated_sensor, or "
                       "`deploykit rig --from-nuscenes`), or an identity if the cameras are given relative to the ego")
    s2e, intrin = [], []
    for cam in rig.cameras:
        s2l = np.eye(4)
        s2l[:3, :3], s2l[:3, 3] = cam.sensor2lidar_rotation, cam.sensor2lidar_translation
        s2e.append(rig.lidar2ego @ s2l)
        k = np.eye(4)
        k[:3, :3] = cam.intrinsic
        intrin.append(k)
    ida = np.eye(4)
    ida[0, 0] = ida[1, 1] = cfg.image_scale
    ida[0, 3], ida[1, 3] = -cfg.image_crop[1], -cfg.image_crop[0]
    n = cfg.num_cams
    f32 = np.float32
    return {"sensor2ego": np.stack(s2e)[None, None].astype(f32), "intrin": np.stack(intrin)[None, None].astype(f32),
            "ida": np.broadcast_to(ida, (1, 1, n, 4, 4)).astype(f32), "bda": np.eye(4, dtype=f32)[None]}
