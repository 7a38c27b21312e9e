import functools
import math

import numpy as np
import pytest
import torch

from deploykit.detection import centerpoint_targets as ct
from deploykit.detection.decode import decode_centerpoint
from deploykit.recipe import load_recipe

# ===========================================================================
# REFERENCE: transcriptions of mmdet3d v1.4.0 and mmdet 3.x, used as ground
# truth below. Kept line for line; only the registry / InstanceData / config
# plumbing is replaced (noted where).
#   mmdet3d/models/utils/gaussian.py: gaussian_2d, draw_heatmap_gaussian, gaussian_radius
#   mmdet3d/models/utils/clip_sigmoid.py: clip_sigmoid
#   mmdet3d/models/dense_heads/centerpoint_head.py: CenterHead._gather_feat,
#       get_targets, get_targets_single, loss_by_feat
#   mmdet/models/losses/utils.py: weight_reduce_loss, weighted_loss
#   mmdet/models/losses/gaussian_focal_loss.py: gaussian_focal_loss, GaussianFocalLoss
#   mmdet/models/losses/smooth_l1_loss.py: l1_loss, L1Loss
# ===========================================================================


def ref_gaussian_2d(shape, sigma=1):
    m, n = [(ss - 1.) / 2. for ss in shape]
    y, x = np.ogrid[-m:m + 1, -n:n + 1]

    h = np.exp(-(x * x + y * y) / (2 * sigma * sigma))
    h[h < np.finfo(h.dtype).eps * h.max()] = 0
    return h


def ref_draw_heatmap_gaussian(heatmap, center, radius, k=1):
    diameter = 2 * radius + 1
    gaussian = ref_gaussian_2d((diameter, diameter), sigma=diameter / 6)

    x, y = int(center[0]), int(center[1])

    height, width = heatmap.shape[0:2]

    left, right = min(x, radius), min(width - x, radius + 1)
    top, bottom = min(y, radius), min(height - y, radius + 1)

    masked_heatmap = heatmap[y - top:y + bottom, x - left:x + right]
    masked_gaussian = torch.from_numpy(
        gaussian[radius - top:radius + bottom,
                 radius - left:radius + right]).to(heatmap.device,
                                                   torch.float32)
    if min(masked_gaussian.shape) > 0 and min(masked_heatmap.shape) > 0:
        torch.max(masked_heatmap, masked_gaussian * k, out=masked_heatmap)
    return heatmap


def ref_gaussian_radius(det_size, min_overlap=0.5):
    height, width = det_size

    a1 = 1
    b1 = (height + width)
    c1 = width * height * (1 - min_overlap) / (1 + min_overlap)
    sq1 = torch.sqrt(b1**2 - 4 * a1 * c1)
    r1 = (b1 + sq1) / 2

    a2 = 4
    b2 = 2 * (height + width)
    c2 = (1 - min_overlap) * width * height
    sq2 = torch.sqrt(b2**2 - 4 * a2 * c2)
    r2 = (b2 + sq2) / 2

    a3 = 4 * min_overlap
    b3 = -2 * min_overlap * (height + width)
    c3 = (min_overlap - 1) * width * height
    sq3 = torch.sqrt(b3**2 - 4 * a3 * c3)
    r3 = (b3 + sq3) / 2
    return min(r1, r2, r3)


def ref_clip_sigmoid(x, eps=1e-4):
    y = torch.clamp(x.sigmoid_(), min=eps, max=1 - eps)
    return y


def ref_reduce_loss(loss, reduction):
    reduction_enum = torch.nn.functional._Reduction.get_enum(reduction)
    # none: 0, elementwise_mean:1, sum: 2
    if reduction_enum == 0:
        return loss
    elif reduction_enum == 1:
        return loss.mean()
    elif reduction_enum == 2:
        return loss.sum()


