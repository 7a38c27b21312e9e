"""The Triton MSDA kernel (plugins.msda) against deploykit's reference.

CI has no GPU: the kernel runs in Triton's interpreter on CPU tensors
(TRITON_INTERPRET=1, set here if the environment has not set it). With
TRITON_INTERPRET=0 on a CUDA machine the same tests run the compiled kernel on
the GPU. Shapes are tiny because the interpreter is slow.

Tolerances, all as a fraction of max|reference|:
  fp32  1e-5: both sides are fp32 sums of a few dozen products (measured ~1e-7).
  fp16  1e-3 against the fp32 reference on the fp16-rounded inputs: the kernel
        computes in fp32 and rounds once, on the fp16 store (half an ulp is
        2^-11 ~ 4.9e-4 of |out|; measured 3.5e-4).
  int8  1e-5 against the reference on the dequantized int8 inputs. Against the
        float reference the error is quantization's, mostly the locations' step:
        8.6% on MAIN (locations up to 3, so a 3/127 step), 1.2% with int16
        locations (test_int16_locations).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import itertools  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from deploykit.ops.multi_scale_deformable_attn import reference  # noqa: E402
from deploykit.quantize.fake_quant import fake_quantize, qmax  # noqa: E402
from plugins.msda import torch_op, triton_kernel  # noqa: E402  (registers torch.ops.deploykit.msda*)

INTERPRET = torch_op.interpreting()
DEVICE = "cpu" if INTERPRET else "cuda"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)

FP32_TOL = 1e-5
FP16_TOL = 1e-3
INT8_TOL = 1e-5


def edge_locations(size: int) -> list[float]:
    """Normalised coordinates around one axis's edges: far off, pixel -1.5, -1 (the last
    pixel whose taps still touch the map, exclusive), -0.5 (= location 0), 0, the
    middle, size-1, size-0.5 (= location 1), size, size+0.5, far off."""
    pixels = [-1.5, -1.0, -0.5, 0.0, (size - 1) / 2, size - 1.0, size - 0.5, size, size + 0.5]
    return sorted({-2.0, 3.0, 0.0, 1.0, *((p + 0.5) / size for p in pixels)})


def make_case(bs, queries, heads, dims, shapes, points, edges=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    levels = len(shapes)
    hw = torch.tensor(shapes, dtype=torch.int64)
    starts = torch.cat([hw.new_zeros(1), (hw[:, 0] * hw[:, 1]).cumsum(0)[:-1]])
    keys = int((hw[:, 0] * hw[:, 1]).sum())
    value = torch.randn(bs, keys, heads, dims, generator=g)
    loc = torch.rand(bs, queries, heads, levels, points, 2, generator=g) * 1.6 - 0.3
    for lvl, (h, w) in enumerate(shapes if edges else []):
        # Every (x, y) pair of edge coordinates on this level, at random slots:
        # off the map on each side, in the corners, exactly on the edges.
        pairs = torch.tensor(list(itertools.product(edge_locations(w), edge_locations(h))))
        slots = loc[:, :, :, lvl].reshape(-1, 2).clone()
        assert len(pairs) < len(slots), "make the case bigger to hold every edge pair"
        slots[torch.randperm(len(slots), generator=g)[:len(pairs)]] = pairs
        loc[:, :, :, lvl] = slots.reshape(loc[:, :, :, lvl].shape)
    weights = torch.rand(bs, queries, heads, levels, points, generator=g)
    weights = weights / weights.sum(dim=(3, 4), keepdim=True)
    return value, hw, starts, loc, weights


# Odd level sizes with a 1x1 level, 3 heads, head_dims 12 (not a power of two), bs 2.
MAIN = dict(bs=2, queries=9, heads=3, dims=12, shapes=[(5, 7), (3, 3), (1, 1)], points=3)
# One query, one point, head_dims 5, a level narrower than it is tall; random locations only.
SMALL = dict(bs=1, queries=1, heads=2, dims=5, shapes=[(3, 2)], points=1, edges=False)


def on(device, *tensors):
    return [t.to(device) for t in tensors]


def rel_err(got, want):
    return float((got.float().cpu() - want.float().cpu()).abs().max() / want.abs().max())


@pytest.fixture(scope="module")
def main_case():
    return make_case(**MAIN)


@pytest.mark.parametrize("spec, block_q", [(MAIN, None), (MAIN, 4), (SMALL, None)],
                         ids=["main", "main-block_q4", "small"])
def test_fp32_matches_reference(spec, block_q, main_case):
    case = main_case if spec is MAIN else make_case(**spec)
    want = reference(*case)
    got = triton_kernel.launch(*on(DEVICE, *case), block_q=block_q)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert rel_err(got, want) <= FP32_TOL


def test_fp16_matches_reference_on_rounded_inputs(main_case):
    value, hw, starts, loc, w = main_case
    v16, l16, w16 = value.half(), loc.half(), w.half()
    want = reference(v16.float(), hw, starts, l16.float(), w16.float())
    got = triton_kernel.launch(*on(DEVICE, v16, hw, starts, l16, w16))
    assert got.dtype == torch.float16
    assert rel_err(got, want) <= FP16_TOL


def quantize_int8(x: torch.Tensor, bits: int = 8):
    """(int8 or int16 tensor, scale) as deploykit's per-tensor quantizer (amax / qmax) and
    the QDQ graph's QuantizeLinear give them."""
    amax = x.abs().max()
    scale = float(amax / qmax(bits))
    q = torch.round(fake_quantize(x, amax, bits) / scale).to(torch.int8 if bits == 8 else torch.int16)
    return q, scale


