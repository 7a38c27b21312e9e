"""BEVPool's Triton kernels (in the interpreter) and torch op against deploykit's reference.

Both modes: sorted ranks with intervals (the interval walk, no atomics) and unsorted ranks
with zero-length intervals (per-point atomic adds), ranks_bev < 0 dropped in both.

Tolerances, relative to max |want| with want the reference summed in float64:
  fp32 inputs  1e-5 (sums in another order differ by fp32 rounding only);
  fp16 inputs  2e-3, want computed from the fp16-rounded inputs (the kernels accumulate in
               fp32; what is left is the fp16 output's rounding, 2**-11 relative).
"""

import numpy as np
import pytest
import torch

from deploykit.ops import bev_pool

from .conftest import HAVE_TRITON, NO_TRITON

pytestmark = pytest.mark.skipif(not HAVE_TRITON, reason=NO_TRITON)

TOL = {torch.float32: 1e-5, torch.float16: 2e-3}
NAMES = bev_pool.RANK_NAMES


def case(b=1, n=2, d=4, h=3, w=5, c=6, grid=(1, 9, 11), seed=0, one_cell_camera=False):
    """depth (B, N, D, H, W), feat (B, N, H, W, C) and each frustum point's (x, y, z) cell,
    a little beyond the grid on every side so that some points fall off it."""
    rng = np.random.default_rng(seed)
    depth = rng.random((b, n, d, h, w)).astype(np.float32)
    depth /= depth.sum(2, keepdims=True)
    feat = rng.standard_normal((b, n, h, w, c)).astype(np.float32)
    z_n, y_n, x_n = grid
    cells = np.stack([rng.integers(-2, x_n + 2, (b, n, d, h, w)), rng.integers(-1, y_n + 1, (b, n, d, h, w)),
                      rng.integers(-1, z_n + 1, (b, n, d, h, w))], -1)
    if one_cell_camera:  # every point of the first camera in one cell: a run longer than any block
        cells[:, 0] = [x_n // 2, y_n // 2, z_n - 1]
    return torch.from_numpy(depth), torch.from_numpy(feat), cells


def sorted_ranks(cells, grid, dropped_run=False):
    """prepare_ranks' tensors; with ``dropped_run`` the off-grid points come back as a first
    run of ranks_bev -1 (sorted order still holds), which the kernel must skip."""
    ranks = bev_pool.prepare_ranks(cells, grid)
    if dropped_run:
        off = np.setdiff1d(np.arange(cells[..., 0].size), ranks["ranks_depth"]).astype(np.int32)
        assert len(off)
        d, h, w = cells.shape[2:5]
        pixel = (off // (d * h * w) * h * w + off % (h * w)).astype(np.int32)
        ranks = {"ranks_depth": np.r_[off, ranks["ranks_depth"]], "ranks_feat": np.r_[pixel, ranks["ranks_feat"]],
                 "ranks_bev": np.r_[np.full(len(off), -1, np.int32), ranks["ranks_bev"]],
                 "interval_starts": np.r_[0, ranks["interval_starts"] + len(off)].astype(np.int32),
                 "interval_lengths": np.r_[len(off), ranks["interval_lengths"]].astype(np.int32)}
    return {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.int32)) for k, v in ranks.items()}


def unsorted_ranks(cells, grid, seed=0):
    """Every frustum point, in random order, off-grid ones with ranks_bev -1; no intervals."""
    s = sorted_ranks(cells, grid, dropped_run=True)
    perm = torch.from_numpy(np.random.default_rng(seed).permutation(len(s["ranks_bev"])))
    ranks = bev_pool.unsorted_ranks(*(s[k][perm] for k in NAMES[:3]))
    assert (ranks["ranks_bev"] < 0).any() and not (ranks["ranks_bev"].diff() >= 0).all()
    return ranks


def ranks_for(mode, cells, grid, seed=0):
    if mode == "sorted":
        return sorted_ranks(cells, grid)
    if mode == "sorted, dropped run":
        return sorted_ranks(cells, grid, dropped_run=True)
    return unsorted_ranks(cells, grid, seed)


def want(depth, feat, ranks, grid):
    return bev_pool.reference(depth.double(), feat.double(), *ranks.values(), *grid)


def rel_err(got, ref):
    return float((got.double() - ref).abs().max()) / max(float(ref.abs().max()), 1e-12)


MODES = ["sorted", "sorted, dropped run", "unsorted"]
CASES = {
    "odd grid, 2 batches, 19 channels": dict(b=2, n=3, d=3, h=3, w=4, c=19, grid=(2, 5, 7), seed=1),
    "one channel": dict(c=1, grid=(3, 1, 4), seed=2),
    "most cells empty": dict(d=2, h=2, w=3, c=5, grid=(1, 13, 17), seed=3),
    "runs longer than a block": dict(b=2, n=2, d=8, h=4, w=5, c=7, grid=(1, 3, 4), seed=4, one_cell_camera=True),
}
# Small blocks: many programs, intervals of several lengths in one block; fp16 with the
# default blocks only (the interpreter is slow).
RUNS = {"fp32": ({}, torch.float32),
        "fp32, small blocks": (dict(block_r=8, block_i=4, block_m=16, block_c=4), torch.float32),
        "fp16": ({}, torch.float16)}


