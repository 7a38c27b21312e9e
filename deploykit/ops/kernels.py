"""deploykit's GPU kernels (plugins/, one torch.library op per custom op), where installed.

The op modules here define the semantics; plugins/<op>/torch_op.py registers a Triton
kernel for it as ``torch.ops.deploykit.<name>``. ``kernel(name)`` is that op, or None
where plugins/ or Triton is not installed, so a CUDA model runs the kernels when it
can and the PyTorch reference otherwise.
"""

from __future__ import annotations

import importlib
from functools import lru_cache

# deploykit op type -> the plugins/ folder (and torch.library name) of its kernel
KERNELS = {"PillarScatter": "pillar_scatter", "BEVPool": "bev_pool", "MultiScaleDeformableAttn": "msda",
           "DeformConv": "deform_conv"}


@lru_cache(maxsize=None)
def kernel(name: str):
    try:
        importlib.import_module(f"plugins.{name}.torch_op")
        import torch

        return getattr(torch.ops.deploykit, name)
    except (ImportError, AttributeError, RuntimeError):
        return None


def available_kernels() -> dict[str, bool]:
    """Op type -> whether its GPU kernel is installed here."""
    return {op: kernel(name) is not None for op, name in KERNELS.items()}


def forward(name: str, reference, *args):
    """An op's forward: its GPU kernel where the inputs are on CUDA and the kernel is
    installed, else ``reference`` (the semantics every backend matches)."""
    first = args[0]
    if getattr(first, "is_cuda", False):
        op = kernel(name)
        if op is not None:
            return op(*args)
    return reference(*args)
