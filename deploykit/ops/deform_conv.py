"""``deploykit::DeformConv``: mmcv's deformable convolution, v1 (``DCN``) and v2 (``DCNv2``).

Inputs (mmcv's MMCVModulatedDeformConv2d order)
  input   float32 (B, C, H, W)
  offset  float32 (B, dg * 2 * kh * kw, Ho, Wo)  per deform group, per kernel tap
                                                   i * kw + j: (dy, dx), i.e. channels
                                                   [dy0, dx0, dy1, dx1, ...]
  mask    float32 (B, dg * kh * kw, Ho, Wo)      v2's modulation, or a 0-element tensor
                                                   for v1 (no mask)
  weight  float32 (Cout, C / groups, kh, kw)
  bias    float32 (Cout,), or a 0-element tensor for none (mmcv's own "fake tensor")
Attributes
  stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, groups, deform_groups  int
Output
  float32 (B, Cout, Ho, Wo), Ho = (H + 2 pad_h - dilation_h (kh - 1) - 1) // stride_h + 1

Semantics of mmcv's im2col kernels (deform_conv_cuda_kernel.cuh, modulated_deform_conv_
cuda_kernel.cuh and their CPU twins): output pixel (ho, wo), tap (i, j) of input channel c
samples c at h = ho * stride_h - pad_h + i * dilation_h + dy, w likewise with dx, where
(dy, dx) is the offset pair of c's deform group (channels split into dg equal contiguous
blocks). The sample is zero unless -1 < h < H and -1 < w < W; inside, it is bilinear over
the four neighbouring pixels with each neighbour off the image counting as zero. v2
multiplies the sample by its mask value. The samples then go through an ordinary grouped
convolution (``groups`` equal contiguous channel blocks) with ``weight`` and ``bias``.

Absent optional inputs are 0-element tensors rather than ONNX's empty names because
onnxruntime-extensions' Python ops take a fixed number of inputs and no list attributes.

Three export forms, chosen per module by ``export_form``:
  "custom"     one deploykit::DeformConv node (this module's function_for / register_ortx)
  "onnx"       the standard ai.onnx DeformConv (opset >= 19), which ONNX Runtime 1.32
               runs on the CPU (same offset layout as mmcv: (y, x) per tap)
  "reference"  the PyTorch reference traced into standard ops (GridSample and MatMul)
benchmarks/bench_deform_conv.py measures them on ONNX Runtime; see DEFAULT_EXPORT_FORM.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from . import kernels
from .onnx_builder import NodeBuilder

OP_TYPE = "DeformConv"
DOMAIN = "deploykit"
EXPORT_FORMS = ("custom", "onnx", "reference")
# The fastest form on ONNX Runtime CPU at BEVDepth's shape (benchmarks/results/deform_conv.md).
DEFAULT_EXPORT_FORM = "onnx"
STANDARD_OPSET = 19  # ai.onnx DeformConv appeared in opset 19


# ---------------------------------------------------------------------------------------
# Geometry shared by the reference, the ONNX lowering and the numpy kernel


def output_size(h: int, w: int, kernel: tuple[int, int], stride, padding, dilation) -> tuple[int, int]:
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, _pair(stride), _pair(padding), _pair(dilation)
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if ho < 1 or wo < 1:
        raise ValueError(f"DeformConv: a {h}x{w} input is too small for this kernel (output {ho}x{wo})")
    return ho, wo


def base_positions(ho: int, wo: int, kernel: tuple[int, int], stride, padding, dilation) -> np.ndarray:
    """Undeformed sampling positions (K = kh * kw, Ho, Wo, [h, w]) in input pixels: tap
    k = i * kw + j of output pixel (ho, wo) sits at (ho * stride - pad + i * dilation, ...)."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, _pair(stride), _pair(padding), _pair(dilation)
    pos = np.empty((kh, kw, ho, wo, 2), np.int64)
    pos[..., 0] = (np.arange(kh) * dh)[:, None, None, None] + (np.arange(ho) * sh - ph)[:, None]
    pos[..., 1] = (np.arange(kw) * dw)[:, None, None] + (np.arange(wo) * sw - pw)
    return pos.reshape(kh * kw, ho, wo, 2)


