"""ONNX Runtime engines, with deploykit's custom nodes made runnable.

The exported ``model.onnx`` keeps each custom op as one ``deploykit::*`` node
(what TensorRT plugins and NPU toolchains bind to). ONNX Runtime has no kernel
for them, so ``prepare`` gives it one of three ways, chosen by ``custom_ops``:

  "function"  attach each op's ONNX model-local function; ORT inlines it.
  "inline"    attach and inline the functions here: a plain standard-op graph
              that any ONNX runtime can load.
  "ortx"      route the nodes to onnxruntime-extensions' Python kernels.

benchmarks/bench_lidar_rewrites.py measures them; "function" is the default
because it is the fastest there and keeps the file identical to what other
backends get.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnx.inliner

from ..errors import EngineError, InputError
from ..onnx_graph import int16_quantize_nodes
from ..ops import CUSTOM_OPS, DOMAIN, OPSET_VERSION
from . import CUSTOM_OP_MODES, TensorSpec

ORTX_DOMAIN = "ai.onnx.contrib"

_ORT_TYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(int32)": "int32", "tensor(int64)": "int64", "tensor(int8)": "int8",
    "tensor(uint8)": "uint8", "tensor(int16)": "int16", "tensor(bool)": "bool",
}


def custom_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.domain == DOMAIN]


def prepare(model: onnx.ModelProto, custom_ops: str = "function") -> onnx.ModelProto:
    """Return a copy of ``model`` that ONNX Runtime can run."""
    if custom_ops not in CUSTOM_OP_MODES:
        raise EngineError(f"unknown custom-op mode '{custom_ops}'; choose one of {', '.join(CUSTOM_OP_MODES)}")
    nodes = custom_nodes(model)
    if not nodes:
        return model
    unknown = sorted({n.op_type for n in nodes} - set(CUSTOM_OPS))
    if unknown:
        raise EngineError(f"no ONNX Runtime implementation for {DOMAIN}::{', '.join(unknown)}")
    model = onnx.ModelProto.FromString(model.SerializeToString())
    if custom_ops == "ortx":
        for node in custom_nodes(model):
            CUSTOM_OPS[node.op_type].register_ortx()
            node.domain = ORTX_DOMAIN
        _set_opset(model, ORTX_DOMAIN, 1)
        return model
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    # Specialised functions read their input shapes from the graph.
    model = onnx.shape_inference.infer_shapes(model)
    present = {f.name for f in model.functions if f.domain == DOMAIN}
    for node in custom_nodes(model):
        function = CUSTOM_OPS[node.op_type].function_for(node, model.graph, opset)
        node.op_type = function.name
        if function.name not in present:
            model.functions.append(function)
            present.add(function.name)
    _set_opset(model, DOMAIN, OPSET_VERSION)
    if custom_ops == "inline":
        model = onnx.inliner.inline_local_functions(model)
        del model.functions[:]
        # The lowerings bake shape inputs (spatial_shapes, level_start_index) in
        # as constants, which leaves those initializers unread.
        used = {name for n in model.graph.node for name in n.input}
        keep = [t for t in model.graph.initializer if t.name in used]
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
    return model


def _disabled_optimizers(model: onnx.ModelProto) -> list[str]:
    """ORT 1.32's Q/DQ propagation copies an int16 Q/DQ pair across Reshape and
    Transpose with a uint8 zero point ("output_dtype INT8 does not match
    y_zero_point type UINT8") and the session fails to load; int8 models are
    unaffected, so it is disabled only where int16 Q/DQ is present."""
    return ["QDQPropagationTransformer"] if int16_quantize_nodes(model.graph) else []


def _set_opset(model: onnx.ModelProto, domain: str, version: int) -> None:
    for o in model.opset_import:
        if o.domain == domain:
            o.version = version
            return
    model.opset_import.append(onnx.helper.make_opsetid(domain, version))


class OrtEngine:
    def __init__(self, session, source: str, custom_ops: str, threads: int):
        self.session = session
        self.source = source
        self.custom_ops = custom_ops
        self.threads = threads
        self.inputs = [_spec(i) for i in session.get_inputs()]
        self.outputs = [_spec(o) for o in session.get_outputs()]

    @property
    def backend(self) -> str:
        return "ort"

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.check_feeds(feeds)
        names = [o.name for o in self.outputs]
        return dict(zip(names, self.session.run(names, feeds)))

    def check_feeds(self, feeds: dict[str, np.ndarray]) -> None:
        for spec in self.inputs:
            if spec.name not in feeds:
                raise InputError(f"engine input '{spec.name}' is missing; it takes {', '.join(s.name for s in self.inputs)}")
            arr = feeds[spec.name]
            if tuple(arr.shape) != spec.shape or arr.dtype.name != spec.dtype:
                raise InputError(
                    f"engine input '{spec.name}' must be {spec.dtype}{list(spec.shape)}, "
                    f"got {arr.dtype.name}{list(arr.shape)}"
                )


def _spec(node) -> TensorSpec:
    shape = tuple(d if isinstance(d, int) else -1 for d in node.shape)
    return TensorSpec(node.name, shape, _ORT_TYPES.get(node.type, node.type))


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def build(model: str | Path | onnx.ModelProto, *, custom_ops: str = "function",
          threads: int | None = None, optimization: str = "all", profile: bool = False,
          spinning: bool = True) -> OrtEngine:
    """Build an ONNX Runtime CPU session. ``threads`` pins intra-op threads.
    ``spinning=False`` stops idle pool threads from busy-waiting: needed when
    several sessions are timed in alternation, where one session's spinning
    threads would steal the cores the next one runs on."""
    import onnxruntime as ort

    source = "<in-memory model>"
    if not isinstance(model, onnx.ModelProto):
        source = str(model)
        try:
            model = onnx.load(source)
        except Exception as exc:  # noqa: BLE001 - onnx raises many types for a bad file
            raise EngineError(f"cannot load {source} as ONNX: {str(exc).splitlines()[0][:200]}") from None
    prepared = prepare(model, custom_ops)
    opts = ort.SessionOptions()
    threads = threads or default_threads()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }[optimization]
    opts.enable_profiling = profile
    if profile:
        # ORT writes its trace into the working directory by default; a user's
        # checkout is no place for it. The caller reads and deletes the file.
        import tempfile

        opts.profile_file_prefix = str(Path(tempfile.mkdtemp(prefix="deploykit-profile-")) / "ort_profile")
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # ORT warns about initializers its own function inlining leaves unread (the
    # custom ops' constant shape inputs); errors still surface as exceptions.
    opts.log_severity_level = 3
    if custom_ops == "ortx" and custom_nodes(model):
        from onnxruntime_extensions import get_library_path

        opts.register_custom_ops_library(get_library_path())
    try:
        session = ort.InferenceSession(prepared.SerializeToString(), opts, providers=["CPUExecutionProvider"],
                                       disabled_optimizers=_disabled_optimizers(prepared))
    except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
        raise EngineError(f"ONNX Runtime cannot load {source}: {str(exc).splitlines()[0][:300]}") from None
    return OrtEngine(session, source, custom_ops, threads)
