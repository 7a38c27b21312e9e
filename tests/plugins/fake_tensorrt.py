"""A small stand-in for ``tensorrt.plugin``, to run plugins/<op>/trt_plugin.py's ``define`` in CI.

It checks our descriptor logic, not TensorRT. What it mirrors of tensorrt.plugin (10.x, read
from its Python sources) and enforces:

* ``register``: type hints on every argument, real classes (not strings); TensorDesc
  arguments first, then attributes of int / float / str / bool / bytes (numpy arrays are
  not used by deploykit and not modelled); no defaults; no attribute named outputs, stream
  or tactic; a return annotation of TensorDesc or Tuple[TensorDesc, ...]; a namespace that
  is not reserved and ids without dots; one registration per id.
* ``impl`` / ``autotune`` / ``aot_impl``: the argument-name schema TensorRT validates:
  (inputs..., a subset of the attributes in register order..., outputs, stream[, tactic])
  for impl, (inputs..., attributes..., outputs) for autotune, (inputs..., every attribute...,
  outputs, tactic) for aot_impl, which TensorRT calls with the creation fields positionally in
  the order they arrive (``aot``); annotated attributes must have register's types.
* shape expressions: + - * // with an int or an expression on the right only (TensorRT's
  ShapeExpr has no reflected operators), ``cdiv`` / ``max`` / ``min`` as functions; using
  one as a bool raises (in TensorRT it would be an expression, never a value to branch on).
  Register functions also run in TensorRT's "fake" mode (``output_dtypes``): dtypes known,
  shapes not, as TensorRT's get_output_data_types calls them.
* ``AutoTuneCombination``: comma-separated per-I/O type lists ("FP32|FP16", "INT32"),
  layouts "LINEAR" (one for all or one per I/O).

``new()`` gives a fresh module-like object (its own registry); ``evaluate`` runs a register
function on concrete input descriptors.
"""

import inspect
import typing

RESERVED_NAMESPACES = {"", "trt", "tensorrt", "std"}
DISALLOWED_ATTRIBUTE_NAMES = {"outputs", "stream", "tactic"}
ATTRIBUTE_TYPES = (int, float, str, bool, bytes)


class DataType:
    def __init__(self, name: str, numpy_name: str):
        self.name, self.numpy_name = name, numpy_name

    def __repr__(self):
        return f"DataType.{self.name}"


float32 = DataType("FLOAT", "float32")
float16 = DataType("HALF", "float16")
int8 = DataType("INT8", "int8")
int32 = DataType("INT32", "int32")
int64 = DataType("INT64", "int64")
DTYPES = {d.numpy_name: d for d in (float32, float16, int8, int32, int64)}
# AutoTuneCombination's type names (trt.DataType names, FP32/FP16 for the floats)
TYPE_NAMES = {"FP32": float32, "FLOAT": float32, "FP16": float16, "HALF": float16, "INT8": int8, "INT32": int32,
              "INT64": int64}
LAYOUTS = {"LINEAR", "CHW2", "HWC8", "CHW4", "CHW16", "CHW32", "DHWC8", "CDHW32", "HWC", "DLA_LINEAR", "DLA_HWC4",
           "HWC16", "DHWC"}


