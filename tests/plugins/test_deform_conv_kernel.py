"""DeformConv's Triton kernel (in the interpreter) and torch op against deploykit's reference.

``want`` is deploykit.ops.deform_conv.reference run in float64 on the inputs the kernel got
(fp16 inputs rounded first). Tolerances, relative to max |want|:
  fp32  1e-5: the kernel sums in another order and forms bilinear weights from the pixel
        position directly where the reference goes through grid_sample's [-1, 1]
        coordinates; both are fp32 rounding (observed: below 1e-6);
  fp16  2e-3: the kernel rounds each sampled value to fp16 before its tensor-core dot (as
        mmcv's fp16 columns buffer does) and the output to fp16, 2**-11 relative each
        (observed: up to 6e-4).
Where a result must be exact (integer shifts through a 1x1 identity kernel) it is compared
exactly.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deploykit.ops import deform_conv as dc

from .conftest import HAVE_TRITON, NO_TRITON

pytestmark = pytest.mark.skipif(not HAVE_TRITON, reason=NO_TRITON)

ROOT = Path(__file__).resolve().parents[2]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3}
ATTRS = ("stride", "padding", "dilation", "groups", "deform_groups")


def case(b=1, c=4, h=6, w=7, cout=5, k=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1,
         deform_groups=1, mask=True, bias=True, seed=0, reach=2.5):
    """The node's inputs (x, offset, mask or None, weight, bias or None) in fp32, offsets
    N(0, reach) pixels, so that taps land beyond every edge and between -1 and 0."""
    g = torch.Generator().manual_seed(seed)
    ho, wo = dc.output_size(h, w, k, stride, padding, dilation)
    taps = deform_groups * k[0] * k[1]
    x = torch.randn(b, c, h, w, generator=g)
    offset = torch.randn(b, 2 * taps, ho, wo, generator=g) * reach
    m = torch.rand(b, taps, ho, wo, generator=g) if mask else None
    weight = torch.randn(cout, c // groups, *k, generator=g)
    bias_t = torch.randn(cout, generator=g) if bias else None
    return x, offset, m, weight, bias_t


def node_attrs(spec):
    s = {"stride": (1, 1), "padding": (1, 1), "dilation": (1, 1), "groups": 1, "deform_groups": 1}
    s.update({k: v for k, v in spec.items() if k in ATTRS})
    return [*s["stride"], *s["padding"], *s["dilation"], s["groups"], s["deform_groups"]]


def positions(offset, h, w, kernel, stride, padding, dilation):
    """Every tap's sampling position (y, x), as the kernel forms it."""
    b, _, ho, wo = offset.shape
    base = torch.from_numpy(dc.base_positions(ho, wo, kernel, stride, padding, dilation)).float()  # (K, Ho, Wo, 2)
    off = offset.reshape(b, -1, kernel[0] * kernel[1], 2, ho, wo).movedim(3, -1)  # (B, dg, K, Ho, Wo, [dy, dx])
    return base + off


def want(inputs, attrs):
    x, offset, mask, weight, bias = (None if t is None else t.double() for t in inputs)
    sh, sw, ph, pw, dh, dw, groups, dg = attrs
    return dc.reference(x, offset, mask, weight, bias, (sh, sw), (ph, pw), (dh, dw), groups, dg)


def rel_err(got, ref):
    return float((got.double() - ref).abs().max()) / max(float(ref.abs().max()), 1e-12)


def cast(inputs, dtype):
    return [None if t is None else t.to(dtype) for t in inputs]