def grid_affine(h: int, w: int, ho: int, wo: int, kernel: tuple[int, int], stride, padding,
                dilation) -> tuple[np.ndarray, np.ndarray]:
    """GridSample coordinates (x, y) = offset (dx, dy) * scale + shift, shift laid out
    (K, Ho * Wo, 2), for align_corners=0: pixel p maps to (2p + 1) / size - 1.

    align_corners=0 rather than 1 because it is defined for 1-pixel maps too; with zero
    padding both reproduce mmcv's rule (see the module docstring): a sample in (-1, 0) or
    (size - 1, size) keeps only its in-image neighbour, and one at -1 or beyond has none
    (at exactly -1 or size the in-image neighbour's weight is 0, so mmcv's explicit
    -1 < h < H guard changes nothing that zero padding does not already give)."""
    pos = base_positions(ho, wo, kernel, stride, padding, dilation)[..., ::-1].reshape(-1, ho * wo, 2)
    size = np.array([w, h], np.float64)
    return (2.0 / size).astype(np.float32), ((2.0 * pos + 1.0) / size - 1.0).astype(np.float32)


def _check(c: int, weight_shape, offset_shape, mask_shape, groups: int, deform_groups: int,
           out_hw: tuple[int, int]) -> None:
    cout, cin_g, kh, kw = weight_shape
    if c % groups or cout % groups or cin_g * groups != c:
        raise ValueError(f"DeformConv: weight {list(weight_shape)} does not fit {c} input channels in {groups} groups")
    if c % deform_groups:
        raise ValueError(f"DeformConv: {c} input channels cannot split into {deform_groups} deform groups")
    want = [deform_groups * 2 * kh * kw, *out_hw]
    if list(offset_shape[1:]) != want:
        raise ValueError(f"DeformConv: offset must be (B, {want[0]}, {want[1]}, {want[2]}), got {list(offset_shape)}")
    if mask_shape is not None and list(mask_shape[1:]) != [deform_groups * kh * kw, *out_hw]:
        raise ValueError(f"DeformConv: mask must be (B, {deform_groups * kh * kw}, {out_hw[0]}, {out_hw[1]}), "
                         f"got {list(mask_shape)}")


def _present(t):
    return None if t is None or t.numel() == 0 else t


# ---------------------------------------------------------------------------------------
# PyTorch reference