def int8_case(case):
    """The case's int8 form, and the float case it quantizes: value[0, 0, 0, 0] is set to
    -128 * scale, which ONNX QuantizeLinear saturates to -128 (deploykit's fake quantization
    stops at -127): the kernel takes the full int8 range."""
    value, hw, starts, loc, w = case
    (vq, vs), (lq, ls), (wq, ws) = (quantize_int8(t) for t in (value, loc, w))
    value = value.clone()
    value[0, 0, 0, 0] = -128 * vs
    vq[0, 0, 0, 0] = -128
    return (vq, vs, hw, starts, lq, ls, wq, ws), (value, hw, starts, loc, w)


def dequantized_reference(vq, vs, hw, starts, lq, ls, wq, ws):
    return reference(vq.float() * vs, hw, starts, lq.float() * ls, wq.float() * ws)


def test_int8_matches_reference_on_dequantized_inputs(main_case):
    args, float_case = int8_case(main_case)
    vq, vs, hw, starts, lq, ls, wq, ws = args
    want = dequantized_reference(*args)
    got = triton_kernel.launch_int8(*on(DEVICE, vq), vs, hw, starts, *on(DEVICE, lq), ls, *on(DEVICE, wq), ws)
    assert got.dtype == torch.float32
    assert rel_err(got, want) <= INT8_TOL
    # Against the float op the error is quantization's, mostly the locations' step:
    # MAIN's locations reach -2 and 3, so the step is 3/127, 0.17 pixel on a 7-wide map.
    float_err = rel_err(got, reference(*float_case))
    print(f"int8 MSDA vs float reference: {float_err:.3g} of max|ref|")
    assert float_err < 0.12  # measured 0.086


def test_int16_locations(main_case):
    """Locations lifted to int16 (value and weights int8): the location step's error is gone."""
    (vq, vs, hw, starts, _, _, wq, ws), float_case = int8_case(main_case)
    lq, ls = quantize_int8(main_case[3], bits=16)
    args = (vq, vs, hw, starts, lq, ls, wq, ws)
    got = triton_kernel.launch_int8(*on(DEVICE, vq), vs, hw, starts, *on(DEVICE, lq), ls, *on(DEVICE, wq), ws)
    assert rel_err(got, dequantized_reference(*args)) <= INT8_TOL
    float_err = rel_err(got, reference(*float_case))
    print(f"int8 MSDA with int16 locations vs float reference: {float_err:.3g} of max|ref|")
    assert float_err < 0.03


def test_torch_ops_run_the_kernel_and_fall_back_to_reference(monkeypatch):
    case = make_case(**SMALL)
    args8, _ = int8_case(case)
    vq, vs, hw, starts, lq, ls, wq, ws = args8
    op8_args = (vq, torch.tensor(vs), hw, starts, lq, torch.tensor(ls), wq, torch.tensor(ws))
    calls = []
    for name in ("launch", "launch_int8"):
        real = getattr(triton_kernel, name)
        monkeypatch.setattr(triton_kernel, name,
                            lambda *a, _real=real, _n=name, **k: calls.append(_n) or _real(*a, **k))

    want = reference(*case)
    want8 = dequantized_reference(*args8)
    got = torch.ops.deploykit.msda(*on(DEVICE, *case))
    got8 = torch.ops.deploykit.msda_int8(*on(DEVICE, *op8_args))
    got8_half = torch.ops.deploykit.msda_int8(*on(DEVICE, *op8_args), out_dtype=torch.float16)
    assert calls == ["launch", "launch_int8", "launch_int8"]
    assert rel_err(got, want) <= FP32_TOL and rel_err(got8, want8) <= INT8_TOL
    assert got8_half.dtype == torch.float16 and rel_err(got8_half, want8) <= FP16_TOL

    # CPU tensors without the interpreter: the reference, no kernel.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    calls.clear()
    ref = torch.ops.deploykit.msda(*case)
    ref16 = torch.ops.deploykit.msda(case[0].half(), *case[1:])
    ref8 = torch.ops.deploykit.msda_int8(*op8_args)
    assert calls == []
    assert rel_err(ref, want) == 0 and ref16.dtype == torch.float16
    assert rel_err(ref8, want8) <= INT8_TOL


