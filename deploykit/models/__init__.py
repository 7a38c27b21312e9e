"""The architectures deploykit can build, in one explicit table.

A recipe's ``[model] arch = "..."`` picks an entry here; the entry says which
config dataclass validates the rest of the ``[model]`` table and which function
builds the PyTorch module from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from . import centerpoint_pillar


@dataclass(frozen=True)
class Architecture:
    config: type
    build: Callable[[Any], Any]
    # Checkpoint key prefixes that identify this architecture's weights; used
    # to tell a user which model a mismatching checkpoint belongs to.
    key_prefixes: tuple[str, ...]


ARCHITECTURES: dict[str, Architecture] = {
    "centerpoint_pillar": Architecture(
        config=centerpoint_pillar.CenterPointPillarConfig,
        build=centerpoint_pillar.CenterPointPillar,
        key_prefixes=("pts_voxel_encoder.", "pts_backbone.", "pts_neck.", "pts_bbox_head."),
    ),
}


def build_model(recipe) -> Any:
    return ARCHITECTURES[recipe.arch].build(recipe.model).eval()