@pytest.mark.parametrize("run", RUNS.values(), ids=RUNS.keys())
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("spec", CASES.values(), ids=CASES.keys())
def test_kernel_matches_reference(spec, mode, run):
    blocks, dtype = run
    from plugins.bev_pool.triton_kernel import launch

    grid = spec["grid"]
    depth, feat, cells = case(**spec)
    depth, feat = depth.to(dtype), feat.to(dtype)
    ranks = ranks_for(mode, cells, grid, spec["seed"])
    got = launch(depth, feat, *ranks.values(), *grid, **blocks)
    ref = want(depth, feat, ranks, grid)
    assert got.shape == ref.shape and got.dtype == dtype and got.is_contiguous()
    assert rel_err(got, ref) < TOL[dtype]
    if spec.get("one_cell_camera") and mode != "unsorted":
        longest = int(ranks["interval_lengths"].max())
        assert longest > max(blocks.get("block_m", 128), blocks.get("block_i", 32))


@pytest.mark.parametrize("mode", MODES)
def test_cells_without_points_are_exactly_zero(mode):
    from plugins.bev_pool.triton_kernel import launch

    grid = (1, 7, 9)
    depth, feat, cells = case(b=2, d=3, h=2, w=3, c=5, grid=grid, seed=5)
    ranks = ranks_for(mode, cells, grid, 5)
    got = launch(depth, feat, *ranks.values(), *grid, block_r=8, block_i=4, block_m=16)
    occupied = torch.zeros(2 * 7 * 9, dtype=torch.bool)
    occupied[ranks["ranks_bev"][ranks["ranks_bev"] >= 0].long()] = True
    cells_last = got.permute(0, 2, 3, 4, 1).reshape(-1, 5)
    assert (~occupied).sum() > 10 and occupied.sum() > 10
    assert torch.all(cells_last[~occupied] == 0) and torch.all(cells_last[occupied] != 0)


