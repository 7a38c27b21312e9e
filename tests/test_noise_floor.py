"""The convert check against float64: float32 noise passes, a planted bug does not."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import torch
from torch import nn

from deploykit.noise_floor import allowances, float64_outputs, judge
from deploykit.recipe import CheckSpec
from deploykit.samples import Sample
from deploykit.compare import compare_outputs


class Deep(nn.Module):
    """Forty tanh layers: float32 rounding random-walks through them, as through a transformer."""

    input_names = ["x"]
    output_names = ["y"]

    def __init__(self, bug: float = 0.0, reorder: bool = False):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.weights = nn.ParameterList(nn.Parameter(torch.randn(96, 96, generator=gen) / 96**0.5)
                                        for _ in range(40))
        self.bug, self.reorder = bug, reorder

    def forward(self, x):
        for i, w in enumerate(self.weights):
            if self.reorder:  # the same sums in another order: what another correct engine does
                x = torch.tanh((x.unsqueeze(-1) * w.t().unsqueeze(0)).flip(1).sum(1) * 1.5)
            else:
                x = torch.tanh(x @ w.t() * 1.5)
            if i == 20 and self.bug:
                x = x * (1 + self.bug)
        return (x,)


def _errors(candidate: nn.Module, tol: CheckSpec) -> tuple[dict, dict]:
    from deploykit.samples import torch_outputs

    sample = Sample({}, {"x": np.random.default_rng(0).standard_normal((8, 96)).astype(np.float32)})
    exact = float64_outputs(Deep(), [sample])[0]
    noise = {a.name: a.max_rel_error for a in compare_outputs(exact, torch_outputs(Deep(), sample.reference))}
    allowed = allowances(tol, noise)
    return judge(compare_outputs(exact, torch_outputs(candidate, sample.reference)), allowed, tol.min_cosine), noise


def test_float32_noise_passes_and_a_planted_1e3_bug_fails():
    # A bound below float32's own noise here, as 1e-4 is for six BEVFormer decoder layers.
    tol = dataclasses.replace(CheckSpec(), max_rel_error=1e-9, min_cosine=0.999)
    reordered, noise = _errors(Deep(reorder=True), tol)
    assert noise["y"] > 1e-8  # the fixed bound alone would refuse the correct model
    assert reordered["passed"], reordered
    bug, _ = _errors(Deep(bug=1e-3), tol)
    assert not bug["passed"] and bug["worst_rel_error"] > 10 * tol.noise_factor * noise["y"]


def test_the_ceiling_caps_the_allowance_and_the_floor_keeps_the_recipe_bound():
    tol = CheckSpec(max_rel_error=1e-4, noise_factor=4, max_rel_error_ceiling=2e-4)
    assert allowances(tol, {"a": 1e-6, "b": 3e-5, "c": 1e-4}) == {"a": 1e-4, "b": 1.2e-4, "c": 2e-4}
    assert allowances(CheckSpec(), {"c": 1e-4})["c"] == 4e-4  # no ceiling by default


def test_a_model_without_float64_kernels_falls_back():
    class Float32Only(nn.Module):
        input_names, output_names = ["x"], ["y"]

        def forward(self, x):  # as an op with no double kernel does
            if x.dtype != torch.float32:
                raise RuntimeError(f"\"my_op\" not implemented for '{x.dtype}'")
            return (x,)

    sample = Sample({}, {"x": np.ones((1, 3), np.float32)})
    assert float64_outputs(Float32Only(), [sample]) is None


def test_convert_passes_float32_noise_under_a_bound_below_it_and_fails_a_planted_bug(tmp_path, small_recipe,
                                                                                     monkeypatch):
    """With [check] max_rel_error far below float32's noise, the correct rewrites still pass
    (within noise_factor x the noise), and a pass that scales one backbone conv by 1 + 1e-3 fails."""
    import pytest

    from deploykit.errors import CheckFailedError
    from deploykit.export import convert
    from tests.conftest import plant_scaled_conv

    strict = dataclasses.replace(small_recipe, check=dataclasses.replace(small_recipe.check, max_rel_error=1e-9))
    result = convert(strict, tmp_path / "ok", quiet=True)
    assert result.check["passed"] and result.check["reference"].endswith("in float64")
    assert all(o["allowed_rel_error"] > 1e-9 for o in result.check["onnxruntime"]["outputs"])

    plant_scaled_conv(monkeypatch)
    with pytest.raises(CheckFailedError, match="differs from the float64 original"):
        convert(strict, tmp_path / "bug", quiet=True)
    check = json.loads((tmp_path / "bug.check-failed" / "check.json").read_text())
    worst = max(o["max_rel_error"] / o["allowed_rel_error"] for o in check["onnxruntime"]["outputs"])
    assert worst > 10  # not a near miss: the bug is far above float32's noise
