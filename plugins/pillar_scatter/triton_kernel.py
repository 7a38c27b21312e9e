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

AOT form (TensorRT's ahead-of-time plugin, ``aot_plan``): one launch must do everything,
zero-fill included, and TensorRT passes ``(features, coords, P, C, H, W, canvas)``. A
program cannot zero cells that another program may already have written, so
``pillar_scatter_owner_kernel`` gives each program a range of BLOCK_R cells (all channels):
it zeroes them, then scans every pillar and stores those landing in its range. The scan
is the price: every program reads all P coords (from L2 after the first), so BLOCK_R is
chosen to make about 256 programs, enough to fill a GPU while keeping the coords traffic
at 256 x P x 8 bytes. Not measured on a GPU (none was available).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._aot import Plan, triton_type
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


OWNER_PROGRAMS = 256  # programs the AOT kernel aims at (see the module docstring)
OWNER_BLOCK_P = 64
OWNER_BLOCK_C = 16


@triton.jit
def pillar_scatter_owner_kernel(features_ptr, coords_ptr, P, C, H, W, canvas_ptr,
                                BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    r0 = tl.program_id(0) * BLOCK_R
    r = r0 + tl.arange(0, BLOCK_R)
    # Widened through a tensor: Triton's JIT launcher passes an int equal to 1 as a constexpr.
    hw = (r0.to(tl.int64) * 0 + H) * W
    r_ok = r < hw
    zeros = tl.full([BLOCK_R], 0.0, dtype=canvas_ptr.dtype.element_ty)
    for ch in range(C):
        tl.store(canvas_ptr + ch * hw + r, zeros, mask=r_ok)
    # The zeros must land before this program's pillar stores to the same cells.
    tl.debug_barrier()
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        in_p = p < P
        p64 = p.to(tl.int64)
        y = tl.load(coords_ptr + p64 * 4 + 2, mask=in_p, other=-1).to(tl.int64)
        x = tl.load(coords_ptr + p64 * 4 + 3, mask=in_p, other=-1).to(tl.int64)
        cell = y * W + x
        own = in_p & (y >= 0) & (y < H) & (x >= 0) & (x < W) & (cell >= r0) & (cell < r0 + BLOCK_R)
        for c0 in range(0, C, BLOCK_C):
            c = (c0 + tl.arange(0, BLOCK_C)).to(tl.int64)
            m = (c < C)[:, None] & own[None, :]
            tile = tl.load(features_ptr + c[:, None] * P + p64[None, :], mask=m, other=0.0)
            tl.store(canvas_ptr + c[:, None] * hw + cell[None, :], tile, mask=m)


def aot_plan(features_shape, features_dtype, coords_shape, coords_dtype, height: int, width: int) -> Plan:
    """The AOT launch for a node with these static shapes and TensorRT dtypes (see _aot)."""
    _, channels, pillars = features_shape
    cells = int(height) * int(width)
    block_r = max(256, triton.next_power_of_2(triton.cdiv(cells, OWNER_PROGRAMS)))
    return Plan(pillar_scatter_owner_kernel,
                inputs={"features_ptr": triton_type(features_dtype), "coords_ptr": triton_type(coords_dtype)},
                scalars={"P": pillars, "C": channels, "H": int(height), "W": int(width)},
                outputs={"canvas_ptr": triton_type(features_dtype)},
                constexprs={"BLOCK_R": block_r, "BLOCK_P": OWNER_BLOCK_P, "BLOCK_C": OWNER_BLOCK_C},
                grid=(max(1, triton.cdiv(cells, block_r)),))
