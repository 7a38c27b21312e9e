"""Calibration sets: a directory of ``.npz`` samples plus an index.

    calib.json      {"format": 1, "recipe": name, "inputs": [{name, shape, dtype}],
                     "temporal": bool, "samples": [{"file", "scene", "index"}, ...]}
    000000.npz ...  one sample each, arrays named after the inputs

For pillar models the inputs are the converted engine's feeds (``pillars``,
``coords``). For temporal camera models a sample holds what a camera frame
brings (``img`` and its pose: BEVFormer's raw ``can_bus``, BEVDepth's
``ego2global``): the previous BEV, the previous key frame's depth and the rest
are state, produced while calibrating by running the frames of each scene in
order (deploykit.temporal), so samples are ordered and carry their scene id and
index within the scene.

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
    source: dict | None = None  # the user data the samples came from (None: synthetic)

    def origin_tokens(self) -> set[str]:
        """The source frames the samples are (user data only)."""
        return {e["origin"]["token"] for e in self.entries if "origin" in e}

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
                    temporal: bool, overwrite: bool = False, source: dict | None = None,
                    origins: list[dict] | None = None, warnings: list[str] | None = None,
                    pillar_scale=None) -> Path:
    """Write ``samples`` = [(arrays, scene, index), ...] as a calibration set, atomically.
    ``source`` describes the user data they came from, ``origins`` the frame each sample
    is ({"scene", "index", "token"} of the source), so quantize can hold other frames out.
    ``pillar_scale`` is the divisor the pillars were normalised by (normalise_points):
    the shapes cannot tell raw from normalised pillars, so the index records it."""
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
            entries.append({"file": name, "scene": scene, "index": index,
                            **({"origin": origins[i]} if origins else {})})
        write_json(scratch / INDEX, {"format": FORMAT, "recipe": recipe, "inputs": inputs, "temporal": temporal,
                                     "samples": entries, **({"source": source} if source else {}),
                                     **({"pillar_scale": [float(x) for x in pillar_scale]}
                                        if pillar_scale is not None else {}),
                                     **({"warnings": warnings} if warnings else {})})
    return out


def load_calib_set(path: Path, *, recipe: str | None = None, inputs: list[dict] | None = None,
                   runner: type | None = None) -> CalibSet:
    """Open and validate a calibration set's index. ``recipe`` and ``inputs``
    (name/shape/dtype, e.g. from a converted model's manifest) are what the set
    must match; samples themselves are validated as they are read. ``runner``: the
    temporal model's runner type (deploykit.temporal.runner_type), whose state inputs a
    temporal set does not store (default: BEVFormer's)."""
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
        _check_spec(path, spec, inputs, bool(meta.get("temporal")), runner)
        _check_scale(path, meta.get("pillar_scale"), inputs)
    _check_order(path, entries)
    return CalibSet(path, str(meta.get("recipe")), spec, bool(meta.get("temporal")), entries, meta.get("source"))


def _check_spec(path: Path, spec, inputs: list[dict], temporal: bool, runner: type | None = None) -> None:
    want = {i["name"]: i for i in inputs}
    if temporal:
        # A frame's pose is stored instead of the state made from it while calibrating
        # (BEVFormer: the raw absolute CAN bus in float64, global positions need it; the
        # engine's relative one is made from it). Other inputs (a fused model's pillars)
        # come with each frame.
        if runner is None:
            from ..temporal.runner import SequenceRunner as runner
        pose, shape, dtype = runner.pose_input
        want = {**{k: v for k, v in want.items() if k not in runner.state_inputs},
                pose: {"name": pose, "shape": shape, "dtype": dtype}}
    got = {i["name"]: i for i in spec}
    if "pillars" in want and ("num_points" in want) != ("num_points" in got):
        sets = ["decorated pillars", "raw voxels and their num_points"]
        have, takes = sets if "num_points" in want else sets[::-1]
        raise InputError(f"calibration set {path} holds {have}, the model takes {takes} (it was converted "
                         f"{'with' if 'num_points' in want else 'without'} the decorate_in_graph pass): make the set "
                         "again for this converted model with `deploykit calib`")
    for name, w in want.items():
        g = got.get(name)
        shape_differs = g is not None and w["shape"] is not None and list(g["shape"]) != list(w["shape"])
        if g is None or shape_differs or g["dtype"] != w["dtype"]:
            have = f"{g['dtype']}{list(g['shape'])}" if g else "nothing"
            takes = w["dtype"] + (str(list(w["shape"])) if w["shape"] is not None else "")
            raise InputError(f"calibration set {path} has {have} for input {name}, the model takes "
                             f"{takes}: it was made for another recipe or layout")


def _check_scale(path: Path, got, inputs: list[dict]) -> None:
    want = next((i.get("scale") for i in inputs if i["name"] == "pillars"), None)
    if want is None and got is None:
        return
    if want is None or got is None or not np.allclose(want, got):
        have = "raw pillar features" if got is None else f"pillars divided by {got}"
        takes = "raw ones" if want is None else f"them divided by {want} (the normalise_points pass)"
        raise InputError(f"calibration set {path} holds {have}, the model takes {takes}: make the set again "
                         "for this converted model with `deploykit calib`")


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
    from ..models import build_model, camera_config, lidar_config, make_sample, pillar_format
    from ..passes import apply_passes
    from ..preprocess.camera_inputs import synthetic_scene
    from ..preprocess.pillar_inputs import sample_inputs as pillar_inputs

    if samples < 1:
        raise InputError("--samples must be at least 1")
    camera, lidar = camera_config(recipe.model), lidar_config(recipe.model)
    if recipe.arch == "bevdepth":
        from ..preprocess.lss_inputs import synthetic_scene as key_frames

        rows = []
        for s in range(-(-samples // frames_per_scene)):
            rows += [(f.arrays(), f.scene, f.index)
                     for f in key_frames(camera, f"scene-{s:04d}", frames_per_scene, seed + s)]
        return write_calib_set(out, recipe.name, rows[:samples], temporal=True, overwrite=overwrite)
    # The engine's pillar format (layout, normalisation, decoration) depends on the passes, not on the weights.
    model = apply_passes(build_model(recipe), recipe.convert.passes)
    pillars = pillar_format(model) if lidar else None
    if camera is not None:
        rows = []
        for s in range(-(-samples // frames_per_scene)):
            for frame in synthetic_scene(camera, f"scene-{s:04d}", frames_per_scene, seed + s):
                # A fused model's LiDAR sweep of the same frame (the synthetic sensors are independent).
                sweep = pillar_inputs(lidar, seed + len(rows), *pillars).feeds if lidar else {}
                rows.append(({**frame.arrays(), **sweep}, frame.scene, frame.index))
        return write_calib_set(out, recipe.name, rows[:samples], temporal=True, overwrite=overwrite,
                               pillar_scale=pillars.scale if pillars else None)
    rows = [(make_sample(recipe, seed + i, model).feeds, f"sweep-{i:04d}", 0) for i in range(samples)]
    return write_calib_set(out, recipe.name, rows, temporal=False, overwrite=overwrite,
                           pillar_scale=pillars.scale if pillars else None)


def calib(recipe, out: str | Path, *, source: str | Path | None = None, samples: int = 16, frames_per_scene: int = 4,
          scenes: list[str] | None = None, overwrite: bool = False, quiet: bool = False) -> Path:
    """A calibration set from the recipe's synthetic generator, or from the user's data
    at ``source`` (point files, camera frames or a nuScenes-layout dataset; see
    deploykit.data.sources): ``samples`` frames spread over the data, for temporal models
    runs of ``frames_per_scene`` consecutive frames of a scene."""
    from ..recipe import Recipe, load_recipe

    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    if source is None:
        return build_calib_set(recipe, Path(out), samples=samples, frames_per_scene=frames_per_scene,
                               overwrite=overwrite)
    return build_calib_set_from_data(recipe, Path(out), source, samples=samples, frames_per_scene=frames_per_scene,
                                     scenes=scenes, overwrite=overwrite, quiet=quiet)


def pick_frames(frames: list, count: int, *, run: int = 1) -> list:
    """``count`` frames spread evenly over ``frames``; with ``run`` > 1, runs of that many
    consecutive frames of one scene (a run never crosses a scene), the runs spread evenly."""
    runs, current = [], []
    for f in frames:
        if current and (f.scene != current[-1].scene or len(current) == run):
            runs.append(current)
            current = []
        current.append(f)
    if current:
        runs.append(current)
    wanted = min(len(runs), -(-count // run))
    chosen = np.unique(np.linspace(0, len(runs) - 1, wanted).round().astype(int)) if wanted else []
    return [f for i in chosen for f in runs[i]][:count]


def build_calib_set_from_data(recipe, out: Path, source_path: str | Path, *, samples: int = 16,
                              frames_per_scene: int = 4, scenes: list[str] | None = None, overwrite: bool = False,
                              quiet: bool = False) -> Path:
    """Calibration samples from the user's frames, preprocessed as ``deploykit detect``
    does, with the frame each one is recorded so quantize can measure on others."""
    from ..camera.rig import load_rig
    from ..data.images import image_looks_like_noise
    from ..data.sources import camera_warnings, lidar_feeds, open_source, runner_frame
    from ..models import build_model, camera_config, lidar_config, pillar_format
    from ..passes import apply_passes
    from ..progress import grouped, print_warnings, track

    if samples < 1:
        raise InputError("--samples must be at least 1")
    ensure_writable(Path(out), overwrite=overwrite)
    source = open_source(source_path, recipe, scenes=scenes)
    camera, lidar = camera_config(recipe.model), lidar_config(recipe.model)
    temporal = camera is not None
    # The engine's pillar format depends on the passes, not on the weights.
    pillars = pillar_format(apply_passes(build_model(recipe), recipe.convert.passes) if lidar else None)
    picked = pick_frames(source.frames, samples, run=frames_per_scene if temporal else 1)
    warnings = camera_warnings(source) if temporal else []
    if len(picked) < samples:
        warnings.append(f"{source.path} has {len(source.frames)} frames, so the set has {len(picked)} samples, not "
                        f"{samples}")
    rows, origins, noisy = [], [], 0
    if temporal:
        rig = load_rig(camera.rig)
        for frame in track(picked, "reading camera frames", quiet=quiet, total=len(picked)):
            f, _, frame_warnings = runner_frame(frame, recipe.model, rig, pillars)  # a fused model's sweep too
            warnings += frame_warnings
            noisy += image_looks_like_noise(f.img[0, 0].transpose(1, 2, 0))
            rows.append((f.arrays(), frame.scene, frame.index))
            origins.append({"scene": frame.scene, "index": frame.index, "token": frame.token})
        rows = _renumber_runs(rows)
        if noisy * 2 >= len(rows):
            warnings.append(f"{noisy} of {len(rows)} calibration frames look like noise, not camera images (adjacent "
                            "pixels uncorrelated): ranges calibrated on them will not fit real images")
    else:
        for frame in track(picked, "voxelizing sweeps", quiet=quiet, total=len(picked)):
            feeds, _, frame_warnings = lidar_feeds(frame, recipe.model, pillars)
            warnings += frame_warnings
            rows.append((feeds, frame.token, 0))
            origins.append({"scene": frame.scene, "index": frame.index, "token": frame.token})
    print_warnings(warnings, where=f"{out}/calib.json")
    return write_calib_set(Path(out), recipe.name, rows, temporal=temporal, overwrite=overwrite,
                           source=source.describe(), origins=origins, warnings=grouped(warnings),
                           pillar_scale=pillars.scale)


def _renumber_runs(rows: list) -> list:
    """Each run of consecutive frames becomes its own calibration scene numbered 0, 1, ...:
    the set's order rules (deploykit.temporal) need a scene's frames to start at 0."""
    out, previous = [], None
    for arrays, scene, index in rows:
        if previous is None or previous[0] != scene or previous[1] != index - 1:
            run, start = f"{scene}@{index}", index
        out.append((arrays, run, index - start))
        previous = (scene, index)
    return out
