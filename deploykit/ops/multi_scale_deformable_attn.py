"""``deploykit::MultiScaleDeformableAttn``: mmcv's multi-scale deformable attention.

Inputs (mmcv's MultiScaleDeformableAttnFunction, minus im2col_step)
  value               float32 (bs, num_keys, num_heads, head_dims)
  spatial_shapes      int64   (num_levels, 2)  (H, W) per level
  level_start_index   int64   (num_levels,)    offset of each level in num_keys
  sampling_locations  float32 (bs, num_queries, num_heads, num_levels, num_points, 2)
                              (x, y) normalised to [0, 1] over each level
  attention_weights   float32 (bs, num_queries, num_heads, num_levels, num_points)
Output
  float32 (bs, num_queries, num_heads * head_dims)

Sampling is bilinear at pixel ``loc * size - 0.5`` (align_corners=False); taps
outside the feature map read zero, as mmcv's CUDA kernel and its PyTorch
fallback (``grid_sample`` with zero padding) both do.

Spatial shapes are constants of a deployed model, so the lowering to standard
ONNX (GridSample per level) is built per node from those constants.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
import torch.nn.functional as F

from ..onnx_graph import constant_tensors, constant_value
from . import kernels
from .autograd import recompute_backward, save_inputs
from .onnx_builder import NodeBuilder

OP_TYPE = "MultiScaleDeformableAttn"
DOMAIN = "deploykit"


def reference(value: torch.Tensor, spatial_shapes, level_start_index, sampling_locations: torch.Tensor,
              attention_weights: torch.Tensor) -> torch.Tensor:
    shapes = [tuple(int(v) for v in hw) for hw in (spatial_shapes.tolist() if torch.is_tensor(spatial_shapes) else spatial_shapes)]
    bs, _, heads, dims = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    grids = 2 * sampling_locations - 1
    sampled = []
    for level, (h, w) in enumerate(shapes):
        start = int(level_start_index[level])
        v = value[:, start:start + h * w].flatten(2).transpose(1, 2).reshape(bs * heads, dims, h, w)
        g = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    weights = attention_weights.transpose(1, 2).reshape(bs * heads, 1, queries, levels * points)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1)
    return out.view(bs, heads * dims, queries).transpose(1, 2).contiguous()


class MultiScaleDeformableAttnFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        save_inputs(ctx, (value, spatial_shapes, level_start_index, sampling_locations, attention_weights))
        return kernels.forward("msda", reference, value, spatial_shapes, level_start_index, sampling_locations,
                               attention_weights)

    @staticmethod
    def backward(ctx, grad):
        return recompute_backward(ctx, reference, grad)

    @staticmethod
    def symbolic(g, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        out = g.op(f"{DOMAIN}::{OP_TYPE}", value, spatial_shapes, level_start_index, sampling_locations,
                   attention_weights)
        bs, _, heads, dims = value.type().sizes()
        queries = sampling_locations.type().sizes()[1]
        out.setType(value.type().with_sizes([bs, queries, heads * dims]))
        return out


def multi_scale_deformable_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    return MultiScaleDeformableAttnFunction.apply(value, spatial_shapes, level_start_index, sampling_locations,
                                                  attention_weights)


def lowering_nodes(b: NodeBuilder, inputs: list[str], output: str, shapes: list[tuple[int, int]],
                   starts: list[int], dims: tuple[int, int, int, int, int, int], opset: int) -> None:
    """Append GridSample-based nodes computing the op to builder ``b``.

    dims = (bs, num_queries, num_heads, head_dims, num_levels, num_points).
    """
    if opset < 16:
        raise ValueError("MultiScaleDeformableAttn's lowering needs opset >= 16 (GridSample)")
    value, _, _, locations, weights = inputs
    bs, queries, heads, head_dims, levels, points = dims
    mode = "linear" if opset >= 20 else "bilinear"
    grids = b.op("Sub", b.op("Mul", locations, b.const(2.0, np.float32)), b.const(1.0, np.float32))
    grids = b.op("Transpose", grids, perm=[0, 2, 1, 3, 4, 5])
    grids = b.op("Reshape", grids, b.const([bs * heads, queries, levels, points, 2]))
    sampled = []
    for level, ((h, w), start) in enumerate(zip(shapes, starts)):
        v = b.op("Slice", value, b.const([start]), b.const([start + h * w]), b.const([1]))
        v = b.op("Transpose", v, perm=[0, 2, 3, 1])
        v = b.op("Reshape", v, b.const([bs * heads, head_dims, h, w]))
        g = b.op("Gather", grids, b.const(level), axis=2)
        sampled.append(b.op("GridSample", v, g, mode=mode, padding_mode="zeros", align_corners=0))
    stacked = b.op("Concat", *sampled, axis=3) if len(sampled) > 1 else sampled[0]
    w = b.op("Transpose", weights, perm=[0, 2, 1, 3, 4])
    w = b.op("Reshape", w, b.const([bs * heads, 1, queries, levels * points]))
    summed = b.op("ReduceSum", b.op("Mul", stacked, w), b.const([3]), keepdims=0)
    out = b.op("Reshape", summed, b.const([bs, heads * head_dims, queries]))
    b.op("Transpose", out, perm=[0, 2, 1], name=output)


def node_signature(node: onnx.NodeProto, graph: onnx.GraphProto) -> tuple[list, list, tuple]:
    """Static shapes, level starts and dims of one node, read from the graph."""
    consts = constant_tensors(graph)
    if node.input[1] not in consts or node.input[2] not in consts:
        raise ValueError(f"{node.name}: spatial_shapes and level_start_index must be constants to lower the op")
    shapes = [tuple(int(v) for v in hw) for hw in constant_value(consts, node.input[1]).reshape(-1, 2)]
    starts = [int(v) for v in constant_value(consts, node.input[2]).reshape(-1)]
    typed = {v.name: v for v in [*graph.input, *graph.value_info, *graph.output]}

    def shape(name):
        if name not in typed:
            raise ValueError(f"{node.name}: no static shape recorded for input {name}")
        return [d.dim_value for d in typed[name].type.tensor_type.shape.dim]

    bs, _, heads, head_dims = shape(node.input[0])
    _, queries, _, levels, points, _ = shape(node.input[3])
    return shapes, starts, (bs, queries, heads, head_dims, levels, points)


FUNCTION_INPUTS = ["value", "spatial_shapes", "level_start_index", "sampling_locations", "attention_weights"]


def function_for(node: onnx.NodeProto, graph: onnx.GraphProto, opset: int) -> onnx.FunctionProto:
    """A function specialised to this node's constant shapes, named after them so
    nodes with the same shapes share one definition."""
    shapes, starts, dims = node_signature(node, graph)
    bs, queries, heads, head_dims, levels, points = dims
    levels_tag = "_".join(f"{h}x{w}" for h, w in shapes)
    name = f"{OP_TYPE}_b{bs}q{queries}h{heads}d{head_dims}p{points}_{levels_tag}"
    b = NodeBuilder("msda")
    lowering_nodes(b, FUNCTION_INPUTS, "output", shapes, starts, dims, opset)
    return onnx.helper.make_function(DOMAIN, name, inputs=FUNCTION_INPUTS, outputs=["output"], nodes=b.nodes,
                                     opset_imports=[onnx.helper.make_opsetid("", opset)])


def numpy_kernel(value, spatial_shapes, level_start_index, sampling_locations, attention_weights) -> np.ndarray:
    """Vectorised numpy form of the CUDA kernel's sampling, for onnxruntime-extensions."""
    bs, _, heads, dims = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    out = np.zeros((bs, queries, heads, dims), np.float32)
    b_idx = np.arange(bs)[:, None, None, None]
    m_idx = np.arange(heads)[None, None, :, None]
    for level in range(levels):
        h, w = (int(v) for v in spatial_shapes[level])
        start = int(level_start_index[level])
        loc = sampling_locations[:, :, :, level]  # (bs, Q, M, P, 2)
        x = loc[..., 0] * w - 0.5
        y = loc[..., 1] * h - 0.5
        inside = (y > -1) & (x > -1) & (y < h) & (x < w)
        x0, y0 = np.floor(x), np.floor(y)
        lx, ly = x - x0, y - y0
        weight = attention_weights[:, :, :, level] * inside  # (bs, Q, M, P)
        for dy, dx, tap in ((0, 0, (1 - ly) * (1 - lx)), (0, 1, (1 - ly) * lx), (1, 0, ly * (1 - lx)), (1, 1, ly * lx)):
            yy, xx = (y0 + dy).astype(np.int64), (x0 + dx).astype(np.int64)
            ok = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
            key = start + np.where(ok, yy * w + xx, 0)
            sampled = value[b_idx, key, m_idx]  # (bs, Q, M, P, D)
            out += np.einsum("bqmp,bqmpd->bqmd", (weight * tap * ok).astype(np.float32), sampled)
    return out.reshape(bs, queries, heads * dims)


_ORTX_REGISTERED = False


def register_ortx() -> None:
    global _ORTX_REGISTERED
    if _ORTX_REGISTERED:
        return
    from onnxruntime_extensions import PyCustomOpDef, onnx_op

    @onnx_op(op_type=OP_TYPE, inputs=[PyCustomOpDef.dt_float, PyCustomOpDef.dt_int64, PyCustomOpDef.dt_int64,
                                      PyCustomOpDef.dt_float, PyCustomOpDef.dt_float],
             outputs=[PyCustomOpDef.dt_float])
    def _msda(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        return numpy_kernel(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)

    _ORTX_REGISTERED = True
