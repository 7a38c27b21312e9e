"""The GPU check for deploykit's kernels (plugins/), for a session lent a CUDA GPU.

One prepared run, under 8 minutes on an H100/H200-class GPU:

1. each kernel (PillarScatter, BEVPool sorted and unsorted, MSDA fp32/fp16/int8, DeformConv) at
   a recipe's shapes against its PyTorch decomposition on the same GPU (index-put
   scatter, the naive LSS pooling over the materialised frustum, grid_sample MSDA):
   max error (fp32 and fp16 against the fp32 reference), median time with CUDA
   events, the speed-up, and the achieved fraction of HBM bandwidth (bytes the kernel
   must move at least / time / the device's peak); and the TensorRT AOT form of each
   kernel (what an AOT plugin launches: one launch into an uncleared output) timed and
   checked the same way;
2. whole converted models in PyTorch on CUDA with the kernels and with their
   PyTorch references (``deploykit.ops.kernels`` switched off), interleaved.

Writes benchmarks/results/gpu_check.{json,md} naming the device. On the lent machine
(Python 3.12 with its own torch and triton, no network), from the repository root:

    pip install --no-deps -e .      # deploykit itself; carry what it imports and the
                                    # machine lacks: onnx, safetensors, rich (py3.12 wheels,
                                    # `pip install --target DIR --python-version 3.12
                                    #  --only-binary=:all: --no-deps ...`, then PYTHONPATH=DIR)
    python benchmarks/gpu_check.py  # --quick: tiny shapes (also runs on a CPU under TRITON_INTERPRET=1)

Goals (issue 16): every kernel >= 3x its decomposition and >= 50% of HBM bandwidth.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Peak HBM bandwidth by device name (bytes/s), from the vendors' data sheets.
PEAK_BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12, "L4": 0.3e12, "Orin": 0.2e12}


def _peak(name: str) -> float | None:
    return next((v for k, v in PEAK_BANDWIDTH.items() if k.lower() in name.lower()), None)


def _time(fn, device: str, rounds: int) -> float:
    """Median seconds of ``fn()`` over ``rounds`` (CUDA events on a GPU)."""
    fn()
    times = []
    for _ in range(rounds):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            import time

            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / (scale or 1.0)


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class _TrtType:
    """A TensorRT DataType's name, all aot_plan reads of it."""

    def __init__(self, name: str):
        self.name = name


TRT_TYPES = {torch.float32: _TrtType("FLOAT"), torch.float16: _TrtType("HALF"), torch.int32: _TrtType("INT32"),
             torch.int64: _TrtType("INT64")}


def aot(make_plan, inputs, shape, dtype):
    """A callable running the TensorRT AOT form of a kernel (plan from ``make_plan(shapes,
    trt types)``) as TensorRT launches it, into a fresh uncleared output."""
    from plugins import _aot

    plan = make_plan([tuple(t.shape) for t in inputs], [TRT_TYPES[t.dtype] for t in inputs])

    def run():
        out = torch.empty(shape, dtype=dtype, device=inputs[0].device)
        _aot.emulate(plan, inputs, [out])
        return out

    return run