def reference(x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor | None, weight: torch.Tensor,
              bias: torch.Tensor | None, stride=1, padding=0, dilation=1, groups: int = 1,
              deform_groups: int = 1) -> torch.Tensor:
    """mmcv's deform_conv2d (mask None) / modulated_deform_conv2d, vectorised.

    One grid_sample per (batch, deform group) samples every tap of every output pixel into a
    (K, Ho * Wo) "image", so its output (B, C, K, Ho * Wo) already is mmcv's im2col column
    buffer (rows channel-major, then tap); a batched MatMul with the weight viewed as
    (groups, Cout / groups, C / groups * K) is mmcv's per-group GEMM. Traces to GridSample
    and MatMul (opset >= 16)."""
    mask, bias = _present(mask), _present(bias)
    # Python ints: shapes traced as tensors inside the Function break the TorchScript exporter.
    b, c, h, w = (int(v) for v in x.shape)
    kh, kw = int(weight.shape[2]), int(weight.shape[3])
    ho, wo = output_size(h, w, (kh, kw), stride, padding, dilation)
    _check(c, tuple(weight.shape), tuple(offset.shape), None if mask is None else tuple(mask.shape), groups,
           deform_groups, (ho, wo))
    dg = deform_groups
    scale, shift = grid_affine(h, w, ho, wo, (kh, kw), stride, padding, dilation)
    off = offset.reshape(b, dg, kh * kw, 2, ho * wo).transpose(3, 4).flip(-1)  # (x, y) last
    grid = off * torch.from_numpy(scale).to(off) + torch.from_numpy(shift).to(off)
    grid = grid.reshape(b * dg, kh * kw, ho * wo, 2)
    sampled = F.grid_sample(x.reshape(b * dg, c // dg, h, w), grid, mode="bilinear", padding_mode="zeros",
                            align_corners=False)  # (B * dg, C / dg, K, Ho * Wo)
    if mask is not None:
        sampled = sampled * mask.reshape(b * dg, 1, kh * kw, ho * wo)
    cols = sampled.reshape(b, groups, c // groups * kh * kw, ho * wo)  # rows (channel, tap), as weight's
    out = torch.matmul(weight.reshape(groups, -1, c // groups * kh * kw), cols).reshape(b, -1, ho, wo)
    return out if bias is None else out + bias.reshape(1, -1, 1, 1)


# ---------------------------------------------------------------------------------------
# autograd Function: the reference forward, the ONNX symbolic of the chosen form


def _attrs(stride, padding, dilation, groups: int, deform_groups: int) -> dict[str, int]:
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    return {"stride_h": sh, "stride_w": sw, "pad_h": ph, "pad_w": pw, "dilation_h": dh, "dilation_w": dw,
            "groups": groups, "deform_groups": deform_groups}


def _node_reference(x, offset, mask, weight, bias, stride_h: int, stride_w: int, pad_h: int, pad_w: int,
                    dilation_h: int, dilation_w: int, groups: int, deform_groups: int) -> torch.Tensor:
    """``reference`` called as the node (and torch.ops.deploykit.deform_conv) is: absent mask
    and bias as 0-element tensors, the attributes as ints."""
    return reference(x, offset, _present(mask), weight, _present(bias), (stride_h, stride_w), (pad_h, pad_w),
                     (dilation_h, dilation_w), groups, deform_groups)


class DeformConvFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, offset, mask, weight, bias, stride, padding, dilation, groups: int, deform_groups: int,
                form: str = "custom"):
        ctx.save_for_backward(x, offset, mask, weight, bias)
        ctx.constants = (stride, padding, dilation, groups, deform_groups)
        empty = x.new_zeros(0)
        attrs = _attrs(stride, padding, dilation, groups, deform_groups)
        return kernels.forward("deform_conv", _node_reference, x, offset, empty if mask is None else mask, weight,
                               empty if bias is None else bias, *attrs.values())

    @staticmethod
    def backward(ctx, grad):
        # autograd.recompute_backward's recipe, for inputs that may be None.
        inputs = [None if t is None else t.detach().requires_grad_(t.is_floating_point()) for t in ctx.saved_tensors]
        wanted = [t for t in inputs if t is not None and t.requires_grad]
        with torch.enable_grad():
            out = reference(*inputs, *ctx.constants)
            grads = iter(torch.autograd.grad(out, wanted, grad, allow_unused=True))
        return tuple(next(grads) if t is not None and t.requires_grad else None for t in inputs) + (None,) * 6

    @staticmethod
    def symbolic(g, x, offset, mask, weight, bias, stride, padding, dilation, groups: int, deform_groups: int,
                 form: str = "custom"):
        b, _, h, w = x.type().sizes()
        cout, _, kh, kw = weight.type().sizes()
        ho, wo = output_size(h, w, (kh, kw), stride, padding, dilation)
        attrs = _attrs(stride, padding, dilation, groups, deform_groups)
        if form == "onnx":
            if g.opset < STANDARD_OPSET:
                raise ValueError(f"export_form 'onnx' (ai.onnx DeformConv) needs opset >= {STANDARD_OPSET}, "
                                 f"not {g.opset}; use 'custom' or a higher opset")
            inputs = [x, weight, offset]
            if mask is not None and bias is None:  # B comes before mask; a zero bias is exact
                bias = g.op("Constant", value_t=torch.zeros(cout, dtype=torch.float32))
            inputs += [t for t in (bias, mask) if t is not None]
            out = g.op("DeformConv", *inputs, strides_i=[attrs["stride_h"], attrs["stride_w"]],
                       pads_i=[attrs["pad_h"], attrs["pad_w"], attrs["pad_h"], attrs["pad_w"]],
                       dilations_i=[attrs["dilation_h"], attrs["dilation_w"]], group_i=groups,
                       offset_group_i=deform_groups, kernel_shape_i=[kh, kw])
        else:
            empty = g.op("Constant", value_t=torch.zeros(0, dtype=torch.float32))
            out = g.op(f"{DOMAIN}::{OP_TYPE}", x, offset, empty if mask is None else mask, weight,
                       empty if bias is None else bias, **{f"{k}_i": v for k, v in attrs.items()})
        out.setType(x.type().with_sizes([b, cout, ho, wo]))
        return out


def deform_conv2d(x, offset, mask, weight, bias=None, stride=1, padding=0, dilation=1, groups: int = 1,
                  deform_groups: int = 1, export_form: str = DEFAULT_EXPORT_FORM) -> torch.Tensor:
    """The op; ``export_form`` only decides what an ONNX export of it emits."""
    if export_form not in EXPORT_FORMS:
        raise ValueError(f"unknown export_form '{export_form}'; choose one of {', '.join(EXPORT_FORMS)}")
    if export_form == "reference":
        return reference(x, offset, mask, weight, bias, stride, padding, dilation, groups, deform_groups)
    return DeformConvFunction.apply(x, offset, mask, weight, bias, _pair(stride), _pair(padding), _pair(dilation),
                                    groups, deform_groups, export_form)


# ---------------------------------------------------------------------------------------
# Modules with mmcv's parameter names


class _DeformConvBase(nn.Module):
    _version = 2  # mmcv's DeformConv2dPack / ModulatedDeformConv2dPack state-dict version
    offset_factor = 2  # conv_offset channels per deform group and kernel tap

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, deform_groups: int = 1, bias: bool = False, im2col_step: int = 32,
                 export_form: str | None = None):
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels {in_channels} and out_channels {out_channels} must split into {groups} "
                             "groups")
        if in_channels % deform_groups:
            raise ValueError(f"in_channels {in_channels} must divide by deform_groups {deform_groups}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride)
        self.padding, self.dilation = _pair(padding), _pair(dilation)
        self.groups, self.deform_groups = groups, deform_groups
        self.im2col_step = im2col_step  # mmcv's CUDA batching; no effect on the result
        self.transposed, self.output_padding = False, (0,)  # nn.Conv2d compatibility, as mmcv
        self.export_form = export_form or DEFAULT_EXPORT_FORM
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels))
        else:
            self.register_parameter("bias", None)
        kh, kw = self.kernel_size
        self.conv_offset = nn.Conv2d(in_channels, deform_groups * self.offset_factor * kh * kw, self.kernel_size,
                                     stride=self.stride, padding=self.padding, dilation=self.dilation, bias=True)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def offsets(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        offset, mask = self.offsets(x)
        return deform_conv2d(x, offset, mask, self.weight, self.bias, self.stride, self.padding, self.dilation,
                             self.groups, self.deform_groups, self.export_form)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
                f"deform_groups={self.deform_groups}, bias={self.bias is not None}, export_form={self.export_form!r}")


