"""deploykit detect: a model on a user's data, through the CLI."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from deploykit.cli import main
from deploykit.data.points import write_points_bin
from deploykit.preprocess.pillar_inputs import sample_scene
from deploykit.recipe import load_recipe


@pytest.fixture(scope="module")
def detected(synth_converted_dir, nuscenes_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("detect") / "det"
    result = CliRunner().invoke(main, ["detect", str(synth_converted_dir), "-i", str(nuscenes_dir), "-o", str(out)])
    assert result.exit_code == 0, result.output
    return out, result.output


def test_detect_writes_submission_pictures_metrics_and_summary(detected, nuscenes_dir):
    out, output = detected
    assert sorted(p.name for p in out.iterdir()) == ["bev", "detections.json", "metrics.json", "metrics.md",
                                                    "summary.json", "summary.md"]
    sub = json.loads((out / "detections.json").read_text())
    assert sub["meta"]["use_lidar"] and not sub["meta"]["use_camera"]
    assert len(sub["results"]) == 8
    box = next(b for boxes in sub["results"].values() for b in boxes)
    assert set(box) >= {"sample_token", "translation", "size", "rotation", "velocity", "detection_name",
                        "detection_score", "attribute_name"}
    assert {b["detection_name"] for boxes in sub["results"].values() for b in boxes} <= {"car", "pedestrian",
                                                                                        "bicycle"}
    pngs = sorted((out / "bev").iterdir())
    assert len(pngs) == 8 and all(p.read_bytes()[:4] == b"\x89PNG" for p in pngs)
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.2 < metrics["NDS"] <= 1 and 0.2 < metrics["mAP"] <= 1  # a trained model on data like its own
    assert f"NDS {metrics['NDS']:.4f}" in output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["frames"] == 8 and summary["engine_ms"]["mean"] > 0 and summary["boxes_per_class"]["car"] > 0
    assert "mATE" in (out / "summary.md").read_text()


def test_detect_metrics_equal_the_evaluation_of_the_written_submission(detected, nuscenes_dir):
    """What metrics.json says is what the nuScenes evaluation gives on detections.json."""
    from deploykit.data.nuscenes import NuScenesLayout
    from deploykit.detection.nuscenes_eval import evaluate_frames

    out, _ = detected
    frames = list(NuScenesLayout(nuscenes_dir).frames(sweeps=0, cameras=False))
    sub = json.loads((out / "detections.json").read_text())
    again = evaluate_frames(frames, sub, class_names=["car", "pedestrian", "bicycle"])
    assert again["NDS"] == pytest.approx(json.loads((out / "metrics.json").read_text())["NDS"], abs=1e-12)


def test_detect_on_point_files_without_ground_truth(synth_converted_dir, tmp_path):
    synth = load_recipe("centerpoint_pillar_synth")
    (tmp_path / "sweeps").mkdir()
    for i in range(2):
        write_points_bin(tmp_path / "sweeps" / f"{i:06d}.bin", sample_scene(synth.model, 7_000_000 + i).points[:, :4])
    out = tmp_path / "det"
    result = CliRunner().invoke(main, ["detect", str(synth_converted_dir), "-i", str(tmp_path / "sweeps"),
                                       "-o", str(out), "-q", "--no-pictures"])
    assert result.exit_code == 0, result.output
    assert not (out / "metrics.json").exists() and not (out / "bev").exists()
    sub = json.loads((out / "detections.json").read_text())
    assert set(sub["results"]) == {"000000", "000001"} and sum(map(len, sub["results"].values())) > 5


def test_detect_bad_inputs_are_one_line_and_write_nothing(synth_converted_dir, tmp_path):
    cli = CliRunner()
    cases = []
    raw = tmp_path / "raw.pcd.bin"  # a nuScenes-layout file whose intensity is in no nuScenes range
    xyz = sample_scene(load_recipe("centerpoint_pillar_synth").model, 1).points[:, :3]
    pts = np.column_stack([xyz, np.full(len(xyz), 9000.0), np.arange(len(xyz)) % 32])
    write_points_bin(raw, pts.astype(np.float32))
    cases.append((["detect", str(synth_converted_dir), "-i", str(raw)], 6, "intensity"))
    zeros = tmp_path / "zeros.bin"
    write_points_bin(zeros, np.zeros((5000, 4), np.float32))
    cases.append((["detect", str(synth_converted_dir), "-i", str(zeros)], 6, ""))
    cases.append((["detect", str(tmp_path), "-i", str(zeros)], 6, "not a `deploykit convert`"))
    cases.append((["detect", str(synth_converted_dir), "-i", str(zeros), "--model-file", "nope.onnx"], 6,
                  "does not exist"))
    for args, code, text in cases:
        out = tmp_path / "out"
        result = cli.invoke(main, [*args, "-o", str(out)])
        assert result.exit_code == code, (args, result.output)
        assert text in result.output and result.output.strip().startswith("error:")
        assert "Traceback" not in result.output and not out.exists()


def test_an_engine_converted_before_decorate_in_graph_detects_the_same(synth_converted_dir, nuscenes_dir, tmp_path):
    """The host-decoration path stays for engines exported before the pass: a convert
    directory without it, its manifest as older deploykit wrote it (no "decoration"
    key), gives the boxes of the engine that decorates in the graph."""
    from deploykit.export import convert

    synth = load_recipe("centerpoint_pillar_synth")
    old = convert(synth, tmp_path / "old", passes=[p for p in synth.convert.passes if p != "decorate_in_graph"],
                  quiet=True).out_dir
    manifest = json.loads((old / "manifest.json").read_text())
    for entry in manifest["inputs"]:
        entry.pop("decoration", None)
    (old / "manifest.json").write_text(json.dumps(manifest))
    boxes = {}
    for name, model in (("old", old), ("new", synth_converted_dir)):
        out = tmp_path / f"det-{name}"
        result = CliRunner().invoke(main, ["detect", str(model), "-i", str(nuscenes_dir), "-o", str(out), "-q",
                                           "--no-pictures"])
        assert result.exit_code == 0, result.output
        boxes[name] = json.loads((out / "detections.json").read_text())["results"]
    assert boxes["old"].keys() == boxes["new"].keys() and sum(map(len, boxes["new"].values())) > 5
    for token, new in boxes["new"].items():
        old = boxes["old"][token]
        assert len(old) == len(new)
        for box in new:  # the same box, to float32 rounding of the engine's outputs
            assert any(b["detection_name"] == box["detection_name"]
                       and np.allclose(b["translation"], box["translation"], atol=1e-3)
                       and abs(b["detection_score"] - box["detection_score"]) < 1e-4 for b in old), box
