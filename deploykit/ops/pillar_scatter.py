"""``deploykit::PillarScatter``: pillar features onto the dense BEV canvas.

Inputs
  features  float32 (1, C, P)   one feature vector per pillar, channel-first
  coords    int32   (P, 4)      [batch, z, y, x] per pillar, as mmcv voxelization
                                gives them; rows with y or x off the grid
                                (static-shape padding uses -1) are skipped
Attributes
  height, width  int            BEV grid size (ny, nx)
Output
  canvas    float32 (1, C, height, width), zero where no pillar lands

Semantics of mmdet3d's PointPillarsScatter (``canvas[:, y * nx + x] = feats``).
Two pillars in one cell never come out of voxelization; the result is then
unspecified, as it is in mmdet3d.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from . import kernels
from .autograd import recompute_backward, save_inputs
from .onnx_builder import attribute_constant as attr_const
from .onnx_builder import int64_constant as const

OP_TYPE = "PillarScatter"
DOMAIN = "deploykit"


def reference(features: torch.Tensor, coords: torch.Tensor, height: int, width: int) -> torch.Tensor:
    _, channels, _ = features.shape
    y, x = coords[:, 2].long(), coords[:, 3].long()
    valid = (y >= 0) & (y < height) & (x >= 0) & (x < width)
    canvas = features.new_zeros(channels, height * width)
    canvas[:, (y * width + x)[valid]] = features[0][:, valid]
    return canvas.reshape(1, channels, height, width)


class PillarScatterFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, features, coords, height: int, width: int):
        save_inputs(ctx, (features, coords), (height, width))
        return kernels.forward("pillar_scatter", reference, features, coords, height, width)

    @staticmethod
    def backward(ctx, grad):
        return recompute_backward(ctx, reference, grad)

    @staticmethod
    def symbolic(g, features, coords, height: int, width: int):
        out = g.op(f"{DOMAIN}::{OP_TYPE}", features, coords, height_i=height, width_i=width)
        channels = features.type().sizes()[1]
        out.setType(features.type().with_sizes([1, channels, height, width]))
        return out


class PillarScatter(torch.nn.Module):
    """Module form, what the ``pillar_scatter_op`` pass puts in the model."""

    def __init__(self, in_channels: int, ny: int, nx: int):
        super().__init__()
        self.in_channels, self.ny, self.nx = in_channels, ny, nx

    def forward(self, feats: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        return PillarScatterFunction.apply(feats, coords, self.ny, self.nx)


def onnx_function(opset: int) -> onnx.FunctionProto:
    """The op in standard ONNX ops (opset >= 16 for ScatterElements' reduction).

    Scattering with reduction="add" onto zeros equals assignment for distinct
    cells, and lets skipped pillars add a zero to cell 0 instead of needing a
    spare cell that would cost a copy of the whole canvas to cut off again.
    """
    if opset < 16:
        raise ValueError("PillarScatter's ONNX function needs opset >= 16 (ScatterElements reduction)")
    i64 = TensorProto.INT64

    nodes = [
        attr_const("H0", "height"),  # value_int gives a scalar; Concat below needs rank 1
        attr_const("W0", "width"),
        const("zero", [0]),
        helper.make_node("Unsqueeze", ["H0", "zero"], ["H"]),
        helper.make_node("Unsqueeze", ["W0", "zero"], ["W"]),
        const("one", [1]),
        const("two", [2]),
        const("three", [3]),
        helper.make_node("Cast", ["coords"], ["c64"], to=i64),
        helper.make_node("Gather", ["c64", "two"], ["y2"], axis=1),
        helper.make_node("Gather", ["c64", "three"], ["x2"], axis=1),
        helper.make_node("Squeeze", ["y2", "one"], ["y"]),
        helper.make_node("Squeeze", ["x2", "one"], ["x"]),
        helper.make_node("GreaterOrEqual", ["y", "zero"], ["y_ge"]),
        helper.make_node("Less", ["y", "H"], ["y_lt"]),
        helper.make_node("GreaterOrEqual", ["x", "zero"], ["x_ge"]),
        helper.make_node("Less", ["x", "W"], ["x_lt"]),
        helper.make_node("And", ["y_ge", "y_lt"], ["y_ok"]),
        helper.make_node("And", ["x_ge", "x_lt"], ["x_ok"]),
        helper.make_node("And", ["y_ok", "x_ok"], ["valid"]),
        helper.make_node("Mul", ["y", "W"], ["row"]),
        helper.make_node("Add", ["row", "x"], ["cell"]),
        helper.make_node("Where", ["valid", "cell", "zero"], ["index"]),
        # Skipped pillars contribute zeros (see the docstring).
        helper.make_node("Cast", ["valid"], ["valid_f"], to=TensorProto.FLOAT),
        helper.make_node("Squeeze", ["features", "zero"], ["feats"]),
        helper.make_node("Mul", ["feats", "valid_f"], ["updates"]),
        helper.make_node("Shape", ["feats"], ["feat_shape"]),
        helper.make_node("Gather", ["feat_shape", "zero"], ["C"]),
        helper.make_node("Mul", ["H", "W"], ["HW"]),
        helper.make_node("Concat", ["C", "HW"], ["canvas_shape"], axis=0),
        helper.make_node("ConstantOfShape", ["canvas_shape"], ["zeros"],
                         value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.0])),
        helper.make_node("Shape", ["updates"], ["upd_shape"]),
        helper.make_node("Unsqueeze", ["index", "zero"], ["index_row"]),
        helper.make_node("Expand", ["index_row", "upd_shape"], ["indices"]),
        helper.make_node("ScatterElements", ["zeros", "indices", "updates"], ["flat"], axis=1, reduction="add"),
        helper.make_node("Concat", ["one", "C", "H", "W"], ["out_shape"], axis=0),
        helper.make_node("Reshape", ["flat", "out_shape"], ["canvas"]),
    ]
    return helper.make_function(
        DOMAIN, OP_TYPE, inputs=["features", "coords"], outputs=["canvas"], nodes=nodes,
        opset_imports=[helper.make_opsetid("", opset)], attributes=["height", "width"],
    )


def function_for(node: onnx.NodeProto, graph: onnx.GraphProto, opset: int) -> onnx.FunctionProto:  # noqa: ARG001
    """Shape-generic: one definition serves every PillarScatter node."""
    return onnx_function(opset)


def numpy_kernel(features: np.ndarray, coords: np.ndarray, height: int, width: int) -> np.ndarray:
    channels = features.shape[1]
    y, x = coords[:, 2].astype(np.int64), coords[:, 3].astype(np.int64)
    valid = (y >= 0) & (y < height) & (x >= 0) & (x < width)
    canvas = np.zeros((channels, height * width), dtype=features.dtype)
    canvas[:, (y * width + x)[valid]] = features[0][:, valid]
    return canvas.reshape(1, channels, height, width)


_ORTX_REGISTERED = False


def register_ortx() -> None:
    """Register the numpy kernel as an onnxruntime-extensions Python op (once)."""
    global _ORTX_REGISTERED
    if _ORTX_REGISTERED:
        return
    from onnxruntime_extensions import PyCustomOpDef, onnx_op

    @onnx_op(op_type=OP_TYPE, inputs=[PyCustomOpDef.dt_float, PyCustomOpDef.dt_int32],
             outputs=[PyCustomOpDef.dt_float],
             attrs={"height": PyCustomOpDef.dt_int64, "width": PyCustomOpDef.dt_int64})
    def _pillar_scatter(features, coords, **attrs):
        return numpy_kernel(features, coords, int(attrs["height"]), int(attrs["width"]))

    _ORTX_REGISTERED = True
