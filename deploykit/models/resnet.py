"""ResNet (Bottleneck, "pytorch" style) with mmdet's module names, and mmdet's BasicBlock.

Key names match mmdet's ``ResNet`` (``conv1``, ``bn1``, ``layer1.0.conv2``,
``layer1.0.downsample.0`` ...) and therefore torchvision's, so BEVFormer's
``img_backbone.*`` weights load 1:1. Written out here because torchvision is
not a dependency. ``stage_blocks`` and ``base_channels`` default to ResNet-50;
smaller values give test layouts with the same structure.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .layers import Add

DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


@dataclass(frozen=True)
class ResNetConfig:
    depth: int = 50
    # Overrides the depth's block counts (test layouts); empty means "from depth".
    stage_blocks: tuple[int, ...] = ()
    base_channels: int = 64
    out_indices: tuple[int, ...] = (3,)

    def __post_init__(self):
        if not self.stage_blocks and self.depth not in DEPTHS:
            raise ValueError(f"depth {self.depth} is not a Bottleneck ResNet; use one of {sorted(DEPTHS)}")
        if len(self.blocks) != 4 or min(self.blocks) < 1:
            raise ValueError("stage_blocks needs four positive block counts")
        if not self.out_indices or any(i not in range(4) for i in self.out_indices):
            raise ValueError("out_indices must name stages 0..3")

    @property
    def blocks(self) -> tuple[int, ...]:
        return self.stage_blocks or DEPTHS[self.depth]

    @property
    def out_channels(self) -> tuple[int, ...]:
        return tuple(self.base_channels * 2 ** i * Bottleneck.expansion for i in self.out_indices)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int, downsample: nn.Module | None):
        super().__init__()
        # "pytorch" style: the stride sits on the 3x3 conv (mmdet's default; "caffe" puts it on conv1).
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.residual = Add()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(self.residual(out, identity))


class BasicBlock(nn.Module):
    """mmdet's ResNet BasicBlock (conv1/bn1/conv2/bn2/downsample): ResNet-18/34, BEVDepth's
    DepthNet and BEV trunk."""

    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.residual = Add()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(self.residual(out, identity))


class ResNet(nn.Module):
    def __init__(self, cfg: ResNetConfig):
        super().__init__()
        self.cfg = cfg
        base = cfg.base_channels
        self.conv1 = nn.Conv2d(3, base, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(base)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_channels = base
        for i, blocks in enumerate(cfg.blocks):
            planes = base * 2 ** i
            stride = 1 if i == 0 else 2
            downsample = nn.Sequential(
                nn.Conv2d(in_channels, planes * Bottleneck.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * Bottleneck.expansion),
            )
            layers = [Bottleneck(in_channels, planes, stride, downsample)]
            in_channels = planes * Bottleneck.expansion
            layers += [Bottleneck(in_channels, planes, 1, None) for _ in range(blocks - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*layers))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        outs = []
        for i in range(4):
            x = getattr(self, f"layer{i + 1}")(x)
            if i in self.cfg.out_indices:
                outs.append(x)
        return outs
