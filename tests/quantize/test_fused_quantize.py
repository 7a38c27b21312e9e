"""Quantizing BEVFusion: calibration on both sensors per frame in scene order, the int16
report by stream, and bench's stage breakdown of the fused engine."""

from __future__ import annotations

import json

import numpy as np

from deploykit.quantize.calib_set import build_calib_set, load_calib_set
from deploykit.quantize.sensitivity import ModuleSensitivity, Search, markdown
from deploykit.temporal.runner import Frame, SequenceRunner


def test_calibration_frames_carry_both_sensors_in_scene_order(tmp_path, fused_recipe, fused_converted_dir):
    out = build_calib_set(fused_recipe, tmp_path / "calib", samples=6, frames_per_scene=3)
    manifest = json.loads((fused_converted_dir / "manifest.json").read_text())
    calib = load_calib_set(out, recipe=fused_recipe.name, inputs=manifest["inputs"])
    assert calib.temporal and [(e["scene"], e["index"]) for e in calib.entries] == [
        ("scene-0000", 0), ("scene-0000", 1), ("scene-0000", 2), ("scene-0001", 0), ("scene-0001", 1),
        ("scene-0001", 2)]
    sample = next(iter(calib))
    assert set(sample.arrays) == {"img", "can_bus", "pillars", "coords", "num_points"}  # no temporal state stored
    # Raw voxels: the engine decorates and normalises them (decorate_in_graph after normalise_points).
    assert sample.arrays["pillars"].shape[1] == fused_recipe.model.lidar.voxelization.point_features
    assert sample.arrays["num_points"].dtype == np.int32 and sample.arrays["num_points"].max() >= 1


class _Echo:
    def __init__(self):
        self.seen = []

    def run(self, feeds):
        self.seen.append(feeds)
        return {"bev_embed": np.full_like(feeds["prev_bev"], len(self.seen))}


def test_sequence_runner_passes_the_other_sensors_through(fused_recipe):
    cam = fused_recipe.model.camera
    engine = _Echo()
    runner = SequenceRunner(engine, cam)
    img = np.zeros((1, cam.num_cams, 3, *cam.image_size), np.float32)
    bus = np.zeros(18)
    pillars = np.ones((1, 11, 16, 6000), np.float32)
    runner.step(Frame(img, bus, "s", 0, {"pillars": pillars, "coords": np.zeros((6000, 4), np.int32)}))
    runner.step(Frame.from_arrays({"img": img, "can_bus": bus, "pillars": 2 * pillars,
                                   "coords": np.zeros((6000, 4), np.int32)}, "s", 1))
    first, second = engine.seen
    assert first["use_prev_bev"][0] == 0 and second["use_prev_bev"][0] == 1
    assert second["pillars"].max() == 2 and second["prev_bev"].max() == 1  # the first frame's BEV carried


def test_quantized_fused_model_reports_fidelity_per_output(fused_quantized_dir):
    fidelity = json.loads((fused_quantized_dir / "fidelity.json").read_text())
    for config in ("int8", "int8_int16"):
        rows = {o["name"]: o for o in fidelity[config]}
        assert set(rows) == {"bev_embed", "cls_scores", "bbox_preds", "occupancy"}
        assert all(10 < o["sqnr_db"] < 80 and o["cosine"] > 0.9 for o in rows.values())
    for flavour in ("model.int8.qdq.onnx", "model.qdq.onnx", "model.trt.qdq.onnx"):
        assert (fused_quantized_dir / flavour).is_file()


def test_sensitivity_report_names_the_stream_of_each_module():
    from deploykit.models import ARCHITECTURES

    search = Search(20.0, [ModuleSensitivity("pts_bbox_head.transformer.encoder.layers.0.attentions.0.sampler", [],
                                             30.0, 25.0, 5.0),
                           ModuleSensitivity("pts_voxel_encoder.pfn_layers.0.conv", [], 31.0, 22.0, 2.0),
                           ModuleSensitivity("occ_head.predicter.2", [], 33.0, 21.0, 1.0)],
                    chosen=["pts_bbox_head.transformer.encoder.layers.0.attentions.0.sampler",
                            "pts_voxel_encoder.pfn_layers.0.conv"],
                    steps=[{"module": "pts_voxel_encoder.pfn_layers.0.conv", "worst_sqnr_db": 25.0}],
                    target_db=25.0, budget=4, stages=ARCHITECTURES["bevfusion"].stages)
    text = markdown(search, "bevfusion_small")
    assert "| pts_voxel_encoder.pfn_layers.0.conv | LiDAR stream | 25.0 |" in text
    assert "int16 modules per stage: camera stream 1, LiDAR stream 1." in text
    assert "| occ_head.predicter.2 | occupancy head |" in text
    assert {m["stage"] for m in search.to_dict()["modules"]} == {"camera stream", "LiDAR stream", "occupancy head"}


def test_bench_groups_the_fused_engine_by_stream(fused_converted_dir):
    from deploykit.bench import bench_model

    result = bench_model(fused_converted_dir / "model.onnx", warmup=1, iterations=3, stages=True)
    stages = {row["stage"] for row in result["stages"]}
    assert {"camera stream", "LiDAR stream", "fusion", "detection head", "occupancy head"} <= stages


def test_int16_sensitive_quantize_labels_the_chosen_modules_by_stream(tmp_path, monkeypatch, fused_recipe,
                                                                      fused_converted_dir):
    """The pipeline hands the architecture's stage table to the search report (the search
    itself, 116 modules measured, is replaced here by one that picks a LiDAR and a camera module)."""
    from deploykit.quantize import pipeline
    from deploykit.quantize.sensitivity import group_modules

    def pick(qmodel, active, samples, references, **kwargs):
        groups = group_modules(active)
        chosen = [next(m for m in groups if m.startswith("pts_voxel_encoder.")),
                  next(m for m in groups if m.startswith("pts_bbox_head.transformer.encoder."))]
        modules = [ModuleSensitivity(m, groups[m], 30.0, 28.0, 1.0) for m in chosen]
        return Search(27.0, modules, chosen=chosen, steps=[{"module": m, "worst_sqnr_db": 30.0} for m in chosen],
                      target_db=kwargs["target_db"], budget=kwargs["budget"])

    monkeypatch.setattr(pipeline, "search_int16", pick)
    out = tmp_path / "q"
    pipeline.quantize(fused_recipe, fused_converted_dir, out, int16_sensitive=True, quiet=True)
    text = (out / "sensitivity.md").read_text()
    assert "int16 modules per stage: LiDAR stream 1, camera stream 1." in text
    stages = {m["stage"] for m in json.loads((out / "sensitivity.json").read_text())["modules"]}
    assert stages == {"LiDAR stream", "camera stream"}
