"""BEVDepth's DepthNet: the camera-aware depth and context branches.

Module names and forward math follow ``bevdepth/layers/backbones/base_lss_fpn.py``
(``reduce_conv``, ``context_conv``, ``bn``, ``depth_mlp``, ``depth_se``,
``context_mlp``, ``context_se``, ``depth_conv`` = 3 BasicBlocks, ASPP, DCN, 1x1
conv) so the release's ``backbone.depth_net.*`` keys load 1:1. The camera-aware
input is BEVDepth's 27-vector per camera: fx, fy, cx, cy, six image-augmentation
(ida) and five BEV-augmentation (bda) entries, and the 3x4 sensor-to-ego matrix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...ops.deform_conv import DeformConv2dPack
from ..layers import Concat
from ..resnet import BasicBlock

MLP_INPUTS = 27


class _ASPPModule(nn.Module):
    def __init__(self, inplanes: int, planes: int, kernel_size: int, padding: int, dilation: int):
        super().__init__()
        self.atrous_conv = nn.Conv2d(inplanes, planes, kernel_size, stride=1, padding=padding, dilation=dilation,
                                     bias=False)
        self.bn = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.atrous_conv(x)))


class ASPP(nn.Module):
    def __init__(self, inplanes: int, mid_channels: int = 256):
        super().__init__()
        self.aspp1 = _ASPPModule(inplanes, mid_channels, 1, padding=0, dilation=1)
        self.aspp2 = _ASPPModule(inplanes, mid_channels, 3, padding=6, dilation=6)
        self.aspp3 = _ASPPModule(inplanes, mid_channels, 3, padding=12, dilation=12)
        self.aspp4 = _ASPPModule(inplanes, mid_channels, 3, padding=18, dilation=18)
        self.global_avg_pool = nn.Sequential(nn.AdaptiveAvgPool2d((1, 1)),
                                             nn.Conv2d(inplanes, mid_channels, 1, stride=1, bias=False),
                                             nn.BatchNorm2d(mid_channels), nn.ReLU())
        self.conv1 = nn.Conv2d(int(mid_channels * 5), mid_channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_channels)
        self.relu = nn.ReLU()
        self.dropout = nn.Dropout(0.5)
        self.concat = Concat(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2, x3, x4 = self.aspp1(x), self.aspp2(x), self.aspp3(x), self.aspp4(x)
        x5 = self.global_avg_pool(x)
        # Bilinear from 1x1 with align_corners is a broadcast; kept as the release writes it.
        x5 = F.interpolate(x5, size=x4.size()[2:], mode="bilinear", align_corners=True)
        return self.dropout(self.relu(self.bn1(self.conv1(self.concat(x1, x2, x3, x4, x5)))))


class Mlp(nn.Module):
    def __init__(self, in_features: int, hidden_features: int, out_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.ReLU()
        self.drop1 = nn.Dropout(0.0)
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop2 = nn.Dropout(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class SELayer(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv_reduce = nn.Conv2d(channels, channels, 1, bias=True)
        self.act1 = nn.ReLU()
        self.conv_expand = nn.Conv2d(channels, channels, 1, bias=True)
        self.gate = nn.Sigmoid()

    def gate_of(self, x_se: torch.Tensor) -> torch.Tensor:
        """The per-camera channel gate (N, C, 1, 1) from the camera-aware vector."""
        return self.gate(self.conv_expand(self.act1(self.conv_reduce(x_se))))

    def forward(self, x: torch.Tensor, x_se: torch.Tensor) -> torch.Tensor:
        return x * self.gate_of(x_se)


def mlp_input(intrin_mats, ida_mats, sensor2ego_mats, bda_mat) -> torch.Tensor:
    """BEVDepth's camera-aware vector (B * N, 27) of the key frame (sweep 0) of
    (B, S, N, 4, 4) matrices and a (B, 4, 4) bda, as DepthNet.forward builds it."""
    intrins = intrin_mats[:, 0:1, ..., :3, :3]
    batch_size, num_cams = intrins.shape[0], intrins.shape[2]
    ida = ida_mats[:, 0:1, ...]
    sensor2ego = sensor2ego_mats[:, 0:1, ..., :3, :]
    bda = bda_mat.view(batch_size, 1, 1, 4, 4).repeat(1, 1, num_cams, 1, 1)
    entries = [intrins[..., 0, 0], intrins[..., 1, 1], intrins[..., 0, 2], intrins[..., 1, 2],
               ida[..., 0, 0], ida[..., 0, 1], ida[..., 0, 3], ida[..., 1, 0], ida[..., 1, 1], ida[..., 1, 3],
               bda[..., 0, 0], bda[..., 0, 1], bda[..., 1, 0], bda[..., 1, 1], bda[..., 2, 2]]
    vec = torch.cat([torch.stack(entries, dim=-1), sensor2ego.reshape(batch_size, 1, num_cams, -1)], -1)
    return vec.reshape(-1, vec.shape[-1])


class DepthNet(nn.Module):
    def __init__(self, in_channels: int, mid_channels: int, context_channels: int, depth_channels: int,
                 dcn_groups: int = 4):
        super().__init__()
        self.reduce_conv = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 3, stride=1, padding=1),
                                         nn.BatchNorm2d(mid_channels), nn.ReLU(inplace=True))
        self.context_conv = nn.Conv2d(mid_channels, context_channels, 1, stride=1, padding=0)
        self.bn = nn.BatchNorm1d(MLP_INPUTS)
        self.depth_mlp = Mlp(MLP_INPUTS, mid_channels, mid_channels)
        self.depth_se = SELayer(mid_channels)
        self.context_mlp = Mlp(MLP_INPUTS, mid_channels, mid_channels)
        self.context_se = SELayer(mid_channels)
        self.depth_conv = nn.Sequential(
            BasicBlock(mid_channels, mid_channels), BasicBlock(mid_channels, mid_channels),
            BasicBlock(mid_channels, mid_channels), ASPP(mid_channels, mid_channels),
            # mmcv's 'DCN' (DeformConv2dPack, v1), im2col_step only batches its CUDA loop.
            DeformConv2dPack(mid_channels, mid_channels, 3, padding=1, groups=dcn_groups),
            nn.Conv2d(mid_channels, depth_channels, 1, stride=1, padding=0),
        )

    def camera_gates(self, mats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(context gate, depth gate), each (B * N, mid, 1, 1), from the (B * N, 27) vector."""
        vec = self.bn(mats)
        context = self.context_se.gate_of(self.context_mlp(vec)[..., None, None])
        depth = self.depth_se.gate_of(self.depth_mlp(vec)[..., None, None])
        return context, depth

    def forward(self, x: torch.Tensor, mats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(depth logits, context): the two halves of the release's output, which it
        concatenates only to split again (a concat would give both one int8 scale)."""
        return gated_branches(self, x, *self.camera_gates(mats))


def gated_branches(net, x, context_gate, depth_gate) -> tuple[torch.Tensor, torch.Tensor]:
    x = net.reduce_conv(x)
    return net.depth_conv(x * depth_gate), net.context_conv(x * context_gate)


class FoldedDepthNet(nn.Module):
    """DepthNet for a fixed rig (the camera_mlp_fold pass): the camera-aware MLP and SE
    gates evaluated once into per-camera constants, so the engine has no matrix inputs.
    Holds the same convolutions under the same names, so the weights file still maps
    to the release's keys (less the folded bn / mlp / se-conv ones)."""

    def __init__(self, net: DepthNet, mats: torch.Tensor):
        super().__init__()
        self.reduce_conv, self.context_conv, self.depth_conv = net.reduce_conv, net.context_conv, net.depth_conv
        with torch.no_grad():
            context, depth = net.eval().camera_gates(mats)
        self.register_buffer("context_gate", context.detach().clone())
        self.register_buffer("depth_gate", depth.detach().clone())

    def forward(self, x: torch.Tensor, mats=None) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ARG002
        return gated_branches(self, x, self.context_gate, self.depth_gate)
