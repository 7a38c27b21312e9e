import pytest
import torch

from deploykit.models import build_model
from deploykit.recipe import load_recipe

# Keys and shapes as they appear in mmdet3d's released CenterPoint pillar
# checkpoints (centerpoint_pillar02_second_secfpn_nus).
NUS_KEYS = {
    "pts_voxel_encoder.pfn_layers.0.linear.weight": (64, 11),
    "pts_voxel_encoder.pfn_layers.0.norm.running_mean": (64,),
    "pts_voxel_encoder.pfn_layers.0.norm.num_batches_tracked": (),
    "pts_backbone.blocks.0.0.weight": (64, 64, 3, 3),
    "pts_backbone.blocks.0.1.running_var": (64,),
    "pts_backbone.blocks.0.3.weight": (64, 64, 3, 3),
    "pts_backbone.blocks.1.0.weight": (128, 64, 3, 3),
    "pts_backbone.blocks.2.15.weight": (256, 256, 3, 3),
    "pts_neck.deblocks.0.0.weight": (128, 64, 2, 2),
    "pts_neck.deblocks.1.0.weight": (128, 128, 1, 1),
    "pts_neck.deblocks.2.0.weight": (256, 128, 2, 2),
    "pts_neck.deblocks.2.1.bias": (128,),
    "pts_bbox_head.shared_conv.conv.weight": (64, 384, 3, 3),
    "pts_bbox_head.shared_conv.bn.weight": (64,),
    "pts_bbox_head.task_heads.0.reg.0.conv.weight": (64, 64, 3, 3),
    "pts_bbox_head.task_heads.0.reg.0.bn.running_mean": (64,),
    "pts_bbox_head.task_heads.0.reg.1.weight": (2, 64, 3, 3),
    "pts_bbox_head.task_heads.0.heatmap.1.bias": (1,),
    "pts_bbox_head.task_heads.1.heatmap.1.weight": (2, 64, 3, 3),
    "pts_bbox_head.task_heads.5.vel.1.bias": (2,),
}


def test_nus_recipe_has_the_mmdet3d_key_layout():
    state = build_model(load_recipe("centerpoint_pillar_nus")).state_dict()
    for key, shape in NUS_KEYS.items():
        assert key in state, key
        assert tuple(state[key].shape) == shape, key
    # mmcv ConvModule before a BN has no conv bias; the head's final convs do.
    assert "pts_bbox_head.shared_conv.conv.bias" not in state
    assert "pts_backbone.blocks.0.0.bias" not in state
    # PFN 1+5, backbone 16 convs x (1+5), neck 3 x (1+5), shared conv 1+5,
    # 6 tasks x 6 heads x (ConvModule 1+5 + final conv weight+bias).
    assert len(state) == 6 + 96 + 18 + 6 + 6 * 6 * 8


def test_output_names_and_shapes(small_recipe, small_model):
    v = small_recipe.model.voxelization
    x = torch.zeros(3, v.max_points_per_pillar, small_recipe.model.pillar_channels)
    coords = torch.tensor([[0, 0, 1, 2], [0, 0, 5, 5], [-1, -1, -1, -1]], dtype=torch.int32)
    with torch.no_grad():
        outs = small_model(x, coords)
    names = small_model.output_names
    assert names[:6] == ["task0.reg", "task0.height", "task0.dim", "task0.rot", "task0.vel", "task0.heatmap"]
    assert len(outs) == len(names) == 12
    nx, ny, _ = v.grid_size
    stride = small_recipe.model.output_stride
    assert outs[5].shape == (1, 1, ny // stride, nx // stride)
    assert outs[11].shape == (1, 2, ny // stride, nx // stride)


def test_scatter_ignores_padding_rows():
    from deploykit.models.centerpoint_pillar import PointPillarsScatter

    scatter = PointPillarsScatter(2, 4, 3)
    feats = torch.arange(6, dtype=torch.float32).reshape(1, 2, 3)
    coords = torch.tensor([[0, 0, 1, 2], [-1, -1, -1, -1], [0, 0, 0, 0]], dtype=torch.int32)
    canvas = scatter(feats, coords)
    assert canvas.shape == (1, 2, 4, 3)
    assert canvas[0, :, 1, 2].tolist() == [0.0, 3.0]
    assert canvas[0, :, 0, 0].tolist() == [2.0, 5.0]
    assert canvas.abs().sum() == 10.0


def test_bad_grid_is_a_clear_error():
    from deploykit.errors import RecipeError

    with pytest.raises(RecipeError, match="one voxel in z"):
        from deploykit.recipe import recipe_from_dict
        import tomllib
        from deploykit.recipe import RECIPES_DIR

        data = tomllib.loads((RECIPES_DIR / "centerpoint_pillar_small.toml").read_text())
        data["model"]["voxelization"]["voxel_size"] = [0.4, 0.4, 4.0]
        recipe_from_dict(data)
