from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx

from deploykit.export import export_onnx


def exported_graph(model, pillars, coords, tmp_path: Path, opset: int = 17) -> onnx.ModelProto:
    path = tmp_path / "m.onnx"
    export_onnx(model, {"pillars": pillars.numpy(), "coords": coords.numpy()}, path, opset)
    return onnx.load(str(path))


def op_counts(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


def input_shape(model: onnx.ModelProto, name: str) -> list[int]:
    value = next(v for v in model.graph.input if v.name == name)
    return [d.dim_value for d in value.type.tensor_type.shape.dim]


def as_arrays(outputs) -> list[np.ndarray]:
    return [np.asarray(o) for o in outputs]