CASES = {
    # P = 2 * 7 * 9 = 126 (not a multiple of BLOCK_P), Cout 5
    "v2, bias, odd sizes": {"b": 2, "c": 3, "h": 7, "w": 9, "cout": 5},
    "v1, no bias": {"c": 4, "h": 6, "w": 5, "cout": 7, "mask": False, "bias": False, "seed": 1},
    "groups 2, deform groups 2, stride 2, dilation 2, pad 2": {
        "b": 2, "c": 8, "h": 9, "w": 11, "cout": 6, "stride": (2, 2), "padding": (2, 2), "dilation": (2, 2),
        "groups": 2, "deform_groups": 2, "seed": 2},
    # conv group 0 is channels 0-2, deform groups are 0-1, 2-3, 4-5: a group spans two
    "deform groups straddling conv groups": {"c": 6, "h": 5, "w": 6, "cout": 4, "groups": 2, "deform_groups": 3,
                                             "seed": 3},
    "3x1 kernel, stride 2x1, dilation 1x2, pad 1x0, v1 with bias": {
        "c": 3, "h": 8, "w": 5, "cout": 3, "k": (3, 1), "stride": (2, 1), "padding": (1, 0), "dilation": (1, 2),
        "mask": False, "seed": 4},
    "1x3 kernel, v2 without bias": {"c": 2, "h": 4, "w": 9, "cout": 2, "k": (1, 3), "padding": (0, 1), "bias": False,
                                    "seed": 5},
    # 40 channels: two BLOCK_K chunks, the second partial; 70 outputs: two BLOCK_CO blocks
    "wide: several channel chunks and channel blocks": {"c": 40, "h": 4, "w": 5, "cout": 70, "reach": 1.5, "seed": 6},
}
# fp32 with plan's blocks and with 16-wide ones (more programs, more partial tiles); fp16
# with plan's blocks.
RUNS = {"fp32": (torch.float32, {}), "fp32, 16-blocks": (torch.float32, {"block_p": 16, "block_co": 16, "block_k": 16}),
        "fp16": (torch.float16, {})}


@pytest.mark.parametrize("run", RUNS.values(), ids=RUNS.keys())
@pytest.mark.parametrize("spec", CASES.values(), ids=CASES.keys())
def test_kernel_matches_reference(spec, run):
    from plugins.deform_conv.triton_kernel import launch

    dtype, blocks = run
    inputs = cast(case(**spec), dtype)
    attrs = node_attrs(spec)
    got = launch(*inputs, *attrs, **blocks)
    ref = want(inputs, attrs)
    assert got.shape == ref.shape and got.dtype == dtype and got.is_contiguous()
    err = rel_err(got, ref)
    assert err < TOL[dtype], err


def test_cases_sample_beyond_every_edge_and_between_minus_one_and_zero():
    """The offsets of the main cases put taps in every region mmcv's rule tells apart."""
    for spec in CASES.values():
        x, offset, *_ = case(**spec)
        h, w = x.shape[2:]
        s = dict({"k": (3, 3), "stride": (1, 1), "padding": (1, 1), "dilation": (1, 1)}, **spec)
        pos = positions(offset, h, w, s["k"], s["stride"], s["padding"], s["dilation"])
        for axis, size in ((0, h), (1, w)):
            v = pos[..., axis]
            regions = [v <= -1, (v > -1) & (v < 0), (v >= 0) & (v <= size - 1), (v > size - 1) & (v < size),
                       v >= size]
            assert all(r.any() for r in regions), spec


