"""convert: checkpoint -> rewritten model -> static ONNX, checked against PyTorch.

Writes ``OUT/`` atomically (see deploykit.artifacts):

    model.onnx            static shapes, simplified, custom ops as deploykit::* nodes
    weights.safetensors   the rewritten model's weights
    inputs.npz            one realistic set of engine inputs (for bench and checks)
    check.json            ONNX Runtime vs the original PyTorch model, per output
    manifest.json         recipe, checkpoint sha256, passes, shapes, versions, timings

The numeric check compares the engine on its static inputs with the
*original* model (before any pass) on the original inputs (for pillar models
the unpadded pillars), so it proves the rewrites, the padding and the export
together; the original runs in float64 there, and the engine is judged against
float32's own noise (deploykit.noise_floor).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import platform
import shlex
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from . import __version__
from .artifacts import atomic_directory, ensure_writable, save_safetensors, sha256_file, write_json
from .camera.virtual_bev import coverage_warnings
from .checkpoint import load_state_dict, read_checkpoint
from .compare import OutputAgreement, compare_outputs
from .layerwise.profile import FLOAT_THRESHOLD
from .noise_floor import allowances, float64_outputs, judge, worst
from .errors import CheckFailedError, ExportError, InputError, RecipeError
from .models import build_model, camera_config, make_sample
from .passes import apply_passes
from .passes.sca_virtual_bev import coverage as virtual_bev_coverage
from .progress import Steps, console, print_warnings
from .recipe import Recipe, load_recipe
from .samples import Sample, torch_outputs
from .synthetic_checkpoint import default_checkpoint

CHECK_SEED = 1000  # sample scenes for the check; distinct from calibration seeds
STANDARD_OPS_FILE = "model.standard_ops.onnx"
TENSORRT_PLUGINS_FILE = "model.trt_plugins.onnx"


@dataclass
class ConvertResult:
    out_dir: Path
    manifest: dict[str, Any]
    check: dict[str, Any]


def load_model(recipe: Recipe, checkpoint: str | Path | dict | None) -> tuple[torch.nn.Module, Path, dict]:
    """The recipe's model with ``checkpoint``'s weights: one file, or for a fused model a
    {part: file} dict (deploykit.assemble). Returns (model, the file, its meta); for parts,
    the first part's file and meta {"parts": {part: {path, sha256}}, "assembly": [lines]}."""
    model = build_model(recipe)
    if isinstance(checkpoint, dict):
        return _assemble(recipe, model, checkpoint)
    path = Path(checkpoint) if checkpoint else default_checkpoint(recipe)
    state, meta = read_checkpoint(path)
    if recipe.arch == "bevfusion":
        from .assemble import fused_key_report
        from .checkpoint import compare_keys
        from .errors import CheckpointError

        if not compare_keys(state, model.state_dict()).ok:
            raise CheckpointError(fused_key_report(state, model.state_dict(), source=str(path), recipe=recipe.name))
    load_state_dict(model, state, source=str(path), recipe=recipe.name)
    return model.eval(), path, meta


def _assemble(recipe: Recipe, model, parts: dict) -> tuple[torch.nn.Module, Path, dict]:
    from .assemble import assemble
    from .errors import CheckpointError

    if recipe.arch != "bevfusion":
        raise CheckpointError(f"--checkpoint PART=PATH assembles a fused model from its streams; {recipe.name} is a "
                              f"{recipe.arch} model: give one checkpoint file")
    result = assemble(model, parts)
    load_state_dict(model, result.state, source=" + ".join(f"{k}={v}" for k, v in parts.items()),
                    recipe=recipe.name)
    meta = {"parts": {k: {"path": str(v), "sha256": sha256_file(v)} for k, v in parts.items()},
            "assembly": result.lines()}
    return model.eval(), Path(next(iter(parts.values()))), meta


def export_onnx(model: torch.nn.Module, feeds: dict[str, np.ndarray], path: Path, opset: int) -> None:
    # The exporter restores the module's train/eval mode afterwards, recursively:
    # a wrapper left in train mode would flip shared submodules' BatchNorms to
    # batch statistics. Deployment graphs are always eval graphs.
    model.eval()
    args = tuple(torch.from_numpy(feeds[name]) for name in model.input_names)
    with warnings.catch_warnings():
        # The TorchScript exporter warns about its own deprecation and about
        # shape-derived Python values it traces as constants; both are expected
        # for a static-shape export.
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(model, args, str(path), input_names=model.input_names,
                              output_names=model.output_names, opset_version=opset, dynamo=False,
                              do_constant_folding=True)
        except Exception as exc:  # noqa: BLE001 - exporter errors have no common type
            raise ExportError(f"torch.onnx.export failed: {str(exc).splitlines()[0][:300]}") from None


