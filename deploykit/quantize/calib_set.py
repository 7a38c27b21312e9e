"""Calibration sets: a directory of ``.npz`` samples plus an index.

    calib.json      {"format": 1, "recipe": name, "inputs": [{name, shape, dtype}],
                     "temporal": bool, "samples": [{"file", "scene", "index"}, ...]}
    000000.npz ...  one sample each, arrays named after the inputs

For pillar models the inputs are the converted engine's feeds (``pillars``,
``coords``). For temporal camera models a sample holds what a camera frame
brings (``img``, the raw ``can_bus``): ``prev_bev``, ``shift`` and the rest
are state, produced while calibrating by running the frames of each scene in
order (deploykit.temporal.runner), so samples are ordered and carry their
scene id and index within the scene.

Everything is validated on load, naming the file: wrong recipe, missing or
extra arrays, shapes or dtypes that differ from the index, NaN or Inf, and a
scene whose frames are not numbered 0, 1, 2, ...
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from ..artifacts import atomic_directory, ensure_writable, write_json
from ..errors import InputError

FORMAT = 1
INDEX = "calib.json"


@dataclass(frozen=True)
class CalibSample:
    arrays: dict[str, np.ndarray]
    scene: str
    index: int
    file: str


@dataclass(frozen=True)
class CalibSet:
    path: Path
    recipe: str
    inputs: tuple[dict, ...]
    temporal: bool
    entries: tuple[dict, ...]

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[CalibSample]:
        for entry in self.entries:
            yield self.load_sample(entry)

    def load_sample(self, entry: dict) -> CalibSample:
        path = self.path / entry["file"]
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
        except (OSError, ValueError) as exc:
            raise InputError(f"calibration sample {path} cannot be read ({exc})") from None
        _check_arrays(path, arrays, self.inputs)
        return CalibSample(arrays, str(entry["scene"]), int(entry["index"]), entry["file"])


def _check_arrays(path: Path, arrays: dict[str, np.ndarray], inputs) -> None:
    want = {i["name"]: i for i in inputs}
    missing, extra = sorted(set(want) - set(arrays)), sorted(set(arrays) - set(want))
    if missing or extra:
        raise InputError(f"calibration sample {path}: " + "; ".join(
            ([f"missing {', '.join(missing)}"] if missing else []) + ([f"unexpected {', '.join(extra)}"] if extra else []))
            + f" (the set's inputs are {', '.join(want)})")
    for name, spec in want.items():
        arr = arrays[name]
        if list(arr.shape) != list(spec["shape"]) or arr.dtype.name != spec["dtype"]:
            raise InputError(f"calibration sample {path}: {name} is {arr.dtype.name}{list(arr.shape)}, "
                             f"expected {spec['dtype']}{list(spec['shape'])}")
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            bad = int((~np.isfinite(arr)).sum())
            raise InputError(f"calibration sample {path}: {name} has {bad} NaN/Inf values; fix or drop this sample")


def write_calib_set(out: Path, recipe: str, samples: list[tuple[dict[str, np.ndarray], str, int]], *,
                    temporal: bool, overwrite: bool = False) -> Path:
    """Write ``samples`` = [(arrays, scene, index), ...] as a calibration set, atomically."""
    out = Path(out)
    if not samples:
        raise InputError("a calibration set needs at least one sample")
    ensure_writable(out, overwrite=overwrite)
    first = samples[0][0]
    inputs = [{"name": k, "shape": list(v.shape), "dtype": v.dtype.name} for k, v in first.items()]
    entries = []
    with atomic_directory(out, overwrite=overwrite) as scratch:
        for i, (arrays, scene, index) in enumerate(samples):
            name = f"{i:06d}.npz"
            _check_arrays(Path(name), arrays, inputs)
            np.savez(scratch / name, **arrays)
            entries.append({"file": name, "scene": scene, "index": index})
        write_json(scratch / INDEX, {"format": FORMAT, "recipe": recipe, "inputs": inputs, "temporal": temporal,
                                     "samples": entries})
    return out


def load_calib_set(path: Path, *, recipe: str | None = None, inputs: list[dict] | None = None) -> CalibSet:
    """Open and validate a calibration set's index. ``recipe`` and ``inputs``
    (name/shape/dtype, e.g. from a converted model's manifest) are what the set
    must match; samples themselves are validated as they are read."""
    path = Path(path)
    index = path / INDEX
    if not index.is_file():
        raise InputError(f"{path} is not a calibration set: {INDEX} is missing "
                         "(make one with `deploykit calib --recipe R --out DIR`)")
    try:
        meta = json.loads(index.read_text())
        entries = tuple(meta["samples"])
        spec = tuple(meta["inputs"])
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{index} is malformed ({type(exc).__name__}: {exc})") from None
    if meta.get("format") != FORMAT:
        raise InputError(f"{index}: format {meta.get('format')!r}, this deploykit reads format {FORMAT}")
    if not entries:
        raise InputError(f"calibration set {path} is empty: it lists no samples")
    if recipe is not None and meta.get("recipe") != recipe:
        raise InputError(f"calibration set {path} was made for recipe {meta.get('recipe')!r}, not {recipe!r}; "
                         f"make one for {recipe} with `deploykit calib --recipe {recipe} --out DIR`")
    if inputs is not None:
        _check_spec(path, spec, inputs, bool(meta.get("temporal")))
    _check_order(path, entries)
    return CalibSet(path, str(meta.get("recipe")), spec, bool(meta.get("temporal")), entries)


def _check_spec(path: Path, spec, inputs: list[dict], temporal: bool) -> None:
    want = {i["name"]: i for i in inputs}
    if temporal:
        # A frame's CAN bus is the raw absolute one, kept in float64 (global positions
        # in metres need it); the engine's relative float32 (1, 18) is made from it.
        want = {"img": want["img"], "can_bus": {"name": "can_bus", "shape": [18], "dtype": "float64"}}
    got = {i["name"]: i for i in spec}
    for name, w in want.items():
        g = got.get(name)
        if g is None or list(g["shape"]) != list(w["shape"]) or g["dtype"] != w["dtype"]:
            have = f"{g['dtype']}{list(g['shape'])}" if g else "nothing"
            raise InputError(f"calibration set {path} has {have} for input {name}, the model takes "
                             f"{w['dtype']}{list(w['shape'])}: it was made for another recipe or layout")


def _check_order(path: Path, entries) -> None:
    last: dict[str, int] = {}
    current = None
    for entry in entries:
        scene, index = str(entry["scene"]), int(entry["index"])
        if scene != current and scene in last:
            raise InputError(f"calibration set {path}: {entry['file']} returns to scene {scene} after scene "
                             f"{current}; list each scene's frames together")
        current = scene
        expected = last.get(scene, -1) + 1
        if index != expected:
            raise InputError(f"calibration set {path}: {entry['file']} is frame {index} of scene {scene}, expected "
                             f"frame {expected}; frames of a scene must be listed in order without gaps")
        last[scene] = index


def build_calib_set(recipe, out: Path, *, samples: int = 16, frames_per_scene: int = 4, seed: int = 5000,
                    overwrite: bool = False) -> Path:
    """A calibration set from the recipe's own sample generator (synthetic data):
    engine feeds for pillar models, ordered camera frames for temporal ones."""
    from ..models import build_model, make_sample
    from ..passes import apply_passes
    from ..preprocess.camera_inputs import synthetic_scene

    if samples < 1:
        raise InputError("--samples must be at least 1")
    if recipe.arch == "bevformer":
        rows = []
        for s in range(-(-samples // frames_per_scene)):
            for frame in synthetic_scene(recipe.model, f"scene-{s:04d}", frames_per_scene, seed + s):
                rows.append(({"img": frame.img, "can_bus": frame.can_bus}, frame.scene, frame.index))
        return write_calib_set(out, recipe.name, rows[:samples], temporal=True, overwrite=overwrite)
    # The engine's input layout depends on the passes, not on the weights.
    model = apply_passes(build_model(recipe), recipe.convert.passes)
    rows = [(make_sample(recipe, seed + i, model).feeds, f"sweep-{i:04d}", 0) for i in range(samples)]
    return write_calib_set(out, recipe.name, rows, temporal=False, overwrite=overwrite)
