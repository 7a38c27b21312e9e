"""``deploykit::BEVPool``: LSS voxel pooling with BEVPoolv2's semantics (BEVDet's bev_pool_v2).

With the camera rig fixed at export time, which BEV cell every (camera, depth bin,
pixel) of the frustum lands in is a constant, so the "ranks" are precomputed once
(``prepare_ranks``, BEVDet's voxel_pooling_prepare_v2) and the op never builds the
frustum: it sums depth probability x context feature per cell.

Inputs
  depth             float32 (B, N, D, H, W)   depth distribution per pixel
  feat              float32 (B, N, H, W, C)   context features per pixel
  ranks_depth       int32   (M,)              flat index into depth of each frustum point
  ranks_feat        int32   (M,)              flat index into feat's (B, N, H, W) of the point
  ranks_bev         int32   (M,)              flat index into (B, Z, Y, X) of the point's cell;
                                              < 0: the point is dropped
  interval_starts   int32   (K,)              first point of each run of equal ranks_bev
  interval_lengths  int32   (K,)              length of each run; K = 0: ranks unsorted
Attributes
  bev_z, bev_y, bev_x  int                    the BEV grid (the batch is depth's)
Output
  bev               float32 (B, C, Z, Y, X)   zero where no point lands

bev[b, :, z, y, x] is the sum, over the points whose ranks_bev is that cell, of
depth[ranks_depth] * feat[ranks_feat]. A point whose ranks_bev is negative contributes
nothing (its ranks_depth and ranks_feat must still be valid indices); ranks_bev is
otherwise < B*Z*Y*X.

Two modes, told apart by K:
  sorted (K > 0)    points sorted by ranks_bev and the intervals the runs of equal ranks,
                    as prepare_ranks makes them: they partition the points in order
                    (starts[0] = 0, each run starts where the last ended, lengths > 0, they
                    sum to M), one run per cell. Constant ranks of a fixed rig. The CUDA
                    kernel and a TensorRT plugin walk the intervals, one thread per
                    (interval, channel), writing each run's sum (``interval_walk``); a
                    run of negative ranks is skipped.
  unsorted (K = 0)  ranks_bev in any order, e.g. computed in the graph each frame: BEVDepth's
                    two-key model pools the previous key frame's cached depth and context
                    into the current grid, and those points' cells follow the ego motion.
                    A kernel adds per point, with atomics on a GPU (``point_walk``).
The reference adds per point in both modes (a negative rank goes to one spare row past the
grid that is cut off); the ONNX lowering takes each cell's sum as a difference of running
sums (no scatter-add: ONNX Runtime's multi-threaded ScatterND add loses sums, see
onnx_function), sorting unsorted ranks in the graph first; the numpy kernel sums runs with
np.add.reduceat, sorting unsorted ranks first. The sums agree to fp32 rounding (tested
against the walks and against BEVDepth's dense frustum pooling). prepare_ranks leaves
points outside the grid out of the ranks altogether.
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
RANK_NAMES = ("ranks_depth", "ranks_feat", "ranks_bev", "interval_starts", "interval_lengths")


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
    cells = b * bev_z * bev_y * bev_x
    values = depth.reshape(-1)[ranks_depth.long()][:, None] * feat.reshape(-1, c)[ranks_feat.long()]
    rows = ranks_bev.long()
    rows = torch.where(rows < 0, torch.full_like(rows, cells), rows)  # dropped points: the spare row
    out = values.new_zeros(cells + 1, c).index_add(0, rows, values)[:cells]
    return out.reshape(b, bev_z, bev_y, bev_x, c).permute(0, 4, 1, 2, 3)


def interval_walk(depth, feat, ranks_depth, ranks_feat, ranks_bev, interval_starts, interval_lengths,
                  bev_z: int, bev_y: int, bev_x: int) -> np.ndarray:
    """The CUDA kernel's loop (bev_pool_v2_kernel), in numpy: per interval, the sum of its
    points written to the cell of its first point, runs of dropped points (< 0) skipped.
    With no intervals (unsorted ranks) a plugin runs the per-point kernel: ``point_walk``.
    For tests and as the plugins' spec."""
    if len(interval_starts) == 0:
        return point_walk(depth, feat, ranks_depth, ranks_feat, ranks_bev, bev_z, bev_y, bev_x)
    b, c = depth.shape[0], feat.shape[-1]
    d, f = depth.reshape(-1), feat.reshape(-1, c)
    out = np.zeros((b * bev_z * bev_y * bev_x, c), np.float32)
    for start, length in zip(interval_starts.tolist(), interval_lengths.tolist()):
        if ranks_bev[start] < 0:
            continue
        acc = np.zeros(c, np.float32)
        for i in range(start, start + length):
            acc += d[ranks_depth[i]] * f[ranks_feat[i]]
        out[ranks_bev[start]] = acc
    return out.reshape(b, bev_z, bev_y, bev_x, c).transpose(0, 4, 1, 2, 3)