class ShapeExpr:
    """A dimension: its value (None in fake mode, where every operation stays unknown)."""

    def __init__(self, value=None):
        if isinstance(value, ShapeExpr):
            value = value.value
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise TypeError(f"ShapeExpr takes an int or a ShapeExpr, not {type(value).__name__}")
        self.value = value

    @property
    def is_fake(self) -> bool:
        return self.value is None

    @property
    def is_constant(self) -> bool:
        if self.value is None:
            raise RuntimeError("is_constant is not accessible for fake ShapeExprs (check is_fake)")
        return True  # the stand-in only models static shapes

    def constant_value(self) -> int:
        if not self.is_constant:  # pragma: no cover - static shapes only
            raise RuntimeError("not a constant")
        return self.value

    def _op(self, other, fn):
        if not isinstance(other, (int, ShapeExpr)) or isinstance(other, bool):
            raise TypeError(f"unsupported operand for ShapeExpr: {type(other).__name__}")
        other = other if isinstance(other, ShapeExpr) else ShapeExpr(other)
        if self.value is None or other.value is None:
            return ShapeExpr()
        return ShapeExpr(fn(self.value, other.value))

    def __add__(self, other):
        return self._op(other, lambda a, b: a + b)

    def __sub__(self, other):
        return self._op(other, lambda a, b: a - b)

    def __mul__(self, other):
        return self._op(other, lambda a, b: a * b)

    def __floordiv__(self, other):
        return self._op(other, lambda a, b: a // b)

    def __bool__(self):
        raise TypeError("a ShapeExpr is symbolic in TensorRT: it cannot be used as a condition")

    def __int__(self):
        raise TypeError("a ShapeExpr is symbolic in TensorRT: it has no int value in register")

    __index__ = __int__

    def __repr__(self):
        return f"ShapeExpr[{'fake' if self.value is None else self.value}]"


class ShapeExprs:
    def __init__(self, exprs):
        self._exprs = [e if isinstance(e, ShapeExpr) else ShapeExpr(e) for e in exprs]

    def __getitem__(self, index):
        return self._exprs[index]

    def __len__(self):
        return len(self._exprs)

    def __iter__(self):
        return iter(self._exprs)

    def numel(self) -> ShapeExpr:
        out = ShapeExpr(1)
        for e in self._exprs:
            out = out * e
        return out

    def values(self):
        return tuple(e.value for e in self._exprs)


class TensorDesc:
    def __init__(self, shape_expr=None, dtype=None):
        self.shape_expr = shape_expr if isinstance(shape_expr, ShapeExprs) else ShapeExprs(shape_expr or ())
        self.dtype = dtype

    @property
    def ndim(self) -> int:
        return len(self.shape_expr)

    def like(self) -> "TensorDesc":
        return TensorDesc(ShapeExprs(list(self.shape_expr)), self.dtype)

    @property
    def shape(self):
        raise ValueError("TensorDesc has no concrete shape in register (only in autotune)")


class Tensor:
    """Stands in for the run-time tensor type (only used in impl annotations here)."""


class AutoTuneCombination:
    def __init__(self, io_types: str | None = None, layouts: str | None = None, tactics=None):
        self.io_types = [s.strip() for s in io_types.split(",")] if io_types is not None else []
        layouts = [s.strip() for s in (layouts or "LINEAR").split(",")]
        if len(layouts) not in (1, len(self.io_types)):
            raise ValueError(f"{len(layouts)} layouts for {len(self.io_types)} I/Os")
        self.layouts = layouts * len(self.io_types) if len(layouts) == 1 else layouts
        for spec in self.io_types:
            if "|" in spec and "*" in spec:
                raise ValueError(f"type spec {spec!r} mixes '|' and '*'")
            for name in spec.replace("*", "|").split("|"):
                if name not in TYPE_NAMES:
                    raise ValueError(f"unknown type {name!r} in AutoTuneCombination")
        for spec in self.layouts:
            for name in spec.replace("*", "|").split("|"):
                if name not in LAYOUTS:
                    raise ValueError(f"unknown layout {name!r} in AutoTuneCombination")
        dependent = {len(s.split("|")) for s in self.io_types if "|" in s}
        if len(dependent) > 1:
            raise ValueError(f"dependent type lists of different lengths: {self.io_types}")
        self.tactics = tactics

    def types_at(self, pos: int) -> list:
        return [TYPE_NAMES[n] for n in self.io_types[pos].replace("*", "|").split("|")]


class KernelLaunchParams:
    """Grid and block sizes and dynamic shared memory, each an int or a SymInt32."""

    def __init__(self):
        self.grid_x = self.grid_y = self.grid_z = 1
        self.block_x = self.block_y = self.block_z = 1
        self.shared_mem = 0


class SymExprs:
    def __init__(self, length: int = 0):
        self._exprs = [None] * length

    def __len__(self):
        return len(self._exprs)

    def __iter__(self):
        return iter(self._exprs)

    def __getitem__(self, index):
        return self._exprs[index]

    def __setitem__(self, index, value):
        if index >= len(self._exprs):
            raise IndexError("Index out of range")
        if isinstance(value, bool) or not isinstance(value, (int, SymInt32)):
            raise ValueError(f"Value should be int or SymIntExpr. Got '{type(value)}'")  # noqa: TRY004 - as TensorRT
        self._exprs[index] = value if isinstance(value, SymInt32) else SymInt32(value)


class SymIntExprs(SymExprs):
    pass


class SymInt32:
    def __init__(self, value=None):
        if isinstance(value, ShapeExpr):
            value = value.value
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"SymInt32 takes an int or a ShapeExpr, not {type(value).__name__}")
        self.value = value


