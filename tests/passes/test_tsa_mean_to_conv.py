import pytest
import torch

from deploykit.errors import RecipeError
from deploykit.models.bevformer.attention import QueueMean
from deploykit.passes import tsa_mean_to_conv
from tests.passes.bev_helpers import export_bev, worst_rel
from tests.passes.helpers import op_counts


def test_conv_mean_is_bit_exact(bev_model, bev_samples):
    # Weights of 1/2 are powers of two: 0.5*a + 0.5*b rounds exactly as (a+b)/2.
    after = tsa_mean_to_conv.apply(bev_model)
    assert worst_rel(bev_model, after, bev_samples) == 0.0
    conv = next(m for m in after.modules() if isinstance(m, tsa_mean_to_conv.QueueMeanConv))
    assert not conv.query_reduce_mean.weight.requires_grad
    assert torch.all(conv.query_reduce_mean.weight == 0.5)


def test_queue_of_three_is_a_mean():
    x = torch.randn(2 * 3, 7, 5)
    ref = QueueMean(3)(x)
    conv = tsa_mean_to_conv.QueueMeanConv(3)
    torch.testing.assert_close(conv(x), ref, rtol=1e-6, atol=1e-6)


def test_onnx_mean_becomes_conv(bev_model, bev_samples, tmp_path):
    layers = bev_model.config.encoder_layers
    before = op_counts(export_bev(bev_model, bev_samples[0], tmp_path))
    after = op_counts(export_bev(tsa_mean_to_conv.apply(bev_model), bev_samples[0], tmp_path))
    assert before["ReduceMean"] - after["ReduceMean"] == layers
    assert after["Conv"] - before["Conv"] == layers


def test_runs_once(bev_model):
    with pytest.raises(RecipeError, match="already converted"):
        tsa_mean_to_conv.apply(tsa_mean_to_conv.apply(bev_model))
