import json

import numpy as np
import pytest
import torch

from deploykit.camera.rig import load_rig
from deploykit.camera.virtual_bev import bev_visibility, plan_virtual_bev
from deploykit.errors import RigError

PC_RANGE = [-51.2, -51.2, -5.0, 51.2, 51.2, 3.0]


def bevformer_point_sampling(bev_h, bev_w, pc_range, num_points, lidar2img, img_shape):
    """torch transcription of BEVFormer's encoder get_reference_points('3d') + point_sampling."""
    Z = pc_range[5] - pc_range[2]
    zs = torch.linspace(0.5, Z - 0.5, num_points).view(-1, 1, 1).expand(num_points, bev_h, bev_w) / Z
    xs = torch.linspace(0.5, bev_w - 0.5, bev_w).view(1, 1, bev_w).expand(num_points, bev_h, bev_w) / bev_w
    ys = torch.linspace(0.5, bev_h - 0.5, bev_h).view(1, bev_h, 1).expand(num_points, bev_h, bev_w) / bev_h
    ref = torch.stack((xs, ys, zs), -1).permute(0, 3, 1, 2).flatten(2).permute(0, 2, 1)[None]
    ref = ref.clone()
    ref[..., 0:1] = ref[..., 0:1] * (pc_range[3] - pc_range[0]) + pc_range[0]
    ref[..., 1:2] = ref[..., 1:2] * (pc_range[4] - pc_range[1]) + pc_range[1]
    ref[..., 2:3] = ref[..., 2:3] * (pc_range[5] - pc_range[2]) + pc_range[2]
    ref = torch.cat((ref, torch.ones_like(ref[..., :1])), -1).permute(1, 0, 2, 3)
    D, B, Q = ref.shape[:3]
    N = lidar2img.shape[0]
    ref = ref.view(D, B, 1, Q, 4).repeat(1, 1, N, 1, 1).unsqueeze(-1)
    l2i = torch.as_tensor(lidar2img, dtype=torch.float32).view(1, B, N, 1, 4, 4).repeat(D, 1, 1, Q, 1, 1)
    cam = torch.matmul(l2i, ref).squeeze(-1)
    eps = 1e-5
    mask = cam[..., 2:3] > eps
    cam = cam[..., 0:2] / torch.maximum(cam[..., 2:3], torch.ones_like(cam[..., 2:3]) * eps)
    cam[..., 0] /= img_shape[1]
    cam[..., 1] /= img_shape[0]
    mask = mask & (cam[..., 1:2] > 0.0) & (cam[..., 1:2] < 1.0) & (cam[..., 0:1] < 1.0) & (cam[..., 0:1] > 0.0)
    mask = torch.nan_to_num(mask)
    return cam.permute(2, 1, 3, 0, 4)[:, 0].numpy(), mask.permute(2, 1, 3, 0, 4).squeeze(-1)[:, 0].numpy()


@pytest.fixture(scope="module")
def rig():
    return load_rig("nuscenes_surround")


def test_visibility_matches_bevformer_point_sampling(rig):
    args = dict(bev_h=50, bev_w=50, pc_range=PC_RANGE, num_points_in_pillar=4, scale=0.5, img_shape=(480, 800))
    uv, mask = bev_visibility(rig, **args)
    ref_uv, ref_mask = bevformer_point_sampling(50, 50, PC_RANGE, 4, rig.lidar2img(0.5), (480, 800))
    # Same float32 maths in another order: a pillar exactly on an image edge could
    # flip, so compare masks exactly and positions to float32 rounding.
    np.testing.assert_array_equal(mask, ref_mask)
    np.testing.assert_allclose(uv[mask], ref_uv[ref_mask], rtol=0, atol=1e-5)


