"""Small helpers shared by the passes."""

from __future__ import annotations

import copy

from torch import nn

from ..errors import RecipeError


def replace_modules(model: nn.Module, kind: type, rewrite, pass_name: str, needs: str) -> nn.Module:
    """Deep-copy ``model`` and replace every submodule of type ``kind``.

    Raises a RecipeError saying what must run first when nothing matches, so a
    pass list in the wrong order fails loudly instead of doing nothing.
    """
    model = copy.deepcopy(model)
    targets = [(name, m) for name, m in model.named_modules() if type(m) is kind]
    if not targets:
        raise RecipeError(f"pass '{pass_name}' found no {kind.__name__} to rewrite; {needs}")
    for name, module in targets:
        new = rewrite(module)
        if name == "":
            return new
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
    return model


def stream_config(model: nn.Module, pass_name: str):
    """The LiDAR stream config (deploykit.models.lidar_config) of a CenterPoint or BEVFusion model."""
    from ..models import lidar_config

    for attr in ("cfg", "config"):
        cfg = lidar_config(getattr(model, attr, None))
        if cfg is not None:
            return cfg
    raise RecipeError(f"pass '{pass_name}' needs a model with a LiDAR stream config")