def ref_weight_reduce_loss(loss, weight=None, reduction='mean', avg_factor=None):
    # if weight is specified, apply element-wise weight
    if weight is not None:
        loss = loss * weight

    # if avg_factor is not specified, just reduce the loss
    if avg_factor is None:
        loss = ref_reduce_loss(loss, reduction)
    else:
        # if reduction is mean, then average the loss by avg_factor
        if reduction == 'mean':
            # Avoid causing ZeroDivisionError when avg_factor is 0.0,
            # i.e., all labels of an image belong to ignore index.
            eps = torch.finfo(torch.float32).eps
            loss = loss.sum() / (avg_factor + eps)
        # if reduction is 'none', then do nothing, otherwise raise an error
        elif reduction != 'none':
            raise ValueError('avg_factor can not be used with reduction="sum"')
    return loss


def ref_weighted_loss(loss_func):
    @functools.wraps(loss_func)
    def wrapper(pred, target, weight=None, reduction='mean', avg_factor=None, **kwargs):
        # get element-wise loss
        loss = loss_func(pred, target, **kwargs)
        loss = ref_weight_reduce_loss(loss, weight, reduction, avg_factor)
        return loss

    return wrapper


@ref_weighted_loss
def ref_gaussian_focal_loss(pred, gaussian_target, alpha=2.0, gamma=4.0, pos_weight=1.0, neg_weight=1.0):
    eps = 1e-12
    pos_weights = gaussian_target.eq(1)
    neg_weights = (1 - gaussian_target).pow(gamma)
    pos_loss = -(pred + eps).log() * (1 - pred).pow(alpha) * pos_weights
    neg_loss = -(1 - pred + eps).log() * pred.pow(alpha) * neg_weights
    return pos_weight * pos_loss + neg_weight * neg_loss


class RefGaussianFocalLoss(torch.nn.Module):
    def __init__(self, alpha=2.0, gamma=4.0, reduction='mean', loss_weight=1.0, pos_weight=1.0, neg_weight=1.0):
        super().__init__()
        self.alpha = alpha
        self.gamma = gamma
        self.reduction = reduction
        self.loss_weight = loss_weight
        self.pos_weight = pos_weight
        self.neg_weight = neg_weight

    def forward(self, pred, target, pos_inds=None, pos_labels=None, weight=None, avg_factor=None,
                reduction_override=None):
        assert reduction_override in (None, 'none', 'mean', 'sum')
        reduction = (reduction_override if reduction_override else self.reduction)
        assert pos_inds is None  # (the CenterNet-update branch is not used by CenterHead)
        loss_reg = self.loss_weight * ref_gaussian_focal_loss(
            pred, target, weight, alpha=self.alpha, gamma=self.gamma, pos_weight=self.pos_weight,
            neg_weight=self.neg_weight, reduction=reduction, avg_factor=avg_factor)
        return loss_reg


@ref_weighted_loss
def ref_l1_loss(pred, target):
    if target.numel() == 0:
        return pred.sum() * 0

    assert pred.size() == target.size()
    loss = torch.abs(pred - target)
    return loss


class RefL1Loss(torch.nn.Module):
    def __init__(self, reduction='mean', loss_weight=1.0):
        super().__init__()
        self.reduction = reduction
        self.loss_weight = loss_weight

    def forward(self, pred, target, weight=None, avg_factor=None, reduction_override=None):
        if weight is not None and not torch.any(weight > 0):
            if pred.dim() == weight.dim() + 1:
                weight = weight.unsqueeze(1)
            return (pred * weight).sum()
        assert reduction_override in (None, 'none', 'mean', 'sum')
        reduction = (reduction_override if reduction_override else self.reduction)
        loss_bbox = self.loss_weight * ref_l1_loss(pred, target, weight, reduction=reduction, avg_factor=avg_factor)
        return loss_bbox


