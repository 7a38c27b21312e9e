"""Backends. Each builds an engine from an ONNX file with the same small surface:

    engine = build(onnx_path, ...)      # deploykit.engines.ort.build
    outputs = engine.run({"name": array, ...})  # dict name -> numpy array
    engine.inputs / engine.outputs      # [TensorSpec(name, shape, dtype)]
"""

from __future__ import annotations

from dataclasses import dataclass

# How ONNX Runtime runs deploykit's custom nodes; see engines/ort.py. Kept here,
# free of heavy imports, so the CLI can offer the choice without loading torch.
CUSTOM_OP_MODES = ("function", "inline", "ortx")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # numpy dtype name

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}