def simplify(path: Path) -> None:
    import onnxsim

    model = onnx.load(str(path))
    try:
        # onnxsim's C++ core prints a line for every node it declines to fold
        # (custom-domain nodes and everything downstream of them); harmless, and
        # hundreds of lines for a transformer, so it is kept off the terminal.
        with _native_output_silenced():
            simplified, _ = onnxsim.simplify(model)
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"onnxsim could not simplify the model: {str(exc).splitlines()[0][:300]}") from None
    onnx.save(simplified, str(path))


@contextlib.contextmanager
def _native_output_silenced():
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 1)
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def static_shape_problems(model: onnx.ModelProto) -> list[str]:
    problems = []
    for value in [*model.graph.input, *model.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if not dims or any(not d.HasField("dim_value") for d in dims):
            problems.append(value.name)
    return problems


def tensor_specs(model: onnx.ModelProto, values) -> list[dict]:
    return [{"name": v.name,
             "shape": [d.dim_value for d in v.type.tensor_type.shape.dim],
             "dtype": onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name}
            for v in values]


RIG_FILE = "rig.json"


def with_rig(recipe: Recipe, rig: str | Path | None) -> Recipe:
    """``recipe`` with its camera rig replaced (a rig file or bundled name), so no recipe
    has to be copied to change a rig."""
    if rig is None:
        return recipe
    from .camera.rig import rig_path
    from .models import camera_config

    camera = camera_config(recipe.model)
    if camera is None:
        raise RecipeError(f"{recipe.name} is a {recipe.arch} model without cameras; --rig is for camera models")
    camera = dataclasses.replace(camera, rig=str(rig_path(rig).resolve()))
    model = camera if camera_config(recipe.model) is recipe.model else dataclasses.replace(recipe.model, camera=camera)
    return dataclasses.replace(recipe, model=model)


def converted_rig(recipe: Recipe, converted: Path, manifest: dict) -> Recipe:
    """The recipe with the camera rig the model was converted with (its copy in the
    converted directory): the rig is a constant of the model, fixed at convert."""
    rig = manifest.get("rig")
    if not rig:
        return recipe
    return with_rig(recipe, Path(converted) / rig["file"])


def recipe_of_converted(converted: str | Path) -> Recipe:
    """The recipe a ``deploykit convert`` directory was made with, from its manifest (its
    file when it still exists, else the bundled recipe of that name), with the rig the
    model was converted with."""
    path = Path(converted) / "manifest.json"
    if not path.is_file():
        raise InputError(f"{converted} is not a `deploykit convert` output (no manifest.json); pass --recipe too")
    manifest = json.loads(path.read_text())
    named = manifest.get("recipe") or {}
    if not isinstance(named, dict) or not named.get("name"):
        raise InputError(f"{path} names no recipe; pass --recipe")
    recipe = load_recipe(named["path"] if named.get("path") and Path(named["path"]).is_file() else named["name"])
    return converted_rig(recipe, Path(converted), manifest)


def _pillars_entry(manifest: dict) -> dict:
    return next((i for i in manifest["inputs"] if i["name"] == "pillars"), {})


def input_layout(manifest: dict) -> str:
    """The pillar tensor layout a converted model takes ("PNC" for models without one)."""
    return _pillars_entry(manifest).get("layout") or "PNC"


def input_scale(manifest: dict) -> np.ndarray | None:
    """The per-channel divisor the host applies to a converted model's pillars (normalise_points), or None."""
    scale = _pillars_entry(manifest).get("scale")
    return None if scale is None else np.asarray(scale, np.float32)


def pillar_format(manifest: dict):
    """The PillarFormat of a converted model's pillar input, as deploykit.models.pillar_format
    gives it; manifests written before the decorate_in_graph pass existed say nothing of the
    decoration, and those engines take decorated pillars."""
    from .preprocess.pillar_inputs import PillarFormat

    return PillarFormat(input_layout(manifest), input_scale(manifest),
                        _pillars_entry(manifest).get("decoration") == "graph")


def convert(recipe: Recipe | str, out_dir: str | Path, *, checkpoint: str | Path | dict | None = None,
            passes: list[str] | None = None, overwrite: bool = False, custom_ops: str = "function",
            standard_ops: bool = False, tensorrt_plugins: bool = False, rig: str | Path | None = None,
            quiet: bool = False) -> ConvertResult:
    """``standard_ops`` also writes model.standard_ops.onnx: every deploykit::*
    node replaced by its lowering to standard ONNX ops, for runtimes that have
    no plugin or kernel for them; it is checked like model.onnx. ``tensorrt_plugins``
    also writes model.trt_plugins.onnx: model.onnx with plugin_namespace="deploykit"
    on every deploykit::* node, for TensorRT's ONNX parser with deploykit's Python
    plugins (plugins.trt.load()); the plugins' declared output shapes and dtypes are
    checked against the export (no TensorRT needed). ``rig`` replaces
    the recipe's camera rig; the one used is copied into OUT/rig.json. ``checkpoint``
    may be {"camera": path, "lidar": path, "fused": path} for a fused model."""
    from .engines import ort as ort_engine

    recipe = with_rig(recipe if isinstance(recipe, Recipe) else load_recipe(recipe), rig)
    passes = list(recipe.convert.passes if passes is None else passes)
    out_dir = Path(out_dir)
    ensure_writable(out_dir, overwrite=overwrite)
    steps = Steps(6, quiet=quiet)

    with steps.step(f"load {recipe.name} checkpoint"):
        original, ckpt_path, ckpt_meta = load_model(recipe, checkpoint)
    for line in ckpt_meta.get("assembly", []) if not quiet else []:
        console().print(f"  {line}", soft_wrap=True)
    coverage = original.rig_coverage() if hasattr(original, "rig_coverage") else None
    print_warnings(coverage_warnings(coverage or {}))
    if ckpt_meta.get("synthetic"):
        # Printed even with quiet: numbers measured on stand-in weights must never pass for a real model's.
        console().print(f"[yellow]note:[/yellow] {recipe.name} runs on deterministic synthetic weights "
                        f"({ckpt_path.name}), not a trained model: its detections are meaningless; pass "
                        "--checkpoint for your own", soft_wrap=True)
    with steps.step(f"apply {len(passes)} rewrite passes, run PyTorch reference"):
        model = apply_passes(original, passes).eval()
        samples = [make_sample(recipe, CHECK_SEED + i, model) for i in range(recipe.check.samples)]
        references = [torch_outputs(original, s.reference) for s in samples]
        # The float64 original is the reference; float32 PyTorch's error against it is the noise floor.
        exact = float64_outputs(original, samples)
        noise = {a.name: a.max_rel_error for a in _agreements(exact, references)} if exact else \
            {name: 0.0 for name in references[0]}
        references = exact or references
        allowed = allowances(recipe.check, noise)
        torch_check = _agreements(references, [torch_outputs(model, s.feeds) for s in samples])
    with atomic_directory(out_dir, overwrite=overwrite) as scratch:
        onnx_path = scratch / "model.onnx"
        with steps.step(f"export ONNX (opset {recipe.convert.opset})"):
            export_onnx(model, samples[0].feeds, onnx_path, recipe.convert.opset)
        with steps.step("simplify (onnxsim)" if recipe.convert.simplify else "simplify (skipped)"):
            if recipe.convert.simplify:
                simplify(onnx_path)
            exported = onnx.load(str(onnx_path))
            dynamic = static_shape_problems(exported)
            if dynamic:
                raise ExportError(f"exported graph has non-static shapes on {', '.join(dynamic)}")
        with steps.step(f"check ONNX Runtime against PyTorch on {len(samples)} samples"):
            engine = ort_engine.build(onnx_path, custom_ops=custom_ops)
            ort_check = _agreements(references, [engine.run(s.feeds) for s in samples])
            check = _check_report(recipe, torch_check, ort_check, samples, custom_ops, noise, allowed,
                                  float64=exact is not None)
            if standard_ops and ort_engine.custom_nodes(exported):
                std = _write_standard_ops(exported, scratch / STANDARD_OPS_FILE, references, samples)
                check["standard_ops"] = {"file": STANDARD_OPS_FILE, **judge(std, allowed, recipe.check.min_cosine)}
                check["passed"] = check["passed"] and check["standard_ops"]["passed"]
                ort_check = ort_check + std
            if tensorrt_plugins and ort_engine.custom_nodes(exported):
                from .engines.tensorrt_plugins import check_plugins, with_plugin_attributes

                problems = check_plugins(exported)
                if problems:
                    raise ExportError(f"deploykit's TensorRT plugins do not fit the exported graph: {problems[0]}")
                onnx.save(with_plugin_attributes(exported), str(scratch / TENSORRT_PLUGINS_FILE))
                check["tensorrt_plugins"] = {"file": TENSORRT_PLUGINS_FILE, "declared_outputs_match": True}
            write_json(scratch / "check.json", check)
            if not check["passed"]:
                bad = worst(ort_check + torch_check, allowed)
                versus = "the float64 original" if exact else "PyTorch"
                # What was built stays readable by `deploykit compare`: weights and manifest too.
                _write_model_files(scratch, recipe, model, ckpt_path, ckpt_meta, passes, exported, samples,
                                   steps.timings, custom_ops, check, coverage, passed=False)
                where = _first_divergence(original, samples[:1], onnx_path, custom_ops, scratch,
                                          max(FLOAT_THRESHOLD, min(allowed.values())))
                failed = _failed_dir(out_dir)
                raise CheckFailedError(
                    f"{bad.name} differs from {versus} by {bad.max_rel_error:.2e} relative (cosine {bad.cosine:.6f}); "
                    f"allowed {allowed[bad.name]:.1e}: {recipe.check.noise_factor:g}x float32 PyTorch's own "
                    f"{noise[bad.name]:.1e}, at least [check] max_rel_error {recipe.check.max_rel_error:.0e}"
                    + _cap_hint(model) + f"; {where}; what was built is kept in {_keep_failed(scratch, out_dir)}"
                    f"; reproduce: deploykit compare {shlex.quote(f'{failed}:torch')} {shlex.quote(str(failed))} "
                    f"--report {shlex.quote(f'{failed}.compare')}"
                )
        with steps.step("write weights, sample inputs and manifest"):
            manifest = _write_model_files(scratch, recipe, model, ckpt_path, ckpt_meta, passes, exported, samples,
                                          steps.timings, custom_ops, check, coverage)
    return ConvertResult(out_dir, manifest, check)


def _write_model_files(scratch: Path, recipe, model, ckpt_path, ckpt_meta, passes, exported, samples, timings,
                       custom_ops, check, coverage, passed: bool = True) -> dict:
    save_safetensors(model.state_dict(), scratch / "weights.safetensors")
    np.savez(scratch / "inputs.npz", **samples[0].feeds)
    manifest = _manifest(recipe, model, ckpt_path, ckpt_meta, passes, exported, samples[0], timings, custom_ops)
    if not passed:
        manifest["check_passed"] = False  # `quantize` refuses it; `compare` reads it
    if "standard_ops" in check:
        manifest["onnx"]["standard_ops_file"] = STANDARD_OPS_FILE
    if "tensorrt_plugins" in check:
        manifest["onnx"]["tensorrt_plugins_file"] = TENSORRT_PLUGINS_FILE
    if coverage is not None:
        from .camera.rig import rig_path

        source = rig_path(camera_config(recipe.model).rig)
        shutil.copyfile(source, scratch / RIG_FILE)
        manifest["rig"] = {"file": RIG_FILE, "source": str(source), "sha256": sha256_file(source),
                           "bev_coverage": coverage}
    write_json(scratch / "manifest.json", manifest)
    return manifest


def _first_divergence(original, samples, onnx_path: Path, custom_ops: str, scratch: Path, threshold: float) -> str:
    """Where the engine parts ways with the original model, layer by layer (compare.md beside it)."""
    from .layerwise import onnx_taps, profile_layers, torch_taps
    from .layerwise.report import write_files

    try:
        profile = profile_layers([torch_taps.record(original, s.reference) for s in samples],
                                 onnx_taps.record(onnx_path, [s.feeds for s in samples], custom_ops=custom_ops),
                                 a="original (PyTorch)", b="model.onnx", threshold=threshold)
        write_files(profile, scratch)
    except Exception as exc:  # noqa: BLE001 - the check's verdict must not be lost to its diagnosis
        return f"layer-wise compare failed ({type(exc).__name__}: {str(exc)[:120]})"
    first = profile.first_divergence
    if first is None:
        return (f"no single layer is past {threshold:.0e} relative RMS error (the error is spread: "
                "compare.md lists every layer)")
    return f"first diverging layer: {first.name} (relative RMS error {first.error:.2e}, compare.md lists every layer)"


def _failed_dir(out_dir: Path) -> Path:
    return out_dir.with_name(out_dir.name + ".check-failed")


def _keep_failed(scratch: Path, out_dir: Path) -> Path:
    """Copy what a failed check built (the ONNX files, check.json) to ``<out>.check-failed``
    beside ``--out``, never at it: ``--out`` only ever holds a model that passed."""
    failed = _failed_dir(out_dir)
    with atomic_directory(failed, overwrite=True) as keep:
        for f in scratch.iterdir():
            if f.is_file():
                shutil.copy2(f, keep / f.name)
    return failed


def _write_standard_ops(exported: onnx.ModelProto, path: Path, references, samples) -> list[OutputAgreement]:
    from .engines import ort as ort_engine

    onnx.save(ort_engine.prepare(exported, "inline"), str(path))
    plain = ort_engine.build(path)
    return _agreements(references, [plain.run(s.feeds) for s in samples])


def _cap_hint(model) -> str:
    cov = virtual_bev_coverage(model)
    if not cov or cov["hits_kept"] == cov["camera_pillar_hits"]:
        return ""
    dropped = cov["camera_pillar_hits"] - cov["hits_kept"]
    return (f". The virtual-BEV cap drops {dropped} of {cov['camera_pillar_hits']} camera-pillar pairs "
            f"({cov['pillars_losing_a_camera']} pillars lose a camera), which changes the BEV by design: "
            "raise [model.virtual_bev] max_numcam_overlap, or relax [check] if the deviation is acceptable")


def _agreements(references: list[dict], candidates: list[dict]) -> list[OutputAgreement]:
    """Per output, the worst figures over all samples."""
    per_output: dict[str, list[OutputAgreement]] = {}
    for ref, cand in zip(references, candidates):
        for a in compare_outputs(ref, cand):
            per_output.setdefault(a.name, []).append(a)
    return [OutputAgreement(name, max(a.max_abs_error for a in items), max(a.max_rel_error for a in items),
                            min(a.cosine for a in items))
            for name, items in per_output.items()]


def _check_report(recipe: Recipe, torch_check, ort_check, samples: list[Sample], custom_ops: str,
                  noise: dict[str, float], allowed: dict[str, float], *, float64: bool) -> dict:
    tol = recipe.check
    rewritten = judge(torch_check, allowed, tol.min_cosine)
    engine = judge(ort_check, allowed, tol.min_cosine)
    reference = "original PyTorch model (no passes) on its own inputs (e.g. unpadded pillars)"
    return {
        "reference": reference + (", in float64" if float64 else ", in float32 (it cannot run in float64)"),
        "tolerance": {"max_rel_error": tol.max_rel_error, "min_cosine": tol.min_cosine,
                      "noise_factor": tol.noise_factor, "max_rel_error_ceiling": tol.max_rel_error_ceiling},
        # float32 PyTorch (the original model) against the float64 reference, per output
        "float32_noise": noise,
        "samples": [s.info for s in samples],
        "rewritten_pytorch": rewritten,
        "onnxruntime": {**engine, "custom_ops": custom_ops},
        "passed": rewritten["passed"] and engine["passed"],
    }


def _pillar_spec(model) -> dict:
    from .models import pillar_format

    layout, scale, in_graph = pillar_format(model)
    return {"layout": layout, "decoration": "graph" if in_graph else "host",
            **({"scale": [float(s) for s in scale]} if scale is not None else {})}


def _manifest(recipe, model, ckpt_path: Path, ckpt_meta: dict, passes, exported: onnx.ModelProto,
              sample: Sample, timings: dict, custom_ops: str) -> dict:
    import onnxruntime
    import onnxsim

    from .ops import DOMAIN

    custom = {}
    for node in exported.graph.node:
        if node.domain == DOMAIN:
            custom[node.op_type] = custom.get(node.op_type, 0) + 1
    return {
        "deploykit": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "stage": "convert",
        "recipe": {"name": recipe.name, "path": str(recipe.path) if recipe.path else None,
                   "config": recipe.to_dict()},
        "checkpoint": {"path": str(ckpt_path), "sha256": sha256_file(ckpt_path), "meta": ckpt_meta},
        "passes": passes,
        "onnx": {"file": "model.onnx", "opset": recipe.convert.opset, "simplified": recipe.convert.simplify,
                 "custom_ops": [{"domain": DOMAIN, "op_type": k, "count": v} for k, v in custom.items()],
                 "nodes": len(exported.graph.node)},
        "inputs": [{**spec, **(_pillar_spec(model) if spec["name"] == "pillars" else {})}
                   for spec in tensor_specs(exported, exported.graph.input)],
        "outputs": tensor_specs(exported, exported.graph.output),
        "sample": {"file": "inputs.npz", **sample.info},
        "engine_check": {"backend": "onnxruntime", "custom_ops": custom_ops, "file": "check.json"},
        **({"virtual_bev": cov} if (cov := virtual_bev_coverage(model)) else {}),
        "timings_s": timings,
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "onnx": onnx.__version__,
                     "onnxruntime": onnxruntime.__version__, "onnxsim": onnxsim.__version__,
                     "numpy": np.__version__},
    }
