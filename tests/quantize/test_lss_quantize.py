"""Quantizing BEVDepth: key frames calibrated in scene order on the fake-quant model's own
state, quantizers on the pooling inputs, and the QDQ engine against the fake-quant model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from deploykit.quantize.calib_set import build_calib_set, load_calib_set
from deploykit.temporal.two_key import TwoKeyRunner


def test_calibration_holds_key_frames_in_scene_order(tmp_path, lss_recipe, lss_converted_dir):
    out = build_calib_set(lss_recipe, tmp_path / "calib", samples=5, frames_per_scene=3)
    manifest = json.loads((lss_converted_dir / "manifest.json").read_text())
    calib = load_calib_set(out, recipe=lss_recipe.name, inputs=manifest["inputs"], runner=TwoKeyRunner)
    assert calib.temporal and [(e["scene"], e["index"]) for e in calib.entries] == [
        ("scene-0000", 0), ("scene-0000", 1), ("scene-0000", 2), ("scene-0001", 0), ("scene-0001", 1)]
    samples = list(calib)
    assert set(samples[0].arrays) == {"img", "ego2global"}  # the depth/context state is made while calibrating
    step = np.linalg.inv(samples[0].arrays["ego2global"]) @ samples[1].arrays["ego2global"]
    assert 2.5 < np.linalg.norm(step[:2, 3]) < 5.5  # ~0.5 s between key frames


class _Recorder:
    """Stands in for the engine: returns a recognisable state per call."""

    def __init__(self, cfg):
        self.cfg, self.seen = cfg, []

    def run(self, feeds):
        self.seen.append(feeds)
        n, d, (h, w) = self.cfg.num_cams, self.cfg.depth_bins, self.cfg.feature_size
        k = float(len(self.seen))
        return {"key_depth": np.full((1, n, d, h, w), k, np.float32),
                "key_context": np.full((1, n, h, w, self.cfg.output_channels), k, np.float32)}


def test_runner_carries_the_previous_key_frame(lss_recipe):
    from deploykit.preprocess.lss_inputs import synthetic_scene

    cfg = lss_recipe.model
    frames = synthetic_scene(cfg, "s", 3, 7)
    engine = _Recorder(cfg)
    TwoKeyRunner(engine, cfg).run(frames)
    first, second, third = engine.seen
    assert first["use_prev"][0] == 0 and second["use_prev"][0] == 1 and third["use_prev"][0] == 1
    assert second["prev_depth"].max() == 1 and third["prev_context"].max() == 2
    motion = second["ego_motion"][0, 0]
    want = np.linalg.inv(frames[1].ego2global) @ frames[0].ego2global
    np.testing.assert_allclose(motion, want, atol=1e-5)
    assert motion[0, 3] < -2.5  # the previous ego is behind the current one


@pytest.fixture(scope="module")
def lss_quantized_dir(tmp_path_factory, lss_recipe, lss_converted_dir):
    from deploykit.quantize.pipeline import quantize

    out = tmp_path_factory.mktemp("quantize") / "bevdepth_small"
    quantize(lss_recipe, lss_converted_dir, out, quiet=True)
    return out


def test_quantized_model_quantizes_the_pooling_inputs(lss_quantized_dir):
    names = {q["name"] for q in json.loads((lss_quantized_dir / "quantizers.json").read_text())}
    assert {"pool_key.depth_quantizer", "pool_key.context_quantizer", "pool_prev.depth_quantizer",
            "pool_prev.context_quantizer"} <= names
    # The folded camera gates leave no MLP to quantize.
    assert not [n for n in names if "depth_mlp" in n or "context_mlp" in n]
    manifest = json.loads((lss_quantized_dir / "manifest.json").read_text())
    assert manifest["calibration"]["temporal"]


def test_qdq_engine_reports_fidelity(lss_quantized_dir):
    fidelity = json.loads((lss_quantized_dir / "fidelity.json").read_text())
    rows = {o["name"]: o for o in fidelity["int8"]}
    assert {"task0.heatmap", "key_depth", "key_context"} <= set(rows)
    assert all(np.isfinite(o["sqnr_db"]) and o["cosine"] > 0.5 for o in rows.values())
    assert (lss_quantized_dir / "model.int8.qdq.onnx").is_file()
