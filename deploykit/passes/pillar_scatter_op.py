"""Index-assignment scatter -> one ``deploykit::PillarScatter`` node.

Exported as is, mmdet3d's scatter becomes a chain of Where/Mul/Add/ScatterND
nodes over a flattened canvas that TensorRT and NPU compilers cannot map to
anything fast; a single custom node binds to one plugin instead.
"""

from __future__ import annotations

from torch import nn

from ..models.centerpoint_pillar import PointPillarsScatter
from ..ops.pillar_scatter import PillarScatter
from .common import replace_modules

NAME = "pillar_scatter_op"


def apply(model: nn.Module) -> nn.Module:
    return replace_modules(
        model, PointPillarsScatter, lambda m: PillarScatter(m.in_channels, m.ny, m.nx),
        NAME, "the model has no index-assignment pillar scatter (already converted?)",
    )
