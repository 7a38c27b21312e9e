"""Binding deploykit's custom nodes to the TensorRT plugins in plugins/ (plugins.trt).

The TensorRT ONNX parser maps a node to a plugin registered through ``tensorrt.plugin``
when the node's op_type is the plugin's name and its string attribute ``plugin_namespace``
names the plugin's namespace ("deploykit"); ``plugin_version`` defaults to "1", the only
version ``tensorrt.plugin`` registers, so it is not written. The parser hands the plugin
those node attributes whose names the plugin declares (its ``register`` signature), each
an ONNX INT becoming a Python ``int``; any other attribute is ignored.

* ``with_plugin_attributes(model)``: a copy of the model for TensorRT, every deploykit::*
  node given plugin_namespace="deploykit". model.onnx itself stays as exported.
* ``check_plugins(model)``: the plugins' declared outputs (their ``register`` functions,
  evaluated on each node's static input shapes) against the shapes and dtypes the exporter
  recorded, and their attribute signatures against the node's attributes. Needs neither
  TensorRT nor a GPU: the register functions run against a small concrete stand-in for
  ``tensorrt.plugin`` (``ConcretePluginAPI``) in which shape expressions are integers.

Nothing here imports TensorRT.
"""

from __future__ import annotations

import inspect
import typing
from dataclasses import dataclass, field

import onnx
from onnx import AttributeProto, helper

from ..ops import CUSTOM_OPS, DOMAIN

PLUGIN_NAMESPACE = DOMAIN
# Attributes the parser reads to find the plugin (not passed to it).
BINDING_ATTRIBUTES = ("plugin_namespace", "plugin_version")

# ONNX attribute type -> the plugin attribute annotation the parser can feed from it.
_ATTRIBUTE_TYPES = {AttributeProto.INT: int, AttributeProto.FLOAT: float, AttributeProto.STRING: str}


def custom_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.domain == DOMAIN]


