"""BEVDepth: the release's layout and forward math, its checkpoint layout, and bad input."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from deploykit.camera.rig import RIGS_DIR
from deploykit.checkpoint import read_checkpoint
from deploykit.errors import CheckpointError, RigError
from deploykit.export import load_model
from deploykit.models import build_model, make_sample
from deploykit.models.bevdepth import BEVDepth, BEVDepthConfig
from deploykit.models.bevdepth.lss import create_frustum
from deploykit.recipe import load_recipe
from deploykit.samples import torch_outputs
from deploykit.synthetic_checkpoint import default_checkpoint

# Keys of the public BEVDepth (bevdepth/layers/backbones/base_lss_fpn.py, heads/bev_depth_head.py
# on mmdet's ResNet / mmdet3d's SECONDFPN and CenterHead), prefixes as BaseBEVDepth names them.
RELEASE_KEYS = [
    "backbone.voxel_size", "backbone.voxel_coord", "backbone.voxel_num", "backbone.frustum",
    "backbone.img_backbone.conv1.weight", "backbone.img_backbone.layer1.0.downsample.0.weight",
    "backbone.img_backbone.layer4.0.conv3.weight", "backbone.img_neck.deblocks.0.0.weight",
    "backbone.img_neck.deblocks.3.1.running_var", "backbone.depth_net.reduce_conv.0.bias",
    "backbone.depth_net.context_conv.weight", "backbone.depth_net.bn.running_mean",
    "backbone.depth_net.depth_mlp.fc1.weight", "backbone.depth_net.depth_mlp.fc2.bias",
    "backbone.depth_net.depth_se.conv_reduce.weight", "backbone.depth_net.context_se.conv_expand.bias",
    "backbone.depth_net.context_mlp.fc1.weight", "backbone.depth_net.depth_conv.0.conv1.weight",
    "backbone.depth_net.depth_conv.2.bn2.weight", "backbone.depth_net.depth_conv.3.aspp1.atrous_conv.weight",
    "backbone.depth_net.depth_conv.3.aspp4.bn.running_mean", "backbone.depth_net.depth_conv.3.global_avg_pool.1.weight",
    "backbone.depth_net.depth_conv.3.global_avg_pool.2.bias", "backbone.depth_net.depth_conv.3.conv1.weight",
    "backbone.depth_net.depth_conv.3.bn1.weight", "backbone.depth_net.depth_conv.4.weight",
    "backbone.depth_net.depth_conv.4.conv_offset.weight", "backbone.depth_net.depth_conv.4.conv_offset.bias",
    "backbone.depth_net.depth_conv.5.weight", "backbone.depth_net.depth_conv.5.bias",
    "head.trunk.conv1.weight", "head.trunk.bn1.weight", "head.trunk.layer1.0.conv1.weight",
    "head.trunk.layer2.0.downsample.0.weight", "head.trunk.layer3.1.bn2.running_var",
    "head.neck.deblocks.0.0.weight", "head.neck.deblocks.3.1.weight", "head.shared_conv.conv.weight",
    "head.shared_conv.bn.weight", "head.task_heads.0.reg.0.conv.weight", "head.task_heads.5.heatmap.1.bias",
    "head.task_heads.2.vel.1.weight",
]


@pytest.fixture(scope="module")
def release_model():
    return BEVDepth(load_recipe("bevdepth_r50").model)


def test_public_config_sizes(release_model):
    """bev_depth_lss_r50_256x704_128x128_24e_2key's shapes: 112 depth bins on a 16x44 map,
    512-channel DepthNet, 160-channel (2 x 80) BEV trunk input, six tasks."""
    state = release_model.state_dict()
    assert set(RELEASE_KEYS) <= set(state)
    assert all(k.startswith(("backbone.", "head.")) for k in state)
    shapes = {"backbone.frustum": (112, 16, 44, 4), "backbone.depth_net.depth_conv.5.weight": (112, 512, 1, 1),
              "backbone.depth_net.bn.weight": (27,), "backbone.img_neck.deblocks.0.0.weight": (128, 256, 4, 4),
              "backbone.img_neck.deblocks.3.0.weight": (2048, 128, 2, 2),
              "backbone.depth_net.depth_conv.4.weight": (512, 128, 3, 3),
              "backbone.depth_net.depth_conv.4.conv_offset.weight": (18, 512, 3, 3),
              "backbone.depth_net.context_conv.weight": (80, 512, 1, 1), "head.trunk.conv1.weight": (160, 160, 7, 7),
              "head.trunk.layer3.0.conv1.weight": (640, 320, 3, 3), "head.neck.deblocks.3.0.weight": (640, 64, 8, 8),
              "head.shared_conv.conv.weight": (64, 256, 3, 3), "head.task_heads.1.heatmap.1.weight": (2, 64, 3, 3)}
    assert {k: tuple(state[k].shape) for k in shapes} == shapes
    assert state["backbone.voxel_num"].tolist() == [128, 128, 1]
    assert len(release_model.head.task_heads) == 6


def test_frustum_matches_create_frustum():
    cfg = BEVDepthConfig(image_size=(64, 192), image_scale=0.12, image_crop=(44, 0), d_bound=(2.0, 5.0, 1.0))
    f = create_frustum(cfg)
    assert f.shape == (3, 4, 12, 4)
    np.testing.assert_allclose(f[0, 0, :, 0].numpy(), np.linspace(0, 191, 12), rtol=1e-6)
    np.testing.assert_allclose(f[0, :, 0, 1].numpy(), np.linspace(0, 63, 4), rtol=1e-6)
    assert f[:, 0, 0, 2].tolist() == [2.0, 3.0, 4.0] and (f[..., 3] == 1).all()


def test_geometry_is_the_camera_model(lss_model):
    """get_geometry: pixel (u, v) at depth d -> ego = sensor2ego @ K^-1 @ (u d, v d, d) with
    the image augmentation (resize, crop) undone, checked in float64 numpy."""
    m = lss_model
    geom = m.backbone.get_geometry(m.rig_sensor2ego[:, 0], m.rig_intrin[:, 0], m.rig_ida[:, 0], m.rig_bda)
    cfg = m.cfg
    frustum = m.backbone.frustum.double().numpy()
    for cam in (0, 4):
        k = m.rig_intrin[0, 0, cam, :3, :3].double().numpy()
        s2e = m.rig_sensor2ego[0, 0, cam].double().numpy()
        u, v, d = frustum[5, 2, 7, :3]
        raw = np.array([(u + cfg.image_crop[1]) / cfg.image_scale, (v + cfg.image_crop[0]) / cfg.image_scale, 1.0])
        want = s2e[:3, :3] @ (np.linalg.inv(k) @ (raw * d)) + s2e[:3, 3]
        np.testing.assert_allclose(geom[0, cam, 5, 2, 7].double().numpy(), want, rtol=1e-5, atol=1e-4)


def dense_voxel_pooling(cells: np.ndarray, depth: np.ndarray, context: np.ndarray, voxel_num) -> np.ndarray:
    """BEVDepth's voxel_pooling_inference kernel, one point at a time: a point outside any
    axis of the grid is skipped, else depth x context is added to its (y, x) cell."""
    b, n, d, h, w, _ = cells.shape
    c = context.shape[1]
    nx, ny, nz = voxel_num
    out = np.zeros((b, ny, nx, c), np.float64)
    ctx = context.reshape(b, n, c, h, w)
    dep = depth.reshape(b, n, d, h, w)
    for idx in np.ndindex(b, n, d, h, w):
        x, y, z = cells[idx]
        if 0 <= x < nx and 0 <= y < ny and 0 <= z < nz:
            bi, ni, di, hi, wi = idx
            out[bi, y, x] += dep[idx] * ctx[bi, ni, :, hi, wi]
    return out.transpose(0, 3, 1, 2)


def test_voxel_pooling_matches_the_cuda_kernel_semantics(lss_model):
    """Odd sizes, points off every side of the grid, z out of range, an empty camera, and
    cells from coordinates in (-1, 0) (truncation puts them in cell 0, as `.int()` does)."""
    lss = lss_model.backbone
    nx, ny, nz = (int(v) for v in lss.voxel_num)
    g = torch.Generator().manual_seed(3)
    b, n, d, h, w, c = 1, 3, 5, 3, 7, 4
    coords = torch.rand(b, n, d, h, w, 3, generator=g) * torch.tensor([nx + 4, ny + 4, nz + 2]) - torch.tensor(
        [2.0, 2.0, 1.0])
    coords[0, 2] = -5.0  # a camera that sees nothing
    coords[0, 0, 0, 0, 0] = torch.tensor([-0.5, 3.2, 0.5])  # truncates to cell x = 0
    metres = coords * lss.voxel_size + (lss.voxel_coord - lss.voxel_size / 2)
    cells = lss.cells(metres)
    assert cells[0, 0, 0, 0, 0, 0] == 0
    depth = torch.rand(b * n, d, h, w, generator=g).softmax(1)
    context = torch.randn(b * n, c, h, w, generator=g)
    got = lss.voxel_pooling(cells, depth, context).numpy()
    want = dense_voxel_pooling(cells.numpy(), depth.numpy(), context.numpy(), (nx, ny, nz))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert (got != 0).any() and (got == 0).any()


def test_first_frame_fuses_itself(lss_model, lss_recipe):
    """With the previous key frame = the current one (the release's scene start), both
    halves of the fused BEV are the same pooled features."""
    sample = make_sample(lss_recipe, 0, lss_model)
    ref = sample.reference
    assert np.array_equal(ref["sweep_imgs"][:, 0], ref["sweep_imgs"][:, 1])
    captured = {}
    def keep_input(module, args, out):  # noqa: ARG001
        captured["x"] = args[0]

    handle = lss_model.head.trunk.register_forward_hook(keep_input)
    try:
        torch_outputs(lss_model, ref)
    finally:
        handle.remove()
    x = captured["x"]
    half = lss_recipe.model.output_channels
    assert torch.equal(x[:, :half], x[:, half:]) and x.abs().sum() > 0


def test_wrong_key_count_is_refused(lss_model, lss_recipe):
    ref = make_sample(lss_recipe, 1, lss_model).reference
    with pytest.raises(ValueError, match="1 key frames, the recipe fuses 2"):
        lss_model(*(torch.from_numpy(ref[n][:, :1] if n != "bda_mat" else ref[n]) for n in lss_model.input_names))


# --- checkpoints ---------------------------------------------------------------

def test_synthetic_checkpoint_is_a_lightning_file(lss_recipe, lss_model):
    raw = torch.load(default_checkpoint(lss_recipe), map_location="cpu", weights_only=True)
    assert "pytorch-lightning_version" in raw and all(k.startswith("model.") for k in raw["state_dict"])
    state, meta = read_checkpoint(default_checkpoint(lss_recipe))
    assert set(state) == set(lss_model.state_dict()) and meta.get("synthetic")


def test_plain_state_dict_loads(tmp_path, lss_recipe, lss_model):
    path = tmp_path / "plain.pth"
    torch.save(lss_model.state_dict(), path)
    model, _, _ = load_model(lss_recipe, path)
    assert torch.equal(model.head.shared_conv.conv.weight, lss_model.head.shared_conv.conv.weight)


def _recipe_with(recipe, **model_fields):
    return dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, **model_fields))


def test_depth_bins_mismatch_names_d_bound(tmp_path, lss_recipe, lss_model):
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": {f"model.{k}": v for k, v in lss_model.state_dict().items()}}, path)
    other = _recipe_with(lss_recipe, d_bound=(2.0, 58.0, 0.5))
    with pytest.raises(CheckpointError, match=r"32 depth bins: set \[model\] d_bound"):
        load_model(other, path)


def test_bev_grid_mismatch_names_the_bounds(tmp_path, lss_recipe, lss_model):
    """voxel_num has the same shape for every grid: the values tell, and loading them
    silently would pool into the checkpoint's grid."""
    path = tmp_path / "ckpt.pth"
    torch.save(lss_model.state_dict(), path)
    other = _recipe_with(lss_recipe, x_bound=(-25.6, 25.6, 0.4), y_bound=(-25.6, 25.6, 0.4),
                         bbox_voxel_size=(0.1, 0.1, 8.0))
    with pytest.raises(CheckpointError, match=r"voxel_num is \[64, 64, 1\] in the checkpoint.*x_bound / y_bound"):
        load_model(other, path)


# --- rigs ----------------------------------------------------------------------

def _rig_file(tmp_path, edit) -> str:
    data = json.loads((RIGS_DIR / "nuscenes_surround.json").read_text())
    edit(data)
    path = tmp_path / "rig.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_rig_without_lidar2ego_is_refused(tmp_path, lss_recipe):
    rig = _rig_file(tmp_path, lambda d: (d.pop("lidar2ego_rotation"), d.pop("lidar2ego_translation")))
    with pytest.raises(RigError, match="no lidar2ego_rotation.*BEVDepth predicts in the ego frame"):
        build_model(_recipe_with(lss_recipe, rig=rig))


def test_rig_that_misses_the_grid_is_refused(tmp_path, lss_recipe, lss_model):
    from deploykit.passes import apply_passes

    # The LiDAR 500 m up: every frustum point is far above the BEV's z range.
    rig = _rig_file(tmp_path, lambda d: d.__setitem__("lidar2ego_translation", [0.0, 0.0, 500.0]))
    with pytest.raises(RigError, match="no camera's frustum .* reaches the BEV grid"):
        apply_passes(build_model(_recipe_with(lss_recipe, rig=rig)), ["bev_pool_op"])


def test_bad_config_fields_are_named():
    with pytest.raises(ValueError, match="multiples of 32"):
        BEVDepthConfig(image_size=(64, 176))
    with pytest.raises(ValueError, match="x_bound .* whole cells"):
        BEVDepthConfig(x_bound=(-51.2, 51.2, 0.7))
    with pytest.raises(ValueError, match="keys 3"):
        BEVDepthConfig(keys=3)


def test_release_forward_exports_with_inverse_mapped(tmp_path, lss_model, lss_recipe):
    """The naive export the benchmark measures: with torch.inverse mapped to ONNX Runtime's
    contrib Inverse, the release forward runs in ONNX Runtime and pools correctly (the
    pooling's scatter keeps its "add" reduction: index_add would export without it)."""
    from deploykit.engines.ort import build
    from deploykit.export import export_onnx

    sample = make_sample(lss_recipe, 3, lss_model)
    torch.onnx.register_custom_op_symbolic("aten::linalg_inv", lambda g, x: g.op("com.microsoft::Inverse", x), 1)
    try:
        export_onnx(lss_model, sample.reference, tmp_path / "naive.onnx", lss_recipe.convert.opset)
    finally:
        torch.onnx.unregister_custom_op_symbolic("aten::linalg_inv", 1)
    got = build(tmp_path / "naive.onnx").run(sample.reference)
    ref = torch_outputs(lss_model, sample.reference)
    from deploykit.compare import compare_outputs

    assert max(a.max_rel_error for a in compare_outputs(ref, got)) < 1e-4
