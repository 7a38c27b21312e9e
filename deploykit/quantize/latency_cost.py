"""The other cost of an int16 set: its latency on ONNX Runtime, measured.

ONNX Runtime has no int16 kernels, so deploykit's ORT flavour runs an int16 region as a
float island between its Q/DQ pairs (deploykit.quantize.ort_flavour): lifting a module
costs on that backend what running it in float costs there. For each set on the Pareto
front this exports that flavour and times them all against the all-int8 engine,
interleaved in one process (deploykit.bench.compare_engines): the median latency and its
ratio to all-int8 with a 95% bootstrap interval. Opt-in (``quantize --latency-cost``): it
builds one engine per front set.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from . import pareto
from .insert import set_bits


def front_latency(search, qmodel, active: list[str], lifted: list[str], feeds: dict, *, opset: int,
                  output_ranges: dict | None = None, rounds: int = 30, threads: int = 1,
                  quiet: bool = True) -> list[dict]:
    """One row per set timed (all int8 first, then the front's sets by cost, then the chosen
    set if it is not on the front): its modules, median ms, ratio to all int8 and 95%
    interval. ``qmodel`` is left with ``active`` in int8 and ``lifted`` in int16."""
    import onnx

    from ..bench import compare_engines
    from ..progress import track
    from .ort_flavour import ort_flavour
    from .qdq_export import export_qdq

    quantizers_of = {m.module: m.quantizers for m in search.modules}
    sets = [()] + [p.modules for p in pareto.front(pareto.points(search)) if p.modules]
    if search.chosen and frozenset(search.chosen) not in {frozenset(m) for m in sets}:
        sets.append(tuple(search.chosen))  # off the front, but what the user gets
    variants = {}
    with tempfile.TemporaryDirectory(prefix="deploykit-latency-") as tmp:
        for i, modules in enumerate(track(sets, "exporting the Pareto front for ONNX Runtime", quiet=quiet)):
            set_bits(qmodel, active, 8)
            set_bits(qmodel, [q for m in modules for q in quantizers_of[m]], 16)
            path = Path(tmp) / f"set{i}.onnx"
            graph, _ = ort_flavour(export_qdq(qmodel, feeds, path, opset), output_ranges=output_ranges)
            onnx.save(graph, str(path))
            variants[str(i)] = (path, feeds, "function")
        set_bits(qmodel, active, 8)
        set_bits(qmodel, lifted, 16)
        rows = compare_engines(variants, "0", rounds=rounds, threads=threads)
    return [{"modules": list(modules), "median_ms": r["median_ms"], "ratio_to_int8": r["ratio_to_baseline"],
             "ratio_ci95": r["ratio_ci95"], "runs": r["runs"]} for modules, r in zip(sets, rows)]
