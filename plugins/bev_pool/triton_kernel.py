"""``deploykit::BEVPool`` as Triton kernels, one per mode.

Semantics: ``deploykit.ops.bev_pool`` (``reference``; the kernels follow its
``interval_walk`` and ``point_walk`` specs); nothing is redefined here.

Both kernels compute ``depth[ranks_depth] * feat[ranks_feat]`` per point in fp32 and write
the output in its final layout (B, C, Z, Y, X), contiguous: the element of cell r
(flat in B, Z, Y, X) and channel c is at ``(r // ZYX) * C * ZYX + c * ZYX + r % ZYX``.
The output is zero-filled by ``torch.zeros`` first, so cells no point lands in are exactly 0.

Sorted mode (K > 0 intervals), ``bev_pool_intervals_kernel``
  grid ``(cdiv(K, BLOCK_I), cdiv(C, BLOCK_C))``: one program per (block of intervals, block
  of channels), as BEVPoolv2's CUDA kernel is one thread per (interval, channel). The
  program walks its intervals' points in lockstep, ``j`` from 0 to the longest of its
  intervals (a runtime loop bound, found by BLOCK_I scalar loads of the lengths, so
  intervals of any length, longer than any block, work; shorter ones are masked, so a
  block costs its longest interval), adding ``depth * feat`` into a ``[BLOCK_I, BLOCK_C]`` fp32
  accumulator, and writes each interval's sum once, to the cell of its first point (a run
  with a negative rank is skipped). Every cell is written by one program: no atomics, and
  the result is deterministic.
  Memory: ``feat`` is (.., C) channel-last, so each point's row segment of BLOCK_C channels
  is contiguous (coalesced); ranks and depth are one scalar per point. Intervals are
  sorted by cell, so a block's cells are increasing and, where the grid is densely hit,
  neighbours: for each channel the block's stores go to nearby addresses of one
  (Z, Y, X) plane (channels are ZYX apart: the price of writing (B, C, Z, Y, X) directly
  instead of a channel-last buffer and a transpose).

Unsorted mode (K = 0), ``bev_pool_points_kernel``
  grid ``(cdiv(M, BLOCK_M), cdiv(C, BLOCK_C))``: one program per (block of points, block of
  channels), each adding its ``[BLOCK_M, BLOCK_C]`` products into the output with
  ``tl.atomic_add`` (fp32), points with ranks_bev < 0 masked out. The order of the adds
  (hence the last bits of the sums) is not deterministic on a GPU. Loads are as above.

Dtypes: fp32 or fp16 depth and feat (mixed: the promoted type); the output has that type,
as the ONNX node's output has its input's (and the reference's). Accumulation is fp32: in
registers (sorted) or in an fp32 buffer cast once at the end (unsorted, for fp16 output).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton import check_device, check_float, check_index, current

BLOCK_I = 32
BLOCK_M = 128
BLOCK_C = 16


@triton.jit
def bev_pool_intervals_kernel(depth_ptr, feat_ptr, ranks_depth_ptr, ranks_feat_ptr, ranks_bev_ptr,
                              starts_ptr, lengths_ptr, out_ptr, K, C, ZYX,
                              BLOCK_I: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_i = tl.program_id(0)
    pid_c = tl.program_id(1)
    i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    in_i = i < K
    in_c = c < C
    c64 = c.to(tl.int64)
    start = tl.load(starts_ptr + i, mask=in_i, other=0).to(tl.int64)
    length = tl.load(lengths_ptr + i, mask=in_i, other=0)
    acc = tl.full((BLOCK_I, BLOCK_C), 0.0, tl.float32)
    # The block's longest interval, by scalar loads (tl.max is a @triton.jit library
    # function: see plugins._triton.current).
    first = pid_i * BLOCK_I
    longest = tl.load(lengths_ptr + first)  # first < K: the grid has no program without intervals
    for k in tl.static_range(1, BLOCK_I):
        longest = tl.maximum(longest, tl.load(lengths_ptr + first + k, mask=first + k < K, other=0))
    for j in range(longest):
        live = in_i & (j < length)
        point = start + j
        rd = tl.load(ranks_depth_ptr + point, mask=live, other=0).to(tl.int64)
        rf = tl.load(ranks_feat_ptr + point, mask=live, other=0).to(tl.int64)
        d = tl.load(depth_ptr + rd, mask=live, other=0.0).to(tl.float32)
        f = tl.load(feat_ptr + rf[:, None] * C + c64[None, :], mask=live[:, None] & in_c[None, :],
                    other=0.0).to(tl.float32)
        acc += d[:, None] * f
    cell = tl.load(ranks_bev_ptr + start, mask=in_i, other=-1).to(tl.int64)
    keep = in_i & (cell >= 0)
    cell = tl.where(keep, cell, 0)
    dst = (cell // ZYX) * C * ZYX + cell % ZYX
    tl.store(out_ptr + dst[:, None] + c64[None, :] * ZYX, acc.to(out_ptr.dtype.element_ty),
             mask=keep[:, None] & in_c[None, :])


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
           bev_z: int, bev_y: int, bev_x: int, *, block_i: int = BLOCK_I, block_m: int = BLOCK_M,
           block_c: int = BLOCK_C) -> torch.Tensor:
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
    out = torch.zeros(shape, dtype=dtype, device=depth.device)
    if points == 0 or out.numel() == 0:
        return out
    depth, feat = depth.contiguous(), feat.contiguous()
    ranks_depth, ranks_feat, ranks_bev = ranks_depth.contiguous(), ranks_feat.contiguous(), ranks_bev.contiguous()
    if intervals > 0:
        grid = (triton.cdiv(intervals, block_i), triton.cdiv(c, block_c))
        current(bev_pool_intervals_kernel)[grid](depth, feat, ranks_depth, ranks_feat, ranks_bev,
                                                 interval_starts.contiguous(), interval_lengths.contiguous(), out,
                                                 intervals, c, zyx, BLOCK_I=block_i, BLOCK_C=block_c)
        return out
    acc = out if dtype == torch.float32 else torch.zeros(shape, dtype=torch.float32, device=depth.device)
    grid = (triton.cdiv(points, block_m), triton.cdiv(c, block_c))
    current(bev_pool_points_kernel)[grid](depth, feat, ranks_depth, ranks_feat, ranks_bev, acc, points, c, zyx,
                                          BLOCK_M=block_m, BLOCK_C=block_c)
    return acc if acc is out else acc.to(dtype)