class RefCenterHead:
    """CenterHead's target and loss code. Plumbing replaced: the constructor takes
    class_names / train_cfg directly; get_targets_single takes (boxes, labels) with
    boxes (K, 9) already gravity-centred (for `torch.cat((gt_bboxes_3d.gravity_center,
    gt_bboxes_3d.tensor[:, 3:]), dim=1)`); task_heads is just a range; loss_by_feat
    takes collated targets' inputs as (boxes, labels) pairs."""

    def __init__(self, class_names, train_cfg, norm_bbox=True):
        self.class_names = class_names
        self.train_cfg = train_cfg
        self.norm_bbox = norm_bbox
        self.task_heads = range(len(class_names))
        self.loss_cls = RefGaussianFocalLoss(reduction='mean')
        self.loss_bbox = RefL1Loss(reduction='mean', loss_weight=0.25)

    def _gather_feat(self, feat, ind, mask=None):
        dim = feat.size(2)
        ind = ind.unsqueeze(2).expand(ind.size(0), ind.size(1), dim)
        feat = feat.gather(1, ind)
        if mask is not None:
            mask = mask.unsqueeze(2).expand_as(feat)
            feat = feat[mask]
            feat = feat.view(-1, dim)
        return feat

    def get_targets(self, batch_gt_instances_3d):
        heatmaps, anno_boxes, inds, masks = zip(*[self.get_targets_single(*g) for g in batch_gt_instances_3d])
        # Transpose heatmaps
        heatmaps = list(map(list, zip(*heatmaps)))
        heatmaps = [torch.stack(hms_) for hms_ in heatmaps]
        # Transpose anno_boxes
        anno_boxes = list(map(list, zip(*anno_boxes)))
        anno_boxes = [torch.stack(anno_boxes_) for anno_boxes_ in anno_boxes]
        # Transpose inds
        inds = list(map(list, zip(*inds)))
        inds = [torch.stack(inds_) for inds_ in inds]
        # Transpose inds
        masks = list(map(list, zip(*masks)))
        masks = [torch.stack(masks_) for masks_ in masks]
        return heatmaps, anno_boxes, inds, masks

    def get_targets_single(self, gt_bboxes_3d, gt_labels_3d):
        device = gt_labels_3d.device
        max_objs = self.train_cfg['max_objs'] * self.train_cfg['dense_reg']
        grid_size = torch.tensor(self.train_cfg['grid_size']).to(device)
        pc_range = torch.tensor(self.train_cfg['point_cloud_range'])
        voxel_size = torch.tensor(self.train_cfg['voxel_size'])

        feature_map_size = grid_size[:2] // self.train_cfg['out_size_factor']

        # reorganize the gt_dict by tasks
        task_masks = []
        flag = 0
        for class_name in self.class_names:
            task_masks.append([
                torch.where(gt_labels_3d == class_name.index(i) + flag)
                for i in class_name
            ])
            flag += len(class_name)

        task_boxes = []
        task_classes = []
        flag2 = 0
        for idx, mask in enumerate(task_masks):
            task_box = []
            task_class = []
            for m in mask:
                task_box.append(gt_bboxes_3d[m])
                # 0 is background for each task, so we need to add 1 here.
                task_class.append(gt_labels_3d[m] + 1 - flag2)
            task_boxes.append(torch.cat(task_box, axis=0).to(device))
            task_classes.append(torch.cat(task_class).long().to(device))
            flag2 += len(mask)
        draw_gaussian = ref_draw_heatmap_gaussian
        heatmaps, anno_boxes, inds, masks = [], [], [], []

        for idx, task_head in enumerate(self.task_heads):
            heatmap = gt_bboxes_3d.new_zeros(
                (len(self.class_names[idx]), feature_map_size[1],
                 feature_map_size[0]))

            anno_box = gt_bboxes_3d.new_zeros((max_objs, 10),
                                              dtype=torch.float32)

            ind = gt_labels_3d.new_zeros((max_objs), dtype=torch.int64)
            mask = gt_bboxes_3d.new_zeros((max_objs), dtype=torch.uint8)

            num_objs = min(task_boxes[idx].shape[0], max_objs)

            for k in range(num_objs):
                cls_id = task_classes[idx][k] - 1

                length = task_boxes[idx][k][3]
                width = task_boxes[idx][k][4]
                length = length / voxel_size[0] / self.train_cfg[
                    'out_size_factor']
                width = width / voxel_size[1] / self.train_cfg[
                    'out_size_factor']

                if width > 0 and length > 0:
                    radius = ref_gaussian_radius(
                        (width, length),
                        min_overlap=self.train_cfg['gaussian_overlap'])
                    radius = max(self.train_cfg['min_radius'], int(radius))

                # be really careful for the coordinate system of
                # your box annotation.
                x, y, z = task_boxes[idx][k][0], task_boxes[idx][k][
                    1], task_boxes[idx][k][2]

                coor_x = (
                    x - pc_range[0]
                ) / voxel_size[0] / self.train_cfg['out_size_factor']
                coor_y = (
                    y - pc_range[1]
                ) / voxel_size[1] / self.train_cfg['out_size_factor']

                center = torch.tensor([coor_x, coor_y],
                                      dtype=torch.float32,
                                      device=device)
                center_int = center.to(torch.int32)

                # throw out not in range objects to avoid out of array
                # area when creating the heatmap
                if not (0 <= center_int[0] < feature_map_size[0]
                        and 0 <= center_int[1] < feature_map_size[1]):
                    continue

                draw_gaussian(heatmap[cls_id], center_int, radius)

                new_idx = k
                x, y = center_int[0], center_int[1]

                assert (y * feature_map_size[0] + x <
                        feature_map_size[0] * feature_map_size[1])

                ind[new_idx] = y * feature_map_size[0] + x
                mask[new_idx] = 1
                # TODO: support other outdoor dataset
                vx, vy = task_boxes[idx][k][7:]
                rot = task_boxes[idx][k][6]
                box_dim = task_boxes[idx][k][3:6]
                if self.norm_bbox:
                    box_dim = box_dim.log()
                anno_box[new_idx] = torch.cat([
                    center - torch.tensor([x, y], device=device),
                    z.unsqueeze(0), box_dim,
                    torch.sin(rot).unsqueeze(0),
                    torch.cos(rot).unsqueeze(0),
                    vx.unsqueeze(0),
                    vy.unsqueeze(0)
                ])

            heatmaps.append(heatmap)
            anno_boxes.append(anno_box)
            masks.append(mask)
            inds.append(ind)
        return heatmaps, anno_boxes, inds, masks

    def loss_by_feat(self, preds_dicts, batch_gt_instances_3d):
        heatmaps, anno_boxes, inds, masks = self.get_targets(
            batch_gt_instances_3d)
        loss_dict = dict()
        for task_id, preds_dict in enumerate(preds_dicts):
            # heatmap focal loss
            preds_dict[0]['heatmap'] = ref_clip_sigmoid(preds_dict[0]['heatmap'])
            num_pos = heatmaps[task_id].eq(1).float().sum().item()
            loss_heatmap = self.loss_cls(
                preds_dict[0]['heatmap'],
                heatmaps[task_id],
                avg_factor=max(num_pos, 1))
            target_box = anno_boxes[task_id]
            # reconstruct the anno_box from multiple reg heads
            preds_dict[0]['anno_box'] = torch.cat(
                (preds_dict[0]['reg'], preds_dict[0]['height'],
                 preds_dict[0]['dim'], preds_dict[0]['rot'],
                 preds_dict[0]['vel']),
                dim=1)

            # Regression loss for dimension, offset, height, rotation
            ind = inds[task_id]
            num = masks[task_id].float().sum()
            pred = preds_dict[0]['anno_box'].permute(0, 2, 3, 1).contiguous()
            pred = pred.view(pred.size(0), -1, pred.size(3))
            pred = self._gather_feat(pred, ind)
            mask = masks[task_id].unsqueeze(2).expand_as(target_box).float()
            isnotnan = (~torch.isnan(target_box)).float()
            mask *= isnotnan

            code_weights = self.train_cfg.get('code_weights', None)
            bbox_weights = mask * mask.new_tensor(code_weights)
            loss_bbox = self.loss_bbox(
                pred, target_box, bbox_weights, avg_factor=(num + 1e-4))
            loss_dict[f'task{task_id}.loss_heatmap'] = loss_heatmap
            loss_dict[f'task{task_id}.loss_bbox'] = loss_bbox
        return loss_dict


