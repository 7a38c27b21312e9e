"""--rig on convert and quantize: the rig is part of the model, copied into the converted directory."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from deploykit.camera import rig as rig_module
from deploykit.camera.rig import camera_looking
from deploykit.cli import main


def _rig(tmp_path, name, edit):
    data = json.loads((rig_module.RIGS_DIR / "nuscenes_surround.json").read_text())
    edit(data)
    data["name"] = name
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(data))
    return path


def _y_forward(data):
    """The same cameras in a LiDAR frame with y forward (nuScenes LIDAR_TOP)."""
    rz = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    for c in data["cameras"]:
        c["sensor2lidar_rotation"] = (rz @ np.array(c["sensor2lidar_rotation"])).tolist()
        c["sensor2lidar_translation"] = (rz @ np.array(c["sensor2lidar_translation"])).tolist()


def test_convert_with_a_rig_and_quantize_checks_it(tmp_path):
    cli = CliRunner()
    rig = _rig(tmp_path, "y_forward", _y_forward)
    out = tmp_path / "conv"
    result = cli.invoke(main, ["convert", "-r", "bevformer_small", "--rig", str(rig), "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rig"]["file"] == "rig.json" and manifest["rig"]["source"] == str(rig.resolve())
    assert json.loads((out / "rig.json").read_text())["name"] == "y_forward"
    # Every camera sees a good share of the grid: a y-forward rig is as valid as an x-forward one.
    assert min(manifest["rig"]["bev_coverage"].values()) > 0.1

    refused = cli.invoke(main, ["quantize", "-m", str(out), "-o", str(tmp_path / "q"), "--rig", "nuscenes_surround"])
    assert refused.exit_code == 6 and "is not the rig" in refused.output and "convert again" in refused.output
    assert not (tmp_path / "q").exists()


def test_a_camera_that_sees_nothing_is_a_rig_error_and_a_weak_one_a_warning(tmp_path):
    cli = CliRunner()

    def sky(data):
        data["cameras"][3] = camera_looking("CAM_BACK", 180.0, (0.0, 0.0, 1.8), 1266.0, 816.0, 491.0, pitch_deg=-90.0)

    result = cli.invoke(main, ["convert", "-r", "bevformer_small", "--rig", str(_rig(tmp_path, "sky", sky)),
                               "-o", str(tmp_path / "a"), "-q"])
    assert result.exit_code == 3, result.output
    assert "camera CAM_BACK sees none of the 256 BEV pillars" in result.output
    assert "virtual" not in result.output and not (tmp_path / "a").exists()

    def grazing(data):  # looks up over the grid: only a sliver of it at the bottom of its image
        data["cameras"][3] = camera_looking("CAM_BACK", 180.0, (0.0, 0.0, 1.8), 1266.0, 816.0, 491.0, pitch_deg=-25.0)

    result = cli.invoke(main, ["convert", "-r", "bevformer_small", "--rig", str(_rig(tmp_path, "graze", grazing)),
                               "-o", str(tmp_path / "b"), "-q"])
    assert result.exit_code == 0, result.output
    assert "warning: camera CAM_BACK sees only" in result.output


def test_rig_on_a_lidar_model_is_refused(tmp_path):
    result = CliRunner().invoke(main, ["convert", "-r", "centerpoint_pillar_small", "--rig", "nuscenes_surround",
                                       "-o", str(tmp_path / "a"), "-q"])
    assert result.exit_code == 3 and "--rig is for camera models" in result.output


def test_rig_images_of_another_size_say_which_scale_fits(tmp_path):
    def half(data):
        data["image_size"] = [450, 800]

    result = CliRunner().invoke(main, ["convert", "-r", "bevformer_small", "--rig", str(_rig(tmp_path, "half", half)),
                                       "-o", str(tmp_path / "a"), "-q"])
    assert result.exit_code == 3, result.output
    assert "raw 450x800 images" in result.output and "or an image_scale from 0.1613" in result.output
