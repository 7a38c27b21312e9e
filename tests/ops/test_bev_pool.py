"""BEVPool: every backend form against LSS voxel pooling done densely, point by point.

BEVDepth's voxel_pooling lifts each pixel's features into its depth bins (depth x
feature), drops frustum points outside the grid and sums the rest per BEV cell. Sums in
another order differ by fp32 rounding only: tolerance 1e-5 of the output's scale.
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