class PluginRecord:
    def __init__(self, plugin_id, register_func, inputs, attributes, num_outputs):
        self.plugin_id = plugin_id
        self.register_func = register_func
        self.inputs = inputs  # TensorDesc argument names, in order
        self.attributes = attributes  # name -> annotation, in order
        self.num_outputs = num_outputs
        self.impl = self.autotune = self.aot_impl = None
        self.impl_attributes = self.autotune_attributes = self.aot_impl_attributes = None
        self.impl_takes_tactic = False


def _is_class(x, base) -> bool:
    return inspect.isclass(x) and issubclass(x, base)


def _parse_register(fn):
    sig = inspect.signature(fn)
    inputs, attributes, seen_attribute = [], {}, False
    for i, (name, p) in enumerate(sig.parameters.items()):
        if p.kind not in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            raise ValueError(f"argument {name} must be positional-or-keyword")
        if p.annotation is p.empty:
            raise ValueError(f"argument {name} has no type annotation")
        if isinstance(p.annotation, str):
            raise ValueError(  # noqa: TRY004 - TensorRT raises ValueError here too
                f"argument {name}'s annotation is the string {p.annotation!r} (postponed annotations?)")
        if p.default is not p.empty:
            raise ValueError(f"argument {name} has a default value; TensorRT does not support them")
        if _is_class(p.annotation, TensorDesc):
            if seen_attribute:
                raise ValueError("TensorDesc arguments must all come before the attributes")
            inputs.append(name)
            continue
        if i == 0:
            raise ValueError("the first argument must be a TensorDesc")
        if name in DISALLOWED_ATTRIBUTE_NAMES:
            raise ValueError(f"'{name}' cannot be an attribute name")
        if p.annotation not in ATTRIBUTE_TYPES:
            raise ValueError(f"attribute {name} has unsupported type {p.annotation!r}")
        attributes[name] = p.annotation
        seen_attribute = True
    ret = sig.return_annotation
    if ret is sig.empty:
        raise ValueError("register function has no return annotation")
    if typing.get_origin(ret) is tuple:
        args = typing.get_args(ret)
        if not all(_is_class(a, TensorDesc) for a in args):
            raise ValueError(f"return annotation {ret} is not Tuple[TensorDesc, ...]")
        num_outputs = len(args)
    elif _is_class(ret, TensorDesc):
        num_outputs = 1
    else:
        raise ValueError(f"return annotation {ret!r} is not TensorDesc or Tuple[TensorDesc, ...]")
    return inputs, attributes, num_outputs


def _check_schema(fn, record: PluginRecord, kind: str) -> tuple[list[str], bool]:
    """The attributes ``fn`` takes, and whether it takes ``tactic``; raises where TensorRT would."""
    sig = inspect.signature(fn)
    names = list(sig.parameters)
    attrs = [n for n in names if n in record.attributes]
    for n in attrs:
        ann = sig.parameters[n].annotation
        if ann is not sig.empty and ann is not record.attributes[n]:
            raise ValueError(f"{kind}: attribute {n} annotated {ann!r}, registered as {record.attributes[n]!r}")
    ordered = [n for n in record.attributes if n in attrs]
    if kind == "aot_impl" and ordered != list(record.attributes):
        # TensorRT's AOT plugin calls aot_impl with every creation field, positionally
        # (_TemplateAOTPlugin.get_launch_params: *inputs, *attrs.values(), outputs, tactic).
        raise ValueError(f"aot_impl must take every attribute, in register's order: {list(record.attributes)}")
    takes_tactic = "tactic" in names
    tail = {"impl": ["outputs", "stream"] + (["tactic"] if takes_tactic else []),
            "autotune": ["outputs"], "aot_impl": ["outputs", "tactic"]}[kind]
    expected = record.inputs + ordered + tail
    if names != expected:
        raise ValueError(f"{kind} signature ({', '.join(names)}) does not match the schema ({', '.join(expected)})")
    for n in record.inputs:
        ann = sig.parameters[n].annotation
        want = Tensor if kind == "impl" else TensorDesc
        if ann is not sig.empty and not _is_class(ann, want):
            raise ValueError(f"{kind}: input {n} annotated {ann!r}, expected {want.__name__}")
    if kind == "impl" and sig.return_annotation not in (sig.empty, None):
        raise ValueError("impl must return None")
    return ordered, takes_tactic


