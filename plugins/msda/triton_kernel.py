"""Triton kernel for ``deploykit::MultiScaleDeformableAttn`` (mmcv's MSDA forward).

Semantics are deploykit.ops.multi_scale_deformable_attn.reference's: for each
(batch, query, head), sum over levels and points of ``weight * bilinear(value,
loc * size - 0.5)``, where a tap outside (-1, size) on either axis is skipped and
corners off the map read zero (grid_sample, align_corners=False, zero padding;
mmcv's ms_deform_attn_im2col_bilinear). A NaN location is skipped too, as mmcv's
``if`` does.

Layout: one program per (batch * head, block of BLOCK_Q queries). It holds a
[BLOCK_Q, BLOCK_D] fp32 accumulator, BLOCK_D = next power of two >= head_dims
(lanes past head_dims are masked, so any head_dims works; a power of two wastes
none). It loops over levels (runtime) and points (unrolled), and for each of the
four bilinear corners gathers BLOCK_Q value rows of head_dims contiguous
elements, value[b, key, m, :], so each row is one coalesced load.

Inputs are taken in the ONNX node's order, (value, spatial_shapes,
level_start_index, sampling_locations, attention_weights), the float ones
fp32 or fp16 in any mix; everything is converted to fp32 on load and
accumulated in fp32. The output has value's dtype (fp16 in, fp16 out), as the
node's type in the exported graph does.

``launch_int8`` is the fused int8 variant: value, locations and weights are int8
with one float scale each (symmetric, zero point 0), dequantized in the kernel
(x = q * scale; locations may be int16 instead). Those are the inputs and scales of the three
DequantizeLinear nodes that a deploykit QDQ graph puts in front of the node
(scale = amax / 127 of the tensor's quantizer); a fused int8 plugin takes
DequantizeLinear's x and x_scale in place of its output. The value and weight
scales are constant factors of the sum and are applied once, to the
accumulator; the location scale is applied before sampling.

The kernel calls only triton.language builtins, so ``plugins._triton.current`` can build it
for whichever TRITON_INTERPRET setting is in force at launch.

AOT form (TensorRT's ahead-of-time plugin, ``aot_plan``): the same kernel, whose runtime
parameters are already TensorRT's order (the five inputs, num_keys, num_queries,
num_levels, the output); ``scales_ptr`` is a constexpr None there (no DEQUANT), so it is
not a parameter of the compiled kernel. Heads, head dims and points are constexprs, taken
from the node's static shapes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._aot import Plan, triton_type
from .._triton import FLOAT_DTYPES, current

# Locations may be int16 (a quantizer lifted to 16 bits, QDQ with an int16 zero point):
# an int8 step of amax/127 is a fifth of a pixel on a 20-wide level and more on BEV-sized maps.
INT_LOCATIONS = (torch.int8, torch.int16)


@triton.jit
def msda_kernel(value_ptr, shapes_ptr, starts_ptr, loc_ptr, weight_ptr, num_keys, num_queries, num_levels, out_ptr,
                scales_ptr, HEADS: tl.constexpr, DIMS: tl.constexpr, NUM_POINTS: tl.constexpr,
                BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, DEQUANT: tl.constexpr):
    pid_bh = tl.program_id(0)
    pid_q = tl.program_id(1)
    b = pid_bh // HEADS
    m = pid_bh % HEADS

    q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    d = tl.arange(0, BLOCK_D)
    q_ok = q < num_queries
    d_ok = d < DIMS

    # Row (b, q, m) of sampling_locations / attention_weights, in units of (level, point).
    bqm = (b.to(tl.int64) * num_queries + q) * HEADS + m
    lp_row = bqm * (num_levels * NUM_POINTS)
    row_stride = HEADS * DIMS  # elements between value[b, k, m] and value[b, k + 1, m]
    value_bm = value_ptr + (b.to(tl.int64) * num_keys * HEADS + m) * DIMS

    # tl.full, not tl.zeros: zeros is a @jit function of triton's own library (see plugins._triton.current).
    acc = tl.full([BLOCK_Q, BLOCK_D], 0.0, dtype=tl.float32)
    if DEQUANT:
        loc_scale = tl.load(scales_ptr + 1)

    for lvl in range(num_levels):
        h = tl.load(shapes_ptr + 2 * lvl).to(tl.int32)
        w = tl.load(shapes_ptr + 2 * lvl + 1).to(tl.int32)
        start = tl.load(starts_ptr + lvl).to(tl.int64)
        hf = h.to(tl.float32)
        wf = w.to(tl.float32)
        level_ptr = value_bm + start * row_stride
        for p in tl.static_range(NUM_POINTS):
            idx = lp_row + lvl * NUM_POINTS + p
            lx = tl.load(loc_ptr + 2 * idx, mask=q_ok, other=0).to(tl.float32)
            ly = tl.load(loc_ptr + 2 * idx + 1, mask=q_ok, other=0).to(tl.float32)
            a = tl.load(weight_ptr + idx, mask=q_ok, other=0).to(tl.float32)
            if DEQUANT:
                lx = lx * loc_scale
                ly = ly * loc_scale
            x = lx * wf - 0.5
            y = ly * hf - 0.5
            inside = q_ok & (x > -1.0) & (y > -1.0) & (x < wf) & (y < hf)
            # Off-map (or NaN) taps are skipped; zeroing them keeps the int casts defined.
            x = tl.where(inside, x, 0.0)
            y = tl.where(inside, y, 0.0)
            a = tl.where(inside, a, 0.0)
            x0f = tl.floor(x)
            y0f = tl.floor(y)
            fx = x - x0f
            fy = y - y0f
            x0 = x0f.to(tl.int32)
            y0 = y0f.to(tl.int32)
            x1 = x0 + 1
            y1 = y0 + 1
            x0_ok = x0 >= 0
            x1_ok = x1 < w
            y0_ok = y0 >= 0
            y1_ok = y1 < h

            ok = inside & y0_ok & x0_ok
            off = (y0 * w + x0).to(tl.int64) * row_stride
            v = tl.load(level_ptr + off[:, None] + d[None, :], mask=ok[:, None] & d_ok[None, :], other=0)
            acc += (a * (1.0 - fy) * (1.0 - fx))[:, None] * v.to(tl.float32)

            ok = inside & y0_ok & x1_ok
            off = (y0 * w + x1).to(tl.int64) * row_stride
            v = tl.load(level_ptr + off[:, None] + d[None, :], mask=ok[:, None] & d_ok[None, :], other=0)
            acc += (a * (1.0 - fy) * fx)[:, None] * v.to(tl.float32)

            ok = inside & y1_ok & x0_ok
            off = (y1 * w + x0).to(tl.int64) * row_stride
            v = tl.load(level_ptr + off[:, None] + d[None, :], mask=ok[:, None] & d_ok[None, :], other=0)
            acc += (a * fy * (1.0 - fx))[:, None] * v.to(tl.float32)

            ok = inside & y1_ok & x1_ok
            off = (y1 * w + x1).to(tl.int64) * row_stride
            v = tl.load(level_ptr + off[:, None] + d[None, :], mask=ok[:, None] & d_ok[None, :], other=0)
            acc += (a * fy * fx)[:, None] * v.to(tl.float32)

    if DEQUANT:
        acc = acc * (tl.load(scales_ptr) * tl.load(scales_ptr + 2))

    out_row = (b.to(tl.int64) * num_queries + q) * (HEADS * DIMS) + m * DIMS
    tl.store(out_ptr + out_row[:, None] + d[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=q_ok[:, None] & d_ok[None, :])


def plan(dims: int, queries: int, block_q: int | None = None) -> tuple[int, int]:
    """(BLOCK_Q, BLOCK_D) for these head dims and queries."""
    block_d = triton.next_power_of_2(dims)
    if block_q is None:
        # ~2K accumulator elements per program: 64 queries at head_dims 32 (BEVFormer).
        block_q = max(1, min(64, 2048 // block_d, triton.next_power_of_2(queries)))
    elif block_q < 1 or block_q & (block_q - 1):
        raise ValueError(f"MSDA: block_q must be a power of two, got {block_q}")
    return block_q, block_d


def _as_level_tensor(x, name: str, device) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"MSDA: {name} must be an integer tensor, got {t.dtype}")
    return t.to(device=device, dtype=torch.int64).contiguous()


def _check(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Shapes of the five inputs; returns (bs, num_keys, heads, dims, queries, levels, points)."""
    if value.dim() != 4:
        raise ValueError(f"MSDA: value must be (bs, num_keys, heads, head_dims), got shape {tuple(value.shape)}")
    bs, num_keys, heads, dims = value.shape
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError("MSDA: sampling_locations must be (bs, num_queries, heads, levels, points, 2), got shape "
                         f"{tuple(sampling_locations.shape)}")
    _, queries, _, levels, points, _ = sampling_locations.shape
    if (sampling_locations.shape[0], sampling_locations.shape[2]) != (bs, heads):
        raise ValueError(f"MSDA: sampling_locations {tuple(sampling_locations.shape)} does not match value "
                         f"{tuple(value.shape)} in batch or heads")
    if tuple(attention_weights.shape) != (bs, queries, heads, levels, points):
        raise ValueError(f"MSDA: attention_weights must be {(bs, queries, heads, levels, points)}, got "
                         f"{tuple(attention_weights.shape)}")
    shapes = torch.as_tensor(spatial_shapes)
    starts = torch.as_tensor(level_start_index)
    if tuple(shapes.shape) != (levels, 2) or tuple(starts.shape) != (levels,):
        raise ValueError(f"MSDA: spatial_shapes must be ({levels}, 2) and level_start_index ({levels},) for "
                         f"{levels} levels, got {tuple(shapes.shape)} and {tuple(starts.shape)}")
    devices = {t.device for t in (value, sampling_locations, attention_weights)}
    if len(devices) != 1:
        raise ValueError(f"MSDA: value, sampling_locations and attention_weights are on different devices {devices}")
    # Bounds are checked where it costs no device sync (level tables on the host, the usual case:
    # they are constants of the model); the kernel itself does not check them.
    if shapes.device.type == "cpu" and starts.device.type == "cpu":
        for (h, w), s in zip(shapes.tolist(), starts.tolist()):
            if h < 1 or w < 1 or s < 0 or s + h * w > num_keys:
                raise ValueError(f"MSDA: level {h}x{w} starting at key {s} does not fit in {num_keys} keys")
    return bs, num_keys, heads, dims, queries, levels, points


