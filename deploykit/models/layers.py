"""Elementwise ops as parameter-free modules.

A residual add or a feature concat written inline (``a + b``, ``torch.cat``)
is invisible to module-based tooling; as a module, quantization can put one
shared quantizer on all its inputs (int8 add/concat need a common scale, as
TensorRT and NPU compilers require). They hold no weights, so checkpoints and
exported graphs are unchanged.
"""

from __future__ import annotations

import torch
from torch import nn


class Add(nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b


class Concat(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return torch.cat(xs, dim=self.dim)
