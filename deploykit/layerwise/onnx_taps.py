"""An ONNX graph's scope outputs: which tensors to mark, and reading them back.

Every tensor that leaves a scope (produced by a node in it, read by a node
outside it or by the graph's caller) is a tap of that scope. Marking a tensor
as a graph output stops ONNX Runtime from fusing across it, so in a Q/DQ graph
the float tensor a QuantizeLinear reads is read at the Q's int8 output instead
(dequantized here with the Q's scale and zero point): that is the value the
int8 kernels hold, and the DQ -> op -> Q groups ORT fuses stay intact. The
graph runs in Polygraphy's ONNX Runtime runner on a session deploykit builds
(its custom nodes made runnable, deploykit.engines.ort).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from ..onnx_graph import constant_tensors, constant_value
from .scopes import ancestors, is_quantizer, module_path, node_scope, recover_scopes, within
from .taps import Tap

_SKIP_OPS = {"Constant", "Shape", "Size", "QuantizeLinear", "DequantizeLinear"}
_INT_MIN = {np.dtype(np.uint8): 0, np.dtype(np.int8): -128, np.dtype(np.uint16): 0, np.dtype(np.int16): -32768}


@dataclass(frozen=True)
class TapPlan:
    key: str
    tensor: str   # the tensor marked as an output
    ident: str    # the tensor the tap stands for (before any Q)
    order: int
    inputs: tuple = ()  # the nearest tapped tensors its producer reads
    scale: np.ndarray | None = None  # dequantize the marked tensor with these
    zero_point: np.ndarray | None = None
    axis: int | None = None
    clamped: bool = False
    quantizer: str | None = None


def plan(model: onnx.ModelProto) -> list[TapPlan]:
    graph = model.graph
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    consts = constant_tensors(graph)
    scopes = recover_scopes(graph.node, {t.name for t in graph.initializer}, outputs)
    scope_of = {id(n): s for n, s in zip(graph.node, scopes)}
    taps: list[TapPlan] = []
    tapped: set[str] = set()
    for order, node in enumerate(graph.node):
        scope = scopes[order]
        if scope is None or node.op_type in _SKIP_OPS:
            continue
        keys = [a for a in ancestors(scope) if not is_quantizer(a)]
        for tensor in node.output:
            readers = consumers.get(tensor, [])
            if not tensor or (not readers and tensor not in outputs):
                continue
            # A reader in no module (a Constant's user, a node no scope was recovered for)
            # says nothing about where the tensor goes.
            where = [scope_of[id(r)] for r in readers if scope_of[id(r)] is not None]
            read = _through_quantizer(tensor, readers, consts)
            for key in keys:
                if tensor in outputs or any(not within(w, key) for w in where):
                    taps.append(TapPlan(key=key, ident=tensor, order=order, **read))
                    tapped.add(tensor)
    sources = _sources(graph, tapped)
    producer = {o: n for n in graph.node for o in n.output}
    return [dataclasses.replace(p, inputs=tuple(frozenset().union(
        *(sources.get(x, ()) for x in producer[p.ident].input)))) for p in taps]


def _sources(graph: onnx.GraphProto, tapped: set[str]) -> dict[str, frozenset]:
    """Per tensor, the nearest tapped tensors it derives from (itself, if tapped)."""
    sources: dict[str, frozenset] = {}
    for node in graph.node:  # topological order
        inherited = frozenset().union(*(sources.get(x, ()) for x in node.input))
        for out in node.output:
            sources[out] = frozenset([out]) if out in tapped else inherited
    return sources


def _through_quantizer(tensor: str, readers: list[onnx.NodeProto], consts) -> dict:
    q = next((r for r in readers if r.op_type == "QuantizeLinear" and r.input[0] == tensor), None)
    if q is None or len(q.input) < 3 or q.input[1] not in consts or q.input[2] not in consts:
        return {"tensor": tensor}
    zero = constant_value(consts, q.input[2])
    axis = next((a.i for a in q.attribute if a.name == "axis"), None)
    low = _INT_MIN.get(zero.dtype)
    return {"tensor": q.output[0], "quantizer": _quantizer_path(q.name), "scale": constant_value(consts, q.input[1]).astype(np.float32),
            "zero_point": zero, "axis": axis if zero.size > 1 else None,
            "clamped": low is not None and zero.size == 1 and int(zero.reshape(())) == low}


def _quantizer_path(node_name: str) -> str | None:
    """The quantizer module a Q node was exported from (ORT's flavour nests its nodes below it)."""
    scope = node_scope(node_name)
    own = [a for a in ancestors(scope) if is_quantizer("/" + a.rsplit("/", 1)[-1])] if scope else []
    return module_path(own[-1]) if own else None


def with_outputs(model: onnx.ModelProto, tensors: list[str]) -> onnx.ModelProto:
    marked = onnx.ModelProto.FromString(model.SerializeToString())
    present = {o.name for o in marked.graph.output}
    for name in dict.fromkeys(tensors):
        if name not in present:
            marked.graph.output.append(onnx.ValueInfoProto(name=name))
    return marked


def _dequantize(value: np.ndarray, p: TapPlan) -> np.ndarray:
    if p.scale is None:
        return value
    scale, zero = p.scale, p.zero_point.astype(np.float32)
    if p.axis is not None:
        shape = [1] * value.ndim
        shape[p.axis] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    return ((value.astype(np.float32) - zero) * scale).astype(np.float32)


def record(model: str | Path | onnx.ModelProto, feeds: list[dict[str, np.ndarray]], *,
           custom_ops: str = "function", optimization: str = "all") -> list[list[Tap]]:
    """Run the graph with every planned tap marked; one list of taps per feed set.
    ``optimization="none"`` runs the graph as written: no fused int8 kernels, so a Q/DQ
    graph computes exactly its own semantics (what the fake-quant model computes)."""
    from polygraphy.backend.onnxrt import OnnxrtRunner

    from ..engines import ort as ort_engine

    model = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
    plans = plan(model)
    engine = ort_engine.build(with_outputs(model, [p.tensor for p in plans]), custom_ops=custom_ops,
                              optimization=optimization)
    results = []
    with OnnxrtRunner(engine.session) as runner:
        for feed in feeds:
            engine.check_feeds(feed)
            results.append(_taps(plans, runner.infer(feed)))
    return results


def record_tensorrt(path: Path, feeds: list[dict[str, np.ndarray]]) -> list[list[Tap]]:
    """As ``record``, on a TensorRT engine built from the marked graph (every marked tensor
    stops TensorRT fusing across it, as Polygraphy's ``--trt-outputs mark all`` does)."""
    import tempfile

    from ..engines import tensorrt as trt_engine

    model = onnx.load(str(path))
    plans = plan(model)
    with tempfile.TemporaryDirectory(prefix="deploykit-compare-") as tmp:
        marked = Path(tmp) / path.name
        onnx.save(with_outputs(model, [p.tensor for p in plans]), str(marked))
        engine = trt_engine.build(marked)
    return [_taps(plans, engine.run(feed)) for feed in feeds]


def _taps(plans: list[TapPlan], values: dict) -> list[Tap]:
    taps = []
    for p in plans:
        if p.tensor not in values:
            continue
        value = np.asarray(values[p.tensor])
        if p.scale is None and not np.issubdtype(value.dtype, np.floating):
            continue
        grid = None
        if p.scale is not None:
            info = np.iinfo(value.dtype)
            grid = (p.scale, p.zero_point.astype(np.float32), info.min, info.max, p.axis)
        taps.append(Tap(p.key, _dequantize(value, p), p.ident, p.order, quantized=p.scale is not None,
                        clamped=p.clamped, grid=grid, quantizer=p.quantizer, inputs=p.inputs))
    return taps
