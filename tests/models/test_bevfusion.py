"""BEVFusion: grid alignment, the fuse module, the occupancy head and the whole model
against the separate streams."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from deploykit.errors import RecipeError
from deploykit.models import make_sample
from deploykit.models.bevformer import BEVFormer
from deploykit.models.bevfusion import BevFuseModule, FuseConfig, OccHead, occupancy_roi
from deploykit.models.centerpoint_pillar import CenterPointPillar, CenterPointPillarConfig, HeadConfig, TaskConfig
from deploykit.recipe import load_recipe, recipe_from_dict

TOL = 1e-5  # relative to the output's largest magnitude: fp32 summation order only


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-12))


def _fused_dict(**model_changes):
    import tomllib

    from deploykit.recipe import RECIPES_DIR

    data = tomllib.loads((RECIPES_DIR / "bevfusion_small.toml").read_text())
    for path, value in model_changes.items():
        node = data["model"]
        *parents, leaf = path.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return data


def test_npu_recipe_has_the_articles_shapes():
    from deploykit.models import build_model
    from deploykit.passes import apply_passes

    recipe = load_recipe("bevfusion_npu")
    assert recipe.model.roi_box == (14, 14, 114, 114)
    assert recipe.model.lidar.bev_size == (128, 128) == recipe.model.bev_shape
    model = apply_passes(build_model(recipe), recipe.convert.passes)
    sample = make_sample(recipe, 0, model)
    assert sample.feeds["img"].shape == (1, 6, 3, 512, 960)
    assert sample.feeds["pillars"].shape == (1, 5, 20, 40000)
    assert model.output_names == ["bev_embed", "cls_scores", "bbox_preds", "occupancy"]


def test_grids_that_do_not_align_are_refused_naming_the_fields():
    with pytest.raises(RecipeError, match=r"camera.bev_h x camera.bev_w = 16x16 cells, the LiDAR stream's is 32x32.*"
                                          r"set camera.bev_h = 32 and camera.bev_w = 32"):
        recipe_from_dict(_fused_dict(camera__bev_h=16, camera__bev_w=16))
    with pytest.raises(RecipeError, match=r"do not cover the same area: camera.pc_range x/y is \[-30, -30, 30, 30\], "
                                          r"lidar.voxelization.point_cloud_range x/y is \[-25.6, -25.6, 25.6, 25.6\]"):
        recipe_from_dict(_fused_dict(camera__pc_range=[-30.0, -30.0, -5.0, 30.0, 30.0, 3.0]))
    with pytest.raises(RecipeError, match=r"fusion.channels \(48\) must equal camera.embed_dims \(32\)"):
        recipe_from_dict(_fused_dict(fusion__channels=48))


def test_an_occupancy_range_off_the_cell_grid_is_refused_with_ranges_that_work():
    # 1.6 m cells: +-20 m is 12.5 cells from the edge, not whole cells.
    with pytest.raises(RecipeError, match=r"occ.range x -20..20 m is not a whole-cell window.*ranges that work near "
                                          r"it: .*\+-19.2 m \(24 cells\).*\+-20.8 m \(26 cells\)"):
        recipe_from_dict(_fused_dict(occ__range=[-20.0, -20.0, -2.6, 20.0, 20.0, 2.2]))
    # Whole cells but not centred.
    with pytest.raises(RecipeError, match="not a whole-cell window centred"):
        recipe_from_dict(_fused_dict(occ__range=[-19.2, -19.2, -2.6, 16.0, 19.2, 2.2]))
    with pytest.raises(RecipeError, match=r"occ.roi_box \[3, 3, 29, 29\] is not the window of occ.range.*\[4, 4, 28, 28\]"):
        recipe_from_dict(_fused_dict(occ__roi_box=[3, 3, 29, 29]))
    with pytest.raises(RecipeError, match="must end with 'free'"):
        recipe_from_dict(_fused_dict(occ__class_names=["car", "ground"]))


def test_roi_of_the_articles_grid():
    npu = load_recipe("bevfusion_npu").model
    assert occupancy_roi(npu.camera, npu.occ) == (14, 14, 114, 114)  # 40 / 51.2 = 100 / 128


def _bn(m):
    return lambda x: F.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)


def _randomise(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return module.eval()


def test_fuse_module_is_concat_reduce_conv_se():
    fuse = _randomise(BevFuseModule(6, 10, FuseConfig(channels=8)), 0)
    cam, lid = torch.randn(1, 6, 7, 9), torch.randn(1, 10, 7, 9)
    with torch.no_grad():
        out = fuse(cam, lid)
        r, c = fuse.reduce_conv, fuse.conv2
        x = torch.cat([cam, lid], 1)
        x = F.relu(_bn(r[1])(F.conv2d(x, r[0].weight, r[0].bias)))
        x = F.relu(_bn(c[1])(F.conv2d(x, c[0].weight, c[0].bias, padding=1)))
        se = fuse.seblock.att[1]
        gate = torch.sigmoid(F.conv2d(x.mean((2, 3), keepdim=True), se.weight, se.bias))
        ref = x * gate
    assert out.shape == (1, 8, 7, 9)
    assert _rel(ref, out) < TOL
    # The SE gate is per channel: one channel's gate scales the whole map of that channel.
    assert torch.allclose(out / x.clamp(min=1e-6) * (x > 1e-3), gate.expand_as(x) * (x > 1e-3), atol=1e-4)


def _occ_cfg(size):
    recipe = recipe_from_dict(_fused_dict(occ__size=size))
    return recipe.model


@pytest.mark.parametrize("size", [[48, 48, 8], [24, 24, 4]])
def test_occupancy_head_matches_flashocc_behind_the_roi_crop(size):
    cfg = _occ_cfg(size)
    head = _randomise(OccHead(32, cfg), 1)
    bev = torch.randn(1, 32, 32, 32)
    with torch.no_grad():
        out = head(bev)
        x1, y1, x2, y2 = 4, 4, 28, 28
        x = bev[:, :, y1:y2, x1:x2]
        if size[0] != 24:
            x = F.interpolate(x, size=(size[1], size[0]), mode="bilinear", align_corners=False)
        x = F.relu(F.conv2d(x, head.final_conv.conv.weight, head.final_conv.conv.bias, padding=1))
        x = x.permute(0, 3, 2, 1)  # FlashOcc: (B, C, Dy, Dx) -> (B, Dx, Dy, C)
        p = head.predicter
        x = F.linear(F.softplus(F.linear(x, p[0].weight, p[0].bias)), p[2].weight, p[2].bias)
        ref = x.view(1, size[0], size[1], size[2], cfg.occ.num_classes)
    assert out.shape == (1, *size, cfg.occ.num_classes)
    assert _rel(ref, out) < TOL


def test_occupancy_axes_are_x_then_y_of_the_lidar_frame():
    cfg = _occ_cfg([24, 24, 4])  # no upsample: one occupancy column per BEV cell
    head = _randomise(OccHead(32, cfg), 2)
    bev = torch.zeros(1, 32, 32, 32)
    with torch.no_grad():
        base = head(bev)
        bev[:, :, 4 + 3, 4 + 17] = 5.0  # BEV row = y cell 3, column = x cell 17 inside the RoI
        changed = (head(bev) - base).abs().sum((0, 3, 4))  # (Dx, Dy)
    xs, ys = torch.nonzero(changed > 1e-6, as_tuple=True)
    assert xs.min() >= 16 and xs.max() <= 18 and ys.min() >= 2 and ys.max() <= 4  # the 3x3 conv's reach


def test_fused_model_equals_the_streams_fed_through_the_fuse_module(fused_recipe, fused_model):
    """Each stream run alone, as its own model with its release layout, then the fuse
    module and the heads, gives the fused model's outputs."""
    cfg = fused_recipe.model
    state = fused_model.state_dict()
    camera = BEVFormer(cfg.camera).eval()
    cam_state = {k: v for k, v in state.items() if k.startswith(("img_backbone.", "img_neck.", "pts_bbox_head."))}
    cam_state.update({"pts_bbox_head." + k[len("det_head."):]: v for k, v in state.items()
                      if k.startswith("det_head.")})
    camera.load_state_dict(cam_state)
    lidar_cfg = CenterPointPillarConfig(**{f: getattr(cfg.lidar, f) for f in ("voxelization", "pillar_encoder",
                                                                             "backbone", "neck", "points")},
                                        head=HeadConfig(tasks=(TaskConfig(("car",)),), common_heads={}))
    lidar = CenterPointPillar(lidar_cfg).eval()
    streams = ("pts_voxel_encoder.", "pts_middle_encoder.", "pts_backbone.", "pts_neck.")
    lidar.load_state_dict({k: v for k, v in state.items() if k.startswith(streams)} | {
        k: v for k, v in lidar.state_dict().items() if k.startswith("pts_bbox_head.")})
    for seed in (4, 5):  # a first frame and a later one
        s = make_sample(fused_recipe, seed, fused_model)
        t = {k: torch.from_numpy(v) for k, v in s.reference.items()}
        with torch.no_grad():
            fused = fused_model(*(t[n] for n in fused_model.input_names))
            bev_embed = camera.bev_features(t["img"], t["can_bus"], t["shift"], t["prev_bev"], t["use_prev_bev"])
            lidar_bev = lidar.bev_features(t["pillars"], t["coords"])
            h, w = cfg.bev_shape
            x = fused_model.fusion_module(bev_embed.transpose(1, 2).reshape(1, -1, h, w), lidar_bev)
            cls, bbox = camera.pts_bbox_head.predict(x.flatten(2).transpose(1, 2))
            occ = fused_model.occ_head(x)
        for ref, out in zip((bev_embed, cls, bbox, occ), fused):
            assert _rel(ref, out) < TOL


