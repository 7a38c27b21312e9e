"""``torch.max`` over a pillar's points -> ``MaxPool2d`` with a (1, N) kernel.

A reduction over one axis of a 4-D tensor exports as ReduceMax, which many NPU
compilers run on a slow path or not at all; a pooling window covering the
points axis is the same maximum in an op every accelerator has.
"""

from __future__ import annotations

import copy

from torch import nn

from ..errors import RecipeError
from .pfn_linear_to_conv import ConvPFNLayer

NAME = "max_to_maxpool"


def apply(model: nn.Module) -> nn.Module:
    model = copy.deepcopy(model)
    layers = [m for m in model.modules() if isinstance(m, ConvPFNLayer) and m.reduce == "max"]
    if not layers:
        raise RecipeError(
            f"pass '{NAME}' found no convolutional PFN with a max reduction; "
            "run 'pfn_linear_to_conv' before it"
        )
    for layer in layers:
        layer.reduce = "maxpool"
    return model
