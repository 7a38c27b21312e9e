"""What ``deploykit compare A B`` accepts, and the inputs both sides run on.

A side is ``PATH[:VIEW]``:

    CONVERT_DIR[:onnx]        its model.onnx (custom ops as deploykit::* nodes)
    CONVERT_DIR:standard_ops  its model.standard_ops.onnx
    CONVERT_DIR:torch         the original PyTorch model (the manifest's recipe and checkpoint)
    CONVERT_DIR:rewritten     the PyTorch model after the rewrite passes (weights.safetensors)
    QUANT_DIR[:onnx]          model.qdq.onnx (int8 + int16), else model.int8.qdq.onnx
    QUANT_DIR:int8 | :ort | :ort-int8 | :trt
                              model.int8.qdq.onnx, the ORT flavours, the TensorRT flavour
    QUANT_DIR:fake-quant      the fake-quant PyTorch model as calibrated (int16 overrides included)
    QUANT_DIR:fake-quant-int8 the same with every quantizer at 8 bits
    QUANT_DIR:torch | :rewritten
                              the float models of the directory it was quantized from
    FILE.onnx                 any ONNX file; FILE.onnx:tensorrt builds it with TensorRT (optional extra)

Inputs: by default the recipe's check samples (the ones ``convert`` checks on,
seeds CHECK_SEED + i), which hold both the engine inputs and the original
model's own (CenterPoint's original sees unpadded pillars); ``--inputs`` takes
an ``.npz`` of engine inputs (e.g. a convert directory's inputs.npz), a
calibration set directory, or the user's data as ``deploykit detect --inputs``
reads it (point-cloud files, camera frames, a nuScenes-layout dataset); those
hold engine inputs only, so the original model (``:torch``) cannot take them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..samples import Sample
from .taps import Tap

CONVERT_VIEWS = ("onnx", "standard_ops", "torch", "rewritten")
QUANT_VIEWS = ("onnx", "int8", "ort", "ort-int8", "trt", "fake-quant", "fake-quant-int8", "torch", "rewritten")
_QUANT_FILES = {"int8": "model.int8.qdq.onnx", "ort": "model.ort.qdq.onnx", "ort-int8": "model.ort.int8.qdq.onnx",
                "trt": "model.trt.qdq.onnx"}


@dataclass
class Side:
    label: str
    quantized: bool
    run: Callable[[list[dict[str, np.ndarray]]], list[list[Tap]]]
    original: bool = False          # takes Sample.reference, the released model's own inputs
    converted: Path | None = None   # the convert directory it belongs to (for the recipe and samples)


def _manifest(path: Path) -> dict | None:
    file = path / "manifest.json"
    return json.loads(file.read_text()) if file.is_file() else None


def _split(spec: str) -> tuple[Path, str | None]:
    path, _, view = spec.rpartition(":") if ":" in spec else (spec, "", "")
    if not path or "/" in view:  # "C:\..." or a path with a colon in it
        return Path(spec), None
    return Path(path), view or None


def open_side(spec: str, *, custom_ops: str = "function", optimization: str = "all") -> Side:
    path, view = _split(spec)
    if not path.exists():
        raise InputError(f"{spec}: {path} does not exist")
    if path.is_file():
        if path.suffix != ".onnx":
            raise InputError(f"{spec}: compare reads ONNX files and deploykit convert/quantize directories")
        if view not in (None, "onnx", "tensorrt"):
            raise InputError(f"{spec}: an ONNX file's view is :onnx or :tensorrt, not :{view}")
        parent = path.parent
        manifest = _manifest(parent) or {}
        converted = parent if manifest.get("stage") == "convert" else (
            Path(manifest["converted"]) if manifest.get("stage") == "quantize" else None)
        return _onnx_side(spec, path, (custom_ops, optimization), converted, tensorrt=view == "tensorrt")
    manifest = _manifest(path)
    stage = (manifest or {}).get("stage")
    if stage == "convert":
        view = view or "onnx"
        if view not in CONVERT_VIEWS:
            raise InputError(f"{spec}: a convert directory's views are {', '.join(CONVERT_VIEWS)}, not :{view}")
        if view in ("torch", "rewritten"):
            return _torch_side(spec, path, view)
        file = path / ("model.onnx" if view == "onnx" else "model.standard_ops.onnx")
        if not file.is_file():
            raise InputError(f"{spec}: {file.name} is missing" + (
                " (convert with --standard-ops to write it)" if view == "standard_ops" else ""))
        return _onnx_side(spec, file, (custom_ops, optimization), path)
    if stage == "quantize":
        view = view or "onnx"
        if view not in QUANT_VIEWS:
            raise InputError(f"{spec}: a quantize directory's views are {', '.join(QUANT_VIEWS)}, not :{view}")
        converted = Path(manifest["converted"])
        if view in ("torch", "rewritten"):
            return _torch_side(spec, converted, view)
        if view.startswith("fake-quant"):
            return _fake_quant_side(spec, path, converted, int8_only=view == "fake-quant-int8")
        name = _QUANT_FILES.get(view) or ("model.qdq.onnx" if (path / "model.qdq.onnx").is_file()
                                          else "model.int8.qdq.onnx")
        if not (path / name).is_file():
            raise InputError(f"{spec}: {name} is missing from {path}")
        return _onnx_side(spec, path / name, (custom_ops, optimization), converted)
    raise InputError(f"{spec}: {path} is neither a `deploykit convert` nor a `deploykit quantize` directory "
                     "(no manifest.json with a stage)")


def _is_quantized(path: Path) -> bool:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return any(n.op_type in ("QuantizeLinear", "QLinearConv", "QLinearMatMul") for n in model.graph.node)


def _onnx_side(label: str, path: Path, ort: tuple[str, str], converted: Path | None, tensorrt: bool = False) -> Side:
    from . import onnx_taps

    custom_ops, optimization = ort
    if tensorrt:
        from ..engines import tensorrt as trt_engine

        if not trt_engine.available():
            raise InputError(f"{label}: TensorRT is not installed (pip install 'deploykit[tensorrt]')")
        return Side(label, _is_quantized(path), lambda feeds: onnx_taps.record_tensorrt(path, feeds),
                    converted=converted)
    return Side(label, _is_quantized(path), lambda feeds: onnx_taps.record(path, feeds, custom_ops=custom_ops,
                                                                optimization=optimization),
                converted=converted)


def _torch_side(label: str, converted: Path, view: str) -> Side:
    from . import torch_taps

    model = original_model(converted) if view == "torch" else rewritten_model(converted)
    return Side(label, False, lambda feeds: [torch_taps.record(model, f) for f in feeds], original=view == "torch",
                converted=converted)


def _recipe(converted: Path):
    from ..export import converted_rig, recipe_of_converted

    recipe = recipe_of_converted(converted)
    return converted_rig(recipe, converted, _manifest(converted))


def rewritten_model(converted: Path):
    from ..quantize.pipeline import load_converted

    return load_converted(_recipe(converted), converted, allow_failed=True)[0]


def original_model(converted: Path):
    from ..export import load_model

    manifest = _manifest(converted)
    ckpt = manifest["checkpoint"]
    parts = (ckpt.get("meta") or {}).get("parts")
    checkpoint = {k: v["path"] for k, v in parts.items()} if parts else ckpt["path"]
    for p in (checkpoint.values() if isinstance(checkpoint, dict) else [checkpoint]):
        if not Path(p).is_file():
            raise InputError(f"{converted}:torch needs the checkpoint it was converted from, {p}, which is gone")
    return load_model(_recipe(converted), checkpoint)[0]


def _fake_quant_side(label: str, quant_dir: Path, converted: Path, int8_only: bool) -> Side:
    from . import torch_taps

    qmodel, lifted = fake_quant_model(quant_dir, converted)
    if int8_only and lifted:
        from ..quantize.insert import set_bits

        set_bits(qmodel, lifted, 8)
    return Side(label, True, lambda feeds: [torch_taps.record(qmodel, f) for f in feeds], converted=converted)


def fake_quant_model(quant_dir: Path, converted: Path):
    """The calibrated fake-quant model a quantize directory was written from, and its int16 quantizers."""
    import torch
    from safetensors.torch import load_file

    from ..quantize.fold_bn import fold_batchnorms
    from ..quantize.insert import insert_quantizers, quantizers, set_mode

    recipe = _recipe(converted)
    folded, _ = fold_batchnorms(rewritten_model(converted))
    qmodel = insert_quantizers(folded, recipe.quantize.calibrator, recipe.quantize.calibrator_overrides)
    state = load_file(str(quant_dir / "quant_state.safetensors"))
    described = json.loads((quant_dir / "quantizers.json").read_text())
    qs = quantizers(qmodel)
    for name, q in qs.items():
        if f"{name}.amax" in state:
            q.amax = state[f"{name}.amax"].float()
    with torch.no_grad():
        missing = qmodel.load_state_dict(state, strict=False).missing_keys
    if missing:
        raise InputError(f"{quant_dir}: quant_state.safetensors lacks {len(missing)} tensors of the model "
                         f"(e.g. {missing[0]}); quantize again")
    active = [d["name"] for d in described if d["name"] in qs]
    for d in described:
        if d["name"] in qs:
            qs[d["name"]].bits = d["bits"]
    set_mode(qmodel, "quant", active)
    lifted = [d["name"] for d in described if d["bits"] == 16 and d["name"] in qs]
    return qmodel.eval(), lifted


def load_inputs(inputs: str | Path | None, converted: Path, count: int) -> list[Sample]:
    """The samples both sides run on (see the module docstring)."""
    if inputs is None:
        from ..export import CHECK_SEED
        from ..models import make_sample

        recipe, model = _recipe(converted), rewritten_model(converted)
        return [make_sample(recipe, CHECK_SEED + i, model) for i in range(count)]
    path = Path(inputs)
    if not path.exists():
        raise InputError(f"--inputs {path} does not exist")
    if path.is_file() and path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as data:
                feeds = {k: data[k] for k in data.files}
        except (OSError, ValueError) as exc:
            raise InputError(f"--inputs {path} cannot be read as .npz ({exc})") from None
        return [Sample(feeds, feeds, {"file": str(path)})]
    from ..quantize.calib_set import INDEX, load_calib_set

    if (path / INDEX).is_file():
        calib = load_calib_set(path)
        if calib.temporal:
            raise InputError(f"--inputs {path}: a temporal calibration set stores no state inputs (prev_bev); "
                             "give the data it was made from, an .npz with every engine input, or leave --inputs out")
        samples = []
        for entry in calib.entries[:count]:
            s = calib.load_sample(entry)
            samples.append(Sample(s.arrays, s.arrays, {"file": s.file}))
        return samples
    return _data_samples(path, converted, count)


def _data_samples(path: Path, converted: Path, count: int) -> list[Sample]:
    """Frames of the user's data (what ``deploykit detect --inputs`` reads), made into engine
    inputs as quantize's held-out frames are: temporal models carry their state through each
    run of consecutive frames."""
    from ..camera.rig import load_rig
    from ..data.sources import open_source
    from ..export import pillar_format
    from ..models import camera_config
    from ..quantize.user_data import HeldOut

    recipe = _recipe(converted)
    source = open_source(path, recipe)
    if not source.frames:
        raise InputError(f"--inputs {path} holds no frames")
    camera = camera_config(recipe.model)
    data = HeldOut(recipe, source, source.frames, pillar_format(_manifest(converted)),
                   load_rig(camera.rig) if camera is not None else None, [])
    return [Sample(s.feeds, {}, s.info) for s in data.samples(rewritten_model(converted), count)]
