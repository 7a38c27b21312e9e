"""Latency measurement: statistics, interleaved comparisons, machine fingerprint."""

from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .artifacts import sha256_file
from .errors import InputError
from .progress import console


@dataclass(frozen=True)
class LatencyStats:
    warmup: int
    iterations: int
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    std_ms: float
    min_ms: float
    max_ms: float
    throughput_fps: float

    def to_dict(self) -> dict:
        return asdict(self)


def latency_stats(seconds: list[float] | np.ndarray, warmup: int) -> LatencyStats:
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    if ms.size == 0:
        raise ValueError("no timed iterations")
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    mean = float(ms.mean())
    return LatencyStats(warmup, int(ms.size), mean, float(p50), float(p90), float(p99),
                        float(ms.std(ddof=1)) if ms.size > 1 else 0.0, float(ms.min()), float(ms.max()),
                        1e3 / mean)


def time_calls(fn: Callable[[], Any], *, warmup: int, iterations: int) -> np.ndarray:
    for _ in range(warmup):
        fn()
    out = np.empty(iterations)
    for i in range(iterations):
        start = time.perf_counter()
        fn()
        out[i] = time.perf_counter() - start
    return out


def interleaved(calls: dict[str, Callable[[], Any]], *, warmup: int, rounds: int,
                per_round: int = 1, best_of: int = 1) -> dict[str, np.ndarray]:
    """Time several callables in alternation so drift on a shared machine
    (thermal state, other tenants) hits all of them alike; the order rotates
    each round so none always runs right after another. ``best_of`` > 1 records
    the fastest of that many back-to-back calls: interference on a shared
    machine only ever adds time, so the minimum is its most stable estimate."""
    names = list(calls)
    for name in names:
        for _ in range(warmup):
            calls[name]()
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            fn = calls[name]
            for _ in range(per_round):
                best = np.inf
                for _ in range(best_of):
                    start = time.perf_counter()
                    fn()
                    best = min(best, time.perf_counter() - start)
                samples[name].append(best)
    return {n: np.asarray(v) for n, v in samples.items()}


def bootstrap_ratio(a: np.ndarray, b: np.ndarray, *, resamples: int = 2000, seed: int = 0) -> np.ndarray:
    """Bootstrap distribution of median(a) / median(b), each resampled on its own."""
    rng = np.random.default_rng(seed)
    ia = rng.integers(0, a.size, (resamples, a.size))
    ib = rng.integers(0, b.size, (resamples, b.size))
    return np.median(a[ia], axis=1) / np.median(b[ib], axis=1)


