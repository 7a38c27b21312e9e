"""Multi-sweep aggregation as mmdet3d's LoadPointsFromMultiSweeps does it at test time.

The semantics follow mmdet3d (datasets/pipelines/loading.py) with the settings
of CenterPoint's nuScenes configs (sweeps_num = [model.points] sweeps - 1,
pad_empty_sweeps=True, remove_close=True) and ``test_mode=True`` (the newest
sweeps_num sweeps, not a random draw):

* the current sweep's points come first, their time column set to 0;
* each earlier sweep (newest first) loses the points within the square radius
  ``remove_close`` of its own sensor, is moved into the current LiDAR frame by
  sensor2lidar as mmdet3d's nuScenes converter (obtain_sensor2top) builds it
  (sweep sensor -> sweep ego -> global -> current ego -> current LiDAR), and
  gets dt = current timestamp - sweep timestamp in seconds;
* a frame without any earlier sweep repeats the current points sweeps_num
  times, each with close points removed (pad_empty_sweeps), unless its file
  already carries a dt column with lags (a cloud aggregated elsewhere), which is
  then taken as it is, as is any file for a single-sweep checkpoint.

Sweeps with fewer than sweeps_num predecessors use the ones they have, as
mmdet3d does. The current timestamp is ``frame.lidar``'s (nuScenes' sample
timestamp is its LIDAR_TOP keyframe's). Float32 rounding follows mmdet3d's
numpy code, so the points match it to the last bit on the same inputs.

CenterPoint's configs leave test_mode at its default False, so mmdet3d's own
evaluation draws 9 of the (up to 10) stored sweeps at random; deploykit is
deterministic and takes the newest, which is what test_mode=True means.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from .contract import MAX_DT_S, NOTE, check_frame, conform_points, conform_sweep
from .frames import SensorFrame, Sweep, invert_pose
from .points import read_points


def aggregate_sweeps(frame: SensorFrame, cfg) -> tuple[np.ndarray, list[str]]:
    """(N, point_features) float32 points of ``frame.lidar`` plus its earlier sweeps, and warnings.

    ``cfg`` is a CenterPointPillarConfig; its [model.points] says how many sweeps
    and the remove_close radius (0 turns it off). Files are read with
    ``read_points`` and conformed to the input contract one by one.
    """
    if frame.lidar is None:
        raise InputError(f"frame {frame.token} has no LiDAR sweep; the checkpoint needs SensorFrame.lidar")
    current = frame.lidar
    if not frame.sweeps:
        # A lone file is the whole input: its own dt column (a cloud aggregated elsewhere)
        # is kept and checked, and a ring index where dt belongs is refused.
        points, messages = conform_points(read_points(current.path, layout=current.layout), cfg)
        dt = points[:, cfg.point_columns.index("dt")] if "dt" in cfg.point_columns else None
        if cfg.points.sweeps == 1 or (dt is not None and dt.any()):
            return points, messages
    points, messages = _read_sweep(current, cfg)
    parts = [points]
    sweeps_num = cfg.points.sweeps - 1
    radius = cfg.points.remove_close
    padded = sweeps_num > 0 and not frame.sweeps
    if padded:
        parts += [remove_close(points, radius)] * sweeps_num
        messages.append(
            f"frame {frame.token} has no earlier sweeps, so its sweep is repeated {sweeps_num} times with dt = 0 "
            f"as mmdet3d's pad_empty_sweeps does; the checkpoint was trained on {cfg.points.sweeps} sweeps: pass "
            "SensorFrame.sweeps for full accuracy."
        )
    dts = []
    for sweep in frame.sweeps[:sweeps_num]:
        dt = _sweep_dt(current, sweep)
        sweep_points, sweep_messages = _read_sweep(sweep, cfg)
        messages += sweep_messages
        sweep_points = remove_close(sweep_points, radius)
        sweep_points[:, :3] = _into_current(sweep_points[:, :3], sensor2lidar(sweep, current))
        if "dt" in cfg.point_columns:
            sweep_points[:, cfg.point_columns.index("dt")] = dt
        dts.append(dt)
        parts.append(sweep_points)
    if any(b < a for a, b in zip(dts, dts[1:])):
        messages.append(f"frame {frame.token}: SensorFrame.sweeps are not newest first (dt {_fmt(dts)} s), so "
                        f"the {sweeps_num} taken may not be the newest; order them newest first.")
    points = np.concatenate(parts)
    return points, _merged(messages) + check_frame(points, cfg, sweeps_note=not padded)


def sensor2lidar(sweep: Sweep, current: Sweep) -> np.ndarray:
    """4x4 from a sweep's sensor frame into the current LiDAR frame, through the ego poses
    at both timestamps, as mmdet3d's obtain_sensor2top (float64)."""
    return invert_pose(current.sensor2ego) @ invert_pose(current.ego2global) @ sweep.ego2global @ sweep.sensor2ego


def remove_close(points: np.ndarray, radius: float) -> np.ndarray:
    """Points outside the square |x| < radius and |y| < radius, as mmdet3d's _remove_close."""
    if radius <= 0:
        return points
    close = (np.abs(points[:, 0]) < radius) & (np.abs(points[:, 1]) < radius)
    return points[~close]


def _read_sweep(sweep: Sweep, cfg) -> tuple[np.ndarray, list[str]]:
    # dt is assigned here, not read: mmdet3d overwrites every sweep's time column.
    return conform_sweep(read_points(sweep.path, layout=sweep.layout), cfg, keep_dt=False)


def _into_current(xyz: np.ndarray, m: np.ndarray) -> np.ndarray:
    # mmdet3d rotates float32 points by the float64 matrix, stores float32, then adds
    # the float64 translation and stores float32 again; the same two roundings here.
    rotated = (xyz @ m[:3, :3].T).astype(np.float32)
    return (rotated + m[:3, 3]).astype(np.float32)


def _sweep_dt(current: Sweep, sweep: Sweep) -> np.float32:
    # Seconds as mmdet3d takes them: both timestamps divided by 1e6 before subtracting.
    dt = current.timestamp_us / 1e6 - sweep.timestamp_us / 1e6
    if dt < 0:
        raise InputError(f"{sweep.path}: the sweep is {-dt:g} s newer than the current sweep; SensorFrame.sweeps "
                         "must hold earlier sweeps (timestamps in microseconds), newest first")
    if dt > MAX_DT_S:
        raise InputError(f"{sweep.path}: the sweep is {dt:g} s older than the current sweep, beyond the "
                         f"{MAX_DT_S:g} s a sweep lag can be; check that timestamp_us is in microseconds")
    return np.float32(dt)


def _merged(messages: list[str]) -> list[str]:
    """The same note for several sweep files said once, with a count."""
    groups: dict[tuple[str, str], list[str]] = {}
    for msg in messages:
        note = NOTE if msg.startswith(NOTE) else ""
        name, _, rest = msg.removeprefix(note).partition(": ")
        groups.setdefault((note, rest if rest else msg), []).append(name)
    out = []
    for (note, rest), names in groups.items():
        if len(names) == 1 or not rest:
            out += [f"{note}{name}: {rest}" if rest else name for name in names]
        else:
            out.append(f"{note}{names[0]} and {len(names) - 1} more sweep files: {rest}")
    return out


def _fmt(values) -> str:
    return ", ".join(f"{v:.3f}" for v in values)
