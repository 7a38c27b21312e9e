"""BEVPool: every backend form against LSS voxel pooling done densely, point by point.

BEVDepth's voxel_pooling lifts each pixel's features into its depth bins (depth x
feature), drops frustum points outside the grid and sums the rest per BEV cell. Every fp32
form is held to max |got - want| < 1e-5 max |want|, want the dense pooling summed in float64:
sums in another order (the numpy kernel's per-pixel depth sums first) differ by fp32
rounding only.

Two ways of dropping a point: prepare_ranks leaves it out of the ranks, or its ranks_bev
is negative (ranks computed in the graph); and two modes: sorted ranks with their runs,
or unsorted ranks with zero-length intervals (BEVDepth's previous key frame).
"""

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from deploykit.engines.ort import build
from deploykit.ops import bev_pool

TOL = 1e-5


def dense_voxel_pooling(depth, feat, cells, grid):
    """The frustum (B, N, D, H, W, C) = depth x feat, each in-grid point added to its cell."""
    z_n, y_n, x_n = grid
    b, n, d, h, w = depth.shape
    out = np.zeros((b, feat.shape[-1], z_n, y_n, x_n), np.float64)
    for idx in np.ndindex(b, n, d, h, w):
        x, y, z = cells[idx]
        if 0 <= x < x_n and 0 <= y < y_n and 0 <= z < z_n:
            bi, ni, _, hi, wi = idx
            out[bi, :, z, y, x] += depth[idx] * feat[bi, ni, hi, wi].astype(np.float64)
    return out


def case(b=1, n=2, d=5, h=3, w=7, c=6, grid=(1, 9, 11), blind_camera=False, seed=0):
    rng = np.random.default_rng(seed)
    depth = rng.random((b, n, d, h, w)).astype(np.float32)
    depth /= depth.sum(2, keepdims=True)  # a distribution over the bins, as DepthNet's softmax
    feat = rng.standard_normal((b, n, h, w, c)).astype(np.float32)
    z_n, y_n, x_n = grid
    # Cells a little beyond the grid on every side, so some points fall off it.
    cells = np.stack([rng.integers(-2, x_n + 2, (b, n, d, h, w)), rng.integers(-1, y_n + 1, (b, n, d, h, w)),
                      rng.integers(-1, z_n + 1, (b, n, d, h, w))], -1)
    if blind_camera:
        cells[:, -1, ..., 0] = x_n + 5  # the last camera sees nothing of the grid
    return depth, feat, cells


CASES = [dict(), dict(b=2, n=3, d=4, h=5, w=3, c=5, grid=(2, 6, 5), seed=1), dict(blind_camera=True, seed=2),
         dict(d=3, h=2, w=2, c=3, grid=(1, 13, 17), seed=3)]  # most cells empty


def _scale(x):
    return max(float(np.abs(x).max()), 1e-12)


