"""Fake quantization on PyTorch's own ops: quantizers and quantized modules.

A ``TensorQuantizer`` sits on one tensor (a layer input, a weight, an input of
a custom op). It is off, collecting statistics (``calib``) or applying
symmetric narrow-range fake quantization (``quant``: int8 in [-127, 127],
int16 in [-32767, 32767], scale = amax / qmax) with
``torch.fake_quantize_per_{tensor,channel}_affine``, whose straight-through
gradient makes the model trainable as is (QAT). Weights are per output
channel, activations per tensor. The calibrator is kept after calibration so a
quantizer lifted to int16 later recomputes its range for 16 bits.

Quantized modules subclass the float ones and keep their parameter names, so
a quantized model's state dict is the float one plus ``*_quantizer.amax``.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from .calibrators import make_calibrator

MODES = ("off", "calib", "quant")


def qmax(bits: int) -> int:
    if bits not in (8, 16):
        raise ValueError(f"only int8 and int16 are supported, not int{bits}")
    return 2 ** (bits - 1) - 1


def _scale(amax: torch.Tensor, bits: int) -> torch.Tensor:
    return (amax.float() / qmax(bits)).clamp(min=1e-12)


def _fake_quantize_scaled(x: torch.Tensor, scale: torch.Tensor, q: int, axis: int | None) -> torch.Tensor:
    if axis is None:
        return torch.fake_quantize_per_tensor_affine(x, scale.reshape(()), torch.zeros((), dtype=torch.int32), -q, q)
    zero = torch.zeros(scale.numel(), dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(x, scale.reshape(-1), zero, axis % x.dim(), -q, q)


def fake_quantize(x: torch.Tensor, amax: torch.Tensor, bits: int, axis: int | None = None) -> torch.Tensor:
    return _fake_quantize_scaled(x, _scale(amax, bits), qmax(bits), axis)


class QuantizeDequantize(torch.autograd.Function):
    """Fake quantization that exports as an ONNX QuantizeLinear/DequantizeLinear pair.

    The zero point's dtype carries the width (int8 or int16, the latter valid
    from opset 21). ONNX saturates int8 to [-128, 127] where the fake-quant
    model clips at -127: the two differ only for values below -amax, by at most
    one quantization step.
    """

    @staticmethod
    def forward(ctx, x, scale, zero_point, axis):  # noqa: ARG004
        return _fake_quantize_scaled(x, scale, qmax(8 if zero_point.dtype == torch.int8 else 16), axis)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None

    @staticmethod
    def symbolic(g, x, scale, zero_point, axis):
        kwargs = {} if axis is None else {"axis_i": axis}
        q = g.op("QuantizeLinear", x, scale, zero_point, **kwargs)
        out = g.op("DequantizeLinear", q, scale, zero_point, **kwargs)
        out.setType(x.type())
        return out


def export_fake_quantize(x: torch.Tensor, amax: torch.Tensor, bits: int, axis: int | None) -> torch.Tensor:
    # Rebuilt from Python numbers so the scale is a constant of the graph, not
    # arithmetic on the amax buffer that the exporter would keep.
    scale = torch.tensor(_scale(amax, bits).tolist(), dtype=torch.float32)
    dtype = torch.int8 if bits == 8 else torch.int16
    if axis is None:
        return QuantizeDequantize.apply(x, scale.reshape(()), torch.zeros((), dtype=dtype), None)
    axis = axis % x.dim()
    return QuantizeDequantize.apply(x, scale.reshape(-1), torch.zeros(scale.numel(), dtype=dtype), axis)


class TensorQuantizer(nn.Module):
    def __init__(self, bits: int = 8, axis: int | None = None, method: str = "max"):
        super().__init__()
        qmax(bits)
        self.bits, self.axis, self.method = bits, axis, method
        self.mode = "off"
        self.calibrator = None
        self.register_buffer("amax", torch.zeros(0))

    @property
    def calibrated(self) -> bool:
        return self.amax.numel() > 0

    def start_calibration(self) -> None:
        # Per-channel ranges (weights) are always the max: a weight has no outliers to clip.
        self.calibrator = make_calibrator("max" if self.axis is not None else self.method, self.axis)
        self.mode = "calib"

    def finish_calibration(self) -> bool:
        """Fix the range; False (and the quantizer stays off) if it saw no data: its module
        is not on the deployed path (e.g. BEVFormer's per-layer class branches before the last)."""
        if self.calibrator is None or self.calibrator.batches == 0:
            self.mode = "off"
            return False
        self.amax = self.calibrator.compute_amax(self.bits).float()
        self.mode = "quant"
        return True

    def set_bits(self, bits: int) -> None:
        qmax(bits)
        self.bits = bits
        if self.calibrator is not None and self.calibrator.batches:
            self.amax = self.calibrator.compute_amax(bits).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "calib":
            try:
                self.calibrator.collect(x.detach())
            except InputError as exc:
                raise InputError(f"{exc} (at quantizer {getattr(self, 'qname', '?')})") from None
            return x
        if self.mode == "quant":
            if torch.onnx.is_in_onnx_export():
                return export_fake_quantize(x, self.amax, self.bits, self.axis)
            return fake_quantize(x, self.amax, self.bits, self.axis)
        return x

    def extra_repr(self) -> str:
        axis = "per-tensor" if self.axis is None else f"per-channel axis {self.axis}"
        return f"int{self.bits}, {axis}, {self.method}, mode={self.mode}"


def _adopt(cls, module: nn.Module) -> nn.Module:
    """An instance of ``cls`` (a subclass of module's class) sharing module's tensors."""
    q = cls.__new__(cls)
    q.__dict__.update(module.__dict__)
    q._parameters = OrderedDict(module._parameters)
    q._buffers = OrderedDict(module._buffers)
    q._modules = OrderedDict(module._modules)
    return q


class _QuantWeighted:
    """from_float for layers with one input and one weight quantizer."""

    weight_axis = 0  # the output-channel axis of the weight

    @classmethod
    def from_float(cls, m: nn.Module, method: str) -> nn.Module:
        q = _adopt(cls, m)
        q.input_quantizer = TensorQuantizer(method=method)
        q.weight_quantizer = TensorQuantizer(axis=cls.weight_axis)
        return q


class QuantConv2d(_QuantWeighted, nn.Conv2d):
    def forward(self, x):
        return self._conv_forward(self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias)


class QuantConvTranspose2d(_QuantWeighted, nn.ConvTranspose2d):
    weight_axis = 1  # (in, out/groups, kH, kW)

    def forward(self, x):
        return F.conv_transpose2d(self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias, self.stride,
                                  self.padding, self.output_padding, self.groups, self.dilation)


class QuantLinear(_QuantWeighted, nn.Linear):
    def forward(self, x):
        return F.linear(self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias)


class QuantInputs(nn.Module):
    """Quantizes the float tensor inputs of a parameter-free module (a custom op,
    a deformable-attention sampler); integer inputs (shapes, indices) pass as they are."""

    def __init__(self, inner: nn.Module, names: tuple[str, ...], method: str):
        super().__init__()
        self.inner = inner
        self.names = names
        for name in names:
            if name:
                self.add_module(f"{name}_quantizer", TensorQuantizer(method=method))

    def forward(self, *args):
        args = [getattr(self, f"{n}_quantizer")(a) if n else a for n, a in zip(self.names, args)]
        return self.inner(*args)


class SharedQuantInput(nn.Module):
    """One quantizer for every input of an add or concat: int8 kernels for them
    need a common scale, and calibrating it on all inputs gives the widest range."""

    def __init__(self, inner: nn.Module, method: str):
        super().__init__()
        self.inner = inner
        self.input_quantizer = TensorQuantizer(method=method)

    def forward(self, *args):
        return self.inner(*(self.input_quantizer(a) for a in args))


class QuantMultiheadAttention(nn.MultiheadAttention):
    """nn.MultiheadAttention written out as projections, two matmuls and a softmax,
    so each of its int8 tensors has a quantizer: the in-projection's inputs and
    per-channel weight, both operands of Q @ K^T (q, k) and of P @ V (probs, v).
    ``out_proj`` becomes a QuantLinear on its own. The parameters keep their
    names; torch's fused kernel is not used, so results differ from it by fp32
    rounding only."""

    _OPERANDS = ("query", "key", "value", "q", "k", "probs", "v")

    @classmethod
    def from_float(cls, m: nn.MultiheadAttention, method: str) -> "QuantMultiheadAttention":
        if not m._qkv_same_embed_dim or m.in_proj_bias is None or m.bias_k is not None:
            raise InputError("only nn.MultiheadAttention with kdim = vdim = embed_dim, in-projection bias and no "
                             "add_bias_kv can be quantized")
        q = _adopt(cls, m)
        for name in cls._OPERANDS:
            q.add_module(f"{name}_quantizer", TensorQuantizer(method=method))
        q.in_proj_weight_quantizer = TensorQuantizer(axis=0)
        q.out_proj = QuantLinear.from_float(m.out_proj, method)
        return q

    def forward(self, query, key, value, key_padding_mask=None, need_weights=False, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if key_padding_mask is not None or attn_mask is not None or need_weights or is_causal:
            raise InputError("quantized multi-head attention supports neither masks nor returned weights")
        if self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        hd = self.head_dim
        e = self.embed_dim  # constant slices, where chunk() would export shape arithmetic
        w, b = self.in_proj_weight_quantizer(self.in_proj_weight), self.in_proj_bias
        (w_q, w_k, w_v), (b_q, b_k, b_v) = (w[:e], w[e:2 * e], w[2 * e:]), (b[:e], b[e:2 * e], b[2 * e:])

        def project(x, w, b):  # (L, B, E) -> (B * heads, L, hd)
            return F.linear(x, w, b).reshape(x.shape[0], -1, hd).transpose(0, 1)

        q = project(self.query_quantizer(query), w_q, b_q)
        k = project(self.key_quantizer(key), w_k, b_k)
        v = project(self.value_quantizer(value), w_v, b_v)
        scores = torch.matmul(self.q_quantizer(q), self.k_quantizer(k).transpose(1, 2)) * hd ** -0.5
        probs = torch.softmax(scores, -1)
        out = torch.matmul(self.probs_quantizer(probs), self.v_quantizer(v))  # (B * heads, Lq, hd)
        out = out.transpose(0, 1).reshape(query.shape[0], -1, self.embed_dim)
        out = self.out_proj(out)
        if self.batch_first:
            out = out.transpose(0, 1)
        return out, None
