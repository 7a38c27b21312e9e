"""``deploykit::BEVPool``: LSS voxel pooling with BEVPoolv2's semantics (BEVDet's bev_pool_v2).

With the camera rig fixed at export time, which BEV cell every (camera, depth bin,
pixel) of the frustum lands in is a constant, so the "ranks" are precomputed once
(``prepare_ranks``, BEVDet's voxel_pooling_prepare_v2) and the op never builds the
frustum: it sums depth probability x context feature per cell.

Inputs
  depth             float32 (B, N, D, H, W)   depth distribution per pixel
  feat              float32 (B, N, H, W, C)   context features per pixel
  ranks_depth       int32   (M,)              flat index into depth of each kept frustum point
  ranks_feat        int32   (M,)              flat index into feat's (B, N, H, W) of the point
  ranks_bev         int32   (M,)              flat index into (B, Z, Y, X) of the point's cell
  interval_starts   int32   (K,)              first point of each run of equal ranks_bev
  interval_lengths  int32   (K,)              length of each run
Attributes
  bev_z, bev_y, bev_x  int                    the BEV grid (the batch is depth's)
Output
  bev               float32 (B, C, Z, Y, X)   zero where no point lands

Points are sorted by cell and the intervals are the runs of equal ``ranks_bev`` (as
prepare_ranks makes them); the CUDA kernel and a TensorRT plugin walk the intervals,
one thread per (interval, channel), while the reference and the ONNX lowering scatter-add
per point: the same sums (tested against the interval walk and against BEVDepth's dense
frustum pooling). Points outside the grid never enter the ranks.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from .autograd import recompute_backward, save_inputs
from .onnx_builder import attribute_constant as attr_const
from .onnx_builder import int64_constant as const

OP_TYPE = "BEVPool"
DOMAIN = "deploykit"


def prepare_ranks(cells: np.ndarray, grid: tuple[int, int, int]) -> dict[str, np.ndarray]:
    """The op's constant inputs from each frustum point's voxel (B, N, D, H, W, 3) as
    integer (x, y, z) cells: points off the (Z, Y, X) grid are dropped, the rest sorted by
    cell (stable, so a cell's points keep frustum order) with the runs' starts and lengths."""
    z_n, y_n, x_n = grid
    b, n, d, h, w, _ = cells.shape
    c = cells.reshape(-1, 3).astype(np.int64)
    ranks_depth = np.arange(c.shape[0], dtype=np.int64)
    ranks_feat = np.arange(b * n * h * w, dtype=np.int64).reshape(b, n, 1, h, w)
    ranks_feat = np.broadcast_to(ranks_feat, (b, n, d, h, w)).reshape(-1)
    batch = np.repeat(np.arange(b, dtype=np.int64), n * d * h * w)
    keep = ((c[:, 0] >= 0) & (c[:, 0] < x_n) & (c[:, 1] >= 0) & (c[:, 1] < y_n) & (c[:, 2] >= 0)
            & (c[:, 2] < z_n))
    c, ranks_depth, ranks_feat, batch = c[keep], ranks_depth[keep], ranks_feat[keep], batch[keep]
    ranks_bev = ((batch * z_n + c[:, 2]) * y_n + c[:, 1]) * x_n + c[:, 0]
    order = np.argsort(ranks_bev, kind="stable")
    ranks_bev, ranks_depth, ranks_feat = ranks_bev[order], ranks_depth[order], ranks_feat[order]
    starts = np.flatnonzero(np.r_[True, ranks_bev[1:] != ranks_bev[:-1]]) if len(ranks_bev) else np.zeros(0, int)
    lengths = np.diff(np.r_[starts, len(ranks_bev)])
    i32 = np.int32
    if b * n * d * h * w >= 2**31 or b * z_n * y_n * x_n >= 2**31:
        raise ValueError("BEVPool's int32 ranks cannot index this many frustum points or cells")
    return {"ranks_depth": ranks_depth.astype(i32), "ranks_feat": ranks_feat.astype(i32),
            "ranks_bev": ranks_bev.astype(i32), "interval_starts": starts.astype(i32),
            "interval_lengths": lengths.astype(i32)}


def reference(depth, feat, ranks_depth, ranks_feat, ranks_bev, interval_starts, interval_lengths,  # noqa: ARG001
              bev_z: int, bev_y: int, bev_x: int) -> torch.Tensor:
    # Python ints: shapes traced as tensors inside the Function break the TorchScript exporter.
    b, c = int(depth.shape[0]), int(feat.shape[-1])
    values = depth.reshape(-1)[ranks_depth.long()][:, None] * feat.reshape(-1, c)[ranks_feat.long()]
    out = values.new_zeros(b * bev_z * bev_y * bev_x, c).index_add(0, ranks_bev.long(), values)
    return out.reshape(b, bev_z, bev_y, bev_x, c).permute(0, 4, 1, 2, 3)


def interval_walk(depth, feat, ranks_depth, ranks_feat, ranks_bev, interval_starts, interval_lengths,
                  bev_z: int, bev_y: int, bev_x: int) -> np.ndarray:
    """The CUDA kernel's loop (bev_pool_v2_kernel), in numpy: per interval, the sum of its
    points written to the cell of its first point. For tests and as the plugins' spec."""
    b, c = depth.shape[0], feat.shape[-1]
    d, f = depth.reshape(-1), feat.reshape(-1, c)
    out = np.zeros((b * bev_z * bev_y * bev_x, c), np.float32)
    for start, length in zip(interval_starts.tolist(), interval_lengths.tolist()):
        acc = np.zeros(c, np.float32)
        for i in range(start, start + length):
            acc += d[ranks_depth[i]] * f[ranks_feat[i]]
        out[ranks_bev[start]] = acc
    return out.reshape(b, bev_z, bev_y, bev_x, c).transpose(0, 4, 1, 2, 3)


class BEVPoolFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, depth, feat, ranks_depth, ranks_feat, ranks_bev, interval_starts, interval_lengths,
                bev_z: int, bev_y: int, bev_x: int):
        save_inputs(ctx, (depth, feat, ranks_depth, ranks_feat, ranks_bev, interval_starts, interval_lengths),
                    (bev_z, bev_y, bev_x))
        return reference(depth, feat, ranks_depth, ranks_feat, ranks_bev, interval_starts, interval_lengths,
                         bev_z, bev_y, bev_x)

    @staticmethod
    def backward(ctx, grad):
        return recompute_backward(ctx, reference, grad)

    @staticmethod
    def symbolic(g, depth, feat, ranks_depth, ranks_feat, ranks_bev, interval_starts, interval_lengths,
                 bev_z: int, bev_y: int, bev_x: int):
        out = g.op(f"{DOMAIN}::{OP_TYPE}", depth, feat, ranks_depth, ranks_feat, ranks_bev, interval_starts,
                   interval_lengths, bev_z_i=bev_z, bev_y_i=bev_y, bev_x_i=bev_x)
        b, c = depth.type().sizes()[0], feat.type().sizes()[-1]
        out.setType(depth.type().with_sizes([b, c, bev_z, bev_y, bev_x]))
        return out