def _launch(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, out_dtype, scales,
            block_q):
    bs, num_keys, heads, dims, queries, levels, points = _check(value, spatial_shapes, level_start_index,
                                                                sampling_locations, attention_weights)
    device = value.device
    shapes = _as_level_tensor(spatial_shapes, "spatial_shapes", device)
    starts = _as_level_tensor(level_start_index, "level_start_index", device)
    value = value.contiguous()
    sampling_locations = sampling_locations.contiguous()
    attention_weights = attention_weights.contiguous()
    out = torch.empty((bs, queries, heads * dims), dtype=out_dtype, device=device)
    if out.numel() == 0:
        return out
    if levels == 0 or points == 0:
        return out.zero_()
    block_q, block_d = plan(dims, queries, block_q)
    grid = (bs * heads, triton.cdiv(queries, block_q))
    current(msda_kernel)[grid](value, shapes, starts, sampling_locations, attention_weights, num_keys, queries,
                               levels, out, scales if scales is not None else out,  # unread unless DEQUANT
                               HEADS=heads, DIMS=dims, NUM_POINTS=points, BLOCK_Q=block_q, BLOCK_D=block_d,
                               DEQUANT=scales is not None)
    return out


def launch(value: torch.Tensor, spatial_shapes, level_start_index, sampling_locations: torch.Tensor,
           attention_weights: torch.Tensor, *, block_q: int | None = None) -> torch.Tensor:
    """MSDA forward: (bs, num_queries, heads * head_dims) in value's dtype.

    value, sampling_locations, attention_weights: fp32 or fp16 (any mix), on one
    device; spatial_shapes (levels, 2) and level_start_index (levels,): integer
    tensors or lists, moved to that device. ``block_q`` (a power of two)
    overrides the queries per program.
    """
    for name, t in (("value", value), ("sampling_locations", sampling_locations),
                    ("attention_weights", attention_weights)):
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"MSDA: {name} must be float32 or float16, got {t.dtype} (int8: use launch_int8)")
    return _launch(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, value.dtype,
                   None, block_q)


