"""Put quantizers into a (rewritten) float model and drive them.

Conv, ConvTranspose and Linear layers get an input and a per-channel weight
quantizer; multi-head attention gets them on its projections and on both
operands of its two matmuls; parameter-free custom ops and deformable-attention samplers get a
quantizer on each float input (the int8 tensors an NPU kernel would read);
residual adds and feature concats (deploykit.models.layers) get one quantizer
shared by all their inputs, since an int8 add or concat needs a common scale.
Every quantizer is named by its module path, e.g.
``pts_bbox_head.transformer.encoder.layers.0.attentions.0.sampling_offsets.input_quantizer``,
and recipes lift quantizers to int16 with shell-style patterns of those names.
"""

from __future__ import annotations

import copy
import difflib
import fnmatch

from torch import nn

from .fake_quant import (MODES, QuantConv2d, QuantConvTranspose2d, QuantInputs, QuantLinear,
                         QuantMultiheadAttention, SharedQuantInput, TensorQuantizer)


def _shared_input(module: nn.Module) -> bool:
    """Ops whose inputs must share one scale in int8 (add, concat): one quantizer for all."""
    from ..models.layers import Add, Concat

    return isinstance(module, (Add, Concat))


def _input_names(module: nn.Module) -> tuple[str, ...] | None:
    """Which inputs of a parameter-free op are quantized ("" = integer input, left alone)."""
    from ..models.bevdepth.streaming import BEVPoolNode
    from ..models.bevformer.attention import Sampler
    from ..ops.pillar_scatter import PillarScatter
    from ..passes.msda_op import SamplerOp

    if isinstance(module, (Sampler, SamplerOp)):
        return ("value", "", "", "locations", "weights")
    if isinstance(module, PillarScatter):
        return ("features", "")
    if isinstance(module, BEVPoolNode):
        return ("depth", "context", "", "", "", "", "")
    return None


def insert_quantizers(model: nn.Module, method: str = "max", overrides: dict[str, str] | None = None) -> nn.Module:
    """A deep copy of ``model`` with quantizers (mode "off": it still computes in float).
    ``overrides`` maps quantizer-name patterns to another activation calibrator."""
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        kind = type(module)
        if kind is nn.Conv2d:
            new = QuantConv2d.from_float(module, method)
        elif kind is nn.ConvTranspose2d:
            new = QuantConvTranspose2d.from_float(module, method)
        elif kind is nn.Linear:
            new = QuantLinear.from_float(module, method)
        elif kind is nn.MultiheadAttention:
            new = QuantMultiheadAttention.from_float(module, method)
        elif _shared_input(module):
            new = SharedQuantInput(module, method)
        elif (names := _input_names(module)) is not None:
            new = QuantInputs(module, names, method)
        else:
            continue
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new)
    for name, q in quantizers(model).items():
        q.qname = name
        for pattern, other in (overrides or {}).items():
            if fnmatch.fnmatch(name, pattern):
                q.method = other
    return model


def quantizers(model: nn.Module) -> dict[str, TensorQuantizer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, TensorQuantizer)}


def set_mode(model: nn.Module, mode: str, names=None) -> None:
    """Set ``mode`` on the named quantizers (default: all)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}")
    qs = quantizers(model)
    for name in qs if names is None else names:
        qs[name].mode = mode


def match_patterns(model: nn.Module, patterns) -> tuple[dict[str, list[str]], list[str]]:
    """(pattern -> quantizer names it matches, warnings for patterns matching nothing)."""
    names = list(quantizers(model))
    matches, warnings = {}, []
    for pattern in patterns:
        hits = fnmatch.filter(names, pattern)
        matches[pattern] = hits
        if not hits:
            close = difflib.get_close_matches(pattern.strip("*"), names, n=3, cutoff=0.3)
            hint = f"; closest quantizers: {', '.join(close)}" if close else ""
            warnings.append(f"int16 override '{pattern}' matches no quantizer{hint}")
    return matches, warnings


def set_bits(model: nn.Module, names, bits: int) -> None:
    qs = quantizers(model)
    for name in names:
        qs[name].set_bits(bits)
