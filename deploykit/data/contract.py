"""The recipe's point input contract ([model.points]), enforced on a user's cloud.

A checkpoint only works on points that mean what its training data meant:
x, y, z in metres in its LiDAR frame, intensity in its range, dt the lag in
seconds of a point's sweep behind the current one (mmdet3d's
LoadPointsFromMultiSweeps). ``conform_points`` maps a cloud's columns onto
``cfg.point_columns``, converts what it safely can (a known intensity range,
the nuScenes ring column) and refuses what it cannot tell apart from garbage.
Every message is one sentence: what was expected and what to do.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from .points import PointFile, from_array

# Marks what was converted as the release converts it (not a problem with the data):
# printed as a note, not a warning.
NOTE = "note: "
# A value this far (fraction of the range) beyond an intensity range is another scale, not noise.
RANGE_SLACK = 0.05
# Longest plausible sweep lag: nuScenes' ten sweeps span ~0.45 s; beyond 2 s it is a unit error.
MAX_DT_S = 2.0


def conform_points(cloud: PointFile | np.ndarray, cfg, *, multi_sweep: bool = False
                   ) -> tuple[np.ndarray, list[str]]:
    """Points (N, point_features) float32 as the checkpoint takes them, and warnings.

    ``cloud`` is one frame's input. Its dt comes from a column named "dt" or an
    unnamed 5th array column ("col4"); a nuScenes file's 5th column is the ring
    index and becomes dt = 0, as mmdet3d does for the current sweep. With
    ``multi_sweep=True`` the caller says the cloud already aggregates several
    sweeps, so a dt column is required. ``cfg`` is a CenterPointPillarConfig.
    Raises InputError where the data cannot be what the checkpoint expects.
    """
    cloud = cloud if isinstance(cloud, PointFile) else from_array(cloud)
    points, warnings = conform_sweep(cloud, cfg, keep_dt=True)
    if multi_sweep and "dt" in cfg.point_columns and _dt_column(cloud) is None:
        raise InputError(
            f"{cloud.name}: multi_sweep=True needs a dt column (a field named dt, or the 5th column of an array) "
            f"but the columns are {', '.join(cloud.columns)}; aggregate the sweeps with "
            "deploykit.data.sweeps.aggregate_sweeps instead"
        )
    return points, warnings + check_frame(points, cfg)


def conform_sweep(cloud: PointFile, cfg, *, keep_dt: bool) -> tuple[np.ndarray, list[str]]:
    """One cloud's columns in the checkpoint's order, without the whole-frame checks.

    Non-finite rows are dropped, intensity is brought into the contract's range.
    ``keep_dt=False`` leaves dt 0 for the caller to fill (multi-sweep
    aggregation overwrites it, as mmdet3d does); else it is taken from the
    cloud's dt column, if any, and checked.
    """
    wanted = cfg.point_columns
    notes = list(cloud.notes)
    sources = [_source_column(cloud, name, keep_dt, notes) for name in wanted]
    used = [i for i in sources if i is not None]
    points = cloud.points
    finite = np.isfinite(points[:, used]).all(axis=1)
    if not finite.all():
        points = points[finite]
        bad = np.flatnonzero(~finite)
        if points.shape[0] == 0:
            raise InputError(f"{cloud.name}: every one of the {bad.size} points has NaN or Inf; "
                             "expected finite x, y, z and features")
        notes.append(f"{cloud.name}: {bad.size} of {finite.size} points have NaN or Inf and were dropped "
                     f"(first at row {bad[0]}); drop them at the source if that is not expected.")
    out = np.zeros((points.shape[0], len(wanted)), np.float32)
    for k, (name, src) in enumerate(zip(wanted, sources)):
        if src is None:
            continue  # dt of a cloud without one: 0, the current sweep
        values = points[:, src]
        if name == "intensity":
            values = _conform_intensity(values, cloud, cfg, notes)
        elif name == "dt":
            _check_dt(values, cloud.name, cloud.columns[src])
        out[:, k] = values
    return out, notes


def check_frame(points: np.ndarray, cfg, *, sweeps_note: bool = True) -> list[str]:
    """Whole-frame checks on conformed points: errors for clouds that cannot be the
    model's input, warnings for ones that differ from its training data."""
    xyz = points[:, :3]
    if not xyz.any():
        raise InputError(f"all {points.shape[0]} points are at (0, 0, 0); expected a LiDAR sweep in metres "
                         "(check that the file was written as float32)")
    pcr = np.asarray(cfg.voxelization.point_cloud_range, np.float32)
    inside = ((xyz >= pcr[:3]) & (xyz < pcr[3:])).all(axis=1)
    if not inside.any():
        raise InputError(
            f"no point lies inside the checkpoint's point_cloud_range ({_extent(pcr[:3], pcr[3:])}); the cloud "
            f"spans {_extent(xyz.min(axis=0), xyz.max(axis=0))}: give x, y, z in metres in the LiDAR frame"
        )
    warnings = []
    lo, hi = cfg.points.expected_points
    n = points.shape[0]
    if n < lo:
        warnings.append(f"the frame has {n} points, fewer than the {lo} expected ([model.points] "
                        "expected_points); check that the whole sweep (and its earlier sweeps) was read.")
    elif n > hi:
        warnings.append(f"the frame has {n} points, more than the {hi} expected ([model.points] "
                        "expected_points); check that it is one frame, not an accumulated map.")
    if "dt" in cfg.point_columns and sweeps_note:
        warnings += _sweep_warnings(points[:, cfg.point_columns.index("dt")], cfg.points.sweeps)
    return warnings


