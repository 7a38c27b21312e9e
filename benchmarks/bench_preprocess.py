"""Host preprocessing + engine, end to end, for a pillar model: decoration on the host
(engines converted before the decorate_in_graph pass) against decoration in the graph.

The frame is a nuScenes-size one: a synthetic nuScenes-layout keyframe with its nine
earlier sweeps, read and aggregated as `deploykit detect` does (reading is not timed).
Each round runs, interleaved in one process (deploykit.bench.interleaved): the host part
of each path (voxelize, decorate and pack / voxelize and pack raw voxels), the two ONNX
Runtime engines (float, the recipe's passes with and without decorate_in_graph) on their
own feeds, and both whole paths. Also timed: voxelization alone and the host decoration
alone. The two engines' outputs on the frame are compared. Writes
benchmarks/results/preprocess.{md,json}.

    python benchmarks/bench_preprocess.py [--recipes centerpoint_pillar_nus] [--rounds N]
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from common import run  # benchmarks/common.py also puts the repository on sys.path

from deploykit.bench import interleaved, ratio_interval  # noqa: E402
from deploykit.export import convert, pillar_format  # noqa: E402
from deploykit.report import markdown_table  # noqa: E402

DEFAULT_ROUNDS = {"centerpoint_pillar_nus": 12}
PASS = "decorate_in_graph"


def nuscenes_frame(recipe, workdir: Path) -> np.ndarray:
    """The aggregated points of a keyframe with nine earlier sweeps (mmdet3d's sweeps_num 9)."""
    from deploykit.data.sources import open_source
    from deploykit.data.sweeps import aggregate_sweeps
    from deploykit.data.synthetic_nuscenes import write_synthetic_nuscenes

    root = write_synthetic_nuscenes(workdir / "nuscenes", scenes=1, samples_per_scene=1, sweeps_between=9,
                                    cameras=False)
    frame = open_source(root, recipe).frames[0]
    points, _ = aggregate_sweeps(frame, recipe.model)
    return points


def bench_recipe(name: str, rounds: int, threads: int, workdir: Path) -> dict:
    from deploykit.engines.ort import build
    from deploykit.preprocess.pillar_inputs import pillar_inputs, voxel_grid
    from deploykit.preprocess.voxelize import decorate, voxelize
    from deploykit.recipe import load_recipe

    recipe = load_recipe(name)
    cfg = recipe.model
    if PASS not in recipe.convert.passes:
        raise SystemExit(f"{name} does not list {PASS}; nothing to compare")
    host_passes = [p for p in recipe.convert.passes if p != PASS]
    paths = {}
    for key, passes in (("host", host_passes), ("graph", list(recipe.convert.passes))):
        out = convert(recipe, workdir / f"{name}-{key}", passes=passes, quiet=True).out_dir
        manifest = json.loads((out / "manifest.json").read_text())
        paths[key] = (build(out / "model.onnx", threads=threads, spinning=False), pillar_format(manifest))
    points = nuscenes_frame(recipe, workdir)
    grid, enc = voxel_grid(cfg), cfg.pillar_encoder
    voxels = voxelize(points[:, : cfg.voxelization.point_features], grid)

    def host(key):
        return pillar_inputs(points, cfg, *paths[key][1]).feeds

    feeds = {k: host(k) for k in paths}
    outputs = {k: paths[k][0].run(feeds[k]) for k in paths}
    rel = max(float(np.abs(outputs["graph"][n] - outputs["host"][n]).max() / max(np.abs(outputs["host"][n]).max(),
                                                                                  1e-12)) for n in outputs["host"])
    calls = {
        "voxelize": lambda: voxelize(points[:, : cfg.voxelization.point_features], grid),
        "decorate (host)": lambda: decorate(voxels, grid, with_cluster_center=enc.with_cluster_center,
                                            with_voxel_center=enc.with_voxel_center,
                                            with_distance=enc.with_distance, legacy=enc.legacy),
        "host, before": lambda: host("host"),
        "host, after": lambda: host("graph"),
        "engine, before": lambda: paths["host"][0].run(feeds["host"]),
        "engine, after": lambda: paths["graph"][0].run(feeds["graph"]),
        "end to end, before": lambda: paths["host"][0].run(host("host")),
        "end to end, after": lambda: paths["graph"][0].run(host("graph")),
    }
    times = interleaved(calls, warmup=2, rounds=rounds)
    ms = {k: float(np.median(v) * 1e3) for k, v in times.items()}
    ratio, lo, hi = ratio_interval(times["end to end, after"], times["end to end, before"])
    return {"recipe": name, "points": int(points.shape[0]), "pillars": int(voxels.num_voxels), "rounds": rounds,
            "median_ms": ms, "p90_ms": {k: float(np.percentile(v, 90) * 1e3) for k, v in times.items()},
            "host_fraction": {"before": ms["host, before"] / ms["engine, before"],
                              "after": ms["host, after"] / ms["engine, after"]},
            "end_to_end_ratio": ratio, "end_to_end_ci95": [lo, hi], "max_rel_diff_engines": rel,
            "passes": {"before": host_passes, "after": list(recipe.convert.passes)}}


def to_markdown(report: dict) -> str:
    m = report["machine"]
    lines = ["# Host preprocessing + engine (decoration on the host vs in the graph)", "",
             f"Measured {report['date']} by `benchmarks/bench_preprocess.py` on {m['cpu']}, {m['cores']} cores; "
             f"ONNX Runtime {report['versions']['onnxruntime']} (float engines, {report['threads']} threads), numpy "
             f"{report['versions']['numpy']}; every row interleaved in one process, median of the rounds. Before: "
             "the recipe's passes without decorate_in_graph (voxelize, decorate and pack on the host); after: with it "
             "(the host voxelizes and pads, the engine decorates).", ""]
    for r in report["recipes"]:
        ms, p90 = r["median_ms"], r["p90_ms"]
        rows = [[k, f"{ms[k]:.1f}", f"{p90[k]:.1f}"] for k in ms]
        frac = r["host_fraction"]
        lines += [f"## {r['recipe']}", "",
                  f"{r['points']} points (a keyframe and nine sweeps), {r['pillars']} pillars, {r['rounds']} rounds.",
                  "", markdown_table(["step", "median ms", "p90 ms"], rows), "",
                  f"Host time as a fraction of engine time: before {frac['before']:.1%}, after {frac['after']:.1%}. "
                  f"End to end, after / before: {r['end_to_end_ratio']:.3f} (95% CI "
                  f"{r['end_to_end_ci95'][0]:.3f}-{r['end_to_end_ci95'][1]:.3f}). The two engines' outputs on this "
                  f"frame differ by at most {r['max_rel_diff_engines']:.1e} of each output's largest magnitude.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    run(__doc__, "preprocess", "centerpoint_pillar_nus", DEFAULT_ROUNDS, 12, bench_recipe, to_markdown)
