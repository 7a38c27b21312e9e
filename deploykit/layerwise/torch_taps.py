"""A PyTorch model's module outputs, in execution order, keyed as the exporter scopes them."""

from __future__ import annotations

import weakref

import numpy as np
import torch
from torch.overrides import TorchFunctionMode

from .scopes import component
from .taps import Tap


class _Provenance(TorchFunctionMode):
    """Which recorded layers each tensor derives from, through the functional ops between
    modules (an attention's ``torch.cat`` of two layers' outputs reads both): the growth of a
    layer is its error over its inputs' (deploykit.layerwise.profile)."""

    def __init__(self):
        super().__init__()
        self.sources: dict[int, frozenset] = {}

    def of(self, tensors) -> frozenset:
        out = frozenset()
        for t in tensors:
            out |= self.sources.get(id(t), frozenset())
        return out

    def set(self, tensor: torch.Tensor, sources: frozenset) -> None:
        key = id(tensor)
        if key not in self.sources:
            weakref.finalize(tensor, self.sources.pop, key, None)  # ids are reused once a tensor dies
        self.sources[key] = sources

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        sources = self.of(_tensors(list(args) + list(kwargs.values())))
        if sources:
            for t in _tensors(out):
                if id(t) not in self.sources:
                    self.set(t, sources)
        return out


def _tensors(output) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in _tensors(item)]
    if isinstance(output, dict):
        return [t for item in output.values() for t in _tensors(item)]
    return []


def record(model: torch.nn.Module, inputs: dict[str, np.ndarray]) -> list[Tap]:
    """Run ``model`` on ``inputs`` (by ``model.input_names``) and return every floating-point
    tensor a module returned. In a fake-quant model, a tensor a quantizer then quantizes is
    recorded as the quantizer's output: the value an int8 engine holds there. A convolution
    followed by a BatchNorm is recorded with the BatchNorm applied, as the exporter folds it."""
    from ..quantize.fake_quant import TensorQuantizer

    convs = (torch.nn.modules.conv._ConvNd,)
    norms = (torch.nn.modules.batchnorm._BatchNorm,)

    names = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(module, name)
    stack: list[str] = []
    taps: list[Tap] = []
    latest: dict[int, int] = {}  # a tensor's id -> its latest tap (in-place ops return their input)
    conv_taps: set[int] = set()
    alive: list[torch.Tensor] = []  # keeps the recorded tensors' ids unique while recording
    provenance = _Provenance()

    calls: dict[int, int] = {}

    def enter(module, _args):
        # The exporter scopes a module's second call as "relu_1", its third "relu_2".
        name = names.get(module, "")
        k = calls[id(module)] = calls.get(id(module), -1) + 1
        stack.append((component(name) + (f"_{k}" if k else "")) if name else "")

    def leave(module, args, _kwargs, output):
        scope = "/" + "/".join(s for s in stack if s)
        stack.pop()
        if isinstance(module, TensorQuantizer):
            if module.mode == "quant" and args and isinstance(args[0], torch.Tensor):
                i = latest.get(id(args[0]))
                if i is not None and not taps[i].quantized:
                    taps[i].value = output.detach().float().cpu().numpy().copy()
                    taps[i].quantized = True
                    taps[i].quantizer = names.get(module)
            return
        if module is model:
            return
        if isinstance(module, norms) and args and isinstance(args[0], torch.Tensor):
            # The exporter folds a BatchNorm into the convolution before it: the conv's
            # scope then outputs the normalised tensor.
            i = latest.get(id(args[0]))
            if i is not None and i in conv_taps:
                taps[i].value = output.detach().float().cpu().numpy().copy()
        for t in _tensors(output):
            if not t.is_floating_point():
                continue
            alive.append(t)
            latest[id(t)] = len(taps)
            if isinstance(module, convs):
                conv_taps.add(len(taps))
            ident = ("torch", id(t), t._version)
            read = tuple(provenance.of([t]) - {ident})  # the recorded layers it was computed from
            provenance.set(t, frozenset([ident]))
            taps.append(Tap(scope, t.detach().float().cpu().numpy().copy(), ident, len(taps),
                            name=names.get(module), inputs=read))

    handles = []
    for module in names:
        handles.append(module.register_forward_pre_hook(enter))
        handles.append(module.register_forward_hook(leave, with_kwargs=True))
    try:
        with torch.no_grad(), provenance:
            model(*(torch.from_numpy(np.ascontiguousarray(inputs[n])) for n in model.input_names))
    finally:
        for h in handles:
            h.remove()
    return taps
