"""How to run deploykit::MultiScaleDeformableAttn on ONNX Runtime (CPU).

At BEVFormer shapes, one exported node is timed as an ONNX model-local function
(ORT inlines the GridSample lowering), pre-inlined standard ops, and the
onnxruntime-extensions numpy kernel, next to PyTorch's grid_sample reference,
all interleaved in one process. Writes benchmarks/results/msda.{md,json}.
"""

from __future__ import annotations

import datetime
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from deploykit.artifacts import write_json  # noqa: E402
from deploykit.bench import interleaved, machine_info, ratio_interval  # noqa: E402
from deploykit.engines.ort import build, default_threads  # noqa: E402
from deploykit.ops import multi_scale_deformable_attn as msda  # noqa: E402
from deploykit.report import markdown_table  # noqa: E402

# (name, value batch, levels (H, W), queries, heads, head_dims, points)
SHAPES = [
    ("TSA, BEVFormer-tiny (BEV 50x50, queue 2)", 2, [(50, 50)], 2500, 8, 32, 4),
    ("SCA, BEVFormer-base image levels, 6 cameras x 621 slots", 6,
     [(116, 200), (58, 100), (29, 50), (15, 25)], 621, 8, 32, 8),
]


class Attn(torch.nn.Module):
    def __init__(self, shapes):
        super().__init__()
        hw = torch.tensor(shapes, dtype=torch.int64)
        self.register_buffer("shapes", hw)
        self.register_buffer("starts", torch.cat([hw.new_zeros(1), (hw[:, 0] * hw[:, 1]).cumsum(0)[:-1]]))

    def forward(self, value, loc, weights):
        return msda.multi_scale_deformable_attn(value, self.shapes, self.starts, loc, weights)


def main() -> None:
    threads = default_threads()
    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    rows, raw = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name, bs, levels, queries, heads, dims, points in SHAPES:
            keys = sum(h * w for h, w in levels)
            feeds = {"value": rng.standard_normal((bs, keys, heads, dims)).astype(np.float32),
                     "loc": rng.uniform(-0.1, 1.1, (bs, queries, heads, len(levels), points, 2)).astype(np.float32),
                     "weights": rng.random((bs, queries, heads, len(levels), points)).astype(np.float32)}
            module = Attn(levels)
            path = Path(tmp) / "msda.onnx"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(module, tuple(torch.from_numpy(v) for v in feeds.values()), str(path),
                                  input_names=list(feeds), output_names=["out"], opset_version=17, dynamo=False)
            tensors = tuple(torch.from_numpy(v) for v in feeds.values())
            calls = {f"ORT {mode}": (lambda e=build(path, custom_ops=mode, threads=threads): e.run(feeds))
                     for mode in ("function", "inline", "ortx")}
            calls["PyTorch reference"] = lambda: module(*tensors)
            samples = interleaved(calls, warmup=2, rounds=15)
            for variant, s in samples.items():
                ratio, lo, hi = ratio_interval(s, samples["ORT function"])
                raw.append({"shape": name, "variant": variant, "median_ms": float(np.median(s) * 1e3),
                            "ratio_to_function": ratio, "ratio_ci95": [lo, hi], "runs": int(s.size)})
                rows.append([name, variant, f"{np.median(s) * 1e3:.2f}", f"{ratio:.2f}", f"{lo:.2f}-{hi:.2f}"])
    m = machine_info()
    import onnxruntime

    report = {"date": datetime.date.today().isoformat(), "machine": m, "threads": threads,
              "versions": {"onnxruntime": onnxruntime.__version__, "torch": torch.__version__}, "results": raw}
    out = ROOT / "benchmarks" / "results"
    write_json(out / "msda.json", report)
    text = "\n".join([
        "# MultiScaleDeformableAttn on ONNX Runtime (CPU)", "",
        f"Measured {report['date']} by `benchmarks/bench_msda.py` on {m['cpu']}, {m['cores']} cores, "
        f"ONNX Runtime {onnxruntime.__version__}, torch {torch.__version__}, {threads} threads; variants interleaved "
        "in one process, 15 rounds; ratio = median / median of `ORT function`, 95% bootstrap interval.", "",
        markdown_table(["shape", "variant", "median ms", "ratio", "95% CI"], rows), ""])
    (out / "msda.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
