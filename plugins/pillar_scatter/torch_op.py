"""``torch.ops.deploykit.pillar_scatter``: PillarScatter as a PyTorch custom op.

Schema: ``deploykit::pillar_scatter(Tensor features, Tensor coords, int height, int width) -> Tensor``
(features (1, C, P) fp32/fp16, coords (P, 4) int32/int64; canvas (1, C, height, width) in
features' dtype, contiguous).

CUDA tensors run the Triton kernel (``triton_kernel.launch``); CPU tensors run deploykit's
reference, except under TRITON_INTERPRET=1, where they run the Triton kernel in the
interpreter (so CI tests the kernel through the op). Importing this module does not
import Triton. No autograd formula is registered: the op is for inference.
"""

from __future__ import annotations

import torch

from deploykit.ops import pillar_scatter as _spec

from .._triton import interpreting


@torch.library.custom_op("deploykit::pillar_scatter", mutates_args=())
def pillar_scatter(features: torch.Tensor, coords: torch.Tensor, height: int, width: int) -> torch.Tensor:
    if features.is_cuda or interpreting():
        from .triton_kernel import launch

        return launch(features, coords, height, width)
    return _spec.reference(features, coords, height, width).contiguous()


@pillar_scatter.register_fake
def _(features, coords, height, width):
    torch._check(features.dim() == 3 and coords.dim() == 2)
    return features.new_empty((1, features.shape[1], height, width))
