"""The ``deploykit`` command line: thin wrappers over the library.

Each command parses its options and calls one API function; errors the user
can fix are printed as one message with a documented exit code (README.md).
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import sys
from pathlib import Path

import click

from .engines import CUSTOM_OP_MODES
from .errors import DeployError


def handle_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DeployError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted; nothing was written", err=True)
            sys.exit(130)
    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="deploykit")
def main() -> None:
    """Deploy BEV perception checkpoints: convert, quantize, benchmark, gate.

    \b
    Typical use:
      deploykit convert --recipe centerpoint_pillar_nus --checkpoint ckpt.pth --out build/cp
      deploykit bench build/cp/model.onnx --json build/cp/bench.json
    """
    from .memory import keep_freed_memory

    keep_freed_memory()  # model runs reuse their pages instead of faulting them in (deploykit.memory)


@main.command()
@click.option("--recipe", "-r", required=True, help="Recipe name (see `deploykit recipes`) or path to a .toml.")
@click.option("--checkpoint", "-c", "checkpoints", multiple=True,
              help="PyTorch (.pth, mmdet3d/mmcv or raw state dict) or .safetensors checkpoint. Default: the "
                   "recipe's bundled checkpoint. A fused model can be assembled from its parts instead: "
                   "camera=BEVFORMER.pth lidar=CENTERPOINT.pth [fused=HEADS.pth] (repeat the option).")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output directory; must not exist unless --overwrite.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists (only once the new one is complete).")
@click.option("--passes", help="Comma-separated rewrite passes instead of the recipe's list.")
@click.option("--no-passes", is_flag=True, help="Export the original model without rewrites (for comparison).")
@click.option("--custom-ops", type=click.Choice(CUSTOM_OP_MODES), default="function",
              show_default=True, help="How ONNX Runtime runs deploykit's custom nodes during the check.")
@click.option("--standard-ops", is_flag=True,
              help="Also write model.standard_ops.onnx, custom nodes lowered to standard ONNX ops (for runtimes "
                   "without deploykit's plugins), checked like model.onnx.")
@click.option("--tensorrt-plugins", is_flag=True,
              help="Also write model.trt_plugins.onnx: custom nodes tagged plugin_namespace=deploykit for TensorRT's "
                   "ONNX parser with deploykit's Python plugins (TensorRT >= 10.6, plugins/README.md); checked "
                   "against the plugins' declared shapes (no TensorRT needed).")
@click.option("--rig", type=click.Path(path_type=Path),
              help="Camera models: a rig file (e.g. from `deploykit rig --from-nuscenes`) or bundled rig name "
                   "instead of the recipe's.")
@click.option("--quiet", "-q", is_flag=True, help="No progress output (warnings are still printed).")
@handle_errors
def convert(recipe, checkpoints, out, overwrite, passes, no_passes, custom_ops, standard_ops, tensorrt_plugins, rig,
            quiet):
    """Rewrite, export to static ONNX and check against PyTorch.

    Writes OUT/model.onnx, weights.safetensors, inputs.npz, check.json and manifest.json.
    """
    from .assemble import parse_parts
    from .export import convert as run_convert

    checkpoint = parse_parts(checkpoints)
    if passes and no_passes:
        raise click.UsageError("--passes and --no-passes exclude each other")
    chosen = [] if no_passes else ([p.strip() for p in passes.split(",") if p.strip()] if passes else None)
    result = run_convert(recipe, out, checkpoint=checkpoint, passes=chosen, overwrite=overwrite,
                         custom_ops=custom_ops, standard_ops=standard_ops, tensorrt_plugins=tensorrt_plugins,
                         rig=rig, quiet=quiet)
    eng = result.check["onnxruntime"]
    click.echo(f"wrote {result.out_dir}/ : ONNX Runtime vs PyTorch worst relative error "
               f"{eng['worst_rel_error']:.1e}, min cosine {eng['min_cosine']:.7f}")


@main.command()
@click.argument("models", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--backend", type=click.Choice(["ort", "tensorrt", "torch"]), default="ort", show_default=True,
              help="Inference backend; tensorrt where installed (GPU); torch: the converted PyTorch model "
                   "(with deploykit's GPU kernels on CUDA).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="--backend torch: where the model runs (auto: CUDA if PyTorch sees a GPU).")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default="fp32", show_default=True,
              help="TensorRT build precision (int8 for QDQ models: scales from their Q/DQ nodes).")
@click.option("--plugin-impl", type=click.Choice(["aot", "jit"]), default="aot", show_default=True,
              help="TensorRT: deploykit's plugins as PTX compiled into the engine (aot, TensorRT >= 10.9) or as "
                   "a Python callback (jit).")
@click.option("--custom-ops", type=click.Choice(CUSTOM_OP_MODES), default="function",
              show_default=True, help="How ONNX Runtime runs deploykit's custom nodes.")
@click.option("--threads", type=int, help="Intra-op threads (default: all cores available to this process).")
@click.option("--warmup", type=int, default=10, show_default=True)
@click.option("--iterations", "-n", type=int, default=50, show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the results as JSON.")
@click.option("--stages", is_flag=True, help="Add a per-stage time breakdown from ONNX Runtime's profiler.")
@click.option("--report", "report_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Write bench.json, bench.md and bench.png into this directory.")
@handle_errors
def bench(models, backend, device, precision, plugin_impl, custom_ops, threads, warmup, iterations, json_path, stages,
          report_dir):
    """Measure latency, size and peak memory of one or more ONNX models.

    MODELS are ONNX files or directories: a convert directory runs its model.onnx; a quantize
    directory the file for --backend (ort: model.ort.qdq.onnx, else model.ort.int8.qdq.onnx;
    tensorrt: model.trt.qdq.onnx). Uses the inputs.npz that `deploykit convert` wrote beside a
    model (or beside the converted model a quantize directory names), else synthetic inputs.
    """
    from .artifacts import write_json
    from .bench import bench_model
    from rich.console import Console

    from .report import latency_table, stage_table

    if warmup < 0 or iterations < 1:
        raise click.BadParameter("--warmup must be >= 0 and --iterations >= 1")
    results = [bench_model(m, backend=backend, custom_ops=custom_ops, threads=threads, warmup=warmup,
                           iterations=iterations, stages=stages, precision=precision, device=device,
                           plugin_impl=plugin_impl)
               for m in models]
    Console(width=max(Console().width, 120)).print(latency_table(results))
    for r in results:
        if r.get("stages"):
            Console(width=max(Console().width, 120)).print(stage_table(r))
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        write_json(json_path, {"results": results})
        click.echo(f"wrote {json_path}")
    if report_dir:
        from .artifacts import atomic_directory
        from .report import bench_markdown, bench_plot

        with atomic_directory(report_dir, overwrite=True) as scratch:
            write_json(scratch / "bench.json", {"results": results})
            (scratch / "bench.md").write_text(bench_markdown(results))
            bench_plot(results, scratch / "bench.png")
        click.echo(f"wrote {report_dir}/bench.{{json,md,png}}")


@main.command()
@click.argument("candidates", nargs=-1, required=True, type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--baseline", "-b", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Baseline JSON (benchmarks/baselines/<recipe>.json); entries are matched by model file name.")
@click.option("--update", is_flag=True, help="Measure the candidates and write them as the new baseline.")
@click.option("--store-models/--no-store-models", default=True, show_default=True,
              help="With --update: keep a copy of each model beside the baseline, so later gates time the candidate "
                   "against it interleaved (holds on any machine and under changing load). --no-store-models: "
                   "compare in units of a reference workload instead, which a load change between update and "
                   "check can fool.")
@click.option("--against", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="The baseline model itself: time it interleaved with the candidate (one candidate only).")
@click.option("--threads", type=int, help="Intra-op threads (default: the baseline's).")
@click.option("--rounds", type=click.IntRange(5), help="Interleaved rounds per attempt (default: the recipe's).")
@click.option("--custom-ops", type=click.Choice(CUSTOM_OP_MODES), default="function", show_default=True)
@click.option("--other-machine", type=click.Choice(["error", "warn"]), default="error", show_default=True,
              help="A baseline from another machine class: refuse, or compare anyway with a warning.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Also write the verdicts.")
@handle_errors
def gate(candidates, baseline, update, store_models, against, threads, rounds, custom_ops, other_machine, json_path):
    """Fail (exit 10) when a candidate is slower or less faithful than its baseline.

    \b
    Latency: ratio to the baseline with a 95% bootstrap interval, measured in this
    process, round by round against the baseline model (--against, or the one stored
    beside the baseline) or else against a fixed reference workload whose units the
    baseline file stores; only a confident regression fails. Fidelity (quantized candidates): worst output SQNR
    and mAP from the fidelity.json beside the model. Thresholds: the recipe's [gate].
    """
    from rich.console import Console

    from .artifacts import write_json
    from .errors import GateFailedError
    from .gate import gate as run_gate
    from .gate import update_baseline
    from .progress import print_warnings
    from .report import gate_table

    if update:
        if against:
            raise click.BadParameter("--update measures the candidates themselves; drop --against")
        data = update_baseline(baseline, list(candidates), threads=threads, custom_ops=custom_ops, rounds=rounds,
                               store_models=store_models)
        for name, e in data["entries"].items():
            click.echo(f"{name}: {e['latency']['median_ms']:.2f} ms, "
                       f"{statistics.median(e['latency']['normalized_rounds']):.3f} reference units")
        click.echo(f"wrote baseline {baseline} (recipe {data['recipe']}, {data['machine_class']['cpu']})")
        return
    if against and len(candidates) > 1:
        raise click.BadParameter("--against takes one candidate")
    results = [run_gate(baseline, c, against=against, threads=threads, custom_ops=custom_ops, rounds=rounds,
                        other_machine=other_machine) for c in candidates]
    Console(width=max(Console().width, 120)).print(gate_table(results))
    print_warnings([w for r in results if r.latency for w in r.latency.warnings])
    if json_path:
        write_json(json_path, {"results": [r.to_dict() for r in results]})
    failed = [r.candidate for r in results if not r.passed]
    if failed:
        raise GateFailedError(f"regression in {', '.join(failed)} (see the table above)")


@main.command()
@click.option("--recipe", "-r", help="Recipe name or path to a .toml. Default: the one CONVERTED_DIR was made with.")
@click.option("--model", "-m", "converted", required=True, type=click.Path(file_okay=False, exists=True, path_type=Path),
              help="What `deploykit convert` wrote (CONVERTED_DIR).")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output directory; must not exist unless --overwrite.")
@click.option("--calib", type=click.Path(file_okay=False, path_type=Path),
              help="Calibration set (see `deploykit calib`). Default: the recipe's bundled synthetic one.")
@click.option("--int16", "int16", multiple=True,
              help="Extra quantizer-name pattern to lift to int16 (repeatable), besides the recipe's.")
@click.option("--int16-sensitive", is_flag=True,
              help="Choose the int16 modules by measured sensitivity (smallest set meeting the recipe's "
                   "target_sqnr_db within int16_budget) instead of the recipe's patterns.")
@click.option("--latency-cost", is_flag=True,
              help="With --int16-sensitive: time each int16 set on the Pareto front in ONNX Runtime (its ORT "
                   "flavour, int16 as float islands) and report it beside the bit-op cost.")
@click.option("--rig", type=click.Path(path_type=Path),
              help="Camera models: the rig file the model was converted with (checked; the rig is part of the model).")
@click.option("--eval-scenes", type=click.IntRange(0),
              help="Labelled scenes to score float and quantized models on (task mAP); 0 skips it. "
                   "Default: the recipe's [quantize] eval_scenes.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists (only once the new one is complete).")
@click.option("--workers", type=click.IntRange(1),
              help="Run calibration, the int16 search and mAP scoring on N local Ray workers (Ray is an "
                   "optional extra: pip install 'deploykit[ray]'); same results as serial. Default: serial.")
@click.option("--ray-address", metavar="ADDR",
              help="Join an existing Ray cluster (e.g. ray://head:10001, or 'auto') instead of starting one; "
                   "workers default to its CPUs.")
@click.option("--quiet", "-q", is_flag=True, help="No progress output (warnings are still printed).")
@handle_errors
def quantize(recipe, converted, out, calib, int16, int16_sensitive, latency_cost, rig, eval_scenes, workers,
             ray_address, overwrite, quiet):
    """Calibrate int8 fake quantization (int16 where the recipe says) and measure its fidelity.

    \b
    Always writes into OUT/:
      model.int8.qdq.onnx      int8 Q/DQ everywhere
      model.trt.qdq.onnx       TensorRT flavour (int16 regions as float islands)
      model.ort.int8.qdq.onnx  ONNX Runtime flavour (Q/DQ placed for its int8 kernels)
      quant_state.safetensors, quantizers.json, fidelity.json/.md, manifest.json
    Only with int16 overrides (recipe patterns, --int16 or --int16-sensitive):
      model.qdq.onnx           int8 + int16 Q/DQ (opset 21)
      model.ort.qdq.onnx       its ONNX Runtime flavour
    Only with --int16-sensitive:
      sensitivity.json/.md/.png, pareto.png (fidelity against bit-op cost; with
      --latency-cost also against ONNX Runtime latency)
    """
    from .quantize.fidelity import worst_output
    from .quantize.pipeline import quantize as run_quantize

    result = run_quantize(recipe, converted, out, calib=calib, int16=tuple(int16), int16_sensitive=int16_sensitive,
                          eval_scenes=eval_scenes, rig=rig, overwrite=overwrite, quiet=quiet,
                          workers=workers, ray_address=ray_address, latency_cost=latency_cost)
    targets = result.fidelity["target_outputs"]
    for key, label in (("int8", "int8"), ("int8_int16", "int8+int16")):
        if key in result.fidelity:
            worst = worst_output(result.fidelity[key], targets)
            task = result.fidelity.get("task_map", {}).get(key)
            nds = result.fidelity.get("task_nds", {}).get(key)
            click.echo(f"{label}: worst output {worst['name']} SQNR {worst['sqnr_db']:.1f} dB, "
                       f"cosine {worst['cosine']:.5f}" + (f", mAP {task['mAP']:.4f}, NDS {task['NDS']:.4f}, "
                                                            f"mAOE {task['tp_errors']['mAOE']:.3f}" if task else "")
                       + (f", occupancy mIoU {task['mIoU']:.4f}" if task and "mIoU" in task else "")
                       + (f", NDS {nds['NDS']:.4f}, mAP {nds['mAP']:.4f}" if nds else ""))
    if "task_map" in result.fidelity:
        f = result.fidelity["task_map"]["float"]
        click.echo(f"float: mAP {f['mAP']:.4f}, NDS {f['NDS']:.4f}, mAOE {f['tp_errors']['mAOE']:.3f}"
                   + (f", occupancy mIoU {f['mIoU']:.4f}" if "mIoU" in f else "")
                   + f" ({result.fidelity['task_map']['scenes']} labelled synthetic scenes)")
    if "task_nds" in result.fidelity:
        nds = result.fidelity["task_nds"]
        click.echo(f"float: NDS {nds['float']['NDS']:.4f}, mAP {nds['float']['mAP']:.4f} "
                   f"({nds['frames']} held-out frames of {nds['source']})")
    on = result.fidelity["measured_on"]
    if on["source"] != "synthetic":
        click.echo(f"(SQNR on {len(on['frames'])} held-out frames of {on['source']})")
    every = [f["name"] for f in result.fidelity["int8"]]
    if len(targets) < len(every):
        click.echo(f"(worst of the recipe's target outputs: {len(targets)} of {len(every)}; "
                   f"all outputs are in {result.out_dir}/fidelity.md)")
    click.echo(f"wrote {result.out_dir}/")


@main.command()
@click.option("--recipe", "-r", required=True, help="Recipe name or path to a .toml.")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output directory; must not exist unless --overwrite.")
@click.option("--from", "source", type=click.Path(exists=True, path_type=Path),
              help="Your data: point-cloud files, a directory of camera frames or a nuScenes-layout dataset. "
                   "Default: the recipe's synthetic sample generator.")
@click.option("--scene", "scenes", multiple=True, help="nuScenes-layout --from: only this scene (repeatable).")
@click.option("--samples", "-n", type=click.IntRange(1), default=16, show_default=True, help="Number of samples.")
@click.option("--frames-per-scene", type=click.IntRange(1), default=4, show_default=True,
              help="Temporal models: consecutive frames per scene (the previous BEV is carried within a scene).")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists (only once the new one is complete).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar (warnings are still printed).")
@handle_errors
def calib(recipe, out, source, scenes, samples, frames_per_scene, overwrite, quiet):
    """Build a calibration set from your data (--from) or the recipe's synthetic generator.

    Writes OUT/calib.json and one .npz per sample, arrays named after the model's
    inputs. From your data, the frames are spread over it and each sample records
    the frame it is, so `deploykit quantize` measures fidelity on other frames.
    """
    from .quantize.calib_set import calib as run_calib
    from .quantize.calib_set import load_calib_set

    path = run_calib(recipe, out, source=source, samples=samples, frames_per_scene=frames_per_scene,
                     scenes=list(scenes) or None, overwrite=overwrite, quiet=quiet)
    made = load_calib_set(path)
    origin = f" from {made.source['path']} ({made.source['kind']})" if made.source else " (synthetic)"
    click.echo(f"wrote {path}/ : {len(made)} samples{origin}")


@main.command()
@click.argument("model_dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--inputs", "-i", required=True, type=click.Path(exists=True, path_type=Path),
              help="A point-cloud file (.bin/.pcd.bin/.npy/.pcd), a directory of them, a directory of camera frames, "
                   "or a nuScenes-layout dataset.")
@click.option("--out", "-o", type=click.Path(file_okay=False, path_type=Path),
              help="Output directory (default: MODEL_DIR-detect beside MODEL_DIR); must not exist unless --overwrite.")
@click.option("--scene", "scenes", multiple=True, help="nuScenes-layout inputs: only this scene (repeatable).")
@click.option("--model-file", help="Which ONNX file of MODEL_DIR to run (default: model.onnx of a convert directory; "
                                   "model.qdq.onnx, else model.int8.qdq.onnx, of a quantize directory).")
@click.option("--backend", type=click.Choice(["ort", "tensorrt"]), default="ort", show_default=True)
@click.option("--max-frames", type=click.IntRange(1), help="Stop after this many frames.")
@click.option("--score-threshold", type=click.FloatRange(0, 1), default=0.3, show_default=True,
              help="Boxes the pictures and the per-class counts show (detections.json keeps all).")
@click.option("--no-pictures", is_flag=True, help="Skip the BEV picture per frame.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists (only once the new one is complete).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar (warnings are still printed).")
@handle_errors
def detect(model_dir, inputs, out, scenes, model_file, backend, max_frames, score_threshold, no_pictures, overwrite,
           quiet):
    """Run a converted or quantized model on your data: detections, BEV pictures, metrics.

    \b
    Writes OUT/detections.json (nuScenes submission format), bev/*.png (one top
    view per frame), summary.json/.md and, where the data has annotations,
    metrics.json/.md (nuScenes mAP, ATE, ASE, AOE, AVE, AAE and NDS).
    """
    from .detect import detect as run_detect

    result = run_detect(model_dir, inputs, out, model_file=model_file, scenes=list(scenes) or None, backend=backend,
                        max_frames=max_frames, score_threshold=score_threshold, pictures=not no_pictures,
                        overwrite=overwrite, quiet=quiet)
    s = result.summary
    counts = ", ".join(f"{k} {v}" for k, v in s["boxes_per_class"].items()) or "none"
    click.echo(f"{s['frames']} frames, {s['engine_ms']['mean']:.1f} ms per frame in {s['backend']}; boxes with score "
               f">= {s['score_threshold']:g}: {counts}")
    if result.metrics is not None:
        m = result.metrics
        tp = m["tp_errors"]
        click.echo(f"NDS {m['NDS']:.4f}, mAP {m['mAP']:.4f}, " + ", ".join(f"{k} {_fmt(v)}" for k, v in tp.items()))
    click.echo(f"wrote {result.out_dir}/")


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


@main.command("compare")
@click.argument("a")
@click.argument("b")
@click.option("--inputs", "-i", type=click.Path(exists=True, path_type=Path),
              help="An .npz of engine inputs (e.g. a convert directory's inputs.npz), a calibration set, or your "
                   "data as `detect --inputs` reads it. Default: the recipe's check samples, which also hold the "
                   "original model's (:torch) own inputs.")
@click.option("--samples", "-n", type=click.IntRange(1), default=1, show_default=True,
              help="How many samples to pool the statistics over.")
@click.option("--threshold", type=click.FloatRange(0, min_open=True),
              help="Relative RMS error (10^(-SQNR/20)) a layer must pass to count as diverging. Default: 1e-4 for "
                   "two float models, 0.05 for a quantized graph against its fake-quant model, 0.1 for float "
                   "against quantized.")
@click.option("--report", type=click.Path(file_okay=False, path_type=Path),
              help="Write compare.md (every layer), compare.json and compare.png (error along depth) here.")
@click.option("--rows", type=click.IntRange(0), default=12, show_default=True,
              help="Layers printed around the first divergence (the report has all).")
@click.option("--custom-ops", type=click.Choice(CUSTOM_OP_MODES), default="function", show_default=True,
              help="How ONNX Runtime runs deploykit's custom nodes.")
@click.option("--ort-optimization", type=click.Choice(["all", "basic", "none"]), default="all", show_default=True,
              help="ONNX Runtime's graph optimizations for the ONNX sides; none runs a Q/DQ graph as written, "
                   "without ORT's fused int8 kernels (tells the graph's error from the kernels').")
@click.option("--overwrite", is_flag=True, help="Replace --report if it exists.")
@click.option("--quiet", "-q", is_flag=True, help="No progress output.")
@handle_errors
def compare(a, b, inputs, samples, threshold, report, rows, custom_ops, ort_optimization, overwrite, quiet):
    """Find the first layer where B parts ways with A (the reference).

    \b
    A and B are PATH[:VIEW]: a convert directory (model.onnx; :torch the original
    PyTorch model, :rewritten the model after the passes, :standard_ops), a
    quantize directory (model.qdq.onnx, else model.int8.qdq.onnx; :int8, :ort,
    :ort-int8, :trt, :fake-quant, :fake-quant-int8) or an ONNX file
    (FILE.onnx:tensorrt with TensorRT installed). Layers pair by module path.
    \b
      deploykit compare build/cp:torch build/cp
      deploykit compare build/cp-q:fake-quant-int8 build/cp-q:int8 --report build/cmp
    """
    from .layerwise.report import rows_markdown, summary
    from .layerwise.run import compare as run_compare

    result = run_compare(a, b, inputs=inputs, samples=samples, threshold=threshold, report=report,
                         custom_ops=custom_ops, ort_optimization=ort_optimization, overwrite=overwrite, quiet=quiet)
    first = result.first_divergence
    start = max(0, result.rows.index(first) - rows // 2) if first is not None else 0
    if rows:
        window = dataclasses.replace(result, rows=result.rows[start:start + rows])
        click.echo(rows_markdown(window))
    click.echo(summary(result))
    if report is not None:
        click.echo(f"wrote {report}/")


@main.command()
@click.option("--from-nuscenes", "dataroot", required=True, type=click.Path(file_okay=False, exists=True, path_type=Path),
              help="A nuScenes-layout dataset directory (v1.0-*/ tables, samples/, sweeps/).")
