"""What keeping freed memory (deploykit.memory) buys on repeated CPU model runs.

The int16 search's work (the fake-quant model on the search samples, one configuration at
a time) runs in fresh processes with glibc's default allocator and with
``keep_freed_memory()``: one process at two threads (the serial default), one at one
thread, and two one-thread processes at once (two workers on this machine). The allocator
is process-wide and cannot be switched back, hence a process per measurement. Writes
benchmarks/results/memory.{md,json}.

    python benchmarks/bench_memory.py [--recipe centerpoint_pillar_synth] [--configs 40]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from common import RESULTS  # benchmarks/common.py also puts the repository on sys.path

from deploykit.artifacts import write_json  # noqa: E402
from deploykit.bench import machine_info  # noqa: E402

# One process: build the quantized model, then time the search's configurations.
WORK = r"""
import json, sys, time
import torch
recipe_name, converted, threads, tuned, configs = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1", int(sys.argv[5])
torch.set_num_threads(threads)
if tuned:
    from deploykit.memory import keep_freed_memory
    assert keep_freed_memory()
from pathlib import Path
from deploykit.models import make_sample
from deploykit.quantize.calib_set import load_calib_set
from deploykit.quantize.calibrate import calibrate
from deploykit.quantize.fold_bn import fold_batchnorms
from deploykit.quantize.insert import insert_quantizers, quantizers
from deploykit.quantize.pipeline import default_calib_set, load_converted
from deploykit.quantize.sensitivity import Configuration, WorstSqnr, group_modules
from deploykit.recipe import load_recipe
from deploykit.samples import torch_outputs

recipe = load_recipe(recipe_name)
model, manifest = load_converted(recipe, Path(converted))
qmodel = insert_quantizers(fold_batchnorms(model)[0], recipe.quantize.calibrator)
calibrate(qmodel, recipe, load_calib_set(default_calib_set(recipe, manifest["passes"])), quiet=True)
samples = [make_sample(recipe, 2000 + i, model) for i in range(recipe.check.samples)]
evaluate = WorstSqnr(qmodel, samples, [torch_outputs(model, s.feeds) for s in samples])
active = tuple(quantizers(qmodel))
groups = list(group_modules(list(active)).values())
work = [c for g in groups for c in (Configuration(tuple(g)), Configuration(active, tuple(g)))][:configs]
evaluate.one(work[0])  # warm
start = time.perf_counter()
for c in work:
    evaluate.one(c)
print(json.dumps({"per_config_s": (time.perf_counter() - start) / len(work)}))
"""


def run(recipe: str, converted: Path, threads: int, tuned: bool, configs: int, copies: int) -> list[float]:
    """Per-configuration seconds of ``copies`` processes started together."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    procs = [subprocess.Popen([sys.executable, "-c", WORK, recipe, str(converted), str(threads), str(int(tuned)),
                               str(configs)], stdout=subprocess.PIPE, text=True, env=env) for _ in range(copies)]
    out = []
    for p in procs:
        stdout, _ = p.communicate()
        if p.returncode:
            sys.exit(f"measurement process failed (exit {p.returncode})")
        out.append(json.loads(stdout.strip().splitlines()[-1])["per_config_s"])
    return out


def main() -> None:
    from deploykit.export import convert
    from deploykit.recipe import load_recipe

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="centerpoint_pillar_synth")
    parser.add_argument("--configs", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cases = [("one process, 2 threads", 2, 1), ("one process, 1 thread", 1, 1), ("two 1-thread processes at once", 1, 2)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        converted = Path(tmp) / "converted"
        convert(load_recipe(args.recipe), converted, quiet=True)
        for label, threads, copies in cases:
            # Interleaved repeats: a process's speed varies more from run to run than a mean of
            # its configurations shows.
            default, tuned = [], []
            for _ in range(args.repeats):
                default += run(args.recipe, converted, threads, False, args.configs, copies)
                tuned += run(args.recipe, converted, threads, True, args.configs, copies)
            rows.append({"case": label, "default_s": default, "tuned_s": tuned})
            print(label, default, tuned, flush=True)
    report = {"date": datetime.date.today().isoformat(), "machine": {**machine_info(), "cpus": os.cpu_count()},
              "recipe": args.recipe, "configs": args.configs, "rows": rows}
    alone = float(np.median({r["case"]: r for r in rows}["one process, 1 thread"]["tuned_s"]))
    lines = [f"# Keeping freed memory: {args.recipe}", "",
             f"{report['date']}, {report['machine'].get('cpu', '')}, {report['machine']['cpus']} CPUs; "
             "`python benchmarks/bench_memory.py`. Seconds per int16-search configuration (the fake-quant model "
             f"on the search samples), mean of {args.configs} per process; median (min-max) over "
             f"{args.repeats} interleaved fresh processes (each process of a pair counted), glibc's default "
             "allocator against `deploykit.memory.keep_freed_memory()`.", "",
             "| case | default s | kept s | speed-up (medians) | kept, vs one 1-thread process alone |",
             "|---|---:|---:|---:|---:|"]

    def cell(xs: list[float]) -> str:
        return f"{np.median(xs):.3f} ({min(xs):.3f}-{max(xs):.3f})"

    for r in rows:
        d, t = float(np.median(r["default_s"])), float(np.median(r["tuned_s"]))
        lines.append(f"| {r['case']} | {cell(r['default_s'])} | {cell(r['tuned_s'])} | {d / t:.2f}x | "
                     f"{t / alone:.2f} |")
    lines += ["", "Two processes at once are what two Ray workers on this machine are; the last column says how "
              "much slower each computes than one process alone, with memory kept."]
    write_json(RESULTS / "memory.json", report)
    (RESULTS / "memory.md").write_text("\n".join(lines) + "\n")
    print((RESULTS / "memory.md").read_text())


if __name__ == "__main__":
    main()
