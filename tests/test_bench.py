import numpy as np
import pytest

from deploykit.bench import bench_model, engine_feeds, interleaved, latency_stats, ratio_interval


def test_latency_stats_on_known_samples():
    seconds = np.arange(1, 101) / 1000.0  # 1..100 ms
    s = latency_stats(seconds, warmup=5)
    assert s.iterations == 100 and s.warmup == 5
    assert s.mean_ms == pytest.approx(50.5)
    assert s.p50_ms == pytest.approx(50.5)
    assert s.p90_ms == pytest.approx(90.1)
    assert s.p99_ms == pytest.approx(99.01)
    assert s.min_ms == pytest.approx(1.0) and s.max_ms == pytest.approx(100.0)
    assert s.std_ms == pytest.approx(np.std(np.arange(1, 101), ddof=1))
    assert s.throughput_fps == pytest.approx(1000 / 50.5)
    with pytest.raises(ValueError):
        latency_stats([], warmup=0)


def test_interleaved_rotates_order_and_counts():
    order = []
    calls = {name: (lambda n=name: order.append(n)) for name in "abc"}
    samples = interleaved(calls, warmup=1, rounds=3)
    assert {k: len(v) for k, v in samples.items()} == {"a": 3, "b": 3, "c": 3}
    timed = order[3:]
    assert timed == list("abc") + list("bca") + list("cab")


def test_ratio_interval_brackets_the_truth():
    rng = np.random.default_rng(0)
    a = 1.2 * (1 + 0.05 * rng.standard_normal(200))
    b = 1.0 * (1 + 0.05 * rng.standard_normal(200))
    ratio, lo, hi = ratio_interval(a, b)
    assert lo < 1.2 < hi and lo < ratio < hi and hi - lo < 0.1


def test_synthetic_feeds_when_no_sample(tmp_path):
    from deploykit.engines import TensorSpec

    class Fake:
        inputs = [TensorSpec("x", (2, 3), "float32"), TensorSpec("i", (4,), "int32")]

    feeds, source = engine_feeds(tmp_path / "model.onnx", Fake())
    assert source == "synthetic"
    assert feeds["x"].shape == (2, 3) and feeds["x"].dtype == np.float32
    assert feeds["i"].dtype == np.int32 and not feeds["i"].any()


@pytest.mark.parametrize("how", ["script", "stdin"])
def test_bench_model_from_an_unguarded_script(converted_dir, tmp_path, how):
    """A user's script without an `if __name__ == "__main__":` guard, or one read from
    stdin: the peak-memory child must not re-run it (it once did, and hung)."""
    import subprocess
    import sys

    marker = tmp_path / "runs.txt"
    script = (f"import deploykit.bench as b\n"
              f"open({str(marker)!r}, 'a').write('run\\n')\n"
              f"r = b.bench_model({str(converted_dir / 'model.onnx')!r}, warmup=0, iterations=2, threads=1)\n"
              f"print('peak', r['peak_memory_bytes'])\n")
    if how == "script":
        path = tmp_path / "user_script.py"
        path.write_text(script)
        proc = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=120)
    else:
        proc = subprocess.run([sys.executable, "-"], input=script, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert marker.read_text() == "run\n"  # the script ran once
    peak = int(proc.stdout.split("peak")[-1])
    assert peak > 1_000_000  # an ORT session and its arena: megabytes


def test_a_directory_runs_the_file_its_backend_should(bev_converted_dir, bev_quantized_dir, tmp_path):
    """bench on a convert directory runs model.onnx; on a quantize directory, ONNX Runtime runs
    the ORT flavour (int8 + int16 where there is one) and TensorRT the TensorRT flavour."""
    from deploykit.bench import resolve_model
    from deploykit.errors import EngineError

    assert resolve_model(bev_converted_dir, "ort") == bev_converted_dir / "model.onnx"
    assert resolve_model(bev_quantized_dir, "ort") == bev_quantized_dir / "model.ort.qdq.onnx"
    assert resolve_model(bev_quantized_dir, "tensorrt") == bev_quantized_dir / "model.trt.qdq.onnx"
    assert resolve_model(bev_quantized_dir / "model.int8.qdq.onnx", "ort") == bev_quantized_dir / "model.int8.qdq.onnx"
    with pytest.raises(EngineError, match="quantize directory; --backend torch"):
        resolve_model(bev_quantized_dir, "torch")
    with pytest.raises(EngineError, match="neither a convert nor a quantize directory"):
        resolve_model(tmp_path, "ort")
    with pytest.raises(EngineError, match="does not exist"):
        resolve_model(tmp_path / "missing.onnx", "ort")
    result = bench_model(bev_quantized_dir, warmup=0, iterations=1)
    assert result["model"].endswith("model.ort.qdq.onnx")