def test_centerpoint_head_option(fused_recipe):
    from deploykit.models import ARCHITECTURES, build_model

    data = _fused_dict(det_head="centerpoint")
    with pytest.raises(RecipeError, match=r"needs a \[model.centerpoint_head\] table"):
        recipe_from_dict(data)
    data["model"]["centerpoint_head"] = {"tasks": [{"class_names": ["car"]}, {"class_names": ["pedestrian", "cyclist"]}],
                                         "common_heads": {"reg": [2, 2], "height": [1, 2], "dim": [3, 2],
                                                          "rot": [2, 2]},
                                         "share_conv_channel": 16, "head_conv": 16}
    recipe = recipe_from_dict(data)
    model = build_model(recipe)
    assert model.output_names[:5] == ["bev_embed", "task0.reg", "task0.height", "task0.dim", "task0.rot"]
    s = make_sample(recipe, 0, model)
    from deploykit.samples import torch_outputs

    out = torch_outputs(model, s.reference)
    assert out["task1.heatmap"].shape == (1, 2, 32, 32)
    boxes = ARCHITECTURES["bevfusion"].postprocess(recipe.model, out)
    assert set(np.unique(boxes.labels)) <= {0, 1, 2}


def test_stream_of_another_size_names_the_field(tmp_path, fused_recipe, fused_model):
    from deploykit.errors import CheckpointError
    from deploykit.export import load_model

    other = recipe_from_dict(_fused_dict(camera__num_query=20))
    state = fused_model.state_dict()
    path = tmp_path / "fused.pth"
    torch.save({"state_dict": state}, path)
    with pytest.raises(CheckpointError, match=r"(?s)shape: det_head.query_embedding.weight \(detection head\) is "
                                              r"\[50, 64\].*trained with num_query = 50: set \[model.camera\] "
                                              r"num_query = 50"):
        load_model(other, path)


def test_rig_replacement_reaches_the_camera_stream(fused_recipe):
    from deploykit.export import with_rig

    replaced = with_rig(fused_recipe, "nuscenes_surround")
    assert replaced.model.camera.rig.endswith("nuscenes_surround.json")
    assert dataclasses.replace(replaced.model.camera, rig=fused_recipe.model.camera.rig) == fused_recipe.model.camera
