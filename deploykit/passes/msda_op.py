"""Multi-scale deformable attention -> one ``deploykit::MultiScaleDeformableAttn`` node.

Exported from PyTorch, each call becomes a per-level chain of Slice, Reshape,
GridSample, Concat, Mul and ReduceSum; a single custom node binds to one
TensorRT plugin or NPU kernel instead, and deploykit's ONNX Runtime engine
runs it as a function built from the same GridSample lowering.
"""

from __future__ import annotations

from torch import nn

from ..models.bevformer.attention import Sampler
from ..ops.multi_scale_deformable_attn import multi_scale_deformable_attn
from .common import replace_modules

NAME = "msda_op"


def _static(x):
    # Shapes computed from .shape while tracing reach the exporter as Shape/Gather
    # arithmetic its type inference cannot always resolve; restating them as
    # constants gives the custom node typed inputs (a no-op Reshape onnxsim drops).
    return x.reshape([int(s) for s in x.shape])


class SamplerOp(nn.Module):
    def forward(self, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        value, sampling_locations, attention_weights = (_static(t) for t in (value, sampling_locations,
                                                                              attention_weights))
        return multi_scale_deformable_attn(value, spatial_shapes, level_start_index, sampling_locations,
                                           attention_weights)


def apply(model: nn.Module) -> nn.Module:
    return replace_modules(model, Sampler, lambda m: SamplerOp(), NAME,
                           "the model has no deformable attention sampler (already converted?)")