class DeformConv2dPack(_DeformConvBase):
    """mmcv's ``DCN`` (mmcv.ops.DeformConv2dPack): ``weight``, ``conv_offset.{weight,bias}``
    (zero-initialised, so a fresh layer is a plain convolution), no bias by default.
    mmcv refuses bias=True here; it is allowed (an added ``bias``) for convenience.
    ``im2col_step`` is accepted for configs that pass it (BEVDepth: 128) and ignored."""

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, nonlinearity="relu")
        super().reset_parameters()

    def offsets(self, x):
        return self.conv_offset(x), None


class ModulatedDeformConv2dPack(_DeformConvBase):
    """mmcv's ``DCNv2`` (mmcv.ops.ModulatedDeformConv2dPack): conv_offset gives
    3 * dg * kh * kw channels; the first two thirds are the offsets (mmcv's
    chunk(3) then cat of the first two chunks), the last third the mask through a sigmoid."""

    offset_factor = 3

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, deform_groups: int = 1, bias: bool = True, export_form: str | None = None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, deform_groups,
                         bias, export_form=export_form)

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.in_channels * self.kernel_size[0] * self.kernel_size[1])
        nn.init.uniform_(self.weight, -bound, bound)
        super().reset_parameters()

    def offsets(self, x):
        out = self.conv_offset(x)
        n = self.deform_groups * self.kernel_size[0] * self.kernel_size[1]
        return out[:, :2 * n], torch.sigmoid(out[:, 2 * n:])


# ---------------------------------------------------------------------------------------
# ONNX lowering


FUNCTION_INPUTS = ["input", "offset", "mask", "weight", "bias"]


def node_attrs(node: onnx.NodeProto) -> dict[str, int]:
    got = {a.name: int(a.i) for a in node.attribute}
    defaults = _attrs(1, 0, 1, 1, 1)
    return {k: got.get(k, v) for k, v in defaults.items()}


