"""What an int16 set costs: bit-operations per module, as AIMET's AMP counts them.

A module's bit-ops are its multiply-accumulates times the widths of the two operands
(weight x activation for a layer, activation x activation for attention's matmuls, the
deformable sampler and BEV pooling). Lifting a module from int8 to int16 multiplies its
bit-ops by four; an int16 set's cost is that extra, as a fraction of the all-int8
model's bit-ops over all its quantized modules.

MACs are counted once, on one sample, in the static shapes the engine runs:
PyTorch's FlopCounterMode for convolutions, linear layers and matmuls (inside
multi-head attention too), the op's own arithmetic for the custom ops it cannot see
(a deformable-attention sampler: four bilinear taps and the attention weight per
sampled point and channel; BEV pooling: one per kept frustum point and channel), and
one per input element for ops that only add or move data (residual adds, concats, the
pillar scatter), which makes lifting those cheap but not free.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

INT8_BITOPS, INT16_BITOPS = 8 * 8, 16 * 16


@dataclass
class CostModel:
    macs: dict[str, int]  # module -> multiply-accumulates (or element ops) on one sample

    @property
    def int8_bitops(self) -> int:
        return INT8_BITOPS * sum(self.macs.values())

    def extra_bitops(self, modules) -> int:
        return (INT16_BITOPS - INT8_BITOPS) * sum(self.macs[m] for m in set(modules))

    def extra(self, modules) -> float:
        """The int16 set's extra bit-ops as a fraction of the all-int8 model's."""
        total = self.int8_bitops
        return self.extra_bitops(modules) / total if total else 0.0

    def to_dict(self) -> dict:
        return {"unit": "bit-ops = MACs x weight bits x activation bits, one sample",
                "int8_bitops": self.int8_bitops, "macs": self.macs}


def _elements(args) -> int:
    return sum(a.numel() for a in args if isinstance(a, torch.Tensor) and a.is_floating_point())


def _op_macs(op: torch.nn.Module, args) -> int:
    """The arithmetic of a custom op FlopCounterMode does not see, from its inputs."""
    from ..models.bevdepth.streaming import BEVPoolNode
    from ..models.bevformer.attention import Sampler
    from ..passes.msda_op import SamplerOp

    if isinstance(op, (Sampler, SamplerOp)):  # value (bs, keys, heads, dim), ..., weights (bs, q, heads, levels, points)
        value, weights = args[0], args[4]
        return 5 * weights.numel() * value.shape[-1]
    if isinstance(op, BEVPoolNode):  # depth, feat (B, N, H, W, C), ranks_depth: the kept points
        return args[2].numel() * args[1].shape[-1]
    return _elements(args)


def measure_macs(qmodel: torch.nn.Module, feeds: dict, modules) -> CostModel:
    """MACs of each of ``modules`` (module paths, as the int16 search groups quantizers)
    when ``qmodel`` runs ``feeds``: its own arithmetic, not that of nested modules that are
    in ``modules`` themselves (an attention block and its output projection)."""
    from torch.utils.flop_counter import FlopCounterMode

    from ..samples import torch_outputs
    from .fake_quant import QuantInputs, SharedQuantInput
    from .insert import quantizers, set_mode

    modules = list(modules)
    custom: dict[str, int] = {}
    hooks = []
    for name in modules:
        wrapper = qmodel.get_submodule(name)
        if isinstance(wrapper, (QuantInputs, SharedQuantInput)):
            def hook(_module, args, _out, name=name, op=wrapper.inner):
                custom[name] = custom.get(name, 0) + _op_macs(op, args)
            hooks.append(wrapper.register_forward_hook(hook))
    # Counted in float (quantizers off: a quantizer collecting statistics would count this run too).
    modes = {name: q.mode for name, q in quantizers(qmodel).items()}
    set_mode(qmodel, "off")
    # FlopCounterMode's module tracker hooks the gradients of inputs that require them, and
    # fails on a parameter passed as an input under no_grad (BEVFormer's BEV queries).
    trainable = [p for p in qmodel.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        with FlopCounterMode(display=False) as counter:
            torch_outputs(qmodel, feeds)
    finally:
        for h in hooks:
            h.remove()
        for name, q in quantizers(qmodel).items():
            q.mode = modes[name]
        for p in trainable:
            p.requires_grad_(True)
    # Counts are per module path under the root's class name ("Net.a.b"), nested ones included;
    # FlopCounterMode counts a multiply-add as two flops.
    inclusive = {key.partition(".")[2]: sum(ops.values()) // 2 for key, ops in counter.get_flop_counts().items()
                 if "." in key}
    names = set(modules)

    def nearest_nested(parent: str) -> list[str]:
        inner = [m for m in names if m.startswith(parent + ".")]
        return [m for m in inner if not any(m.startswith(o + ".") for o in inner if o != m)]

    macs = {m: inclusive.get(m, 0) - sum(inclusive.get(c, 0) for c in nearest_nested(m)) + custom.get(m, 0)
            for m in modules}
    return CostModel(macs)
