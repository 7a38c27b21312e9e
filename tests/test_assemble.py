"""A fused checkpoint from its parts (camera=, lidar=, fused=) and the messages when parts are missing."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from deploykit.assemble import parse_parts
from deploykit.cli import main
from deploykit.errors import CheckpointError
from deploykit.models.bevformer import BEVFormer
from deploykit.models.centerpoint_pillar import CenterPointPillar, CenterPointPillarConfig, HeadConfig, TaskConfig


@pytest.fixture(scope="module")
def parts(tmp_path_factory, fused_recipe, fused_model):
    """A BEVFormer release checkpoint, an mmdet3d CenterPoint one and the fused heads,
    whose weights are the fused model's (so the assembly must reproduce it exactly)."""
    d = tmp_path_factory.mktemp("parts")
    cfg, state = fused_recipe.model, fused_model.state_dict()
    camera = BEVFormer(cfg.camera)
    cam = {k: state[k] if k in state else state["det_head." + k[len("pts_bbox_head."):]]
           for k in camera.state_dict()}
    torch.save({"meta": {"mmdet_version": "2.x"}, "state_dict": cam}, d / "bevformer.pth")
    lidar_cfg = CenterPointPillarConfig(**{f: getattr(cfg.lidar, f) for f in ("voxelization", "pillar_encoder",
                                                                             "backbone", "neck", "points")},
                                        head=HeadConfig(tasks=(TaskConfig(("car",)),), common_heads={"reg": (2, 2)}))
    lid = {k: state.get(k, v) for k, v in CenterPointPillar(lidar_cfg).state_dict().items()}
    torch.save({"state_dict": lid}, d / "centerpoint.pth")
    torch.save({k: v for k, v in state.items() if k.startswith(("fusion_module.", "occ_head."))}, d / "heads.pth")
    return d


def test_parts_make_the_fused_model_and_the_report_says_where_keys_came_from(parts, fused_recipe, fused_model):
    from deploykit.export import load_model

    model, _, meta = load_model(fused_recipe, {"camera": parts / "bevformer.pth", "lidar": parts / "centerpoint.pth",
                                               "fused": parts / "heads.pth"})
    for k, v in fused_model.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    lines = "\n".join(meta["assembly"])
    assert "camera: camera stream 173, detection head 80 keys" in lines  # BEVFormer's decoder becomes det_head
    assert "lidar: LiDAR stream 78 keys" in lines and "fused: fusion 16, occupancy head 6 keys" in lines
    assert "lidar: 22 keys not used (pts_bbox_head.shared_conv" in lines  # its CenterHead: the recipe detects with DETR
    assert set(meta["parts"]) == {"camera", "lidar", "fused"} and all(len(p["sha256"]) == 64
                                                                         for p in meta["parts"].values())


def test_missing_parts_are_listed_by_stream(parts, fused_recipe):
    from deploykit.export import load_model

    with pytest.raises(CheckpointError, match=r"(?s)do not make the whole model.*missing fusion: 16 keys.*"
                                              r"missing occupancy head: 6 keys.*--checkpoint fused=PATH"):
        load_model(fused_recipe, {"camera": parts / "bevformer.pth", "lidar": parts / "centerpoint.pth"})


def test_a_part_in_the_wrong_slot_is_named_for_what_it_is(parts, fused_recipe):
    from deploykit.export import load_model

    with pytest.raises(CheckpointError, match=r"given as camera= holds no BEVFormer camera stream.*CenterPoint-"
                                              r"PointPillars.*\(pass it as lidar=\)"):
        load_model(fused_recipe, {"camera": parts / "centerpoint.pth", "lidar": parts / "centerpoint.pth"})
    with pytest.raises(CheckpointError, match=r"given as lidar= .*\(pass it as camera=\)"):
        load_model(fused_recipe, {"lidar": parts / "bevformer.pth"})


def test_one_stream_alone_gets_one_message_with_what_is_there(parts, fused_recipe):
    from deploykit.export import load_model

    with pytest.raises(CheckpointError) as info:
        load_model(fused_recipe, parts / "bevformer.pth")
    msg = str(info.value)
    assert "it holds camera stream 173 keys (it looks like BEVFormer" in msg
    assert "missing LiDAR stream: 78 keys" in msg and "missing occupancy head: 6 keys" in msg
    assert "assemble it with --checkpoint camera=BEVFORMER.pth --checkpoint lidar=CENTERPOINT.pth" in msg


def test_parse_parts():
    assert parse_parts(()) is None
    assert str(parse_parts(["a.pth"])) == "a.pth"
    assert {k: str(v) for k, v in parse_parts(["camera=a.pth", "lidar=b.pth"]).items()} == {"camera": "a.pth",
                                                                                          "lidar": "b.pth"}
    with pytest.raises(CheckpointError, match="need a part each"):
        parse_parts(["a.pth", "b.pth"])
    with pytest.raises(CheckpointError, match="has no part"):
        parse_parts(["camera=a.pth", "b.pth"])
    with pytest.raises(CheckpointError, match="given twice"):
        parse_parts(["camera=a.pth", "camera=b.pth"])


def test_cli_assembles_and_records_the_parts(tmp_path, parts):
    out = tmp_path / "fused"
    result = CliRunner().invoke(main, ["convert", "-r", "bevfusion_small", "-o", str(out), "-c",
                                       f"camera={parts / 'bevformer.pth'}", "-c", f"lidar={parts / 'centerpoint.pth'}",
                                       "-c", f"fused={parts / 'heads.pth'}"])
    assert result.exit_code == 0, result.output
    assert "camera: camera stream 173, detection head 80 keys" in result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["checkpoint"]["meta"]["parts"]) == {"camera", "lidar", "fused"}
    result = CliRunner().invoke(main, ["convert", "-r", "centerpoint_pillar_small", "-o", str(tmp_path / "x"), "-c",
                                       f"lidar={parts / 'centerpoint.pth'}"])
    assert result.exit_code != 0 and "assembles a fused model" in result.output
    assert not (tmp_path / "x").exists()