def with_plugin_attributes(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose deploykit::* nodes carry plugin_namespace="deploykit" (for
    TensorRT's ONNX parser; ONNX Runtime and other runtimes take the model as exported), their
    plugin attributes in the order the plugin's ``register`` declares them: TensorRT's AOT
    plugins hand the creation fields to ``aot_impl`` positionally, in the order received."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    order = {op: list(decl.attributes) for op, decl in declarations().items()}
    for node in custom_nodes(model):
        declared = order.get(node.op_type, [])
        kept = [a for a in node.attribute if a.name not in BINDING_ATTRIBUTES]
        kept.sort(key=lambda a: declared.index(a.name) if a.name in declared else len(declared))
        del node.attribute[:]
        node.attribute.extend(kept)
        node.attribute.append(helper.make_attribute("plugin_namespace", PLUGIN_NAMESPACE))
    return model


# ---------------------------------------------------------------------------------------
# A concrete stand-in for tensorrt.plugin: enough to evaluate register functions on ints


class _Dim:
    """A shape expression with a known value: the arithmetic tensorrt.plugin.ShapeExpr has
    (+ - * // with an int or another expression on the right; no reflected operators)."""

    def __init__(self, value: int):
        self.value = int(value)

    @staticmethod
    def _v(other) -> int:
        if isinstance(other, _Dim):
            return other.value
        if isinstance(other, int) and not isinstance(other, bool):
            return other
        raise TypeError(f"shape expressions combine with ints or shape expressions, not {type(other).__name__}")

    def __add__(self, other):
        return _Dim(self.value + self._v(other))

    def __sub__(self, other):
        return _Dim(self.value - self._v(other))

    def __mul__(self, other):
        return _Dim(self.value * self._v(other))

    def __floordiv__(self, other):
        return _Dim(self.value // self._v(other))

    def __repr__(self):
        return f"Dim({self.value})"


class _TensorDesc:
    def __init__(self, shape_expr, dtype):
        self.shape_expr = tuple(d if isinstance(d, _Dim) else _Dim(_Dim._v(d)) for d in shape_expr)
        self.dtype = dtype

    @property
    def ndim(self) -> int:
        return len(self.shape_expr)

    def like(self) -> _TensorDesc:
        return _TensorDesc(self.shape_expr, self.dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(d.value for d in self.shape_expr)


class _Placeholder:
    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs


@dataclass
class PluginDeclaration:
    plugin_id: str
    register: typing.Callable
    inputs: list[str]
    attributes: dict[str, type]
    functions: dict[str, typing.Callable] = field(default_factory=dict)  # impl / autotune / aot_impl

    def outputs(self, inputs: list[tuple[tuple[int, ...], int]], attributes: dict) -> list[tuple[tuple[int, ...], int]]:
        """(shape, dtype) of each output for inputs given as (shape, dtype)."""
        descs = [_TensorDesc(shape, dtype) for shape, dtype in inputs]
        result = self.register(*descs, **attributes)
        result = result if isinstance(result, tuple) else (result,)
        return [(d.shape, d.dtype) for d in result]


class ConcretePluginAPI:
    """What plugins/<op>/trt_plugin.py's ``define`` uses of ``tensorrt.plugin``, with
    integer shapes: register functions are recorded and can be evaluated; impl, autotune
    and aot_impl functions are recorded only. dtypes are whatever the caller passes in the
    input descriptors (check_plugins passes ONNX element types)."""

    TensorDesc = _TensorDesc
    Tensor = _Placeholder
    AutoTuneCombination = _Placeholder
    KernelLaunchParams = _Placeholder
    SymExprs = _Placeholder
    SymIntExprs = _Placeholder
    SymInt32 = _Placeholder

    def __init__(self):
        self.plugins: dict[str, PluginDeclaration] = {}

    def register(self, plugin_id: str, lazy_register: bool = False):
        def decorator(fn):
            if plugin_id in self.plugins:
                raise ValueError(f"{plugin_id} is already registered")
            params = list(inspect.signature(fn).parameters.values())
            inputs = [p.name for p in params if p.annotation is _TensorDesc]
            attributes = {p.name: p.annotation for p in params if p.annotation is not _TensorDesc}
            self.plugins[plugin_id] = PluginDeclaration(plugin_id, fn, inputs, attributes)
            return fn

        return decorator

    def _recorder(self, kind: str, plugin_id: str):
        def decorator(fn):
            if plugin_id not in self.plugins:
                raise ValueError(f"{plugin_id} is not registered")
            self.plugins[plugin_id].functions[kind] = fn
            return fn

        return decorator

    def impl(self, plugin_id: str):
        return self._recorder("impl", plugin_id)

    def autotune(self, plugin_id: str):
        return self._recorder("autotune", plugin_id)

    def aot_impl(self, plugin_id: str):
        return self._recorder("aot_impl", plugin_id)

    @staticmethod
    def from_shape_expr(shape_expr, dtype) -> _TensorDesc:
        return _TensorDesc(shape_expr, dtype)

    @staticmethod
    def cdiv(a, b) -> _Dim:
        return _Dim(-(-_Dim._v(a) // _Dim._v(b)))

    @staticmethod
    def max(a, b) -> _Dim:
        return _Dim(max(_Dim._v(a), _Dim._v(b)))

    @staticmethod
    def min(a, b) -> _Dim:
        return _Dim(min(_Dim._v(a), _Dim._v(b)))


def declarations() -> dict[str, PluginDeclaration]:
    """The plugins' declarations by op type, recorded by running plugins.trt.load on a
    ConcretePluginAPI (no TensorRT involved)."""
    import plugins.trt

    api = ConcretePluginAPI()
    plugins.trt.load(api)
    return {pid.split("::", 1)[1]: decl for pid, decl in api.plugins.items()}


# ---------------------------------------------------------------------------------------
# check_plugins


def _static_types(model: onnx.ModelProto) -> dict[str, tuple[tuple[int, ...] | None, int]]:
    """name -> (static shape or None, ONNX element type) for every typed value in the graph."""
    try:
        # data_prop folds Shape -> Gather -> Concat chains into Reshape targets, which QDQ
        # exports (no value_info of their own) need for the shapes in front of custom nodes.
        model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # noqa: BLE001, S110 - custom domains can trip shape inference; the exporter's types remain
        pass
    graph = model.graph
    types: dict[str, tuple[tuple[int, ...] | None, int]] = {}
    for v in [*graph.input, *graph.value_info, *graph.output]:
        t = v.type.tensor_type
        if not t.HasField("elem_type"):
            continue
        shape = None
        if t.HasField("shape") and all(d.HasField("dim_value") for d in t.shape.dim):
            shape = tuple(int(d.dim_value) for d in t.shape.dim)
        types[v.name] = (shape, t.elem_type)
    for init in graph.initializer:
        types[init.name] = (tuple(int(d) for d in init.dims), init.data_type)
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            t = node.attribute[0].t
            types[node.output[0]] = (tuple(int(d) for d in t.dims), t.data_type)
    return types


def _type_name(elem_type: int) -> str:
    return onnx.TensorProto.DataType.Name(elem_type).lower()


def check_plugins(model: onnx.ModelProto, declared: dict[str, PluginDeclaration] | None = None) -> list[str]:
    """Problems binding ``model``'s deploykit::* nodes to the TensorRT plugins, one line each
    (empty: every node has a plugin whose attributes match the node's and whose declared
    outputs equal the exporter's shapes and dtypes). ``declared``: plugin declarations by
    op type (default: ``declarations()``)."""
    declared = declarations() if declared is None else declared
    nodes = custom_nodes(model)
    if not nodes:
        return []
    types = _static_types(model)
    problems = []
    for node in nodes:
        where = f"{DOMAIN}::{node.op_type} node '{node.name or node.output[0]}'"
        decl = declared.get(node.op_type)
        if decl is None:
            known = "" if node.op_type in CUSTOM_OPS else " (not one of deploykit.ops.CUSTOM_OPS)"
            problems.append(f"{where}: no TensorRT plugin {PLUGIN_NAMESPACE}::{node.op_type}{known}")
            continue
        attrs = {a.name: a for a in node.attribute if a.name not in BINDING_ATTRIBUTES}
        values = {}
        for name, annotation in decl.attributes.items():
            if name not in attrs:
                problems.append(f"{where}: the plugin takes attribute '{name}' ({annotation.__name__}), the node has "
                                "none")
                continue
            a = attrs[name]
            if _ATTRIBUTE_TYPES.get(a.type) is not annotation:
                problems.append(f"{where}: attribute '{name}' is {AttributeProto.AttributeType.Name(a.type)}, the "
                                f"plugin takes {getattr(annotation, '__name__', annotation)}")
                continue
            values[name] = helper.get_attribute_value(a)
            if isinstance(values[name], bytes):
                values[name] = values[name].decode()
        for name in sorted(set(attrs) - set(decl.attributes)):
            problems.append(f"{where}: attribute '{name}' is not a plugin attribute (TensorRT would drop it)")
        if len(node.input) != len(decl.inputs):
            problems.append(f"{where}: {len(node.input)} inputs, the plugin takes {len(decl.inputs)} "
                            f"({', '.join(decl.inputs)})")
            continue
        inputs = []
        for name, label in zip(node.input, decl.inputs):
            shape, dtype = types.get(name, (None, None))
            if shape is None or dtype is None:
                problems.append(f"{where}: no static shape recorded for input {label} ('{name}')")
            inputs.append((shape, dtype))
        if len(inputs) != sum(1 for s, d in inputs if s is not None and d is not None) or len(values) != len(
                decl.attributes):
            continue
        try:
            outputs = decl.outputs(inputs, values)
        except Exception as exc:  # noqa: BLE001 - a descriptor that fails is the problem being reported
            problems.append(f"{where}: the plugin's register function fails on its inputs: "
                            f"{type(exc).__name__}: {exc}")
            continue
        if len(outputs) != len(node.output):
            problems.append(f"{where}: the plugin declares {len(outputs)} outputs, the node has {len(node.output)}")
            continue
        for name, (shape, dtype) in zip(node.output, outputs):
            want_shape, want_dtype = types.get(name, (None, None))
            if want_shape is None or want_dtype is None:
                problems.append(f"{where}: no static shape recorded for output '{name}' to check the plugin against")
                continue
            if shape != want_shape:
                problems.append(f"{where}: the plugin declares output '{name}' {list(shape)}, the model has "
                                f"{list(want_shape)}")
            if dtype != want_dtype:
                problems.append(f"{where}: the plugin declares output '{name}' {_type_name(dtype)}, the model has "
                                f"{_type_name(want_dtype)}")
    return problems
