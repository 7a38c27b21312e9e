import torch
from torch import nn

from deploykit.quantize.fold_bn import fold_batchnorms
from tests.passes.bev_helpers import worst_rel


def test_folding_centerpoint_keeps_outputs_and_removes_every_bn(small_model, small_recipe):
    from deploykit.models import make_sample
    from deploykit.passes import apply_passes

    model = apply_passes(small_model, small_recipe.convert.passes)
    folded, count = fold_batchnorms(model)
    assert count == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) and count > 20
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    samples = [make_sample(small_recipe, 1000 + i, model) for i in range(2)]
    # fp32 re-association of w*gamma/std: relative error at rounding level.
    assert worst_rel(model, folded, samples) < 1e-5


def test_folding_bevformer_backbone(bev_model, bev_samples):
    folded, count = fold_batchnorms(bev_model)
    assert count == sum(isinstance(m, nn.BatchNorm2d) for m in bev_model.modules())
    assert worst_rel(bev_model, folded, bev_samples) < 1e-5


def test_conv_transpose_fold():
    torch.manual_seed(0)
    seq = nn.Sequential(nn.ConvTranspose2d(3, 5, 2, stride=2, bias=False), nn.BatchNorm2d(5)).eval()
    seq[1].running_mean.normal_()
    seq[1].running_var.uniform_(0.5, 2)
    seq[1].weight.data.normal_()
    x = torch.randn(1, 3, 4, 4)
    folded, count = fold_batchnorms(seq)
    assert count == 1 and isinstance(folded[1], nn.Identity)
    torch.testing.assert_close(folded(x), seq(x), rtol=1e-5, atol=1e-5)
