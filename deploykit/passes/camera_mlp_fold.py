"""BEVDepth's camera-aware MLP + SE gates -> per-camera constants.

DepthNet feeds 27 numbers per camera (intrinsics, image- and BEV-augmentation
entries, the camera-to-ego matrix) through BatchNorm1d, two MLPs and the SE layers'
1x1 convs to get one channel gate per camera for its depth and context branches.
With the rig fixed at export time those numbers are constants, so the gates are
evaluated once on the rig's matrices and the engine keeps only the multiply: no
matrix inputs, and no tiny MLP for a quantizer to calibrate.
"""

from __future__ import annotations

import copy

from torch import nn

from ..errors import RecipeError
from ..models.bevdepth.depth_net import DepthNet, FoldedDepthNet, mlp_input

NAME = "camera_mlp_fold"


def apply(model: nn.Module) -> nn.Module:
    model = copy.deepcopy(model)
    lss = getattr(model, "backbone", None)
    if not isinstance(getattr(lss, "depth_net", None), DepthNet) or not hasattr(model, "rig_sensor2ego"):
        raise RecipeError(f"pass '{NAME}' found no BEVDepth DepthNet with a rig to fold (already folded, or not a "
                          "bevdepth model?)")
    mats = mlp_input(model.rig_intrin, model.rig_ida, model.rig_sensor2ego, model.rig_bda)
    lss.depth_net = FoldedDepthNet(lss.depth_net, mats)
    return model
