"""mmcv's deformable convs -> ``deploykit::DeformConv`` nodes instead of ONNX DeformConv.

By default a DCN exports as the standard ``ai.onnx::DeformConv`` (opset 19), which
ONNX Runtime runs fastest (benchmarks/results/deform_conv.md). Runtimes and NPU
toolchains without that operator get one custom node per DCN with this pass: a
plugin binds to it, and ``--standard-ops`` lowers it to GridSample + MatMul.
"""

from __future__ import annotations

import copy

from torch import nn

from ..errors import RecipeError
from ..ops.deform_conv import DeformConv2dPack, ModulatedDeformConv2dPack

NAME = "deform_conv_op"


def apply(model: nn.Module) -> nn.Module:
    model = copy.deepcopy(model)
    targets = [m for m in model.modules() if isinstance(m, (DeformConv2dPack, ModulatedDeformConv2dPack))
               and m.export_form != "custom"]
    if not targets:
        raise RecipeError(f"pass '{NAME}' found no deformable conv exporting as ONNX DeformConv (none in the "
                          "model, or already converted)")
    for m in targets:
        m.export_form = "custom"
    return model
