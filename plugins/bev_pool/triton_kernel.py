"""``deploykit::BEVPool`` as Triton kernels.

Semantics: ``deploykit.ops.bev_pool`` (``reference``; the kernels follow its
``interval_walk`` and ``point_walk`` specs); nothing is redefined here.

Both kernels compute ``depth[ranks_depth] * feat[ranks_feat]`` per point in fp32 and write
the output in its final layout (B, C, Z, Y, X), contiguous: the element of cell r
(flat in B, Z, Y, X) and channel c is at ``(r // ZYX) * C * ZYX + c * ZYX + r % ZYX``.

``bev_pool_owner_kernel`` (sorted mode; and the unsorted mode's TensorRT AOT form)
  grid ``(cdiv(B * Z * Y * X, BLOCK_R), cdiv(C, BLOCK_C))``: each program owns BLOCK_R
  cells x BLOCK_C channels of the output. It zeroes them, then writes what lands in them,
  so one launch computes the whole op into uncleared memory (what a TensorRT AOT plugin
  needs: nothing clears its output) and no program touches another's cells.
  Sorted (K > 0): intervals are in cell order (the op's contract, prepare_ranks' output), so
  a program's intervals are one run: a binary search on the cells of the intervals' first
  points finds its start, and one run per cell bounds it to BLOCK_R intervals. It walks them as BEVPoolv2's CUDA kernel does (one thread per
  (interval, channel) there): the block's intervals' points in lockstep, ``j`` from 0 to the
  longest of them (a runtime bound from BLOCK_I scalar loads, so intervals longer than any
  block work; shorter ones are masked), ``depth * feat`` into a [BLOCK_I, BLOCK_C] fp32
  accumulator, each interval's sum stored once to the cell of its first point (a run of
  negative ranks, sorted first, is never in a program's range). No atomics: deterministic.
  Unsorted (K = 0, AOT only): every program scans all M points and adds its own with
  atomics in the output's dtype (fp16 sums then accumulate in fp16); the scan costs
  programs x M rank loads, so ``aot_plan`` chooses about 64 programs.
  Memory: ``feat`` is (.., C) channel-last, so each point's row segment of BLOCK_C channels
  is contiguous (coalesced); ranks and depth are one scalar per point. A program's cells
  are consecutive in one (Z, Y, X) plane, so its zero stores and, where the grid is densely
  hit, its sums go to nearby addresses (channels are ZYX apart: the price of writing
  (B, C, Z, Y, X) directly instead of a channel-last buffer and a transpose).

``bev_pool_points_kernel`` (unsorted mode, ``launch``)
  grid ``(cdiv(M, BLOCK_M), cdiv(C, BLOCK_C))``: one program per (block of points, block of
  channels), each adding its ``[BLOCK_M, BLOCK_C]`` products into an fp32 buffer zeroed by
  ``torch.zeros`` with ``tl.atomic_add``, points with ranks_bev < 0 masked out. The order of
  the adds (hence the last bits of the sums) is not deterministic on a GPU.

Dtypes: fp32 or fp16 depth and feat (mixed: the promoted type); the output has that type,
as the ONNX node's output has its input's (and the reference's). Accumulation is fp32 (in
registers, or in the fp32 buffer cast once at the end) except in the unsorted AOT form.

TensorRT's AOT plugin (``aot_plan``) launches the owner kernel with its arguments in
TensorRT's order ``(depth, feat, the five rank tensors, M, K, C, ZYX, CELLS, bev)``; the
mode is the constexpr SORTED, from K (a static shape). Not measured on a GPU (none was
available).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._aot import Plan, triton_type
from .._triton import check_device, check_float, check_index, current

BLOCK_I = 32
BLOCK_M = 128
BLOCK_C = 16


@triton.jit
def bev_pool_points_kernel(depth_ptr, feat_ptr, ranks_depth_ptr, ranks_feat_ptr, ranks_bev_ptr, acc_ptr,
                           M, C, ZYX, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    in_c = c < C
    c64 = c.to(tl.int64)
    cell = tl.load(ranks_bev_ptr + m, mask=m < M, other=-1).to(tl.int64)
    keep = cell >= 0
    rd = tl.load(ranks_depth_ptr + m, mask=keep, other=0).to(tl.int64)
    rf = tl.load(ranks_feat_ptr + m, mask=keep, other=0).to(tl.int64)
    both = keep[:, None] & in_c[None, :]
    d = tl.load(depth_ptr + rd, mask=keep, other=0.0).to(tl.float32)
    f = tl.load(feat_ptr + rf[:, None] * C + c64[None, :], mask=both, other=0.0).to(tl.float32)
    cell = tl.where(keep, cell, 0)
    dst = (cell // ZYX) * C * ZYX + cell % ZYX
    tl.atomic_add(acc_ptr + dst[:, None] + c64[None, :] * ZYX, d[:, None] * f, mask=both)


def launch(depth: torch.Tensor, feat: torch.Tensor, ranks_depth: torch.Tensor, ranks_feat: torch.Tensor,
           ranks_bev: torch.Tensor, interval_starts: torch.Tensor, interval_lengths: torch.Tensor,
           bev_z: int, bev_y: int, bev_x: int, *, block_r: int | None = None, block_i: int = BLOCK_I,
           block_m: int = BLOCK_M, block_c: int = BLOCK_C) -> torch.Tensor:
    """bev (B, C, bev_z, bev_y, bev_x), contiguous, from the ONNX node's inputs: depth
    (B, N, D, H, W) and feat (B, N, H, W, C) fp32/fp16, the five int32 (or int64) rank
    tensors; K = len(interval_starts) > 0 walks the intervals, K = 0 adds per point."""
    check_float("depth", depth)
    check_float("feat", feat)
    for name, t in zip(("ranks_depth", "ranks_feat", "ranks_bev", "interval_starts", "interval_lengths"),
                       (ranks_depth, ranks_feat, ranks_bev, interval_starts, interval_lengths)):
        check_index(name, t)
        if t.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got {tuple(t.shape)}")
    check_device(depth, feat, ranks_depth, ranks_feat, ranks_bev, interval_starts, interval_lengths)
    points, intervals = ranks_bev.shape[0], interval_starts.shape[0]
    if not ranks_depth.shape[0] == ranks_feat.shape[0] == points or interval_lengths.shape[0] != intervals:
        raise ValueError("ranks_depth, ranks_feat and ranks_bev (and the two interval tensors) must have equal "
                         "lengths")
    b, c = int(depth.shape[0]), int(feat.shape[-1])
    zyx = int(bev_z) * int(bev_y) * int(bev_x)
    dtype = torch.promote_types(depth.dtype, feat.dtype)
    shape = (b, c, int(bev_z), int(bev_y), int(bev_x))
    if points == 0 or b * c * zyx == 0:
        return torch.zeros(shape, dtype=dtype, device=depth.device)
    depth, feat = depth.contiguous(), feat.contiguous()
    ranks_depth, ranks_feat, ranks_bev = ranks_depth.contiguous(), ranks_feat.contiguous(), ranks_bev.contiguous()
    if intervals > 0:
        out = torch.empty(shape, dtype=dtype, device=depth.device)  # the owner kernel writes every cell
        block_r = block_r or SORTED_BLOCK_R
        grid = (triton.cdiv(b * zyx, block_r), triton.cdiv(c, block_c))
        current(bev_pool_owner_kernel)[grid](depth, feat, ranks_depth, ranks_feat, ranks_bev,
                                             interval_starts.contiguous(), interval_lengths.contiguous(), points,
                                             intervals, c, zyx, b * zyx, out, SORTED=True, BLOCK_R=block_r,
                                             BLOCK_I=block_i, BLOCK_M=block_m, BLOCK_C=block_c)
        return out
    acc = torch.zeros(shape, dtype=torch.float32, device=depth.device)
    grid = (triton.cdiv(points, block_m), triton.cdiv(c, block_c))
    current(bev_pool_points_kernel)[grid](depth, feat, ranks_depth, ranks_feat, ranks_bev, acc, points, c, zyx,
                                          BLOCK_M=block_m, BLOCK_C=block_c)
    return acc if dtype == torch.float32 else acc.to(dtype)

SORTED_BLOCK_R = 64  # cells per program, sorted mode: about 256 programs on a 128 x 128 grid
UNSORTED_PROGRAMS = 64


@triton.jit
def bev_pool_owner_kernel(depth_ptr, feat_ptr, ranks_depth_ptr, ranks_feat_ptr, ranks_bev_ptr, starts_ptr,
                          lengths_ptr, M, K, C, ZYX, CELLS, out_ptr, SORTED: tl.constexpr, BLOCK_R: tl.constexpr,
                          BLOCK_I: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    r0 = tl.program_id(0) * BLOCK_R
    r_end = r0 + BLOCK_R
    c = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    in_c = c < C
    r = (r0 + tl.arange(0, BLOCK_R)).to(tl.int64)
    # Widened through a tensor: Triton's JIT launcher passes an int argument equal to 1 as a
    # constexpr, which has no .to().
    zyx = r0.to(tl.int64) * 0 + ZYX
    plane = C * zyx  # elements per batch of the output
    tile = (r // zyx)[:, None] * plane + (r % zyx)[:, None] + c[None, :] * zyx
    tl.store(out_ptr + tile, tl.full([BLOCK_R, BLOCK_C], 0.0, dtype=out_ptr.dtype.element_ty),
             mask=(r < CELLS)[:, None] & in_c[None, :])
    # The zeros must land before this program's sums for the same cells.
    tl.debug_barrier()
    if SORTED:
        # The first interval whose cell is >= r0, by binary search (inlined: a @jit helper
        # would be built in the wrong mode, see plugins._triton.current). One run per cell,
        # so this program's intervals are among the next BLOCK_R.
        lo = K * 0
        hi = K + 0
        for _ in tl.static_range(32):
            live = lo < hi
            mid = lo + (hi - lo) // 2
            key = tl.load(ranks_bev_ptr + tl.load(starts_ptr + mid, mask=live, other=0), mask=live, other=0)
            hi = tl.where(live & (key >= r0), mid, hi)
            lo = tl.where(live & (key < r0), mid + 1, lo)
        k_end = tl.minimum(lo + BLOCK_R, K)
        # BEVPoolv2's interval walk over them: the block's intervals' points in lockstep, j
        # up to the longest of them (scalar loads: tl.max is a @jit library function), a
        # [BLOCK_I, BLOCK_C] fp32 accumulator, each interval's sum stored once to its cell.
        for k0 in range(lo, k_end, BLOCK_I):
            i = k0 + tl.arange(0, BLOCK_I)
            start = tl.load(starts_ptr + i, mask=i < k_end, other=0).to(tl.int64)
            cell = tl.load(ranks_bev_ptr + start, mask=i < k_end, other=-1).to(tl.int64)
            in_i = (i < k_end) & (cell < r_end)
            length = tl.load(lengths_ptr + i, mask=in_i, other=0)
            longest = tl.load(lengths_ptr + k0)
            for k in tl.static_range(1, BLOCK_I):
                longest = tl.maximum(longest, tl.load(lengths_ptr + k0 + k, mask=k0 + k < k_end, other=0))
            acc = tl.full((BLOCK_I, BLOCK_C), 0.0, tl.float32)
            for j in range(longest):
                on = in_i & (j < length)
                point = start + j
                rd = tl.load(ranks_depth_ptr + point, mask=on, other=0).to(tl.int64)
                rf = tl.load(ranks_feat_ptr + point, mask=on, other=0).to(tl.int64)
                d = tl.load(depth_ptr + rd, mask=on, other=0.0).to(tl.float32)
                f = tl.load(feat_ptr + rf[:, None] * C + c[None, :], mask=on[:, None] & in_c[None, :],
                            other=0.0).to(tl.float32)
                acc += d[:, None] * f
            keep = in_i & (cell >= 0)
            cell = tl.where(keep, cell, 0)
            dst = (cell // zyx) * plane + cell % zyx
            tl.store(out_ptr + dst[:, None] + c[None, :] * zyx, acc.to(out_ptr.dtype.element_ty),
                     mask=keep[:, None] & in_c[None, :])
    else:
        for p0 in range(0, M, BLOCK_M):
            p = p0 + tl.arange(0, BLOCK_M)
            cell = tl.load(ranks_bev_ptr + p, mask=p < M, other=-1)
            own = (cell >= r0) & (cell < r_end)
            rd = tl.load(ranks_depth_ptr + p, mask=own, other=0).to(tl.int64)
            rf = tl.load(ranks_feat_ptr + p, mask=own, other=0).to(tl.int64)
            d = tl.load(depth_ptr + rd, mask=own, other=0.0).to(tl.float32)
            cell64 = tl.where(own, cell, 0).to(tl.int64)
            dst = (cell64 // zyx) * plane + cell64 % zyx
            both = own[:, None] & in_c[None, :]
            f = tl.load(feat_ptr + rf[:, None] * C + c[None, :], mask=both, other=0.0).to(tl.float32)
            tl.atomic_add(out_ptr + dst[:, None] + c[None, :] * zyx, (d[:, None] * f).to(out_ptr.dtype.element_ty),
                          mask=both)


def aot_plan(shapes, dtypes, bev_z: int, bev_y: int, bev_x: int) -> Plan:
    """The AOT launch for a node whose seven inputs have these static shapes and TensorRT
    dtypes (see _aot). K = 0 (no intervals) is the unsorted mode."""
    names = ("depth_ptr", "feat_ptr", "ranks_depth_ptr", "ranks_feat_ptr", "ranks_bev_ptr", "starts_ptr",
             "lengths_ptr")
    batch, channels = shapes[0][0], shapes[1][-1]
    points, intervals = shapes[4][0], shapes[5][0]
    zyx = int(bev_z) * int(bev_y) * int(bev_x)
    cells = batch * zyx
    if intervals:
        block_r, block_c = SORTED_BLOCK_R, BLOCK_C
    else:  # every program scans all points: few programs, each with all (or 64) channels
        block_c = min(64, triton.next_power_of_2(max(channels, 1)))
        cell_programs = max(1, UNSORTED_PROGRAMS // triton.cdiv(channels, block_c))
        block_r = max(SORTED_BLOCK_R, triton.next_power_of_2(triton.cdiv(cells, cell_programs)))
    return Plan(bev_pool_owner_kernel, inputs={n: triton_type(d) for n, d in zip(names, dtypes)},
                scalars={"M": points, "K": intervals, "C": channels, "ZYX": zyx, "CELLS": cells},
                outputs={"out_ptr": triton_type(dtypes[0])},
                constexprs={"SORTED": bool(intervals), "BLOCK_R": block_r, "BLOCK_I": BLOCK_I, "BLOCK_M": BLOCK_M,
                            "BLOCK_C": block_c},
                grid=(max(1, triton.cdiv(cells, block_r)), max(1, triton.cdiv(channels, block_c))))