def node_signature(node: onnx.NodeProto, graph: onnx.GraphProto) -> dict:
    """Static shapes of one node's inputs and whether mask and bias are present."""
    typed = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
             for v in [*graph.input, *graph.value_info, *graph.output]}
    typed.update({t.name: list(t.dims) for t in graph.initializer})
    for n in graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            typed[n.output[0]] = list(n.attribute[0].t.dims)

    def shape(i):
        name = node.input[i] if len(node.input) > i else ""
        if not name:
            return None
        if name not in typed or (any(d <= 0 for d in typed[name]) and typed[name] != [0]):
            raise ValueError(f"{node.name}: no static shape recorded for input {name}")
        return typed[name]

    x, offset, mask, weight, bias = (shape(i) for i in range(5))
    mask = None if mask is None or math.prod(mask) == 0 else mask
    bias = None if bias is None or math.prod(bias) == 0 else bias
    a = node_attrs(node)
    out = output_size(x[2], x[3], tuple(weight[2:]), (a["stride_h"], a["stride_w"]), (a["pad_h"], a["pad_w"]),
                      (a["dilation_h"], a["dilation_w"]))
    _check(x[1], weight, offset, mask, a["groups"], a["deform_groups"], out)
    return {"x": x, "weight": weight, "out": out, "mask": mask is not None, "bias": bias is not None, **a}


