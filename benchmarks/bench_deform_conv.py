"""How to export mmcv's deformable convolution for ONNX Runtime (CPU).

At BEVDepth's DepthNet DCN (6 cameras, 512 -> 512 channels, 16x44 map, 3x3, padding 1,
groups 4, deform_groups 1, offsets of a few pixels), one op with offsets as a graph
input is timed in each export form of deploykit.ops.deform_conv: the standard ai.onnx
DeformConv (opset 19), the deploykit::DeformConv node run as its ONNX function (ORT
inlines it), pre-inlined, and through the onnxruntime-extensions numpy kernel, and the
PyTorch reference traced into standard ops; next to a plain Conv2d of the same size
(the floor: the same GEMM without sampling) and the eager PyTorch reference, all
interleaved in one process. A DCNv2 row (with mask) uses the same shape. Writes
benchmarks/results/deform_conv.{md,json}.
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
from deploykit.ops import CUSTOM_OPS  # noqa: E402
from deploykit.ops import deform_conv as dc  # noqa: E402
from deploykit.report import markdown_table  # noqa: E402

CUSTOM_OPS.setdefault(dc.OP_TYPE, dc)  # until deploykit.ops lists it

# (name, batch, in, out, (H, W), kernel, padding, groups, deform_groups, with mask)
SHAPES = [
    ("BEVDepth DepthNet DCN (v1), 6 cameras", 6, 512, 512, (16, 44), 3, 1, 4, 1, False),
    ("same shape, DCNv2 (mask)", 6, 512, 512, (16, 44), 3, 1, 4, 1, True),
]
OFFSET_PIXELS = 3.0  # offsets uniform in +-3 pixels
ROUNDS, WARMUP, BEST_OF = 25, 3, 3
FLOOR = "Conv2d floor"
FORMS = [  # (variant, export_form, ORT custom_ops mode, opset)
    ("ai.onnx DeformConv (export_form 'onnx')", "onnx", "function", dc.STANDARD_OPSET),
    ("deploykit::DeformConv, ORT function (export_form 'custom')", "custom", "function", 17),
    ("deploykit::DeformConv, pre-inlined", "custom", "inline", 17),
    ("deploykit::DeformConv, ortx numpy kernel", "custom", "ortx", 17),
    ("traced reference (export_form 'reference')", "reference", "function", 17),
]


class Op(torch.nn.Module):
    def __init__(self, weight, padding, groups, deform_groups, form):
        super().__init__()
        self.weight = torch.nn.Parameter(weight)
        self.padding, self.groups, self.deform_groups, self.form = padding, groups, deform_groups, form

    def forward(self, x, offset, mask=None):
        return dc.deform_conv2d(x, offset, mask, self.weight, None, 1, self.padding, 1, self.groups,
                                self.deform_groups, export_form=self.form)


def _export(module, feeds, path, opset):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, tuple(torch.from_numpy(v) for v in feeds.values()), str(path),
                          input_names=list(feeds), output_names=["out"], opset_version=opset, dynamo=False)


def paired_ratio(a: np.ndarray, b: np.ndarray, resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Median over rounds of a / b timed in the same round, with a 95% bootstrap interval over
    rounds: on a shared machine a slow round slows both, which independent medians miss."""
    r = a / b
    idx = np.random.default_rng(seed).integers(0, r.size, (resamples, r.size))
    lo, hi = np.percentile(np.median(r[idx], axis=1), [2.5, 97.5])
    return float(np.median(r)), float(lo), float(hi)


