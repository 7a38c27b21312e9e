"""``torch.ops.deploykit.msda`` and ``torch.ops.deploykit.msda_int8``: the Triton MSDA as PyTorch ops.

CUDA tensors run the Triton kernel; CPU tensors run deploykit's reference
(deploykit.ops.multi_scale_deformable_attn.reference, in fp32, cast to the
output dtype), except when TRITON_INTERPRET=1 (read at each call), where CPU
tensors go through the Triton kernel in its interpreter too, which is how CI
exercises the kernel through the op. Both ops have fake (meta) kernels, so they
trace under torch.compile / torch.export. Forward only: no autograd formula is
registered.

Importing this module needs torch only; triton is imported on the first call
that runs the kernel.
"""

from __future__ import annotations

import torch
from torch import Tensor

from deploykit.ops.multi_scale_deformable_attn import reference

from .._triton import interpreting


def _use_triton(t: Tensor) -> bool:
    return t.is_cuda or (t.device.type == "cpu" and interpreting())


def _out_shape(value: Tensor, sampling_locations: Tensor) -> tuple[int, int, int]:
    bs, _, heads, dims = value.shape
    return bs, sampling_locations.shape[1], heads * dims


@torch.library.custom_op("deploykit::msda", mutates_args=())
def msda(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor, sampling_locations: Tensor,
         attention_weights: Tensor) -> Tensor:
    """deploykit::MultiScaleDeformableAttn: (bs, num_queries, heads * head_dims) in value's dtype."""
    if _use_triton(value):
        from . import triton_kernel

        return triton_kernel.launch(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    return reference(value.float(), spatial_shapes, level_start_index, sampling_locations.float(),
                     attention_weights.float()).to(value.dtype)


@msda.register_fake
def _msda_fake(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    return value.new_empty(_out_shape(value, sampling_locations))


@torch.library.custom_op("deploykit::msda_int8", mutates_args=())
def msda_int8(value_q: Tensor, value_scale: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
              locations_q: Tensor, locations_scale: Tensor, weights_q: Tensor, weights_scale: Tensor,
              out_dtype: torch.dtype = torch.float32) -> Tensor:
    """Fused int8 MSDA: msda on (value_q * value_scale, locations_q * locations_scale,
    weights_q * weights_scale); int8 inputs (locations may be int16), one-element float
    scales (zero point 0)."""
    if _use_triton(value_q):
        from . import triton_kernel

        return triton_kernel.launch_int8(value_q, value_scale, spatial_shapes, level_start_index, locations_q,
                                         locations_scale, weights_q, weights_scale, out_dtype=out_dtype)
    if value_q.dtype != torch.int8 or weights_q.dtype != torch.int8 or locations_q.dtype not in (torch.int8,
                                                                                                  torch.int16):
        raise TypeError("MSDA int8: value_q and weights_q must be int8 and locations_q int8 or int16, got "
                        f"{value_q.dtype}, {weights_q.dtype} and {locations_q.dtype}")

    def deq(q, s):
        return q.float() * s.float().reshape(())

    return reference(deq(value_q, value_scale), spatial_shapes, level_start_index, deq(locations_q, locations_scale),
                     deq(weights_q, weights_scale)).to(out_dtype)


@msda_int8.register_fake
def _msda_int8_fake(value_q, value_scale, spatial_shapes, level_start_index, locations_q, locations_scale, weights_q,
                    weights_scale, out_dtype=torch.float32):
    return value_q.new_empty(_out_shape(value_q, locations_q), dtype=out_dtype)
