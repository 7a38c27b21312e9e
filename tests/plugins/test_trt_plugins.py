"""The TensorRT plugin definitions (plugins/<op>/trt_plugin.py) against the exported nodes.

No TensorRT here: the definitions run against tests/plugins/fake_tensorrt.py, a small
stand-in for tensorrt.plugin that enforces its signature rules and evaluates the register
functions on concrete shapes. What this proves is that our descriptors agree with what
deploykit exports (ids, attributes, output shapes and dtypes), not that TensorRT builds or
runs them. No kernel is launched.
"""

import importlib.util
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import AttributeProto, TensorProto, helper

import plugins.trt
from deploykit.engines import tensorrt_plugins as tp
from deploykit.export import export_onnx
from deploykit.ops import (
    CUSTOM_OPS,
    DOMAIN,
    bev_pool,
    deform_conv,
    multi_scale_deformable_attn,
    pillar_scatter,
)


def _load_fake():
    # By path, so it works whether or not tests/plugins is a package.
    path = Path(__file__).with_name("fake_tensorrt.py")
    spec = importlib.util.spec_from_file_location("deploykit_tests_fake_tensorrt", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fake = _load_fake()
ONNX_TO_FAKE = {TensorProto.FLOAT: fake.float32, TensorProto.FLOAT16: fake.float16, TensorProto.INT8: fake.int8,
                TensorProto.INT32: fake.int32, TensorProto.INT64: fake.int64}
FAKE_TO_ONNX = {v: k for k, v in ONNX_TO_FAKE.items()}


@pytest.fixture()
def trtp():
    module = fake.new()
    plugins.trt.load(module)
    return module


# ---------------------------------------------------------------------------------------
# Tiny models, one custom node each, exported as deploykit exports them


class _PillarScatter(torch.nn.Module):
    input_names, output_names = ("features", "coords"), ("canvas",)

    def __init__(self, height, width):
        super().__init__()
        self.height, self.width = height, width

    def forward(self, features, coords):
        return pillar_scatter.PillarScatterFunction.apply(features, coords, self.height, self.width)


def _pillar_scatter(channels, pillars, height, width):
    rng = np.random.default_rng(channels)
    coords = np.full((pillars, 4), -1, np.int32)
    cells = rng.permutation(height * width)[: pillars // 2]
    coords[: len(cells), 2], coords[: len(cells), 3] = cells // width, cells % width
    feeds = {"features": rng.standard_normal((1, channels, pillars)).astype(np.float32), "coords": coords}
    return _PillarScatter(height, width), feeds


class _MSDA(torch.nn.Module):
    input_names, output_names = ("value", "sampling_locations", "attention_weights"), ("out",)

    def __init__(self, shapes):
        super().__init__()
        hw = torch.tensor(shapes, dtype=torch.int64)
        self.register_buffer("shapes", hw)
        self.register_buffer("starts", torch.cat([hw.new_zeros(1), (hw[:, 0] * hw[:, 1]).cumsum(0)[:-1]]))

    def forward(self, value, sampling_locations, attention_weights):
        return multi_scale_deformable_attn.multi_scale_deformable_attn(value, self.shapes, self.starts,
                                                                       sampling_locations, attention_weights)


def _msda(bs, queries, heads, dims, shapes, points):
    rng = np.random.default_rng(queries)
    keys = sum(h * w for h, w in shapes)
    feeds = {"value": rng.standard_normal((bs, keys, heads, dims)).astype(np.float32),
             "sampling_locations": rng.random((bs, queries, heads, len(shapes), points, 2)).astype(np.float32),
             "attention_weights": rng.random((bs, queries, heads, len(shapes), points)).astype(np.float32)}
    return _MSDA(shapes), feeds


class _BEVPool(torch.nn.Module):
    input_names, output_names = ("depth", "feat"), ("bev",)

    def __init__(self, ranks, grid):
        super().__init__()
        self.grid = grid
        for k, v in ranks.items():
            self.register_buffer(k, torch.from_numpy(np.ascontiguousarray(v)))

    def forward(self, depth, feat):
        return bev_pool.bev_pool(depth, feat, {k: getattr(self, k) for k in bev_pool.RANK_NAMES}, self.grid)


def _bev_pool(b, n, d, h, w, c, grid, unsorted=False):
    rng = np.random.default_rng(c)
    z_n, y_n, x_n = grid
    cells = np.stack([rng.integers(-1, x_n + 1, (b, n, d, h, w)), rng.integers(0, y_n, (b, n, d, h, w)),
                      rng.integers(0, z_n, (b, n, d, h, w))], -1)
    ranks = bev_pool.prepare_ranks(cells, grid)
    if unsorted:
        order = rng.permutation(len(ranks["ranks_bev"]))
        ranks = bev_pool.unsorted_ranks(*(ranks[k][order] for k in ("ranks_depth", "ranks_feat", "ranks_bev")))
    feeds = {"depth": rng.random((b, n, d, h, w)).astype(np.float32),
             "feat": rng.standard_normal((b, n, h, w, c)).astype(np.float32)}
    return _BEVPool(ranks, grid), feeds


class _DeformConv(torch.nn.Module):
    output_names = ("out",)

    def __init__(self, weight, bias, attrs, with_mask):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.from_numpy(weight))
        self.bias = None if bias is None else torch.nn.Parameter(torch.from_numpy(bias))
        self.attrs = attrs
        self.input_names = ["x", "offset"] + (["mask"] if with_mask else [])

    def forward(self, x, offset, mask=None):
        return deform_conv.deform_conv2d(x, offset, mask, self.weight, self.bias, export_form="custom", **self.attrs)


def _deform_conv(b, c, h, w, cout, k, stride, padding, dilation, groups, deform_groups, with_mask, with_bias):
    rng = np.random.default_rng(c + cout)
    ho, wo = deform_conv.output_size(h, w, k, stride, padding, dilation)
    attrs = {"stride": stride, "padding": padding, "dilation": dilation, "groups": groups,
             "deform_groups": deform_groups}
    feeds = {"x": rng.standard_normal((b, c, h, w)).astype(np.float32),
             "offset": rng.standard_normal((b, deform_groups * 2 * k[0] * k[1], ho, wo)).astype(np.float32)}
    if with_mask:
        feeds["mask"] = rng.random((b, deform_groups * k[0] * k[1], ho, wo)).astype(np.float32)
    weight = rng.standard_normal((cout, c // groups, *k)).astype(np.float32)
    bias = rng.standard_normal(cout).astype(np.float32) if with_bias else None
    return _DeformConv(weight, bias, attrs, with_mask), feeds


CASES = {
    "PillarScatter 3ch 5x7": (_pillar_scatter, {"channels": 3, "pillars": 6, "height": 5, "width": 7}),
    "PillarScatter 16ch 24x40": (_pillar_scatter, {"channels": 16, "pillars": 50, "height": 24, "width": 40}),
    "MSDA 1 level": (_msda, {"bs": 1, "queries": 5, "heads": 2, "dims": 4, "shapes": [(6, 6)], "points": 4}),
    "MSDA 3 levels bs2": (_msda, {"bs": 2, "queries": 7, "heads": 3, "dims": 8, "shapes": [(8, 11), (4, 6), (2, 3)], "points": 2}),
    "BEVPool sorted": (_bev_pool, {"b": 1, "n": 2, "d": 4, "h": 3, "w": 5, "c": 6, "grid": (1, 9, 11)}),
    "BEVPool unsorted bs2 z2": (_bev_pool, {"b": 2, "n": 2, "d": 3, "h": 2, "w": 4, "c": 5, "grid": (2, 6, 7), "unsorted": True}),
    "DeformConv v1": (_deform_conv, {"b": 1, "c": 4, "h": 7, "w": 9, "cout": 6, "k": (3, 3), "stride": (1, 1), "padding": (1, 1),
                                         "dilation": (1, 1), "groups": 1, "deform_groups": 1, "with_mask": False,
                                         "with_bias": False}),
    "DeformConv v2 stride 2x1 dilation 1x2 bias": (
        _deform_conv, {"b": 2, "c": 4, "h": 9, "w": 8, "cout": 6, "k": (3, 3), "stride": (2, 1), "padding": (1, 2), "dilation": (1, 2),
                           "groups": 2, "deform_groups": 2, "with_mask": True, "with_bias": True}),
    "DeformConv v2 5x3 kernel no pad": (
        _deform_conv, {"b": 1, "c": 2, "h": 11, "w": 6, "cout": 3, "k": (5, 3), "stride": (1, 2), "padding": (0, 0), "dilation": (2, 1),
                           "groups": 1, "deform_groups": 2, "with_mask": True, "with_bias": False}),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Case name -> the exported ONNX model."""
    out = {}
    root = tmp_path_factory.mktemp("trt_plugins")
    for i, (name, (make, kwargs)) in enumerate(CASES.items()):
        module, feeds = make(**kwargs)
        path = root / f"{i}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            export_onnx(module, feeds, path, 17)
        out[name] = onnx.load(str(path))
    return out


def _the_node(model):
    (node,) = [n for n in model.graph.node if n.domain == DOMAIN]
    return node


def _inputs(model, node):
    types = tp._static_types(model)
    return [(types[name][0], ONNX_TO_FAKE[types[name][1]]) for name in node.input]


def _attributes(node):
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


# ---------------------------------------------------------------------------------------
# Ids and signatures


def test_every_custom_op_has_a_plugin_named_after_it(trtp):
    assert plugins.trt.plugin_ids() == [f"deploykit::{op}" for op in CUSTOM_OPS]
    assert sorted(trtp.registry) == sorted(plugins.trt.plugin_ids())
    for op, module in CUSTOM_OPS.items():
        definition = plugins.trt.definition(op)
        assert definition.PLUGIN_ID == f"{DOMAIN}::{module.OP_TYPE}" == f"deploykit::{op}"
        record = trtp.registry[definition.PLUGIN_ID]
        assert record.impl is not None and record.autotune is not None
        assert record.aot_impl is not None  # AOT from TensorRT 10.9 (tests/plugins/test_trt_aot.py)
        assert record.num_outputs == 1
        # The impl takes every attribute, so TensorRT serializes them all into the engine.
        assert record.impl_attributes == list(record.attributes)


def test_load_is_once_per_module_and_returns_the_ids(trtp):
    assert plugins.trt.load(trtp) == plugins.trt.plugin_ids()  # the fixture loaded it already: no re-registration
    with pytest.raises(ValueError, match="already registered"):
        plugins.trt.definition("BEVPool").define(trtp)  # what TensorRT would say to a second define


@pytest.mark.parametrize("name", CASES)
def test_register_signature_is_the_exported_node(trtp, exported, name):
    model = exported[name]
    node = _the_node(model)
    record = trtp.registry[f"deploykit::{node.op_type}"]
    assert len(node.input) == len(record.inputs)
    assert len(node.output) == record.num_outputs
    onnx_types = {a.name: a.type for a in node.attribute}
    assert set(onnx_types) == set(record.attributes)
    for attr, annotation in record.attributes.items():
        # The ONNX parser turns an INT attribute into an int32 plugin field, read back as int.
        assert (onnx_types[attr], annotation) == (AttributeProto.INT, int), attr


@pytest.mark.parametrize("name", CASES)
def test_declared_output_is_the_exported_output(trtp, exported, name):
    model = exported[name]
    node = _the_node(model)
    types = tp._static_types(model)
    (got,) = trtp.evaluate(f"deploykit::{node.op_type}", _inputs(model, node), _attributes(node))
    want_shape, want_dtype = types[node.output[0]]
    assert got[0] == want_shape
    assert FAKE_TO_ONNX[got[1]] == want_dtype


@pytest.mark.parametrize("name", CASES)
def test_dtypes_need_no_shapes_and_follow_the_float_input(trtp, exported, name):
    """TensorRT first asks for output dtypes with every shape expression unknown."""
    model = exported[name]
    node = _the_node(model)
    inputs = _inputs(model, node)
    pid = f"deploykit::{node.op_type}"
    ranks = [len(s) for s, _ in inputs]
    assert trtp.output_dtypes(pid, [d for _, d in inputs], ranks, _attributes(node)) == [fake.float32]
    half = [fake.float16 if d is fake.float32 else d for _, d in inputs]
    # The output takes the float inputs' type; whether fp16 is used is autotune's offer (below).
    assert trtp.output_dtypes(pid, half, ranks, _attributes(node)) == [fake.float16]


@pytest.mark.parametrize("name", CASES)
def test_autotune_offers_the_exported_types(trtp, exported, name):
    model = exported[name]
    node = _the_node(model)
    inputs = _inputs(model, node)
    (combo,) = trtp.autotune_combinations(f"deploykit::{node.op_type}", inputs, _attributes(node))
    types = tp._static_types(model)
    exported_types = [types[n][1] for n in [*node.input, *node.output]]
    for pos, onnx_type in enumerate(exported_types):
        assert ONNX_TO_FAKE[onnx_type] in combo.types_at(pos), (pos, combo.io_types)
    assert set(combo.layouts) == {"LINEAR"}
    floats = [pos for pos, t in enumerate(exported_types) if t == TensorProto.FLOAT]
    assert all(fake.float16 in combo.types_at(pos) for pos in floats)  # every kernel has an fp16 form
    # Integer inputs are offered only as exported (no silent int64 -> int32).
    ints = [pos for pos, t in enumerate(exported_types) if t != TensorProto.FLOAT]
    assert all(combo.types_at(pos) == [ONNX_TO_FAKE[exported_types[pos]]] for pos in ints)


def test_shape_expressions_are_used_the_tensorrt_way():
    """The fake refuses what TensorRT's ShapeExpr cannot do, so the checks above mean something."""
    e = fake.ShapeExpr(4)
    assert (e * 2 + 1 - e // 3).value == 8
    with pytest.raises(TypeError):
        _ = 2 * e  # no reflected operators in tensorrt.plugin
    with pytest.raises(TypeError):
        bool(e)  # symbolic in TensorRT: no branching on a dimension
    m = fake.new()
    with pytest.raises(ValueError, match="annotation"):
        @m.register("deploykit::Strings")
        def _desc(x: "m.TensorDesc") -> "m.TensorDesc":  # postponed (string) annotations break TensorRT
            return x.like()
    with pytest.raises(ValueError, match="reserved"):
        m.register("trt::X")


class _RuntimeTensor:
    """What a JIT impl receives for each input / output (here a CPU torch tensor inside)."""

    def __init__(self, value=None):
        self.value = value


def _node_values(model, feeds, node):
    values = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feeds.items()}
    values.update({t.name: torch.from_numpy(onnx.numpy_helper.to_array(t).copy()) for t in model.graph.initializer})
    for n in model.graph.node:
        if n.op_type == "Constant":
            values[n.output[0]] = torch.from_numpy(onnx.numpy_helper.to_array(n.attribute[0].t).copy())
        elif n.op_type == "Identity":  # the exporter shares equal constant buffers (BEVPool's empty intervals)
            values[n.output[0]] = values[n.input[0]]
    return [values[name] for name in node.input]


@pytest.mark.parametrize("name", CASES)
def test_impl_hands_the_node_inputs_and_attributes_to_the_kernel(trtp, exported, name, monkeypatch):
    """The JIT impls' wiring, without a GPU or a kernel: TensorRT's stream handling is
    replaced by a CPU stand-in, and each Triton ``launch`` by deploykit's reference (same
    argument order: the node's inputs, then its attributes). The result must be what ONNX
    Runtime computes for the exported node."""
    import importlib
    import types

    from deploykit.engines import ort

    model = exported[name]
    node = _the_node(model)
    record = trtp.registry[f"deploykit::{node.op_type}"]
    folder = {"PillarScatter": "pillar_scatter", "MultiScaleDeformableAttn": "msda", "BEVPool": "bev_pool",
              "DeformConv": "deform_conv"}
    package = importlib.import_module(f"plugins.{folder[node.op_type]}")
    stub = types.ModuleType(f"plugins.{folder[node.op_type]}.triton_kernel")
    stub.launch = CUSTOM_OPS[node.op_type].reference
    if node.op_type == "DeformConv":  # launch takes the node's attributes one by one
        def launch(x, off, m, w, b, sh, sw, ph, pw, dh, dw, groups, deform_groups):
            return deform_conv.reference(x, off, m, w, b, (sh, sw), (ph, pw), (dh, dw), groups, deform_groups)

        stub.launch = launch
    monkeypatch.setitem(sys.modules, stub.__name__, stub)
    monkeypatch.setattr(package, "triton_kernel", stub, raising=False)

    def on_stream(stream, compute, inputs, output):
        assert stream == 1234
        output.value = compute(*[t.value for t in inputs])

    monkeypatch.setattr(plugins.trt, "on_stream", on_stream)
    _, feeds = CASES[name][0](**CASES[name][1])
    out = _RuntimeTensor()
    attrs = _attributes(node)
    record.impl(*[_RuntimeTensor(v) for v in _node_values(model, feeds, node)],
                *[attrs[a] for a in record.impl_attributes], (out,), 1234)
    graph_output = model.graph.output[0].name
    assert node.output[0] == graph_output  # the tiny models end at the node
    want = ort.build(model, threads=1).run(feeds)[graph_output]
    assert out.value.dtype == torch.float32 and tuple(out.value.shape) == want.shape
    np.testing.assert_allclose(out.value.numpy(), want, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------
# with_plugin_attributes and check_plugins


def test_with_plugin_attributes_adds_the_namespace_and_nothing_else(exported):
    for model in exported.values():
        before = model.SerializeToString()
        tagged = tp.with_plugin_attributes(model)
        assert model.SerializeToString() == before  # the input is left alone
        for old, new in zip(model.graph.node, tagged.graph.node):
            if old.domain != DOMAIN:
                assert old == new
                continue
            extra = [a for a in new.attribute if a.name not in {b.name for b in old.attribute}]
            assert [(a.name, a.type, a.s) for a in extra] == [("plugin_namespace", AttributeProto.STRING,
                                                               b"deploykit")]
            stripped = onnx.NodeProto()
            stripped.CopyFrom(new)
            del stripped.attribute[:]
            stripped.attribute.extend(sorted((a for a in new.attribute if a.name != "plugin_namespace"),
                                             key=lambda a: a.name))
            unsorted = onnx.NodeProto()
            unsorted.CopyFrom(old)
            del unsorted.attribute[:]
            unsorted.attribute.extend(sorted(old.attribute, key=lambda a: a.name))
            assert stripped == unsorted
            # In register's order (the exporter writes BEVPool's as bev_x, bev_y, bev_z).
            declared = list(tp.declarations()[new.op_type].attributes)
            assert [a.name for a in new.attribute][:-1] == declared
        assert len(model.graph.node) == len(tagged.graph.node)
        assert tagged.graph.initializer == model.graph.initializer and tagged.graph.output == model.graph.output
        # Idempotent: tagging twice leaves one attribute.
        again = tp.with_plugin_attributes(tagged)
        assert again.SerializeToString() == tagged.SerializeToString()


def test_with_plugin_attributes_puts_attributes_in_register_order(exported):
    """TensorRT's AOT plugins get the attributes positionally: the exporter writes BEVPool's
    alphabetically (bev_x, bev_y, bev_z), the plugin declares (bev_z, bev_y, bev_x)."""
    node = _the_node(exported["BEVPool sorted"])
    assert [a.name for a in node.attribute] == ["bev_x", "bev_y", "bev_z"]
    tagged = _the_node(tp.with_plugin_attributes(exported["BEVPool sorted"]))
    assert [a.name for a in tagged.attribute] == ["bev_z", "bev_y", "bev_x", "plugin_namespace"]


@pytest.mark.parametrize("mode", ["function", "inline"])
def test_onnx_runtime_still_runs_the_tagged_model(exported, mode):
    """The TensorRT copy is not meant for ONNX Runtime, but the extra attribute does not break
    deploykit's ORT engine (the function bodies never read it) and changes no output."""
    from deploykit.engines import ort

    for name, (make, kwargs) in CASES.items():
        _, feeds = make(**kwargs)
        model = exported[name]
        want = ort.build(model, custom_ops=mode, threads=1).run(feeds)
        got = ort.build(tp.with_plugin_attributes(model), custom_ops=mode, threads=1).run(feeds)
        assert all(np.array_equal(got[k], want[k]) for k in want), name


def test_check_plugins_passes_every_exported_model(exported):
    declared = tp.declarations()
    assert sorted(declared) == sorted(CUSTOM_OPS)
    for name, model in exported.items():
        assert tp.check_plugins(model, declared) == [], name
        assert tp.check_plugins(tp.with_plugin_attributes(model), declared) == [], name


def _output_info(model, name):
    return next(v for v in [*model.graph.value_info, *model.graph.output] if v.name == name)


def test_check_plugins_reports_a_planted_shape_mismatch(exported):
    model = onnx.ModelProto.FromString(exported["MSDA 3 levels bs2"].SerializeToString())
    node = _the_node(model)
    _output_info(model, node.output[0]).type.tensor_type.shape.dim[2].dim_value += 1
    (problem,) = tp.check_plugins(model)
    assert "MultiScaleDeformableAttn" in problem and "[2, 7, 24]" in problem and "[2, 7, 25]" in problem


def test_check_plugins_reports_dtype_attribute_and_unknown_op_problems(exported):
    model = onnx.ModelProto.FromString(exported["PillarScatter 3ch 5x7"].SerializeToString())
    node = _the_node(model)
    _output_info(model, node.output[0]).type.tensor_type.elem_type = TensorProto.FLOAT16
    assert any("float16" in p and "float" in p for p in tp.check_plugins(model))

    model = onnx.ModelProto.FromString(exported["BEVPool sorted"].SerializeToString())
    node = _the_node(model)
    for a in node.attribute:
        if a.name == "bev_x":
            a.name = "bev_w"
    problems = tp.check_plugins(model)
    assert any("'bev_x'" in p and "has none" in p for p in problems)
    assert any("'bev_w'" in p and "not a plugin attribute" in p for p in problems)

    model = onnx.ModelProto.FromString(exported["DeformConv v1"].SerializeToString())
    _the_node(model).op_type = "DeformConv3d"
    (problem,) = tp.check_plugins(model)
    assert "no TensorRT plugin deploykit::DeformConv3d" in problem


def test_check_plugins_reports_a_descriptor_that_disagrees(exported):
    """A plugin whose register computes the wrong shape (here: DeformConv ignoring dilation)."""
    declared = tp.declarations()
    good = declared["DeformConv"].register

    def wrong(input, offset, mask, weight, bias, **attrs):
        return good(input, offset, mask, weight, bias, **{**attrs, "dilation_w": 1})

    declared["DeformConv"].register = wrong
    model = exported["DeformConv v2 stride 2x1 dilation 1x2 bias"]
    (problem,) = tp.check_plugins(model, declared)
    assert "DeformConv" in problem and "declares output" in problem


# ---------------------------------------------------------------------------------------
# Without TensorRT


def test_imports_need_no_tensorrt():
    code = (
        "import sys\n"
        "sys.modules['tensorrt'] = None\n"  # import tensorrt -> ImportError, installed or not
        "import plugins.trt, deploykit.engines.tensorrt_plugins as tp\n"
        "import plugins.pillar_scatter.trt_plugin, plugins.msda.trt_plugin, plugins.bev_pool.trt_plugin\n"
        "import plugins.deform_conv.trt_plugin\n"
        "assert sorted(tp.declarations()) == ['BEVPool', 'DeformConv', 'MultiScaleDeformableAttn', 'PillarScatter']\n"
        "assert 'triton' not in sys.modules\n"
        "try:\n"
        "    plugins.trt.load()\n"
        "except plugins.trt.TensorRTPluginsUnavailable as exc:\n"
        "    print('ERROR', exc)\n"
    )
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("ERROR") and "pip install" in result.stdout and "10.6" in result.stdout


def test_load_without_tensorrt_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", None)
    with pytest.raises(plugins.trt.TensorRTPluginsUnavailable, match=r"TensorRT >= 10\.6.*pip install") as info:
        plugins.trt.load()
    assert isinstance(info.value, ImportError)
    assert not plugins.trt.loaded()


def test_convert_writes_the_tensorrt_plugin_flavour(tmp_path):
    """convert --tensorrt-plugins: model.trt_plugins.onnx, model.onnx with plugin_namespace on the
    custom nodes only, checked against the plugins' declared outputs."""
    import json

    import onnx

    from deploykit.export import TENSORRT_PLUGINS_FILE, convert

    out = convert("bevdepth_small", tmp_path / "c", passes=["camera_mlp_fold", "bev_pool_op", "deform_conv_op"],
                  tensorrt_plugins=True, quiet=True)
    assert out.check["tensorrt_plugins"]["declared_outputs_match"]
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["onnx"]["tensorrt_plugins_file"] == TENSORRT_PLUGINS_FILE
    tagged = onnx.load(str(tmp_path / "c" / TENSORRT_PLUGINS_FILE)).graph.node
    plain = onnx.load(str(tmp_path / "c" / "model.onnx")).graph.node
    for a, b in zip(tagged, plain):
        extra = {x.name for x in a.attribute} - {x.name for x in b.attribute}
        assert extra == ({"plugin_namespace"} if b.domain == "deploykit" else set())
    assert sorted(n.op_type for n in tagged if n.domain == "deploykit") == ["BEVPool", "BEVPool", "DeformConv"]
