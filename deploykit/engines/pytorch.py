"""PyTorch backend: a converted model's own rewritten PyTorch modules and weights.

``build(onnx_path)`` takes a ``deploykit convert`` directory's model.onnx (or the
directory) and rebuilds the model it was exported from (the recipe, the passes,
weights.safetensors), on the CPU or a CUDA GPU. On CUDA the custom ops run
deploykit's GPU kernels (plugins/, registered as torch.library ops) where they are
installed, else their PyTorch reference; ``engine.kernels`` says which. Timing is
host to host, like the TensorRT backend: feeds copied in, outputs copied out, the
device synchronised each run.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import EngineError, InputError
from . import TensorSpec

DEVICES = ("auto", "cpu", "cuda")


def build(model: str | Path, *, device: str = "auto", threads: int | None = None) -> "TorchEngine":
    import torch

    from ..export import recipe_of_converted
    from ..quantize.pipeline import load_converted

    path = Path(model)
    directory = path if path.is_dir() else path.parent
    manifest_path = directory / "manifest.json"
    if not manifest_path.is_file():
        raise EngineError(f"--backend torch rebuilds a converted model from its directory; {directory} has no "
                          "manifest.json (give a `deploykit convert` output's model.onnx)")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("stage") != "convert":
        raise EngineError(f"{directory} is a `deploykit {manifest.get('stage')}` output; --backend torch times the "
                          "converted float model: give the convert directory's model.onnx")
    if device not in DEVICES:
        raise EngineError(f"device must be one of {', '.join(DEVICES)}, not {device}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise EngineError("--device cuda: PyTorch sees no CUDA GPU here; use --device cpu")
    if threads:
        torch.set_num_threads(threads)
    model_, manifest = load_converted(recipe_of_converted(directory), directory)
    return TorchEngine(model_.to(device).eval(), manifest, device, str(directory))


class TorchEngine:
    backend = "torch"

    def __init__(self, model, manifest: dict, device: str, source: str):
        import torch

        self.model, self.device, self.source = model, device, source
        self.threads = torch.get_num_threads()
        self.inputs = [TensorSpec(i["name"], tuple(i["shape"]), i["dtype"]) for i in manifest["inputs"]]
        self.outputs = [TensorSpec(o["name"], tuple(o["shape"]), o["dtype"]) for o in manifest["outputs"]]
        from ..ops.kernels import available_kernels

        self.kernels = available_kernels() if device == "cuda" else {}

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        args = []
        for spec in self.inputs:
            if spec.name not in feeds:
                raise InputError(f"engine input '{spec.name}' is missing")
            arr = np.ascontiguousarray(feeds[spec.name], dtype=spec.dtype)
            if tuple(arr.shape) != spec.shape:
                raise InputError(f"engine input '{spec.name}' must be {list(spec.shape)}, got {list(arr.shape)}")
            args.append(torch.from_numpy(arr).to(self.device))
        with torch.no_grad():
            outs = self.model(*args)
        if self.device == "cuda":
            torch.cuda.synchronize()
        return {spec.name: t.cpu().numpy() for spec, t in zip(self.outputs, outs)}