@pytest.mark.parametrize("mode", ["sorted", "unsorted"])
def test_a_camera_whose_points_are_all_dropped_adds_nothing(mode):
    from plugins.bev_pool.triton_kernel import launch

    grid = (1, 9, 11)
    depth, feat, cells = case(b=2, n=3, c=6, grid=grid, seed=6)
    ranks = unsorted_ranks(cells, grid, 6)
    camera = (ranks["ranks_feat"] // (3 * 5)) % 3 == 1  # pixel index -> (batch, camera)
    ranks["ranks_bev"] = torch.where(camera, -1, ranks["ranks_bev"])
    if mode == "sorted":  # sort by cell: the camera's points become part of the first, dropped, run
        order = torch.sort(ranks["ranks_bev"], stable=True).indices
        rb = ranks["ranks_bev"][order]
        starts = torch.cat([torch.tensor([0]), torch.nonzero(rb[1:] != rb[:-1])[:, 0] + 1]).int()
        lengths = torch.diff(torch.cat([starts, torch.tensor([len(rb)], dtype=torch.int32)])).int()
        ranks = {"ranks_depth": ranks["ranks_depth"][order], "ranks_feat": ranks["ranks_feat"][order],
                 "ranks_bev": rb, "interval_starts": starts, "interval_lengths": lengths}
    got = launch(depth, feat, *ranks.values(), *grid)
    assert rel_err(got, want(depth, feat, ranks, grid)) < TOL[torch.float32]
    blinded = depth.clone()
    blinded[:, 1] = 1e6  # the dropped camera's depth is never summed
    assert torch.equal(launch(blinded, feat, *ranks.values(), *grid), got)
    assert got.abs().max() > 0.1


def test_nothing_to_pool_gives_zeros():
    from plugins.bev_pool.triton_kernel import launch

    grid = (2, 3, 5)
    depth, feat, cells = case(b=2, c=3, grid=grid, seed=7)
    n = depth.numel()
    nowhere = bev_pool.prepare_ranks(np.full_like(cells, -1), grid)  # M = 0, K = 0
    all_dropped = bev_pool.unsorted_ranks(torch.arange(n, dtype=torch.int32), torch.zeros(n, dtype=torch.int32),
                                          torch.full((n,), -1, dtype=torch.int32))
    dropped_run = dict(all_dropped, interval_starts=torch.tensor([0], dtype=torch.int32),
                       interval_lengths=torch.tensor([n], dtype=torch.int32))
    for ranks in ({k: torch.from_numpy(v) for k, v in nowhere.items()}, all_dropped, dropped_run):
        got = launch(depth, feat, *ranks.values(), *grid)
        assert got.shape == (2, 3, *grid) and torch.all(got == 0)


@pytest.mark.parametrize("mode", ["sorted", "unsorted"])
def test_kernel_takes_int64_ranks_and_mixed_dtypes(mode):
    from plugins.bev_pool.triton_kernel import launch

    grid = (1, 5, 6)
    depth, feat, cells = case(c=9, grid=grid, seed=8)
    ranks = {k: v.long() for k, v in ranks_for(mode, cells, grid, 8).items()}
    got = launch(depth.half(), feat, *ranks.values(), *grid)
    assert got.dtype == torch.float32
    assert rel_err(got, want(depth.half(), feat, ranks, grid)) < TOL[torch.float32]


def test_kernel_refuses_bad_inputs():
    from plugins.bev_pool.triton_kernel import launch

    grid = (1, 3, 3)
    depth, feat, cells = case(grid=grid, seed=9)
    ranks = sorted_ranks(cells, grid)
    with pytest.raises(TypeError, match="float32 or float16"):
        launch(depth.double(), feat, *ranks.values(), *grid)
    with pytest.raises(TypeError, match="ranks_bev must be int32"):
        launch(depth, feat, *dict(ranks, ranks_bev=ranks["ranks_bev"].float()).values(), *grid)
    with pytest.raises(ValueError, match="equal"):
        launch(depth, feat, *dict(ranks, ranks_feat=ranks["ranks_feat"][1:]).values(), *grid)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("mode", ["sorted", "unsorted"])
def test_torch_op_runs_the_kernel_under_the_interpreter(mode, dtype, monkeypatch):
    import plugins.bev_pool.torch_op  # noqa: F401  (registers the op)
    from plugins.bev_pool import triton_kernel

    calls = []
    launch = triton_kernel.launch
    monkeypatch.setattr(triton_kernel, "launch", lambda *a, **k: calls.append(1) or launch(*a, **k))
    grid = (2, 5, 7)
    depth, feat, cells = case(b=2, c=19, grid=grid, seed=10)
    depth, feat = depth.to(dtype), feat.to(dtype)
    ranks = ranks_for(mode, cells, grid, 10)
    got = torch.ops.deploykit.bev_pool(depth, feat, *ranks.values(), *grid)
    assert calls and got.dtype == dtype and got.is_contiguous()
    assert rel_err(got, want(depth, feat, ranks, grid)) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_torch_op_runs_the_reference_on_cpu_without_the_interpreter(dtype, monkeypatch):
    from plugins.bev_pool import torch_op

    monkeypatch.delenv("TRITON_INTERPRET")
    grid = (1, 6, 5)
    depth, feat, cells = case(b=2, c=4, grid=grid, seed=11)
    depth, feat = depth.to(dtype), feat.to(dtype)
    for ranks in (sorted_ranks(cells, grid), unsorted_ranks(cells, grid, 11)):
        got = torch_op.bev_pool(depth, feat, *ranks.values(), *grid)
        assert got.dtype == dtype and got.is_contiguous()
        assert rel_err(got, want(depth, feat, ranks, grid)) < TOL[dtype]


@pytest.mark.parametrize("mode", ["sorted", "unsorted"])
def test_torch_op_passes_opcheck(mode):
    from plugins.bev_pool import torch_op

    grid = (1, 4, 5)
    depth, feat, cells = case(c=3, d=2, h=2, w=3, grid=grid, seed=12)
    ranks = ranks_for(mode, cells, grid, 12)
    result = torch.library.opcheck(torch_op.bev_pool, (depth, feat, *ranks.values(), *grid))
    assert set(result.values()) == {"SUCCESS"}, result
    half = depth.half()
    with torch._subclasses.fake_tensor.FakeTensorMode() as fake:
        out = torch_op.bev_pool(fake.from_tensor(half), fake.from_tensor(feat),
                                *(fake.from_tensor(r) for r in ranks.values()), *grid)
    assert out.shape == (1, 3, *grid) and out.dtype == torch.float32



def test_kernels_compile_for_a_gpu(tmp_path):
    """The kernels as a GPU runs them (compiled, not interpreted) build for sm_90, fp32 and
    fp16; only the per-point kernel has atomics."""
    from .conftest import compile_for_hopper

    out = compile_for_hopper("""
from plugins.bev_pool import triton_kernel as k
for dt in ("fp32", "fp16"):
    common = dict(depth_ptr="*" + dt, feat_ptr="*" + dt, ranks_depth_ptr="*i32", ranks_feat_ptr="*i32",
                  ranks_bev_ptr="*i32", C="i32", ZYX="i32")
    owner = dict(common, starts_ptr="*i32", lengths_ptr="*i32", M="i32", K="i32", CELLS="i32", out_ptr="*" + dt)
    blocks = dict(BLOCK_R=k.SORTED_BLOCK_R, BLOCK_I=k.BLOCK_I, BLOCK_M=k.BLOCK_M, BLOCK_C=k.BLOCK_C)
    print(dt, compile_for_hopper(k.bev_pool_owner_kernel, owner, dict(blocks, SORTED=True)),
          compile_for_hopper(k.bev_pool_points_kernel, dict(common, acc_ptr="*fp32", M="i32"),
                             dict(BLOCK_M=k.BLOCK_M, BLOCK_C=k.BLOCK_C)))
""", tmp_path)
    assert out.split() == ["fp32", "False", "True", "fp16", "False", "True"]
