"""Point-cloud files as users and datasets hand them over.

``read_points`` returns the file's columns as they are, named; it does not
decide what the model takes (``deploykit.data.contract`` does). Formats:

* ``.bin`` raw float32 rows, as mmdet3d's loaders read them: the nuScenes
  layout (``*.pcd.bin``: x, y, z, intensity 0-255, ring index) and the KITTI
  layout (``*.bin``: x, y, z, reflectance 0-1); ``layout=`` overrides the name.
* ``.npy``: a 2-D float array, columns x, y, z[, intensity[, col4, ...]].
* ``.pcd`` (ASCII, binary, binary_compressed) through pypcd4, a maintained
  PyPI reader of PCL's format, so deploykit carries no PCD parser of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError

# name -> (columns, source intensity range)
RAW_LAYOUTS: dict[str, tuple[tuple[str, ...], tuple[float, float]]] = {
    "nuscenes": (("x", "y", "z", "intensity", "ring"), (0.0, 255.0)),
    "kitti": (("x", "y", "z", "intensity"), (0.0, 1.0)),
}
INTENSITY_NAMES = ("intensity", "reflectance", "i")
# Per-point capture times within one sweep (Velodyne/Ouster drivers): not mmdet3d's
# dt, which is the lag of a whole sweep behind the current one.
TIME_NAMES = ("t", "time", "timestamp")
SUPPORTED = "a .pcd.bin (nuScenes), .bin (KITTI), .npy or .pcd file"


@dataclass(frozen=True)
class PointFile:
    """One point cloud with its columns named.

    ``intensity_range`` is the source's range where the format fixes it
    (nuScenes 0-255, KITTI 0-1, an 8-bit PCD field 0-255), else None.
    ``notes`` are the reader's observations the contract check passes on.
    """

    points: np.ndarray  # (N, C) float32
    columns: tuple[str, ...]
    source_layout: str  # "nuscenes", "kitti", "npy", "pcd" or "array"
    intensity_range: tuple[float, float] | None = None
    path: Path | None = None
    notes: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return str(self.path) if self.path is not None else "the point array"

    def column(self, name: str) -> int | None:
        return self.columns.index(name) if name in self.columns else None


def layout_of(path: str | Path) -> str | None:
    """The layout the file name implies, None for a name deploykit does not know."""
    name = Path(path).name.lower()
    if name.endswith(".pcd.bin"):
        return "nuscenes"
    if name.endswith(".bin"):
        return "kitti"
    if name.endswith(".npy"):
        return "npy"
    if name.endswith(".pcd"):
        return "pcd"
    return None


def read_points(path: str | Path, *, layout: str | None = None) -> PointFile:
    """Read a point cloud; ``layout`` ("nuscenes" | "kitti") forces a raw float32 read."""
    path = Path(path)
    kind = _kind(path, layout)  # a bad layout is refused before the file is looked at
    if not path.is_file():
        raise InputError(f"{path}: no such point cloud file; expected {SUPPORTED}")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: the file is empty; expected {SUPPORTED} with at least one point")
    if kind in RAW_LAYOUTS:
        return _read_raw(path, kind)
    if kind == "npy":
        return _read_npy(path)
    if kind == "pcd":
        return _read_pcd(path)
    raise InputError(f"{path}: unknown point cloud format; expected {SUPPORTED}, "
                     "or pass layout='nuscenes' | 'kitti' for raw float32 rows")


def write_points_bin(path: str | Path, points: np.ndarray, *, layout: str | None = None) -> Path:
    """Write (N, C) points as raw float32 rows, the way nuScenes and KITTI store them.

    The column count must match the layout the name implies (``*.pcd.bin``: 5,
    ``*.bin``: 4) or ``layout``, so ``read_points`` reads the file back as written.
    """
    path = Path(path)
    points = np.asarray(points)
    kind = _kind(path, layout)
    if kind not in RAW_LAYOUTS:
        raise InputError(f"{path}: raw point files are named *.pcd.bin (nuScenes) or *.bin (KITTI), "
                         "or pass layout='nuscenes' | 'kitti'")
    want = len(RAW_LAYOUTS[kind][0])
    if points.ndim != 2 or points.shape[1] != want:
        raise InputError(f"{path}: the {kind} layout has {want} columns ({', '.join(RAW_LAYOUTS[kind][0])}), "
                         f"got points of shape {list(points.shape)}")
    np.ascontiguousarray(points, dtype="<f4").tofile(path)
    return path


def from_array(points: np.ndarray, *, columns: tuple[str, ...] | None = None,
               intensity_range: tuple[float, float] | None = None) -> PointFile:
    """Wrap an in-memory (N, C) array like a .npy file: x, y, z[, intensity, col4, ...]."""
    points = _checked_array(np.asarray(points), "the point array")
    if columns is not None and len(columns) != points.shape[1]:
        raise InputError(f"the point array has {points.shape[1]} columns but {len(columns)} names were given "
                         f"({', '.join(columns)}); name every column")
    return PointFile(points, columns or _array_columns(points.shape[1]), "array", intensity_range)


def _kind(path: Path, layout: str | None) -> str | None:
    named = layout_of(path)
    if layout is None:
        return named
    if layout not in RAW_LAYOUTS:
        raise InputError(f"unknown point layout {layout!r}; raw .bin layouts are {', '.join(RAW_LAYOUTS)}")
    if named in ("npy", "pcd"):
        raise InputError(f"{path}: layout={layout!r} is for raw float32 files, not .{named} files, "
                         "which name their columns themselves")
    return layout


def _read_raw(path: Path, layout: str) -> PointFile:
    columns, intensity_range = RAW_LAYOUTS[layout]
    row = 4 * len(columns)
    size = path.stat().st_size
    if size % row:
        raise InputError(
            f"{path}: {size} bytes is not a whole number of {layout}-layout rows ({len(columns)} float32 = "
            f"{row} bytes); pass the layout the file was written in ({_layouts_that_fit(size)})"
        )
    points = np.fromfile(path, dtype="<f4").reshape(-1, len(columns))
    return PointFile(points.astype(np.float32, copy=False), columns, layout, intensity_range, path)


def _layouts_that_fit(size: int) -> str:
    fits = [f"layout='{name}'" for name, (cols, _) in RAW_LAYOUTS.items() if size % (4 * len(cols)) == 0]
    return " or ".join(fits) if fits else "no raw layout fits: the file may be truncated"


def _read_npy(path: Path) -> PointFile:
    try:
        points = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise InputError(f"{path}: not a readable .npy array ({exc}); save points with numpy.save") from None
    return PointFile(_checked_array(points, str(path)), _array_columns(points.shape[1]), "npy", None, path)


def _checked_array(points: np.ndarray, name: str) -> np.ndarray:
    if points.dtype.names is not None:
        raise InputError(f"{name}: a structured array; save a plain (N, C) float array with columns x, y, z, ...")
    if points.ndim != 2 or points.shape[1] < 3:
        raise InputError(f"{name}: points must be a 2-D (N, C >= 3) array of x, y, z[, intensity, ...], "
                         f"got shape {list(points.shape)}")
    if not np.issubdtype(points.dtype, np.floating):
        raise InputError(f"{name}: points must be float (x, y, z in metres), got dtype {points.dtype}")
    if points.shape[0] == 0:
        raise InputError(f"{name}: the cloud has no points; expected at least one row")
    return np.ascontiguousarray(points, dtype=np.float32)


def _array_columns(count: int) -> tuple[str, ...]:
    named = ("x", "y", "z", "intensity")
    return named[:count] + tuple(f"col{i}" for i in range(4, count))


def _read_pcd(path: Path) -> PointFile:
    from pypcd4 import PointCloud

    try:
        cloud = PointCloud.from_path(path)
        fields = cloud.fields
        data = cloud.pc_data
    except Exception as exc:  # pypcd4 raises pydantic, lzf, struct and numpy errors alike
        raise InputError(f"{path}: not a readable PCD file ({type(exc).__name__}: {_first_line(exc)}); "
                         "expected a PCL header (FIELDS x y z ..., DATA ascii|binary|binary_compressed) and the points "
                         "it declares") from None
    # pypcd4 names PCL's "_" padding fields "#$%&~~..."; they hold no data.
    fields = tuple(f for f in fields if not f.startswith("#$%&~~"))
    lower = [f.lower() for f in fields]
    missing = [axis for axis in ("x", "y", "z") if axis not in lower]
    if missing:
        raise InputError(f"{path}: PCD fields {list(fields)} lack {', '.join(missing)}; x, y, z are required")
    if cloud.points == 0 or len(data) == 0:
        raise InputError(f"{path}: the PCD file holds no points; expected at least one")
    if len(data) != cloud.points:
        raise InputError(f"{path}: the header says {cloud.points} points but the file holds {len(data)}; "
                         "the file is truncated")
    columns, notes = _pcd_columns(lower)
    points = np.stack([np.asarray(data[f], dtype=np.float32) for f in fields], axis=1)
    intensity_range = None
    if "intensity" in columns and np.dtype(data.dtype[fields[columns.index("intensity")]]) == np.uint8:
        intensity_range = (0.0, 255.0)  # an 8-bit field can only mean 0-255
    return PointFile(points, tuple(columns), "pcd", intensity_range, path, tuple(notes))


def _pcd_columns(fields: list[str]) -> tuple[list[str], list[str]]:
    columns, notes = [], []
    for field in fields:
        if field in INTENSITY_NAMES and "intensity" not in columns:
            columns.append("intensity")
        elif field in INTENSITY_NAMES:
            columns.append(field)
            notes.append(f"PCD field '{field}' is a second intensity field and is not used; the first one is.")
        else:
            columns.append(field)
            if field in TIME_NAMES:
                notes.append(f"PCD field '{field}' is a per-point capture time within the sweep, not the sweep "
                             "lag dt, so it is not used (dt is 0 for a single sweep).")
    return columns, notes


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:160] if text else "no detail"
