"""One recorded intermediate tensor."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Tap:
    """``key`` is the scope the tensor left (deploykit.layerwise.scopes); ``ident`` tells
    two taps of one tensor apart from taps of two tensors (a module returning its last
    child's output gives one tensor under two keys). ``quantized`` says the value is the
    tensor as its consumer's quantizer delivers it; ``clamped`` that the engine's quantizer
    range starts at 0 (a ReLU folded into it), so the other side is read through max(., 0)."""

    key: str
    value: np.ndarray
    ident: object
    order: int
    quantized: bool = False
    clamped: bool = False
    grid: tuple | None = None  # (scale, zero point, qmin, qmax, axis) the value was read on
    quantizer: str | None = None  # the quantizer whose output the value is (module path)
    name: str | None = None  # the module's path where known (PyTorch); else rebuilt from the scope
    inputs: tuple = ()  # idents of the tensors the layer read (its predecessors, for growth)

    def on_grid(self, value: np.ndarray) -> np.ndarray:
        """``value`` quantized and dequantized on this tap's grid."""
        scale, zero, low, high, axis = self.grid
        if axis is not None:
            shape = [1] * value.ndim
            shape[axis] = -1
            scale, zero = scale.reshape(shape), zero.reshape(shape)
        q = np.clip(np.rint(value / scale) + zero, low, high)  # rint: ONNX rounds half to even
        return ((q - zero) * scale).astype(np.float32)
