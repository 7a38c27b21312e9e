"""PillarScatter's Triton kernel (in the interpreter) and torch op against deploykit's reference.

The kernel only moves values: every comparison is exact, in fp32 and fp16.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from deploykit.ops.pillar_scatter import reference

from .conftest import HAVE_TRITON, NO_TRITON

ROOT = Path(__file__).resolve().parents[2]
needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason=NO_TRITON)


def case(channels, pillars, height, width, padded=0, off_grid=0, seed=0, dtype=torch.float32):
    """features (1, C, P) and coords (P, 4): distinct cells, padding rows of -1, off-grid rows
    (one coordinate in range, the other past an edge or negative), in random order."""
    rng = np.random.default_rng(seed)
    total = pillars + padded + off_grid
    feats = rng.standard_normal((1, channels, total)).astype(np.float32)
    cells = rng.permutation(height * width)[:pillars]
    coords = np.full((total, 4), -1, np.int32)
    coords[:pillars, :2] = 0
    coords[:pillars, 2], coords[:pillars, 3] = cells // width, cells % width
    edges = [(height, 0), (0, width), (-1, 0), (0, -2), (height + 3, width + 1)]
    for i in range(off_grid):
        coords[pillars + padded + i] = [0, 0, *edges[i % len(edges)]]
    order = rng.permutation(total)
    return torch.from_numpy(feats[:, :, order]).to(dtype), torch.from_numpy(coords[order])


CASES = {
    "odd sizes, padding, off-grid": dict(channels=37, pillars=150, height=13, width=17, padded=40, off_grid=9),
    "single pillar": dict(channels=5, pillars=1, height=3, width=4),
    "all padding": dict(channels=7, pillars=0, height=5, width=6, padded=11),
    "only off-grid": dict(channels=3, pillars=0, height=4, width=4, off_grid=5),
    "one channel, full grid": dict(channels=1, pillars=6 * 7, height=6, width=7),
    "no pillars at all": dict(channels=4, pillars=0, height=2, width=3),
}


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("blocks", [{}, dict(block_p=16, block_c=4)], ids=["default blocks", "small blocks"])
@pytest.mark.parametrize("spec", CASES.values(), ids=CASES.keys())
def test_kernel_equals_reference(spec, blocks, dtype):
    from plugins.pillar_scatter.triton_kernel import launch

    feats, coords = case(**spec, dtype=dtype)
    got = launch(feats, coords, spec["height"], spec["width"], **blocks)
    want = reference(feats, coords, spec["height"], spec["width"])
    assert got.dtype == dtype and got.shape == want.shape and got.is_contiguous()
    assert torch.equal(got, want)


@needs_triton
def test_kernel_takes_int64_coords_and_non_contiguous_features():
    from plugins.pillar_scatter.triton_kernel import launch

    feats, coords = case(channels=9, pillars=40, height=7, width=9, padded=3, off_grid=3, seed=1)
    strided = feats.transpose(1, 2).contiguous().transpose(1, 2)  # same values, P-major memory
    assert not strided.is_contiguous()
    got = launch(strided, coords.long(), 7, 9)
    assert torch.equal(got, reference(feats, coords, 7, 9))


@needs_triton
def test_kernel_refuses_bad_inputs():
    from plugins.pillar_scatter.triton_kernel import launch

    feats, coords = case(channels=3, pillars=4, height=3, width=3)
    with pytest.raises(TypeError, match="float32 or float16"):
        launch(feats.double(), coords, 3, 3)
    with pytest.raises(TypeError, match="int32"):
        launch(feats, coords.float(), 3, 3)
    with pytest.raises(ValueError, match=r"\(1, C, P\)"):
        launch(feats[0], coords, 3, 3)
    with pytest.raises(ValueError, match="coords must be"):
        launch(feats, coords[:3], 3, 3)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_torch_op_runs_the_kernel_under_the_interpreter(dtype, monkeypatch):
    import plugins.pillar_scatter.torch_op  # noqa: F401  (registers the op)
    from plugins.pillar_scatter import triton_kernel

    calls = []
    launch = triton_kernel.launch
    monkeypatch.setattr(triton_kernel, "launch", lambda *a, **k: calls.append(1) or launch(*a, **k))
    feats, coords = case(channels=19, pillars=30, height=6, width=9, padded=4, off_grid=2, seed=2, dtype=dtype)
    got = torch.ops.deploykit.pillar_scatter(feats, coords, 6, 9)
    assert calls and got.dtype == dtype and torch.equal(got, reference(feats, coords, 6, 9))


def test_torch_op_runs_the_reference_on_cpu_without_the_interpreter(monkeypatch):
    from plugins.pillar_scatter import torch_op

    monkeypatch.delenv("TRITON_INTERPRET")
    feats, coords = case(channels=4, pillars=10, height=4, width=5, padded=2, off_grid=2, seed=3)
    got = torch_op.pillar_scatter(feats, coords, 4, 5)
    assert got.is_contiguous() and torch.equal(got, reference(feats, coords, 4, 5))


@needs_triton
def test_torch_op_passes_opcheck():
    from plugins.pillar_scatter import torch_op

    feats, coords = case(channels=6, pillars=12, height=5, width=4, padded=2, seed=4)
    result = torch.library.opcheck(torch_op.pillar_scatter, (feats, coords, 5, 4))
    assert set(result.values()) == {"SUCCESS"}, result
    half = feats.half()
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        out = torch_op.pillar_scatter(mode.from_tensor(half), mode.from_tensor(coords), 5, 4)
    assert out.shape == (1, 6, 5, 4) and out.dtype == torch.float16


def test_plugins_import_without_triton():
    """``import plugins`` and the torch ops' modules need neither Triton nor TensorRT."""
    code = ("import sys; sys.modules['triton'] = None; sys.modules['tensorrt'] = None\n"
            "import plugins, plugins.pillar_scatter, plugins.bev_pool, plugins._triton\n"
            "import plugins.pillar_scatter.torch_op, plugins.bev_pool.torch_op\n"
            "import torch; assert hasattr(torch.ops.deploykit, 'pillar_scatter')\n"
            "assert hasattr(torch.ops.deploykit, 'bev_pool')\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], check=False, cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr



@needs_triton
def test_kernel_compiles_for_a_gpu(tmp_path):
    """The kernel as a GPU runs it (compiled, not interpreted) builds for sm_90, fp32 and
    fp16, without atomics."""
    from .conftest import compile_for_hopper

    out = compile_for_hopper("""
from plugins.pillar_scatter import triton_kernel as k
for dt in ("fp32", "fp16"):
    sig = dict(features_ptr="*" + dt, coords_ptr="*i32", canvas_ptr="*" + dt, P="i32", C="i32", H="i32", W="i32")
    print(dt, compile_for_hopper(k.pillar_scatter_kernel, sig, dict(BLOCK_P=k.BLOCK_P, BLOCK_C=k.BLOCK_C)))
""", tmp_path)
    assert out.split() == ["fp32", "False", "fp16", "False"]
