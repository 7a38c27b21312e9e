import itertools
import numpy as np
import pytest
import torch

from deploykit.detection.decode import decode_bevformer
from deploykit.detection.evaluate import points_in_boxes
from deploykit.export import load_model
from deploykit.preprocess.synthetic_lidar import make_scene
from deploykit.recipe import REPO_ROOT, load_recipe
from deploykit.synthetic_checkpoint import synthetic_state_dict
from deploykit.training import bevfusion as tb

CHECKPOINT = REPO_ROOT / "checkpoints" / "bevfusion_small.pth"


@pytest.fixture(scope="module")
def recipe():
    return load_recipe("bevfusion_small")


def test_box_codes_round_trip_through_decode_bevformer(recipe):
    cfg = recipe.model.camera
    scene = make_scene(5, point_cloud_range=tuple(cfg.pc_range))
    # Headings on and past every branch cut of the 0.17 conversion (rot = -yaw - pi/2).
    extra = np.array([[1.0, -2.0, -1.0, 4.0, 1.8, 1.5, yaw] for yaw in
                      (np.pi, -np.pi, np.pi / 2, -np.pi / 2, 0.0, 3.0, -3.1, 2 * np.pi - 0.1)], np.float32)
    boxes = np.concatenate([scene.boxes, extra])
    labels = np.arange(len(boxes)) % cfg.num_classes
    k = len(boxes)
    assert k <= cfg.num_query
    cls = np.full((1, cfg.num_query, cfg.num_classes), -20.0, np.float32)
    # Falling scores so decode's top-k order is the boxes' order.
    cls[0, np.arange(k), labels] = np.linspace(10.0, 5.0, k)
    bbox = np.zeros((1, cfg.num_query, 10), np.float32)
    bbox[0, :k] = tb.encode_boxes(boxes)
    dec = decode_bevformer(cfg, {"cls_scores": cls, "bbox_preds": bbox})
    np.testing.assert_array_equal(dec.labels[:k], labels)
    np.testing.assert_allclose(dec.centers[:k], boxes[:, :3], atol=1e-5)
    np.testing.assert_allclose(dec.dims[:k], boxes[:, 3:6], rtol=1e-5)
    turn = np.angle(np.exp(1j * (dec.yaw[:k] - boxes[:, 6])))  # the difference modulo 2 pi, in (-pi, pi]
    np.testing.assert_allclose(turn, 0.0, atol=1e-5)
    np.testing.assert_array_equal(dec.velocity[:k], 0.0)  # static scenes


def _focal_cost(logit: float, alpha=0.25, gamma=2.0, eps=1e-12) -> float:
    p = 1 / (1 + np.exp(-logit))
    return -np.log(p + eps) * alpha * (1 - p) ** gamma + np.log(1 - p + eps) * (1 - alpha) * p ** gamma


def test_hungarian_matching_is_the_brute_force_optimum():
    gen = torch.Generator().manual_seed(3)
    q, k, c = 5, 3, 3
    logits = torch.randn(q, c, generator=gen) * 2
    bbox = torch.randn(q, 10, generator=gen) * 3
    labels = torch.tensor([2, 0, 2])
    codes = torch.randn(k, 10, generator=gen) * 3
    # The assigner's cost written out per pair: 2 x focal cost of the box's class + 0.25 x L1 on 8 entries.
    want = np.array([[2.0 * _focal_cost(float(logits[i, labels[j]]))
                      + 0.25 * float((bbox[i, :8] - codes[j, :8]).abs().sum()) for j in range(k)] for i in range(q)])
    np.testing.assert_allclose(tb.match_cost(logits, bbox, labels, codes).numpy(), want, rtol=1e-5, atol=1e-5)
    rows, cols = tb.hungarian_match(logits, bbox, labels, codes)
    got = {int(j): int(i) for i, j in zip(rows, cols)}
    assert sorted(got) == list(range(k)) and len(set(got.values())) == k
    best = min(itertools.permutations(range(q), k), key=lambda qs: sum(want[qi, j] for j, qi in enumerate(qs)))
    assert tuple(got[j] for j in range(k)) == best
    empty = tb.hungarian_match(logits, bbox, labels[:0], codes[:0])
    assert len(empty[0]) == len(empty[1]) == 0