def pillar_scatter_case(device: str, quick: bool) -> dict:
    from deploykit.ops.pillar_scatter import reference
    from plugins.pillar_scatter.triton_kernel import aot_plan, launch

    c, p, h, w = (8, 300, 32, 32) if quick else (64, 40000, 512, 512)  # centerpoint_pillar_nus
    g = torch.Generator().manual_seed(0)
    cells = torch.randperm(h * w, generator=g)[: int(p * 0.9)]
    coords = torch.full((p, 4), -1, dtype=torch.int32)
    coords[: len(cells), 0], coords[: len(cells), 1] = 0, 0
    coords[: len(cells), 2], coords[: len(cells), 3] = (cells // w).int(), (cells % w).int()
    feats = torch.randn(1, c, p, generator=g)
    feats, coords = feats.to(device), coords.to(device)
    out = launch(feats, coords, h, w)
    return {"op": "PillarScatter", "shape": f"{c}x{p} pillars -> {h}x{w}", "decomposition": "index-put scatter",
            "kernel": lambda: launch(feats, coords, h, w), "reference": lambda: reference(feats, coords, h, w),
            "out": out, "ref": reference(feats, coords, h, w), "bytes": _nbytes(feats, coords, out),
            "half": lambda: launch(feats.half(), coords, h, w),
            "aot": aot(lambda sh, ty: aot_plan(sh[0], ty[0], sh[1], ty[1], h, w), [feats, coords], out.shape,
                       out.dtype)}


def bev_pool_cases(device: str, quick: bool) -> list[dict]:
    from deploykit.models.bevdepth import BEVDepth
    from deploykit.models.bevdepth.streaming import collapse_z, key_frame_cells
    from deploykit.ops.bev_pool import RANK_NAMES, prepare_ranks, reference
    from deploykit.recipe import load_recipe
    from plugins.bev_pool.triton_kernel import aot_plan, launch

    recipe = load_recipe("bevdepth_small" if quick else "bevdepth_r50")
    model = BEVDepth(recipe.model)
    cells = collapse_z(key_frame_cells(model).numpy(), model.backbone.voxel_num)
    nx, ny, _ = (int(v) for v in model.backbone.voxel_num)
    ranks = {k: torch.from_numpy(v).to(device) for k, v in prepare_ranks(cells, (1, ny, nx)).items()}
    _, n, d, fh, fw, _ = cells.shape
    cfg = recipe.model
    g = torch.Generator().manual_seed(1)
    depth = torch.randn(1, n, d, fh, fw, generator=g).softmax(2).to(device)
    feat = torch.randn(1, n, fh, fw, cfg.output_channels, generator=g).to(device)
    args = [ranks[k] for k in RANK_NAMES]
    grid = (1, ny, nx)

    xy = cells.reshape(-1, 3)
    inside = (xy[:, 0] >= 0) & (xy[:, 0] < nx) & (xy[:, 1] >= 0) & (xy[:, 1] < ny)
    keep = torch.as_tensor(inside, device=device)
    idx = torch.as_tensor(xy[:, 1] * nx + xy[:, 0], device=device).long()[keep]

    def naive():
        # The release's PyTorch pooling: the materialised frustum, scatter-added per point.
        frustum = depth.reshape(1, n, d, fh, fw, 1) * feat.reshape(1, n, 1, fh, fw, -1)
        flat = frustum.reshape(-1, frustum.shape[-1])
        out = flat.new_zeros(ny * nx, flat.shape[1]).index_add_(0, idx, flat[keep])
        return out.t().reshape(1, -1, 1, ny, nx)

    out = launch(depth, feat, *args, *grid)
    ref = reference(depth, feat, *args, *grid)
    unsorted = dict(ranks, interval_starts=ranks["interval_starts"][:0], interval_lengths=ranks["interval_lengths"][:0])
    uargs = [unsorted[k] for k in RANK_NAMES]
    moved = _nbytes(depth, feat, *args, out)
    shape = f"{n} cams x {d} bins x {fh}x{fw}, C={cfg.output_channels} -> {ny}x{nx}"
    return [{"op": "BEVPool (sorted)", "shape": shape, "decomposition": "naive LSS (frustum + index_add)",
             "kernel": lambda: launch(depth, feat, *args, *grid), "reference": naive, "out": out, "ref": ref,
             "bytes": moved, "half": lambda: launch(depth.half(), feat.half(), *args, *grid),
             "aot": aot(lambda sh, ty: aot_plan(sh, ty, *grid), [depth, feat, *args], out.shape, out.dtype)},
            {"op": "BEVPool (unsorted)", "shape": shape, "decomposition": "naive LSS (frustum + index_add)",
             "kernel": lambda: launch(depth, feat, *uargs, *grid), "reference": naive,
             "out": launch(depth, feat, *uargs, *grid), "ref": ref, "bytes": moved,
             "half": lambda: launch(depth.half(), feat.half(), *uargs, *grid),
             "aot": aot(lambda sh, ty: aot_plan(sh, ty, *grid), [depth, feat, *uargs], out.shape, out.dtype)}]


def msda_cases(device: str, quick: bool) -> list[dict]:
    from deploykit.ops.multi_scale_deformable_attn import reference
    from plugins.msda.triton_kernel import aot_plan, launch, launch_int8

    levels = [(6, 10), (3, 5)] if quick else [(64, 176), (32, 88), (16, 44), (8, 22)]  # 256x704 FPN at 1/4..1/32
    heads, dims, points, queries = (2, 8, 2, 40) if quick else (8, 32, 8, 10000)
    g = torch.Generator().manual_seed(2)
    shapes = torch.tensor(levels, dtype=torch.int64)
    starts = torch.tensor([0, *np.cumsum([h * w for h, w in levels])[:-1]], dtype=torch.int64)
    keys = sum(h * w for h, w in levels)
    value = torch.randn(1, keys, heads, dims, generator=g)
    loc = torch.rand(1, queries, heads, len(levels), points, 2, generator=g) * 1.1 - 0.05
    weights = torch.rand(1, queries, heads, len(levels), points, generator=g).softmax(-1)
    value, shapes, starts, loc, weights = (t.to(device) for t in (value, shapes, starts, loc, weights))
    ins = (value, shapes, starts, loc, weights)
    out = launch(*ins)
    ref = reference(*ins)

    def q(t):
        s = t.abs().max() / 127
        return torch.clamp((t / s).round(), -128, 127).to(torch.int8), s

    (vq, vs), (lq, ls), (wq, ws) = q(value), q(loc), q(weights)
    deq = reference(vq.float() * vs, shapes, starts, lq.float() * ls, wq.float() * ws)
    shape = f"{queries} queries x {heads} heads x {len(levels)} levels x {points} points, {keys} keys x {dims}"
    return [{"op": "MSDA", "shape": shape, "decomposition": "grid_sample reference", "kernel": lambda: launch(*ins),
             "reference": lambda: reference(*ins), "out": out, "ref": ref, "bytes": _nbytes(*ins, out),
             "half": lambda: launch(value.half(), shapes, starts, loc.half(), weights.half()),
             "aot": aot(aot_plan, list(ins), out.shape, out.dtype)},
            {"op": "MSDA int8 inputs", "shape": shape, "decomposition": "grid_sample reference (fp32)",
             "kernel": lambda: launch_int8(vq, vs, shapes, starts, lq, ls, wq, ws),
             "reference": lambda: reference(*ins), "out": launch_int8(vq, vs, shapes, starts, lq, ls, wq, ws),
             "ref": deq, "bytes": _nbytes(vq, lq, wq, out), "half": None, "aot": None}]


def deform_conv_case(device: str, quick: bool) -> dict:
    from deploykit.ops.deform_conv import reference
    from plugins.deform_conv.triton_kernel import aot_plan, launch

    # BEVDepth's DepthNet DCN (DeformConv2dPack 512 -> 512, 3x3, groups 4, deform groups 4) at 16x44.
    b, c, h, w, groups = (1, 16, 6, 7, 2) if quick else (6, 512, 16, 44, 4)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(b, c, h, w, generator=g)
    offset = torch.randn(b, groups * 18, h, w, generator=g) * 2
    mask = torch.rand(b, groups * 9, h, w, generator=g)
    weight = torch.randn(c, c // groups, 3, 3, generator=g) / (c // groups * 9) ** 0.5
    bias = torch.randn(c, generator=g)
    x, offset, mask, weight, bias = (t.to(device) for t in (x, offset, mask, weight, bias))
    attrs = (1, 1, 1, 1, 1, 1, groups, groups)

    def ref():
        return reference(x, offset, mask, weight, bias, 1, 1, 1, groups, groups)

    out = launch(x, offset, mask, weight, bias, *attrs)
    ins = [x, offset, mask, weight, bias]
    return {"op": "DeformConv (DCN v2)", "shape": f"{b}x{c}x{h}x{w}, 3x3, groups {groups}, deform groups {groups}",
            "decomposition": "grid_sample + matmul reference", "kernel": lambda: launch(*ins, *attrs),
            "reference": ref, "out": out, "ref": ref(), "bytes": _nbytes(*ins, out),
            "half": lambda: launch(*(t.half() for t in ins), *attrs),
            "aot": aot(lambda sh, ty: aot_plan(sh, ty, *attrs), ins, out.shape, out.dtype)}


def kernel_rows(device: str, quick: bool, rounds: int, peak: float | None) -> list[dict]:
    rows = []
    for case in [pillar_scatter_case(device, quick), *bev_pool_cases(device, quick), *msda_cases(device, quick),
                 deform_conv_case(device, quick)]:
        t_kernel = _time(case["kernel"], device, rounds)
        t_ref = _time(case["reference"], device, rounds)
        half = case["half"]() if case["half"] else None
        t_aot = _time(case["aot"], device, rounds) if case["aot"] else None
        rows.append({"op": case["op"], "shape": case["shape"], "decomposition": case["decomposition"],
                     "max_rel_error_fp32": _rel(case["out"], case["ref"]),
                     "max_rel_error_fp16": None if half is None else _rel(half, case["ref"]),
                     "max_rel_error_aot": None if t_aot is None else _rel(case["aot"](), case["ref"]),
                     "aot_ms": None if t_aot is None else t_aot * 1e3,
                     "kernel_ms": t_kernel * 1e3, "decomposition_ms": t_ref * 1e3, "speedup": t_ref / t_kernel,
                     "bytes": case["bytes"],
                     "hbm_fraction": None if peak is None else case["bytes"] / t_kernel / peak})
        print(f"{case['op']}: {t_kernel * 1e3:.3f} ms vs {t_ref * 1e3:.3f} ms", flush=True)
    return rows


def model_rows(device: str, recipes: list[str], rounds: int) -> list[dict]:
    """Whole converted models in PyTorch, with the GPU kernels and with the references."""
    from deploykit.models import build_model, make_sample
    from deploykit.ops import kernels
    from deploykit.passes import apply_passes
    from deploykit.recipe import load_recipe

    rows = []
    for name in recipes:
        recipe = load_recipe(name)
        model = apply_passes(build_model(recipe), recipe.convert.passes).eval().to(device)
        feeds = make_sample(recipe, 1001, model.cpu()).feeds
        model.to(device)
        args = [torch.from_numpy(feeds[n]).to(device) for n in model.input_names]

        def run(model=model, args=args):
            with torch.no_grad():
                model(*args)

        with_k = _time(run, device, rounds)
        saved = kernels.kernel
        kernels.kernel = lambda _name: None
        try:
            without = _time(run, device, rounds)
        finally:
            kernels.kernel = saved
        rows.append({"recipe": name, "with_kernels_ms": with_k * 1e3, "references_ms": without * 1e3,
                     "speedup": without / with_k})
        print(f"{name}: {with_k * 1e3:.2f} ms with kernels, {without * 1e3:.2f} ms without", flush=True)
    return rows


def markdown(report: dict) -> str:
    out = [f"# deploykit GPU kernels on {report['device']}", "",
           (f"Measured {report['date']} by `benchmarks/gpu_check.py` (torch {report['torch']}, triton "
            f"{report['triton']}); median of {report['rounds']} runs timed with {report['timer']}; HBM fraction = "
            f"bytes the op must move / time / peak ({report['peak_bandwidth']} B/s)."), "",
           ("| op | shape | decomposition | kernel ms | decomposition ms | speed-up | HBM | err fp32 | err fp16 "
            "| TensorRT AOT form ms | err AOT |"),
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["kernels"]:
        hbm = "-" if r["hbm_fraction"] is None else f"{r['hbm_fraction']:.0%}"
        f16 = "-" if r["max_rel_error_fp16"] is None else f"{r['max_rel_error_fp16']:.1e}"
        aot_ms = "-" if r["aot_ms"] is None else f"{r['aot_ms']:.3f}"
        aot_err = "-" if r["max_rel_error_aot"] is None else f"{r['max_rel_error_aot']:.1e}"
        out.append(f"| {r['op']} | {r['shape']} | {r['decomposition']} | {r['kernel_ms']:.3f} | "
                   f"{r['decomposition_ms']:.3f} | {r['speedup']:.1f}x | {hbm} | {r['max_rel_error_fp32']:.1e} | {f16} "
                   f"| {aot_ms} | {aot_err} |")
    out += ["", "| recipe | with kernels ms | PyTorch references ms | speed-up |", "| --- | --- | --- | --- |"]
    out += [f"| {r['recipe']} | {r['with_kernels_ms']:.2f} | {r['references_ms']:.2f} | {r['speedup']:.2f}x |"
            for r in report["models"]]
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes (a smoke test, also on a CPU)")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--recipes", default="centerpoint_pillar_small,bevformer_small,bevdepth_small,bevdepth_r50")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    import triton

    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (Triton interpreter)"
    peak = _peak(name) if device == "cuda" else None
    recipes = [r for r in args.recipes.split(",") if r and not (args.quick and r == "bevdepth_r50")]
    report = {"date": datetime.date.today().isoformat(), "device": name, "torch": torch.__version__,
              "triton": triton.__version__, "rounds": args.rounds, "peak_bandwidth": peak,
              "timer": "CUDA events" if device == "cuda" else "perf_counter (interpreter: not a speed measurement)",
              "kernels": kernel_rows(device, args.quick, args.rounds, peak),
              "models": model_rows(device, recipes, args.rounds)}
    stem = "gpu_check_quick" if args.quick else "gpu_check"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
