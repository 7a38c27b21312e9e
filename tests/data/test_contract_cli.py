"""Each way a user's point cloud can break the input contract, through the CLI: the message,
the exit code, and that nothing is half-written."""

import numpy as np
import pytest
from click.testing import CliRunner

from deploykit.cli import main
from deploykit.preprocess.pillar_inputs import sample_scene
from deploykit.recipe import load_recipe


def _cloud(kind: str) -> np.ndarray:
    pts = sample_scene(load_recipe("centerpoint_pillar_synth").model, 3).points.copy()  # x, y, z, intensity 0-1, dt 0
    if kind == "ring":
        pts[:, 4] = np.arange(len(pts)) % 32
    elif kind == "intensity":
        pts[:, 3] *= 4096
    elif kind == "outside":
        pts[:, :2] += 500.0
    elif kind == "zeros":
        pts[:] = 0
    elif kind == "nan":
        pts[::50, 0] = np.nan
    elif kind == "few":
        pts = pts[:300]
    elif kind == "dt":
        pts[:, 4] = 7.5  # seconds: not a sweep lag
    return pts


@pytest.mark.parametrize("kind, code, text", [
    ("ring", 6, "ring index"),
    ("intensity", 6, "intensity"),
    ("outside", 6, "point_cloud_range"),
    ("zeros", 6, "are at (0, 0, 0)"),
    ("dt", 6, "dt"),
    ("nan", 0, "NaN or Inf and were dropped"),
    ("few", 0, "300 points"),
])
def test_calib_from_a_cloud_outside_the_contract(tmp_path, kind, code, text):
    np.save(tmp_path / "cloud.npy", _cloud(kind).astype(np.float32))
    out = tmp_path / "calib"
    result = CliRunner().invoke(main, ["calib", "-r", "centerpoint_pillar_synth", "--from", str(tmp_path / "cloud.npy"),
                                       "-o", str(out), "-n", "1"])
    assert result.exit_code == code, result.output
    assert text in result.output, result.output
    assert "Traceback" not in result.output
    if code:
        assert result.output.strip().startswith("error:") and len(result.output.strip().splitlines()) == 1
        assert not out.exists() and not list(tmp_path.glob(".calib*"))  # no partial directory either
    else:
        assert "warning:" in result.output and (out / "calib.json").is_file()


def test_more_pillars_than_the_engine_takes_is_counted(tmp_path):
    recipe = load_recipe("centerpoint_pillar_synth")
    rng = np.random.default_rng(0)
    # One point in each of 9000 distinct pillars (the recipe's engine takes 6000).
    cells = rng.choice(128 * 128, 9000, replace=False)
    x = (cells % 128) * 0.4 - 25.6 + 0.2
    y = (cells // 128) * 0.4 - 25.6 + 0.2
    pts = np.column_stack([x, y, np.full(9000, -1.0), np.full(9000, 0.5), np.zeros(9000)]).astype(np.float32)
    np.save(tmp_path / "dense.npy", pts)
    result = CliRunner().invoke(main, ["calib", "-r", recipe.name, "--from", str(tmp_path / "dense.npy"),
                                       "-o", str(tmp_path / "c"), "-n", "1"])
    assert result.exit_code == 0, result.output
    assert "3000 of 9000 non-empty pillars" in result.output and "max_pillars to at least 9000" in result.output
