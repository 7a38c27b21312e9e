"""``deploykit::DeformConv`` (mmcv's DCN v1 / v2) as one Triton kernel, an implicit GEMM.

Semantics: ``deploykit.ops.deform_conv`` (its ``reference``; mmcv's bilinear im2col rule
and offset layout are spelled out in that module's docstring); nothing is redefined here.

The convolution is a GEMM per conv group, out[p, co] = sum_r cols[p, r] * weight[co, r],
with p = (b, ho, wo) flattened, r = (input channel of the group, tap) and ``cols`` mmcv's
im2col buffer. The kernel never writes ``cols`` to memory: each program builds the
[BLOCK_P, BLOCK_K] slices of it that it needs by bilinear gathers and feeds them straight
to ``tl.dot``, so the only HBM traffic is the inputs' reads and one write per output.

Launch grid (``plan``): ``(cdiv(B * Ho * Wo, BLOCK_P), groups * cdiv(Cout / groups, BLOCK_CO), 1)``,
one program per (block of output positions, block of one conv group's output channels).
Positions are on axis 0 because that is the axis with no 65535 limit. A program holds a
[BLOCK_P, BLOCK_CO] fp32 accumulator and walks the reduction as
  for each deform group overlapping its conv group (usually exactly one)
    for each tap k = i * kw + j
      load its positions' (dy, dx) and mask once, and compute the four corners'
      addresses, validity and bilinear weights (mask folded in) once: [BLOCK_P] vectors
      for each BLOCK_K channels of (conv group ∩ deform group)
        gather the four corners [BLOCK_P, BLOCK_K] and combine them: the cols slice
        load the weight slice [BLOCK_K, BLOCK_CO] and accumulate with tl.dot
rather than over r in weight order, so that offsets, mask and bilinear weights, which
depend on (position, deform group, tap) and not on the channel, are loaded and computed
once per program instead of once per channel. Bias is added to the accumulator at the end.
Every output element is stored by exactly one program (``launch`` allocates it with
``torch.empty``): one launch is the whole op, no memset, no atomics, deterministic.

Memory access: input is NCHW, so a corner gather reads, for each channel of the chunk,
BLOCK_P pixels of one plane; neighbouring output positions of one row sample neighbouring
pixels (stride apart, plus their offsets), which keeps the gathers mostly within a few
cache lines. Offsets and mask are (B, ch, Ho, Wo): for a fixed channel the BLOCK_P
positions are contiguous (coalesced). The weight slice is (co, c, k) with stride
C / groups * K between output channels; the weights are small and stay in L2. The stores
are contiguous along positions for each output channel.

Dtypes: fp32 or fp16, all float inputs of one type (the ONNX node's T); the output has that
type. Positions and bilinear weights are computed in fp32 and the accumulator is fp32; the
cols slice goes into ``tl.dot`` in the input type: fp32 with ``input_precision="ieee"`` (no
TF32 rounding: fp32 results match the reference to fp32 rounding), fp16 on the tensor cores
(the sampled values rounded to fp16 first, as mmcv's fp16 columns buffer rounds them).

Addresses are int64 wherever a product can pass 2**31 (batch and channel strides, output
positions); within one plane (H * W, Ho * Wo) they are int32, and ``launch`` refuses planes
that would not fit. When HAS_MASK / HAS_BIAS is false the pointer is never read (``launch``
passes the input's pointer there). Argument order, for the TensorRT AOT plugin that launches
the kernel directly: the node's tensor inputs in its order, the int32 shape and attribute
scalars, the output pointer, then the constexprs that ``plan`` returns.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deploykit.ops.deform_conv import _check, _present, output_size

from .._aot import Plan, triton_type
from .._triton import check_device, check_float, current

BLOCK_P = 64  # output positions per program
BLOCK_CO = 64  # output channels per program (at most; fewer for narrow groups)
BLOCK_K = 32  # input channels per tl.dot step (at most; 16 for narrow groups)
MIN_BLOCK = 16  # tl.dot's smallest dimension on NVIDIA GPUs
# Launch options (not measured on a GPU: none was at hand). Two stages pipeline the weight
# loads and keep the fp32 kernel at 48 KB of shared memory (3, Triton's default, takes 88 KB
# for its FMA dot operands, halving the programs per SM); the fp16 kernel needs 8 KB either way.
NUM_WARPS = 4
NUM_STAGES = 2

_INT32_MAX = 2**31 - 1

# The kernel's int32 scalar arguments, in order (between bias_ptr and out_ptr).
SCALARS = ("B", "C", "H", "W", "Cout", "Ho", "Wo", "stride_h", "stride_w", "pad_h", "pad_w", "dilation_h",
           "dilation_w", "groups", "deform_groups")


@triton.jit
def deform_conv_kernel(input_ptr, offset_ptr, mask_ptr, weight_ptr, bias_ptr,
                       B, C, H, W, Cout, Ho, Wo, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w,
                       groups, deform_groups, out_ptr,
                       HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                       BLOCK_P: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_p = tl.program_id(0)
    pid_co = tl.program_id(1)
    cin_g = C // groups
    cout_g = Cout // groups
    per_dg = C // deform_groups
    co_blocks = (cout_g + BLOCK_CO - 1) // BLOCK_CO
    g = pid_co // co_blocks
    co_local = (pid_co % co_blocks) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    in_co = co_local < cout_g
    co = g * cout_g + co_local
    co64 = co.to(tl.int64)

    # int64 scalars by addition, not .to(): the JIT launcher turns int arguments equal to 1
    # into constexprs, which have no .to().
    zero64 = tl.full([], 0, tl.int64)
    hw_in64 = zero64 + H * W
    hw_out64 = zero64 + Ho * Wo
    p = pid_p.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    in_p = p < hw_out64 * B
    b = tl.where(in_p, p // hw_out64, 0)
    pos = (p % hw_out64).to(tl.int32)  # ho * Wo + wo
    ho = pos // Wo
    wo = pos % Wo
    in_base = b * C * hw_in64  # input[b, 0, 0, 0]
    off_base = b * (deform_groups * 2 * KH * KW) * hw_out64 + pos  # offset[b, 0, ho, wo]
    mask_base = b * (deform_groups * KH * KW) * hw_out64 + pos  # mask[b, 0, ho, wo]
    w_row = co64 * (cin_g * KH * KW)  # weight[co, 0, 0, 0]

    acc = tl.full((BLOCK_P, BLOCK_CO), 0.0, tl.float32)
    c_first = g * cin_g
    c_end = c_first + cin_g
    for dgi in range(c_first // per_dg, (c_end - 1) // per_dg + 1):
        lo = tl.maximum(c_first, dgi * per_dg)
        hi = tl.minimum(c_end, dgi * per_dg + per_dg)
        for k in range(KH * KW):
            i = k // KW
            j = k % KW
            tap = dgi * (KH * KW) + k
            dy = tl.load(offset_ptr + off_base + (tap * 2) * hw_out64, mask=in_p, other=0.0).to(tl.float32)
            dx = tl.load(offset_ptr + off_base + (tap * 2 + 1) * hw_out64, mask=in_p, other=0.0).to(tl.float32)
            y = (ho * stride_h - pad_h + i * dilation_h).to(tl.float32) + dy
            x = (wo * stride_w - pad_w + j * dilation_w).to(tl.float32) + dx
            # mmcv's guard: nothing unless -1 < y < H and -1 < x < W (NaN offsets fail it too).
            inside = in_p & (y > -1.0) & (y < H) & (x > -1.0) & (x < W)
            y = tl.where(inside, y, 0.0)  # keeps floor() and the int conversion in range
            x = tl.where(inside, x, 0.0)
            y0f = tl.floor(y)
            x0f = tl.floor(x)
            ly = y - y0f
            lx = x - x0f
            hy = 1.0 - ly
            hx = 1.0 - lx
            y0 = y0f.to(tl.int32)
            x0 = x0f.to(tl.int32)
            if HAS_MASK:
                m = tl.load(mask_ptr + mask_base + tap * hw_out64, mask=in_p, other=0.0).to(tl.float32)
                hy = hy * m
                ly = ly * m
            # The four corners: each off the image reads zero.
            top = inside & (y0 >= 0)
            bottom = inside & (y0 + 1 < H)
            left = x0 >= 0
            right = x0 + 1 < W
            ok00 = top & left
            ok01 = top & right
            ok10 = bottom & left
            ok11 = bottom & right
            s00 = in_base + tl.where(ok00, y0 * W + x0, 0)
            s01 = in_base + tl.where(ok01, y0 * W + x0 + 1, 0)
            s10 = in_base + tl.where(ok10, (y0 + 1) * W + x0, 0)
            s11 = in_base + tl.where(ok11, (y0 + 1) * W + x0 + 1, 0)
            w00 = hy * hx
            w01 = hy * lx
            w10 = ly * hx
            w11 = ly * lx
            for c0 in range(lo, hi, BLOCK_K):
                c = c0 + tl.arange(0, BLOCK_K)
                in_c = c < hi
                plane = c.to(tl.int64) * hw_in64
                v = tl.load(input_ptr + s00[:, None] + plane[None, :], mask=ok00[:, None] & in_c[None, :],
                            other=0.0).to(tl.float32) * w00[:, None]
                v += tl.load(input_ptr + s01[:, None] + plane[None, :], mask=ok01[:, None] & in_c[None, :],
                             other=0.0).to(tl.float32) * w01[:, None]
                v += tl.load(input_ptr + s10[:, None] + plane[None, :], mask=ok10[:, None] & in_c[None, :],
                             other=0.0).to(tl.float32) * w10[:, None]
                v += tl.load(input_ptr + s11[:, None] + plane[None, :], mask=ok11[:, None] & in_c[None, :],
                             other=0.0).to(tl.float32) * w11[:, None]
                r = (c - c_first) * (KH * KW) + k  # weight's (channel, tap) column
                wt = tl.load(weight_ptr + w_row[None, :] + r[:, None], mask=in_c[:, None] & in_co[None, :],
                             other=0.0)
                acc = tl.dot(v.to(weight_ptr.dtype.element_ty), wt, acc, input_precision="ieee",
                             out_dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + co64, mask=in_co, other=0.0).to(tl.float32)[None, :]
    dst = b * Cout * hw_out64 + pos
    tl.store(out_ptr + dst[:, None] + (co64 * hw_out64)[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=in_p[:, None] & in_co[None, :])


def _pow2_block(n: int, most: int) -> int:
    return min(most, max(MIN_BLOCK, triton.next_power_of_2(max(int(n), 1))))


def plan(b: int, c: int, h: int, w: int, cout: int, kh: int, kw: int, ho: int, wo: int, groups: int,
         deform_groups: int = 1, has_mask: bool = True, has_bias: bool = True, *, block_p: int | None = None,
         block_co: int | None = None, block_k: int | None = None) -> tuple[tuple[int, int, int], dict]:
    """The launch grid and the kernel's constexprs for these (static) shapes.

    Pure Python on ints, shared by ``launch`` and the TensorRT AOT plugin, which compiles
    the kernel with exactly these constexprs (and ``num_warps=NUM_WARPS``,
    ``num_stages=NUM_STAGES``) and launches it on this grid. BLOCK_CO shrinks to the
    group's output channels and BLOCK_K to the longest channel run of one (conv group ∩
    deform group), down to 16 (tl.dot's minimum), so narrow groups waste fewer masked
    lanes. ``block_*`` override the choice (tests use other blocks for more programs; a
    compiled kernel needs each >= 16)."""
    cout_g = cout // groups
    block_p = int(block_p or BLOCK_P)
    block_co = int(block_co or _pow2_block(cout_g, BLOCK_CO))
    block_k = int(block_k or _pow2_block(min(c // groups, c // deform_groups), BLOCK_K))
    grid = (triton.cdiv(b * ho * wo, block_p), groups * triton.cdiv(cout_g, block_co), 1)
    constexprs = {"HAS_MASK": bool(has_mask), "HAS_BIAS": bool(has_bias), "KH": int(kh), "KW": int(kw),
                  "BLOCK_P": block_p, "BLOCK_CO": block_co, "BLOCK_K": block_k}
    return grid, constexprs


def launch(x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor | None, weight: torch.Tensor,
           bias: torch.Tensor | None, stride_h: int = 1, stride_w: int = 1, pad_h: int = 0, pad_w: int = 0,
           dilation_h: int = 1, dilation_w: int = 1, groups: int = 1, deform_groups: int = 1, *,
           block_p: int | None = None, block_co: int | None = None, block_k: int | None = None) -> torch.Tensor:
    """(B, Cout, Ho, Wo), contiguous, in x's dtype, from the ONNX node's inputs (x (B, C, H, W),
    offset, mask or None / 0 elements, weight (Cout, C / groups, kh, kw), bias (Cout,) or
    None / 0 elements; fp32 or fp16, one dtype) and attributes. The block sizes default to
    ``plan``'s; tests override them to get many programs."""
    mask, bias = _present(mask), _present(bias)
    named = {"input": x, "offset": offset, "mask": mask, "weight": weight, "bias": bias}
    present = {k: t for k, t in named.items() if t is not None}
    for name, t in present.items():
        check_float(name, t)
        if t.dtype != x.dtype:
            raise TypeError(f"DeformConv: {name} is {t.dtype} but input is {x.dtype}; all must have one dtype")
    check_device(*present.values())
    for name, t in present.items():
        want = 1 if name == "bias" else 4
        if t.dim() != want:
            raise ValueError(f"DeformConv: {name} must be {want}-D, got shape {tuple(t.shape)}")
    attrs = {"stride_h": stride_h, "stride_w": stride_w, "pad_h": pad_h, "pad_w": pad_w, "dilation_h": dilation_h,
             "dilation_w": dilation_w, "groups": groups, "deform_groups": deform_groups}
    attrs = {k: int(v) for k, v in attrs.items()}
    for k, v in attrs.items():
        if v < (0 if k.startswith("pad") else 1):
            raise ValueError(f"DeformConv: {k} must be {'>= 0' if k.startswith('pad') else '>= 1'}, got {v}")
    b, c, h, w = (int(v) for v in x.shape)
    cout, _, kh, kw = (int(v) for v in weight.shape)
    if c == 0 or kh == 0 or kw == 0:
        raise ValueError(f"DeformConv: empty input channels or kernel (input {list(x.shape)}, weight "
                         f"{list(weight.shape)})")
    ho, wo = output_size(h, w, (kh, kw), (attrs["stride_h"], attrs["stride_w"]), (attrs["pad_h"], attrs["pad_w"]),
                         (attrs["dilation_h"], attrs["dilation_w"]))
    _check(c, tuple(weight.shape), tuple(offset.shape), None if mask is None else tuple(mask.shape),
           attrs["groups"], attrs["deform_groups"], (ho, wo))
    for name, t in (("offset", offset), ("mask", mask)):
        if t is not None and int(t.shape[0]) != b:
            raise ValueError(f"DeformConv: {name} has batch {int(t.shape[0])}, input {b}")
    if bias is not None and tuple(bias.shape) != (cout,):
        raise ValueError(f"DeformConv: bias must be ({cout},), got {tuple(bias.shape)}")
    scalars = dict(B=b, C=c, H=h, W=w, Cout=cout, Ho=ho, Wo=wo, **attrs)
    too_big = [k for k, v in {**scalars, "H * W": (h + 1) * (w + 1), "Ho * Wo": ho * wo,
                              "weight": weight.numel()}.items() if v > _INT32_MAX]
    if too_big:
        raise ValueError(f"DeformConv: {', '.join(too_big)} too large for the kernel's int32 indexing")
    out = torch.empty((b, cout, ho, wo), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    grid, constexprs = plan(b, c, h, w, cout, kh, kw, ho, wo, attrs["groups"], attrs["deform_groups"],
                            mask is not None, bias is not None, block_p=block_p, block_co=block_co, block_k=block_k)
    x = x.contiguous()
    current(deform_conv_kernel)[grid](x, offset.contiguous(), x if mask is None else mask.contiguous(),
                                      weight.contiguous(), x if bias is None else bias.contiguous(),
                                      *scalars.values(), out, **constexprs, num_warps=NUM_WARPS,
                                      num_stages=NUM_STAGES)
    return out


ATTRIBUTES = ("stride_h", "stride_w", "pad_h", "pad_w", "dilation_h", "dilation_w", "groups", "deform_groups")


def aot_plan(shapes, dtypes, stride_h: int, stride_w: int, pad_h: int, pad_w: int, dilation_h: int, dilation_w: int,
             groups: int, deform_groups: int) -> Plan:
    """The TensorRT AOT launch (plugins._aot) for a node whose five inputs have these static
    shapes and TensorRT dtypes; an absent mask or bias is a 0-element input."""
    (b, c, h, w), _, mask_shape, (cout, _, kh, kw), bias_shape = shapes
    attrs = dict(zip(ATTRIBUTES, (stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, groups, deform_groups)))
    ho, wo = output_size(h, w, (kh, kw), (stride_h, stride_w), (pad_h, pad_w), (dilation_h, dilation_w))
    has_mask = 0 not in tuple(mask_shape)
    has_bias = 0 not in tuple(bias_shape)
    grid, constexprs = plan(b, c, h, w, cout, kh, kw, ho, wo, groups, deform_groups, has_mask, has_bias)
    names = ("input_ptr", "offset_ptr", "mask_ptr", "weight_ptr", "bias_ptr")
    return Plan(deform_conv_kernel, inputs={n: triton_type(d) for n, d in zip(names, dtypes)},
                scalars=dict(B=b, C=c, H=h, W=w, Cout=cout, Ho=ho, Wo=wo, **attrs),
                outputs={"out_ptr": triton_type(dtypes[0])}, constexprs=constexprs, grid=grid,
                num_warps=NUM_WARPS, num_stages=NUM_STAGES)
