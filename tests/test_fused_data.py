"""BEVFusion on the user's data: calibration and detection feed both sensors of each frame."""

from __future__ import annotations

import json

import numpy as np

from deploykit.quantize.calib_set import calib, load_calib_set


def test_calibration_from_nuscenes_holds_both_sensors_per_frame(tmp_path, fused_recipe, fused_converted_dir,
                                                                nuscenes_dir):
    out = calib(fused_recipe, tmp_path / "calib", source=nuscenes_dir, samples=4, frames_per_scene=2, quiet=True)
    manifest = json.loads((fused_converted_dir / "manifest.json").read_text())
    made = load_calib_set(out, recipe=fused_recipe.name, inputs=manifest["inputs"])
    assert made.temporal and [e["index"] for e in made.entries] == [0, 1, 0, 1]
    sample = next(iter(made))
    assert set(sample.arrays) == {"img", "can_bus", "pillars", "coords", "num_points"}
    assert (sample.arrays["coords"][:, 0] == 0).sum() > 500  # a real sweep's pillars, normalised
    # Raw voxels: the engine decorates and normalises them (decorate_in_graph after normalise_points).
    assert sample.arrays["pillars"].shape[1] == fused_recipe.model.lidar.voxelization.point_features
    assert sample.arrays["num_points"].dtype == np.int32 and sample.arrays["num_points"].max() >= 1


def test_detect_runs_the_fused_engine_over_the_dataset(tmp_path, fused_converted_dir, nuscenes_dir):
    from deploykit.detect import detect

    out = tmp_path / "det"
    detect(fused_converted_dir, nuscenes_dir, out, quiet=True)
    summary = json.loads((out / "summary.json").read_text())
    submission = json.loads((out / "detections.json").read_text())
    assert submission["meta"]["use_camera"] and submission["meta"]["use_lidar"]
    assert len(submission["results"]) == 8 and (out / "metrics.json").is_file()
    assert summary["frames"] == 8 and summary["occupancy"]["frames"] == 8
    token = submission["results"].popitem()[0] if isinstance(submission["results"], dict) else None
    with np.load(out / "occupancy" / f"{token}.npz") as occ:
        assert occ["labels"].shape == (48, 48, 8) and occ["labels"].dtype == np.uint8
        assert list(occ["class_names"]) == ["car", "pedestrian", "cyclist", "ground", "free"]
