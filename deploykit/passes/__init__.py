"""Rewrite passes: each a function ``apply(model) -> model``.

A pass returns a rewritten deep copy and never mutates its input, so the
original model stays available as the reference the rewrite is checked
against. Passes find their targets by module type anywhere in the model, so
the same pass serves CenterPoint alone and the LiDAR stream inside BEVFusion.
The table below is the only place that maps recipe names to passes.
"""

from __future__ import annotations

from typing import Callable, Iterable

from torch import nn

from ..errors import RecipeError
from . import (bev_pool_op, camera_mlp_fold, decorate_in_graph, deform_conv_op, max_to_maxpool, msda_op,
               normalise_points, pfn_linear_to_conv, pillar_scatter_op, pillars_on_w, sca_virtual_bev, tsa_mean_to_conv)

Pass = Callable[[nn.Module], nn.Module]

PASSES: dict[str, Pass] = {
    "pfn_linear_to_conv": pfn_linear_to_conv.apply,
    "max_to_maxpool": max_to_maxpool.apply,
    "pillars_on_w": pillars_on_w.apply,
    "pillar_scatter_op": pillar_scatter_op.apply,
    "normalise_points": normalise_points.apply,
    "decorate_in_graph": decorate_in_graph.apply,
    "tsa_mean_to_conv": tsa_mean_to_conv.apply,
    "sca_virtual_bev": sca_virtual_bev.apply,
    "msda_op": msda_op.apply,
    "camera_mlp_fold": camera_mlp_fold.apply,
    "bev_pool_op": bev_pool_op.apply,
    "deform_conv_op": deform_conv_op.apply,
}


def apply_passes(model: nn.Module, names: Iterable[str]) -> nn.Module:
    for name in names:
        if name not in PASSES:
            import difflib

            close = difflib.get_close_matches(name, PASSES, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"known passes: {', '.join(PASSES)}"
            raise RecipeError(f"unknown pass '{name}'; {hint}")
        model = PASSES[name](model)
    return model