def bev_pool(depth, feat, ranks: dict[str, torch.Tensor], grid: tuple[int, int, int]) -> torch.Tensor:
    """(B, C, Z, Y, X) from depth (B, N, D, H, W), feat (B, N, H, W, C) and prepare_ranks' tensors."""
    return BEVPoolFunction.apply(depth, feat, ranks["ranks_depth"], ranks["ranks_feat"], ranks["ranks_bev"],
                                 ranks["interval_starts"], ranks["interval_lengths"], *grid)


def onnx_function(opset: int) -> onnx.FunctionProto:
    """The op in standard ONNX ops: Gather the depth and feature of every point, multiply,
    ScatterND with reduction "add" (opset >= 16) into a zero (B*Z*Y*X, C) canvas."""
    if opset < 16:
        raise ValueError("BEVPool's ONNX function needs opset >= 16 (ScatterND reduction)")
    i64 = TensorProto.INT64

    nodes = [
        attr_const("Z0", "bev_z"), attr_const("Y0", "bev_y"), attr_const("X0", "bev_x"),
        const("zero", [0]), const("minus_one", [-1]),
        helper.make_node("Unsqueeze", ["Z0", "zero"], ["Z"]),
        helper.make_node("Unsqueeze", ["Y0", "zero"], ["Y"]),
        helper.make_node("Unsqueeze", ["X0", "zero"], ["X"]),
        helper.make_node("Shape", ["depth"], ["depth_shape"]),
        helper.make_node("Gather", ["depth_shape", "zero"], ["B"]),
        helper.make_node("Shape", ["feat"], ["feat_shape"]),
        helper.make_node("Gather", ["feat_shape", "minus_one"], ["C"]),
        helper.make_node("Reshape", ["depth", "minus_one"], ["depth_flat"]),
        helper.make_node("Concat", ["minus_one", "C"], ["rows_shape"], axis=0),
        helper.make_node("Reshape", ["feat", "rows_shape"], ["feat_rows"]),
        helper.make_node("Cast", ["ranks_depth"], ["rd"], to=i64),
        helper.make_node("Cast", ["ranks_feat"], ["rf"], to=i64),
        helper.make_node("Cast", ["ranks_bev"], ["rb"], to=i64),
        helper.make_node("Gather", ["depth_flat", "rd"], ["d"], axis=0),
        helper.make_node("Gather", ["feat_rows", "rf"], ["f"], axis=0),
        helper.make_node("Unsqueeze", ["d", "minus_one"], ["d_col"]),
        helper.make_node("Mul", ["f", "d_col"], ["values"]),
        helper.make_node("Mul", ["B", "Z"], ["BZ"]),
        helper.make_node("Mul", ["BZ", "Y"], ["BZY"]),
        helper.make_node("Mul", ["BZY", "X"], ["cells"]),
        helper.make_node("Concat", ["cells", "C"], ["canvas_shape"], axis=0),
        helper.make_node("ConstantOfShape", ["canvas_shape"], ["zeros"],
                         value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.0])),
        helper.make_node("Unsqueeze", ["rb", "minus_one"], ["indices"]),
        helper.make_node("ScatterND", ["zeros", "indices", "values"], ["flat"], reduction="add"),
        helper.make_node("Concat", ["B", "Z", "Y", "X", "C"], ["grid_shape"], axis=0),
        helper.make_node("Reshape", ["flat", "grid_shape"], ["grid"]),
        helper.make_node("Transpose", ["grid"], ["bev"], perm=[0, 4, 1, 2, 3]),
    ]
    return helper.make_function(
        DOMAIN, OP_TYPE,
        inputs=["depth", "feat", "ranks_depth", "ranks_feat", "ranks_bev", "interval_starts", "interval_lengths"],
        outputs=["bev"], nodes=nodes, opset_imports=[helper.make_opsetid("", opset)],
        attributes=["bev_z", "bev_y", "bev_x"],
    )


