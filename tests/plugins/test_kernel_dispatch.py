"""deploykit's ops hand CUDA tensors to the plugins' kernels and keep CPU tensors on the reference."""

from __future__ import annotations

import torch

from deploykit.ops import kernels
from deploykit.ops.bev_pool import bev_pool, prepare_ranks


def test_every_kernel_is_installed_here():
    assert kernels.available_kernels() == {"PillarScatter": True, "BEVPool": True, "MultiScaleDeformableAttn": True,
                                           "DeformConv": True}


class _OnCuda:
    is_cuda = True


def test_cuda_inputs_go_to_the_kernel(monkeypatch):
    calls = []
    monkeypatch.setattr(kernels, "kernel", lambda name: (lambda *a: calls.append((name, len(a))) or "kernel"))
    assert kernels.forward("bev_pool", lambda *a: "reference", _OnCuda(), 1, 2) == "kernel"
    assert calls == [("bev_pool", 3)]
    assert kernels.forward("bev_pool", lambda *a: "reference", torch.zeros(1), 1, 2) == "reference"


def test_missing_kernel_falls_back_to_the_reference(monkeypatch):
    monkeypatch.setattr(kernels, "kernel", lambda name: None)
    assert kernels.forward("msda", lambda *a: "reference", _OnCuda()) == "reference"


def test_the_torch_op_agrees_with_the_op_it_serves():
    """torch.ops.deploykit.bev_pool (Triton, interpreted here) against deploykit's BEVPool on one case."""
    g = torch.Generator().manual_seed(0)
    cells = torch.randint(-1, 5, (1, 2, 3, 2, 4, 3), generator=g).numpy()
    cells[..., 2] = 0
    ranks = {k: torch.from_numpy(v) for k, v in prepare_ranks(cells, (1, 4, 4)).items()}
    depth = torch.rand(1, 2, 3, 2, 4, generator=g)
    feat = torch.randn(1, 2, 2, 4, 5, generator=g)
    want = bev_pool(depth, feat, ranks, (1, 4, 4))
    got = kernels.kernel("bev_pool")(depth, feat, *(ranks[k] for k in ("ranks_depth", "ranks_feat", "ranks_bev",
                                                                        "interval_starts", "interval_lengths")),
                                     1, 4, 4)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