def lowering_nodes(b: NodeBuilder, inputs: list[str], output: str, sig: dict, opset: int) -> None:
    """Append the reference's graph (offsets -> GridSample grid, GridSample, mask, grouped
    MatMul) to builder ``b``."""
    if opset < 16:
        raise ValueError("DeformConv's lowering needs opset >= 16 (GridSample)")
    x, offset, mask, weight, bias = inputs
    bs, c, h, w = sig["x"]
    cout, _, kh, kw = sig["weight"]
    ho, wo = sig["out"]
    dg = sig["deform_groups"]
    stride, padding = (sig["stride_h"], sig["stride_w"]), (sig["pad_h"], sig["pad_w"])
    dilation = (sig["dilation_h"], sig["dilation_w"])
    scale, shift = grid_affine(h, w, ho, wo, (kh, kw), stride, padding, dilation)
    k = kh * kw
    off = b.op("Reshape", offset, b.const([bs, dg, k, 2, ho * wo]))
    off = b.op("Transpose", off, perm=[0, 1, 2, 4, 3])  # (B, dg, K, Ho * Wo, [dy, dx])
    off = b.op("Gather", off, b.const([1, 0]), axis=4)  # GridSample wants (x, y)
    grid = b.op("Add", b.op("Mul", off, b.const(scale, np.float32)), b.const(shift, np.float32))
    grid = b.op("Reshape", grid, b.const([bs * dg, k, ho * wo, 2]))
    xs = b.op("Reshape", x, b.const([bs * dg, c // dg, h, w]))
    mode = "linear" if opset >= 20 else "bilinear"
    sampled = b.op("GridSample", xs, grid, mode=mode, padding_mode="zeros", align_corners=0)
    if sig["mask"]:
        sampled = b.op("Mul", sampled, b.op("Reshape", mask, b.const([bs * dg, 1, k, ho * wo])))
    groups = sig["groups"]
    cols = b.op("Reshape", sampled, b.const([bs, groups, c // groups * k, ho * wo]))
    wmat = b.op("Reshape", weight, b.const([groups, cout // groups, c // groups * k]))
    out = b.op("MatMul", wmat, cols)  # (B, groups, Cout / groups, Ho * Wo)
    if sig["bias"]:
        out = b.op("Reshape", out, b.const([bs, cout, ho * wo]))
        out = b.op("Add", out, b.op("Unsqueeze", bias, b.const([1])))
    b.op("Reshape", out, b.const([bs, cout, ho, wo]), name=output)


def function_for(node: onnx.NodeProto, graph: onnx.GraphProto, opset: int) -> onnx.FunctionProto:
    """A function specialised to this node's static shapes and attributes, named after
    them so nodes alike share one definition."""
    sig = node_signature(node, graph)
    bs, c, h, w = sig["x"]
    cout, _, kh, kw = sig["weight"]
    name = (f"{OP_TYPE}_b{bs}c{c}h{h}w{w}o{cout}k{kh}x{kw}s{sig['stride_h']}x{sig['stride_w']}"
            f"p{sig['pad_h']}x{sig['pad_w']}d{sig['dilation_h']}x{sig['dilation_w']}g{sig['groups']}"
            f"dg{sig['deform_groups']}" + ("_mask" if sig["mask"] else "") + ("_bias" if sig["bias"] else ""))
    b = NodeBuilder("deform_conv")
    lowering_nodes(b, FUNCTION_INPUTS, "output", sig, opset)
    return onnx.helper.make_function(DOMAIN, name, inputs=FUNCTION_INPUTS, outputs=["output"], nodes=b.nodes,
                                     opset_imports=[onnx.helper.make_opsetid("", opset)],
                                     attributes=list(_attrs(1, 0, 1, 1, 1)))


# ---------------------------------------------------------------------------------------
# numpy kernel (onnxruntime-extensions)


def numpy_kernel(x: np.ndarray, offset: np.ndarray, mask: np.ndarray | None, weight: np.ndarray,
                 bias: np.ndarray | None, stride=1, padding=0, dilation=1, groups: int = 1,
                 deform_groups: int = 1) -> np.ndarray:
    """mmcv's im2col arithmetic in float32, vectorised over pixels and taps: the four
    neighbours gathered with an index past the end (a zero column) for those off the
    image, then the grouped GEMM."""
    mask = None if mask is None or mask.size == 0 else mask
    bias = None if bias is None or bias.size == 0 else bias
    bs, c, h, w = x.shape
    cout, cin_g, kh, kw = weight.shape
    k, dg = kh * kw, deform_groups
    ho, wo = output_size(h, w, (kh, kw), stride, padding, dilation)
    _check(c, weight.shape, offset.shape, None if mask is None else mask.shape, groups, dg, (ho, wo))
    base = base_positions(ho, wo, (kh, kw), stride, padding, dilation).astype(np.float32)
    base_h, base_w = base[..., 0], base[..., 1]
    off = offset.reshape(bs, dg, k, 2, ho, wo).astype(np.float32)
    ph, pw = base_h + off[:, :, :, 0], base_w + off[:, :, :, 1]  # (B, dg, K, Ho, Wo), float32 as mmcv
    inside = (ph > -1) & (pw > -1) & (ph < h) & (pw < w)
    h0, w0 = np.floor(ph), np.floor(pw)
    lh, lw = ph - h0, pw - w0
    h0, w0 = h0.astype(np.int64), w0.astype(np.int64)
    m = np.ones_like(lh) if mask is None else mask.reshape(bs, dg, k, ho, wo).astype(np.float32)
    corners = []
    for dh, dw, wt in ((0, 0, (1 - lh) * (1 - lw)), (0, 1, (1 - lh) * lw), (1, 0, lh * (1 - lw)), (1, 1, lh * lw)):
        hh, ww = h0 + dh, w0 + dw
        ok = inside & (hh >= 0) & (hh < h) & (ww >= 0) & (ww < w)
        corners.append((np.where(ok, hh * w + ww, h * w), np.where(ok, wt * m, 0).astype(np.float32)))
    padded = np.concatenate([x.reshape(bs, dg, c // dg, h * w), np.zeros((bs, dg, c // dg, 1), x.dtype)], -1)
    columns = np.zeros((bs, dg, c // dg, k * ho * wo), np.float32)
    for bi in range(bs):
        for gi in range(dg):
            for idx, wt in corners:
                columns[bi, gi] += padded[bi, gi][:, idx[bi, gi].reshape(-1)] * wt[bi, gi].reshape(-1)
    # rows (channel, tap) per conv group, as the flattened weight (Cout, C / groups * K)
    columns = columns.reshape(bs, groups, cin_g * k, ho * wo)
    out = np.matmul(weight.reshape(groups, cout // groups, cin_g * k).astype(np.float32), columns)
    out = out.reshape(bs, cout, ho, wo)
    if bias is not None:
        out += bias.reshape(1, cout, 1, 1)
    return out


_ORTX_REGISTERED = False


def register_ortx() -> None:
    """Register the numpy kernel as an onnxruntime-extensions Python op (once)."""
    global _ORTX_REGISTERED
    if _ORTX_REGISTERED:
        return
    from onnxruntime_extensions import PyCustomOpDef, onnx_op

    f32, i64 = PyCustomOpDef.dt_float, PyCustomOpDef.dt_int64

    @onnx_op(op_type=OP_TYPE, inputs=[f32] * 5, outputs=[f32], attrs=dict.fromkeys(_attrs(1, 0, 1, 1, 1), i64))
    def _deform_conv(x, offset, mask, weight, bias, **attrs):
        a = {k: int(v) for k, v in attrs.items()}
        return numpy_kernel(x, offset, mask, weight, bias, (a["stride_h"], a["stride_w"]), (a["pad_h"], a["pad_w"]),
                            (a["dilation_h"], a["dilation_w"]), a["groups"], a["deform_groups"])

    _ORTX_REGISTERED = True