@pytest.mark.parametrize("spec", CASES)
def test_reference_and_interval_walk_equal_dense_pooling(spec):
    depth, feat, cells = case(**spec)
    grid = spec.get("grid", (1, 9, 11))
    want = dense_voxel_pooling(depth, feat, cells, grid)
    ranks = bev_pool.prepare_ranks(cells, grid)
    got = bev_pool.bev_pool(torch.from_numpy(depth), torch.from_numpy(feat),
                            {k: torch.from_numpy(v) for k, v in ranks.items()}, grid).numpy()
    assert got.shape == want.shape
    assert np.abs(got - want).max() / _scale(want) < TOL
    walk = bev_pool.interval_walk(depth, feat, *ranks.values(), *grid)
    assert np.abs(walk - want).max() / _scale(want) < TOL
    np.testing.assert_allclose(bev_pool.numpy_kernel(depth, feat, *ranks.values(), *grid), got, rtol=0,
                               atol=TOL * _scale(want))
    if spec.get("blind_camera"):
        assert not np.isin(ranks["ranks_feat"] // (3 * 7) % 2, [1]).all()  # its points never entered the ranks


def test_ranks_are_sorted_runs_of_cells():
    depth, feat, cells = case(seed=4)
    ranks = bev_pool.prepare_ranks(cells, (1, 9, 11))
    rb, starts, lengths = ranks["ranks_bev"], ranks["interval_starts"], ranks["interval_lengths"]
    assert np.all(np.diff(rb) >= 0) and lengths.sum() == len(rb) and np.all(lengths > 0)
    assert len(np.unique(rb)) == len(starts)  # one interval per occupied cell
    for s, n in zip(starts, lengths):
        assert np.all(rb[s:s + n] == rb[s])
    assert all(v.dtype == np.int32 for v in ranks.values())
    # Within a cell by pixel, then depth bin (so a pixel's points in a cell are adjacent).
    rf, rd = ranks["ranks_feat"].astype(np.int64), ranks["ranks_depth"].astype(np.int64)
    assert np.all(np.diff(rb.astype(np.int64) * 2**40 + rf * 2**20 + rd) > 0)


def ray_case(seed=18):
    """Cells along each pixel's ray, as a real frustum's: runs of a pixel's depth bins land
    in one cell (b=2, 3 cameras, 12 bins, 4x5 pixels, 6 channels, grid (1, 7, 8))."""
    rng = np.random.default_rng(seed)
    b, n, d, h, w, c, grid = 2, 3, 12, 4, 5, 6, (1, 7, 8)
    depth = rng.random((b, n, d, h, w)).astype(np.float32)
    depth /= depth.sum(2, keepdims=True)
    feat = rng.standard_normal((b, n, h, w, c)).astype(np.float32)
    origin = rng.uniform(0, [8, 7], (b, n, 1, h, w, 2))
    heading = rng.standard_normal((b, n, 1, h, w, 2))
    step = np.arange(d).reshape(1, 1, d, 1, 1, 1) * 0.35
    xy = np.floor(origin + step * heading / np.linalg.norm(heading, axis=-1, keepdims=True)).astype(np.int64)
    cells = np.concatenate([xy, np.zeros((b, n, d, h, w, 1), np.int64)], -1)
    return depth, feat, cells, grid


def test_a_pixels_points_in_one_cell_are_one_pair():
    depth, feat, cells, grid = ray_case()
    ranks = bev_pool.prepare_ranks(cells, grid)
    rb, rf = ranks["ranks_bev"], ranks["ranks_feat"]
    pairs = 1 + np.count_nonzero((rb[1:] != rb[:-1]) | (rf[1:] != rf[:-1]))
    distinct = len(np.unique(rb.astype(np.int64) * 2**20 + rf))
    assert pairs == distinct < 0.6 * len(rb)  # each (cell, pixel) one run, and far fewer runs than points
    layout = bev_pool._PairLayout.of_sorted(ranks["ranks_depth"], rf, rb, ranks["interval_starts"])
    assert len(layout.feat_index) == pairs and len(layout.depth_index) == len(rb)
    want = dense_voxel_pooling(depth, feat, cells, grid)
    shuffled = np.random.default_rng(0).permutation(len(rb))
    unsorted = bev_pool.unsorted_ranks(*(ranks[k][shuffled] for k in ("ranks_depth", "ranks_feat", "ranks_bev")))
    for r in (ranks, unsorted):
        for name, got in every_form(depth, feat, r, grid).items():
            assert np.abs(got - want).max() / _scale(want) < TOL, name


def pool_model(depth, feat, ranks, grid, opset=17):
    inputs = [helper.make_tensor_value_info("depth", TensorProto.FLOAT, list(depth.shape)),
              helper.make_tensor_value_info("feat", TensorProto.FLOAT, list(feat.shape))]
    inits = [onnx.numpy_helper.from_array(v, k) for k, v in ranks.items()]
    node = helper.make_node("BEVPool", ["depth", "feat", *ranks], ["bev"], domain="deploykit", bev_z=grid[0],
                            bev_y=grid[1], bev_x=grid[2])
    out = [helper.make_tensor_value_info("bev", TensorProto.FLOAT, [depth.shape[0], feat.shape[-1], *grid])]
    graph = helper.make_graph([node], "bev_pool", inputs, out, initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("deploykit", 1)])