def test_integer_shifts_are_exact_and_edges_follow_mmcv():
    """A 1x1 identity kernel (groups = channels) with integer offsets is a shift: inside the
    image the kernel returns the pixel exactly; at -1 or H / W (and beyond) it returns 0."""
    from plugins.deform_conv.triton_kernel import launch

    c, h, w = 3, 5, 6
    x = torch.randn(1, c, h, w, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(8)
    offset = torch.randint(-3, 4, (1, 2, h, w), generator=g).float()
    offset[0, 0, 0, :], offset[0, 1, :, -1] = -1.0, 1.0  # exactly -1 (top row) and exactly W (last column)
    weight = torch.ones(c, 1, 1, 1)
    got = launch(x, offset, None, weight, None, 1, 1, 0, 0, 1, 1, c, 1)
    ys = torch.arange(h)[:, None] + offset[0, 0].long()
    xs = torch.arange(w)[None, :] + offset[0, 1].long()
    inside = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
    expect = torch.where(inside, x[0][:, ys.clamp(0, h - 1), xs.clamp(0, w - 1)], torch.zeros(()))
    assert inside.any() and (~inside).any() and not inside[0].any() and not inside[:, -1].any()
    assert torch.equal(got[0], expect)


def test_every_output_element_is_written(monkeypatch):
    """launch allocates with torch.empty; with that memory poisoned (NaN) nothing of it is left."""
    from plugins.deform_conv import triton_kernel

    real_empty = torch.empty

    def poisoned(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(triton_kernel.torch, "empty", poisoned)
    spec = CASES["groups 2, deform groups 2, stride 2, dilation 2, pad 2"]
    inputs, attrs = case(**spec), node_attrs(spec)
    for blocks in ({}, {"block_p": 16, "block_co": 16, "block_k": 16}):
        got = triton_kernel.launch(*inputs, *attrs, **blocks)
        assert not got.isnan().any()
        assert rel_err(got, want(inputs, attrs)) < TOL[torch.float32]


def test_absent_mask_and_bias_may_be_empty_tensors_and_are_not_read():
    from plugins.deform_conv.triton_kernel import launch

    spec = CASES["v1, no bias"]
    x, offset, _, weight, _ = case(**spec)
    attrs = node_attrs(spec)
    empty = torch.zeros(0)
    got = launch(x, offset, empty, weight, empty, *attrs)
    assert torch.equal(got, launch(x, offset, None, weight, None, *attrs))
    assert rel_err(got, want((x, offset, None, weight, None), attrs)) < TOL[torch.float32]


def test_plan_covers_the_output_with_dot_sized_blocks():
    from plugins.deform_conv import triton_kernel as k

    grid, ce = k.plan(2, 64, 32, 48, 128, 3, 3, 32, 48, 1, 1, True, False)
    assert grid == (2 * 32 * 48 // k.BLOCK_P, 128 // k.BLOCK_CO, 1)
    assert ce == {"HAS_MASK": True, "HAS_BIAS": False, "KH": 3, "KW": 3, "BLOCK_P": k.BLOCK_P, "BLOCK_CO": k.BLOCK_CO,
                      "BLOCK_K": k.BLOCK_K}
    grid, ce = k.plan(1, 6, 5, 5, 10, 3, 1, 5, 5, 2, 3, False, True)  # narrow groups: 16-wide blocks
    assert grid == (1, 2, 1) and (ce["BLOCK_CO"], ce["BLOCK_K"], ce["KH"], ce["KW"]) == (16, 16, 3, 1)
    assert list(k.deform_conv_kernel.arg_names[:21]) == ["input_ptr", "offset_ptr", "mask_ptr", "weight_ptr",
                                                         "bias_ptr", *k.SCALARS, "out_ptr"]
    assert list(k.deform_conv_kernel.arg_names[21:]) == list(ce)


def test_kernel_refuses_bad_inputs(monkeypatch):
    from plugins.deform_conv.triton_kernel import launch

    spec = CASES["deform groups straddling conv groups"]
    x, offset, mask, weight, bias = case(**spec)
    attrs = node_attrs(spec)
    bad = {
        (TypeError, "float32 or float16"): ((x.double(), offset, mask, weight, bias), attrs),
        (TypeError, "one dtype"): ((x, offset.half(), mask, weight, bias), attrs),
        (ValueError, "offset must be"): ((x, offset[:, 1:], mask, weight, bias), attrs),
        (ValueError, "mask must be"): ((x, offset, mask[:, 1:], weight, bias), attrs),
        (ValueError, "offset has batch"): ((x, torch.cat([offset, offset]), mask, weight, bias), attrs),
        (ValueError, "bias must be"): ((x, offset, mask, weight, bias[1:]), attrs),
        (ValueError, "does not fit"): ((x, offset, mask, weight[:, :2], bias), attrs),
        (ValueError, "deform groups"): ((x, offset, mask, weight, bias), [*attrs[:7], 4]),
        (ValueError, "stride_h must be >= 1"): ((x, offset, mask, weight, bias), [0, *attrs[1:]]),
        (ValueError, "too small"): ((x[..., :1, :1], offset, mask, weight, bias), [1, 1, 0, 0, 1, 1, 2, 3]),
        (ValueError, "weight must be 4-D"): ((x, offset, mask, weight[..., 0], bias), attrs),
    }
    for (error, match), (inputs, a) in bad.items():
        with pytest.raises(error, match=match):
            launch(*inputs, *a)
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="need CUDA tensors"):
        launch(x, offset, mask, weight, bias, *attrs)


def op_args(spec, dtype=torch.float32):
    x, offset, mask, weight, bias = cast(case(**spec), dtype)
    empty = x.new_zeros(0)
    return (x, offset, empty if mask is None else mask, weight, empty if bias is None else bias, *node_attrs(spec))


SMALL = {"c": 2, "h": 4, "w": 5, "cout": 3, "seed": 9}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_torch_op_runs_the_kernel_under_the_interpreter(dtype, monkeypatch):
    import plugins.deform_conv.torch_op  # noqa: F401  (registers the op)
    from plugins.deform_conv import triton_kernel

    calls = []
    launch = triton_kernel.launch
    monkeypatch.setattr(triton_kernel, "launch", lambda *a, **k: calls.append(1) or launch(*a, **k))
    for spec in (SMALL, dict(SMALL, mask=False, bias=False)):
        args = op_args(spec, dtype)
        got = torch.ops.deploykit.deform_conv(*args)
        assert got.dtype == dtype and got.is_contiguous()
        inputs = [dc._present(t) for t in args[:5]]
        assert rel_err(got, want(inputs, args[5:])) < TOL[dtype]
    assert len(calls) == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_torch_op_runs_the_reference_on_cpu_without_the_interpreter(dtype, monkeypatch):
    from plugins.deform_conv import torch_op

    monkeypatch.delenv("TRITON_INTERPRET")
    spec = CASES["groups 2, deform groups 2, stride 2, dilation 2, pad 2"]
    for s in (spec, dict(spec, mask=False, bias=False)):
        args = op_args(s, dtype)
        got = torch_op.deform_conv(*args)
        assert got.dtype == dtype and got.is_contiguous()
        assert rel_err(got, want([dc._present(t) for t in args[:5]], args[5:])) < TOL[dtype]


def test_torch_op_passes_opcheck():
    from plugins.deform_conv import torch_op

    for spec in (SMALL, dict(SMALL, mask=False, bias=False)):
        result = torch.library.opcheck(torch_op.deform_conv, op_args(spec))
        assert set(result.values()) == {"SUCCESS"}, result
    spec = CASES["3x1 kernel, stride 2x1, dilation 1x2, pad 1x0, v1 with bias"]
    args = op_args(spec, torch.float16)
    with torch._subclasses.fake_tensor.FakeTensorMode() as fake:
        out = torch_op.deform_conv(*(fake.from_tensor(t) for t in args[:5]), *args[5:])
    assert out.shape == (1, 3, 4, 5) and out.dtype == torch.float16


def test_deform_conv_function_hands_cuda_inputs_to_the_kernel_and_keeps_cpu_on_the_reference(monkeypatch):
    """deploykit's op sends the node's arguments to kernels.forward; on CPU the result is the
    reference's bit for bit, and the kernel (interpreted) on those arguments agrees with it."""
    from deploykit.ops import kernels

    spec = CASES["groups 2, deform groups 2, stride 2, dilation 2, pad 2"]
    x, offset, mask, weight, bias = case(**spec)
    a = {"stride": (2, 2), "padding": (2, 2), "dilation": (2, 2), "groups": 2, "deform_groups": 2}
    seen = []
    forward = kernels.forward
    monkeypatch.setattr(kernels, "forward", lambda name, ref, *args: seen.append((name, args)) or
                        forward(name, ref, *args))
    for m, bb in ((mask, bias), (None, None)):
        got = dc.deform_conv2d(x, offset, m, weight, bb, **a, export_form="custom")
        assert torch.equal(got, dc.reference(x, offset, m, weight, bb, *a.values()))
        name, args = seen[-1]
        assert name == "deform_conv" and list(args[5:]) == [2, 2, 2, 2, 2, 2, 2, 2]
        assert (args[2].numel() == 0) == (m is None) and (args[4].numel() == 0) == (bb is None)
        torch.testing.assert_close(kernels.kernel("deform_conv")(*args), got, rtol=1e-5, atol=1e-5)


def test_torch_op_imports_without_triton():
    code = ("import sys; sys.modules['triton'] = None; sys.modules['tensorrt'] = None\n"
            "import plugins.deform_conv, plugins.deform_conv.torch_op\n"
            "import torch; assert hasattr(torch.ops.deploykit, 'deform_conv')\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], check=False, cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_kernel_compiles_for_a_gpu(tmp_path):
    """The kernel as a GPU runs it (compiled, not interpreted) builds for sm_87 and sm_90,
    fp32 and fp16, v2 with bias and v1 without, and with every int argument a constexpr 1 (as
    Triton's launcher specialises ones); the fp32 dot is IEEE fp32 (FMAs, no TF32 mma), the
    fp16 dot uses the tensor cores; no atomics."""
    from .conftest import compile_for_hopper

    out = compile_for_hopper("""
import re
from plugins.deform_conv import triton_kernel as k
for dt in ("fp32", "fp16"):
    sig = {n: "*" + dt for n in ("input_ptr", "offset_ptr", "mask_ptr", "weight_ptr", "bias_ptr", "out_ptr")}
    sig.update(dict.fromkeys(k.SCALARS, "i32"))
    _, v2 = k.plan(2, 64, 32, 48, 128, 3, 3, 32, 48, 1, 1, True, True)
    _, v1 = k.plan(1, 8, 9, 9, 6, 3, 1, 9, 9, 2, 2, False, False)
    compile_for_hopper(k.deform_conv_kernel, sig, v2)
    compile_for_hopper(k.deform_conv_kernel, sig, v1)
    full = {n: sig.get(n, "constexpr") for n in k.deform_conv_kernel.arg_names}
    ptx = triton.compile(ASTSource(fn=k.deform_conv_kernel, signature=full, constexprs=v2), target=GPUTarget(
        "cuda", 90, 32), options=dict(num_warps=k.NUM_WARPS, num_stages=k.NUM_STAGES)).asm["ptx"]
    print(dt, "mma" if re.search(r"\\b(wgmma|mma)\\.", ptx) else "fma",
          "atomics" if re.search(r"\\b(atom|red)\\.", ptx) else "no-atomics")
# Triton's JIT launcher turns int arguments equal to 1 into constexprs (B = 1, stride 1, ...):
# the kernel must build with every scalar a constexpr 1 too.
_, ones = k.plan(1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, True, True)
full = {n: sig.get(n, "constexpr") for n in k.deform_conv_kernel.arg_names}
triton.compile(ASTSource(fn=k.deform_conv_kernel, signature=full, constexprs={**ones, **dict.fromkeys(k.SCALARS, 1)}),
               target=GPUTarget("cuda", 90, 32))
print("ones")
""", tmp_path)
    assert out.split() == ["fp32", "fma", "no-atomics", "fp16", "mma", "no-atomics", "ones"]
