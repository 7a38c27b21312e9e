"""quantize with the int16 search and mAP scoring, serial vs Ray workers, and what more would buy.

One recipe (default: the trained centerpoint_pillar_synth, whose int16 set is chosen by
measurement and whose mAP is scored on labelled scenes): convert once, then
``quantize --int16-sensitive`` serially (the default, and at one thread: what each worker
computes with) and with ``--workers N`` for each N asked, one after another in this
process. The workers' fidelity.json, sensitivity.json, quantizers.json and quantized state
must equal the one-thread serial run's bit for bit (the benchmark fails otherwise).
Reported: wall time of each run and of each parallel step, the speed-up, and a cost model
measured from the runs (the seconds each step's items computed alone and with the workers
running at once, dispatch time, Ray's start and stop, bytes sent to each worker) from which
the expected wall time for more workers and for a nuScenes-size set follows. Writes
benchmarks/results/scale.{md,json}.

    python benchmarks/bench_scale.py [--recipe centerpoint_pillar_synth] [--workers 2] [--eval-scenes 100]
"""

from __future__ import annotations

import argparse
import datetime
import json
import pickle
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import RESULTS  # benchmarks/common.py also puts the repository on sys.path

from deploykit.artifacts import write_json  # noqa: E402
from deploykit.bench import machine_info  # noqa: E402
from deploykit.export import convert  # noqa: E402
from deploykit.quantize.pipeline import quantize  # noqa: E402
from deploykit.recipe import load_recipe  # noqa: E402

# Steps the pool runs, by the start of their title in manifest.json's timings_s.
PARALLEL = {"calibrate": "calibration", "measure int16 sensitivity": "int16 search",
            "score float and quantized": "mAP scoring"}
NUSCENES_VAL = 6019  # samples in nuScenes val
COMPARED = ("fidelity.json", "sensitivity.json", "quantizers.json")


def step_times(manifest: dict) -> dict[str, float]:
    out = {label: 0.0 for label in PARALLEL.values()}
    for title, seconds in manifest["timings_s"].items():
        for prefix, label in PARALLEL.items():
            if title.startswith(prefix):
                out[label] += seconds
    out["other"] = sum(manifest["timings_s"].values()) - sum(out.values())
    return out