def test_opcheck():
    """torch.library's checks of schema, fake kernel and dispatch (the ops then trace under
    torch.compile / torch.export)."""
    case = make_case(**SMALL)
    torch.library.opcheck(torch.ops.deploykit.msda.default, tuple(on(DEVICE, *case)))
    vq, vs, hw, starts, lq, ls, wq, ws = int8_case(case)[0]
    case8 = on(DEVICE, vq, torch.tensor(vs), hw, starts, lq, torch.tensor(ls), wq, torch.tensor(ws))
    torch.library.opcheck(torch.ops.deploykit.msda_int8.default, tuple(case8), {"out_dtype": torch.float16})


def test_fake_kernels_give_shapes_and_dtypes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    case = make_case(**SMALL)
    vq, vs, hw, starts, lq, ls, wq, ws = int8_case(case)[0]
    case8 = (vq, torch.tensor(vs), hw, starts, lq, torch.tensor(ls), wq, torch.tensor(ws))
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in case]
        out = torch.ops.deploykit.msda(*fake)
        out16 = torch.ops.deploykit.msda(fake[0].half(), *fake[1:])
        f8 = [mode.from_tensor(t) for t in case8]
        out8 = torch.ops.deploykit.msda_int8(*f8, out_dtype=torch.float16)
    assert tuple(out.shape) == (1, 1, 10) and out.dtype == torch.float32 and out16.dtype == torch.float16
    assert tuple(out8.shape) == (1, 1, 10) and out8.dtype == torch.float16


def test_bad_inputs_are_refused_before_launch():
    value, hw, starts, loc, w = make_case(**SMALL)
    with pytest.raises(TypeError, match="int8: use launch_int8"):
        triton_kernel.launch(value.to(torch.int8), hw, starts, loc, w)
    with pytest.raises(TypeError, match="locations_q must be int8 or int16"):
        triton_kernel.launch_int8(value.to(torch.int8), 1.0, hw, starts, loc.to(torch.int32), 1.0,
                                  w.to(torch.int8), 1.0)
    with pytest.raises(TypeError, match="value_q must be int8"):
        triton_kernel.launch_int8(value, 1.0, hw, starts, loc.to(torch.int8), 1.0, w.to(torch.int8), 1.0)
    with pytest.raises(ValueError, match="does not fit in 6 keys"):
        triton_kernel.launch(value, hw, starts + 1, loc, w)
    with pytest.raises(ValueError, match="attention_weights must be"):
        triton_kernel.launch(value, hw, starts, loc, w[..., :0])
    with pytest.raises(ValueError, match="spatial_shapes must be"):
        triton_kernel.launch(value, torch.cat([hw, hw]), starts, loc, w)
    with pytest.raises(ValueError, match="power of two"):
        triton_kernel.launch(value, hw, starts, loc, w, block_q=3)
    with pytest.raises(ValueError, match="one per-tensor scale"):
        triton_kernel.launch_int8(value.to(torch.int8), torch.ones(2), hw, starts, loc.to(torch.int8), 1.0,
                                  w.to(torch.int8), 1.0)


def test_package_imports_without_triton_and_kernel_follows_interpret_at_launch():
    """plugins.msda registers its ops and runs the CPU reference with triton unimportable;
    then, with triton imported while TRITON_INTERPRET is unset, setting it later still runs
    the kernel in the interpreter."""
    code = """
import os, sys
class NoTriton:
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ImportError("no triton")
sys.meta_path.insert(0, NoTriton())
import torch, plugins.msda
from deploykit.ops.multi_scale_deformable_attn import reference
args = (torch.randn(1, 4, 1, 3), torch.tensor([[2, 2]]), torch.tensor([0]), torch.rand(1, 5, 1, 1, 2, 2),
        torch.rand(1, 5, 1, 1, 2))
out = torch.ops.deploykit.msda(*args)
assert out.shape == (1, 5, 3) and "triton" not in sys.modules
sys.meta_path.remove(sys.meta_path[0])
from plugins.msda import triton_kernel
os.environ["TRITON_INTERPRET"] = "1"
out = torch.ops.deploykit.msda(*args)
from plugins._triton import _rejitted
assert (triton_kernel.msda_kernel.fn, True) in _rejitted
assert (out - reference(*args)).abs().max() <= 1e-5 * reference(*args).abs().max()
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], cwd=root, env=env, check=True, timeout=120)
