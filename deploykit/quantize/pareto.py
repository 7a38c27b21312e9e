"""Fidelity against cost of the int16 sets the search measured, in the manner of AIMET's AMP.

Every configuration the search ran is a point: all int8 (no extra cost), each module
lifted alone, each greedy step's candidates on top of the set so far, and the chosen set
without each module it tried to drop. Its cost is the
extra bit-operations of its int16 set (deploykit.quantize.cost), its fidelity the worst
target-output SQNR. The Pareto front is the points no other point beats on both; the
chosen set is marked, with the front's points on either side of it, the alternatives a
user would weigh against it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Point:
    modules: tuple[str, ...]  # the int16 set, in the order it was built
    worst_sqnr_db: float
    extra_cost: float  # extra bit-ops as a fraction of the all-int8 model's
    source: str  # "all int8", "lifted alone", "greedy step N", "pruning"

    def to_dict(self) -> dict:
        return {"modules": list(self.modules), "worst_sqnr_db": self.worst_sqnr_db, "extra_cost": self.extra_cost,
                "source": self.source}


def points(search) -> list[Point]:
    """Each distinct int16 set the search measured, once (the first measurement)."""
    cost = search.cost
    out = [Point((), search.baseline_sqnr_db, 0.0, "all int8")]
    out += [Point((m.module,), m.lifted_sqnr_db, cost.extra([m.module]), "lifted alone") for m in search.modules]
    chosen: tuple[str, ...] = ()
    for i, step in enumerate(search.steps):
        for t in step["tried"]:
            modules = chosen + (t["module"],)
            out.append(Point(modules, t["worst_sqnr_db"], cost.extra(modules), f"greedy step {i + 1}"))
        chosen += (step["module"],)
    out += [Point(tuple(p["modules"]), p["worst_sqnr_db"], cost.extra(p["modules"]), "pruning") for p in search.pruning]
    seen, unique = set(), []
    for p in out:
        if frozenset(p.modules) not in seen:
            seen.add(frozenset(p.modules))
            unique.append(p)
    return unique


def front(pts: list[Point]) -> list[Point]:
    """The points no other point matches or beats on both cost and fidelity, cheapest first."""
    best: list[Point] = []
    for p in sorted(pts, key=lambda p: (p.extra_cost, -p.worst_sqnr_db)):
        if not best or p.worst_sqnr_db > best[-1].worst_sqnr_db:
            best.append(p)
    return best


def chosen_point(search, pts: list[Point]) -> Point:
    key = frozenset(search.chosen)
    return next(p for p in pts if frozenset(p.modules) == key)


def cheapest_meeting_target(search, pts: list[Point]) -> Point | None:
    meeting = [p for p in pts if p.worst_sqnr_db >= search.target_db]
    return min(meeting, key=lambda p: (p.extra_cost, -p.worst_sqnr_db), default=None)


def summary(search) -> dict:
    pts = points(search)
    chosen = chosen_point(search, pts)
    best = front(pts)
    cheapest = cheapest_meeting_target(search, pts)
    return {"points": [p.to_dict() for p in pts], "front": [pts.index(p) for p in best], "chosen": pts.index(chosen),
            "cheapest_meeting_target": None if cheapest is None else pts.index(cheapest)}


def _names(p: Point) -> str:
    return ", ".join(p.modules) if p.modules else "(none: all int8)"


def markdown(search, task: dict | None = None) -> list[str]:
    """The Pareto section of sensitivity.md. ``task``: {"metric": "mAP", "all int8": x, "chosen": y}
    where the task metric was measured (for those two configurations)."""
    from ..report import markdown_table

    pts = points(search)
    chosen, best = chosen_point(search, pts), front(pts)
    cost = search.cost
    cheapest = cheapest_meeting_target(search, pts)
    on_front = chosen in best
    i = best.index(chosen) if on_front else None
    around = set(best[max(0, i - 1):i + 2]) if on_front else set()

    def metric(p: Point) -> str:
        if not task:
            return ""
        key = "all int8" if not p.modules else ("chosen" if p == chosen else None)
        return f"{task[key]:.4f}" if key in task else ""

    timed = {frozenset(r["modules"]): r for r in search.latency or []}

    def latency(p: Point) -> list[str]:
        if search.latency is None:
            return []
        r = timed.get(frozenset(p.modules))
        if r is None:
            return ["", ""]
        if not p.modules:
            return [f"{r['median_ms']:.2f}", "1 (baseline)"]
        lo, hi = r["ratio_ci95"]
        return [f"{r['median_ms']:.2f}", f"{r['ratio_to_int8']:.3f} ({lo:.3f}-{hi:.3f})"]

    shown = best + ([chosen] if not on_front else [])
    rows = [[len(p.modules), f"{100 * p.extra_cost:.2f}", *latency(p), f"{p.worst_sqnr_db:.2f}",
             "yes" if p.worst_sqnr_db >= search.target_db else "", *([metric(p)] if task else []),
             "**chosen**" if p == chosen else ("next to chosen" if p in around else ""), p.source, _names(p)]
            for p in shown]
    lines = ["## Fidelity against cost", "",
             f"Cost: the int16 set's extra bit-operations (MACs x weight bits x activation bits; int16 costs four "
             f"times int8) as a share of the all-int8 model's {cost.int8_bitops / 1e9:.2f} G bit-ops per sample. "
             f"{len(pts)} sets measured; the Pareto front (no measured set is both cheaper and better):", "",
             markdown_table(["int16 modules", "extra bit-ops %",
                             *(["ORT ms", "x all int8 (95% CI)"] if search.latency is not None else []),
                             "worst SQNR dB", "meets target",
                             *([task["metric"]] if task else []), "", "measured in", "modules"], rows), ""]
    if not on_front:
        lines += [f"The chosen set (last row: {100 * chosen.extra_cost:.2f}% extra, {chosen.worst_sqnr_db:.2f} dB) is "
                  "not on the front: the greedy search adds the module that helps most, not the one that helps "
                  "most per bit-op.", ""]
    if search.latency is not None:
        lines += ["ORT ms: the set's ONNX Runtime flavour (int16 regions as float islands: ORT has no int16 "
                  "kernels), one thread, timed interleaved with the all-int8 engine in one process "
                  "(`--latency-cost`); the ratio is of medians with a 95% bootstrap interval.", ""]
    if cheapest is not None and cheapest != chosen and cheapest.extra_cost < chosen.extra_cost:
        lines += [f"Cheaper set that also meets {search.target_db:.1f} dB: {_names(cheapest)} "
                  f"({100 * cheapest.extra_cost:.2f}% extra, {cheapest.worst_sqnr_db:.2f} dB).", ""]
    if search.cost_budget:
        lines += [f"Cost budget: at most {100 * search.cost_budget:.2f}% extra bit-ops (`[quantize] "
                  "int16_cost_budget`); candidates over it were not tried.", ""]
    if task:
        lines += [f"{task['metric']} (float model: {task['float']:.4f}) is measured for all int8 and the chosen set "
                  "only: the search ranks sets by SQNR.", ""]
    lines += ["![pareto](pareto.png)", ""]
    return lines


def plot(search, path, task: dict | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = points(search)
    chosen, best = chosen_point(search, pts), front(pts)
    if search.latency is not None:
        fig, (ax, lat) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [3, 2]})
        _latency_panel(lat, search, chosen)
    else:
        fig, ax = plt.subplots(figsize=(8, 5))
    ax.scatter([100 * p.extra_cost for p in pts], [p.worst_sqnr_db for p in pts], s=14, color="#9a9a9a",
               label="measured sets")
    ax.step([100 * p.extra_cost for p in best], [p.worst_sqnr_db for p in best], where="post", color="#4878a8",
            marker="o", ms=4, label="Pareto front")
    ax.scatter([100 * chosen.extra_cost], [chosen.worst_sqnr_db], s=120, marker="*", color="#c44e52", zorder=5,
               label=f"chosen ({len(chosen.modules)} modules)")
    ax.axhline(search.target_db, color="#55a868", ls="--", lw=1, label=f"target {search.target_db:.1f} dB")
    if search.cost_budget:
        ax.axvline(100 * search.cost_budget, color="#dd8452", ls=":", lw=1, label="cost budget")
    if task:
        for key, p in (("all int8", pts[0]), ("chosen", chosen)):
            if key in task:
                ax.annotate(f"{task['metric']} {task[key]:.3f}", (100 * p.extra_cost, p.worst_sqnr_db),
                            textcoords="offset points", xytext=(6, -12), fontsize=8)
    ax.set_xlabel("extra bit-ops of the int16 set (% of all-int8)")
    ax.set_ylabel("worst target-output SQNR (dB)")
    ax.set_title("int16 sets measured by the sensitivity search", fontsize=10)
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _latency_panel(ax, search, chosen: Point) -> None:
    sqnr = {frozenset(p.modules): p.worst_sqnr_db for p in points(search)}
    rows = search.latency
    # The all-int8 engine is the baseline: its ratio is 1 by definition, not a measurement.
    x = [r["ratio_to_int8"] if r["modules"] else 1.0 for r in rows]
    y = [sqnr[frozenset(r["modules"])] for r in rows]
    err = [[r["ratio_to_int8"] - r["ratio_ci95"][0] if r["modules"] else 0.0 for r in rows],
           [r["ratio_ci95"][1] - r["ratio_to_int8"] if r["modules"] else 0.0 for r in rows]]
    ax.errorbar(x, y, xerr=err, fmt="o", color="#4878a8", ms=4, capsize=3, label="front sets (95% CI)")
    for r, xi, yi in zip(rows, x, y):
        if frozenset(r["modules"]) == frozenset(chosen.modules):
            ax.scatter([xi], [yi], s=120, marker="*", color="#c44e52", zorder=5, label="chosen")
    ax.axhline(search.target_db, color="#55a868", ls="--", lw=1)
    ax.set_xlabel("ONNX Runtime latency / all-int8 (int16 as float islands)")
    ax.set_ylabel("worst target-output SQNR (dB)")
    ax.set_title("measured cost on ONNX Runtime", fontsize=10)
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