def ratio_interval(a: np.ndarray, b: np.ndarray, *, resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Median(a) / median(b) with a 95% bootstrap interval."""
    lo, hi = np.percentile(bootstrap_ratio(a, b, resamples=resamples, seed=seed), [2.5, 97.5])
    return float(np.median(a) / np.median(b)), float(lo), float(hi)


def compare_engines(variants: dict[str, tuple], baseline: str, *, rounds: int, threads: int,
                    warmup: int = 3) -> list[dict]:
    """Time ONNX models against one baseline, interleaved in this process.

    ``variants``: name -> (model path, feeds, custom-op mode). Each row gives the
    median and p90 latency and the ratio of medians to ``baseline`` with its 95%
    bootstrap interval, so two variants can be compared on a noisy machine.
    """
    from .engines.ort import build

    # Idle pool threads must not spin: they would steal the cores the next session runs on
    # (measured: the synth float model 41 ms spinning against 21.7 ms not, interleaved).
    engines = {n: (build(p, custom_ops=mode, threads=threads, spinning=False), feeds)
               for n, (p, feeds, mode) in variants.items()}
    calls = {n: (lambda e=e, f=f: e.run(f)) for n, (e, f) in engines.items()}
    samples = interleaved(calls, warmup=warmup, rounds=rounds)
    rows = []
    for name, s in samples.items():
        ratio, lo, hi = ratio_interval(s, samples[baseline])
        rows.append({"variant": name, "median_ms": float(np.median(s) * 1e3),
                     "p90_ms": float(np.percentile(s, 90) * 1e3), "ratio_to_baseline": ratio,
                     "ratio_ci95": [lo, hi], "runs": int(s.size)})
    return rows


def compare_pairwise(variants: dict[str, tuple], baseline: str, *, rounds: int, threads: int,
                     warmup: int = 3) -> list[dict]:
    """Like compare_engines, but each variant is timed against ``baseline`` in its
    own interleaved run, so only two ONNX Runtime sessions (and their memory
    arenas) are alive at once: for models whose engines do not fit in memory
    together. The baseline row is the one from the first pairing."""
    import gc

    rows: list[dict] = []
    for name in variants:
        if name == baseline:
            continue
        pair = compare_engines({baseline: variants[baseline], name: variants[name]}, baseline, rounds=rounds,
                               threads=threads, warmup=warmup)
        for row in pair:
            row["baseline_median_ms"] = pair[0]["median_ms"]
        rows += pair if not rows else pair[1:]
        gc.collect()
    return rows


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "cores": cores, "memory_gib": mem_gib, "os": platform.platform(),
            "python": platform.python_version()}


def recipe_beside(model_path: Path) -> str | None:
    """The recipe named by the manifest.json that convert or quantize wrote beside a model."""
    import json

    manifest = Path(model_path).parent / "manifest.json"
    if not manifest.is_file():
        return None
    recipe = json.loads(manifest.read_text()).get("recipe")
    return recipe.get("name") if isinstance(recipe, dict) else recipe  # convert stores the recipe, quantize its name


def peak_memory(model_path: Path, *, custom_ops: str, threads: int | None, runs: int = 3) -> int | None:
    """Peak resident memory (bytes) that building ``model_path``'s engine and running it
    ``runs`` times adds to a fresh process: measured in a child process, since memory
    a process freed stays resident and would hide the next engine's. Linux only (VmHWM);
    None elsewhere.

    The child is a fresh interpreter started on this module, not a multiprocessing
    worker: spawn re-imports the caller's main script, which re-runs a script without an
    ``if __name__ == "__main__":`` guard (and hangs reading a script from stdin)."""
    import json
    import subprocess
    import sys

    if not Path("/proc/self/status").exists():
        return None
    args = json.dumps({"model": str(model_path), "custom_ops": custom_ops, "threads": threads, "runs": runs})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent.parent),
                                                                      os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "deploykit.bench", args], capture_output=True, text=True, env=env,
                          stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        from .errors import EngineError

        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise EngineError(f"measuring the peak memory of {model_path} failed in its child process: {last}")
    return int(proc.stdout.strip().splitlines()[-1])


def _peak_memory_child(model_path: str, custom_ops: str, threads: int | None, runs: int) -> int:
    from .engines import ort as ort_engine

    start = _proc_status("VmRSS")
    engine = ort_engine.build(model_path, custom_ops=custom_ops, threads=threads)
    feeds, _ = engine_feeds(Path(model_path), engine)
    for _ in range(runs):  # ORT's arena grows on the first runs
        engine.run(feeds)
    return max(0, _proc_status("VmHWM") - start)


def _proc_status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"no {field} in /proc/self/status")


def _sample_files(model_path: Path) -> list[Path]:
    import json

    found = [model_path.parent / "inputs.npz"]
    manifest = model_path.parent / "manifest.json"
    if manifest.is_file():
        converted = json.loads(manifest.read_text()).get("converted")
        if isinstance(converted, str):
            found.append(Path(converted) / "inputs.npz")
    return [f for f in found if f.is_file()]


BACKENDS = ("ort", "tensorrt", "torch")


def engine_feeds(model_path: Path, engine) -> tuple[dict[str, np.ndarray], str]:
    """Realistic inputs if ``convert`` left them beside the model (or beside the
    converted model a ``quantize`` directory names in its manifest), else synthetic.

    Synthetic feeds are standard-normal floats and zero integers: right shapes,
    but sparse ops (pillar scatter) then do less work than on real data, so the
    source is reported with every result.
    """
    for sample in _sample_files(model_path):
        with np.load(sample) as data:
            feeds = {k: data[k] for k in data.files}
        if all(s.name in feeds and tuple(feeds[s.name].shape) == s.shape for s in engine.inputs):
            return {s.name: feeds[s.name] for s in engine.inputs}, str(sample)
    rng = np.random.default_rng(0)
    feeds = {}
    for spec in engine.inputs:
        if any(d < 0 for d in spec.shape):
            raise InputError(f"input '{spec.name}' has a dynamic shape {list(spec.shape)}; export with static shapes")
        if spec.dtype.startswith("float"):
            feeds[spec.name] = rng.standard_normal(spec.shape).astype(spec.dtype)
        else:
            feeds[spec.name] = np.zeros(spec.shape, dtype=spec.dtype)
    return feeds, "synthetic"


# What each backend runs from a `deploykit quantize` directory, best first: the ORT flavours
# are placed for ONNX Runtime's int8 kernels, the TensorRT flavour for TensorRT's fusions (and
# has no int16, which TensorRT lacks).
QUANTIZED_FILES = {"ort": ("model.ort.qdq.onnx", "model.ort.int8.qdq.onnx", "model.qdq.onnx", "model.int8.qdq.onnx"),
                   "tensorrt": ("model.trt.qdq.onnx",)}


def resolve_model(path: str | Path, backend: str) -> Path:
    """The ONNX file to run: ``path`` itself, or, for a directory, the file ``backend`` should
    run from it (a convert directory's model.onnx; a quantize directory's flavour for the
    backend, QUANTIZED_FILES)."""
    from .errors import EngineError

    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise EngineError(f"model {path} does not exist")
    if (path / "quantizers.json").is_file():
        if backend == "torch":
            raise EngineError(f"{path} is a quantize directory; --backend torch runs a convert directory's model")
        for name in QUANTIZED_FILES[backend]:
            if (path / name).is_file():
                return path / name
        raise EngineError(f"{path} has none of {', '.join(QUANTIZED_FILES[backend])}: quantize it again with this "
                          "deploykit")
    if (path / "model.onnx").is_file():
        return path / "model.onnx"
    raise EngineError(f"{path} is neither a convert nor a quantize directory (no model.onnx, no quantizers.json)")


def bench_model(model_path: str | Path, *, backend: str = "ort", custom_ops: str = "function",
                threads: int | None = None, warmup: int = 10, iterations: int = 50,
                stages: bool = False, precision: str = "fp32", device: str = "auto",
                plugin_impl: str = "aot") -> dict[str, Any]:
    """Benchmark one ONNX model (or the one a convert / quantize directory holds for
    ``backend``: resolve_model); returns a JSON-ready result. ``stages`` adds the
    per-stage breakdown from a separate profiled session (deploykit.profile).
    ``backend="tensorrt"`` (where installed) builds at ``precision``, deploykit's plugins
    as ``plugin_impl`` ("aot" or "jit", see engines.tensorrt.build); ``backend="torch"``
    runs the converted model's PyTorch modules on ``device`` (with deploykit's GPU kernels
    on CUDA where installed); peak host memory and stages are ONNX Runtime measurements
    and are left out there."""
    from .engines import ort as ort_engine
    from .errors import EngineError

    if backend not in BACKENDS:
        raise EngineError(f"backend '{backend}' is not one of {', '.join(BACKENDS)}")
    model_path = resolve_model(model_path, backend)
    if backend == "tensorrt":
        return _bench_tensorrt(model_path, precision, warmup, iterations, plugin_impl)
    if backend == "torch":
        return _bench_torch(model_path, device, threads, warmup, iterations)
    engine = ort_engine.build(model_path, custom_ops=custom_ops, threads=threads)
    feeds, source = engine_feeds(model_path, engine)
    with console().status(f"timing {model_path} ({warmup} warm-up + {iterations} runs)"):
        seconds = time_calls(lambda: engine.run(feeds), warmup=warmup, iterations=iterations)
    with console().status(f"measuring peak memory of {model_path} in a fresh process"):
        peak = peak_memory(model_path, custom_ops=custom_ops, threads=engine.threads)
    import onnxruntime

    result = _result(model_path, engine, source, seconds, warmup, backend="ort", peak_memory_bytes=peak,
                     settings={"custom_ops": custom_ops, "intra_op_threads": engine.threads, "inter_op_threads": 1,
                               "execution_mode": "sequential", "graph_optimization": "all"},
                     versions={"onnxruntime": onnxruntime.__version__})
    if stages:
        from .profile import stage_breakdown

        with console().status(f"profiling {model_path} by stage"):
            result["stages"] = stage_breakdown(model_path, runs=max(3, min(iterations, 20)), threads=engine.threads,
                                               custom_ops=custom_ops, stages=_stage_table(result["recipe"]))
    return result


def _bench_tensorrt(model_path: Path, precision: str, warmup: int, iterations: int,
                    plugin_impl: str) -> dict[str, Any]:
    from .engines import tensorrt as trt_engine

    engine = trt_engine.build(model_path, precision=precision, plugin_impl=plugin_impl)
    feeds, source = engine_feeds(model_path, engine)
    with console().status(f"timing {model_path} on TensorRT ({warmup} warm-up + {iterations} runs)"):
        seconds = time_calls(lambda: engine.run(feeds), warmup=warmup, iterations=iterations)
    import tensorrt

    return _result(model_path, engine, source, seconds, warmup, backend="tensorrt", peak_memory_bytes=None,
                   settings={"custom_ops": f"plugin ({plugin_impl})", "precision": precision, "intra_op_threads": 1,
                             "execution_mode": "sequential", "graph_optimization": "tensorrt",
                             "timing": "host to host, feeds copied in and outputs out each run"},
                   versions={"tensorrt": tensorrt.__version__})


def _bench_torch(model_path: Path, device: str, threads: int | None, warmup: int, iterations: int) -> dict[str, Any]:
    import torch

    from .engines import pytorch as torch_engine

    engine = torch_engine.build(model_path, device=device, threads=threads)
    feeds, source = engine_feeds(model_path, engine)
    with console().status(f"timing {model_path} in PyTorch on {engine.device} ({warmup} warm-up + {iterations} runs)"):
        seconds = time_calls(lambda: engine.run(feeds), warmup=warmup, iterations=iterations)
    return _result(model_path, engine, source, seconds, warmup, backend="torch", peak_memory_bytes=None,
                   settings={"device": engine.device, "intra_op_threads": engine.threads,
                             "gpu_kernels": engine.kernels, "model": "the converted PyTorch modules, eval, no_grad",
                             "timing": "host to host, feeds copied in and outputs out each run"},
                   versions={"torch": torch.__version__})


def _result(model_path: Path, engine, source: str, seconds: np.ndarray, warmup: int, *, backend: str,
            peak_memory_bytes: int | None, settings: dict, versions: dict) -> dict[str, Any]:
    """The JSON result every backend reports; ``settings`` and ``versions`` are the backend's own."""
    return {"model": str(model_path), "recipe": recipe_beside(model_path), "model_sha256": sha256_file(model_path),
            "model_bytes": model_path.stat().st_size, "peak_memory_bytes": peak_memory_bytes, "backend": backend,
            "settings": settings, "inputs": {"source": source, "tensors": [s.to_dict() for s in engine.inputs]},
            "latency": latency_stats(seconds, warmup).to_dict(), "machine": machine_info(),
            "versions": {**versions, "numpy": np.__version__}}


def _stage_table(recipe: str | None) -> tuple[tuple[str, str], ...]:
    if recipe is None:
        return ()
    from .models import ARCHITECTURES
    from .recipe import load_recipe

    try:
        return ARCHITECTURES[load_recipe(recipe).arch].stages
    except Exception:  # noqa: BLE001 - a recipe that is gone only costs the stage names
        return ()


from .api import callable_module  # noqa: E402 - deploykit.bench(...) is bench_model(...)

callable_module(__name__, "deploykit.bench:bench_model")


if __name__ == "__main__":  # the peak-memory child: python -m deploykit.bench '{"model": ...}'
    import json
    import sys

    _args = json.loads(sys.argv[1])
    print(_peak_memory_child(_args["model"], _args["custom_ops"], _args["threads"], _args["runs"]))
