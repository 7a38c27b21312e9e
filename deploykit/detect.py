"""detect: a converted or quantized model on a user's data -> detections, pictures, metrics.

``deploykit detect MODEL_DIR --inputs PATH`` runs the model's engine (ONNX Runtime;
TensorRT where installed) frame by frame with the recipe's preprocessing (the input
contract, multi-sweep aggregation, voxelization; camera normalisation and the
temporal state BEVFormer carries between frames), decodes as the release does and
writes ``OUT/`` atomically:

    detections.json   nuScenes submission format (global frame where the data has poses,
                      else the LiDAR frame), all boxes the post-process keeps
    bev/*.png         one top view per frame: points, boxes with headings by class, GT dashed
    metrics.json/.md  nuScenes detection metrics (mAP, ATE ... AAE, NDS) where annotations exist
    summary.json/.md  frames, boxes per class, engine latency, warnings

``Predictor`` is the frame-by-frame runner the quantize step uses too, with the
fake-quant PyTorch model behind the same engine interface.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .api import callable_module
from .errors import InputError
from .progress import grouped, print_warnings, track
from .detection.submission import evaluation_classes
from .recipe import Recipe

QUANTIZED_FILES = ("model.qdq.onnx", "model.int8.qdq.onnx")  # ONNX Runtime: int8 + int16 if written, else int8
TENSORRT_FILE = "model.trt.qdq.onnx"


@dataclass
class ModelDir:
    """What detect needs from a convert or quantize directory."""

    path: Path
    onnx: Path
    recipe: Recipe
    converted: Path
    manifest: dict  # the converted directory's

    @property
    def pillars(self):
        """How the engine takes its pillars: deploykit.preprocess.pillar_inputs.PillarFormat."""
        from .export import pillar_format

        return pillar_format(self.manifest)

    @property
    def rig(self):
        from .camera.rig import load_rig

        from .models import camera_config

        # the converted directory's copy (recipe_of_converted)
        return load_rig(camera_config(self.recipe.model).rig)


def open_model_dir(path: str | Path, *, model_file: str | None = None, backend: str = "ort") -> ModelDir:
    path = Path(path)
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise InputError(f"{path} is not a `deploykit convert` or `deploykit quantize` output (no manifest.json)")
    manifest = json.loads(manifest_path.read_text())
    converted = Path(manifest["converted"]) if manifest.get("stage") == "quantize" else path
    conv_manifest = manifest if converted == path else _read_manifest(converted, path)
    if model_file:
        onnx = path / model_file
    elif manifest.get("stage") == "quantize":
        onnx = path / TENSORRT_FILE if backend == "tensorrt" else next(
            (path / f for f in QUANTIZED_FILES if (path / f).is_file()), path / QUANTIZED_FILES[-1])
    else:
        onnx = path / "model.onnx"
    if not onnx.is_file():
        raise InputError(f"{onnx} does not exist; pick one of {', '.join(p.name for p in path.glob('*.onnx'))} "
                         "with --model-file")
    from .export import recipe_of_converted

    recipe = recipe_of_converted(converted)
    return ModelDir(path, onnx, recipe, converted, conv_manifest)


def _read_manifest(converted: Path, quantized: Path) -> dict:
    path = converted / "manifest.json"
    if not path.is_file():
        raise InputError(f"{quantized} was quantized from {converted}, which is gone (no manifest.json there); "
                         "detect needs the converted directory too")
    return json.loads(path.read_text())


@dataclass
class Prediction:
    boxes: object  # deploykit.detection.decode.Boxes, LiDAR frame
    points: np.ndarray | None  # what a pillar model saw; None for camera models
    warnings: list[str]
    engine_seconds: float
    preprocess_seconds: float
    # A fused model's occupancy: class index per voxel (Dx, Dy, Dz) uint8, the argmax of its logits.
    occupancy: np.ndarray | None = None


class Predictor:
    """Runs an engine (anything with ``run(feeds) -> outputs``) over frames in order,
    carrying BEVFormer's temporal state within a scene and starting cold at a new
    scene or after a gap."""

    def __init__(self, recipe: Recipe, engine, *, pillars=None, rig=None):
        """``pillars``: the engine's PillarFormat (default: mmdet3d's raw PNC, decorated)."""
        from .preprocess.pillar_inputs import PillarFormat

        from .models import ARCHITECTURES, camera_config

        self.recipe, self.engine, self.pillars, self.rig = recipe, engine, pillars or PillarFormat(), rig
        self.postprocess = ARCHITECTURES[recipe.arch].postprocess
        self.camera = camera_config(recipe.model) is not None
        if self.camera:
            from .temporal import sequence_runner

            self.runner = sequence_runner(recipe.model, _Timed(engine))

    def __call__(self, frame) -> Prediction:
        from .data.sources import lidar_feeds, runner_frame

        start = time.perf_counter()
        cfg = self.recipe.model
        if self.camera:
            f, points, warnings = runner_frame(frame, cfg, self.rig, self.pillars)
            runner = self.runner
            if runner.scene == f.scene and runner.index is not None and f.index != runner.index + 1:
                # A gap: the previous frame the model fuses is not in the data; start cold,
                # as the release does at a scene's first frame, and say so.
                warnings = [*warnings, f"scene {f.scene}: frame {f.index} follows frame {runner.index}, so its "
                            "previous frame is missing from the data; it starts cold (no temporal fusion)"]
                runner.reset()
            prep = time.perf_counter() - start
            outputs = runner.step(f)
            engine_s = runner.engine.last_seconds
            # A camera-only model's picture reads the frame's sweep itself (frame_points).
        else:
            feeds, points, warnings = lidar_feeds(frame, cfg, self.pillars)
            prep = time.perf_counter() - start
            t0 = time.perf_counter()
            outputs = self.engine.run(feeds)
            engine_s = time.perf_counter() - t0
        occupancy = None
        if "occupancy" in outputs:
            from .detection.occupancy import occupancy_argmax

            occupancy = occupancy_argmax(outputs["occupancy"][0])
        return Prediction(self.postprocess(cfg, outputs), points, warnings, engine_s, prep, occupancy)


class _Timed:
    def __init__(self, engine):
        self.engine, self.last_seconds = engine, 0.0

    def run(self, feeds):
        t0 = time.perf_counter()
        out = self.engine.run(feeds)
        self.last_seconds = time.perf_counter() - t0
        return out


def box_frame_to_ego(recipe: Recipe, frame) -> np.ndarray:
    """(4, 4) from the frame the model's boxes are in to the ego frame."""
    from .models import ARCHITECTURES

    return np.eye(4) if ARCHITECTURES[recipe.arch].box_frame == "ego" else frame.lidar2ego