def point_walk(depth, feat, ranks_depth, ranks_feat, ranks_bev, bev_z: int, bev_y: int, bev_x: int) -> np.ndarray:
    """The unsorted mode's kernel, in numpy: one thread per (point, channel) adds its
    product into the point's cell (atomicAdd on a GPU), dropped points (< 0) skipped.
    For tests and as the plugins' spec."""
    b, c = depth.shape[0], feat.shape[-1]
    d, f = depth.reshape(-1), feat.reshape(-1, c)
    out = np.zeros((b * bev_z * bev_y * bev_x, c), np.float32)
    for i in range(len(ranks_bev)):
        if ranks_bev[i] >= 0:
            out[ranks_bev[i]] += d[ranks_depth[i]] * f[ranks_feat[i]]
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
    """(B, C, Z, Y, X) from depth (B, N, D, H, W), feat (B, N, H, W, C) and prepare_ranks' tensors,
    or for unsorted ranks (``unsorted_ranks``) zero-length intervals."""
    return BEVPoolFunction.apply(depth, feat, ranks["ranks_depth"], ranks["ranks_feat"], ranks["ranks_bev"],
                                 ranks["interval_starts"], ranks["interval_lengths"], *grid)


def unsorted_ranks(ranks_depth, ranks_feat, ranks_bev) -> dict:
    """The op's rank inputs for the unsorted mode: the points as given (ranks_bev < 0 dropped)
    and zero-length intervals. numpy arrays or tensors, int32."""
    if isinstance(ranks_bev, torch.Tensor):
        empty = torch.zeros(0, dtype=torch.int32, device=ranks_bev.device)
    else:
        empty = np.zeros(0, np.int32)
    return {"ranks_depth": ranks_depth, "ranks_feat": ranks_feat, "ranks_bev": ranks_bev,
            "interval_starts": empty, "interval_lengths": empty}


# Points per block of the ONNX lowering's running sums (see onnx_function).
_SCAN_BLOCK = 64