@pytest.mark.parametrize("mode", ["function", "inline", "ortx"])
@pytest.mark.parametrize("spec", CASES[:3])
def test_onnxruntime_forms_match_dense_pooling(spec, mode):
    depth, feat, cells = case(**spec)
    grid = spec.get("grid", (1, 9, 11))
    model = pool_model(depth, feat, bev_pool.prepare_ranks(cells, grid), grid)
    got = build(model, custom_ops=mode, threads=1).run({"depth": depth, "feat": feat})["bev"]
    want = dense_voxel_pooling(depth, feat, cells, grid)
    assert np.abs(got - want).max() / _scale(want) < TOL


class _Pool(torch.nn.Module):
    input_names = ["depth", "feat"]
    output_names = ["bev"]

    def __init__(self, ranks, grid):
        super().__init__()
        self.grid = grid
        for k, v in ranks.items():
            self.register_buffer(k, torch.from_numpy(v))

    def forward(self, depth, feat):
        ranks = {k: getattr(self, k) for k in ("ranks_depth", "ranks_feat", "ranks_bev", "interval_starts",
                                               "interval_lengths")}
        return bev_pool.bev_pool(depth, feat, ranks, self.grid)


def test_export_is_one_custom_node_that_onnxruntime_runs(tmp_path):
    from deploykit.export import export_onnx

    depth, feat, cells = case(seed=5)
    grid = (1, 9, 11)
    module = _Pool(bev_pool.prepare_ranks(cells, grid), grid)
    path = tmp_path / "pool.onnx"
    export_onnx(module, {"depth": depth, "feat": feat}, path, 17)
    graph = onnx.load(str(path)).graph
    assert [n.op_type for n in graph.node if n.domain == "deploykit"] == ["BEVPool"]
    assert [d.dim_value for d in graph.output[0].type.tensor_type.shape.dim] == [1, 6, 1, 9, 11]
    got = build(path).run({"depth": depth, "feat": feat})["bev"]
    want = dense_voxel_pooling(depth, feat, cells, grid)
    assert np.abs(got - want).max() / _scale(want) < TOL


def test_gradients_flow_to_depth_and_features():
    depth, feat, cells = case(seed=6)
    grid = (1, 9, 11)
    ranks = {k: torch.from_numpy(v) for k, v in bev_pool.prepare_ranks(cells, grid).items()}
    d = torch.from_numpy(depth).requires_grad_()
    f = torch.from_numpy(feat).requires_grad_()
    bev_pool.bev_pool(d, f, ranks, grid).sum().backward()
    # d(sum)/d(depth) at a kept point is the sum of its pixel's features; dropped points get 0.
    kept = np.zeros(depth.size, bool)
    kept[ranks["ranks_depth"].numpy()] = True
    grad = d.grad.numpy().reshape(-1)
    assert np.all(grad[~kept] == 0) and np.abs(grad[kept]).sum() > 0
    assert f.grad is not None and float(f.grad.abs().sum()) > 0


def test_function_needs_opset_16():
    with pytest.raises(ValueError, match="opset >= 16"):
        bev_pool.onnx_function(15)


