"""Human-readable renderings of results: terminal tables and markdown."""

from __future__ import annotations

from rich.table import Table

LATENCY_COLUMNS = ("mean_ms", "p50_ms", "p90_ms", "p99_ms", "std_ms", "throughput_fps")


def latency_table(results: list[dict]) -> Table:
    table = Table(title="latency (ms)", show_lines=False)
    table.add_column("model", overflow="fold")
    table.add_column("backend")
    table.add_column("runs", justify="right")
    for col in LATENCY_COLUMNS:
        table.add_column(col.replace("_ms", "").replace("throughput_fps", "FPS"), justify="right")
    for r in results:
        lat = r["latency"]
        table.add_row(r["model"], f'{r["backend"]}/{r["settings"]["custom_ops"]}',
                      f'{lat["warmup"]}+{lat["iterations"]}', *(f"{lat[c]:.2f}" for c in LATENCY_COLUMNS))
    return table


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
