"""Triton plugin for ``deploykit::MultiScaleDeformableAttn`` (issue 16).

- ``launch`` / ``launch_int8`` (plugins.msda.triton_kernel): the kernel's
  launchers, fp32/fp16 and fused int8 (dequantized in the kernel).
- ``torch.ops.deploykit.msda`` / ``torch.ops.deploykit.msda_int8``
  (plugins.msda.torch_op, registered when this package is imported): the same
  as PyTorch custom ops, Triton on CUDA, deploykit's reference on CPU unless
  TRITON_INTERPRET=1.

Importing the package does not import triton; ``launch`` and ``launch_int8``
are loaded from triton_kernel on first access.
"""

from __future__ import annotations

from . import torch_op
from .torch_op import msda, msda_int8

__all__ = ["launch", "launch_int8", "msda", "msda_int8", "torch_op"]


def __getattr__(name):
    if name in ("launch", "launch_int8"):
        from . import triton_kernel

        return getattr(triton_kernel, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
