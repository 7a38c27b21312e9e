"""PillarFeatureNet's point decoration as a network layer, for engines that decorate in the graph.

mmdet3d decorates each pillar's points in PyTorch before its PFN layers (cluster-centre
offsets, voxel-centre offsets, optional distance, zeroed padding slots); a deployment that
does this on the host spends more time on it than on voxelizing (the nuScenes CenterPoint:
85 ms of host numpy per sweep). As a layer of the exported graph it is a few elementwise
ops on static shapes that the engine runs where the rest of the network runs, and the host
only voxelizes and pads. The arithmetic is mmdet3d's, in float32, in the order
deploykit.preprocess.voxelize.decorate uses (which the tests check against a transcription
of mmdet3d), legacy quirk included.

Input: the raw padded voxel features in the encoder's layout (PNC, CPN or CNP, see
deploykit.passes.pfn_linear_to_conv), the number of real points of each pillar (P,) int32
(0 for padding pillars) and the pillar coordinates (P, 4) [batch, z, y, x]; output: the
decorated pillars in the same layout, divided by the encoder's ``input_scale`` when
normalise_points folded one into it.
"""

from __future__ import annotations

import torch
from torch import nn

# (channel axis, points axis, pillar axis) of each layout's tensor
AXES = {"PNC": (2, 1, 0), "CPN": (1, 3, 2), "CNP": (1, 2, 3)}


class PillarDecoration(nn.Module):
    def __init__(self, cfg):
        """``cfg``: a LiDAR stream config (voxelization, pillar_encoder)."""
        super().__init__()
        enc, v = cfg.pillar_encoder, cfg.voxelization
        self.with_cluster_center, self.with_voxel_center = enc.with_cluster_center, enc.with_voxel_center
        self.with_distance, self.legacy = enc.with_distance, enc.legacy
        size, lo = v.voxel_size, v.point_cloud_range
        # Python-float offsets rounded to float32 once, as torch does with mmdet3d's scalars.
        self.register_buffer("voxel_size", torch.tensor(size, dtype=torch.float32), persistent=False)
        self.register_buffer("offset", torch.tensor([size[i] / 2 + lo[i] for i in range(3)], dtype=torch.float32),
                             persistent=False)

    def forward(self, raw: torch.Tensor, num_points: torch.Tensor, coords: torch.Tensor, layout: str,
                scale: torch.Tensor | None = None) -> torch.Tensor:
        ch, pt, pl = AXES[layout]
        ndim = raw.dim()

        def along(t: torch.Tensor, axes: tuple[int, ...]) -> torch.Tensor:
            """``t`` (one dim per axis in ``axes``) shaped to broadcast against the pillar tensor."""
            shape = [1] * ndim
            for axis, n in zip(axes, t.shape):
                shape[axis] = n
            order = sorted(range(len(axes)), key=lambda k: axes[k])
            return t.permute(*order).reshape(shape)

        # Counts and cell indices in float: exact below 2**24, and no integer ops for an engine to run.
        count = along(num_points.to(raw.dtype), (pl,))
        xyz = raw.narrow(ch, 0, 3)
        blocks = [raw]
        if self.with_cluster_center:
            # Padding pillars have no points: divide by 1 there (their rows are zeroed below).
            blocks.append(xyz - xyz.sum(dim=pt, keepdim=True) / count.clamp(min=1))
        if self.with_voxel_center:
            cells_xyz = coords[:, [3, 2, 1]].to(raw.dtype)  # [batch, z, y, x] -> [x, y, z]
            centre = along(cells_xyz * self.voxel_size + self.offset, (pl, ch))
            offsets = xyz - centre
            if self.legacy:  # mmdet3d writes the offsets into the raw x, y, z in place
                raw = torch.cat([offsets, raw.narrow(ch, 3, raw.shape[ch] - 3)], dim=ch)
                xyz, blocks[0] = offsets, raw
            blocks.append(offsets)
        if self.with_distance:
            blocks.append(torch.sqrt((xyz * xyz).sum(dim=ch, keepdim=True)))
        decorated = torch.cat(blocks, dim=ch)
        slots = torch.arange(raw.shape[pt], dtype=raw.dtype, device=raw.device)
        decorated = decorated * (along(slots, (pt,)) < count).to(decorated.dtype)
        if scale is not None:
            decorated = decorated / along(scale.to(decorated.dtype), (ch,))
        return decorated
