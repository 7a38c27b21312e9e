"""Step-by-step progress on stderr, so long stages show where they are."""

from __future__ import annotations

import contextlib
import time
from typing import Iterator

from rich.console import Console

_console = Console(stderr=True, highlight=False)


class Steps:
    """Numbered steps with their durations; silent when ``quiet``."""

    def __init__(self, total: int, *, quiet: bool = False):
        self.total, self.done, self.quiet = total, 0, quiet
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def step(self, title: str) -> Iterator[None]:
        self.done += 1
        start = time.perf_counter()
        label = f"[{self.done}/{self.total}] {title}"
        if self.quiet:
            yield
        else:
            with _console.status(label):
                yield
        elapsed = time.perf_counter() - start
        self.timings[title] = round(elapsed, 3)
        if not self.quiet:
            _console.print(f"{label} [dim]({elapsed:.1f} s)[/dim]")


def console() -> Console:
    return _console


def track(items, description: str, *, quiet: bool = False, total: int | None = None):
    """A progress bar over ``items`` on stderr that disappears when done."""
    from rich.progress import track as rich_track

    return rich_track(items, total=total, description=description, console=_console, disable=quiet, transient=True)


def grouped(messages: list[str]) -> list[str]:
    """Distinct messages; those that differ only in the file path or token they name (the
    same note on every frame of a dataset) become the first of them plus a count."""
    import re

    groups: dict[str, list[str]] = {}
    for m in messages:
        groups.setdefault(re.sub(r"\S*/\S+|\b[0-9a-f]{32}\b|\b\d+\b", "#", m), []).append(m)
    out = []
    for items in groups.values():
        distinct = list(dict.fromkeys(items))
        more = len(distinct) - 1
        out.append(distinct[0] + (f" (and {more} more like it)" if more else ""))
    return out


def print_warnings(messages: list[str], *, limit: int = 5, where: str = "the report") -> None:
    """Warnings on stderr, grouped, at most ``limit``: never silenced by quiet."""
    items = grouped(messages)
    for w in items[:limit]:
        if w.startswith("note: "):  # a conversion done as the release does it (deploykit.data.contract.NOTE)
            _console.print(f"[dim]note:[/dim] {w[6:]}", soft_wrap=True)
        else:
            _console.print(f"[yellow]warning:[/yellow] {w}", soft_wrap=True)
    if len(items) > limit:
        _console.print(f"[yellow]warning:[/yellow] ... and {len(items) - limit} more ({where})", soft_wrap=True)
