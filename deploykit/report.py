"""Human-readable renderings of results: terminal tables and markdown."""

from __future__ import annotations

from typing import Callable

from rich.table import Table

LATENCY_COLUMNS = ("mean_ms", "p50_ms", "p90_ms", "p99_ms", "std_ms", "throughput_fps")


def latency_table(results: list[dict]) -> Table:
    table = Table(title="latency (ms)", show_lines=False)
    table.add_column("model", overflow="fold")
    table.add_column("backend")
    table.add_column("runs", justify="right")
    for col in LATENCY_COLUMNS:
        table.add_column(col.replace("_ms", "").replace("throughput_fps", "FPS"), justify="right")
    table.add_column("size MB", justify="right")
    table.add_column("peak MB", justify="right")
    for r in results:
        lat = r["latency"]
        s = r["settings"]
        mode = s.get("custom_ops") or s.get("device", "")
        table.add_row(r["model"], f'{r["backend"]}/{mode}',
                      f'{lat["warmup"]}+{lat["iterations"]}', *(f"{lat[c]:.2f}" for c in LATENCY_COLUMNS),
                      _mb(r.get("model_bytes")), _mb(r.get("peak_memory_bytes")))
    return table


def stage_table(result: dict) -> Table:
    table = Table(title=f"stages of {result['model']} (ONNX Runtime profile)")
    for col, justify in (("stage", "left"), ("ms per run", "right"), ("share", "right"), ("nodes", "right")):
        table.add_column(col, justify=justify)
    for x in result["stages"]:
        table.add_row(x["stage"], f"{x['ms_per_run']:.2f}", f"{x['share']:.1%}", str(x["nodes"]))
    return table


def _mb(n) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def bench_markdown(results: list[dict]) -> str:
    """The report `deploykit bench --report` writes: settings, latency, size, memory, stages."""
    m = results[0]["machine"]
    s = results[0]["settings"]
    lines = ["# Benchmark", "",
             f"{m['cpu']}, {m['cores']} cores; ONNX Runtime {results[0]['versions']['onnxruntime']}, "
             f"{s['intra_op_threads']} intra-op threads, {s['execution_mode']} execution, graph optimization "
             f"{s['graph_optimization']}. Latency over timed runs after warm-up; peak memory is the resident memory "
             "added while building and running the engine.", "",
             markdown_table(["model", "recipe", "runs", *(c.replace("_ms", " ms").replace("throughput_fps", "FPS")
                                                          for c in LATENCY_COLUMNS), "size MB", "peak MB", "sha256"],
                            [[r["model"], r.get("recipe") or "-", f"{r['latency']['warmup']}+{r['latency']['iterations']}",
                              *(f"{r['latency'][c]:.2f}" for c in LATENCY_COLUMNS), _mb(r.get("model_bytes")),
                              _mb(r.get("peak_memory_bytes")), r["model_sha256"][:12]] for r in results]), ""]
    for r in results:
        if r.get("stages"):
            lines += [f"## Stages of {r['model']}", "",
                      "Kernel time per run from ONNX Runtime's profile, grouped by the module each node came from.", "",
                      markdown_table(["stage", "ms per run", "share", "nodes"],
                                     [[x["stage"], f"{x['ms_per_run']:.2f}", f"{x['share']:.1%}", x["nodes"]]
                                      for x in r["stages"]]), ""]
    return "\n".join(lines)