def check_int8(value_q: torch.Tensor, locations_q: torch.Tensor, weights_q: torch.Tensor) -> None:
    for name, t, allowed in (("value_q", value_q, (torch.int8,)), ("locations_q", locations_q, INT_LOCATIONS),
                             ("weights_q", weights_q, (torch.int8,))):
        if t.dtype not in allowed:
            want = " or ".join(str(a).removeprefix("torch.") for a in allowed)
            raise TypeError(f"MSDA int8: {name} must be {want}, got {t.dtype}")


def _scale(s, name: str, device) -> torch.Tensor:
    t = torch.as_tensor(s, dtype=torch.float32)
    if t.numel() != 1:
        raise ValueError(f"MSDA int8: {name} must be one per-tensor scale, got shape {tuple(t.shape)}")
    return t.reshape(1).to(device)


def launch_int8(value_q: torch.Tensor, value_scale, spatial_shapes, level_start_index,
                locations_q: torch.Tensor, locations_scale, weights_q: torch.Tensor, weights_scale, *,
                out_dtype: torch.dtype = torch.float32, block_q: int | None = None) -> torch.Tensor:
    """Fused int8 MSDA: the float op on (value_q * value_scale, locations_q * locations_scale,
    weights_q * weights_scale).

    *_q: int8 tensors of the float op's shapes (locations_q may also be int16);
    *_scale: per-tensor scales (a float or a one-element tensor, e.g. the scale
    initializer of the DequantizeLinear feeding that input; zero point 0). The
    whole int8 range [-128, 127] is accepted (ONNX QuantizeLinear saturates to
    -128, deploykit's fake quantization to -127). Output: ``out_dtype``
    (float32 or float16).
    """
    check_int8(value_q, locations_q, weights_q)
    if out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"MSDA int8: out_dtype must be float32 or float16, got {out_dtype}")
    device = value_q.device
    scales = torch.cat([_scale(value_scale, "value_scale", device), _scale(locations_scale, "locations_scale", device),
                        _scale(weights_scale, "weights_scale", device)])
    return _launch(value_q, spatial_shapes, level_start_index, locations_q, weights_q, out_dtype, scales, block_q)


def aot_plan(shapes, dtypes) -> Plan:
    """The AOT launch for a node whose five inputs have these static shapes and TensorRT
    dtypes (see plugins._aot)."""
    bs, num_keys, heads, dims = shapes[0]
    _, queries, _, levels, points, _ = shapes[3]
    block_q, block_d = plan(dims, queries)
    names = ("value_ptr", "shapes_ptr", "starts_ptr", "loc_ptr", "weight_ptr")
    return Plan(msda_kernel, inputs={n: triton_type(d) for n, d in zip(names, dtypes)},
                scalars={"num_keys": num_keys, "num_queries": queries, "num_levels": levels},
                outputs={"out_ptr": triton_type(dtypes[0])},
                constexprs={"scales_ptr": None, "HEADS": heads, "DIMS": dims, "NUM_POINTS": points,
                            "BLOCK_Q": block_q, "BLOCK_D": block_d, "DEQUANT": False},
                grid=(bs * heads, triton.cdiv(queries, block_q)))