# ===========================================================================
# end of REFERENCE
# ===========================================================================

NUS = "centerpoint_pillar_nus"


@pytest.fixture(scope="module")
def nus_recipe():
    return load_recipe(NUS)


def ref_head(cfg, *, max_objs=500):
    v = cfg.voxelization
    train_cfg = dict(grid_size=list(v.grid_size), point_cloud_range=list(v.point_cloud_range),
                     voxel_size=list(v.voxel_size), out_size_factor=cfg.output_stride, dense_reg=1,
                     gaussian_overlap=0.1, max_objs=max_objs, min_radius=2, code_weights=list(ct.CODE_WEIGHTS))
    return RefCenterHead([list(t.class_names) for t in cfg.head.tasks], train_cfg)


def num_classes(cfg):
    return sum(len(t.class_names) for t in cfg.head.tasks)


def random_scene(cfg, seed, n=60):
    """Boxes meant to hit the edge cases: off the grid, within a cell of every border
    (both sides), several objects in one cell, every class, ignored labels."""
    rng = np.random.default_rng(seed)
    r = cfg.voxelization.point_cloud_range
    cell = cfg.voxelization.voxel_size[0] * cfg.output_stride
    inside = rng.uniform(r[0], r[3], (n, 2))
    xy = rng.uniform(r[0] - 5, r[3] + 5, (n, 2))
    border = rng.uniform(-0.99, 0.99, n) * cell
    a, b, c = n // 8, n // 4, n // 4 + 4
    xy[:a] = np.stack([r[0] + border[:a], inside[:a, 1]], 1)  # lower x edge, both sides
    xy[a:b] = np.stack([inside[a:b, 0], r[4] + border[a:b]], 1)  # upper y edge, both sides
    xy[c: c + 4] = inside[c: c + 4]
    xy[b:c] = xy[c: c + 4]  # pairs sharing a centre
    xy[n // 4 + 8] = [r[0] + 0.1, r[1] + 0.1]  # corners
    xy[n // 4 + 9] = [r[3] - 0.1, r[4] - 0.1]
    z = rng.uniform(-3, 2, (n, 1))
    dims = np.stack([rng.uniform(0.3, 12, n), rng.uniform(0.3, 4, n), rng.uniform(0.5, 4, n)], 1)
    yaw = rng.uniform(-np.pi, np.pi, (n, 1))
    boxes = np.concatenate([xy, z, dims, yaw], 1).astype(np.float32)
    labels = rng.integers(0, num_classes(cfg), n)
    labels[b:c] = labels[c: c + 4]  # of the same class
    labels[-2:] = [-1, num_classes(cfg)]  # claimed by no task
    vel = rng.normal(0, 3, (n, 2)).astype(np.float32)
    return boxes, labels, vel


def ref_inputs(boxes, labels, vel):
    return torch.from_numpy(np.concatenate([boxes, vel], 1).astype(np.float32)), torch.from_numpy(labels)


def assert_targets_equal(ours, ref):
    heatmaps, anno_boxes, inds, masks = ref
    assert len(ours) == len(heatmaps)
    for t, task in enumerate(ours):
        assert task.heatmap.dtype == torch.float32 and task.boxes.dtype == torch.float32
        assert task.inds.dtype == torch.int64 and task.mask.dtype == torch.uint8
        assert torch.equal(task.heatmap, heatmaps[t]), f"task{t} heatmap"
        assert torch.equal(task.boxes, anno_boxes[t]), f"task{t} boxes"
        assert torch.equal(task.inds, inds[t]), f"task{t} inds"
        assert torch.equal(task.mask, masks[t]), f"task{t} mask"


def test_gaussian_radius_matches_mmdet3d_bitwise():
    rng = np.random.default_rng(0)
    for overlap in (0.1, 0.5, 0.7):
        for h, w in rng.uniform(0.05, 40, (200, 2)).astype(np.float32):
            ref = ref_gaussian_radius((torch.tensor(h), torch.tensor(w)), overlap)
            assert ct.gaussian_radius((h, w), overlap) == float(ref)
    # The slips are kept: for a 10 x 10 box at overlap 0.7 mmdet3d's min(r1, r2, r3)
    # is r3 = (b3 + sq3) / 2 ~ 2.73 cells (r1 takes the larger root, ~19.1, r2 lacks
    # its 1/4, ~36.7); the corrected roots would give min(0.93, 0.82, 0.98) = 0.82.
    h = w = 10.0
    o = 0.7
    b3, sq3 = -2 * o * (h + w), math.sqrt((2 * o * (h + w)) ** 2 + 16 * o * (1 - o) * w * h)
    assert ct.gaussian_radius((h, w), o) == pytest.approx((b3 + sq3) / 2, rel=1e-6)
    assert ct.gaussian_radius((h, w), o) == pytest.approx(2.733, abs=1e-3)


@pytest.mark.parametrize("radius", [0, 1, 2, 5])
def test_draw_heatmap_gaussian_matches_mmdet3d(radius):
    rng = np.random.default_rng(radius)
    ours, ref = torch.zeros(13, 17), torch.zeros(13, 17)
    for x, y in [(0, 0), (16, 12), (8, 6), (1, 11), (15, 1), (8, 7)]:
        k = float(rng.uniform(0.5, 1))
        ct.draw_heatmap_gaussian(ours, (x, y), radius, k)
        ref_draw_heatmap_gaussian(ref, torch.tensor([x, y], dtype=torch.int32), radius, k)
        assert torch.equal(ours, ref)
    assert np.array_equal(ct.gaussian_2d((7, 5), 1.3), ref_gaussian_2d((7, 5), 1.3))


@pytest.mark.parametrize("recipe_name, seed, max_objs", [
    ("centerpoint_pillar_small", 0, 500),
    ("centerpoint_pillar_small", 1, 500),
    ("centerpoint_pillar_small", 2, 7),  # cut before off-grid objects are dropped
    (NUS, 3, 500),
])
def test_targets_equal_mmdet3d(recipe_name, seed, max_objs):
    cfg = load_recipe(recipe_name).model
    boxes, labels, vel = random_scene(cfg, seed)
    ours = ct.targets(cfg, boxes, labels, vel, max_objs=max_objs)
    ref = ref_head(cfg, max_objs=max_objs).get_targets_single(*ref_inputs(boxes, labels, vel))
    assert_targets_equal(ours, ref)
    # The scene does reach the cases it is meant to.
    masks = torch.cat([t.mask for t in ours])
    assert 0 < int(masks.sum()) < len(boxes) - 2
    assert sum(bool(t.mask.any()) for t in ours) >= 2
    if max_objs == 500:
        offsets = torch.cat([t.boxes[t.mask.bool(), :2] for t in ours])
        assert (offsets < 0).any(), "no centre in the (-1, 0) cell band below the grid"
        inds = torch.cat([t.inds[t.mask.bool()] + 10_000 * i for i, t in enumerate(ours)])
        assert len(inds.unique()) < len(inds), "no two objects in one cell"


def test_targets_without_velocity_and_empty(small_recipe):
    cfg = small_recipe.model
    boxes, labels, vel = random_scene(cfg, 4)
    ours = ct.targets(cfg, boxes, labels)
    ref = ref_head(cfg).get_targets_single(*ref_inputs(boxes, labels, np.zeros_like(vel)))
    assert_targets_equal(ours, ref)
    empty = ct.targets(cfg, np.zeros((0, 7), np.float32), np.zeros(0, np.int64))
    assert all(not t.mask.any() and not t.heatmap.any() for t in empty)


def test_zero_size_boxes_are_skipped(small_recipe):
    # mmdet3d 1.0.0rc skips them; 1.x would reuse the previous object's radius.
    cfg = small_recipe.model
    boxes = np.array([[0, 0, 0, 0, 2, 1, 0], [5, 5, 0, 2, 2, 1, 0]], np.float32)
    out = ct.targets(cfg, boxes, np.array([0, 0]))
    assert out[0].mask.tolist()[:2] == [0, 1]
    assert int((out[0].heatmap == 1).sum()) == 1


def test_targets_rejects_bad_shapes(small_recipe):
    cfg = small_recipe.model
    with pytest.raises(ValueError, match=r"\(K, 7\)"):
        ct.targets(cfg, np.zeros((2, 9)), np.zeros(2, np.int64))
    with pytest.raises(ValueError, match="labels"):
        ct.targets(cfg, np.zeros((2, 7)), np.zeros(2))
    with pytest.raises(ValueError, match="velocities"):
        ct.targets(cfg, np.zeros((2, 7)), np.zeros(2, np.int64), np.zeros((2, 3)))


def random_outputs(cfg, batch, seed, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    w, h = ct.feature_map_size(cfg)
    out = {}
    for t, task in enumerate(cfg.head.tasks):
        chans = {**{k: c for k, (c, _) in cfg.head.common_heads.items()}, "heatmap": len(task.class_names)}
        for name, c in chans.items():
            x = torch.randn(batch, c, h, w, generator=g) * (2.0 if name == "heatmap" else 1.0)
            out[f"task{t}.{name}"] = x.requires_grad_(requires_grad)
    return out


def ref_loss(cfg, outputs, scenes):
    preds = [[{k.split(".", 1)[1]: v.detach().clone() for k, v in outputs.items() if k.startswith(f"task{t}.")}]
             for t in range(len(cfg.head.tasks))]
    gts = [ref_inputs(*s) for s in scenes]
    return ref_head(cfg).loss_by_feat(preds, gts)


@pytest.mark.parametrize("recipe_name", ["centerpoint_pillar_small", NUS])
def test_loss_matches_mmdet3d(recipe_name):
    cfg = load_recipe(recipe_name).model
    scenes = [random_scene(cfg, 10), random_scene(cfg, 11, n=30)]
    outputs = random_outputs(cfg, len(scenes), 0)
    tgts = ct.collate([ct.targets(cfg, *s) for s in scenes])
    ours = ct.loss(cfg, outputs, tgts)
    ref = ref_loss(cfg, outputs, scenes)
    assert set(ours) == {f"task{t}.{k}" for t in range(len(cfg.head.tasks)) for k in ("heatmap", "bbox")} | {"total"}
    for t in range(len(cfg.head.tasks)):
        for k in ("heatmap", "bbox"):
            assert ours[f"task{t}.{k}"].item() == pytest.approx(ref[f"task{t}.loss_{k}"].item(), rel=1e-6)
    assert ours["total"].item() == pytest.approx(sum(v.item() for v in ref.values()), rel=1e-6)


def test_loss_with_a_task_without_objects(small_recipe):
    cfg = small_recipe.model
    boxes = np.array([[1.0, 2.0, 0.0, 4.0, 2.0, 1.5, 0.3]], np.float32)
    scenes = [(boxes, np.array([0]), np.zeros((1, 2), np.float32))]  # nothing for task 1
    outputs = random_outputs(cfg, 1, 1, requires_grad=True)
    ours = ct.loss(cfg, outputs, ct.collate([ct.targets(cfg, *s) for s in scenes]))
    ref = ref_loss(cfg, outputs, scenes)
    assert ours["task1.bbox"].item() == 0.0 == ref["task1.loss_bbox"].item()
    for k in ("task0.heatmap", "task0.bbox", "task1.heatmap"):
        assert ours[k].item() == pytest.approx(ref[k.replace(".", ".loss_")].item(), rel=1e-6)
    ours["total"].backward()
    assert outputs["task1.reg"].grad.abs().sum() == 0 and outputs["task0.reg"].grad.abs().sum() > 0


def test_loss_gradient_step_reduces_it(small_recipe):
    cfg = small_recipe.model
    scenes = [random_scene(cfg, 20), random_scene(cfg, 21)]
    tgts = ct.collate([ct.targets(cfg, *s) for s in scenes])
    outputs = random_outputs(cfg, 2, 2, requires_grad=True)
    opt = torch.optim.SGD(list(outputs.values()), lr=5.0)
    history = []
    for _ in range(10):
        opt.zero_grad()
        losses = ct.loss(cfg, outputs, tgts)
        losses["total"].backward()
        assert all(v.grad is not None and torch.isfinite(v.grad).all() for v in outputs.values())
        history.append({k: v.item() for k, v in losses.items()})
        opt.step()
    assert history[1]["total"] < history[0]["total"]
    assert all(history[-1][k] < history[0][k] for k in history[0])
    assert history[-1]["total"] < 0.5 * history[0]["total"]


def test_loss_trains_the_model(small_recipe):
    from deploykit.models import build_model
    from tests.conftest import random_pillars

    cfg = small_recipe.model
    model = build_model(small_recipe).train()
    _, _, pillars, coords = random_pillars(small_recipe, 200, 20, seed=3)
    outputs = dict(zip(model.output_names, model(pillars, coords)))
    tgts = ct.collate([ct.targets(cfg, *random_scene(cfg, 30))])
    ct.loss(cfg, outputs, tgts)["total"].backward()
    head = model.pts_bbox_head.task_heads
    assert head[0].heatmap[-1].weight.grad.abs().sum() > 0 and head[1].vel[-1].weight.grad.abs().sum() > 0


def test_loss_rejects_mismatched_inputs(small_recipe, nus_recipe):
    cfg = small_recipe.model
    tgts = ct.collate([ct.targets(cfg, *random_scene(cfg, 40))])
    outputs = random_outputs(cfg, 1, 0)
    with pytest.raises(KeyError, match="task1.vel"):
        ct.loss(cfg, {k: v for k, v in outputs.items() if k != "task1.vel"}, tgts)
    with pytest.raises(ValueError, match="heatmap target"):
        ct.loss(cfg, {k: v[..., :8, :8] for k, v in outputs.items()}, tgts)
    with pytest.raises(ValueError, match="for 6 tasks"):
        ct.loss(nus_recipe.model, outputs, tgts)


@pytest.mark.parametrize("recipe_name", ["centerpoint_pillar_small", NUS])
def test_perfect_outputs_decode_back_to_the_boxes(recipe_name):
    cfg = load_recipe(recipe_name).model
    rng = np.random.default_rng(5)
    r = cfg.voxelization.point_cloud_range
    cell = cfg.voxelization.voxel_size[0] * cfg.output_stride
    w, h = ct.feature_map_size(cfg)
    # One object per cell, anywhere on the grid including the band below its lower edge.
    cells = rng.choice(w * h, 40, replace=False)
    xy = np.stack([cells % w, cells // w], 1) + rng.uniform(0, 1, (40, 2))
    xy = xy * cell + [r[0], r[1]]
    xy[0] = [r[0] - 0.5 * cell, r[1] + 3.3 * cell]
    boxes = np.concatenate([xy, rng.uniform(-2, 1, (40, 1)),
                            rng.uniform(0.4, 10, (40, 3)), rng.uniform(-np.pi, np.pi, (40, 1))], 1)
    labels = rng.integers(0, num_classes(cfg), 40)
    tasks = ct.targets(cfg, boxes, labels, rng.normal(0, 2, (40, 2)))
    dec = decode_centerpoint(cfg, ct.oracle_outputs(cfg, tasks))

    assert len(dec) == len(boxes)
    for box, label in zip(boxes, labels):
        i = int(np.argmin(np.linalg.norm(dec.centers[:, :2] - box[:2], axis=1)))
        np.testing.assert_allclose(dec.centers[i], box[:3], atol=1e-4, rtol=0)
        np.testing.assert_allclose(dec.dims[i], box[3:6], rtol=1e-5)
        assert abs((dec.yaw[i] - box[6] + np.pi) % (2 * np.pi) - np.pi) < 1e-5
        assert dec.labels[i] == label
