"""``torch.ops.deploykit.bev_pool``: BEVPool as a PyTorch custom op.

Schema: ``deploykit::bev_pool(Tensor depth, Tensor feat, Tensor ranks_depth, Tensor ranks_feat,
Tensor ranks_bev, Tensor interval_starts, Tensor interval_lengths, int bev_z, int bev_y,
int bev_x) -> Tensor`` (the ONNX node's inputs and attributes; bev (B, C, bev_z, bev_y,
bev_x), contiguous, in the promoted dtype of depth and feat; K = len(interval_starts) = 0:
unsorted ranks).

CUDA tensors run the Triton kernels (``triton_kernel.launch``); CPU tensors run deploykit's
reference, except under TRITON_INTERPRET=1, where they run the Triton kernels in the
interpreter (so CI tests the kernels through the op). On the reference path fp16 inputs are
pooled in fp32 and the sum cast back, as the kernels accumulate. Importing this module
does not import Triton. No autograd formula is registered: the op is for inference.
"""

from __future__ import annotations

import torch

from deploykit.ops import bev_pool as _spec

from .._triton import interpreting


@torch.library.custom_op("deploykit::bev_pool", mutates_args=())
def bev_pool(depth: torch.Tensor, feat: torch.Tensor, ranks_depth: torch.Tensor, ranks_feat: torch.Tensor,
             ranks_bev: torch.Tensor, interval_starts: torch.Tensor, interval_lengths: torch.Tensor,
             bev_z: int, bev_y: int, bev_x: int) -> torch.Tensor:
    if depth.is_cuda or interpreting():
        from .triton_kernel import launch

        return launch(depth, feat, ranks_depth, ranks_feat, ranks_bev, interval_starts, interval_lengths,
                      bev_z, bev_y, bev_x)
    dtype = torch.promote_types(depth.dtype, feat.dtype)
    out = _spec.reference(depth.float(), feat.float(), ranks_depth, ranks_feat, ranks_bev, interval_starts,
                          interval_lengths, bev_z, bev_y, bev_x)
    return out.to(dtype).contiguous()


@bev_pool.register_fake
def _(depth, feat, ranks_depth, ranks_feat, ranks_bev, interval_starts, interval_lengths, bev_z, bev_y, bev_x):
    dtype = torch.promote_types(depth.dtype, feat.dtype)
    return depth.new_empty((depth.shape[0], feat.shape[-1], bev_z, bev_y, bev_x), dtype=dtype)
