"""The Python API: every command is one call on `deploykit`, and `import deploykit` stays cheap."""

import subprocess
import sys

import deploykit


def test_every_command_is_a_call():
    for name in ("convert", "calib", "quantize", "bench", "gate", "detect", "rig_from_nuscenes", "load_recipe"):
        assert callable(getattr(deploykit, name)), name
    # The pipeline modules stay modules: their insides are reachable as before.
    import importlib

    assert importlib.import_module("deploykit.quantize.pipeline").quantize is deploykit.quantize.pipeline.quantize
    assert deploykit.bench.bench_model is not None
    assert deploykit.load_recipe("centerpoint_pillar_small").name == "centerpoint_pillar_small"


def test_bench_through_the_api(converted_dir):
    result = deploykit.bench(converted_dir / "model.onnx", warmup=0, iterations=2, threads=1)
    assert result["latency"]["iterations"] == 2 and result["recipe"] == "centerpoint_pillar_small"


def test_import_does_not_load_torch():
    code = "import sys, deploykit; print('torch' in sys.modules, 'onnxruntime' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
