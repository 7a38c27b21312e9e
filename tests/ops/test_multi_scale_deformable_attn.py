"""MultiScaleDeformableAttn against mmcv's CUDA kernel semantics.

``cuda_kernel_transcription`` follows ms_deform_attn_im2col_bilinear in
mmcv/ops/csrc/common/cuda/ms_deform_attn_cuda_kernel.cuh tap by tap: pixel
``loc * size - 0.5``, skip when outside (-1, size), zero for corners off the
map. It shares no code with the grid_sample-based reference.
"""

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from deploykit.engines.ort import build
from deploykit.ops import multi_scale_deformable_attn as msda
from deploykit.ops.onnx_builder import NodeBuilder


def cuda_kernel_transcription(value, shapes, starts, locations, weights):
    bs, _, heads, dims = value.shape
    _, queries, _, levels, points, _ = locations.shape
    out = np.zeros((bs, queries, heads, dims), np.float64)
    for b in range(bs):
        for q in range(queries):
            for m in range(heads):
                for lvl, ((h, w), start) in enumerate(zip(shapes, starts)):
                    for p in range(points):
                        x, y = locations[b, q, m, lvl, p]
                        h_im, w_im = y * h - 0.5, x * w - 0.5
                        if not (h_im > -1 and w_im > -1 and h_im < h and w_im < w):
                            continue
                        h_lo, w_lo = int(np.floor(h_im)), int(np.floor(w_im))
                        lh, lw = h_im - h_lo, w_im - w_lo
                        acc = np.zeros(dims)
                        for dy, dx, wt in ((0, 0, (1 - lh) * (1 - lw)), (0, 1, (1 - lh) * lw),
                                           (1, 0, lh * (1 - lw)), (1, 1, lh * lw)):
                            yy, xx = h_lo + dy, w_lo + dx
                            if 0 <= yy < h and 0 <= xx < w:
                                acc += wt * value[b, start + yy * w + xx, m]
                        out[b, q, m] += weights[b, q, m, lvl, p] * acc
    return out.reshape(bs, queries, heads * dims)


def case(bs, queries, heads, dims, shapes, points, spread=0.3, seed=0):
    rng = np.random.default_rng(seed)
    starts = np.concatenate([[0], np.cumsum([h * w for h, w in shapes])[:-1]]).astype(np.int64)
    keys = sum(h * w for h, w in shapes)
    value = rng.standard_normal((bs, keys, heads, dims)).astype(np.float32)
    # Locations past [0, 1] on purpose: taps off the map must read zero.
    locations = rng.uniform(-spread, 1 + spread, (bs, queries, heads, len(shapes), points, 2)).astype(np.float32)
    weights = rng.random((bs, queries, heads, len(shapes), points)).astype(np.float32)
    weights /= weights.sum(axis=(3, 4), keepdims=True)
    return value, np.array(shapes, np.int64), starts, locations, weights


CASES = [
    dict(bs=1, queries=5, heads=1, dims=4, shapes=[(6, 6)], points=4),
    dict(bs=2, queries=7, heads=2, dims=3, shapes=[(7, 13), (3, 5)], points=3),  # odd sizes
    dict(bs=1, queries=9, heads=4, dims=8, shapes=[(12, 20), (6, 10), (3, 5), (1, 3)], points=4, spread=1.0),
    dict(bs=1, queries=4, heads=8, dims=2, shapes=[(1, 1)], points=2),  # a 1x1 level
]

# Both sides are fp32 sums of a few dozen products; differences are rounding only.
TOL = 1e-5


@pytest.mark.parametrize("spec", CASES)
def test_reference_matches_cuda_kernel(spec):
    value, shapes, starts, loc, w = case(**spec)
    want = cuda_kernel_transcription(value, shapes.tolist(), starts.tolist(), loc, w)
    got = msda.reference(*(torch.from_numpy(a) for a in (value, shapes, starts, loc, w))).numpy()
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


def lowered_model(value, shapes, starts, loc, w, opset):
    bs, _, heads, dims = value.shape
    _, queries, _, levels, points, _ = loc.shape
    b = NodeBuilder("msda")
    shapes_c, starts_c = b.const(shapes), b.const(starts)
    msda.lowering_nodes(b, ["value", shapes_c, starts_c, "loc", "w"], "out", [tuple(s) for s in shapes.tolist()],
                        starts.tolist(), (bs, queries, heads, dims, levels, points), opset)
    graph = helper.make_graph(
        b.nodes, "msda",
        [helper.make_tensor_value_info("value", TensorProto.FLOAT, value.shape),
         helper.make_tensor_value_info("loc", TensorProto.FLOAT, loc.shape),
         helper.make_tensor_value_info("w", TensorProto.FLOAT, w.shape)],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [bs, queries, heads * dims])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