def onnx_function(opset: int, unsorted: bool = False) -> onnx.FunctionProto:
    """The op in standard ONNX ops, without a scatter-add.

    ScatterND's reduction "add" is the obvious lowering, and wrong in ONNX Runtime: its CPU
    kernel splits the updates over the intra-op threads with plain adds, so two points of one
    cell on two threads lose one of the sums (onnxruntime issue 18048; measured here, 15% of
    max |bev| off with unsorted ranks on 2 threads). So the sums are differences of running
    sums, which no two threads write:

      key     ranks_bev, dropped points (< 0) as the spare cell B*Z*Y*X; with ``unsorted``
              the points are first sorted by it (TopK), so each cell's points are one run
      values  depth[ranks_depth] * feat[ranks_feat] per point, padded with dropped points to
              a whole number of blocks of _SCAN_BLOCK points
      scan    CumSum within each block (fp32, so it stays as small as a block's sum) and of
              the block totals (fp64): the running sum through point i is block_prefix[i //
              _SCAN_BLOCK] + in_block[i], exact to fp32 rounding however many points precede
      runs    each cell's first and last point, by a ScatterND of point indices to the cell
              (every index written once; other points go to slots of their own past the
              cells), and its sum = running(last) - running(first - 1); a cell with no points
              has first 0, last -1, and sums exactly 0

    Sorted ranks (K > 0) need only each cell's points to be one run (as prepare_ranks makes
    them) and skip the sort; the intervals themselves are not read. ``unsorted`` is correct
    for any order."""
    if opset < 16:
        raise ValueError("BEVPool's ONNX function needs opset >= 16 (the opsets it is tested at)")
    i64, f64, f32 = TensorProto.INT64, TensorProto.DOUBLE, TensorProto.FLOAT
    n = helper.make_node

    def scalar(name, value, dtype=i64):
        return n("Constant", [], [name], value=helper.make_tensor(name, dtype, [], [value]))

    nodes = [
        attr_const("Z0", "bev_z"), attr_const("Y0", "bev_y"), attr_const("X0", "bev_x"),
        const("zero", [0]), const("one", [1]), const("minus_one", [-1]), const("block", [_SCAN_BLOCK]),
        scalar("zero_s", 0), scalar("one_s", 1), scalar("last_in_block", _SCAN_BLOCK - 1),
        scalar("zero_f64", 0.0, f64),
        n("Unsqueeze", ["Z0", "zero"], ["Z"]), n("Unsqueeze", ["Y0", "zero"], ["Y"]),
        n("Unsqueeze", ["X0", "zero"], ["X"]),
        n("Shape", ["depth"], ["depth_shape"]), n("Gather", ["depth_shape", "zero"], ["B"]),
        n("Shape", ["feat"], ["feat_shape"]), n("Gather", ["feat_shape", "minus_one"], ["C"]),
        n("Reshape", ["depth", "minus_one"], ["depth_flat"]),
        n("Concat", ["minus_one", "C"], ["rows_shape"], axis=0),
        n("Reshape", ["feat", "rows_shape"], ["feat_rows"]),
        n("Mul", ["B", "Z"], ["BZ"]), n("Mul", ["BZ", "Y"], ["BZY"]), n("Mul", ["BZY", "X"], ["cells"]),
        n("Squeeze", ["cells", "zero"], ["cells_s"]),
        n("Cast", ["ranks_depth"], ["rd_m"], to=i64), n("Cast", ["ranks_feat"], ["rf_m"], to=i64),
        n("Cast", ["ranks_bev"], ["rb_m"], to=i64),
        # Dropped points (ranks_bev < 0) are the spare cell, which is never read back.
        n("Less", ["rb_m", "zero"], ["dropped"]), n("Where", ["dropped", "cells", "rb_m"], ["key_m"]),
        # Pad to N = whole blocks (at least one point more): pads are dropped points 0.
        n("Shape", ["rb_m"], ["M"]), n("Mod", ["M", "block"], ["M_mod"]), n("Sub", ["block", "M_mod"], ["pad"]),
        n("Add", ["M", "pad"], ["N"]), n("Squeeze", ["N", "zero"], ["N_s"]), n("Div", ["N", "block"], ["blocks"]),
        n("Concat", ["zero", "pad"], ["pads"], axis=0),
        n("Pad", ["rd_m", "pads", "zero_s"], ["rd_p"]), n("Pad", ["rf_m", "pads", "zero_s"], ["rf_p"]),
        n("Pad", ["key_m", "pads", "cells_s"], ["key_p"]),
    ]
    if unsorted:
        nodes += [n("TopK", ["key_p", "N"], ["key", "order"], largest=0, sorted=1),
                  n("Gather", ["rd_p", "order"], ["rd"]), n("Gather", ["rf_p", "order"], ["rf"])]
    else:
        nodes += [n("Identity", ["key_p"], ["key"]), n("Identity", ["rd_p"], ["rd"]), n("Identity", ["rf_p"], ["rf"])]
    nodes += [
        n("Gather", ["depth_flat", "rd"], ["d"], axis=0), n("Gather", ["feat_rows", "rf"], ["f"], axis=0),
        n("Unsqueeze", ["d", "minus_one"], ["d_col"]), n("Mul", ["f", "d_col"], ["values"]),
        # Running sums: within blocks in fp32, of the blocks in fp64.
        n("Concat", ["blocks", "block", "C"], ["blocked_shape"], axis=0),
        n("Reshape", ["values", "blocked_shape"], ["values_blocked"]),
        n("CumSum", ["values_blocked", "one_s"], ["in_block"]),
        n("Reshape", ["in_block", "rows_shape"], ["in_block_rows"]),
        n("Gather", ["in_block", "last_in_block"], ["block_sums"], axis=1),
        n("Cast", ["block_sums"], ["block_sums64"], to=f64),
        n("CumSum", ["block_sums64", "zero_s"], ["through_block"]),
        n("Sub", ["through_block", "block_sums64"], ["before_block"]),
        # Each cell's first and last point.
        n("Range", ["zero_s", "N_s", "one_s"], ["point"]),
        n("Slice", ["key", "zero", "minus_one"], ["key_head"]), n("Slice", ["key", "one", "N"], ["key_tail"]),
        n("Concat", ["minus_one", "key_head"], ["key_prev"], axis=0),
        n("Concat", ["key_tail", "minus_one"], ["key_next"], axis=0),
        n("Less", ["key", "cells"], ["real"]),
        n("Equal", ["key", "key_prev"], ["same_prev"]), n("Not", ["same_prev"], ["run_start"]),
        n("Equal", ["key", "key_next"], ["same_next"]), n("Not", ["same_next"], ["run_end"]),
        n("And", ["run_start", "real"], ["writes_first"]), n("And", ["run_end", "real"], ["writes_last"]),
        n("Add", ["point", "cells"], ["own_slot"]),
        n("Where", ["writes_first", "key", "own_slot"], ["first_slot"]),
        n("Where", ["writes_last", "key", "own_slot"], ["last_slot"]),
        n("Unsqueeze", ["first_slot", "minus_one"], ["first_index"]),
        n("Unsqueeze", ["last_slot", "minus_one"], ["last_index"]),
        n("Add", ["cells", "N"], ["slots"]),
        n("ConstantOfShape", ["slots"], ["no_first"], value=helper.make_tensor("v0", i64, [1], [0])),
        n("ConstantOfShape", ["slots"], ["no_last"], value=helper.make_tensor("v1", i64, [1], [-1])),
        n("ScatterND", ["no_first", "first_index", "point"], ["first_slots"]),
        n("ScatterND", ["no_last", "last_index", "point"], ["last_slots"]),
        n("Slice", ["first_slots", "zero", "cells"], ["first"]),
        n("Slice", ["last_slots", "zero", "cells"], ["end"]),
        n("Sub", ["first", "one"], ["before"]),
    ]
    # running(j) = before_block[j // block] + in_block_rows[j], and 0 for j = -1.
    for j in ("end", "before"):
        nodes += [
            n("Less", [j, "zero"], [f"{j}_none"]), n("Unsqueeze", [f"{j}_none", "minus_one"], [f"{j}_none_col"]),
            n("Max", [j, "zero"], [f"{j}_at"]), n("Div", [f"{j}_at", "block"], [f"{j}_in_block_no"]),
            n("Gather", ["before_block", f"{j}_in_block_no"], [f"{j}_coarse_all"], axis=0),
            n("Gather", ["in_block_rows", f"{j}_at"], [f"{j}_fine_all"], axis=0),
            n("Where", [f"{j}_none_col", "zero_f64", f"{j}_coarse_all"], [f"{j}_coarse"]),
            n("CastLike", ["zero_f64", "in_block_rows"], [f"{j}_zero_f32"]),
            n("Where", [f"{j}_none_col", f"{j}_zero_f32", f"{j}_fine_all"], [f"{j}_fine"]),
        ]
    nodes += [
        n("Sub", ["end_coarse", "before_coarse"], ["coarse64"]), n("Cast", ["coarse64"], ["coarse"], to=f32),
        n("Sub", ["end_fine", "before_fine"], ["fine"]), n("Add", ["coarse", "fine"], ["flat"]),
        n("Concat", ["B", "Z", "Y", "X", "C"], ["grid_shape"], axis=0),
        n("Reshape", ["flat", "grid_shape"], ["grid"]),
        n("Transpose", ["grid"], ["bev"], perm=[0, 4, 1, 2, 3]),
    ]
    return helper.make_function(
        DOMAIN, f"{OP_TYPE}_unsorted" if unsorted else OP_TYPE,
        inputs=["depth", "feat", "ranks_depth", "ranks_feat", "ranks_bev", "interval_starts", "interval_lengths"],
        outputs=["bev"], nodes=nodes, opset_imports=[helper.make_opsetid("", opset)],
        attributes=["bev_z", "bev_y", "bev_x"],
    )


