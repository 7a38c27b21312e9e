"""The PyTorch backend: the converted model's own modules, timed like the other engines."""

from __future__ import annotations

import numpy as np
import pytest

from deploykit.bench import bench_model
from deploykit.compare import compare_outputs
from deploykit.engines import ort as ort_engine
from deploykit.engines import pytorch as torch_engine
from deploykit.errors import EngineError


@pytest.mark.parametrize("fixture", ["converted_dir", "lss_converted_dir"])
def test_torch_engine_runs_the_converted_model(request, fixture):
    converted = request.getfixturevalue(fixture)
    engine = torch_engine.build(converted / "model.onnx", device="cpu")
    feeds = dict(np.load(converted / "inputs.npz"))
    got = engine.run(feeds)
    want = ort_engine.build(converted / "model.onnx").run(feeds)
    assert set(got) == set(want)
    assert max(a.max_rel_error for a in compare_outputs(want, got)) < 1e-4
    assert engine.kernels == {}  # GPU kernels only on CUDA


def test_bench_torch_backend(converted_dir):
    result = bench_model(converted_dir / "model.onnx", backend="torch", device="cpu", warmup=1, iterations=3)
    assert result["backend"] == "torch" and result["settings"]["device"] == "cpu"
    assert result["latency"]["iterations"] == 3 and result["inputs"]["source"].endswith("inputs.npz")


def test_torch_backend_needs_a_convert_directory(tmp_path, converted_dir):
    lone = tmp_path / "model.onnx"
    lone.write_bytes((converted_dir / "model.onnx").read_bytes())
    with pytest.raises(EngineError, match="no manifest.json"):
        torch_engine.build(lone, device="cpu")
    with pytest.raises(EngineError, match="device must be one of"):
        torch_engine.build(converted_dir, device="tpu")