def all_point_ranks(cells, grid, seed=0):
    """Every frustum point in the ranks, off-grid points with a negative ranks_bev (a few
    different negative values), as (sorted ranks with runs, the same points shuffled with
    zero-length intervals)."""
    rng = np.random.default_rng(seed)
    z_n, y_n, x_n = grid
    b, n, d, h, w, _ = cells.shape
    c = cells.reshape(-1, 3).astype(np.int64)
    ranks_depth = np.arange(c.shape[0])
    ranks_feat = np.broadcast_to(np.arange(b * n * h * w).reshape(b, n, 1, h, w), (b, n, d, h, w)).reshape(-1)
    batch = np.repeat(np.arange(b), n * d * h * w)
    inside = ((c >= 0) & (c < [x_n, y_n, z_n])).all(1)
    rb = np.where(inside, ((batch * z_n + c[:, 2]) * y_n + c[:, 1]) * x_n + c[:, 0], -1 - rng.integers(0, 3, len(c)))
    order = np.argsort(rb, kind="stable")
    srb = rb[order]
    starts = np.flatnonzero(np.r_[True, srb[1:] != srb[:-1]])
    i32 = np.int32
    sorted_ranks = {"ranks_depth": ranks_depth[order].astype(i32), "ranks_feat": ranks_feat[order].astype(i32),
                    "ranks_bev": srb.astype(i32), "interval_starts": starts.astype(i32),
                    "interval_lengths": np.diff(np.r_[starts, len(srb)]).astype(i32)}
    perm = rng.permutation(len(rb))
    unsorted = bev_pool.unsorted_ranks(ranks_depth[perm].astype(i32), ranks_feat[perm].astype(i32),
                                       rb[perm].astype(i32))
    return sorted_ranks, unsorted


def every_form(depth, feat, ranks, grid):
    """The op's output from each implementation, by name."""
    t = {k: torch.from_numpy(v) for k, v in ranks.items()}
    forms = {"reference": bev_pool.bev_pool(torch.from_numpy(depth), torch.from_numpy(feat), t, grid).numpy(),
             "interval_walk": bev_pool.interval_walk(depth, feat, *ranks.values(), *grid),
             "numpy_kernel": bev_pool.numpy_kernel(depth, feat, *ranks.values(), *grid)}
    if len(ranks["interval_starts"]) == 0:
        forms["point_walk"] = bev_pool.point_walk(depth, feat, ranks["ranks_depth"], ranks["ranks_feat"],
                                                  ranks["ranks_bev"], *grid)
    model = pool_model(depth, feat, ranks, grid)
    for mode in ("function", "inline", "ortx"):
        forms[f"ORT {mode}"] = build(model, custom_ops=mode, threads=1).run({"depth": depth, "feat": feat})["bev"]
    return forms


DROP_CASES = [dict(seed=7), dict(b=2, n=3, d=4, h=5, w=3, c=5, grid=(2, 6, 5), seed=8),
              dict(blind_camera=True, seed=9)]


@pytest.mark.parametrize("spec", DROP_CASES)
@pytest.mark.parametrize("mode", ["sorted", "unsorted"])
def test_negative_ranks_are_dropped_in_every_implementation(spec, mode):
    depth, feat, cells = case(**spec)
    grid = spec.get("grid", (1, 9, 11))
    want = dense_voxel_pooling(depth, feat, cells, grid)
    sorted_ranks, unsorted = all_point_ranks(cells, grid, spec["seed"])
    ranks = sorted_ranks if mode == "sorted" else unsorted
    assert (ranks["ranks_bev"] < 0).sum() > 0 and len(ranks["ranks_bev"]) == depth.size
    if mode == "sorted":
        assert (sorted_ranks["ranks_bev"][sorted_ranks["interval_starts"]] < 0).sum() > 1  # several dropped runs
    for name, got in every_form(depth, feat, ranks, grid).items():
        assert got.shape == want.shape, name
        assert np.abs(got - want).max() / _scale(want) < TOL, name