def _source_column(cloud: PointFile, name: str, keep_dt: bool, notes: list[str]) -> int | None:
    if name in ("x", "y", "z"):
        if cloud.column(name) is None:  # readers guarantee x, y, z; hand-named arrays may not
            raise InputError(f"{cloud.name}: the columns {', '.join(cloud.columns)} lack {name}; "
                             "the checkpoint takes x, y, z in metres first")
        return cloud.column(name)
    if name == "intensity":
        index = cloud.column("intensity")
        if index is None:
            raise InputError(f"{cloud.name}: the checkpoint takes intensity as column 4 but the cloud has only "
                             f"{', '.join(cloud.columns)}; give x, y, z, intensity[, dt]")
        return index
    if not keep_dt:
        return None
    if cloud.source_layout == "nuscenes":
        notes.append(f"{NOTE}{cloud.name}: column 5 of a nuScenes-layout file is the ring index, not dt, so dt is 0 "
                     "as mmdet3d's LoadPointsFromMultiSweeps sets it for the current sweep.")
    return _dt_column(cloud)


def _dt_column(cloud: PointFile) -> int | None:
    for name in ("dt", "col4"):
        if name in cloud.columns:
            return cloud.column(name)
    return None


def _conform_intensity(values: np.ndarray, cloud: PointFile, cfg, notes: list[str]) -> np.ndarray:
    lo, hi = (float(v) for v in cfg.points.intensity_range)
    vmin, vmax = float(values.min()), float(values.max())
    if cloud.intensity_range is not None:
        slo, shi = (float(v) for v in cloud.intensity_range)
        slack = RANGE_SLACK * (shi - slo)
        if vmin < slo - slack or vmax > shi + slack:
            raise InputError(
                f"{cloud.name}: intensity of the {cloud.source_layout} layout is {slo:g}-{shi:g} but spans "
                f"{vmin:g}..{vmax:g}, so the file is likely in another layout: pass the layout it was written in"
            )
        if (slo, shi) == (lo, hi):
            return values
        notes.append(f"{NOTE}{cloud.name}: intensity rescaled from the {cloud.source_layout} layout's {slo:g}-{shi:g} "
                     f"to the checkpoint's {lo:g}-{hi:g}.")
        # Divide then multiply in float32 so 0-255 -> 0-1 is exactly value / 255.
        return ((values - np.float32(slo)) / np.float32(shi - slo) * np.float32(hi - lo) + np.float32(lo))
    slack = RANGE_SLACK * (hi - lo)
    if vmax > hi + slack:
        raise InputError(f"{cloud.name}: intensity reaches {vmax:g} but the checkpoint takes {lo:g}-{hi:g}: "
                         f"{_rescale_hint(vmax, lo, hi)}")
    if vmin < lo - slack:
        raise InputError(f"{cloud.name}: intensity goes down to {vmin:g} but the checkpoint takes {lo:g}-{hi:g}: "
                         f"rescale it to {lo:g}-{hi:g}")
    if hi >= 100 and vmax <= 1:
        notes.append(f"{cloud.name}: intensity is at most {vmax:g} but the checkpoint takes {lo:g}-{hi:g}, so it "
                     f"looks normalised to 0-1: multiply it by {hi:g} if so.")
    return values


def _rescale_hint(vmax: float, lo: float, hi: float) -> str:
    if (lo, hi) == (0.0, 1.0) and vmax <= 255 * (1 + RANGE_SLACK):
        return "divide it by 255, or read the file with its layout (*.pcd.bin is nuScenes, 0-255) so it is rescaled"
    if (lo, hi) == (0.0, 255.0) and vmax <= 65535 * (1 + RANGE_SLACK):
        return "16-bit intensity needs scaling to 0-255 (divide it by 257)"
    return f"rescale it to {lo:g}-{hi:g}"


def _check_dt(values: np.ndarray, name: str, column: str) -> None:
    vmin, vmax = float(values.min()), float(values.max())
    # A ring (laser) index lands in the dt slot when a 5-column sweep is saved as is.
    if vmin >= 0 and vmax >= 2 and np.array_equal(values, np.round(values)):
        raise InputError(
            f"{name}: column {column} holds only whole numbers {vmin:g}..{vmax:g} where the checkpoint takes dt "
            "in seconds, so it is likely a ring index: set that column to 0 for a single sweep, or aggregate "
            "sweeps with deploykit.data.sweeps.aggregate_sweeps"
        )
    if vmin < 0 or vmax > MAX_DT_S:
        raise InputError(
            f"{name}: dt (column {column}) spans {vmin:g}..{vmax:g} s but the checkpoint takes the lag of a point's "
            f"sweep behind the current one, 0..{MAX_DT_S:g} s: give it in seconds as current minus sweep time"
        )


def _sweep_warnings(dt: np.ndarray, sweeps: int) -> list[str]:
    if sweeps > 1 and not dt.any():
        return [f"the checkpoint was trained on {sweeps} aggregated sweeps but every dt is 0 (one sweep): "
                "pass the earlier sweeps (deploykit.data.sweeps.aggregate_sweeps) or expect lower accuracy."]
    if sweeps == 1 and dt.any():
        return [f"the checkpoint was trained on single sweeps (dt = 0) but dt reaches {float(dt.max()):g} s: "
                "pass only the current sweep or expect lower accuracy."]
    return []


def _extent(lo, hi) -> str:
    return ", ".join(f"{axis} {a:.1f}..{b:.1f}" for axis, a, b in zip("xyz", lo, hi))
