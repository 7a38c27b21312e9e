"""BEVDepth's voxel pooling -> ``deploykit::BEVPool`` nodes on a fixed rig.

The release pools a frustum whose size depends on the matrices (a CUDA op ONNX
cannot export) and re-runs the previous key frame's images every call. The pass
builds deploykit.models.bevdepth.StreamingBEVDepth: the current frame's ranks are
constants, the previous key frame's depth and context are cached engine outputs,
and only their cells are computed per frame from the ego motion.
"""

from __future__ import annotations

import copy

from torch import nn

from ..errors import RecipeError
from ..models.bevdepth import BEVDepth, StreamingBEVDepth

NAME = "bev_pool_op"


def apply(model: nn.Module) -> nn.Module:
    if type(model) is not BEVDepth:
        raise RecipeError(f"pass '{NAME}' rewrites a BEVDepth model's voxel pooling; got {type(model).__name__} "
                          "(already converted, or not a bevdepth model?)")
    return StreamingBEVDepth(copy.deepcopy(model))
