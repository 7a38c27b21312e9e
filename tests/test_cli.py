import json

import pytest
from click.testing import CliRunner

from deploykit.cli import main


@pytest.fixture
def cli():
    return CliRunner()


def test_help_names_the_commands(cli):
    result = cli.invoke(main, ["--help"])
    assert result.exit_code == 0
    for cmd in ("convert", "bench", "recipes"):
        assert cmd in result.output


def test_convert_then_bench(cli, tmp_path):
    out = tmp_path / "cp"
    result = cli.invoke(main, ["convert", "--recipe", "centerpoint_pillar_small", "--out", str(out), "-q"])
    assert result.exit_code == 0, result.output
    assert "worst relative error" in result.output
    report = tmp_path / "bench.json"
    result = cli.invoke(main, ["bench", str(out / "model.onnx"), "--warmup", "1", "-n", "3", "--threads", "1",
                               "--json", str(report)])
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())["results"][0]
    assert data["latency"]["iterations"] == 3 and data["latency"]["warmup"] == 1
    assert data["settings"]["intra_op_threads"] == 1
    assert data["inputs"]["source"].endswith("inputs.npz")
    for key in ("mean_ms", "p50_ms", "p90_ms", "p99_ms", "std_ms", "throughput_fps"):
        assert data["latency"][key] > 0 or key == "std_ms"
    assert "p99" in result.output

    # The same --out again: one-line error, exit code 5, nothing changed.
    result = cli.invoke(main, ["convert", "--recipe", "centerpoint_pillar_small", "--out", str(out), "-q"])
    assert result.exit_code == 5
    assert result.output.strip().count("\n") == 0 and "already exists" in result.output


@pytest.mark.parametrize("args, code, text", [
    (["--recipe", "centerpoint_pillar_smal"], 3, "did you mean 'centerpoint_pillar_small'"),
    (["--recipe", "centerpoint_pillar_small", "--passes", "pfn_linear_to_conv,nope"], 3, "unknown pass 'nope'"),
    (["--recipe", "centerpoint_pillar_small", "--passes", "max_to_maxpool"], 3, "run 'pfn_linear_to_conv' before it"),
])
def test_bad_options_exit_with_documented_codes(cli, tmp_path, args, code, text):
    out = tmp_path / "o"
    result = cli.invoke(main, ["convert", *args, "--out", str(out), "-q"])
    assert result.exit_code == code, result.output
    assert text in result.output
    assert not out.exists()


def test_truncated_checkpoint_is_one_clear_error(cli, tmp_path):
    bad = tmp_path / "ckpt.pth"
    bad.write_bytes(b"PK\x03\x04 truncated")
    result = cli.invoke(main, ["convert", "-r", "centerpoint_pillar_small", "-c", str(bad), "-o", str(tmp_path / "o")])
    assert result.exit_code == 4
    assert result.output.startswith("error: checkpoint") and "truncated" in result.output
    assert not (tmp_path / "o").exists()


def test_recipe_with_unknown_field(cli, tmp_path):
    from deploykit.recipe import RECIPES_DIR

    text = (RECIPES_DIR / "centerpoint_pillar_small.toml").read_text().replace("[check]", "[check]\nmax_rel_eror = 1")
    recipe = tmp_path / "r.toml"
    recipe.write_text(text)
    result = cli.invoke(main, ["convert", "-r", str(recipe), "-o", str(tmp_path / "o")])
    assert result.exit_code == 3
    assert "unknown field 'max_rel_eror' (did you mean 'max_rel_error'?)" in result.output


def test_bench_missing_model(cli, tmp_path):
    result = cli.invoke(main, ["bench", str(tmp_path / "none.onnx")])
    assert result.exit_code == 9
    assert "does not exist" in result.output


def test_bench_corrupt_model(cli, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00garbage")
    result = cli.invoke(main, ["bench", str(bad)])
    assert result.exit_code == 9
    assert "cannot load" in result.output


def test_recipes_lists_bundled(cli):
    result = cli.invoke(main, ["recipes"])
    assert result.exit_code == 0
    assert "centerpoint_pillar_nus" in result.output and "centerpoint_pillar_small" in result.output


def test_calib_builds_a_set_and_refuses_an_existing_dir(cli, tmp_path):
    out = tmp_path / "calib"
    result = cli.invoke(main, ["calib", "--recipe", "centerpoint_pillar_small", "--out", str(out), "-n", "2"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["000000.npz", "000001.npz", "calib.json"]
    result = cli.invoke(main, ["calib", "--recipe", "centerpoint_pillar_small", "--out", str(out), "-n", "2"])
    assert result.exit_code == 5 and "exists" in result.output


def test_quantize_bad_inputs_get_clear_errors(cli, tmp_path, converted_dir, bev_converted_dir):
    # A converted model of another recipe.
    result = cli.invoke(main, ["quantize", "-r", "bevformer_small", "-m", str(converted_dir), "-o", str(tmp_path / "a")])
    assert result.exit_code == 6 and "converted with recipe 'centerpoint_pillar_small'" in result.output
    # Calibration data made for another recipe.
    calib = tmp_path / "calib"
    assert cli.invoke(main, ["calib", "-r", "bevformer_small", "-o", str(calib), "-n", "1"]).exit_code == 0
    result = cli.invoke(main, ["quantize", "-r", "centerpoint_pillar_small", "-m", str(converted_dir),
                               "-o", str(tmp_path / "b"), "--calib", str(calib)])
    assert result.exit_code == 6 and "made for recipe 'bevformer_small'" in result.output
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_quantize_warns_on_an_override_that_matches_nothing(cli, tmp_path, converted_dir):
    result = cli.invoke(main, ["quantize", "-r", "centerpoint_pillar_small", "-m", str(converted_dir),
                               "-o", str(tmp_path / "q"), "--int16", "*pts_backbone.blocks.0.0.input_quantizr"])
    assert result.exit_code == 0, result.output
    assert "matches no quantizer" in result.output and "pts_backbone.blocks.0.0.input_quantizer" in result.output
    assert "int8: worst output" in result.output


def test_sample_dataset_writes_a_nuscenes_layout_directory(cli, tmp_path):
    out = tmp_path / "nus"
    result = cli.invoke(main, ["sample-dataset", "--out", str(out), "--scenes", "1", "--samples-per-scene", "2",
                               "--no-cameras"])
    assert result.exit_code == 0, result.output
    assert (out / "v1.0-mini" / "sample.json").is_file() and list((out / "samples" / "LIDAR_TOP").glob("*.pcd.bin"))
    again = cli.invoke(main, ["sample-dataset", "--out", str(out)])
    assert again.exit_code == 5 and "exists" in again.output
