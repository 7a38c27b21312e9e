"""How work is cut into shards: contiguous runs, whole scenes for temporal models."""

from __future__ import annotations

from typing import Sequence


def contiguous(count: int, shards: int) -> list[range]:
    """``count`` items in at most ``shards`` contiguous runs whose sizes differ by at most one."""
    shards = max(1, min(shards, count))
    base, extra = divmod(count, shards)
    out, start = [], 0
    for i in range(shards):
        size = base + (i < extra)
        out.append(range(start, start + size))
        start += size
    return [r for r in out if len(r)]


def by_scene(scenes: Sequence[str], shards: int) -> list[list[int]]:
    """Item indices in at most ``shards`` groups of whole scenes, in order: a temporal model's
    state (the previous BEV, the previous key frame) never crosses a shard. A scene's items
    must be consecutive, as calibration sets and held-out frames list them; scenes are
    packed into shards of about equal item counts."""
    runs: list[list[int]] = []
    for i, scene in enumerate(scenes):
        if runs and scenes[runs[-1][0]] == scene:
            runs[-1].append(i)
        else:
            if any(scenes[r[0]] == scene for r in runs):
                raise ValueError(f"scene {scene}'s items are not consecutive: they cannot be sharded by scene")
            runs.append([i])
    out: list[list[int]] = []
    target = len(scenes) / max(1, min(shards, len(runs)))
    for run in runs:
        # A new shard once the current one holds its share (the last takes what is left).
        if not out or (len(out[-1]) >= target and len(out) < shards):
            out.append([])
        out[-1].extend(run)
    return out