@pytest.mark.parametrize("spec", CASES)
def test_unsorted_ranks_equal_the_sorted_result(spec):
    depth, feat, cells = case(**spec)
    grid = spec.get("grid", (1, 9, 11))
    sorted_ranks = bev_pool.prepare_ranks(cells, grid)
    perm = np.random.default_rng(spec.get("seed", 0)).permutation(len(sorted_ranks["ranks_bev"]))
    unsorted = bev_pool.unsorted_ranks(*(sorted_ranks[k][perm] for k in ("ranks_depth", "ranks_feat", "ranks_bev")))
    assert not np.all(np.diff(unsorted["ranks_bev"]) >= 0)
    want = bev_pool.interval_walk(depth, feat, *sorted_ranks.values(), *grid)
    for name, got in every_form(depth, feat, unsorted, grid).items():
        assert np.abs(got - want).max() / _scale(want) < TOL, name


def test_a_camera_whose_points_are_all_dropped_adds_nothing():
    depth, feat, cells = case(b=1, n=3, seed=10)
    grid = (1, 9, 11)
    # The last camera's points all have cells on the grid but negative ranks: dropped in the graph.
    sorted_ranks, unsorted = all_point_ranks(cells, grid, 10)
    camera = unsorted["ranks_feat"] // (3 * 7) == 2
    unsorted["ranks_bev"] = np.where(camera, -1, unsorted["ranks_bev"]).astype(np.int32)
    blind = cells.copy()
    blind[:, 2, ..., 0] = -3
    want = dense_voxel_pooling(depth, feat, blind, grid)
    assert np.abs(want - dense_voxel_pooling(depth, feat, cells, grid)).max() > 0.1  # the camera did see the grid
    for name, got in every_form(depth, feat, unsorted, grid).items():
        assert np.abs(got - want).max() / _scale(want) < TOL, name
    # and it gets no gradient
    d = torch.from_numpy(depth).requires_grad_()
    bev_pool.bev_pool(d, torch.from_numpy(feat), {k: torch.from_numpy(v) for k, v in unsorted.items()},
                      grid).square().sum().backward()
    assert np.all(d.grad.numpy()[:, 2] == 0) and np.abs(d.grad.numpy()[:, :2]).sum() > 0


@pytest.mark.parametrize("mode", ["sorted", "unsorted"])
def test_cells_without_points_stay_exactly_zero(mode):
    depth, feat, cells = case(b=2, seed=11)
    grid = (1, 9, 11)
    # Nothing lands in the grid's last cell (the row next to the spare row of dropped points)
    # nor in a block of cells in the middle.
    flat = cells.reshape(-1, 3)
    empty = ((flat[:, 0] == 10) & (flat[:, 1] == 8)) | ((flat[:, 0] >= 3) & (flat[:, 0] < 6) & (flat[:, 1] == 4))
    flat[empty] = -1
    sorted_ranks, unsorted = all_point_ranks(cells, grid, 11)
    ranks = sorted_ranks if mode == "sorted" else unsorted
    occupied = np.zeros((2, *grid), bool)
    occupied.reshape(-1)[ranks["ranks_bev"][ranks["ranks_bev"] >= 0]] = True
    assert not occupied[:, :, 8, 10].any() and not occupied[:, :, 4, 3:6].any() and (~occupied).sum() > 8
    for name, got in every_form(depth, feat, ranks, grid).items():
        assert np.all(got.transpose(0, 2, 3, 4, 1)[~occupied] == 0), name
        assert np.all(got.transpose(0, 2, 3, 4, 1)[occupied] != 0), name