def _interval_count(node: onnx.NodeProto, graph: onnx.GraphProto) -> int | None:
    """K, the length of the node's interval_starts, where the graph records it."""
    name = node.input[5]
    for t in graph.initializer:
        if t.name == name:
            return int(np.prod(t.dims))
    for other in graph.node:
        if other.op_type == "Constant" and name in other.output and other.attribute[0].name == "value":
            return int(np.prod(other.attribute[0].t.dims))
    for v in [*graph.input, *graph.value_info]:
        if v.name == name:
            dims = v.type.tensor_type.shape.dim
            if len(dims) == 1 and dims[0].HasField("dim_value"):
                return dims[0].dim_value
    return None


def function_for(node: onnx.NodeProto, graph: onnx.GraphProto, opset: int) -> onnx.FunctionProto:
    """One definition per mode: sorted where the node's intervals are non-empty, else (also
    where their length is not recorded) the one that sorts first."""
    k = _interval_count(node, graph)
    return onnx_function(opset, unsorted=not k)


# Points per block of the numpy kernel: a block's (points, C) products stay in cache
# (measured at BEVDepth's shapes, benchmarks/bench_bev_pool.py: 4096 points x 80 channels
# ran 3.5x faster than one pass over all points, and 8x faster than np.add.at).
_BLOCK_POINTS = 4096


