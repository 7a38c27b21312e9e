"""deploykit: BEV perception checkpoints to fast, quantized, trusted engines.

Every CLI command is one call here (the CLI only parses options)::

    import deploykit
    deploykit.convert("centerpoint_pillar_nus", "build/cp", checkpoint="ckpt.pth")
    deploykit.calib("centerpoint_pillar_nus", "build/calib", source="data/nuscenes")
    deploykit.quantize(None, "build/cp", "build/cp-q", calib="build/calib")
    deploykit.bench("build/cp-q/model.qdq.onnx")
    deploykit.gate("benchmarks/baselines/x.json", "build/cp/model.onnx")
    deploykit.detect("build/cp-q", "data/nuscenes", "build/det")
    deploykit.compare_layers("build/cp:torch", "build/cp")   # where two versions part ways

Names are imported on first use, so ``import deploykit`` stays cheap.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Functions: name -> (module, attribute).
_FUNCTIONS = {
    "convert": ("deploykit.export", "convert"),
    "calib": ("deploykit.quantize.calib_set", "calib"),
    "update_baseline": ("deploykit.gate", "update_baseline"),
    "rig_from_nuscenes": ("deploykit.data.rig_from_nuscenes", "rig_from_nuscenes"),
    "load_recipe": ("deploykit.recipe", "load_recipe"),
    # `deploykit compare`; deploykit.compare is the per-output agreement module
    "compare_layers": ("deploykit.layerwise.run", "compare"),
}
# Modules that are also calls (deploykit.api.callable_module): deploykit.bench(...) runs bench_model.
_CALLABLE_MODULES = ("quantize", "bench", "gate", "detect")

__all__ = [*_FUNCTIONS, *_CALLABLE_MODULES, "__version__"]


def __getattr__(name: str):
    if name in _CALLABLE_MODULES:
        return importlib.import_module(f"deploykit.{name}")
    if name not in _FUNCTIONS:
        raise AttributeError(f"module 'deploykit' has no attribute {name!r}")
    module, attr = _FUNCTIONS[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