def test_uncapped_plan_equals_bevformer_rebatch(rig):
    _, mask = bev_visibility(rig, bev_h=50, bev_w=50, pc_range=PC_RANGE, num_points_in_pillar=4, scale=0.5,
                             img_shape=(480, 800))
    plan = plan_virtual_bev(rig, mask, max_cams_per_pillar=6, virtual_h=40, virtual_w=40)
    for c in range(len(rig.cameras)):
        want = mask[c].sum(-1).nonzero()[0]  # BEVFormer: mask_per_img[0].sum(-1).nonzero()
        got = plan.indices[c][plan.indices[c] < 2500]
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(plan.count, np.maximum((mask.sum(-1) > 0).sum(0), 1))
    assert plan.coverage["hits_kept_fraction"] == 1.0 and plan.coverage["pillars_losing_a_camera"] == 0


def test_cap_keeps_the_cameras_that_see_most(rig):
    _, mask = bev_visibility(rig, bev_h=50, bev_w=50, pc_range=PC_RANGE, num_points_in_pillar=4, scale=0.5,
                             img_shape=(480, 800))
    plan = plan_virtual_bev(rig, mask, max_cams_per_pillar=1, virtual_h=40, virtual_w=40)
    anchors = mask.sum(-1)
    assert (plan.kept.sum(0) <= 1).all()
    seen = anchors.max(0) > 0
    chosen = plan.kept.argmax(0)
    np.testing.assert_array_equal(anchors[chosen, np.arange(2500)][seen], anchors.max(0)[seen])
    assert plan.coverage["pillars_losing_a_camera"] > 0
    assert plan.coverage["hits_kept"] == int(seen.sum())


def test_too_small_virtual_grid_suggests_sizes(rig):
    _, mask = bev_visibility(rig, bev_h=50, bev_w=50, pc_range=PC_RANGE, num_points_in_pillar=4, scale=0.5,
                             img_shape=(480, 800))
    with pytest.raises(RigError, match=r"keeps \d+ BEV pillars but the virtual BEV has 10x10=100 slots; use virtual_bev_h=\d+"):
        plan_virtual_bev(rig, mask, max_cams_per_pillar=2, virtual_h=10, virtual_w=10)


def test_camera_that_sees_nothing(rig, tmp_path):
    data = json.loads(open("calib/rigs/nuscenes_surround.json").read())
    data["cameras"][0]["sensor2lidar_translation"] = [0.0, 0.0, 500.0]  # far above the grid, looking level
    path = tmp_path / "rig.json"
    path.write_text(json.dumps(data))
    bad = load_rig(path)
    _, mask = bev_visibility(bad, bev_h=20, bev_w=20, pc_range=PC_RANGE, num_points_in_pillar=4, scale=1.0,
                             img_shape=(900, 1600))
    with pytest.raises(RigError, match="camera CAM_FRONT sees none of the 400 BEV pillars"):
        plan_virtual_bev(bad, mask, max_cams_per_pillar=2, virtual_h=20, virtual_w=20)


def test_non_invertible_extrinsics_are_rejected(tmp_path):
    data = json.loads(open("calib/rigs/nuscenes_surround.json").read())
    data["cameras"][2]["sensor2lidar_rotation"] = [[1, 0, 0], [0, 1, 0], [0, 0, 0]]
    path = tmp_path / "rig.json"
    path.write_text(json.dumps(data))
    with pytest.raises(RigError, match="CAM_FRONT_LEFT sensor2lidar_rotation is not a rotation"):
        load_rig(path)


def test_bundled_rig_covers_the_ring_around_the_car(rig):
    _, mask = bev_visibility(rig, bev_h=50, bev_w=50, pc_range=PC_RANGE, num_points_in_pillar=4, scale=0.5,
                             img_shape=(480, 800))
    seen = mask.any(-1).any(0).reshape(50, 50)
    # Every pillar 10-50 m from the car is seen by some camera.
    ys, xs = np.meshgrid(np.arange(50), np.arange(50), indexing="ij")
    r = np.hypot((xs + 0.5) * 2.048 - 51.2, (ys + 0.5) * 2.048 - 51.2)
    assert seen[(r > 10) & (r < 50)].all()
