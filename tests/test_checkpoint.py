import sys
import types

import pytest
import torch

from deploykit.checkpoint import load_state_dict, read_checkpoint
from deploykit.errors import CheckpointError
from deploykit.models import build_model


@pytest.fixture(scope="module")
def state(small_model):
    return {k: v.clone() for k, v in small_model.state_dict().items()}


def fresh(small_recipe):
    return build_model(small_recipe)


def test_mmcv_style_file_loads(tmp_path, small_recipe, state):
    path = tmp_path / "ckpt.pth"
    torch.save({"meta": {"mmdet3d_version": "1.4.0", "epoch": 20}, "state_dict": state}, path)
    loaded, meta = read_checkpoint(path)
    assert meta == {"mmdet3d_version": "1.4.0", "epoch": 20}
    model = fresh(small_recipe)
    load_state_dict(model, loaded, source=str(path), recipe=small_recipe.name)
    torch.testing.assert_close(model.state_dict()["pts_backbone.blocks.0.0.weight"],
                               state["pts_backbone.blocks.0.0.weight"], rtol=0, atol=0)


def test_raw_and_ddp_and_safetensors_layouts(tmp_path, state):
    from safetensors.torch import save_file

    torch.save(state, tmp_path / "raw.pth")
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "ddp.pth")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    for name in ("raw.pth", "ddp.pth", "w.safetensors"):
        loaded, _ = read_checkpoint(tmp_path / name)
        assert set(loaded) == set(state), name


def _pickle_with_foreign_class(path, payload_factory):
    """Save ``payload_factory(cls)`` where cls lives in a module that is then removed."""
    mod = types.ModuleType("fake_mmengine_logging")

    class HistoryBuffer:
        def __init__(self):
            self.data = [1.0, 2.0]

    HistoryBuffer.__module__, HistoryBuffer.__qualname__ = "fake_mmengine_logging", "HistoryBuffer"
    mod.HistoryBuffer = HistoryBuffer
    sys.modules["fake_mmengine_logging"] = mod
    try:
        torch.save(payload_factory(HistoryBuffer), path)
    finally:
        del sys.modules["fake_mmengine_logging"]


def test_mmengine_bookkeeping_objects_are_dropped(tmp_path, state):
    # mmengine checkpoints pickle message_hub HistoryBuffers that weights_only refuses.
    path = tmp_path / "mmengine.pth"
    _pickle_with_foreign_class(path, lambda cls: {"state_dict": state, "message_hub": {"log": cls()},
                                                  "meta": {"note": "ok"}})
    with pytest.raises(Exception):  # plain weights_only load refuses it
        torch.load(path, weights_only=True)
    loaded, meta = read_checkpoint(path)
    assert set(loaded) == set(state)
    assert meta == {"note": "ok"}


def test_code_running_payload_is_refused_and_never_runs(tmp_path, state):
    import os

    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "hostile.pth"
    _pickle_with_foreign_class(path, lambda cls: {"state_dict": state, "hub": cls(), "x": Exploit()})
    with pytest.raises(CheckpointError, match="can run code; refusing to load it"):
        read_checkpoint(path)
    assert not marker.exists()


def test_key_report_lists_missing_unexpected_and_misshaped(small_recipe, state):
    broken = dict(state)
    del broken["pts_backbone.blocks.0.0.weight"]
    broken["pts_bbox_head.extra.weight"] = torch.zeros(1)
    broken["pts_voxel_encoder.pfn_layers.0.linear.weight"] = torch.zeros(16, 10)
    with pytest.raises(CheckpointError) as err:
        load_state_dict(fresh(small_recipe), broken, source="x.pth", recipe=small_recipe.name)
    msg = str(err.value)
    assert msg.splitlines()[0].startswith("checkpoint x.pth does not fit recipe centerpoint_pillar_small")
    assert "1 missing, 1 unexpected, 1 with another shape" in msg
    assert "missing: pts_backbone.blocks.0.0.weight" in msg
    assert "unexpected: pts_bbox_head.extra.weight" in msg
    assert "pts_voxel_encoder.pfn_layers.0.linear.weight is [16, 10] in the checkpoint, the recipe builds [16, 11]" in msg


def test_checkpoint_of_another_model_is_named(small_recipe):
    bevformer = {"img_backbone.conv1.weight": torch.zeros(64, 3, 7, 7),
                 "pts_bbox_head.transformer.encoder.layers.0.attentions.0.sampling_offsets.weight": torch.zeros(8, 8)}
    with pytest.raises(CheckpointError, match="looks like BEVFormer") as err:
        load_state_dict(fresh(small_recipe), bevformer, source="bevformer.pth", recipe=small_recipe.name)
    assert "\n" not in str(err.value)


def test_bigger_recipe_checkpoint_reports_shapes(small_recipe):
    from deploykit.recipe import load_recipe

    nus = build_model(load_recipe("centerpoint_pillar_nus")).state_dict()
    with pytest.raises(CheckpointError, match="with another shape") as err:
        load_state_dict(fresh(small_recipe), nus, source="nus.pth", recipe=small_recipe.name)
    assert "recipe's sizes differ" in str(err.value)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", None])
def test_unreadable_files(tmp_path, state, content):
    path = tmp_path / "bad.pth"
    if content is None:  # a real checkpoint cut in half
        torch.save({"state_dict": state}, path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match="truncated or not a PyTorch checkpoint"):
        read_checkpoint(path)


def test_missing_file_and_non_dict(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint(tmp_path / "nope.pth")
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    with pytest.raises(CheckpointError, match="not a state dict"):
        read_checkpoint(tmp_path / "tensor.pth")
    torch.save({"meta": {"a": 1}}, tmp_path / "log.pth")
    with pytest.raises(CheckpointError, match="no tensors"):
        read_checkpoint(tmp_path / "log.pth")