def numpy_kernel(depth, feat, ranks_depth, ranks_feat, ranks_bev, interval_starts, interval_lengths,
                 bev_z: int, bev_y: int, bev_x: int) -> np.ndarray:
    """The op for onnxruntime-extensions: per run of equal ranks, np.add.reduceat over the
    gathered products, in blocks of whole runs. Unsorted ranks (no intervals) lose their
    dropped points (< 0) and are sorted first (quicksort: the order within a cell only
    changes fp32 rounding); sorted runs of dropped points are summed into a spare row."""
    b, c = depth.shape[0], feat.shape[-1]
    cells = b * bev_z * bev_y * bev_x
    d, f = depth.reshape(-1), feat.reshape(-1, c)
    out = np.zeros((cells + 1, c), np.float32)  # the last row takes runs of dropped points
    if len(interval_starts) == 0:
        kept = np.flatnonzero(ranks_bev >= 0)
        order = kept[np.argsort(ranks_bev[kept])]
        rb, rd, rf = ranks_bev[order], ranks_depth[order], ranks_feat[order]
        starts = np.flatnonzero(np.r_[True, rb[1:] != rb[:-1]]) if len(rb) else np.zeros(0, np.intp)
    else:
        rd, rf, rb = ranks_depth, ranks_feat, ranks_bev
        starts, lengths = interval_starts.astype(np.intp), interval_lengths
        if (starts[0] != 0 or np.any(lengths <= 0) or np.any(starts[1:] != starts[:-1] + lengths[:-1])
                or int(starts[-1]) + int(lengths[-1]) != len(rb)):
            raise ValueError("BEVPool's intervals must be consecutive non-empty runs covering every point "
                             "(as prepare_ranks makes them), or empty for unsorted ranks")
    if len(starts):
        target = rb[starts].astype(np.intp)
        target[target < 0] = cells
        ends = np.r_[starts[1:], len(rb)]
        # Blocks of whole runs, about _BLOCK_POINTS points each (a longer run is one block).
        cuts = np.unique(np.r_[np.searchsorted(starts, np.arange(0, len(rb), _BLOCK_POINTS)), len(starts)])
        for lo, hi in zip(cuts[:-1].tolist(), cuts[1:].tolist()):
            p0, p1 = int(starts[lo]), int(ends[hi - 1])
            values = np.take(f, rf[p0:p1], axis=0)
            values *= d[rd[p0:p1]][:, None]
            out[target[lo:hi]] = np.add.reduceat(values, starts[lo:hi] - p0, axis=0)
    return out[:cells].reshape(b, bev_z, bev_y, bev_x, c).transpose(0, 4, 1, 2, 3).copy()


class _OrtxOutput(np.ndarray):
    """The kernel's output as onnxruntime-extensions (0.15) hands it back to ONNX Runtime.

    Its Python bridge returns each output as ``rv.flatten().tolist()``, a Python float per
    element, which its C++ side turns back into an array (numpy.ascontiguousarray, then a
    memcpy): about 100 ns an element, 100+ ms for BEVDepth's (1, 80, 1, 128, 128) BEV, four
    times the kernel. Here ``flatten().tolist()`` gives the flat float32 array itself, which
    the C++ side copies as it is; were the bridge to stop calling tolist, this is an
    ordinary array."""

    def flatten(self, order="C"):
        return np.ascontiguousarray(np.asarray(self).reshape(-1, order=order)).view(_OrtxOutput)

    def tolist(self):
        return np.asarray(self)


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
        out = numpy_kernel(depth, feat, rd, rf, rb, starts, lengths, int(attrs["bev_z"]), int(attrs["bev_y"]),
                           int(attrs["bev_x"]))
        return out.view(_OrtxOutput)

    _ORTX_REGISTERED = True
