"""What every benchmark script shares: its command line and how it writes results.

A script provides ``bench_recipe(name, rounds, threads, workdir) -> dict``, a
markdown renderer and optionally a plot; ``run`` times each recipe, wraps the
results with the machine, thread count and versions, and writes
``benchmarks/results/<stem>.{json,md[,png]}``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from deploykit.artifacts import write_json  # noqa: E402
from deploykit.bench import machine_info  # noqa: E402
from deploykit.engines.ort import default_threads  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def run(doc: str, stem: str, default_recipes: str, default_rounds: dict[str, int], fallback_rounds: int,
        bench_recipe: Callable, to_markdown: Callable, plot: Callable | None = None) -> None:
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--recipes", default=default_recipes)
    parser.add_argument("--rounds", type=int, help="interleaved rounds per table (default per recipe)")
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--render", action="store_true", help=f"only rewrite {stem}.md (and .png) from {stem}.json")
    parser.add_argument("--merge", action="store_true",
                        help=f"keep the other recipes of the existing {stem}.json, replacing only those measured now")
    args = parser.parse_args()
    if args.render:
        write_report(args.out, stem, json.loads((args.out / f"{stem}.json").read_text()), to_markdown, plot)
        return
    import onnxruntime

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        recipes = [bench_recipe(n, args.rounds or default_rounds.get(n, fallback_rounds), args.threads, Path(tmp))
                   for n in args.recipes.split(",")]
    if args.merge and (args.out / f"{stem}.json").exists():
        measured = {r["recipe"] for r in recipes}
        old = json.loads((args.out / f"{stem}.json").read_text())["recipes"]
        recipes = [r for r in old if r["recipe"] not in measured] + recipes
    report = {"date": datetime.date.today().isoformat(), "machine": machine_info(), "threads": args.threads,
              "versions": {"onnxruntime": onnxruntime.__version__, "torch": torch.__version__,
                           "numpy": np.__version__}, "recipes": recipes}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / f"{stem}.json", report)
    write_report(args.out, stem, report, to_markdown, plot)
    print((args.out / f"{stem}.md").read_text())


def write_report(out: Path, stem: str, report: dict, to_markdown: Callable, plot: Callable | None) -> None:
    if plot is not None:
        plot(report, out / f"{stem}.png")
    (out / f"{stem}.md").write_text(to_markdown(report))


def export_simplified(model, feeds: dict, path: Path, opset: int) -> Path:
    """Export ``model`` on ``feeds`` to ``path`` (static shapes, onnxsim), with the feeds
    beside it as inputs.npz (what bench and the profiler read next to a model)."""
    from deploykit.export import export_onnx, simplify

    path.parent.mkdir(parents=True, exist_ok=True)
    export_onnx(model, feeds, path, opset)
    simplify(path)
    np.savez(path.with_name("inputs.npz"), **feeds)
    return path


def original_and_converted(recipe, seed: int):
    """(original model, the recipe's rewritten one, the original's sample, the rewritten
    one's sample, the original's outputs on its inputs): what a naive-vs-converted bench needs."""
    from deploykit.export import load_model
    from deploykit.models import make_sample
    from deploykit.passes import apply_passes
    from deploykit.samples import torch_outputs

    original, _, _ = load_model(recipe, None)
    converted = apply_passes(original, recipe.convert.passes).eval()
    raw = make_sample(recipe, seed, original)
    sample = make_sample(recipe, seed, converted)
    return original, converted, raw, sample, torch_outputs(original, raw.reference)
