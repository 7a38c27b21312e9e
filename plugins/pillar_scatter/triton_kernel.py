"""``deploykit::PillarScatter`` as a Triton kernel.

Semantics: ``deploykit.ops.pillar_scatter`` (its ``reference``); nothing is redefined here.

Launch grid: ``(cdiv(P, BLOCK_P), cdiv(C, BLOCK_C))``, one program per (block of pillars,
block of channels). A program loads its pillars' (y, x) from ``coords`` once, then moves the
``[BLOCK_C, BLOCK_P]`` tile ``features[0, c, p]`` to ``canvas[0, c, y * W + x]``.

Memory access: ``features`` is (1, C, P), pillars contiguous, so each channel row of the
tile is ``BLOCK_P`` consecutive elements (one coalesced load per row). The coords rows are
16 bytes each, read at stride 4 (y and x share cache lines). The stores are a scatter
by nature (pillars land in arbitrary cells); within a channel they go to one canvas row
of H*W elements. The canvas is zero-filled by ``torch.zeros`` (a memset) first; padding
rows (coords -1) and off-grid coordinates are masked out of the store. Pillars are
assumed to have distinct cells (as voxelization gives them): no atomics, and two pillars
in one cell leave either one (unspecified, as in the reference).

Dtypes: fp32 or fp16 features; the kernel only moves values, so the canvas has the
features' dtype (the ONNX node's output has its input's type) and is bit-exact.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton import check_device, check_float, check_index, current

BLOCK_P = 128
BLOCK_C = 16


@triton.jit
def pillar_scatter_kernel(features_ptr, coords_ptr, canvas_ptr, P, C, H, W,
                          BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    in_p = p < P
    p64 = p.to(tl.int64)
    y = tl.load(coords_ptr + p64 * 4 + 2, mask=in_p, other=-1).to(tl.int64)
    x = tl.load(coords_ptr + p64 * 4 + 3, mask=in_p, other=-1).to(tl.int64)
    valid = in_p & (y >= 0) & (y < H) & (x >= 0) & (x < W)
    cell = tl.where(valid, y * W + x, 0)
    c64 = c.to(tl.int64)
    in_c = c < C
    tile = tl.load(features_ptr + c64[:, None] * P + p64[None, :], mask=in_c[:, None] & in_p[None, :], other=0.0)
    tl.store(canvas_ptr + c64[:, None] * (H * W) + cell[None, :], tile, mask=in_c[:, None] & valid[None, :])


def launch(features: torch.Tensor, coords: torch.Tensor, height: int, width: int, *,
           block_p: int = BLOCK_P, block_c: int = BLOCK_C) -> torch.Tensor:
    """canvas (1, C, height, width) in features' dtype from features (1, C, P) fp32/fp16 and
    coords (P, 4) int32 (or int64) [batch, z, y, x], as the ONNX node takes them."""
    check_float("features", features)
    check_index("coords", coords)
    check_device(features, coords)
    if features.dim() != 3 or features.shape[0] != 1:
        raise ValueError(f"features must be (1, C, P), got {tuple(features.shape)}")
    _, channels, pillars = features.shape
    if coords.shape != (pillars, 4):
        raise ValueError(f"coords must be ({pillars}, 4), got {tuple(coords.shape)}")
    height, width = int(height), int(width)
    canvas = torch.zeros((1, channels, height, width), dtype=features.dtype, device=features.device)
    if pillars == 0 or channels == 0 or canvas.numel() == 0:
        return canvas
    grid = (triton.cdiv(pillars, block_p), triton.cdiv(channels, block_c))
    current(pillar_scatter_kernel)[grid](features.contiguous(), coords.contiguous(), canvas, pillars, channels,
                                         height, width, BLOCK_P=block_p, BLOCK_C=block_c)
    return canvas