def bench_shape(spec, threads, tmp: Path, rng) -> tuple[list[dict], dict]:
    name, b, cin, cout, (h, w), k, pad, groups, dg, with_mask = spec
    weight = torch.from_numpy((rng.standard_normal((cout, cin // groups, k, k)) * 0.02).astype(np.float32))
    feeds = {"x": rng.standard_normal((b, cin, h, w)).astype(np.float32),
             "offset": rng.uniform(-OFFSET_PIXELS, OFFSET_PIXELS, (b, dg * 2 * k * k, h, w)).astype(np.float32)}
    if with_mask:
        feeds["mask"] = rng.random((b, dg * k * k, h, w)).astype(np.float32)
    tensors = tuple(torch.from_numpy(v) for v in feeds.values())
    eager = Op(weight, pad, groups, dg, "custom").eval()
    with torch.no_grad():
        want = eager(*tensors).numpy()
    calls, agreement = {}, {}
    for variant, form, mode, opset in FORMS:
        path = tmp / f"{form}.onnx"
        _export(Op(weight, pad, groups, dg, form), feeds, path, opset)
        engine = build(path, custom_ops=mode, threads=threads, spinning=False)
        got = engine.run(feeds)["out"]
        agreement[variant] = float(np.abs(got - want).max() / np.abs(want).max())
        calls[variant] = lambda e=engine: e.run(feeds)
    conv = torch.nn.Conv2d(cin, cout, k, padding=pad, groups=groups, bias=False)
    _export(conv, {"x": feeds["x"]}, tmp / "conv.onnx", 17)
    floor = build(tmp / "conv.onnx", threads=threads, spinning=False)
    calls[FLOOR] = lambda: floor.run({"x": feeds["x"]})

    def eager_call():
        with torch.no_grad():
            eager(*tensors)

    calls["PyTorch reference (eager)"] = eager_call
    samples = interleaved(calls, warmup=WARMUP, rounds=ROUNDS, best_of=BEST_OF)
    rows = []
    for variant, s in samples.items():
        ratio, lo, hi = ratio_interval(s, samples[FLOOR])
        rows.append({"shape": name, "variant": variant, "median_ms": float(np.median(s) * 1e3),
                     "ratio_to_floor": ratio, "ratio_ci95": [lo, hi], "runs": int(s.size),
                     "max_rel_diff_to_reference": agreement.get(variant)})
    onnx_forms = [v for v, *_ in FORMS]
    fastest = min(onnx_forms, key=lambda v: np.median(samples[v]))
    others = {}
    for v in onnx_forms:
        if v != fastest:
            ratio, lo, hi = paired_ratio(samples[v], samples[fastest])
            others[v] = {"paired_ratio": ratio, "ci95": [lo, hi]}
    return rows, {"shape": name, "fastest": fastest, "others_vs_fastest": others}


def main() -> None:
    threads = default_threads()
    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    raw, summaries = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in SHAPES:
            rows, summary = bench_shape(spec, threads, Path(tmp), rng)
            raw += rows
            summaries.append(summary)
    m = machine_info()
    import onnxruntime

    report = {"date": datetime.date.today().isoformat(), "machine": m, "threads": threads,
              "versions": {"onnxruntime": onnxruntime.__version__, "torch": torch.__version__,
                           "numpy": np.__version__},
              "rounds": ROUNDS, "best_of": BEST_OF, "offset_pixels": OFFSET_PIXELS, "results": raw,
              "summary": summaries}
    out = ROOT / "benchmarks" / "results"
    write_json(out / "deform_conv.json", report)
    table = [[r["shape"], r["variant"], f"{r['median_ms']:.2f}", f"{r['ratio_to_floor']:.2f}",
              f"{r['ratio_ci95'][0]:.2f}-{r['ratio_ci95'][1]:.2f}",
              "" if r["max_rel_diff_to_reference"] is None else f"{r['max_rel_diff_to_reference']:.1e}"]
             for r in raw]
    lines = []
    for s in summaries:
        others = sorted(s["others_vs_fastest"].items(), key=lambda kv: kv[1]["paired_ratio"])
        lines.append(f"- {s['shape']}: fastest is **{s['fastest']}**; per round, the others take "
                     + "; ".join(f"{v} {o['paired_ratio']:.2f}x ({o['ci95'][0]:.2f}-{o['ci95'][1]:.2f})"
                                 for v, o in others) + " its time.")
    text = "\n".join([
        "# Deformable convolution (mmcv DCN) on ONNX Runtime (CPU)", "",
        (f"Measured {report['date']} by `benchmarks/bench_deform_conv.py` on {m['cpu']}, {m['cores']} cores, "
        f"ONNX Runtime {onnxruntime.__version__}, torch {torch.__version__}, {threads} threads; one op "
        f"(6 x 512 x 16 x 44 input, 3x3, padding 1, groups 4, deform_groups 1, offsets uniform in "
        f"+-{OFFSET_PIXELS:g} px as a graph input); variants interleaved in one process, {ROUNDS} rounds, "
        f"each the best of {BEST_OF} calls; ratio = median / median of `{FLOOR}` (nn.Conv2d of the same "
        "size, the GEMM without sampling), 95% bootstrap interval; last column: max |difference| to the "
        "PyTorch reference over max |reference|. The summary's ratios pair the calls of one round "
        "(median of per-round ratios, 95% bootstrap interval over rounds)."), "",
        *lines, "",
        markdown_table(["shape", "variant", "median ms", "ratio to floor", "95% CI", "vs reference"], table), ""])
    (out / "deform_conv.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