def test_augmentation_moves_points_boxes_and_heading_together(recipe):
    scene = make_scene(3, point_cloud_range=tuple(recipe.model.camera.pc_range))
    before = points_in_boxes(scene.points, scene.boxes)
    assert before.sum() > 100
    for seed in range(6):
        moved = tb.augment(scene, np.random.default_rng(seed))
        assert not np.allclose(moved.points, scene.points)
        np.testing.assert_array_equal(points_in_boxes(moved.points, moved.boxes), before)
        np.testing.assert_array_equal(moved.labels, scene.labels)
        # Flips and a rotation keep every box's size and the ground plane's height.
        np.testing.assert_array_equal(moved.boxes[:, 2:6], scene.boxes[:, 2:6])
        np.testing.assert_array_equal(moved.points[:, 2:], scene.points[:, 2:])


def test_a_few_steps_lower_the_loss_and_leave_the_camera_stream_alone(recipe):
    cfg = recipe.model
    synthetic = synthetic_state_dict(recipe, 0)
    model = tb.initial_model(recipe)
    tc = tb.TrainConfig(scenes=2)
    pool = tb.frame_pool(model, cfg, tb.pool_seeds(tc), progress=False)
    batch = tb.make_batch(cfg, pool, None)
    weights = tb.occupancy_class_weights(tb.label_counts(cfg, pool))

    def loss_of(m):
        # As training sees it: batch statistics in the trained BatchNorms (their running
        # averages, momentum 0.01, barely move in a few steps). Each model is used once, so
        # the running averages this updates are never read.
        tb.set_train_mode(m)
        with torch.no_grad():
            return {k: float(v) for k, v in tb.losses(m, batch, weights).items()}

    before = loss_of(model)
    state, log = tb.train(recipe, steps=24, seed=tc.seed, log_every=12, progress=False, scenes=2, batch_size=2,
                          warmup=4)
    trained = tb.initial_model(recipe)
    trained.load_state_dict(state)
    after = loss_of(trained)
    assert after["total"] < 0.8 * before["total"]
    assert after["occ"] < before["occ"] and after["cls"] < before["cls"]
    assert len(log["history"]) == 2 and log["history"][-1]["total"] < log["history"][0]["total"]

    camera = [k for k in synthetic if k.split(".")[0] in tb.FROZEN]
    assert len(camera) > 50
    for key in camera:
        assert torch.equal(state[key], synthetic[key]), key
    for part in log["trained"]:
        assert any(not torch.equal(state[k], synthetic[k]) for k in synthetic if k.startswith(part + ".")), part
    assert set(log["trained"]) >= {"pts_backbone", "fusion_module", "det_head", "occ_head"}


def test_committed_checkpoint_predicts_occupancy(recipe, monkeypatch):
    # The path as a user types it, from the repository root (tools/train_synthetic_bevfusion.py made it).
    monkeypatch.chdir(REPO_ROOT)
    model, path, meta = load_model(load_recipe("bevfusion_small"), "checkpoints/bevfusion_small.pth")
    assert path.resolve() == CHECKPOINT.resolve()
    assert meta["trained"] is True and not meta.get("synthetic")
    assert meta["recipe"] == recipe.name
    # Four held-out scenes: the trained head scores well above the bound, the stand-in weights
    # (every voxel free) at 0.
    bound = 0.3
    trained = tb.evaluate_model(recipe, model, scenes=4)
    untrained = tb.evaluate_model(recipe, tb.initial_model(recipe), scenes=4)
    assert trained["mIoU"] > bound > untrained["mIoU"]
    assert trained["occupancy"]["per_class"]["car"] > 0.3
    assert trained["mAP"] > 0.3 > untrained["mAP"]