class FakePluginModule:
    """What ``import tensorrt.plugin as trtp`` gives, as far as deploykit's plugins use it."""

    TensorDesc = TensorDesc
    Tensor = Tensor
    ShapeExpr = ShapeExpr
    ShapeExprs = ShapeExprs
    AutoTuneCombination = AutoTuneCombination
    KernelLaunchParams = KernelLaunchParams
    SymExprs = SymExprs
    SymIntExprs = SymIntExprs
    SymInt32 = SymInt32

    def __init__(self):
        self.registry: dict[str, PluginRecord] = {}

    # -- decorators ------------------------------------------------------------------

    def register(self, plugin_id: str, lazy_register: bool = False):
        namespace, _, name = plugin_id.partition("::")
        if not name or "." in namespace or "." in name:
            raise ValueError(f"plugin id {plugin_id!r} must be 'namespace::name' without dots")
        if namespace in RESERVED_NAMESPACES:
            raise ValueError(f"namespace {namespace!r} is reserved")

        def decorator(fn):
            if plugin_id in self.registry:
                raise ValueError(f"{plugin_id} is already registered")
            self.registry[plugin_id] = PluginRecord(plugin_id, fn, *_parse_register(fn))
            return fn

        return decorator

    def _record(self, plugin_id: str, kind: str):
        def decorator(fn):
            if plugin_id not in self.registry:
                raise ValueError(f"{plugin_id} is not registered")
            record = self.registry[plugin_id]
            attrs, tactic = _check_schema(fn, record, kind)
            setattr(record, kind, fn)
            setattr(record, f"{kind}_attributes", attrs)
            if kind == "impl":
                record.impl_takes_tactic = tactic
            return fn

        return decorator

    def impl(self, plugin_id: str):
        return self._record(plugin_id, "impl")

    def autotune(self, plugin_id: str):
        return self._record(plugin_id, "autotune")

    def aot_impl(self, plugin_id: str):
        return self._record(plugin_id, "aot_impl")

    # -- functions ---------------------------------------------------------------------

    @staticmethod
    def from_shape_expr(shape_expr, dtype) -> TensorDesc:
        if not isinstance(shape_expr, (tuple, ShapeExprs)):
            raise TypeError("from_shape_expr takes a tuple of ShapeExpr / int")
        return TensorDesc(ShapeExprs(list(shape_expr)), dtype)

    @staticmethod
    def _two(a, b, fn):
        if isinstance(a, int) and isinstance(b, int):
            raise ValueError("both arguments cannot be ints")  # noqa: TRY004 - as tensorrt.plugin
        a = a if isinstance(a, ShapeExpr) else ShapeExpr(a)
        return a._op(b, fn)

    def cdiv(self, a, b):
        return self._two(a, b, lambda x, y: -(-x // y))

    def max(self, a, b):
        return self._two(a, b, max)

    def min(self, a, b):
        return self._two(a, b, min)

    # -- evaluation (what TensorRT does with the functions at build time) -----------------

    def _attrs(self, record: PluginRecord, attributes: dict) -> dict:
        missing = set(record.attributes) - set(attributes)
        if missing:
            raise TypeError(f"{record.plugin_id}: attributes {sorted(missing)} not given")
        # As TensorRT's plugin creator does: each field cast to its registered annotation.
        return {n: record.attributes[n](attributes[n]) for n in record.attributes}

    def evaluate(self, plugin_id: str, inputs, attributes: dict) -> list[tuple[tuple[int, ...], DataType]]:
        """(shape, dtype) of each output of ``plugin_id`` for inputs given as (shape, dtype)."""
        record = self.registry[plugin_id]
        if len(inputs) != len(record.inputs):
            raise TypeError(f"{plugin_id} takes {len(record.inputs)} inputs, got {len(inputs)}")
        descs = [TensorDesc(ShapeExprs(list(shape)), dtype) for shape, dtype in inputs]
        outs = self._outputs(record, descs, attributes)
        return [(o.shape_expr.values(), o.dtype) for o in outs]

    def output_dtypes(self, plugin_id: str, dtypes, ranks, attributes: dict) -> list[DataType]:
        """TensorRT's first call: input dtypes and ranks only, every shape expression fake."""
        record = self.registry[plugin_id]
        descs = [TensorDesc(ShapeExprs([ShapeExpr()] * r), d) for d, r in zip(dtypes, ranks)]
        return [o.dtype for o in self._outputs(record, descs, attributes)]

    def _outputs(self, record, descs, attributes) -> list[TensorDesc]:
        out = record.register_func(*descs, **self._attrs(record, attributes))
        out = out if isinstance(out, tuple) else (out,)
        if len(out) != record.num_outputs or not all(isinstance(o, TensorDesc) for o in out):
            raise TypeError(f"{record.plugin_id}: register returned {out!r}, declared {record.num_outputs} outputs")
        return list(out)

    def autotune_combinations(self, plugin_id: str, inputs, attributes: dict) -> list[AutoTuneCombination]:
        record = self.registry[plugin_id]
        descs = [TensorDesc(ShapeExprs(list(shape)), dtype) for shape, dtype in inputs]
        outs = tuple(self._outputs(record, descs, attributes))
        attrs = self._attrs(record, attributes)
        combos = record.autotune(*descs, *[attrs[n] for n in record.autotune_attributes], outs)
        combos = combos if isinstance(combos, list) else [combos]
        for c in combos:
            if len(c.io_types) != len(record.inputs) + record.num_outputs:
                raise ValueError(f"{plugin_id}: AutoTuneCombination for {len(c.io_types)} I/Os, the plugin has "
                                 f"{len(record.inputs) + record.num_outputs}")
        return combos


    def aot(self, plugin_id: str, inputs, attributes: dict, tactic: int = 0):
        """Call ``plugin_id``'s aot_impl as TensorRT does at build time (static input shapes)
        and check what it returns: (kernel name, PTX, KernelLaunchParams, SymIntExprs of
        SymInt32)."""
        record = self.registry[plugin_id]
        if record.aot_impl is None:
            raise ValueError(f"{plugin_id} has no aot_impl")
        descs = [TensorDesc(ShapeExprs(list(shape)), dtype) for shape, dtype in inputs]
        outs = tuple(self._outputs(record, descs, attributes))
        cast = self._attrs(record, attributes)
        # Positionally, in the order the fields arrive (the node's attribute order for the
        # ONNX parser), as _TemplateAOTPlugin does: hence with_plugin_attributes' reordering.
        got = record.aot_impl(*descs, *(cast[n] for n in attributes), outs, tactic)
        if not (isinstance(got, tuple) and len(got) == 4):
            raise TypeError(f"{plugin_id}: aot_impl returned {got!r}, not (name, ptx, launch params, extra args)")
        name, ptx, launch, extra = got
        if not isinstance(name, (str, bytes)) or not isinstance(ptx, (str, bytes)):
            raise TypeError(f"{plugin_id}: kernel name and PTX must be str or bytes")
        if not isinstance(launch, KernelLaunchParams):
            raise TypeError(f"{plugin_id}: launch params must be a KernelLaunchParams, got {type(launch)}")
        if not isinstance(extra, SymExprs) or not all(isinstance(e, SymInt32) for e in extra):
            raise TypeError(f"{plugin_id}: extra args must be SymIntExprs of SymInt32")
        return name, ptx, launch, extra


def new() -> FakePluginModule:
    return FakePluginModule()
