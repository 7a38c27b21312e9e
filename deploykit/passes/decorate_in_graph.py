"""Move PillarFeatureNet's point decoration from the host into the network.

The original model (and mmdet3d) takes pillars already decorated with cluster-centre and
voxel-centre offsets; this pass gives the LiDAR stream a PillarDecoration layer
(deploykit.models.pillar_decoration), so the exported graph takes the raw padded voxels,
their point counts (``num_points``, a new input) and the coordinates, and the host only
voxelizes. The decoration reads the PFN's layout and normalisation scale when it runs, so
the pass may sit anywhere in the pass list. The output is the original model's to float32
rounding (a sum over a pillar's points in another order); engines exported without the
pass keep their decorated input contract, which the manifest records.
"""

from __future__ import annotations

import copy

from torch import nn

from ..errors import RecipeError
from ..models.pillar_decoration import PillarDecoration
from .common import stream_config

NAME = "decorate_in_graph"


def apply(model: nn.Module) -> nn.Module:
    if not hasattr(model, "pts_pillar_decoration"):
        raise RecipeError(f"pass '{NAME}' needs a model with a pillar LiDAR stream (CenterPoint, BEVFusion)")
    if model.pts_pillar_decoration is not None:
        raise RecipeError(f"pass '{NAME}' already ran on this model; list it once")
    model = copy.deepcopy(model)
    model.pts_pillar_decoration = PillarDecoration(stream_config(model, NAME))
    return model


def decorates_in_graph(model: nn.Module | None) -> bool:
    return getattr(model, "pts_pillar_decoration", None) is not None
