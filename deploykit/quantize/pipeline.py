"""quantize: converted model + calibration set -> calibrated fake-quant model and its fidelity.

Reads what ``deploykit convert`` wrote (the rewritten model's weights and
manifest), folds BatchNorm into the convolutions (the weights an int8
accelerator runs), inserts quantizers, calibrates them on the calibration set (for
temporal models frame by frame in scene order, carrying the previous BEV),
lifts the recipe's int16 patterns, and measures the outputs against the float
model on the check samples, for int8 everywhere and for int8 + int16. Writes
``OUT/`` atomically:

    model.int8.qdq.onnx      int8 Q/DQ everywhere (the recipe's opset)
    model.qdq.onnx           int8 + the int16 overrides (opset 21), when there are any
    model.trt.qdq.onnx       TensorRT flavour: int16 regions as float islands, one Q/DQ pair
                             per tensor, shared scales on Add/Concat inputs
    model.ort.int8.qdq.onnx  ONNX Runtime flavour of model.int8.qdq.onnx: Q/DQ placed so ORT
                             fuses its int8 kernels (QLinearConv, ...), uint8 activations
    model.ort.qdq.onnx       the same of model.qdq.onnx, when there are int16 overrides
    quant_state.safetensors  float weights + every quantizer's amax
    quantizers.json          name, bits, axis, calibrator and range of each quantizer
    fidelity.json / .md      SQNR, cosine and max error per output, int8 and int8+int16, and
                             per layer (where the error enters and grows; deploykit.layerwise)
    layers.png               SQNR along depth, int8 and int8+int16
    manifest.json            recipe, source model, calibration set, overrides, versions
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import __version__
from ..artifacts import atomic_directory, ensure_writable, save_safetensors, sha256_file, write_json
from ..checkpoint import load_state_dict
from ..detection.agreement import agreement
from ..errors import InputError, RecipeError
from ..export import CHECK_SEED, converted_rig, recipe_of_converted
from ..models import ARCHITECTURES, build_model, make_sample
from ..passes import apply_passes
from ..progress import Steps, print_warnings
from ..recipe import REPO_ROOT, Recipe, load_recipe
from ..samples import torch_outputs
from ..layerwise import profile_layers, torch_taps
from ..layerwise.report import quantization_markdown, quantization_plot
from .calib_set import CalibSet, build_calib_set, load_calib_set
from .calibrate import calibrate
from .cost import measure_macs
from .fidelity import fidelity
from .fold_bn import fold_batchnorms
from .insert import insert_quantizers, match_patterns, quantizers, set_bits, set_mode
from .parallel import evaluator, frame_predictions, labelled_scene_outputs
from .pareto import plot as pareto_plot
from .sensitivity import group_modules, raise_if_unmet, search_int16
from .user_data import held_out, score_nds
from .sensitivity import markdown as sensitivity_markdown
from .sensitivity import plot as sensitivity_plot

CALIB_CACHE = REPO_ROOT / ".cache" / "calib"
SEARCH_SEED = 1100  # samples the int16 search chooses on
TRT_FILE = "model.trt.qdq.onnx"
# ONNX Runtime flavours (ort_flavour) of model.int8.qdq.onnx and model.qdq.onnx
LAYER_SAMPLES = 2  # check samples the per-layer profile pools over (it holds every layer's output)
ORT_FILES = {"int8": "model.ort.int8.qdq.onnx", "int8_int16": "model.ort.qdq.onnx"}


@dataclass
class QuantizeResult:
    out_dir: Path
    fidelity: dict
    warnings: list[str]


def load_converted(recipe: Recipe, converted: Path, *, allow_failed: bool = False) -> tuple[torch.nn.Module, dict]:
    """The rewritten model and manifest a convert directory holds; ``allow_failed`` also reads
    the ``<out>.check-failed`` directory a failed check leaves (for ``compare``)."""
    converted = Path(converted)
    path = converted / "manifest.json"
    if not path.is_file():
        raise InputError(f"{converted} is not a `deploykit convert` output (no manifest.json)")
    manifest = json.loads(path.read_text())
    if manifest.get("check_passed") is False and not allow_failed:
        raise InputError(f"{converted} is what a failed `deploykit convert` check left: its engine disagrees with "
                         "the original model; fix the rewrite (`deploykit compare DIR:torch DIR` shows where)")
    if manifest.get("recipe", {}).get("name") != recipe.name:
        raise InputError(f"{converted} was converted with recipe {manifest.get('recipe', {}).get('name')!r}, "
                         f"not {recipe.name!r}")
    from safetensors.torch import load_file

    recipe = converted_rig(recipe, converted, manifest)
    model = apply_passes(build_model(recipe), manifest["passes"]).eval()
    load_state_dict(model, load_file(str(converted / "weights.safetensors")), source=str(converted),
                    recipe=recipe.name)
    return model, manifest


def check_rig(converted: Path, manifest: dict, rig: str | Path | None) -> None:
    """``--rig`` on quantize must be the rig the model was converted with."""
    if rig is None:
        return
    from ..camera.rig import rig_path

    if not manifest.get("rig"):
        raise InputError(f"{converted} is a model without cameras; --rig is for camera models")
    if sha256_file(rig_path(rig)) != manifest["rig"]["sha256"]:
        raise InputError(f"--rig {rig} is not the rig {converted} was converted with ({manifest['rig']['source']}): "
                         "the rig is built into the model; convert again with `deploykit convert --rig`")


def default_calib_set(recipe: Recipe, passes: list[str] | None = None) -> Path:
    """The recipe's bundled calibration set (synthetic), generated into .cache/ on first use,
    for a model converted with ``passes`` (default: the recipe's)."""
    if passes is not None:
        recipe = dataclasses.replace(recipe, convert=dataclasses.replace(recipe.convert, passes=tuple(passes)))
    spec = recipe.quantize
    # The passes decide the engine's pillar format (layout, normalisation), so they key the cache.
    passes = hashlib.sha256(",".join(recipe.convert.passes).encode()).hexdigest()[:8]
    path = CALIB_CACHE / f"{recipe.name}-n{spec.calib_samples}-f{spec.frames_per_scene}-{passes}"
    if not path.exists():
        build_calib_set(recipe, path, samples=spec.calib_samples, frames_per_scene=spec.frames_per_scene)
    return path


def quantize(recipe: Recipe | str | None, converted: str | Path, out: str | Path, *, calib: str | Path | None = None,
             int16: tuple[str, ...] = (), int16_sensitive: bool = False, eval_scenes: int | None = None,
             rig: str | Path | None = None, overwrite: bool = False, quiet: bool = False,
             workers: int | None = None, ray_address: str | None = None, latency_cost: bool = False) -> QuantizeResult:
    """``workers`` > 1 runs calibration, the int16 search and the mAP scoring on a local Ray
    instance of that many workers, ``ray_address`` on an existing cluster (Ray is an optional
    extra); the results are the serial ones (deploykit.quantize.parallel). ``latency_cost``
    (with ``int16_sensitive``) times the int16 sets of the search's Pareto front in ONNX
    Runtime (deploykit.quantize.latency_cost).
    """
    from ..distributed import worker_pool

    with worker_pool(workers, ray_address) as pool:
        return _quantize(recipe, converted, out, calib=calib, int16=int16, int16_sensitive=int16_sensitive,
                         eval_scenes=eval_scenes, rig=rig, overwrite=overwrite, quiet=quiet, pool=pool,
                         latency_cost=latency_cost)


def _quantize(recipe: Recipe | str | None, converted: str | Path, out: str | Path, *, calib: str | Path | None,
              int16: tuple[str, ...], int16_sensitive: bool, eval_scenes: int | None, rig: str | Path | None,
              overwrite: bool, quiet: bool, pool, latency_cost: bool = False) -> QuantizeResult:
    """``recipe`` None takes the one the converted directory's manifest names.
    ``int16_sensitive`` replaces the recipe's hand-written int16 patterns with the
    smallest set of modules, ranked by measured sensitivity, that meets
    ``[quantize] target_sqnr_db`` within ``int16_budget`` modules (see
    deploykit.quantize.sensitivity); ``int16`` patterns are added either way.
    ``eval_scenes`` overrides the recipe's number of labelled scenes scored in mAP (0 skips it).
    ``rig``, when given, must be the rig the model was converted with (it is a constant of the model)."""
    recipe = recipe_of_converted(converted) if recipe is None else recipe
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    if eval_scenes is not None:
        if eval_scenes < 0:
            raise InputError(f"eval_scenes must be 0 (skip) or more, got {eval_scenes}")
        recipe = dataclasses.replace(recipe, quantize=dataclasses.replace(recipe.quantize, eval_scenes=eval_scenes))
    out = Path(out)
    ensure_writable(out, overwrite=overwrite)
    calib_path = Path(calib) if calib else None
    # User data (a set from `deploykit calib --from`) is scored on its own held-out frames,
    # with its annotations; the recipe's synthetic eval_scenes apply to synthetic sets only.
    user_source = load_calib_set(calib_path).source if calib_path is not None else None
    synthetic_eval = 0 if user_source else recipe.quantize.eval_scenes
    user_eval = bool(user_source and user_source.get("ground_truth") and eval_scenes != 0)
    if latency_cost and not int16_sensitive:
        raise InputError("--latency-cost times the int16 sets the sensitivity search measured: add --int16-sensitive")
    steps = Steps(5 + bool(int16_sensitive) + bool(synthetic_eval) + bool(user_source) + user_eval + latency_cost,
                  quiet=quiet)
    if synthetic_eval and ARCHITECTURES[recipe.arch].labelled_scenes is None:
        raise RecipeError(f"{recipe.name}: [quantize] eval_scenes needs ground truth, which the {recipe.arch} "
                          "sample generator cannot label; set eval_scenes = 0, or calibrate on annotated data "
                          "(`deploykit calib --from NUSCENES_DIR`)")
    with steps.step(f"load converted {recipe.name} and the calibration set"):
        model, manifest = load_converted(recipe, Path(converted))
        check_rig(Path(converted), manifest, rig)
        recipe = converted_rig(recipe, Path(converted), manifest)  # as load_converted built the model
        target_outputs = _target_outputs(recipe, model)
        calib_path = calib_path or default_calib_set(recipe, manifest["passes"])
        inputs = [{k: i[k] for k in ("name", "shape", "dtype", "scale") if k in i} for i in manifest["inputs"]]
        from ..temporal import runner_type

        calib_set = load_calib_set(calib_path, recipe=recipe.name, inputs=inputs, runner=runner_type(recipe.model))
        data = held_out(calib_set, recipe, manifest)
    with steps.step(f"calibrate {recipe.quantize.calibrator} ranges on {len(calib_set)} samples"):
        folded, num_folded = fold_batchnorms(model)
        qmodel = insert_quantizers(folded, recipe.quantize.calibrator, recipe.quantize.calibrator_overrides)
        suspects: list[str] = []
        output_ranges: dict = {}
        unused = calibrate(qmodel, recipe, calib_set, quiet=quiet, suspects=suspects, output_ranges=output_ranges,
                           pool=pool)
        active = [n for n in quantizers(qmodel) if n not in unused]
    patterns = (() if int16_sensitive else tuple(recipe.quantize.int16)) + tuple(int16)
    matches, warnings = match_patterns(qmodel, patterns)
    print_warnings(warnings)  # never quiet: a pattern matching nothing changes what is quantized
    lifted = sorted({n for names in matches.values() for n in names})
    if data is not None:
        with steps.step(f"read held-out frames of {data.source.path}"):
            samples = data.samples(model)
        measured_on = {"source": str(data.source.path), "kind": data.source.kind, "frames": [s.info for s in samples]}
    else:
        samples = [make_sample(recipe, CHECK_SEED + i, model) for i in range(recipe.check.samples)]
        measured_on = {"source": "synthetic", "seeds": [CHECK_SEED + i for i in range(recipe.check.samples)]}
    search = None
    if int16_sensitive:
        spec = recipe.quantize
        with steps.step(f"measure int16 sensitivity of {len(group_modules(active))} modules"):
            # Separate samples from the check ones, so the reported fidelity is not the one optimised.
            if data is not None:
                chooser = data.samples(model, exclude={s.info["token"] for s in samples}) or samples
            else:
                chooser = [make_sample(recipe, SEARCH_SEED + i, model) for i in range(recipe.check.samples)]
            chooser_refs = [torch_outputs(model, s.feeds) for s in chooser]
            cost = measure_macs(qmodel, chooser[0].feeds, group_modules(active))
            search = search_int16(qmodel, active, chooser, chooser_refs,
                                  target_db=spec.target_sqnr_db, budget=spec.int16_budget,
                                  outputs=target_outputs, quiet=quiet,
                                  evaluate=evaluator(pool, qmodel, chooser, chooser_refs, target_outputs),
                                  cost=cost, cost_budget=spec.int16_cost_budget)
            search.stages = ARCHITECTURES[recipe.arch].stages
            raise_if_unmet(search)
        lifted = sorted(set(lifted) | set(search.chosen_quantizers()))
    configurations = [("int8", [])] + ([("int8_int16", lifted)] if lifted else [])
    with steps.step(f"measure fidelity: int8, int8 + {len(lifted)} int16 quantizers"):
        references = [torch_outputs(model, s.feeds) for s in samples]
        set_mode(qmodel, "quant", active)
        decode = ARCHITECTURES[recipe.arch].decode
        float_boxes = [decode(recipe.model, r) for r in references]
        layers: dict = {}
        report, detection, fake = {"target_outputs": target_outputs or list(model.output_names),
                                   "measured_on": measured_on}, {}, {}
        float_layers = [torch_taps.record(model, s.feeds) for s in samples[:LAYER_SAMPLES]]
        for key, names16 in configurations:
            set_bits(qmodel, lifted, 8)
            set_bits(qmodel, names16, 16)
            fake[key] = [torch_outputs(qmodel, s.feeds) for s in samples]
            report[key] = [f.to_dict() for f in fidelity(references, fake[key])]
            detection[key] = agreement(float_boxes, [decode(recipe.model, o) for o in fake[key]])
            layers[key] = profile_layers(float_layers, [torch_taps.record(qmodel, s.feeds)
                                                        for s in samples[:LAYER_SAMPLES]],
                                         a="float", b=key, b_quantized=True)
        del float_layers
        report["detection_agreement"] = detection
        report["layers"] = {key: p.to_dict() for key, p in layers.items()}
    if synthetic_eval:
        with steps.step(f"score float and quantized models in mAP on {synthetic_eval} labelled scenes"):
            report["task_map"] = _task_map(recipe, model, qmodel, lifted, configurations, pool)
    if user_eval:
        frames = data.eval_frames(eval_scenes)
        with steps.step(f"score float and quantized models in nuScenes NDS on {len(frames)} held-out frames"):
            report["task_nds"] = _task_nds(data, frames, model, qmodel, lifted, configurations, quiet, pool)
    if latency_cost:
        from .latency_cost import front_latency

        with steps.step("time the int16 sets of the Pareto front in ONNX Runtime"):
            search.latency = front_latency(search, qmodel, active, lifted, samples[0].feeds,
                                           opset=recipe.convert.opset, output_ranges=output_ranges, quiet=quiet)
    extra = (data.warnings if data else []) + _suspect_warning(calib_set, suspects, report)
    print_warnings(extra)
    with atomic_directory(out, overwrite=overwrite) as scratch:
        with steps.step("export QDQ ONNX and run it in ONNX Runtime"):
            # An export check, not a fidelity figure: the first check samples are enough.
            n = recipe.check.samples
            report["onnxruntime_vs_fake_quant"] = _export_and_check(qmodel, lifted, samples[:n],
                                                                   {k: v[:n] for k, v in fake.items()}, scratch,
                                                                   recipe.convert.opset, output_ranges)
        with steps.step("write quantized state, fidelity report and manifest"):
            if search is not None:
                write_json(scratch / "sensitivity.json", search.to_dict())
                task = _task_at_chosen(report, search, lifted)
                (scratch / "sensitivity.md").write_text(sensitivity_markdown(search, recipe.name, task))
                sensitivity_plot(search, scratch / "sensitivity.png")
                if search.cost is not None:
                    pareto_plot(search, scratch / "pareto.png", task)
            save_safetensors(qmodel.state_dict(), scratch / "quant_state.safetensors")
            write_json(scratch / "quantizers.json", [_describe(name, q) for name, q in quantizers(qmodel).items()
                                                     if name in active])
            write_json(scratch / "fidelity.json", {"samples": [s.info for s in samples], **report})
            quantization_plot(layers, scratch / "layers.png")
            (scratch / "fidelity.md").write_text(fidelity_markdown(recipe.name, report, layers, lifted))
            write_json(scratch / "manifest.json", {
                "deploykit": __version__, "stage": "quantize",
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "recipe": {"name": recipe.name, "path": str(recipe.path) if recipe.path else None},
                "converted": str(converted), "inputs": manifest["inputs"],
                "converted_onnx_sha256": sha256_file(Path(converted) / "model.onnx"),
                "calibration": {"path": str(calib_path), "samples": len(calib_set), "temporal": calib_set.temporal,
                                "calibrator": recipe.quantize.calibrator, "source": calib_set.source,
                                "suspect_samples": suspects},
                "int16": {"patterns": list(patterns), "matched": matches, "warnings": warnings,
                          "sensitivity": None if search is None else {"chosen": search.chosen,
                                                                      "file": "sensitivity.md"}},
                "quantizers": {"active": len(active), "int16": len(lifted), "unused": unused},
                # Each map's wall time against its items' compute seconds: how well the workers were used.
                "workers": {"count": pool.workers, "where": pool.description, "maps": pool.stats.maps},
                "batchnorms_folded": num_folded, "warnings": warnings + extra,
                "onnx": {k: v["file"] for k, v in report["onnxruntime_vs_fake_quant"].items()},
                "timings_s": steps.timings})
    return QuantizeResult(out, report, warnings + extra)


def _task_at_chosen(report: dict, search, lifted: list[str]) -> dict | None:
    """The task metric of all int8 and of the chosen int16 set, where both were scored (the
    int8 + int16 configuration is the chosen set unless --int16 patterns added to it)."""
    if sorted(search.chosen_quantizers()) != sorted(lifted):
        return None
    for key, metric in (("task_map", "mAP"), ("task_nds", "NDS")):
        scores = report.get(key)
        if scores and "int8" in scores:
            chosen = scores.get("int8_int16", scores["int8"])  # no int16 set: the chosen point is all int8
            if scores["int8"].get(metric) is not None and chosen.get(metric) is not None:
                return {"metric": metric, "float": scores["float"][metric], "all int8": scores["int8"][metric],
                        "chosen": chosen[metric]}
    return None


def _target_outputs(recipe: Recipe, model) -> list[str] | None:
    import fnmatch

    patterns = recipe.quantize.target_outputs
    if not patterns:
        return None
    for p in patterns:
        if not fnmatch.filter(model.output_names, p):
            raise RecipeError(f"[quantize] target_outputs pattern '{p}' matches none of the outputs "
                              f"{', '.join(model.output_names)}")
    return [n for n in model.output_names if any(fnmatch.fnmatch(n, p) for p in patterns)]


def _task_nds(data, frames, model, qmodel, lifted: list[str], configurations, quiet: bool, pool=None) -> dict:
    """nuScenes metrics of the float model and each quantized configuration on the user's
    held-out annotated frames (PyTorch: the fake-quant model is what the QDQ graphs compute)."""
    from ..temporal.runner import TorchEngine

    if pool is not None and pool.workers > 1:
        predictions = frame_predictions(pool, data, model, qmodel, lifted, configurations, frames, quiet=quiet)
        return score_nds(data, {}, frames, quiet=quiet, predictions=predictions)

    class _Configured(TorchEngine):
        def __init__(self, names16):
            super().__init__(qmodel)
            self.names16 = names16

        def run(self, feeds):
            set_bits(qmodel, lifted, 8)
            set_bits(qmodel, self.names16, 16)
            return super().run(feeds)

    engines = {"float": TorchEngine(model), **{key: _Configured(n16) for key, n16 in configurations}}
    return score_nds(data, engines, frames, quiet=quiet)


def _suspect_warning(calib_set: CalibSet, suspects: list[str], report: dict) -> list[str]:
    """Calibration data that cannot be right is said, with what it did to the int8 model."""
    if not suspects:
        return []
    from .fidelity import worst_output

    worst = worst_output(report["int8"], report["target_outputs"])
    return [f"calibration set {calib_set.path}: {len(suspects)} of {len(calib_set)} samples cannot be real data "
            f"({suspects[0]}{', ...' if len(suspects) > 1 else ''}); the int8 model calibrated on them measures "
            f"{worst['sqnr_db']:.1f} dB SQNR on {worst['name']}: calibrate on frames of your own data "
            "(`deploykit calib --from`)"]


def _task_map(recipe: Recipe, model, qmodel, lifted: list[str], configurations, pool) -> dict:
    """nuScenes-style mAP of the float model and of each quantized configuration on
    the same held-out labelled scenes, generated and run a shard at a time on the pool
    (here, or on its workers) and scored here in scene order."""
    from ..detection.evaluate import EVAL_SEED

    n = recipe.quantize.eval_scenes
    evaluate = ARCHITECTURES[recipe.arch].score
    scenes, outputs = labelled_scene_outputs(pool, recipe, model, qmodel, lifted, configurations,
                                             range(EVAL_SEED, EVAL_SEED + n))
    result = {"scenes": n, "first_seed": EVAL_SEED}
    for key, runs in outputs.items():
        ordered = iter(runs)  # evaluate runs the scenes in their order
        result[key] = evaluate(recipe, scenes, lambda feeds, it=ordered: next(it))
    return result


def _export_and_check(qmodel, lifted: list[str], samples, fake: dict[str, list], scratch: Path, opset: int,
                      output_ranges: dict | None = None) -> dict:
    """Write model.int8.qdq.onnx, model.qdq.onnx (with the int16 overrides) and
    model.trt.qdq.onnx, and compare ONNX Runtime on each with the fake-quant
    PyTorch model configured the same way, on the check samples. ``fake`` holds
    the fake-quant outputs the fidelity step already computed, per configuration."""
    import onnx

    from .ort_flavour import ort_flavour
    from .qdq_export import export_qdq
    from .trt_flavour import tensorrt_flavour

    variants = [("int8", "model.int8.qdq.onnx", [])] + ([("int8_int16", "model.qdq.onnx", lifted)] if lifted else [])
    result = {}
    for key, name, names16 in variants:
        set_bits(qmodel, lifted, 8)
        set_bits(qmodel, names16, 16)
        graph = export_qdq(qmodel, samples[0].feeds, scratch / name, opset)
        result[key] = _ort_agreement(fake[key], graph, scratch / name, samples)
        # ONNX Runtime: the same quantizers, Q/DQ placed for its int8 kernels.
        ort_name = ORT_FILES[key]
        ort_graph, changes = ort_flavour(graph, output_ranges=output_ranges)
        onnx.save(ort_graph, str(scratch / ort_name))
        result[f"ort_{key}"] = {**_ort_agreement(fake[key], ort_graph, scratch / ort_name, samples),
                                "changes": changes}
    # TensorRT: the int16 regions run in float, and Q/DQ follows its placement rules.
    set_bits(qmodel, lifted, 8)
    set_mode(qmodel, "off", lifted)
    graph = export_qdq(qmodel, samples[0].feeds, scratch / TRT_FILE, opset)
    graph, changes = tensorrt_flavour(graph)
    onnx.save(graph, str(scratch / TRT_FILE))
    trt_fake = [torch_outputs(qmodel, s.feeds) for s in samples]
    result["tensorrt"] = {**_ort_agreement(trt_fake, graph, scratch / TRT_FILE, samples), "changes": changes}
    set_mode(qmodel, "quant", lifted)
    set_bits(qmodel, lifted, 16)
    return result


def _ort_agreement(fake: list[dict], graph, path: Path, samples) -> dict:
    from ..engines import ort as ort_engine

    engine = ort_engine.build(path)
    return {"file": path.name, "opset": next(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")),
            "outputs": [f.to_dict() for f in fidelity(fake, [engine.run(s.feeds) for s in samples])]}


def _describe(name: str, q) -> dict:
    amax = q.amax.tolist()
    return {"name": name, "bits": q.bits, "axis": q.axis, "calibrator": "max" if q.axis is not None else q.method,
            "amax": amax if q.axis is None else {"min": min(amax), "max": max(amax), "channels": len(amax)}}


def _fidelity_table(items: list[dict]) -> str:
    from ..report import markdown_table

    rows = [[f["name"], f"{f['sqnr_db']:.1f}", f"{f['cosine']:.6f}", f"{f['max_rel_error']:.2e}"] for f in items]
    return markdown_table(["output", "SQNR dB", "cosine", "max rel error"], rows)


def fidelity_markdown(recipe: str, report: dict, layers: dict | None = None, lifted: list[str] = ()) -> str:
    from ..report import markdown_table

    lines = [f"# Quantization fidelity: {recipe}", "",
             "Fake-quant PyTorch model against the float model on the check samples (pooled).", ""]
    on = report.get("measured_on")
    if on and on.get("source") != "synthetic":
        frames = ", ".join(f"{f['scene']}/{f['index']}" for f in on["frames"])
        lines += [f"Measured on {len(on['frames'])} frames of {on['source']} that the calibration set does not hold: "
                  f"{frames}.", ""]
    if "target_outputs" in report:
        lines += [f"The worst-output SQNR that the summary and `deploykit gate` quote counts the recipe's target "
                  f"outputs ([quantize] target_outputs): {', '.join(report['target_outputs'])}.", ""]
    for key, title in (("int8", "int8 everywhere"), ("int8_int16", "int8 + int16 overrides")):
        if key in report:
            lines += [f"## {title}", "", _fidelity_table(report[key]), ""]
    for key, det in report.get("detection_agreement", {}).items():
        rows = [[thr, f"{v['recall']:.3f}", f"{v['precision']:.3f}"] for thr, v in det["by_threshold"].items()]
        lines += [f"## Detection agreement, {key.replace('_', ' + ')} vs float", "",
                  f"{det['candidate_boxes']} quantized boxes against {det['reference_boxes']} float boxes "
                  "(decoded without NMS), matched per class by centre distance.", "",
                  markdown_table(["distance", "recall", "precision"], rows), ""]
    if layers:
        lines += quantization_markdown(layers, "layers.png", lifted)
    if "task_map" in report:
        lines += _task_map_markdown(report["task_map"])
    if "task_nds" in report:
        lines += _task_nds_markdown(report["task_nds"])
    for item in report.get("onnxruntime_vs_fake_quant", {}).values():
        lines += [f"## ONNX Runtime on {item['file']} (opset {item['opset']}) vs the fake-quant PyTorch model", "",
                  *([f"TensorRT edits: {item['changes']}; the int16 regions run in float here.", ""]
                    if "changes" in item else []),
                  "Both quantize the same tensors with the same scales; they differ where fp32 summation order "
                  "moves a value across a rounding boundary, and ONNX saturates int8 at -128 where the fake-quant "
                  "model clips at -127.", "", _fidelity_table(item["outputs"]), ""]
    return "\n".join(lines)


def _task_nds_markdown(task: dict) -> list[str]:
    from ..detection.nuscenes_eval import render_markdown
    from ..report import markdown_table

    keys = [k for k in ("float", "int8", "int8_int16") if k in task]
    tp = list(task["float"]["tp_errors"])

    def cell(x):
        return "n/a" if x is None else f"{x:.4f}"

    rows = [[k.replace("_", " + "), cell(task[k]["NDS"]), cell(task[k]["mAP"]), *(cell(task[k]["tp_errors"][e])
                                                                                for e in tp)] for k in keys]
    lines = [f"## nuScenes metrics on {task['frames']} held-out frames ({len(task['scenes'])} scenes) of "
             f"{task['source']}", "", f"Classes: {', '.join(task['classes'])}; the devkit's DetectionEval rules.", "",
             markdown_table(["model", "NDS", "mAP", *tp], rows), ""]
    for k in keys:
        lines += [f"### {k.replace('_', ' + ')}", "", render_markdown(task[k]), ""]
    return lines


def _task_map_markdown(task: dict) -> list[str]:
    from ..report import markdown_table

    classes = list(task["float"]["per_class"])
    tp = list(task["float"].get("tp_errors", {}))
    occ = "mIoU" in task["float"]

    def cell(x):
        return "n/a" if x is None else f"{x:.4f}"

    rows = [[key.replace("_", " + "), *([f"{task[key]['mIoU']:.4f}"] if occ else []), f"{task[key]['mAP']:.4f}",
             *(f"{task[key]['per_class'][c]['AP']:.4f}" for c in classes),
             *(cell(task[key].get("NDS")) for _ in ["NDS"] if tp), *(cell(task[key]["tp_errors"][e]) for e in tp)]
            for key in ("float", "int8", "int8_int16") if key in task]
    title = "Task mAP and occupancy mIoU" if occ else "Task mAP"
    lines = [f"## {title} on {task['scenes']} held-out synthetic scenes", "",
             "nuScenes-style AP (centre distance 0.5/1/2/4 m, the recipe's NMS) against the scenes' ground truth.", "",
             markdown_table(["model", *(["occupancy mIoU"] if occ else []), "mAP", *(f"{c} AP" for c in classes),
                             *(["NDS", *tp] if tp else [])], rows),
             "", "NDS and the TP errors (translation, scale, orientation, velocity, attribute) come from the nuScenes "
             "evaluation on the same boxes; the scenes are static, so AVE measures predicted speed.", ""]
    if occ:
        names = list(task["float"]["occupancy"]["per_class"])

        def iou(x):
            return "n/a" if x is None else f"{x:.4f}"

        rows = [[key.replace("_", " + "), *(iou(task[key]["occupancy"]["per_class"][n]) for n in names)]
                for key in ("float", "int8", "int8_int16") if key in task]
        lines += ["### Occupancy IoU per class", "",
                  "Occ3D's metric (deploykit.detection.occupancy): one confusion histogram over every frame's voxels; "
                  "mIoU over the classes but free.", "", markdown_table(["model", *names], rows), ""]
    return lines