def test_numpy_kernel_sums_runs_across_blocks(monkeypatch):
    """Cells with more pairs than a block's rows (one block each) and groups of cells cut
    into several blocks; sorted ranks in frustum order within a cell (a pixel's points not
    adjacent: more, shorter pairs) as well as prepare_ranks' and unsorted ones."""
    depth, feat, cells = case(b=2, n=3, d=6, h=4, w=5, seed=12)
    grid = (1, 9, 11)
    sorted_ranks, unsorted = all_point_ranks(cells, grid, 12)
    want = dense_voxel_pooling(depth, feat, cells, grid)
    monkeypatch.setattr(bev_pool, "_BLOCK_ROWS", 3)
    layout = bev_pool._PairLayout.of_sorted(*(sorted_ranks[k] for k in ("ranks_depth", "ranks_feat", "ranks_bev",
                                                               "interval_starts")))
    assert max(k for _, _, k, _ in layout.blocks) > 3
    assert len({k for _, _, k, _ in layout.blocks}) < len(layout.blocks)  # some k cut into several blocks
    for ranks in (sorted_ranks, unsorted, bev_pool.prepare_ranks(cells, grid)):
        got = bev_pool.numpy_kernel(depth, feat, *ranks.values(), *grid)
        assert np.abs(got - want).max() / _scale(want) < TOL


def test_numpy_kernel_sorts_unsorted_ranks_by_lexsort_where_the_packed_key_would_overflow():
    """The unsorted mode packs (cell, pixel, point) into one int64 to sort; with too many
    feature rows for that it lexsorts instead: the same sums."""
    depth, feat, cells = case(b=2, n=3, d=6, h=4, w=5, seed=19)
    grid = (1, 9, 11)
    _, unsorted = all_point_ranks(cells, grid, 19)
    want = dense_voxel_pooling(depth, feat, cells, grid)
    rd, rf, rb = unsorted["ranks_depth"], unsorted["ranks_feat"], unsorted["ranks_bev"]
    d, f = depth.reshape(-1), feat.reshape(-1, feat.shape[-1])
    packed = bev_pool._PairLayout.of_unsorted(rd, rf, rb, len(f))
    fallback = bev_pool._PairLayout.of_unsorted(rd, rf, rb, 2**60)  # no room left for the packed key
    assert len(packed.feat_index) == len(fallback.feat_index)
    for layout in (packed, fallback):
        got = layout.pool(d, f, 2 * 9 * 11).reshape(2, *grid, -1).transpose(0, 4, 1, 2, 3)
        assert np.abs(got - want).max() / _scale(want) < TOL


def test_numpy_kernel_layout_cache_follows_the_ranks_contents():
    """Sorted ranks' layouts are cached by content: ranks of the same shapes but other
    values, or the same arrays changed in place, are laid out anew."""
    depth, feat, cells = case(b=2, n=3, d=6, h=4, w=5, seed=20)
    grid = (1, 9, 11)
    ranks = bev_pool.prepare_ranks(cells, grid)

    def want(r):
        t = {k: torch.from_numpy(v) for k, v in r.items()}
        return bev_pool.bev_pool(torch.from_numpy(depth), torch.from_numpy(feat), t, grid).numpy()

    def check(r):
        got = bev_pool.numpy_kernel(depth, feat, *r.values(), *grid)
        assert np.abs(got - want(r)).max() / _scale(want(r)) < TOL

    check(ranks)
    layout = bev_pool._layouts[0][1]
    check({k: v.copy() for k, v in ranks.items()})  # equal contents: a hit
    assert bev_pool._layouts[0][1] is layout
    rng = np.random.default_rng(20)
    other = dict(ranks, ranks_depth=rng.permutation(depth.size)[:len(ranks["ranks_depth"])].astype(np.int32))
    check(other)
    assert bev_pool._layouts[0][1] is not layout
    mutated = {k: v.copy() for k, v in ranks.items()}
    check(mutated)
    assert bev_pool._layouts[0][1] is layout
    mutated["ranks_feat"][:] = rng.integers(0, 2 * 3 * 4 * 5, len(mutated["ranks_feat"]))
    check(mutated)
    assert bev_pool._layouts[0][1] is not layout


def test_numpy_kernel_refuses_intervals_that_are_not_runs_of_every_point():
    depth, feat, cells = case(seed=13)
    ranks = bev_pool.prepare_ranks(cells, (1, 9, 11))
    ranks["interval_lengths"] = ranks["interval_lengths"].copy()
    ranks["interval_lengths"][-1] -= 1
    with pytest.raises(ValueError, match="intervals must be"):
        bev_pool.numpy_kernel(depth, feat, *ranks.values(), 1, 9, 11)


