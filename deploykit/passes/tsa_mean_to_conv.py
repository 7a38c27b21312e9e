"""TSA's mean over the BEV queue -> a frozen 1x1 conv with weights 1/queue.

Temporal self-attention averages its result over (previous, current) BEV with
a reshape + ReduceMean along a short axis, a pattern NPU compilers tile badly.
Laid out as (bs, queue, Q, C), the same average is a 1x1 convolution from
``queue`` channels to one, the op every accelerator runs fastest. With a
queue of 2 the weights are 0.5, a power of two, so the result is bit-exact.
"""

from __future__ import annotations

import torch
from torch import nn

from ..models.bevformer.attention import QueueMean
from .common import replace_modules

NAME = "tsa_mean_to_conv"


class QueueMeanConv(nn.Module):
    def __init__(self, num_bev_queue: int):
        super().__init__()
        self.num_bev_queue = num_bev_queue
        self.query_reduce_mean = nn.Conv2d(num_bev_queue, 1, 1, bias=False)
        self.query_reduce_mean.weight.data.fill_(1.0 / num_bev_queue)
        self.query_reduce_mean.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, q, c = x.shape
        return self.query_reduce_mean(x.view(n // self.num_bev_queue, self.num_bev_queue, q, c)).view(-1, q, c)


def apply(model: nn.Module) -> nn.Module:
    return replace_modules(model, QueueMean, lambda m: QueueMeanConv(m.num_bev_queue), NAME,
                           "the model has no temporal self-attention mean (already converted?)")
