"""Calibration and fidelity on the user's own data (deploykit calib --from, quantize on held-out frames)."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from deploykit.cli import main
from deploykit.data.points import write_points_bin


@pytest.fixture(scope="module")
def user_quantized(synth_converted_dir, nuscenes_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("user")
    cli = CliRunner()
    calib = cli.invoke(main, ["calib", "-r", "centerpoint_pillar_synth", "--from", str(nuscenes_dir),
                              "-o", str(root / "calib"), "-n", "4"])
    assert calib.exit_code == 0, calib.output
    result = cli.invoke(main, ["quantize", "-m", str(synth_converted_dir), "-o", str(root / "q"),
                               "--calib", str(root / "calib"), "-q"])
    assert result.exit_code == 0, result.output
    return root, result.output


def test_calibration_frames_are_spread_and_recorded(user_quantized, nuscenes_dir):
    root, _ = user_quantized
    index = json.loads((root / "calib" / "calib.json").read_text())
    assert index["source"] == {"path": str(nuscenes_dir), "kind": "nuscenes", "frames": 8, "scenes": 2,
                               "ground_truth": True}
    origins = [e["origin"] for e in index["samples"]]
    assert len(origins) == 4 and {o["scene"] for o in origins} == {"scene-0103", "scene-0916"}  # both scenes


def test_fidelity_and_nds_are_measured_on_held_out_frames(user_quantized):
    root, output = user_quantized
    calib_tokens = {e["origin"]["token"] for e in json.loads((root / "calib" / "calib.json").read_text())["samples"]}
    fid = json.loads((root / "q" / "fidelity.json").read_text())
    measured = {f["token"] for f in fid["measured_on"]["frames"]}
    assert measured and not measured & calib_tokens  # never the frames it was calibrated on
    task = fid["task_nds"]
    assert task["frames"] == 4 and task["classes"] == ["car", "pedestrian", "bicycle"]
    for key in ("float", "int8", "int8_int16"):
        assert 0 < task[key]["NDS"] <= 1 and set(task[key]["tp_errors"]) == {"mATE", "mASE", "mAOE", "mAVE", "mAAE"}
    assert f"float: NDS {task['float']['NDS']:.4f}" in output and "held-out frames of" in output
    md = (root / "q" / "fidelity.md").read_text()
    assert "that the calibration set does not hold" in md and "## nuScenes metrics on 4 held-out frames" in md
    from deploykit.gate import fidelity_summary

    assert fidelity_summary(fid, "model.qdq.onnx")["NDS"] == task["int8_int16"]["NDS"]


def test_all_zero_sweeps_are_refused(tmp_path):
    (tmp_path / "sweeps").mkdir()
    write_points_bin(tmp_path / "sweeps" / "000000.bin", np.zeros((20000, 4), np.float32))
    result = CliRunner().invoke(main, ["calib", "-r", "centerpoint_pillar_synth", "--from", str(tmp_path / "sweeps"),
                                       "-o", str(tmp_path / "c")])
    assert result.exit_code == 6 and "error:" in result.output and not (tmp_path / "c").exists()


def test_calibrating_on_empty_pillars_warns_with_the_measured_fidelity(converted_dir, tmp_path):
    from deploykit.quantize.calib_set import write_calib_set

    feeds = dict(np.load(converted_dir / "inputs.npz"))
    empty = {"pillars": np.zeros_like(feeds["pillars"]), "coords": np.full_like(feeds["coords"], -1),
             "num_points": np.zeros_like(feeds["num_points"])}
    write_calib_set(tmp_path / "calib", "centerpoint_pillar_small", [(empty, f"s{i}", 0) for i in range(2)],
                    temporal=False)
    result = CliRunner().invoke(main, ["quantize", "-m", str(converted_dir), "-o", str(tmp_path / "q"),
                                       "--calib", str(tmp_path / "calib"), "-q"])
    assert result.exit_code == 0, result.output
    assert "2 of 2 samples cannot be real data (000000.npz: 0 non-empty pillars" in result.output
    assert "dB SQNR on" in result.output


def test_calibrating_on_noise_images_warns(bev_converted_dir, tmp_path):
    from deploykit.camera.rig import load_rig

    rig = load_rig(json.loads((bev_converted_dir / "manifest.json").read_text())["rig"]["source"])
    rng = np.random.default_rng(0)
    for i in range(3):
        d = tmp_path / "frames" / f"{i:03d}"
        d.mkdir(parents=True)
        for name in rig.names:
            Image.fromarray(rng.integers(0, 256, (900, 1600, 3), dtype=np.uint8)).save(d / f"{name}.png",
                                                                                      compress_level=0)
    cli = CliRunner()
    calib = cli.invoke(main, ["calib", "-r", "bevformer_small", "--from", str(tmp_path / "frames"),
                              "-o", str(tmp_path / "c"), "-n", "2", "--frames-per-scene", "1"])
    assert calib.exit_code == 0, calib.output
    assert "look like noise" in calib.output and "no ego_pose.json" in calib.output
    result = cli.invoke(main, ["quantize", "-m", str(bev_converted_dir), "-o", str(tmp_path / "q"),
                               "--calib", str(tmp_path / "c"), "-q"])
    assert result.exit_code == 0, result.output
    assert "cannot be real data" in result.output and "look like noise" in result.output
    assert "dB SQNR on" in result.output
    fid = json.loads((tmp_path / "q" / "fidelity.json").read_text())
    assert len(fid["measured_on"]["frames"]) == 1 and "task_nds" not in fid  # one held-out frame, no annotations