def bench_plot(results: list[dict], path) -> None:
    """p50 bars with p90/p99 marks per model and, where profiled, time by stage; one
    row per model, in the order given, on both panels; machine and threads in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    profiled = any(r.get("stages") for r in results)
    fig, axes = plt.subplots(1, 2 if profiled else 1, figsize=(14 if profiled else 7, 0.55 * len(results) + 2.4),
                             squeeze=False, sharey=True)
    rows = list(range(len(results)))[::-1]  # first result on top
    names = [_short(r["model"]) for r in results]
    lat = [r["latency"] for r in results]
    ax = axes[0, 0]
    ax.barh(rows, [x["p50_ms"] for x in lat], color="#4878a8", label="p50")
    ax.scatter([x["p90_ms"] for x in lat], rows, marker="|", s=250, color="k", label="p90", zorder=3)
    ax.scatter([x["p99_ms"] for x in lat], rows, marker="|", s=250, color="#c44e52", label="p99", zorder=3)
    ax.set_yticks(rows, names)
    ax.set_xlabel("latency (ms)")
    # Below the axes: inside, it covered the p90/p99 marks of the bottom rows.
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12 - 0.4 / len(results)), ncol=3, frameon=False)
    if profiled:
        _stage_bars(axes[0, 1], results, rows)
    first = results[0]
    m, settings = first["machine"], first["settings"]
    runtime = ", ".join(f"{k} {v}" for k, v in first.get("versions", {}).items() if k != "numpy")
    fig.suptitle(f"{m['cpu']}, {m['cores']} cores; {runtime}; {settings.get('intra_op_threads')} intra-op threads, "
                 f"{first['backend']} backend", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _stage_bars(ax, results: list[dict], rows: list[int]) -> None:
    """Stacked time per stage. Stage names are qualified by recipe when several recipes
    are shown, so 'backbone' of one model never shares a colour with another's."""
    import matplotlib.pyplot as plt

    recipes = {r.get("recipe") for r in results if r.get("stages")}

    def label(r: dict, stage: str) -> str:
        return f"{r.get('recipe')}: {stage}" if len(recipes) > 1 else stage

    labels = list(dict.fromkeys(label(r, x["stage"]) for r in results for x in r.get("stages") or []))
    palette = [*plt.get_cmap("tab20").colors, *plt.get_cmap("tab20b").colors]
    left = [0.0] * len(results)
    for i, name in enumerate(labels):
        widths = [next((x["ms_per_run"] for x in r.get("stages") or [] if label(r, x["stage"]) == name), 0.0)
                  for r in results]
        ax.barh(rows, widths, left=left, color=palette[i % len(palette)], label=name)
        left = [a + b for a, b in zip(left, widths)]
    missing = "; empty row: not profiled" if any(not r.get("stages") for r in results) else ""
    ax.set_xlabel(f"kernel time per run by stage (ms){missing}")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))


def _short(model: str) -> str:
    from pathlib import Path

    p = Path(model)
    return f"{p.parent.name}/{p.name}"


def gate_table(results) -> Table:
    """One row per gated metric of deploykit.gate.GateResult objects."""
    table = Table(title="regression gate", show_lines=False)
    for col, justify in (("candidate", "left"), ("metric", "left"), ("baseline", "right"), ("candidate value", "right"),
                         ("limit", "right"), ("detail", "left"), ("verdict", "left")):
        table.add_column(col, justify=justify, overflow="fold")
    for r in results:
        lat = r.latency
        if lat is not None:
            base = f"{lat.baseline_median_ms:.2f} ms" if lat.baseline_median_ms is not None else "-"
            detail = (f"ratio {lat.ratio:.3f} (95% CI {lat.ci95[0]:.3f}-{lat.ci95[1]:.3f}), P(>limit) "
                      f"{lat.p_regression:.2f}, {lat.rounds} rounds, {lat.method}")
            table.add_row(r.candidate, "latency", base, f"{lat.candidate_median_ms:.2f} ms", f"x{lat.limit:.2f}",
                          detail, _verdict(lat.verdict))
        for f in r.fidelity:
            table.add_row(r.candidate, f["metric"], f"{f['baseline']:.4g}", f"{f['candidate']:.4g}",
                          f">= {f['limit']:.4g}", "", _verdict("pass" if f["passed"] else "fail"))
    return table


def _verdict(v: str) -> str:
    return f"[green]{v}[/green]" if v.startswith("pass") else f"[red]{v}[/red]"


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def ratio_rows_markdown(rows: list[dict], extra: dict[str, Callable[[dict], str]] | None = None) -> str:
    """Rows of deploykit.bench.compare_engines as a markdown table; ``extra`` adds
    columns, header -> function of the row giving the cell."""
    extra = extra or {}
    return markdown_table(["variant", "median ms", "p90 ms", "ratio", "95% CI", "runs", *extra],
                          [[x["variant"], f"{x['median_ms']:.2f}", f"{x['p90_ms']:.2f}", f"{x['ratio_to_baseline']:.3f}",
                            f"{x['ratio_ci95'][0]:.3f}-{x['ratio_ci95'][1]:.3f}", x["runs"],
                            *(cell(x) for cell in extra.values())] for x in rows])


def speedup_plot(panels: list[tuple[str, list[dict]]], path, *, columns: int = 2, baseline: str = "baseline") -> None:
    """Horizontal bars of 1/ratio for each (title, compare_engines rows) panel, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows_of_panels = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows_of_panels, columns, figsize=(6.5 * columns, 3.3 * rows_of_panels), squeeze=False)
    for ax, (title, rows) in zip(axes.flat, panels):
        names = [x["variant"] for x in rows][::-1]
        speedup = [1 / x["ratio_to_baseline"] for x in rows][::-1]
        ax.barh(names, speedup, color="#4878a8")
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(f"speed-up vs {baseline} (x)")
        ax.tick_params(axis="y", labelsize=8)
        for i, v in enumerate(speedup):
            ax.text(v, i, f" {v:.2f}x", va="center", fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