def test_all_points_dropped_gives_zeros():
    depth, feat, cells = case(seed=14)
    grid = (1, 9, 11)
    n = depth.size
    dropped = bev_pool.unsorted_ranks(np.arange(n, dtype=np.int32), np.zeros(n, np.int32), np.full(n, -1, np.int32))
    none = bev_pool.prepare_ranks(np.full_like(cells, -1), grid)
    assert len(none["ranks_bev"]) == 0
    for ranks in (dropped, none):
        for name, got in every_form(depth, feat, ranks, grid).items():
            assert got.shape == (1, 6, *grid) and np.all(got == 0), name


class _UnsortedPool(torch.nn.Module):
    """Ranks computed in the graph, as BEVDepth's previous key frame needs them: each frame's
    cells (here an input) to flat ranks, off-grid points -1, zero-length intervals."""
    input_names = ["depth", "feat", "cells"]
    output_names = ["bev"]

    def __init__(self, shape, grid):
        super().__init__()
        b, n, d, h, w = shape
        self.grid = grid
        self.register_buffer("ranks_depth", torch.arange(b * n * d * h * w, dtype=torch.int32))
        pixels = torch.arange(b * n * h * w, dtype=torch.int32).reshape(b, n, 1, h, w).expand(b, n, d, h, w)
        self.register_buffer("ranks_feat", pixels.reshape(-1).contiguous())
        self.register_buffer("batch", torch.arange(b, dtype=torch.int32).repeat_interleave(n * d * h * w))
        self.register_buffer("no_intervals", torch.zeros(0, dtype=torch.int32))

    def forward(self, depth, feat, cells):
        z_n, y_n, x_n = self.grid
        c = cells.reshape(-1, 3)
        x, y, z = c[:, 0], c[:, 1], c[:, 2]
        inside = (x >= 0) & (x < x_n) & (y >= 0) & (y < y_n) & (z >= 0) & (z < z_n)
        rb = torch.where(inside, ((self.batch * z_n + z) * y_n + y) * x_n + x, torch.full_like(x, -1))
        ranks = {"ranks_depth": self.ranks_depth, "ranks_feat": self.ranks_feat, "ranks_bev": rb,
                 "interval_starts": self.no_intervals, "interval_lengths": self.no_intervals}
        return bev_pool.bev_pool(depth, feat, ranks, self.grid)


@pytest.mark.parametrize("mode", ["function", "inline", "ortx"])
@pytest.mark.parametrize("ranks_in", ["sorted constants", "unsorted from the graph"])
def test_both_modes_export_and_run_in_onnxruntime(tmp_path, ranks_in, mode):
    from deploykit.export import export_onnx

    depth, feat, cells = case(b=2, seed=15)
    grid = (1, 9, 11)
    if ranks_in == "sorted constants":
        module, feeds = _Pool(bev_pool.prepare_ranks(cells, grid), grid), {"depth": depth, "feat": feat}
    else:
        module = _UnsortedPool(depth.shape, grid)
        feeds = {"depth": depth, "feat": feat, "cells": cells.astype(np.int32)}
    path = tmp_path / "pool.onnx"
    export_onnx(module, feeds, path, 17)
    model = onnx.load(str(path))
    (node,) = [n for n in model.graph.node if n.domain == "deploykit"]
    if ranks_in != "sorted constants":
        # The zero-length intervals survive the exporter as int32 constants of shape (0,).
        consts = {o: n.attribute[0].t for n in model.graph.node if n.op_type == "Constant" for o in n.output}
        consts.update({t.name: t for t in model.graph.initializer})
        for name in node.input[5:]:
            assert consts[name].data_type == TensorProto.INT32 and list(consts[name].dims) == [0]
    got = build(path, custom_ops=mode, threads=1).run(feeds)["bev"]
    want = dense_voxel_pooling(depth, feat, cells, grid)
    assert np.abs(got - want).max() / _scale(want) < TOL