def frame_points(frame) -> np.ndarray | None:
    """A camera frame's LiDAR sweep where the dataset has one, to draw under the boxes."""
    if frame.lidar is None or not frame.lidar.path.is_file():
        return None
    from .data.points import read_points

    return read_points(frame.lidar.path, layout=frame.lidar.layout).points


def predict_frames(recipe: Recipe, engine, frames, *, pillars=None, rig=None,
                   description: str = "detecting", quiet: bool = False, on_frame=None) -> dict[str, list[dict]]:
    """Submission boxes per frame token for ``frames`` in order; ``on_frame(frame, prediction)`` sees each."""
    from .detection.submission import boxes_to_nuscenes, nuscenes_class_names

    names = nuscenes_class_names(recipe.model)
    predictor = Predictor(recipe, engine, pillars=pillars, rig=rig)
    results = {}
    for frame in track(frames, description, quiet=quiet, total=len(frames)):
        pred = predictor(frame)
        results[frame.token] = boxes_to_nuscenes(pred.boxes, names, frame.token, box_frame_to_ego(recipe, frame),
                                                 frame.ego2global)
        if on_frame is not None:
            on_frame(frame, pred)
    return results


@dataclass
class DetectResult:
    out_dir: Path
    summary: dict
    metrics: dict | None = None
    warnings: list[str] = field(default_factory=list)


