"""The issue's "done when", with the CLI alone: a rig from a nuScenes-layout dataset, convert
with it, calibrate and quantize on the dataset's frames, detect on a scene, NDS for float,
int8 and int8 + int16."""

import json

from click.testing import CliRunner

from deploykit.cli import main


def test_camera_model_from_a_nuscenes_layout_dataset(nuscenes_dir, tmp_path):
    cli = CliRunner()

    def run(*args):
        result = cli.invoke(main, [str(a) for a in args])
        assert result.exit_code == 0, (args, result.output)
        return result.output

    run("rig", "--from-nuscenes", nuscenes_dir, "--scene", "scene-0103", "-o", tmp_path / "rig.json")
    out = run("convert", "-r", "bevformer_small", "--rig", tmp_path / "rig.json", "-o", tmp_path / "conv", "-q")
    assert "synthetic weights" in out  # the recipe's stand-in checkpoint is said to be one
    run("calib", "-r", "bevformer_small", "--from", nuscenes_dir, "-o", tmp_path / "calib", "-n", "4",
        "--frames-per-scene", "2")
    out = run("quantize", "-m", tmp_path / "conv", "-o", tmp_path / "q", "--calib", tmp_path / "calib", "-q")
    for label in ("int8:", "int8+int16:", "float:"):
        assert any(line.startswith(label) and "NDS" in line for line in out.splitlines()), out
    out = run("detect", tmp_path / "q", "-i", nuscenes_dir, "--scene", "scene-0916", "-o", tmp_path / "det", "-q")
    assert out.startswith("4 frames") and "NDS" in out
    summary = json.loads((tmp_path / "det" / "summary.json").read_text())
    assert summary["model"].endswith("model.qdq.onnx") and summary["scenes"] == ["scene-0916"]
    assert len(list((tmp_path / "det" / "bev").glob("scene-0916_*.png"))) == 4
    # The rig went with the model: the converted copy is what detect and quantize used.
    assert json.loads((tmp_path / "conv" / "rig.json").read_text())["name"] == "nuscenes_scene_0103"
