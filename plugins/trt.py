"""TensorRT plugins for deploykit's custom ONNX ops, written with TensorRT's Python plugin API.

TensorRT >= 10.6 has ``tensorrt.plugin`` ("quickly deployable plugins"): a plugin is a few
decorated Python functions, and the ONNX parser binds a node to it when the node's op_type
is the plugin's name and its string attribute ``plugin_namespace`` is the plugin's namespace
(deploykit.engines.tensorrt_plugins.with_plugin_attributes adds that attribute).

    import plugins.trt
    plugins.trt.load()          # once per process, before parsing the ONNX model

``load`` imports ``tensorrt.plugin`` (or takes a module that stands in for it, as the tests
do) and runs every op's ``define`` once, which registers "deploykit::<OpType>" for each op
in deploykit.ops.CUSTOM_OPS. Each definition lives next to its kernel, in
plugins/<op>/trt_plugin.py.

Nothing here imports TensorRT, torch or Triton when this module is imported. The helpers at
the bottom (``torch_view``, ``on_stream``) are what the plugins' JIT implementations call at
engine run time.
"""

import importlib

NAMESPACE = "deploykit"
MIN_TENSORRT = (10, 6)  # tensorrt.plugin (register / impl / autotune); aot_impl needs 10.9

# deploykit op type -> the module holding its plugin definition
DEFINITIONS = {
    "PillarScatter": "plugins.pillar_scatter.trt_plugin",
    "MultiScaleDeformableAttn": "plugins.msda.trt_plugin",
    "BEVPool": "plugins.bev_pool.trt_plugin",
    "DeformConv": "plugins.deform_conv.trt_plugin",
}


class TensorRTPluginsUnavailable(ImportError):
    """``tensorrt.plugin`` cannot be imported here (TensorRT missing, or older than 10.6)."""


def plugin_id(op_type: str) -> str:
    return f"{NAMESPACE}::{op_type}"


def plugin_ids() -> list[str]:
    """The ids ``load`` registers, "deploykit::<OpType>", in deploykit.ops.CUSTOM_OPS' order."""
    return [plugin_id(op) for op in DEFINITIONS]


def definition(op_type: str):
    """The module defining ``op_type``'s plugin (its ``define(trtp)``)."""
    if op_type not in DEFINITIONS:
        raise KeyError(f"no TensorRT plugin definition for {NAMESPACE}::{op_type}")
    return importlib.import_module(DEFINITIONS[op_type])


def _tensorrt_plugin():
    try:
        import tensorrt.plugin as trtp
    except ImportError as exc:
        version = _installed_version()
        found = f"TensorRT {version} is installed but has no tensorrt.plugin" if version else "TensorRT is not installed"
        raise TensorRTPluginsUnavailable(
            f"{found}: deploykit's TensorRT plugins need TensorRT >= {MIN_TENSORRT[0]}.{MIN_TENSORRT[1]} with its "
            "Python bindings (pip install 'tensorrt>=10.6', or deploykit[tensorrt], from NVIDIA's index on a machine "
            "with a CUDA GPU), plus torch with CUDA and triton for the kernels"
        ) from exc
    return trtp


def _installed_version() -> str | None:
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover
        return None
    for dist in ("tensorrt", "tensorrt-cu12", "tensorrt-cu13"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return None


# Modules (by id) whose plugins load() has defined, with the module kept alive so its id is not reused.
_LOADED: dict[int, tuple[object, list[str]]] = {}


def load(trtp=None) -> list[str]:
    """Register every deploykit plugin with ``trtp`` (default: ``tensorrt.plugin``) and return
    their ids. Idempotent per module: TensorRT refuses a second registration of an id, so
    later calls with the same module return at once."""
    if trtp is None:
        trtp = _tensorrt_plugin()
    key = id(trtp)
    if key in _LOADED and _LOADED[key][0] is trtp:
        return list(_LOADED[key][1])
    ids = []
    for op_type in DEFINITIONS:
        definition(op_type).define(trtp)
        ids.append(plugin_id(op_type))
    _LOADED[key] = (trtp, ids)
    return list(ids)


def loaded() -> bool:
    """Whether ``load()`` has registered the plugins with the real ``tensorrt.plugin``."""
    import sys

    real = sys.modules.get("tensorrt.plugin")
    return real is not None and id(real) in _LOADED and _LOADED[id(real)][0] is real


# ---------------------------------------------------------------------------------------
# Run-time helpers for the JIT implementations (called inside TensorRT's enqueue)


def torch_view(tensor):
    """A torch CUDA tensor over a ``tensorrt.plugin.Tensor``'s buffer (no copy), through its
    ``__cuda_array_interface__``. Zero-element tensors (DeformConv's absent mask and bias,
    BEVPool's empty intervals) come back as fresh empty tensors: their buffer may be null."""
    import numpy as np
    import torch

    iface = tensor.__cuda_array_interface__
    shape = tuple(int(d) for d in iface["shape"])
    if 0 in shape:
        dtype = torch.from_numpy(np.empty(0, np.dtype(iface["typestr"]))).dtype
        return torch.empty(shape, dtype=dtype, device="cuda")
    return torch.as_tensor(tensor, device="cuda")


def on_stream(stream: int, compute, inputs, output) -> None:
    """Run ``compute(*torch inputs)`` on TensorRT's CUDA stream ``stream`` and write its result
    into the plugin's output buffer ``output`` (a ``tensorrt.plugin.Tensor``)."""
    import torch

    with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
        views = [torch_view(t) for t in inputs]
        out = torch_view(output)
        result = compute(*views)
        if tuple(result.shape) != tuple(out.shape):
            raise RuntimeError(f"plugin kernel returned shape {tuple(result.shape)}, TensorRT allotted "
                               f"{tuple(out.shape)}")
        out.copy_(result)
