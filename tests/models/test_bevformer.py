import dataclasses

import numpy as np
import pytest
import torch

from deploykit.checkpoint import load_state_dict
from deploykit.errors import CheckpointError, RecipeError
from deploykit.export import load_model
from deploykit.models import build_model
from deploykit.models.bevformer.transformer import reference_points_2d
from deploykit.models.fpn import FPN, FPNConfig
from deploykit.models.resnet import ResNetConfig
from deploykit.recipe import load_recipe, recipe_from_dict

# bevformer_tiny's state dict as built from projects/configs/bevformer/bevformer_tiny.py:
# ResNet-50 (320 keys with BN buffers), FPN on C5, 3 encoder and 6 decoder layers.
TINY_KEYS = 643
TINY_SHAPES = {
    "img_backbone.conv1.weight": (64, 3, 7, 7),
    "img_backbone.layer4.2.conv3.weight": (2048, 512, 1, 1),
    "img_backbone.layer1.0.downsample.1.running_var": (256,),
    "img_neck.lateral_convs.0.conv.weight": (256, 2048, 1, 1),
    "img_neck.fpn_convs.0.conv.bias": (256,),
    "pts_bbox_head.transformer.encoder.layers.2.attentions.0.sampling_offsets.weight": (128, 512),
    "pts_bbox_head.transformer.encoder.layers.0.attentions.0.attention_weights.weight": (64, 512),
    "pts_bbox_head.transformer.encoder.layers.0.attentions.1.deformable_attention.sampling_offsets.weight": (128, 256),
    "pts_bbox_head.transformer.encoder.layers.0.attentions.1.deformable_attention.attention_weights.weight": (64, 256),
    "pts_bbox_head.transformer.encoder.layers.0.attentions.1.output_proj.weight": (256, 256),
    "pts_bbox_head.transformer.encoder.layers.0.ffns.0.layers.0.0.weight": (512, 256),
    "pts_bbox_head.transformer.encoder.layers.0.norms.2.bias": (256,),
    "pts_bbox_head.transformer.decoder.layers.5.attentions.0.attn.in_proj_weight": (768, 256),
    "pts_bbox_head.transformer.decoder.layers.5.attentions.1.sampling_offsets.weight": (64, 256),
    "pts_bbox_head.transformer.level_embeds": (4, 256),
    "pts_bbox_head.transformer.cams_embeds": (6, 256),
    "pts_bbox_head.transformer.reference_points.weight": (3, 256),
    "pts_bbox_head.transformer.can_bus_mlp.0.weight": (128, 18),
    "pts_bbox_head.transformer.can_bus_mlp.norm.weight": (256,),
    "pts_bbox_head.cls_branches.5.6.weight": (10, 256),
    "pts_bbox_head.cls_branches.0.4.weight": (256,),
    "pts_bbox_head.reg_branches.5.4.weight": (10, 256),
    "pts_bbox_head.bev_embedding.weight": (2500, 256),
    "pts_bbox_head.query_embedding.weight": (900, 512),
    "pts_bbox_head.positional_encoding.row_embed.weight": (50, 128),
    "pts_bbox_head.positional_encoding.col_embed.weight": (50, 128),
    "pts_bbox_head.code_weights": (10,),
}


def test_tiny_recipe_builds_the_public_key_layout():
    state = build_model(load_recipe("bevformer_tiny")).state_dict()
    assert len(state) == TINY_KEYS
    for key, shape in TINY_SHAPES.items():
        assert tuple(state[key].shape) == shape, key


def test_release_style_checkpoint_loads(bev_recipe, bev_model, tmp_path):
    # mmcv writes {"meta", "state_dict"}; a DDP-trained file prefixes "module.".
    path = tmp_path / "bevformer_epoch_24.pth"
    state = {f"module.{k}": v for k, v in bev_model.state_dict().items()}
    torch.save({"meta": {"epoch": 24, "CLASSES": ["car"]}, "state_dict": state}, path)
    model, _, meta = load_model(bev_recipe, path)
    assert meta["epoch"] == 24
    for a, b in zip(model.state_dict().values(), bev_model.state_dict().values()):
        assert torch.equal(a, b)


def test_bev_size_mismatch_says_which_fields_to_set(bev_recipe, bev_model):
    data = {**_recipe_data(bev_recipe), "model": {**_recipe_data(bev_recipe)["model"], "bev_h": 20, "bev_w": 24}}
    other = build_model(recipe_from_dict(data))
    with pytest.raises(CheckpointError) as err:
        load_state_dict(bev_model, other.state_dict(), source="x.pth", recipe=bev_recipe.name)
    text = str(err.value)
    assert "set [model] bev_h = 20" in text and "set [model] bev_w = 24" in text
    assert "bev_embedding.weight is [480, 32]" in text


