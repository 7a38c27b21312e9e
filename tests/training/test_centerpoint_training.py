import numpy as np
import torch

from deploykit.detection.evaluate import points_in_boxes
from deploykit.models import ARCHITECTURES, build_model
from deploykit.preprocess.pillar_inputs import pillar_inputs
from deploykit.preprocess.synthetic_lidar import make_scene
from deploykit.recipe import load_recipe
from deploykit.training.centerpoint import TrainConfig, augment, forward_batch, train


def test_augmentation_moves_points_and_boxes_together():
    scene = make_scene(3, point_cloud_range=(-25.6, -25.6, -5.0, 25.6, 25.6, 3.0))
    before = points_in_boxes(scene.points, scene.boxes)
    assert before.sum() > 100
    for seed in range(8):  # covers both flips, alone and together
        points, boxes = augment(scene, np.random.default_rng(seed))
        assert not np.allclose(points, scene.points)
        np.testing.assert_array_equal(points_in_boxes(points, boxes), before)
        assert (np.abs(boxes[:, 6]) <= np.pi).all()


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
