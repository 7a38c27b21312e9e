"""BEVDepthHead: mmdet ResNet trunk (no max-pool) + SECONDFPN + mmdet3d CenterHead.

Names follow the release (``head.trunk.conv1``, ``head.trunk.layer1.0.conv1``,
``head.neck.deblocks.0.0``, ``head.shared_conv.conv``, ``head.task_heads.0.heatmap.1``);
the forward is BEVDepthHead.forward: the trunk's input joins its outputs in the FPN.
"""

from __future__ import annotations

import torch
from torch import nn

from ..centerpoint_pillar import SECONDFPN, CenterHead
from ..resnet import BasicBlock
from .config import BEVDepthConfig


class Trunk(nn.Module):
    """mmdet ResNet with BasicBlocks, ``in_channels`` input and no max-pool."""

    def __init__(self, in_channels: int, cfg):
        super().__init__()
        base = cfg.base_channels
        self.conv1 = nn.Conv2d(in_channels, base, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(base)
        self.relu = nn.ReLU(inplace=True)
        inplanes = base
        for i, (blocks, stride) in enumerate(zip(cfg.stage_blocks, cfg.strides)):
            planes = base * 2 ** i
            downsample = None
            if stride != 1 or inplanes != planes:
                downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False),
                                           nn.BatchNorm2d(planes))
            layers = [BasicBlock(inplanes, planes, stride, downsample)]
            layers += [BasicBlock(planes, planes) for _ in range(blocks - 1)]
            inplanes = planes
            self.add_module(f"layer{i + 1}", nn.Sequential(*layers))
        self.num_stages = len(cfg.stage_blocks)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = [x]
        x = self.relu(self.bn1(self.conv1(x)))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
            outs.append(x)
        return outs


class BEVDepthHead(CenterHead):
    def __init__(self, cfg: BEVDepthConfig):
        super().__init__(sum(cfg.bev_neck.out_channels), cfg.head)
        self.trunk = Trunk(cfg.output_channels * cfg.keys, cfg.bev_backbone)
        self.neck = SECONDFPN(cfg.bev_neck_in_channels, cfg.bev_neck)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return super().forward(self.neck(self.trunk(x)))
