"""TensorRT backend, where TensorRT is installed (``pip install deploykit[tensorrt]``
on a machine with NVIDIA's index and a GPU).

Importing this module never needs TensorRT; ``build`` says what to install when
it is missing. It parses the ONNX file (static shapes, as deploykit exports),
builds a serialized engine for the requested precision, and runs it with
PyTorch CUDA tensors as device buffers (TensorRT 10's name-based
``set_tensor_address`` / ``execute_async_v3``).

* ``precision="int8"`` takes deploykit's QDQ models (model.trt.qdq.onnx: Q/DQ
  placed for TensorRT, int16 regions as float islands) and enables int8 with
  fp16 fallback: the scales come from the Q/DQ nodes, no calibrator runs.
* deploykit's custom nodes (``deploykit::*``) run as deploykit's Python
  plugins (plugins/, ``tensorrt.plugin``, TensorRT >= 10.6): ``build`` registers
  them (``plugins.trt.load()``), checks them against the model and parses a copy
  with ``plugin_namespace`` on those nodes. A plugin library (``plugins=``) can
  be given instead; or build ``model.standard_ops.onnx`` (``convert
  --standard-ops``), where they are lowered to standard ONNX ops.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import numpy as np

from ..errors import EngineError, InputError
from . import TensorSpec

PRECISIONS = ("fp32", "fp16", "int8")
CUSTOM_DOMAIN = "deploykit"


def available() -> bool:
    return importlib.util.find_spec("tensorrt") is not None


def custom_nodes(model_path: Path) -> list[str]:
    """The deploykit custom op types a model uses: what a TensorRT build needs plugins for."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    return sorted({n.op_type for n in model.graph.node if n.domain == CUSTOM_DOMAIN})


PLUGIN_IMPLS = ("aot", "jit")


def build(model: str | Path, *, precision: str = "fp32", workspace_gib: float = 4.0,
          plugins: tuple[str | Path, ...] = (), python_plugins: bool | None = None,
          plugin_impl: str = "aot") -> "TrtEngine":
    """``python_plugins``: run the custom nodes with deploykit's tensorrt.plugin plugins;
    None (default): when the model has custom nodes and no plugin library is given.
    ``plugin_impl``: which of their implementations TensorRT takes: "aot" (the Triton
    kernels compiled to PTX into the engine, launched without Python; TensorRT >= 10.9, else
    JIT) or "jit" (a Python callback per run)."""
    model = Path(model)
    if plugin_impl not in PLUGIN_IMPLS:
        raise EngineError(f"plugin_impl must be one of {', '.join(PLUGIN_IMPLS)}, not {plugin_impl}")
    if precision not in PRECISIONS:
        raise EngineError(f"TensorRT precision must be one of {', '.join(PRECISIONS)}, not {precision}")
    if not available():
        raise EngineError("TensorRT is not installed here; install it from NVIDIA's index "
                          "(pip install deploykit[tensorrt]) on a machine with a GPU, or use --backend ort")
    if not model.is_file():
        raise EngineError(f"model {model} does not exist")
    missing = custom_nodes(model)
    if python_plugins is None:
        python_plugins = bool(missing) and not plugins
    if missing and not plugins and not python_plugins:
        raise EngineError(f"{model} has deploykit custom nodes ({', '.join(missing)}) and no plugins were "
                          "given; use python_plugins=True, pass the plugin .so, or build model.standard_ops.onnx "
                          "(convert --standard-ops)")
    import ctypes

    import tensorrt as trt
    import torch

    if not torch.cuda.is_available():
        raise EngineError("TensorRT needs a CUDA GPU, and PyTorch sees none")
    for lib in plugins:
        ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
    tagged = _with_python_plugins(model) if python_plugins and missing else None
    logger = trt.Logger(trt.Logger.WARNING)
    trt.init_libnvinfer_plugins(logger, "")
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt, plugin_impl))  # explicit batch is TensorRT 10's only mode
    parser = trt.OnnxParser(network, logger)
    parsed = parser.parse(tagged, str(model)) if tagged is not None else parser.parse_from_file(str(model))
    if not parsed:
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"TensorRT cannot parse {model}: {errors[:400]}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
    if precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)  # scales from the Q/DQ nodes
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(f"TensorRT could not build an engine from {model} at {precision}")
    engine = trt.Runtime(logger).deserialize_cuda_engine(serialized)
    return TrtEngine(engine, str(model), precision)


def _network_flags(trt, plugin_impl: str) -> int:
    """tensorrt.plugin insists on a preference when a plugin has both implementations (ours
    do from TensorRT 10.9); older TensorRT has neither the flags nor aot_impl."""
    name = "PREFER_AOT_PYTHON_PLUGINS" if plugin_impl == "aot" else "PREFER_JIT_PYTHON_PLUGINS"
    flag = getattr(trt.NetworkDefinitionCreationFlag, name, None)
    return 0 if flag is None else 1 << int(flag)


def _with_python_plugins(model: Path) -> bytes:
    """Register deploykit's Python plugins and return the model, checked against them, with
    plugin_namespace on its custom nodes (serialized, for the parser)."""
    import onnx

    from .tensorrt_plugins import check_plugins, with_plugin_attributes

    definitions = importlib.import_module("plugins.trt")  # the package, not the ``plugins`` argument
    try:
        definitions.load()
    except definitions.TensorRTPluginsUnavailable as exc:
        raise EngineError(str(exc)) from None
    proto = onnx.load(str(model))
    problems = check_plugins(proto)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise EngineError(f"deploykit's TensorRT plugins do not fit {model}: {problems[0]}{more}")
    return with_plugin_attributes(proto).SerializeToString()


class TrtEngine:
    backend = "tensorrt"

    def __init__(self, engine, source: str, precision: str):
        import tensorrt as trt
        import torch

        self.engine, self.source, self.precision = engine, source, precision
        self.context = engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        self.inputs, self.outputs, self._buffers = [], [], {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            shape = tuple(engine.get_tensor_shape(name))
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name))).name
            spec = TensorSpec(name, shape, dtype)
            is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            (self.inputs if is_input else self.outputs).append(spec)
            self._buffers[name] = torch.empty(shape, dtype=getattr(torch, dtype), device="cuda")  # numpy names = torch names
            self.context.set_tensor_address(name, self._buffers[name].data_ptr())

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        for spec in self.inputs:
            if spec.name not in feeds:
                raise InputError(f"engine input '{spec.name}' is missing")
            arr = feeds[spec.name]
            if tuple(arr.shape) != spec.shape:
                raise InputError(f"engine input '{spec.name}' must be {list(spec.shape)}, got {list(arr.shape)}")
        with torch.cuda.stream(self.stream):  # copies and the run in one stream: ordered
            for spec in self.inputs:
                host = torch.from_numpy(np.ascontiguousarray(feeds[spec.name], dtype=spec.dtype))
                self._buffers[spec.name].copy_(host)
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise EngineError(f"TensorRT failed to run {self.source}")
        self.stream.synchronize()
        return {o.name: self._buffers[o.name].cpu().numpy() for o in self.outputs}
