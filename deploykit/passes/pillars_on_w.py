"""Move the long pillar axis to W: 1 x C x P x N -> 1 x C x N x P.

With 40000 pillars and 20 points, 1x5x40000x20 puts a huge axis on H and a
tiny one on W; NPU and GPU convolution kernels tile along W, so 1x5x20x40000
keeps vector lanes full. The weights do not change: only where the points
axis lives, and so the pooling window (N, 1) instead of (1, N).
"""

from __future__ import annotations

import copy

from torch import nn

from ..errors import RecipeError
from .pfn_linear_to_conv import ConvPFNLayer

NAME = "pillars_on_w"


def apply(model: nn.Module) -> nn.Module:
    model = copy.deepcopy(model)
    layers = [m for m in model.modules() if isinstance(m, ConvPFNLayer) and m.points_axis == 3]
    if not layers:
        raise RecipeError(
            f"pass '{NAME}' found no convolutional PFN with points on W; "
            "run 'pfn_linear_to_conv' before it (and only once)"
        )
    for layer in layers:
        layer.points_axis = 2
    return model
