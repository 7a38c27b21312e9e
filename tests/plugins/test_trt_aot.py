"""The TensorRT AOT plugins (``aot_impl``, plugins/_aot.py) without TensorRT or a GPU.

What TensorRT does with an AOT plugin at build time is call ``aot_impl`` with the node's
static input descriptors and attributes; at run time it launches the returned kernel with
the returned grid and block, and the arguments (inputs..., extra int32 args..., outputs...)
into an output buffer it has not cleared. These tests do exactly that against the tiny
exported models of test_trt_plugins.py: ``aot_impl`` runs against the tensorrt.plugin
stand-in, the kernel it chose runs in Triton's interpreter with the grid and extra arguments
``aot_impl`` returned, into an output filled with NaN, and the result must be what ONNX
Runtime computes for the node. The compile test builds each plan's PTX for sm_87 and sm_90
and checks its parameter list is TensorRT's.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from deploykit.engines import tensorrt_plugins as tp
from plugins import _aot

from .conftest import HAVE_TRITON, NO_TRITON
from .test_trt_plugins import CASES, FAKE_TO_ONNX, _attributes, _inputs, _node_values, _the_node, exported, fake  # noqa: F401

pytestmark = pytest.mark.skipif(not HAVE_TRITON, reason=NO_TRITON)

AOT_OPS = ("PillarScatter", "MultiScaleDeformableAttn", "BEVPool", "DeformConv")
FLOAT_INPUTS = {"PillarScatter": (0,), "MultiScaleDeformableAttn": (0, 3, 4), "BEVPool": (0, 1),
                "DeformConv": (0, 1, 2, 3, 4)}
TORCH = {fake.float32: torch.float32, fake.float16: torch.float16, fake.int32: torch.int32, fake.int64: torch.int64}


@pytest.fixture()
def trtp():
    import plugins.trt

    module = fake.new()
    plugins.trt.load(module)
    return module


class _Captured:
    def __init__(self):
        self.plans = []

    def __call__(self, plan, target=None):
        plan.check_order()
        self.plans.append(plan)
        return _aot.Compiled(f"{plan.kernel.__name__}_0d1d", "// ptx", plan.num_warps * 32, 0)


def _aot_case(trtp, model, monkeypatch, half: bool):
    """(plan, launch params, extra args, torch inputs, output shape) for the model's node."""
    node = _the_node(model)
    inputs = _inputs(model, node)
    floats = FLOAT_INPUTS[node.op_type]
    if half:
        inputs = [(shape, fake.float16 if i in floats else dtype) for i, (shape, dtype) in enumerate(inputs)]
    captured = _Captured()
    monkeypatch.setattr(_aot, "compile_ptx", captured)
    # The attributes in the order the parser receives them: the node's, as with_plugin_attributes leaves it.
    tagged = {k: v for k, v in _attributes(_the_node(tp.with_plugin_attributes(model))).items()
              if k != "plugin_namespace"}
    name, ptx, launch, extra = trtp.aot(f"deploykit::{node.op_type}", inputs, tagged)
    (plan,) = captured.plans
    assert name == f"{plan.kernel.__name__}_0d1d" and ptx == "// ptx"
    assert launch.block_x == plan.num_warps * 32 and launch.shared_mem == 0
    return node, plan, launch, extra, inputs


