from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from deploykit.export import export_onnx, simplify
from deploykit.samples import torch_outputs


def export_bev(model, sample, tmp_path: Path, name: str = "m.onnx", simplified: bool = False) -> onnx.ModelProto:
    path = tmp_path / name
    export_onnx(model, sample.feeds, path, 17)
    if simplified:
        simplify(path)
    return onnx.load(str(path))


def worst_rel(model_a, model_b, samples) -> float:
    worst = 0.0
    for s in samples:
        a, b = torch_outputs(model_a, s.feeds), torch_outputs(model_b, s.feeds)
        worst = max(worst, *(float(np.abs(a[k] - b[k]).max() / np.abs(a[k]).max()) for k in a))
    return worst