@click.option("--scene", required=True, help="Scene name (e.g. scene-0103) whose calibration to take.")
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Rig file to write.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@handle_errors
def rig(dataroot, scene, out, overwrite):
    """Write a camera rig from a nuScenes-layout dataset's calibrated_sensor records.

    The cameras are expressed in the scene's LIDAR_TOP frame (nuScenes: x right, y
    forward, z up), the frame BEVFormer checkpoints were trained in. Use it with
    `deploykit convert --rig OUT`.
    """
    from .data.rig_from_nuscenes import rig_from_nuscenes, write_rig
    from .errors import OutputExistsError

    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} already exists; choose another --out or pass --overwrite")
    data = rig_from_nuscenes(dataroot, scene)
    write_rig(out, data)
    click.echo(f"wrote {out}: rig {data['name']}, {len(data['cameras'])} cameras "
               f"({', '.join(c['name'] for c in data['cameras'])}), images {data['image_size'][1]}x{data['image_size'][0]}")


@main.command("sample-dataset")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory to write; must not exist (or be empty) unless --overwrite.")
@click.option("--scenes", type=click.IntRange(1, 10), default=2, show_default=True)
@click.option("--samples-per-scene", type=click.IntRange(1), default=4, show_default=True)
@click.option("--no-cameras", is_flag=True, help="LiDAR only (much smaller).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@handle_errors
def sample_dataset(out, scenes, samples_per_scene, no_cameras, seed, overwrite):
    """Write a small synthetic dataset in the nuScenes layout, to try the data commands on.

    Real table schema and file layout (v1.0-mini/ tables, samples/, sweeps/, can_bus/):
    ray-cast LiDAR sweeps (intensity 0-255, ring index), six camera images, ego
    poses and annotations of cars, pedestrians and cyclists, static and moving.
    """
    import shutil

    from .data.synthetic_nuscenes import write_synthetic_nuscenes

    if out.exists() and any(out.iterdir()) and overwrite:
        shutil.rmtree(out)
    path = write_synthetic_nuscenes(out, scenes=scenes, samples_per_scene=samples_per_scene, cameras=not no_cameras,
                                    seed=seed)
    click.echo(f"wrote {path}/ : {scenes} scenes x {samples_per_scene} samples"
               + ("" if no_cameras else ", six cameras") + " (synthetic, nuScenes layout)")


@main.command()
def recipes() -> None:
    """List the bundled recipes."""
    from .recipe import RECIPES_DIR, load_recipe

    for path in sorted(RECIPES_DIR.glob("*.toml")):
        r = load_recipe(path)
        click.echo(f"{r.name:28s} {r.description}")


if __name__ == "__main__":
    main()