@pytest.mark.parametrize("half", [False, True], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", CASES)
def test_aot_launch_computes_the_node(trtp, exported, name, half, monkeypatch):  # noqa: F811 - the imported fixture
    model = exported[name]
    node, plan, launch, extra, inputs = _aot_case(trtp, model, monkeypatch, half)
    from deploykit.engines import ort

    _, feeds = CASES[name][0](**CASES[name][1])
    values = [v.to(TORCH[dtype]).contiguous() for v, (_, dtype) in zip(_node_values(model, feeds, node), inputs)]
    (out_shape, out_dtype), = trtp.evaluate(f"deploykit::{node.op_type}", inputs, _attributes(node))
    out = torch.full(out_shape, float("nan"), dtype=TORCH[out_dtype])  # TensorRT does not clear outputs
    grid = (launch.grid_x, launch.grid_y, launch.grid_z)
    assert tuple(g for g in grid) == tuple(plan.grid) + (1,) * (3 - len(plan.grid))
    scalars = [e.value for e in extra]
    assert scalars == list(plan.scalars.values())
    from plugins._triton import current

    current(plan.kernel)[grid](*values, *scalars, out, **plan.constexprs, num_warps=plan.num_warps,
                               num_stages=plan.num_stages)
    if half:  # the reference on the fp16-rounded inputs
        feeds = {k: (v.astype(np.float16).astype(np.float32) if v.dtype == np.float32 else v) for k, v in feeds.items()}
    want = ort.build(model, threads=1).run(feeds)[model.graph.output[0].name]
    got = out.float().numpy()
    assert not np.isnan(got).any(), "the kernel left output elements unwritten"
    scale = max(1.0, float(np.abs(want).max()))
    tol = 2e-3 * scale if half else 1e-5 * scale
    np.testing.assert_allclose(got, want, rtol=0, atol=tol)


def test_aot_impl_takes_every_attribute_and_the_tactic(trtp):
    for record in trtp.registry.values():
        assert record.aot_impl is not None, record.plugin_id
        assert record.aot_impl_attributes == list(record.attributes)


def test_bev_pool_mode_follows_the_interval_count(trtp, exported, monkeypatch):  # noqa: F811
    sorted_plan = _aot_case(trtp, exported["BEVPool sorted"], monkeypatch, False)[1]
    unsorted_plan = _aot_case(trtp, exported["BEVPool unsorted bs2 z2"], monkeypatch, False)[1]
    assert sorted_plan.constexprs["SORTED"] is True and unsorted_plan.constexprs["SORTED"] is False


def test_dynamic_shapes_are_refused_with_what_to_do():
    class Expr:
        is_fake, is_constant = False, False

    class Desc:
        shape_expr = (Expr(),)

    with pytest.raises(ValueError, match="static shapes"):
        _aot.static_dims(Desc(), "PillarScatter features")


def test_wrong_argument_order_is_refused():
    from plugins.pillar_scatter import triton_kernel as k

    plan = _aot.Plan(k.pillar_scatter_kernel, inputs={"features_ptr": "*fp32", "coords_ptr": "*i32"},
                     scalars={"P": 1, "C": 1, "H": 1, "W": 1}, outputs={"canvas_ptr": "*fp32"},
                     constexprs={"BLOCK_P": 128, "BLOCK_C": 16}, grid=(1,))
    with pytest.raises(ValueError, match="not TensorRT's AOT order"):
        plan.check_order()  # the JIT kernel takes its output before the scalars


PTX = """.version 8.7
.target sm_90a
.visible .entry k(
	.param .u64 .ptr .global .align 1 k_param_0,
	.param .u32 k_param_1,
	.param .u64 .ptr .global .align 1 k_param_2,
	.param .u64 .ptr .global .align 1 k_param_3,
	.param .u64 .ptr .global .align 1 k_param_4
)
.reqntid 128
{
	ld.param.b64 	%rd5, [k_param_0];
	ld.param.b32 	%r5, [k_param_1];
	ld.param.b64 	%rd6, [k_param_2];
	ret;
}
"""


def test_hidden_trailing_parameters_are_dropped_only_when_unread():
    trimmed = _aot.trim_parameters(PTX, 3)
    assert "k_param_3" not in trimmed and "k_param_4" not in trimmed
    assert trimmed.count("k_param_2") == 2 and "ld.param.b32 \t%r5, [k_param_1];" in trimmed
    with pytest.raises(ValueError, match="has 5 parameters, TensorRT passes 6"):
        _aot.trim_parameters(PTX, 6)
    with pytest.raises(ValueError, match="reads its hidden parameter k_param_2"):
        _aot.trim_parameters(PTX, 2)


COMPILE = """
import json, sys
import triton
from triton.backends.compiler import GPUTarget
if "nvidia" not in triton.backends.backends:
    print("NO NVIDIA BACKEND"); sys.exit(0)
from deploykit.engines import tensorrt_plugins as tp
from plugins import _aot
from plugins.pillar_scatter import triton_kernel as ps
from plugins.bev_pool import triton_kernel as bp
from plugins.msda import triton_kernel as msda
from plugins.deform_conv import triton_kernel as dc

class T:
    def __init__(self, name): self.name = name
F, H, I32, I64 = T("FLOAT"), T("HALF"), T("INT32"), T("INT64")
plans = {}
for tag, f in (("fp32", F), ("fp16", H)):
    plans["PillarScatter " + tag] = ps.aot_plan((1, 64, 40000), f, (40000, 4), I32, 468, 468)
    for k in (0, 9000):
        plans[f"BEVPool K={k} " + tag] = bp.aot_plan([(1, 6, 112, 16, 44), (1, 6, 16, 44, 80), (285726,), (285726,),
                                                      (285726,), (k,), (k,)], [f, f] + [I32] * 5, 1, 128, 128)
    plans["MSDA " + tag] = msda.aot_plan([(1, 30825, 8, 32), (4, 2), (4,), (1, 2500, 8, 4, 4, 2), (1, 2500, 8, 4, 4)],
                                         [f, I64, I64, f, f])
    plans["DeformConv " + tag] = dc.aot_plan([(6, 512, 16, 44), (6, 72, 16, 44), (6, 36, 16, 44), (512, 128, 3, 3),
                                              (512,)], [f] * 5, 1, 1, 1, 1, 1, 1, 4, 4)
out = {}
for name, plan in plans.items():
    for arch in (87, 90):
        c = _aot.compile_ptx(plan, target=GPUTarget("cuda", arch, 32))
        entry = c.ptx[c.ptx.index(".entry"):c.ptx.index(")", c.ptx.index(".entry"))]
        out[f"{name} sm_{arch}"] = [entry.count(".param"), len(plan.arguments), c.threads, plan.num_warps * 32]
print(json.dumps(out))
"""


def test_aot_kernels_compile_to_tensorrts_argument_list(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1")
    done = subprocess.run([sys.executable, "-c", COMPILE], cwd=Path(__file__).resolve().parents[2], env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    if "NO NVIDIA BACKEND" in done.stdout:
        pytest.skip("Triton's NVIDIA backend is not installed")
    counts = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(counts) == 20  # 5 plans x fp32/fp16 x sm_87/sm_90
    for name, (params, arguments, threads, want_threads) in counts.items():
        assert params == arguments, name  # TensorRT's (inputs, scalars, outputs), hidden scratch params gone
        assert threads == want_threads, name
