"""Fold BatchNorm into the convolution before it, ahead of quantization.

An int8 accelerator runs conv + BN as one conv whose weights are the folded
ones, so those are the weights to quantize (per output channel); quantizing the
unfolded weights would calibrate ranges the hardware never sees, and the Q/DQ
graph would keep BN between a conv and its output, which blocks int8 fusion.
Pairs are found in ``nn.Sequential`` containers (conv then BN) and, for the
modules that keep them as named attributes, from the explicit table below.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def _pairs() -> dict[type, tuple[tuple[str, str], ...]]:
    from ..models.centerpoint_pillar import ConvModule
    from ..models.resnet import Bottleneck, ResNet
    from ..passes.pfn_linear_to_conv import ConvPFNLayer

    return {
        Bottleneck: (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")),
        ResNet: (("conv1", "bn1"),),
        ConvModule: (("conv", "bn"),),
        ConvPFNLayer: (("conv", "norm"),),
    }


@torch.no_grad()
def fold(conv: nn.Module, bn: nn.BatchNorm2d) -> None:
    """Fold ``bn`` into ``conv`` in place (Conv2d, or ConvTranspose2d with groups=1)."""
    factor = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    if isinstance(conv, nn.ConvTranspose2d):
        if conv.groups != 1:
            raise ValueError("folding BN into a grouped ConvTranspose2d is not supported")
        conv.weight.mul_(factor.view(1, -1, 1, 1))
    else:
        conv.weight.mul_(factor.view(-1, *([1] * (conv.weight.dim() - 1))))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    new_bias = (bias - bn.running_mean) * factor + bn.bias
    if conv.bias is None:
        conv.bias = nn.Parameter(new_bias)
    else:
        conv.bias.copy_(new_bias)


def fold_batchnorms(model: nn.Module) -> tuple[nn.Module, int]:
    """A deep copy of ``model`` with every conv + BN pair folded; returns (model, pairs folded)."""
    model = copy.deepcopy(model).eval()
    pairs = _pairs()
    folded = 0
    for module in list(model.modules()):
        if isinstance(module, nn.Sequential):
            items = list(module._modules.items())
            for (_, a), (name_b, b) in zip(items, items[1:]):
                if isinstance(a, (nn.Conv2d, nn.ConvTranspose2d)) and type(b) is nn.BatchNorm2d:
                    fold(a, b)
                    module._modules[name_b] = nn.Identity()
                    folded += 1
        for conv_attr, bn_attr in pairs.get(type(module), ()):
            bn = getattr(module, bn_attr)
            if type(bn) is nn.BatchNorm2d:
                fold(getattr(module, conv_attr), bn)
                setattr(module, bn_attr, nn.Identity())
                folded += 1
    return model, folded