def function_for(node: onnx.NodeProto, graph: onnx.GraphProto, opset: int) -> onnx.FunctionProto:  # noqa: ARG001
    """Shape-generic: one definition serves every BEVPool node."""
    return onnx_function(opset)


def numpy_kernel(depth, feat, ranks_depth, ranks_feat, ranks_bev, interval_starts, interval_lengths,  # noqa: ARG001
                 bev_z: int, bev_y: int, bev_x: int) -> np.ndarray:
    b, c = depth.shape[0], feat.shape[-1]
    values = depth.reshape(-1)[ranks_depth][:, None] * feat.reshape(-1, c)[ranks_feat]
    out = np.zeros((b * bev_z * bev_y * bev_x, c), np.float32)
    np.add.at(out, ranks_bev, values)
    return out.reshape(b, bev_z, bev_y, bev_x, c).transpose(0, 4, 1, 2, 3).copy()


_ORTX_REGISTERED = False


def register_ortx() -> None:
    """Register the numpy kernel as an onnxruntime-extensions Python op (once)."""
    global _ORTX_REGISTERED
    if _ORTX_REGISTERED:
        return
    from onnxruntime_extensions import PyCustomOpDef, onnx_op

    i32, f32 = PyCustomOpDef.dt_int32, PyCustomOpDef.dt_float

    @onnx_op(op_type=OP_TYPE, inputs=[f32, f32, i32, i32, i32, i32, i32], outputs=[f32],
             attrs={"bev_z": PyCustomOpDef.dt_int64, "bev_y": PyCustomOpDef.dt_int64,
                    "bev_x": PyCustomOpDef.dt_int64})
    def _bev_pool(depth, feat, rd, rf, rb, starts, lengths, **attrs):
        return numpy_kernel(depth, feat, rd, rf, rb, starts, lengths, int(attrs["bev_z"]), int(attrs["bev_y"]),
                            int(attrs["bev_x"]))

    _ORTX_REGISTERED = True
