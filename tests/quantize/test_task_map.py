"""The trained synthetic-LiDAR CenterPoint: its committed checkpoint and mAP scoring in quantize."""

import dataclasses
import json

import pytest
import torch

from deploykit.errors import RecipeError
from deploykit.export import load_model
from deploykit.quantize.pipeline import quantize
from deploykit.recipe import REPO_ROOT, load_recipe

SYNTH = "centerpoint_pillar_synth"


@pytest.fixture(scope="module")
def synth_recipe():
    recipe = load_recipe(SYNTH)
    # Fewer scenes than the recipe's 100 to keep the test quick; enough for a stable figure.
    return dataclasses.replace(recipe, quantize=dataclasses.replace(recipe.quantize, eval_scenes=12))


@pytest.fixture(scope="module")
def synth_converted(synth_converted_dir):
    return synth_converted_dir


def test_committed_checkpoint_is_a_trained_release_layout_file(synth_recipe):
    path = REPO_ROOT / synth_recipe.checkpoint.default
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"meta", "state_dict"}  # mmdet3d's {meta, state_dict}
    assert raw["meta"]["trained_by"] == "tools/train_synthetic_centerpoint.py"
    assert raw["meta"]["eval"]["mAP"] > 0.8
    model, loaded_from, _ = load_model(synth_recipe, None)  # the recipe's default goes through the real loader
    assert loaded_from == path
    assert model.pts_bbox_head.task_heads[0].heatmap[-1].bias.item() != pytest.approx(-2.19)  # not the init


def test_quantize_scores_float_int8_and_int16_in_map(synth_recipe, synth_converted, tmp_path):
    recipe = dataclasses.replace(synth_recipe, quantize=dataclasses.replace(
        synth_recipe.quantize, int16=("pts_voxel_encoder.pfn_layers.0.*_quantizer",)))
    result = quantize(recipe, synth_converted, tmp_path / "q", quiet=True)
    task = result.fidelity["task_map"]
    assert set(task) == {"scenes", "first_seed", "float", "int8", "int8_int16"}
    assert task["scenes"] == 12
    assert task["float"]["mAP"] > 0.85  # a trained model on held-out scenes
    for key in ("int8", "int8_int16"):
        assert set(task[key]["per_class"]) == {"car", "pedestrian", "cyclist"}
        assert 0.5 < task[key]["mAP"] <= 1.0
    # Raw point coordinates in metres lose most to int8; 16 bits there win mAP back.
    assert task["int8_int16"]["mAP"] > task["int8"]["mAP"]
    written = json.loads((tmp_path / "q" / "fidelity.json").read_text())
    assert written["task_map"]["float"]["mAP"] == task["float"]["mAP"]
    assert "## Task mAP on 12 held-out synthetic scenes" in (tmp_path / "q" / "fidelity.md").read_text()


def test_bad_scoring_settings_are_refused_before_any_work(synth_recipe, synth_converted, bev_recipe,
                                                          bev_converted_dir, tmp_path):
    typo = dataclasses.replace(synth_recipe, quantize=dataclasses.replace(synth_recipe.quantize,
                                                                         target_outputs=("*.heatmaps",)))
    with pytest.raises(RecipeError, match=r"target_outputs pattern '\*.heatmaps' matches none"):
        quantize(typo, synth_converted, tmp_path / "a", quiet=True)
    unlabelled = dataclasses.replace(bev_recipe, quantize=dataclasses.replace(bev_recipe.quantize, eval_scenes=5))
    with pytest.raises(RecipeError, match="cannot label"):
        quantize(unlabelled, bev_converted_dir, tmp_path / "b", quiet=True)
    assert not list(tmp_path.iterdir())


def test_cli_takes_the_recipe_from_the_manifest_skips_scoring_and_quotes_target_outputs(synth_converted, tmp_path):
    from click.testing import CliRunner

    from deploykit.cli import main

    out = tmp_path / "q"
    # No --recipe: the converted directory's manifest names it. --eval-scenes 0 skips the recipe's 100 scenes.
    # -q hides progress, never warnings.
    result = CliRunner().invoke(main, ["quantize", "-m", str(synth_converted), "-o", str(out), "--eval-scenes", "0",
                                       "-q", "--int16", "no.such.quantizer"])
    assert result.exit_code == 0, result.output
    assert "matches no quantizer" in result.output
    assert "mAP" not in result.output  # scoring skipped
    fid = json.loads((out / "fidelity.json").read_text())
    assert "task_map" not in fid
    assert fid["target_outputs"] == [n for n in fid["target_outputs"] if not n.endswith(".vel")]
    assert len(fid["target_outputs"]) == 10 and len(fid["int8"]) == 12  # 2 tasks x 5 of 6 heads
    worst = min((f for f in fid["int8"] if f["name"] in fid["target_outputs"]), key=lambda f: f["sqnr_db"])
    assert f"int8: worst output {worst['name']} SQNR {worst['sqnr_db']:.1f} dB" in result.output
    assert "worst of the recipe's target outputs: 10 of 12" in result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["recipe"]["name"] == SYNTH and manifest["recipe"]["path"].endswith(f"{SYNTH}.toml")
    conv = json.loads((synth_converted / "manifest.json").read_text())
    assert manifest["inputs"] == conv["inputs"] and manifest["inputs"][0]["layout"] == "CNP"
