"""mmdet's FPN: lateral 1x1 convs, nearest top-down path, 3x3 output convs,
optional extra levels; key names ``lateral_convs.i.conv``, ``fpn_convs.i.conv``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class FPNConfig:
    out_channels: int = 256
    num_outs: int = 1
    # mmdet's add_extra_convs: "" (max-pool extra levels), "on_input" or "on_output".
    add_extra_convs: str = "on_output"
    relu_before_extra_convs: bool = True

    def __post_init__(self):
        if self.add_extra_convs not in ("", "on_input", "on_output"):
            raise ValueError("add_extra_convs must be '', 'on_input' or 'on_output'")


class ConvBias(nn.Module):
    """mmcv ConvModule without norm or activation: a biased conv under ``.conv``."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class FPN(nn.Module):
    def __init__(self, in_channels: tuple[int, ...], cfg: FPNConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.num_outs < len(in_channels):
            raise ValueError(f"FPN num_outs {cfg.num_outs} < {len(in_channels)} input levels")
        self.lateral_convs = nn.ModuleList(ConvBias(c, cfg.out_channels, 1) for c in in_channels)
        self.fpn_convs = nn.ModuleList(ConvBias(cfg.out_channels, cfg.out_channels, 3) for _ in in_channels)
        self.in_channels = tuple(in_channels)
        if cfg.add_extra_convs:
            for i in range(cfg.num_outs - len(in_channels)):
                c_in = in_channels[-1] if (i == 0 and cfg.add_extra_convs == "on_input") else cfg.out_channels
                self.fpn_convs.append(ConvBias(c_in, cfg.out_channels, 3, stride=2))

    def forward(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, inputs)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[2:],
                                                              mode="nearest")
        n = len(laterals)
        outs = [self.fpn_convs[i](laterals[i]) for i in range(n)]
        for i in range(n, self.cfg.num_outs):
            if not self.cfg.add_extra_convs:
                outs.append(F.max_pool2d(outs[-1], 1, stride=2))
            elif i == n:
                # mmdet applies relu_before_extra_convs only from the second extra level on.
                outs.append(self.fpn_convs[i](inputs[-1] if self.cfg.add_extra_convs == "on_input" else outs[-1]))
            else:
                outs.append(self.fpn_convs[i](F.relu(outs[-1]) if self.cfg.relu_before_extra_convs else outs[-1]))
        return outs
