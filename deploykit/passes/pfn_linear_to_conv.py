"""PFN ``Linear + BatchNorm1d + ReLU`` -> ``Conv2d(1x1) + BatchNorm2d + ReLU``.

NPUs and TensorRT run 4-D convolutions with folded batch norm far better than
a 3-D MatMul followed by a transposed BatchNorm1d. The pillar tensor becomes
an image: 1 x C x P x N (pillars on H, points on W); ``pillars_on_w`` then
moves the long pillar axis to W.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..models.centerpoint_pillar import PillarFeatureNet
from ..models.layers import Concat
from .common import replace_modules

NAME = "pfn_linear_to_conv"

# Layout names: dims after the batch dim. "CPN" = 1 x C x pillars x points.
LAYOUT_BY_POINTS_AXIS = {3: "CPN", 2: "CNP"}


class ConvPFNLayer(nn.Module):
    def __init__(self, conv: nn.Conv2d, norm: nn.BatchNorm2d, last_layer: bool, num_points: int):
        super().__init__()
        self.conv, self.norm = conv, norm
        self.last_vfe = last_layer
        self.num_points = num_points
        self.points_axis = 3
        self.reduce = "max"
        self.concat = Concat(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.norm(self.conv(x)))
        if self.reduce == "max":
            x_max = torch.amax(x, dim=self.points_axis, keepdim=True)
        else:
            kernel = (1, self.num_points) if self.points_axis == 3 else (self.num_points, 1)
            x_max = F.max_pool2d(x, kernel_size=kernel, stride=kernel)
        if self.last_vfe:
            return x_max
        return self.concat(x, x_max.expand_as(x))


class ConvPillarFeatureNet(nn.Module):
    """PFN on a 4-D pillar image; output (1, C, P) like every pillar encoder."""

    def __init__(self, layers: list[ConvPFNLayer]):
        super().__init__()
        self.pfn_layers = nn.ModuleList(layers)

    @property
    def input_layout(self) -> str:
        return LAYOUT_BY_POINTS_AXIS[self.pfn_layers[0].points_axis]

    def forward(self, pillars: torch.Tensor) -> torch.Tensor:
        x = pillars
        for pfn in self.pfn_layers:
            x = pfn(x)
        return x.flatten(2)


def _convert_layer(layer, num_points: int) -> ConvPFNLayer:
    lin, bn = layer.linear, layer.norm
    conv = nn.Conv2d(lin.in_features, lin.out_features, kernel_size=1, bias=False)
    conv.weight.data.copy_(lin.weight.data[:, :, None, None])
    norm = nn.BatchNorm2d(bn.num_features, eps=bn.eps, momentum=bn.momentum)
    norm.load_state_dict(bn.state_dict())
    return ConvPFNLayer(conv, norm, layer.last_vfe, num_points)


def _convert(net: PillarFeatureNet) -> ConvPillarFeatureNet:
    conv = ConvPillarFeatureNet([_convert_layer(layer, net.num_points) for layer in net.pfn_layers]).train(net.training)
    if getattr(net, "input_scale", None) is not None:  # normalise_points ran first: keep its input contract
        conv.register_buffer("input_scale", net.input_scale.clone(), persistent=False)
    return conv


def apply(model: nn.Module) -> nn.Module:
    return replace_modules(model, PillarFeatureNet, _convert, NAME,
                           "the model has no Linear pillar feature net (already converted?)")