@pytest.mark.parametrize("opset", [17, 20])
@pytest.mark.parametrize("spec", CASES)
def test_gridsample_lowering_matches_cuda_kernel(spec, opset):
    value, shapes, starts, loc, w = case(**spec)
    model = lowered_model(value, shapes, starts, loc, w, opset)
    onnx.checker.check_model(model, full_check=True)
    got = build(model, threads=1).run({"value": value, "loc": loc, "w": w})["out"]
    want = cuda_kernel_transcription(value, shapes.tolist(), starts.tolist(), loc, w)
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


def test_lowering_needs_gridsample():
    with pytest.raises(ValueError, match="opset >= 16"):
        msda.lowering_nodes(NodeBuilder("x"), ["a"] * 5, "o", [(1, 1)], [0], (1, 1, 1, 1, 1, 1), 15)


@pytest.mark.parametrize("spec", CASES)
def test_numpy_kernel_matches_cuda_kernel(spec):
    value, shapes, starts, loc, w = case(**spec)
    got = msda.numpy_kernel(value, shapes, starts, loc, w)
    np.testing.assert_allclose(got, cuda_kernel_transcription(value, shapes.tolist(), starts.tolist(), loc, w),
                               atol=TOL, rtol=0)


class TwoAttentions(torch.nn.Module):
    """Two MSDA calls with different level layouts, like BEVFormer's TSA and SCA."""

    def __init__(self, shapes_a, shapes_b):
        super().__init__()
        for tag, shapes in (("a", shapes_a), ("b", shapes_b)):
            hw = torch.tensor(shapes, dtype=torch.int64)
            starts = torch.cat([hw.new_zeros(1), (hw[:, 0] * hw[:, 1]).cumsum(0)[:-1]])
            self.register_buffer(f"shapes_{tag}", hw)
            self.register_buffer(f"starts_{tag}", starts)

    def forward(self, va, la, wa, vb, lb, wb):
        a = msda.multi_scale_deformable_attn(va, self.shapes_a, self.starts_a, la, wa)
        b = msda.multi_scale_deformable_attn(vb, self.shapes_b, self.starts_b, lb, wb)
        return a, b


@pytest.fixture(scope="module")
def exported_pair(tmp_path_factory):
    a = case(bs=1, queries=6, heads=2, dims=4, shapes=[(5, 5)], points=4, seed=1)
    b = case(bs=1, queries=6, heads=2, dims=4, shapes=[(8, 11), (4, 6), (2, 3)], points=2, seed=2)
    module = TwoAttentions(a[1].tolist(), b[1].tolist())
    feeds = {"va": a[0], "la": a[3], "wa": a[4], "vb": b[0], "lb": b[3], "wb": b[4]}
    path = tmp_path_factory.mktemp("msda") / "pair.onnx"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, tuple(torch.from_numpy(v) for v in feeds.values()), str(path),
                          input_names=list(feeds), output_names=["a", "b"], opset_version=17, dynamo=False)
    want = [cuda_kernel_transcription(c[0], c[1].tolist(), c[2].tolist(), c[3], c[4]) for c in (a, b)]
    return path, feeds, want


def test_export_gives_one_custom_node_per_call(exported_pair):
    path, _, _ = exported_pair
    nodes = [n for n in onnx.load(str(path)).graph.node if n.domain == "deploykit"]
    assert [n.op_type for n in nodes] == ["MultiScaleDeformableAttn"] * 2
    assert not any(n.op_type == "GridSample" for n in onnx.load(str(path)).graph.node)


@pytest.mark.parametrize("mode", ["function", "inline", "ortx"])
def test_onnxruntime_runs_exported_op_in_every_mode(exported_pair, mode):
    path, feeds, want = exported_pair
    outs = build(path, custom_ops=mode, threads=1).run(feeds)
    np.testing.assert_allclose(outs["a"], want[0], atol=TOL, rtol=0)
    np.testing.assert_allclose(outs["b"], want[1], atol=TOL, rtol=0)


def test_function_mode_specialises_per_level_layout(exported_pair):
    from deploykit.engines.ort import prepare

    path, _, _ = exported_pair
    prepared = prepare(onnx.load(str(path)), "function")
    names = sorted(f.name for f in prepared.functions)
    assert names == ["MultiScaleDeformableAttn_b1q6h2d4p2_8x11_4x6_2x3", "MultiScaleDeformableAttn_b1q6h2d4p4_5x5"]
