"""Recipes: one TOML file per deployable model.

A recipe names the architecture and its sizes, the input shapes, which rewrite
passes to run and the tolerances the result must meet. It is plain data: the
loader turns it into frozen dataclasses and rejects any field it does not know,
suggesting the closest valid name, so a typo never silently falls back to a
default.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import RecipeError

REPO_ROOT = Path(__file__).resolve().parent.parent
RECIPES_DIR = REPO_ROOT / "recipes"


@dataclass(frozen=True)
class CheckpointSpec:
    # "synthetic" means: generate deterministic weights from `seed` (no download
    # needed); anything else is a path, relative to the repository root.
    default: str = "synthetic"
    seed: int = 0


@dataclass(frozen=True)
class ConvertSpec:
    passes: tuple[str, ...] = ()
    opset: int = 17
    simplify: bool = True


@dataclass(frozen=True)
class CheckSpec:
    # Max |engine - reference| divided by max |reference| per output: scale-free, so one
    # number serves heatmaps and regressions alike. The reference is the original model in
    # float64; an output may also err by noise_factor x PyTorch float32's own error against
    # it (deploykit.noise_floor), capped at max_rel_error_ceiling when that is > 0.
    max_rel_error: float = 1e-4
    min_cosine: float = 0.99999
    samples: int = 2
    noise_factor: float = 4.0
    max_rel_error_ceiling: float = 0.0


@dataclass(frozen=True)
class QuantizeSpec:
    # Activation range calibrator: max, percentile, entropy or mse (weights: per-channel max).
    calibrator: str = "max"
    # Per-quantizer exceptions, pattern -> calibrator: e.g. raw network inputs (pillar
    # coordinates in metres) want "max", where entropy would clip them.
    calibrator_overrides: dict[str, str] = field(default_factory=dict)
    # Shell-style patterns of quantizer names lifted to int16 (see `deploykit quantize --list`).
    int16: tuple[str, ...] = ()
    calib_samples: int = 16
    frames_per_scene: int = 4
    # --int16-sensitive: lift modules to int16 until the worst output's SQNR against
    # the float model reaches this, using at most this many modules.
    target_sqnr_db: float = 30.0
    int16_budget: int = 8
    # ...and whose extra bit-operations (MACs x weight bits x activation bits) are at most this
    # fraction of the all-int8 model's (0.05: 5% more; 0 = no cost budget). See sensitivity.md's
    # fidelity-against-cost section for what each set costs.
    int16_cost_budget: float = 0.0
    # Shell-style patterns of the outputs that target counts (default: all). Leave out
    # outputs nobody reads: near-zero ones have a meaningless SQNR (e.g. velocity
    # from a model trained on single sweeps).
    target_outputs: tuple[str, ...] = ()
    # Where the architecture can label its synthetic samples (CenterPoint on ray-cast
    # scenes): score float, int8 and int8 + int16 in nuScenes-style mAP on this many
    # held-out scenes. 0 = off; worth it only for a recipe with trained weights.
    eval_scenes: int = 0

    def __post_init__(self):
        methods = ("max", "percentile", "entropy", "mse")
        for name in (self.calibrator, *self.calibrator_overrides.values()):
            if name not in methods:
                raise ValueError(f"calibrator '{name}' is not one of {', '.join(methods)}")
        if self.calib_samples < 1 or self.frames_per_scene < 1:
            raise ValueError("calib_samples and frames_per_scene must be at least 1")
        if self.eval_scenes < 0:
            raise ValueError("eval_scenes must be 0 (off) or more")
        if self.int16_budget < 0 or self.int16_cost_budget < 0:
            raise ValueError("int16_budget and int16_cost_budget must be 0 or more")


@dataclass(frozen=True)
class GateSpec:
    # `deploykit gate`: fail when the candidate's latency ratio to the baseline is
    # confidently above 1 + this (the whole 95% interval beyond it)...
    max_latency_regression: float = 0.05
    # ...or its worst output SQNR fell by more than this many dB, or its mAP by more than this.
    max_sqnr_drop_db: float = 1.0
    max_map_drop: float = 0.01
    max_miou_drop: float = 0.01
    # Interleaved rounds per measurement; an inconclusive verdict measures again, up to 3 times.
    rounds: int = 30

    def __post_init__(self):
        if self.max_latency_regression <= 0 or self.rounds < 5:
            raise ValueError("max_latency_regression must be > 0 and rounds at least 5")


@dataclass(frozen=True)
class Recipe:
    name: str
    model: Any  # the architecture's config dataclass, see deploykit.models.ARCHITECTURES
    description: str = ""
    checkpoint: CheckpointSpec = CheckpointSpec()
    convert: ConvertSpec = ConvertSpec()
    check: CheckSpec = CheckSpec()
    quantize: QuantizeSpec = QuantizeSpec()
    gate: GateSpec = GateSpec()
    path: Path | None = field(default=None, compare=False)

    @property
    def arch(self) -> str:
        return self.model.arch

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("path")
        return data


def resolve_recipe_path(name_or_path: str | Path) -> Path:
    """Accept `recipes/x.toml`, `x.toml`, `recipes/x` or just `x`."""
    candidates = [Path(name_or_path)]
    p = Path(name_or_path)
    if p.suffix != ".toml":
        candidates.append(p.with_suffix(".toml"))
    candidates += [RECIPES_DIR / c.name for c in list(candidates)]
    for c in candidates:
        if c.is_file():
            return c
    known = sorted(x.stem for x in RECIPES_DIR.glob("*.toml"))
    hint = difflib.get_close_matches(p.stem, known, n=1)
    msg = f"recipe '{name_or_path}' not found"
    msg += f"; did you mean '{hint[0]}'?" if hint else f"; available: {', '.join(known)}"
    raise RecipeError(msg)


def load_recipe(name_or_path: str | Path) -> Recipe:
    path = resolve_recipe_path(name_or_path)
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"{path}: not valid TOML: {exc}") from None
    return recipe_from_dict(data, source=str(path), path=path)


def recipe_from_dict(data: dict[str, Any], *, source: str = "recipe", path: Path | None = None) -> Recipe:
    from .models import ARCHITECTURES

    data = dict(data)
    model = data.pop("model", None)
    if not isinstance(model, dict) or "arch" not in model:
        raise RecipeError(f"{source}: needs a [model] table with an 'arch' field")
    model = dict(model)
    arch = model.pop("arch")
    if arch not in ARCHITECTURES:
        raise RecipeError(
            f"{source}: unknown model.arch '{arch}'{_suggest(arch, ARCHITECTURES)}"
        )
    config_cls = ARCHITECTURES[arch].config
    model_cfg = from_dict(config_cls, model, f"{source}: model")
    rest = from_dict(_RecipeFields, data, source)
    return Recipe(model=model_cfg, path=path, **{f.name: getattr(rest, f.name) for f in dataclasses.fields(rest)})


@dataclass(frozen=True)
class _RecipeFields:
    name: str
    description: str = ""
    checkpoint: CheckpointSpec = CheckpointSpec()
    convert: ConvertSpec = ConvertSpec()
    check: CheckSpec = CheckSpec()
    quantize: QuantizeSpec = QuantizeSpec()
    gate: GateSpec = GateSpec()


def from_dict(cls: type, data: Any, where: str) -> Any:
    """Build dataclass ``cls`` from TOML data, strictly.

    Unknown keys, missing required keys and wrong types are all RecipeErrors
    that name the field, so the user sees exactly which line to fix.
    """
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: expected a table, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init and f.name != "path"}
    for key in data:
        if key not in fields:
            raise RecipeError(f"{where}: unknown field '{key}'{_suggest(key, fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], f"{where}.{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise RecipeError(f"{where}: missing required field '{name}'")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise RecipeError(f"{where}: {exc}") from None


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in args:
            try:
                return _convert(option, value, where)
            except RecipeError as exc:
                errors.append(str(exc))
        raise RecipeError(errors[0])
    if tp is type(None):
        if value is not None:
            raise RecipeError(f"{where}: expected nothing, got {value!r}")
        return None
    if origin is tuple:
        if not isinstance(value, list):
            raise RecipeError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise RecipeError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(_convert(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: expected a table, got {value!r}")
        return {k: _convert(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp in (int, str, bool):
        if type(value) is not tp:
            raise RecipeError(f"{where}: expected {tp.__name__}, got {value!r}")
        return value
    if tp is Any:
        return value
    raise RecipeError(f"{where}: unsupported field type {tp}")


def _suggest(word: str, options: Any) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else f" (valid: {', '.join(sorted(options))})"