def _random_unsorted(n=2, d=16, h=8, w=16, c=8, grid=(1, 16, 16), seed=16):
    rng = np.random.default_rng(seed)
    depth = rng.random((1, n, d, h, w)).astype(np.float32)
    feat = rng.standard_normal((1, n, h, w, c)).astype(np.float32)
    pixels = np.broadcast_to(np.arange(n * h * w).reshape(n, 1, h, w), (n, d, h, w)).reshape(-1)
    ranks = bev_pool.unsorted_ranks(np.arange(depth.size, dtype=np.int32), pixels.astype(np.int32),
                                    rng.integers(-1, int(np.prod(grid)), depth.size).astype(np.int32))
    return depth, feat, ranks, grid


@pytest.mark.parametrize("mode", ["sorted", "unsorted"])
def test_function_lowering_is_exact_on_several_threads(mode):
    """A ScatterND-add lowering is wrong here on every run: ONNX Runtime splits its updates
    over the threads with plain adds (4096 points, 2 threads)."""
    depth, feat, ranks, grid = _random_unsorted()
    if mode == "sorted":
        order = np.argsort(ranks["ranks_bev"], kind="stable")
        rb = ranks["ranks_bev"][order]
        starts = np.flatnonzero(np.r_[True, rb[1:] != rb[:-1]]).astype(np.int32)
        ranks = {"ranks_depth": ranks["ranks_depth"][order], "ranks_feat": ranks["ranks_feat"][order], "ranks_bev": rb,
                 "interval_starts": starts, "interval_lengths": np.diff(np.r_[starts, len(rb)]).astype(np.int32)}
    want = bev_pool.point_walk(depth, feat, ranks["ranks_depth"], ranks["ranks_feat"], ranks["ranks_bev"], *grid)
    engine = build(pool_model(depth, feat, ranks, grid), custom_ops="function", threads=2)
    for _ in range(10):
        got = engine.run({"depth": depth, "feat": feat})["bev"]
        assert np.abs(got - want).max() / _scale(want) < TOL


def test_function_for_picks_the_mode_from_the_intervals(monkeypatch):
    from deploykit.engines.ort import prepare

    depth, feat, cells = case(seed=17)
    grid = (1, 9, 11)
    sorted_ranks, unsorted = all_point_ranks(cells, grid, 17)
    names = {mode: [f.name for f in prepare(pool_model(depth, feat, r, grid), "function").functions]
             for mode, r in (("sorted", sorted_ranks), ("unsorted", unsorted))}
    assert names == {"sorted": ["BEVPool"], "unsorted": ["BEVPool_unsorted"]}
    # The sorting lowering takes sorted ranks too (it is the one used where K is not recorded).
    monkeypatch.setattr(bev_pool, "function_for", lambda node, graph, opset: bev_pool.onnx_function(opset, True))
    got = build(pool_model(depth, feat, sorted_ranks, grid), custom_ops="function", threads=1).run(
        {"depth": depth, "feat": feat})["bev"]
    want = dense_voxel_pooling(depth, feat, cells, grid)
    assert np.abs(got - want).max() / _scale(want) < TOL


def test_ortx_output_is_handed_back_as_an_array():
    """onnxruntime-extensions' bridge calls out.flatten().tolist(); a list of Python floats
    costs ~100 ns an element, so the kernel's output gives it the flat array instead."""
    out = np.arange(24, dtype=np.float32).reshape(2, 3, 4).transpose(0, 2, 1).view(bev_pool._OrtxOutput)
    flat = out.flatten().tolist()
    assert type(flat) is np.ndarray and flat.dtype == np.float32 and flat.flags.c_contiguous
    np.testing.assert_array_equal(flat, np.asarray(out).reshape(-1))
    assert out.shape == (2, 4, 3)
