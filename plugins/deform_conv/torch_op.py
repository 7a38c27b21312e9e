"""``torch.ops.deploykit.deform_conv``: DeformConv (mmcv's DCN v1 / v2) as a PyTorch custom op.

Schema: ``deploykit::deform_conv(Tensor input, Tensor offset, Tensor mask, Tensor weight,
Tensor bias, int stride_h, int stride_w, int pad_h, int pad_w, int dilation_h, int dilation_w,
int groups, int deform_groups) -> Tensor`` (the ONNX node's inputs and attributes; an absent
mask (v1) or bias is a 0-element tensor, as in the node; output (B, Cout, Ho, Wo),
contiguous, in input's dtype).

CUDA tensors run the Triton kernel (``triton_kernel.launch``); CPU tensors run deploykit's
reference, except under TRITON_INTERPRET=1, where they run the Triton kernel in the
interpreter (so CI tests the kernel through the op). On the reference path fp16 inputs are
computed in fp32 and the result cast back, as the kernel accumulates in fp32. Importing
this module does not import Triton. No autograd formula is registered: the op is for
inference (deploykit's DeformConvFunction has the autograd).
"""

from __future__ import annotations

import torch

from deploykit.ops import deform_conv as _spec

from .._triton import interpreting


@torch.library.custom_op("deploykit::deform_conv", mutates_args=())
def deform_conv(input: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor, stride_h: int, stride_w: int, pad_h: int, pad_w: int, dilation_h: int,
                dilation_w: int, groups: int, deform_groups: int) -> torch.Tensor:
    if input.is_cuda or interpreting():
        from .triton_kernel import launch

        return launch(input, offset, mask, weight, bias, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w,
                      groups, deform_groups)
    mask, bias = _spec._present(mask), _spec._present(bias)
    out = _spec.reference(input.float(), offset.float(), None if mask is None else mask.float(), weight.float(),
                          None if bias is None else bias.float(), (stride_h, stride_w), (pad_h, pad_w),
                          (dilation_h, dilation_w), groups, deform_groups)
    return out.to(input.dtype).contiguous()


@deform_conv.register_fake
def _(input, offset, mask, weight, bias, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, groups,
      deform_groups):
    kh, kw = weight.shape[2], weight.shape[3]
    ho = (input.shape[2] + 2 * pad_h - dilation_h * (kh - 1) - 1) // stride_h + 1
    wo = (input.shape[3] + 2 * pad_w - dilation_w * (kw - 1) - 1) // stride_w + 1
    return input.new_empty((input.shape[0], weight.shape[0], ho, wo))
