import numpy as np
import torch

from deploykit.detection.evaluate import points_in_boxes
from deploykit.detection import centerpoint_targets as ct
from deploykit.detection.decode import decode_centerpoint
from deploykit.models import ARCHITECTURES, build_model
from deploykit.preprocess.pillar_inputs import pillar_inputs
from deploykit.preprocess.synthetic_lidar import Scene, make_scene
from deploykit.recipe import load_recipe
from deploykit.training.centerpoint import TrainConfig, augment, forward_batch, train


def test_augmentation_moves_points_and_boxes_together():
    scene = make_scene(3, point_cloud_range=(-25.6, -25.6, -5.0, 25.6, 25.6, 3.0))
    before = points_in_boxes(scene.points, scene.boxes)
    assert before.sum() > 100
    for seed in range(9):  # covers both flips, alone and together (seed 8: the y mirror alone)
        points, boxes = augment(scene, np.random.default_rng(seed))
        assert not np.allclose(points, scene.points)
        np.testing.assert_array_equal(points_in_boxes(points, boxes), before)
        assert (np.abs(boxes[:, 6]) <= np.pi).all()


def test_augmented_heading_follows_the_points_through_targets_and_decode():
    # points_in_boxes (above) cannot tell a heading from its opposite: a box is the same
    # set for yaw and yaw + pi. Mark each box's front with a point just inside its front
    # face, then the yaw the training targets encode (decoded as the deployed model's
    # outputs would be) must point at where augmentation moved that marker, for every
    # combination of flips.
    cfg = load_recipe("centerpoint_pillar_synth").model
    scene = make_scene(3, point_cloud_range=tuple(cfg.voxelization.point_cloud_range))
    b = scene.boxes
    heading = np.stack([np.cos(b[:, 6]), np.sin(b[:, 6])], 1)
    front = np.zeros((len(b), 5), np.float32)
    front[:, :2] = b[:, :2] + (0.45 * b[:, 3:4]) * heading
    front[:, 2] = b[:, 2]
    marked = Scene(np.concatenate([scene.points, front]), b, scene.labels)
    flips = set()
    for seed in range(9):
        rng = np.random.default_rng(seed)
        flips.add((rng.random() < 0.5, rng.random() < 0.5))  # augment's two flip draws, in its order
        points, boxes = augment(marked, np.random.default_rng(seed))
        moved = points[-len(b):, :2] - boxes[:, :2]
        moved /= np.linalg.norm(moved, axis=1, keepdims=True)
        np.testing.assert_allclose(moved, np.stack([np.cos(boxes[:, 6]), np.sin(boxes[:, 6])], 1), atol=1e-4)

        dec = decode_centerpoint(cfg, ct.oracle_outputs(cfg, ct.targets(cfg, boxes, scene.labels)))
        checked = 0
        for box, direction in zip(boxes, moved):
            i = int(np.argmin(np.linalg.norm(dec.centers[:, :2] - box[:2], axis=1)))
            if np.linalg.norm(dec.centers[i, :2] - box[:2]) > 1e-3:
                continue  # shares its cell with another object; oracle_outputs keeps one per cell
            np.testing.assert_allclose([np.cos(dec.yaw[i]), np.sin(dec.yaw[i])], direction, atol=1e-4)
            checked += 1
        assert checked >= len(b) - 2
    assert flips == {(False, False), (False, True), (True, False), (True, True)}


def test_batched_forward_is_the_model_on_each_sample():
    recipe = load_recipe("centerpoint_pillar_small")
    cfg = recipe.model
    model = build_model(recipe)
    inputs = [pillar_inputs(make_scene(s, point_cloud_range=tuple(cfg.voxelization.point_cloud_range)).points, cfg,
                            "PNC") for s in (0, 1)]
    with torch.no_grad():
        batched = forward_batch(model, [i.pillars_pnc for i in inputs], [i.coords for i in inputs])
        for b, i in enumerate(inputs):
            single = model(torch.from_numpy(i.pillars_pnc), torch.from_numpy(i.coords))
            for name, out in zip(model.output_names, single):
                torch.testing.assert_close(batched[name][b:b + 1], out, rtol=1e-5, atol=1e-5)


def test_a_few_steps_reduce_the_loss():
    recipe = load_recipe("centerpoint_pillar_small")
    torch.manual_seed(0)  # the default init draws from the global generator
    model = build_model(recipe)
    ARCHITECTURES[recipe.arch].synthetic_init(model, recipe.model, torch.Generator().manual_seed(0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    history = train(model, recipe.model, TrainConfig(steps=16, scenes=6, batch_size=2, log_every=8), progress=False)
    assert [h["step"] for h in history] == [8, 16]
    assert history[-1]["total"] < 0.9 * history[0]["total"]
    assert not model.training
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