def detect(model_dir: str | Path, inputs: str | Path, out: str | Path | None = None, *, model_file: str | None = None,
           scenes: list[str] | None = None, backend: str = "ort", max_frames: int | None = None,
           score_threshold: float = 0.3, pictures: bool = True, overwrite: bool = False,
           quiet: bool = False) -> DetectResult:
    """``score_threshold`` only decides which boxes the pictures and the per-class counts
    show; detections.json keeps every box the release's post-process keeps."""
    from .artifacts import atomic_directory, ensure_writable, write_json
    from .data.sources import camera_warnings, open_source
    from .detection.nuscenes_eval import evaluate_frames, render_markdown
    from .detection.submission import nuscenes_class_names, write_submission

    md = open_model_dir(model_dir, model_file=model_file, backend=backend)
    out = Path(out) if out is not None else md.path.with_name(md.path.name + "-detect")
    ensure_writable(out, overwrite=overwrite)
    source = open_source(inputs, md.recipe, scenes=scenes)
    frames = source.frames[:max_frames] if max_frames else source.frames
    engine = _engine(md.onnx, backend)
    names = nuscenes_class_names(md.recipe.model)
    from .models import camera_config, lidar_config

    camera, lidar = camera_config(md.recipe.model) is not None, lidar_config(md.recipe.model) is not None
    warnings: list[str] = camera_warnings(source) if camera else []
    stats = {"engine_ms": [], "preprocess_ms": [], "boxes": {}}
    rig = md.rig if camera else None
    gt_names = evaluation_classes(md.recipe.model)
    with atomic_directory(out, overwrite=overwrite) as scratch:
        def on_frame(frame, pred):
            warnings.extend(pred.warnings)
            stats["engine_ms"].append(pred.engine_seconds * 1e3)
            stats["preprocess_ms"].append(pred.preprocess_seconds * 1e3)
            shown = pred.boxes.take(pred.boxes.scores >= score_threshold)
            for label in shown.labels:
                stats["boxes"][names[int(label)]] = stats["boxes"].get(names[int(label)], 0) + 1
            if pictures:
                points = pred.points if pred.points is not None else frame_points(frame)
                _picture(scratch, md.recipe, frame, points, shown, names)
            if pred.occupancy is not None:
                _write_occupancy(scratch, md.recipe, frame, pred.occupancy)
                stats["occupancy_frames"] = stats.get("occupancy_frames", 0) + 1

        results = predict_frames(md.recipe, engine, frames, pillars=md.pillars, rig=rig, quiet=quiet,
                                 on_frame=on_frame)
        write_submission(scratch / "detections.json", results,
                         {"use_camera": camera, "use_lidar": lidar, "use_radar": False, "use_map": False,
                          "use_external": False})
        metrics = None
        if all(f.annotations is not None for f in frames):
            metrics = evaluate_frames(frames, results, class_names=gt_names)
            write_json(scratch / "metrics.json", metrics)
            (scratch / "metrics.md").write_text(f"# nuScenes detection metrics: {md.onnx.name} on {source.path}\n\n"
                                                f"{len(frames)} frames, classes {', '.join(gt_names)}.\n\n"
                                                + render_markdown(metrics))
        summary = _summary(md, source, frames, stats, metrics, warnings, score_threshold, backend)
        write_json(scratch / "summary.json", summary)
        (scratch / "summary.md").write_text(summary_markdown(summary, metrics))
    print_warnings(warnings, where=f"{out}/summary.md")
    return DetectResult(out, summary, metrics, warnings)


def _engine(onnx: Path, backend: str):
    if backend == "tensorrt":
        from .engines import tensorrt as trt_engine

        return trt_engine.build(onnx, precision="int8" if "qdq" in onnx.name else "fp32")
    if backend != "ort":
        raise InputError(f"backend '{backend}' is not one of ort, tensorrt")
    from .engines import ort as ort_engine

    return ort_engine.build(onnx)