def test_missing_key_is_named(bev_recipe, bev_model):
    state = dict(bev_model.state_dict())
    del state["pts_bbox_head.transformer.can_bus_mlp.norm.weight"]
    with pytest.raises(CheckpointError, match="missing: pts_bbox_head.transformer.can_bus_mlp.norm.weight"):
        load_state_dict(bev_model, state, source="x.pth", recipe=bev_recipe.name)


def test_rig_with_another_camera_count_is_rejected(bev_recipe):
    cfg = dataclasses.replace(bev_recipe.model, num_cams=5)
    with pytest.raises(RecipeError, match="has 6 cameras"):
        build_model(dataclasses.replace(bev_recipe, model=cfg))


def _recipe_data(recipe):
    import tomllib

    return tomllib.loads(recipe.path.read_text())


def _bevformer_encoder(enc, bev_query, feats, bev_pos, shapes, prev_bev, shift):
    """BEVFormerEncoder.forward transcribed with its two paths: prev_bev None
    (TSA value = stack(query, query) of each layer's input, unshifted references)
    or given (value = stack(prev_bev, the encoder's input query), shifted)."""
    bs, q, c = bev_query.shape
    ref_2d = reference_points_2d(*enc.bev_shape).expand(bs, -1, -1, -1)
    if prev_bev is not None:
        value = torch.stack([prev_bev, bev_query], 1).reshape(bs * 2, q, c)
        hybrid = torch.stack([ref_2d + shift[:, None, None, :], ref_2d], 1).reshape(bs * 2, q, 1, 2)
    else:
        hybrid = torch.stack([ref_2d, ref_2d], 1).reshape(bs * 2, q, 1, 2)
    query = bev_query
    for layer in enc.layers:
        v = value if prev_bev is not None else torch.stack([query, query], 1).reshape(bs * 2, q, c)
        query = layer(query, v, bev_pos, hybrid, enc.bev_shape, feats, enc.reference_points_cam,
                      enc.bev_mask, shapes)
    return query


@pytest.mark.parametrize("first_frame", [True, False])
def test_static_first_frame_switch_equals_bevformer_paths(bev_model, first_frame):
    enc = bev_model.pts_bbox_head.transformer.encoder
    cfg = bev_model.config
    g = torch.Generator().manual_seed(3)
    shapes = [(3, 5), (2, 3)]
    bev_query = torch.randn(1, cfg.num_bev_queries, cfg.embed_dims, generator=g)
    bev_pos = torch.randn(1, cfg.num_bev_queries, cfg.embed_dims, generator=g)
    feats = torch.randn(cfg.num_cams, 21, 1, cfg.embed_dims, generator=g)
    prev = torch.randn(1, cfg.num_bev_queries, cfg.embed_dims, generator=g)
    shift = torch.tensor([[0.03, -0.02]])
    use = torch.tensor([0.0 if first_frame else 1.0])
    with torch.no_grad():
        ours = enc(bev_query, feats, bev_pos, shapes, prev if not first_frame else torch.zeros_like(prev),
                   shift if not first_frame else torch.zeros_like(shift), use)
        ref = _bevformer_encoder(enc, bev_query, feats, bev_pos, shapes, None if first_frame else prev, shift)
    # x*1 + y*0 == x exactly: the switch adds no rounding.
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)


def test_fpn_extra_levels_follow_mmdet():
    # BEVFormer-base: C3-C5 in, four outputs, the fourth a stride-2 conv on the
    # last output without ReLU (relu_before_extra_convs applies from the 2nd extra on).
    fpn = FPN((32, 64, 128), FPNConfig(out_channels=16, num_outs=5, add_extra_convs="on_output"))
    feats = [torch.randn(1, c, s, s) for c, s in ((32, 16), (64, 8), (128, 4))]
    outs = fpn(feats)
    assert [tuple(o.shape[-2:]) for o in outs] == [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]
    torch.testing.assert_close(outs[3], fpn.fpn_convs[3](outs[2]))
    torch.testing.assert_close(outs[4], fpn.fpn_convs[4](torch.relu(outs[3])))
    # Top-down: the finest output sees the coarser levels through nearest upsampling.
    lat = [c(f) for c, f in zip(fpn.lateral_convs, feats)]
    top = lat[1] + torch.nn.functional.interpolate(lat[2], size=(8, 8))
    torch.testing.assert_close(outs[0], fpn.fpn_convs[0](lat[0] + torch.nn.functional.interpolate(top, size=(16, 16))))


def test_resnet_config_errors():
    with pytest.raises(ValueError, match="not a Bottleneck ResNet"):
        ResNetConfig(depth=18)
    with pytest.raises(ValueError, match="out_indices"):
        ResNetConfig(out_indices=(4,))


def test_outputs_are_finite_and_boxes_in_range(bev_model, bev_samples):
    from deploykit.samples import torch_outputs

    r = bev_model.config.pc_range
    for s in bev_samples:
        out = torch_outputs(bev_model, s.feeds)
        assert all(np.isfinite(v).all() for v in out.values())
        xy = out["bbox_preds"][..., :2]
        assert (xy >= r[0]).all() and (xy <= r[3]).all()
