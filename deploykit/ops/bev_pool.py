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
onnx_function), sorting unsorted ranks in the graph first; the numpy kernel works by
(cell, pixel) pair: a pixel's feature row is the same for all its depth bins, so the
depths of a pixel's points in one cell are summed first and the row multiplied once per
pair, then each cell's pairs summed (a matmul per block of cells), sorting unsorted ranks
by (cell, pixel) first. The sums agree to fp32 rounding (tested against the walks and
against BEVDepth's dense frustum pooling). prepare_ranks leaves points outside the grid
out of the ranks altogether, and orders a cell's points by pixel, then depth bin, so a
pixel's points in a cell are adjacent (any order within a cell is valid input).
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

OP_TYPE = "BEVPool"
DOMAIN = "deploykit"
RANK_NAMES = ("ranks_depth", "ranks_feat", "ranks_bev", "interval_starts", "interval_lengths")


def prepare_ranks(cells: np.ndarray, grid: tuple[int, int, int]) -> dict[str, np.ndarray]:
    """The op's constant inputs from each frustum point's voxel (B, N, D, H, W, 3) as
    integer (x, y, z) cells: points off the (Z, Y, X) grid are dropped, the rest sorted by
    cell with the runs' starts and lengths.

    Within a cell the points are ordered by pixel (ranks_feat), then depth bin (ranks_depth),
    not in frustum order (n, d, h, w): the depth bins of one pixel ray that land in one cell
    are then adjacent, and since the feature depends only on the pixel, a kernel can sum
    their depths first and multiply the pixel's feature row once per (cell, pixel) pair
    (numpy_kernel does; at BEVDepth's shapes 285,726 points form 202,751 pairs). The op's
    sums do not depend on the order within a cell beyond fp32 rounding."""
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
    order = np.lexsort((ranks_depth, ranks_feat, ranks_bev))  # by cell, then pixel, then depth bin
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
        return kernels.forward("bev_pool", reference, depth, feat, ranks_depth, ranks_feat, ranks_bev,
                               interval_starts, interval_lengths, bev_z, bev_y, bev_x)

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
    for k, node in enumerate(nodes):  # named, so profiles attribute the inlined body to the op
        node.name = node.name or f"bev_pool/{node.op_type}_{k}"
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


# Feature rows per matmul of the numpy kernel: a block's gathered (rows, C) stay in cache
# (measured at BEVDepth's shapes, benchmarks/bench_bev_pool.py: 2048 and 4096 ran alike,
# 1024 and 8192-16384 about 15% slower).
_BLOCK_ROWS = 4096
# Layouts of sorted (constant) ranks the numpy kernel keeps, most recently used first.
_LAYOUT_CACHE = 4
_layouts: list[tuple[tuple[np.ndarray, ...], _PairLayout]] = []


class _PairLayout:
    """How numpy_kernel sums one set of ranks, by (cell, pixel) pair.

    A pair is a run of sorted points with equal (ranks_bev, ranks_feat) inside one cell's
    run: its points share one feature row, so its term is (sum of its depths) x that row.
    The pairs of the cells (runs of dropped points left out) are laid out in "slots": the
    cells grouped by their number of pairs k, each group's cells one after another with
    their k pairs, so a block of n cells is one (n, 1, k) @ (n, k, C) matmul.

      depth_index  ranks_depth of the points, each pair's adjacent
      pair_starts  first point of each pair in depth_index (np.add.reduceat's indices)
      slot_pairs   the pair of each slot, or None where the pairs are in slot order
      feat_index   each slot's feature row
      blocks       [(first slot, n cells, k, the cells' rows in the flat output)]

    Built from the sorted points: pair_first (P,) each pair's first point, pair_feat (P,)
    its feature row, cell_first (K,) each cell's first pair, target (K,) its row (< 0:
    dropped), point_depth (M,) each point's ranks_depth. ``slot_order`` puts the points
    themselves in slot order (a few ms to build, a gather less per call: for cached layouts)."""

    def __init__(self, pair_first, pair_feat, cell_first, target, point_depth, slot_order: bool):
        self.block_rows = _BLOCK_ROWS
        m, p = len(point_depth), len(pair_first)
        pairs_per_cell = np.diff(np.r_[cell_first, p])
        kept = np.flatnonzero(target >= 0)
        by_k = kept[np.argsort(pairs_per_cell[kept], kind="stable")]
        ks = pairs_per_cell[by_k]
        edges = np.flatnonzero(np.r_[True, ks[1:] != ks[:-1], True]) if len(ks) else np.zeros(1, np.intp)
        slot_pairs, self.blocks, offset = [], [], 0
        for lo, hi in zip(edges[:-1].tolist(), edges[1:].tolist()):
            k, group = int(ks[lo]), by_k[lo:hi]
            slot_pairs.append((cell_first[group][:, None] + np.arange(k)).reshape(-1))
            step = max(1, _BLOCK_ROWS // k)
            for a in range(0, len(group), step):
                cells = group[a:a + step]
                self.blocks.append((offset, len(cells), k, target[cells].astype(np.intp)))
                offset += len(cells) * k
        slot_pairs = np.concatenate(slot_pairs) if slot_pairs else np.zeros(0, np.intp)
        self.feat_index = pair_feat[slot_pairs].astype(np.intp)
        if slot_order:
            lengths = np.diff(np.r_[pair_first, m])[slot_pairs]
            self.pair_starts = np.r_[0, np.cumsum(lengths)[:-1]].astype(np.intp) if len(lengths) else slot_pairs
            points = np.repeat(pair_first[slot_pairs] - self.pair_starts, lengths) + np.arange(int(lengths.sum()))
            self.depth_index, self.slot_pairs = point_depth[points].astype(np.intp), None
        else:
            self.depth_index, self.pair_starts = point_depth.astype(np.intp), pair_first
            self.slot_pairs = slot_pairs

    @classmethod
    def of_sorted(cls, ranks_depth, ranks_feat, ranks_bev, interval_starts, slot_order=True) -> _PairLayout:
        """Sorted ranks with their intervals: a pair never crosses an interval's start, and
        each interval's sum goes to the cell of its first point (interval_walk's rule)."""
        m = len(ranks_bev)
        cell_start = np.zeros(m, bool)
        cell_start[interval_starts] = True
        new_pair = cell_start.copy()
        new_pair[1:] |= (ranks_bev[1:] != ranks_bev[:-1]) | (ranks_feat[1:] != ranks_feat[:-1])
        pair_first = np.flatnonzero(new_pair)
        cell_first = np.flatnonzero(cell_start[pair_first])
        return cls(pair_first, ranks_feat[pair_first], cell_first, ranks_bev[pair_first[cell_first]], ranks_depth,
                   slot_order)

    @classmethod
    def of_unsorted(cls, ranks_depth, ranks_feat, ranks_bev, rows: int) -> _PairLayout:
        """Ranks in any order (rows: feat's (B*N*H*W)): the dropped points (< 0) left out,
        the rest sorted by (cell, pixel), a pixel's points in a cell in the order given: one
        np.sort of a packed int64 key (cell, pixel, point) where it fits in 63 bits (at
        BEVDepth's shapes 1.4 ms, an argsort of (cell, pixel) 3.8 ms), else a lexsort."""
        m = len(ranks_bev)
        bits = max(1, m.bit_length())
        top = int(ranks_bev.max()) + 1 if m else 1
        if top * rows >= 2 ** (63 - bits):
            kept = np.flatnonzero(ranks_bev >= 0)
            order = kept[np.lexsort((ranks_feat[kept], ranks_bev[kept]))]
            rb = ranks_bev[order]
            starts = np.flatnonzero(np.r_[True, rb[1:] != rb[:-1]]) if len(rb) else np.zeros(0, np.intp)
            return cls.of_sorted(ranks_depth[order], ranks_feat[order], rb, starts, slot_order=False)
        key = ranks_bev.astype(np.int64)
        key *= rows
        key += ranks_feat
        key <<= bits
        key |= np.arange(m, dtype=np.int64)
        key[ranks_bev < 0] = -1
        key.sort()
        key = key[np.searchsorted(key, 0):]
        pair_key = key >> bits  # cell * rows + pixel
        pair_first = np.flatnonzero(np.r_[True, pair_key[1:] != pair_key[:-1]]) if len(key) else np.zeros(0, np.intp)
        cell, pixel = np.divmod(pair_key[pair_first], rows)
        cell_first = np.flatnonzero(np.r_[True, cell[1:] != cell[:-1]]) if len(cell) else np.zeros(0, np.intp)
        return cls(pair_first, pixel, cell_first, cell[cell_first], ranks_depth[key & ((1 << bits) - 1)], False)

    def pool(self, d: np.ndarray, f: np.ndarray, cells: int) -> np.ndarray:
        """(cells, C) from the flat depth d and the feature rows f (B*N*H*W, C)."""
        out = np.zeros((cells, f.shape[1]), np.float32)
        if not self.blocks:
            return out
        weight = np.add.reduceat(np.take(d, self.depth_index), self.pair_starts)  # each pair's depth sum
        if self.slot_pairs is not None:
            weight = weight[self.slot_pairs]
        for offset, n, k, target in self.blocks:
            rows = np.take(f, self.feat_index[offset:offset + n * k], axis=0).reshape(n, k, f.shape[1])
            out[target] = np.matmul(weight[offset:offset + n * k].reshape(n, 1, k), rows).reshape(n, -1)
        return out


def _sorted_layout(ranks_depth, ranks_feat, ranks_bev, interval_starts) -> _PairLayout:
    """The layout of sorted ranks, kept across calls: they are a fixed rig's constants, which
    onnxruntime-extensions hands the kernel anew each call. A hit compares the arrays in
    full (0.1-0.3 ms at BEVDepth's shapes; building one takes 3-4 ms,
    half again the ~7 ms of the kernel with a cached layout)."""
    key = (interval_starts, ranks_bev, ranks_feat, ranks_depth)  # the smallest, and likeliest to differ, first
    for i, (cached, layout) in enumerate(_layouts):
        if layout.block_rows == _BLOCK_ROWS and all(a.shape == b.shape and np.array_equal(a, b)
                                                    for a, b in zip(cached, key)):
            _layouts.insert(0, _layouts.pop(i))
            return layout
    layout = _PairLayout.of_sorted(ranks_depth, ranks_feat, ranks_bev, interval_starts)
    _layouts.insert(0, (tuple(np.array(a) for a in key), layout))
    del _layouts[_LAYOUT_CACHE:]
    return layout


def numpy_kernel(depth, feat, ranks_depth, ranks_feat, ranks_bev, interval_starts, interval_lengths,
                 bev_z: int, bev_y: int, bev_x: int) -> np.ndarray:
    """The op for onnxruntime-extensions, by (cell, pixel) pair (``_PairLayout``): each pair's
    depths summed (np.add.reduceat), then per cell the matmul of its pairs' depth sums with
    their feature rows, cells with as many pairs batched. Correct for any sorted ranks;
    prepare_ranks' have a pixel's points in a cell adjacent, one pair each. Sorted ranks'
    layouts are cached (``_sorted_layout``); unsorted ranks (no intervals) are sorted by
    (cell, pixel), their dropped points (< 0) left out, and laid out each call."""
    b, c = depth.shape[0], feat.shape[-1]
    cells = b * bev_z * bev_y * bev_x
    d, f = depth.reshape(-1), feat.reshape(-1, c)
    if len(interval_starts) == 0:
        layout = _PairLayout.of_unsorted(ranks_depth, ranks_feat, ranks_bev, f.shape[0])
    else:
        starts, lengths = interval_starts.astype(np.intp), interval_lengths
        if (starts[0] != 0 or np.any(lengths <= 0) or np.any(starts[1:] != starts[:-1] + lengths[:-1])
                or int(starts[-1]) + int(lengths[-1]) != len(ranks_bev)):
            raise ValueError("BEVPool's intervals must be consecutive non-empty runs covering every point "
                             "(as prepare_ranks makes them), or empty for unsorted ranks")
        layout = _sorted_layout(ranks_depth, ranks_feat, ranks_bev, interval_starts)
    out = layout.pool(d, f, cells)
    return out.reshape(b, bev_z, bev_y, bev_x, c).transpose(0, 4, 1, 2, 3).copy()


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