def _picture(scratch: Path, recipe: Recipe, frame, points, shown, names) -> None:
    from .detection.bev_picture import bev_picture
    from .detection.submission import annotations_to_boxes

    to_ego = box_frame_to_ego(recipe, frame)
    if points is not None and to_ego is not frame.lidar2ego:
        # LiDAR points under boxes in the ego frame (BEVDepth)
        points = points.copy()
        points[:, :3] = points[:, :3] @ frame.lidar2ego[:3, :3].T + frame.lidar2ego[:3, 3]
    gt = None
    if frame.annotations is not None:
        gt = annotations_to_boxes(frame.annotations, names, to_ego, frame.ego2global)
    folder = scratch / "bev"
    folder.mkdir(exist_ok=True)
    forward = to_ego[:3, :3].T @ np.array([1.0, 0.0, 0.0])  # the ego's x axis in the boxes' frame
    bev_picture(folder / f"{frame.scene}_{frame.index:04d}.png", points=points, boxes=shown, gt=gt,
                point_cloud_range=_bev_range(recipe), class_names=names, ego_heading=float(np.arctan2(*forward[1::-1])),
                title=f"{frame.scene} frame {frame.index} ({frame.token})")


def _bev_range(recipe: Recipe):
    from .models import camera_config, lidar_config

    lidar = lidar_config(recipe.model)
    return tuple(lidar.voxelization.point_cloud_range) if lidar else tuple(camera_config(recipe.model).pc_range)


def _write_occupancy(scratch: Path, recipe: Recipe, frame, labels: np.ndarray) -> None:
    """occupancy/<token>.npz: labels (Dx, Dy, Dz) in the LiDAR frame, with the grid and class names."""
    occ = recipe.model.occ
    (scratch / "occupancy").mkdir(exist_ok=True)
    np.savez_compressed(scratch / "occupancy" / f"{frame.token}.npz", labels=labels,
                        range=np.asarray(occ.range, np.float32), class_names=np.asarray(occ.class_names))


def _summary(md: ModelDir, source, frames, stats, metrics, warnings, threshold, backend) -> dict:
    def ms(values):
        return {"mean": float(np.mean(values)), "p50": float(np.median(values))} if values else None

    return {"model": str(md.onnx), "recipe": md.recipe.name, "backend": backend, "source": source.describe(),
            "frames": len(frames), "scenes": list(dict.fromkeys(f.scene for f in frames)),
            "engine_ms": ms(stats["engine_ms"]), "preprocess_ms": ms(stats["preprocess_ms"]),
            "score_threshold": threshold, "boxes_per_class": dict(sorted(stats["boxes"].items())),
            **({"occupancy": {"frames": stats["occupancy_frames"], "dir": "occupancy/"}}
               if stats.get("occupancy_frames") else {}),
            "metrics": None if metrics is None else {"mAP": metrics["mAP"], "NDS": metrics["NDS"]},
            "warnings": grouped(warnings)}


def summary_markdown(summary: dict, metrics: dict | None) -> str:
    from .detection.nuscenes_eval import render_markdown
    from .report import markdown_table

    eng, prep = summary["engine_ms"] or {}, summary["preprocess_ms"] or {}
    lines = [f"# Detections: {Path(summary['model']).name} ({summary['recipe']})", "",
             f"{summary['frames']} frames of {len(summary['scenes'])} scenes from {summary['source']['path']} "
             f"({summary['source']['kind']}); {summary['backend']} engine {eng.get('mean', 0):.1f} ms per frame "
             f"(median {eng.get('p50', 0):.1f}), host preprocessing {prep.get('mean', 0):.1f} ms.", "",
             f"Boxes with score >= {summary['score_threshold']:g} (the pictures show these; detections.json keeps "
             "all):", "",
             markdown_table(["class", "boxes"], [[k, v] for k, v in summary["boxes_per_class"].items()] or
                            [["(none)", 0]]), ""]
    if summary.get("occupancy"):
        lines += [f"Occupancy of {summary['occupancy']['frames']} frames in `occupancy/<sample token>.npz` (labels "
                  "(Dx, Dy, Dz) in the LiDAR frame, the grid range and class names).", ""]
    if metrics is not None:
        lines += ["## nuScenes detection metrics", "", render_markdown(metrics), ""]
    if summary["warnings"]:
        lines += ["## Warnings", "", *(f"- {w}" for w in summary["warnings"]), ""]
    return "\n".join(lines)


callable_module(__name__, "deploykit.detect:detect")
