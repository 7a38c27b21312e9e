import json

import numpy as np
import pytest

from deploykit.errors import InputError, OutputExistsError
from deploykit.quantize.calib_set import build_calib_set, load_calib_set, write_calib_set


@pytest.fixture(scope="module")
def pillar_set(tmp_path_factory, small_recipe):
    return build_calib_set(small_recipe, tmp_path_factory.mktemp("calib") / "cp", samples=3)


def _spec(path):
    return json.loads((path / "calib.json").read_text())["inputs"]


def test_pillar_set_holds_engine_feeds(pillar_set, small_recipe, converted_dir):
    manifest = json.loads((converted_dir / "manifest.json").read_text())
    inputs = [{k: i[k] for k in ("name", "shape", "dtype")} for i in manifest["inputs"]]
    calib = load_calib_set(pillar_set, recipe=small_recipe.name, inputs=inputs)
    assert len(calib) == 3 and not calib.temporal
    samples = list(calib)
    assert [s.scene for s in samples] == ["sweep-0000", "sweep-0001", "sweep-0002"]
    assert not np.array_equal(samples[0].arrays["pillars"], samples[1].arrays["pillars"])


def test_temporal_set_orders_frames_by_scene(tmp_path, bev_recipe):
    path = build_calib_set(bev_recipe, tmp_path / "bev", samples=5, frames_per_scene=2)
    calib = load_calib_set(path, recipe=bev_recipe.name)
    assert calib.temporal
    assert [(e["scene"], e["index"]) for e in calib.entries] == [
        ("scene-0000", 0), ("scene-0000", 1), ("scene-0001", 0), ("scene-0001", 1), ("scene-0002", 0)]
    assert sorted(next(iter(calib)).arrays) == ["can_bus", "img"]


def test_wrong_recipe_is_named(pillar_set):
    with pytest.raises(InputError, match="made for recipe 'centerpoint_pillar_small', not 'bevformer_small'"):
        load_calib_set(pillar_set, recipe="bevformer_small")


def test_wrong_shapes_say_another_layout(pillar_set):
    inputs = _spec(pillar_set)
    inputs[0] = {**inputs[0], "shape": [1, 11, 16, 9999]}
    with pytest.raises(InputError, match="another recipe or layout"):
        load_calib_set(pillar_set, inputs=inputs)


def test_nan_sample_is_rejected_with_its_file(tmp_path, pillar_set):
    calib = load_calib_set(pillar_set)
    arrays = dict(next(iter(calib)).arrays)
    arrays["pillars"] = arrays["pillars"].copy()
    arrays["pillars"][0, 0, 0, 0] = np.nan
    np.savez(pillar_set / "000001.npz", **arrays)
    try:
        with pytest.raises(InputError, match=r"000001.npz: pillars has 1 NaN/Inf values"):
            list(calib)
    finally:
        arrays["pillars"][0, 0, 0, 0] = 0.0
        np.savez(pillar_set / "000001.npz", **arrays)


def test_empty_and_missing_sets(tmp_path):
    with pytest.raises(InputError, match="needs at least one sample"):
        write_calib_set(tmp_path / "e", "r", [], temporal=False)
    with pytest.raises(InputError, match="calib.json is missing"):
        load_calib_set(tmp_path)
    (tmp_path / "calib.json").write_text(json.dumps({"format": 1, "recipe": "r", "inputs": [], "samples": []}))
    with pytest.raises(InputError, match="is empty"):
        load_calib_set(tmp_path)


def test_scene_gaps_and_interleaving_are_rejected(tmp_path):
    a = {"x": np.zeros(2, np.float32)}
    gap = write_calib_set(tmp_path / "gap", "r", [(a, "s", 0), (a, "s", 2)], temporal=True)
    with pytest.raises(InputError, match="frame 2 of scene s, expected frame 1"):
        load_calib_set(gap)
    mixed = write_calib_set(tmp_path / "mix", "r", [(a, "s", 0), (a, "t", 0), (a, "s", 1)], temporal=True)
    with pytest.raises(InputError, match="returns to scene s"):
        load_calib_set(mixed)


def test_mis_shaped_sample_is_refused_when_writing(tmp_path):
    rows = [({"x": np.zeros(2, np.float32)}, "s", 0), ({"x": np.zeros(3, np.float32)}, "t", 0)]
    with pytest.raises(InputError, match=r"000001.npz: x is float32\[3\], expected float32\[2\]"):
        write_calib_set(tmp_path / "bad", "r", rows, temporal=False)
    assert not (tmp_path / "bad").exists()  # nothing half-written


def test_existing_output_is_kept(tmp_path, small_recipe):
    (tmp_path / "keep").mkdir()
    with pytest.raises(OutputExistsError):
        build_calib_set(small_recipe, tmp_path / "keep", samples=1)