def _leaves(x, path=""):
    if isinstance(x, dict):
        for k, v in x.items():
            yield from _leaves(v, f"{path}.{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from _leaves(v, f"{path}[{i}]")
    else:
        yield path, x


def compared(out: Path) -> dict:
    """What the parallel steps decide: the int16 search, the ranges, and the figures measured
    with them (the per-layer profile and the ORT check run on the driver, not compared)."""
    from safetensors.numpy import load_file

    fidelity = json.loads((out / "fidelity.json").read_text())
    state = load_file(out / "quant_state.safetensors")
    return {"sensitivity": json.loads((out / "sensitivity.json").read_text()),
            "quantizers": json.loads((out / "quantizers.json").read_text()),
            "fidelity": {k: fidelity[k] for k in ("int8", "int8_int16", "detection_agreement", "task_map")
                         if k in fidelity},
            "quant_state": {k: v.tolist() for k, v in state.items() if k.endswith("amax")}}


def differences(a: dict, b: dict) -> dict:
    """Identical or not, and the largest numeric difference, and the int16 sets chosen."""
    la, lb = dict(_leaves(a)), dict(_leaves(b))
    numeric = {k: abs(la[k] - lb[k]) for k in la if k in lb and isinstance(la[k], float) and isinstance(lb[k], float)}
    worst = max(numeric, key=numeric.get, default=None)
    return {"identical": a == b, "same_keys": la.keys() == lb.keys(),
            "max_abs_difference": numeric.get(worst, 0.0), "max_at": worst,
            "leaves_differing": sum(la[k] != lb.get(k) for k in la),
            "same_int16_set": a["sensitivity"]["chosen"] == b["sensitivity"]["chosen"]}


def map_steps(manifest: dict) -> dict[str, dict]:
    """Per parallel step, from the pool's record of its maps: items, the seconds they computed
    (on one worker each) and the maps' wall time. Serial calibration does not map: its step
    time is its compute."""
    out = {label: {"items": 0, "item_s": 0.0, "wall_s": 0.0} for label in PARALLEL.values()}
    for m in manifest["workers"]["maps"]:
        d = m["description"]
        label = ("calibration" if d == "calibrating" else
                 "int16 search" if d.startswith(("sensitivity", "int16 step")) else
                 "mAP scoring" if d.startswith("scoring") else None)
        if label:
            for k in ("items", "item_s", "wall_s"):
                out[label][k] += m[k]
    if not out["calibration"]["items"]:
        steps = step_times(manifest)
        out["calibration"] = {"items": manifest["calibration"]["samples"], "item_s": steps["calibration"],
                              "wall_s": steps["calibration"]}
    return out


def transfer_bytes(converted: Path, recipe) -> dict[str, int]:
    """What one worker is sent: the quantized model (once per step), a scene's feeds."""
    from deploykit.models import make_sample
    from deploykit.quantize.fold_bn import fold_batchnorms
    from deploykit.quantize.insert import insert_quantizers
    from deploykit.quantize.pipeline import load_converted

    model, _ = load_converted(recipe, converted)
    qmodel = insert_quantizers(fold_batchnorms(model)[0], recipe.quantize.calibrator)
    feeds = make_sample(recipe, 0, model).feeds
    return {"quantized model": len(pickle.dumps(qmodel)), "float model": len(pickle.dumps(model)),
            "one sample's feeds": sum(v.nbytes for v in feeds.values())}


def cost_model(one_thread: dict, parallel: dict, scale: dict[str, float] | None = None,
               workers_list=(1, 2, 4, 8, 16, 32, 64)) -> dict:
    """Wall time for N workers, from the runs' measurements: the part that stays on the driver
    (loading, the fidelity check, the ONNX export), starting and stopping Ray, and each
    parallel step's compute (one thread, alone) over N workers plus the dispatch time the
    parallel run spent beyond its compute. Two rows: a core and its memory per worker (a
    cluster), and this machine's contention (its two workers computed slower than one alone).
    ``scale`` multiplies a step's compute (a bigger set)."""
    n = parallel["workers"]
    alone, shared = one_thread["maps"], parallel["maps"]
    contention = {k: shared[k]["item_s"] / alone[k]["item_s"] if alone[k]["item_s"] else 1.0 for k in alone}
    dispatch = {k: max(0.0, shared[k]["wall_s"] - shared[k]["item_s"] / n) for k in alone}
    # The driver's own share: steps not parallel, and what parallel steps do besides mapping (metrics).
    driver = one_thread["steps"]["other"] + sum(max(0.0, one_thread["steps"][k] - alone[k]["wall_s"]) for k in alone)
    ray_fixed = max(0.0, parallel["wall_s"] - sum(parallel["steps"].values()))
    scale = scale or {}

    def wall(w: int, slower: dict) -> float:
        compute = sum(alone[k]["item_s"] * scale.get(k, 1.0) * slower.get(k, 1.0) / w for k in alone)
        return driver + compute + (0.0 if w == 1 else ray_fixed + sum(dispatch.values()))

    def wall_here(w: int) -> float:
        return wall(w, contention if w > 1 else {})

    return {"contention": contention, "dispatch_s": dispatch, "driver_s": driver, "ray_start_stop_s": ray_fixed,
            "scale": scale,
            "wall_s": {str(w): wall(w, {}) for w in workers_list},
            "wall_s_this_machine": {str(w): wall_here(w) for w in workers_list if w <= n}}


def _median_run(repeats: list[dict]) -> dict:
    """One run's figures over its repeats: medians of the wall, step and map times."""
    med = lambda xs: float(np.median(xs))  # noqa: E731
    first = repeats[0]
    return {**{k: first[k] for k in ("label", "workers", "threads")},
            "wall_s": med([r["wall_s"] for r in repeats]), "walls_s": [r["wall_s"] for r in repeats],
            "steps": {k: med([r["steps"][k] for r in repeats]) for k in first["steps"]},
            "maps": {k: {"items": first["maps"][k]["items"],
                         **{f: med([r["maps"][k][f] for r in repeats]) for f in ("item_s", "wall_s")}}
                     for k in first["maps"]}}


def bench(recipe_name: str, workers: list[int], eval_scenes: int, repeats: int, tmp: Path) -> dict:
    import torch

    from deploykit.memory import keep_freed_memory

    keep_freed_memory()  # as `deploykit quantize` runs (the CLI applies it), serial and workers alike
    recipe = load_recipe(recipe_name)
    converted = tmp / "converted"
    convert(recipe, converted, quiet=True)
    # Serial at the default threads is what a user runs; serial at one thread is what each
    # worker computes with (PyTorch's CPU convolutions round differently with the thread count),
    # so the workers' results must equal it bit for bit. The runs rotate, ``repeats`` times: this
    # shared machine's speed drifts by more than the differences measured.
    plan = [("serial", 1, None), ("serial, 1 thread", 1, 1)] + [(f"--workers {w}", w, None) for w in workers]
    runs: dict[str, list[dict]] = {label: [] for label, _, _ in plan}
    for r in range(repeats):
        for label, n, threads in plan:
            out = tmp / f"{label.replace(' ', '').replace(',', '-')}-{r}"
            default_threads = torch.get_num_threads()
            torch.set_num_threads(threads or default_threads)
            start = time.perf_counter()
            try:
                quantize(recipe, converted, out, int16_sensitive=True, eval_scenes=eval_scenes, quiet=True,
                         workers=None if n == 1 else n)
            finally:
                torch.set_num_threads(default_threads)
            wall = time.perf_counter() - start
            manifest = json.loads((out / "manifest.json").read_text())
            runs[label].append({"label": label, "workers": n, "threads": threads or default_threads, "wall_s": wall,
                                "steps": step_times(manifest), "maps": map_steps(manifest), "dir": out})
            print(f"{label} ({r + 1}/{repeats}): {wall:.1f} s {runs[label][-1]['steps']}", flush=True)
    reference, exact = compared(runs["serial"][0]["dir"]), compared(runs["serial, 1 thread"][0]["dir"])
    summary = {}
    for label, reps in runs.items():
        got = [compared(rep.pop("dir")) for rep in reps]
        summary[label] = {**_median_run(reps), "vs_serial": differences(reference, got[0]),
                          "vs_serial_1_thread": differences(exact, got[0]),
                          "repeats_identical": all(g == got[0] for g in got)}
    one, parallel = summary["serial, 1 thread"], summary[f"--workers {max(workers)}"]
    scenes_scale = NUSCENES_VAL / max(1, eval_scenes)
    return {"recipe": recipe_name, "eval_scenes": eval_scenes, "repeats": repeats, "runs": list(summary.values()),
            "speedup": {label: summary["serial"]["wall_s"] / r["wall_s"] for label, r in summary.items()},
            "transfer_bytes": transfer_bytes(converted, recipe),
            "model": cost_model(one, parallel),
            "nuscenes_val": cost_model(one, parallel, {"mAP scoring": scenes_scale})}


def markdown(report: dict) -> str:
    r = report["result"]
    lines = [f"# quantize at scale: {r['recipe']}, serial vs Ray workers", "",
             f"{report['date']}, {report['machine'].get('cpu', '')}, {report['machine'].get('cpus', '?')} CPUs; "
             f"`python benchmarks/bench_scale.py`. `quantize --int16-sensitive`, mAP on {r['eval_scenes']} "
             f"labelled scenes, the recipe's calibration set. The runs rotate {r['repeats']} times; medians, "
             "wall time also min-max (this shared machine's speed drifts between runs).", "",
             "| run | threads | wall s | calibration s | int16 search s | mAP scoring s | other s | speed-up "
             "| vs serial, 1 thread | vs serial |", "|---|---:|---:|---:|---:|---:|---:|---:|---|---|"]

    def verdict(d: dict) -> str:
        if d["identical"]:
            return "identical"
        return (f"max diff {d['max_abs_difference']:.1e} at `{d['max_at']}` ({d['leaves_differing']} values), int16 set "
                + ("same" if d["same_int16_set"] else "**different**"))

    for run in r["runs"]:
        s = run["steps"]
        lines.append(f"| {run['label']} | {run['threads']} | {run['wall_s']:.1f} ({min(run['walls_s']):.1f}-"
                     f"{max(run['walls_s']):.1f}) | {s['calibration']:.1f} | "
                     f"{s['int16 search']:.1f} | {s['mAP scoring']:.1f} | {s['other']:.1f} | "
                     f"{r['speedup'][run['label']]:.2f}x | {verdict(run['vs_serial_1_thread'])} | "
                     f"{verdict(run['vs_serial'])} |")
    m, nus = r["model"], r["nuscenes_val"]
    one = next(run for run in r["runs"] if run["label"] == "serial, 1 thread")
    par = r["runs"][-1]
    n = par["workers"]
    lines += ["", "Compared: sensitivity.json, quantizers.json, every amax, and fidelity.json's output SQNR, "
              "detection agreement and mAP. Workers compute with one thread each; PyTorch's CPU convolutions "
              "round differently with 1 and 2 threads, so the workers equal the serial run at one thread bit "
              "for bit, and the default serial run (2 threads) within the difference shown.", "",
              "## Where the time goes", "",
              f"Per parallel step: its work items, the seconds they computed on one thread alone (the serial "
              f"one-thread run) and on {n} workers at once (the pool times each item where it runs), the "
              "ratio of the two (contention: workers sharing this machine's caches and memory), the step's "
              "wall time on the workers and what it spent beyond its compute over the workers (dispatch).", "",
              f"| step | items | compute s, alone | compute s, {n} at once | contention | wall s on {n} workers "
              "| dispatch s |", "|---|---:|---:|---:|---:|---:|---:|"]
    for k in one["maps"]:
        a, b = one["maps"][k], par["maps"][k]
        lines.append(f"| {k} | {b['items']} | {a['item_s']:.1f} | {b['item_s']:.1f} | {m['contention'][k]:.2f}x "
                     f"| {b['wall_s']:.1f} | {m['dispatch_s'][k]:.2f} |")
    ceiling = sum(one["maps"][k]["item_s"] for k in one["maps"]) / sum(par["maps"][k]["item_s"] / n
                                                                     for k in one["maps"])
    lines += ["", f"On the driver either way: {m['driver_s']:.1f} s (loading, the fidelity check, the ONNX export, "
              f"the metrics). Starting and stopping Ray: {m['ray_start_stop_s']:.1f} s. With {n} workers on this "
              f"machine the parallel steps' compute can speed up at most {ceiling:.2f}x (their compute alone over "
              f"their compute at once / {n}), whoever schedules it: the contention column, not Ray, bounds it. "
              "Bytes each worker is sent: " + ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in
                                                       r["transfer_bytes"].items()) + ".", "",
              "## Expected wall time for N workers", "",
              "Driver share + Ray start and stop + each step's compute (one thread, alone) over N workers + its "
              "dispatch time; a core and its memory per worker (cluster nodes), or this machine's contention "
              "where measured:", "",
              "| workers | " + " | ".join(m["wall_s"]) + " |", "|---|" + "---:|" * len(m["wall_s"]),
              "| this run, a core per worker | " + " | ".join(f"{v:.0f}" for v in m["wall_s"].values()) + " |",
              "| this run, this machine | " + " | ".join(f"{m['wall_s_this_machine'][w]:.0f}"
                                                     if w in m["wall_s_this_machine"] else "" for w in m["wall_s"])
              + " |",
              f"| mAP on nuScenes val ({NUSCENES_VAL} samples), a core per worker | "
              + " | ".join(f"{v:.0f}" for v in nus["wall_s"].values()) + " |", "",
              "Each greedy step of the search has only `lookahead` (4) items, so those steps stop scaling at 4 "
              "workers; the mAP row scales this recipe's per-scene cost (a small synthetic CenterPoint) to the "
              "val set's size, a real BEVFormer costs far more per frame and scales the same way."]
    return "\n".join(lines) + "\n"


def main() -> None:
    import os

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="centerpoint_pillar_synth")
    parser.add_argument("--workers", default="2", help="comma-separated worker counts to run besides serial")
    parser.add_argument("--eval-scenes", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3, help="rotations of the runs; medians are reported")
    args = parser.parse_args()
    workers = [int(w) for w in args.workers.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        result = bench(args.recipe, workers, args.eval_scenes, args.repeats, Path(tmp))
    report = {"date": datetime.date.today().isoformat(), "machine": {**machine_info(), "cpus": os.cpu_count()},
              "result": result}
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / "scale.json", report)
    (RESULTS / "scale.md").write_text(markdown(report))
    print((RESULTS / "scale.md").read_text())
    if any(not run["vs_serial_1_thread"]["identical"] for run in result["runs"] if run["workers"] > 1):
        sys.exit("results on workers differ from the serial ones at the same thread count")
    if not all(run["repeats_identical"] for run in result["runs"]):
        sys.exit("a run's repeats differ from each other")


if __name__ == "__main__":
    main()
