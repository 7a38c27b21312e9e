"""PillarScatter: every backend form against the mmdet3d scatter semantics.

All forms only move values, so every comparison is exact (no tolerance).
"""

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from deploykit.engines.ort import build
from deploykit.ops import pillar_scatter


def mmdet3d_scatter(features: np.ndarray, coords: np.ndarray, height: int, width: int) -> np.ndarray:
    """PointPillarsScatter.forward_single, one pillar at a time (valid rows only)."""
    channels = features.shape[1]
    canvas = np.zeros((channels, height * width), np.float32)
    for p in range(coords.shape[0]):
        y, x = int(coords[p, 2]), int(coords[p, 3])
        if 0 <= y < height and 0 <= x < width:
            canvas[:, y * width + x] = features[0, :, p]
    return canvas.reshape(1, channels, height, width)


def case(channels, pillars, height, width, padded=0, off_grid=0, seed=0):
    rng = np.random.default_rng(seed)
    feats = rng.standard_normal((1, channels, pillars + padded + off_grid)).astype(np.float32)
    cells = rng.permutation(height * width)[:pillars]
    coords = np.full((pillars + padded + off_grid, 4), -1, np.int32)
    coords[:pillars, 0] = 0
    coords[:pillars, 1] = 0
    coords[:pillars, 2] = cells // width
    coords[:pillars, 3] = cells % width
    # Off-grid rows: one coordinate in range, the other just past the edge.
    for i in range(off_grid):
        row = pillars + padded + i
        coords[row] = [0, 0, height + i, 0] if i % 2 == 0 else [0, 0, 0, width]
    order = rng.permutation(coords.shape[0])
    return feats[:, :, order], coords[order]


CASES = [
    dict(channels=4, pillars=30, height=8, width=8),
    dict(channels=3, pillars=17, height=7, width=13, padded=5, off_grid=4),  # odd sizes, padding
    dict(channels=64, pillars=2000, height=96, width=80, padded=1000),
    dict(channels=1, pillars=0, height=5, width=6, padded=3),  # an empty sweep
]


def scatter_model(channels, pillars, height, width, opset=17):
    node = helper.make_node("PillarScatter", ["features", "coords"], ["canvas"], domain="deploykit",
                            height=height, width=width)
    graph = helper.make_graph(
        [node], "scatter",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, [1, channels, pillars]),
         helper.make_tensor_value_info("coords", TensorProto.INT32, [pillars, 4])],
        [helper.make_tensor_value_info("canvas", TensorProto.FLOAT, [1, channels, height, width])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                   helper.make_opsetid("deploykit", 1)])


@pytest.mark.parametrize("spec", CASES)
def test_reference_matches_mmdet3d_loop(spec):
    feats, coords = case(**spec)
    want = mmdet3d_scatter(feats, coords, spec["height"], spec["width"])
    got = pillar_scatter.reference(torch.from_numpy(feats), torch.from_numpy(coords), spec["height"], spec["width"])
    np.testing.assert_array_equal(got.numpy(), want)
    np.testing.assert_array_equal(pillar_scatter.numpy_kernel(feats, coords, spec["height"], spec["width"]), want)


@pytest.mark.parametrize("mode", ["function", "inline", "ortx"])
@pytest.mark.parametrize("spec", CASES)
def test_onnxruntime_forms_match_mmdet3d(spec, mode):
    feats, coords = case(**spec)
    model = scatter_model(spec["channels"], feats.shape[2], spec["height"], spec["width"])
    engine = build(model, custom_ops=mode, threads=1)
    got = engine.run({"features": feats, "coords": coords})["canvas"]
    np.testing.assert_array_equal(got, mmdet3d_scatter(feats, coords, spec["height"], spec["width"]))


def test_inline_mode_leaves_only_standard_ops():
    from deploykit.engines.ort import prepare

    model = prepare(scatter_model(4, 10, 5, 5), "inline")
    assert not model.functions
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)
    onnx.checker.check_model(model, full_check=True)


def test_function_needs_opset_16():
    with pytest.raises(ValueError, match="opset >= 16"):
        pillar_scatter.onnx_function(15)
