import numpy as np
import pytest

from deploykit.engines import ort
from deploykit.errors import InputError
from deploykit.preprocess.camera_inputs import synthetic_scene
from deploykit.temporal.ego_motion import relative_can_bus, rotate_bev
from deploykit.temporal.runner import SequenceRunner, TorchEngine


class Recorder:
    def __init__(self, engine):
        self.engine, self.feeds = engine, []

    def run(self, feeds):
        self.feeds.append(feeds)
        return self.engine.run(feeds)


def test_runner_carries_state_like_forward_test(bev_model):
    cfg = bev_model.config
    frames = synthetic_scene(cfg, "a", 3, 1) + synthetic_scene(cfg, "b", 2, 2)
    engine = Recorder(TorchEngine(bev_model))
    outs = SequenceRunner(engine, cfg).run(frames)
    assert [f["use_prev_bev"][0] for f in engine.feeds] == [0, 1, 1, 0, 1]
    # First frames: no previous BEV, pose and heading zeroed.
    for k in (0, 3):
        assert not engine.feeds[k]["prev_bev"].any() and not engine.feeds[k]["shift"].any()
        assert engine.feeds[k]["can_bus"][0, [0, 1, 2, 17]].tolist() == [0, 0, 0, 0]
    # Later frames: the previous output, rotated by the heading change.
    rel, _ = relative_can_bus(frames[1].can_bus, relative_can_bus(frames[0].can_bus, None)[1])
    assert rel[-1] == pytest.approx(2.0)
    expected = rotate_bev(outs[0]["bev_embed"], rel[-1], bev_h=cfg.bev_h, bev_w=cfg.bev_w, center=cfg.rotate_center)
    np.testing.assert_array_equal(engine.feeds[1]["prev_bev"], expected)
    assert engine.feeds[1]["shift"].any()


def test_gap_in_a_scene_is_a_missing_previous_bev(bev_model):
    cfg = bev_model.config
    frames = synthetic_scene(cfg, "a", 3, 1)
    runner = SequenceRunner(TorchEngine(bev_model), cfg)
    runner.step(frames[0])
    with pytest.raises(InputError, match="frame 2 follows frame 0, so the previous BEV it needs \\(frame 1\\) is missing"):
        runner.step(frames[2])
    runner.reset()
    assert runner.feeds(frames[2])["use_prev_bev"][0] == 0


def test_deployed_engine_follows_pytorch_over_a_sequence(bev_model, bev_converted_dir):
    # The converted ONNX (virtual-BEV SCA, conv mean, MSDA custom op) in ONNX Runtime,
    # against the original PyTorch model, both carrying their own state.
    cfg = bev_model.config
    frames = synthetic_scene(cfg, "a", 4, 5) + synthetic_scene(cfg, "b", 2, 6)
    torch_outs = SequenceRunner(TorchEngine(bev_model), cfg).run(frames)
    ort_outs = SequenceRunner(ort.build(bev_converted_dir / "model.onnx"), cfg).run(frames)
    for t, o in zip(torch_outs, ort_outs):
        for name in t:
            scale = np.abs(t[name]).max()
            assert np.abs(t[name] - o[name]).max() <= 1e-4 * scale, name
