"""Where the time goes: ONNX Runtime's node profile grouped into model stages.

The TorchScript exporter names each node after the module that made it
(``/pts_backbone/blocks.0/blocks.0.2/Conv``), and ONNX Runtime's profile keeps
those names for the nodes it runs, fused ones included (``fused /pts_neck/...``).
A stage is the longest matching module prefix from the architecture's stage
table (deploykit.models.ARCHITECTURES[...].stages), or the top-level module when
there is none. What ORT creates itself has no module: its layout conversions
(ReorderInput/ReorderOutput for the blocked NCHWc kernels) and a few
shape-arithmetic nodes are reported as their own groups, never spread over the
stages. The inlined bodies of deploykit's custom ops are one "custom ops" group:
that is the time a plugin would replace.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections import defaultdict
from pathlib import Path

CUSTOM_OPS = "custom ops"
LAYOUT = "layout conversion (ORT)"
UNATTRIBUTED = "unattributed (ORT-made nodes)"


def stage_of(node_name: str, stages: tuple[tuple[str, str], ...] = ()) -> str:
    name = node_name.removeprefix("fused ")
    if name.startswith("_inlfunc_"):
        return CUSTOM_OPS
    if name.startswith(("ReorderInput", "ReorderOutput")):
        return LAYOUT
    if not name.startswith("/"):
        return UNATTRIBUTED
    path = name.strip("/").split("/")[:-1]  # the last part is the op
    if not path:
        return UNATTRIBUTED
    joined = "/".join(path) + "/"
    best = max((p for p, _ in stages if joined.startswith(p.strip("/") + "/")), key=len, default=None)
    return dict(stages)[best] if best is not None else path[0]


def stage_breakdown(model: str | Path, *, runs: int = 10, threads: int | None = None, custom_ops: str = "function",
                    stages: tuple[tuple[str, str], ...] = ()) -> list[dict]:
    """Per-stage kernel time per run (ms) and share, largest first, from ``runs``
    runs after one warm-up (ORT profiles every run of a session, so the warm-up is
    dropped from the trace by its run index)."""
    from .bench import engine_feeds
    from .engines import ort as ort_engine

    engine = ort_engine.build(model, custom_ops=custom_ops, threads=threads, profile=True)
    feeds, _ = engine_feeds(Path(model), engine)
    for _ in range(runs + 1):
        engine.run(feeds)
    trace = engine.session.end_profiling()
    try:
        events = json.loads(Path(trace).read_text())
    finally:
        os.unlink(trace)
        with contextlib.suppress(OSError):
            os.rmdir(Path(trace).parent)
    return group_events(events, runs=runs, stages=stages)


def group_events(events: list[dict], *, runs: int, stages: tuple[tuple[str, str], ...] = ()) -> list[dict]:
    per_stage: dict[str, float] = defaultdict(float)
    nodes: dict[str, set] = defaultdict(set)
    finished_runs = 0  # ORT writes a run's node events, then its model_run event
    for e in events:
        if e.get("cat") == "Session" and e.get("name") == "model_run":
            finished_runs += 1
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time") or finished_runs == 0:
            continue  # not a kernel, or the warm-up run
        node = e["name"].removesuffix("_kernel_time")
        stage = stage_of(node, stages)
        per_stage[stage] += e["dur"]
        nodes[stage].add(node)
    total = sum(per_stage.values()) or 1.0
    rows = [{"stage": s, "ms_per_run": us / runs / 1e3, "share": us / total, "nodes": len(nodes[s])}
            for s, us in per_stage.items()]
    return sorted(rows, key=lambda r: -r["ms_per_run"])
