"""Shared fixtures: the small recipe, its synthetic checkpoint, one conversion.

Session-scoped so the expensive steps (checkpoint generation, ONNX export)
run once per test run.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deploykit.export import convert, load_model
from deploykit.recipe import load_recipe

SMALL = "centerpoint_pillar_small"


def plant_scaled_conv(monkeypatch, factor: float = 1 + 1e-3) -> None:
    """Make the max_to_maxpool rewrite also scale the small model's pts_backbone.blocks.1.3
    conv by ``factor``: a one-layer bug in the middle of the model."""
    from deploykit import passes

    rewrite = passes.PASSES["max_to_maxpool"]

    def planted(model):
        model = rewrite(model)
        with torch.no_grad():
            model.pts_backbone.blocks[1][3].weight.mul_(factor)
        return model

    monkeypatch.setitem(passes.PASSES, "max_to_maxpool", planted)


@pytest.fixture(scope="session")
def small_recipe():
    return load_recipe(SMALL)


@pytest.fixture(scope="session")
def small_model(small_recipe):
    model, _, _ = load_model(small_recipe, None)
    return model


@pytest.fixture(scope="session")
def converted_dir(tmp_path_factory, small_recipe):
    out = tmp_path_factory.mktemp("convert") / "small"
    convert(small_recipe, out, quiet=True)
    return out


@pytest.fixture(scope="session")
def naive_dir(tmp_path_factory, small_recipe):
    out = tmp_path_factory.mktemp("convert") / "naive"
    convert(small_recipe, out, passes=[], quiet=True)
    return out


def random_pillars(recipe, num_pillars: int, padded: int, seed: int = 0):
    """Random decorated pillars (P, N, C) with distinct cells, and padded coords."""
    g = torch.Generator().manual_seed(seed)
    v = recipe.model.voxelization
    nx, ny, _ = v.grid_size
    x = torch.randn(num_pillars, v.max_points_per_pillar, recipe.model.pillar_channels, generator=g)
    cells = torch.randperm(nx * ny, generator=g)[:num_pillars]
    coords = torch.full((num_pillars + padded, 4), -1, dtype=torch.int32)
    coords[:num_pillars] = 0
    coords[:num_pillars, 2] = (cells // nx).int()
    coords[:num_pillars, 3] = (cells % nx).int()
    padded_x = torch.cat([x, torch.zeros(padded, *x.shape[1:])])
    return x, coords[:num_pillars], padded_x, coords


def to_layout(pnc: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "PNC":
        return pnc
    if layout == "CPN":
        return pnc.permute(2, 0, 1).unsqueeze(0).contiguous()
    if layout == "CNP":
        return pnc.permute(2, 1, 0).unsqueeze(0).contiguous()
    raise ValueError(layout)


def run(model, pillars, coords):
    with torch.no_grad():
        return [o.numpy() for o in model(pillars, coords)]


def max_rel_error(ref: list[np.ndarray], out: list[np.ndarray]) -> float:
    return max(float(np.abs(a - b).max() / np.abs(a).max()) for a, b in zip(ref, out))


BEV_SMALL = "bevformer_small"


@pytest.fixture(scope="session")
def bev_recipe():
    return load_recipe(BEV_SMALL)


@pytest.fixture(scope="session")
def bev_model(bev_recipe):
    model, _, _ = load_model(bev_recipe, None)
    return model


@pytest.fixture(scope="session")
def bev_samples(bev_recipe, bev_model):
    """A scene's first frame and a later frame (prev BEV, ego motion)."""
    from deploykit.models import make_sample

    return [make_sample(bev_recipe, seed, bev_model) for seed in (20, 21)]


@pytest.fixture(scope="session")
def bev_converted_dir(tmp_path_factory, bev_recipe):
    out = tmp_path_factory.mktemp("convert") / "bevformer_small"
    convert(bev_recipe, out, quiet=True)
    return out


@pytest.fixture(scope="session")
def bev_quantized_dir(tmp_path_factory, bev_recipe, bev_converted_dir):
    from deploykit.quantize.pipeline import quantize

    out = tmp_path_factory.mktemp("quantize") / "bevformer_small"
    quantize(bev_recipe, bev_converted_dir, out, quiet=True)
    return out


@pytest.fixture(scope="session")
def nuscenes_dir(tmp_path_factory):
    """A small nuScenes-layout dataset (2 scenes x 4 samples, LiDAR sweeps, six cameras,
    annotations), written with the real table schema by deploykit's generator."""
    from deploykit.data.synthetic_nuscenes import write_synthetic_nuscenes

    return write_synthetic_nuscenes(tmp_path_factory.mktemp("nuscenes") / "nus", scenes=2, samples_per_scene=4,
                                    seed=0)


@pytest.fixture(scope="session")
def synth_converted_dir(tmp_path_factory):
    """The trained centerpoint_pillar_synth, converted."""
    out = tmp_path_factory.mktemp("convert") / "synth"
    convert("centerpoint_pillar_synth", out, quiet=True)
    return out


FUSED_SMALL = "bevfusion_small"


@pytest.fixture(scope="session")
def fused_recipe():
    return load_recipe(FUSED_SMALL)


@pytest.fixture(scope="session")
def fused_model(fused_recipe):
    model, _, _ = load_model(fused_recipe, None)
    return model


@pytest.fixture(scope="session")
def fused_converted_dir(tmp_path_factory, fused_recipe):
    out = tmp_path_factory.mktemp("convert") / "bevfusion_small"
    convert(fused_recipe, out, quiet=True)
    return out


@pytest.fixture(scope="session")
def fused_quantized_dir(tmp_path_factory, fused_recipe, fused_converted_dir):
    from deploykit.quantize.pipeline import quantize

    out = tmp_path_factory.mktemp("quantize") / "bevfusion_small"
    quantize(fused_recipe, fused_converted_dir, out, quiet=True)
    return out


@pytest.fixture(scope="session")
def lss_recipe():
    return load_recipe("bevdepth_small")


@pytest.fixture(scope="session")
def lss_model(lss_recipe):
    model, _, _ = load_model(lss_recipe, None)
    return model


@pytest.fixture(scope="session")
def lss_converted_dir(tmp_path_factory, lss_recipe):
    out = tmp_path_factory.mktemp("convert") / "bevdepth_small"
    convert(lss_recipe, out, standard_ops=True, quiet=True)
    return out
