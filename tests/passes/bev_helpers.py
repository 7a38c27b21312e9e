from __future__ import annotations

from pathlib import Path

import onnx

from deploykit.compare import compare_outputs
from deploykit.export import export_onnx, simplify
from deploykit.samples import torch_outputs


def export_bev(model, sample, tmp_path: Path, name: str = "m.onnx", simplified: bool = False) -> onnx.ModelProto:
    path = tmp_path / name
    export_onnx(model, sample.feeds, path, 17)
    if simplified:
        simplify(path)
    return onnx.load(str(path))


def worst_rel(model_a, model_b, samples) -> float:
    return max(a.max_rel_error for s in samples
               for a in compare_outputs(torch_outputs(model_a, s.feeds), torch_outputs(model_b, s.feeds)))
