import dataclasses
import json

import pytest

from deploykit.errors import CheckFailedError, InputError
from deploykit.quantize.pipeline import quantize
from deploykit.quantize.sensitivity import group_modules


def _with(recipe, **quant):
    # One check sample keeps the ~100-module search quick.
    return dataclasses.replace(recipe, quantize=dataclasses.replace(recipe.quantize, **quant),
                               check=dataclasses.replace(recipe.check, samples=1))


def test_groups_are_modules():
    groups = group_modules(["a.conv.input_quantizer", "a.conv.weight_quantizer", "b.sampler.value_quantizer"])
    assert groups == {"a.conv": ["a.conv.input_quantizer", "a.conv.weight_quantizer"],
                      "b.sampler": ["b.sampler.value_quantizer"]}


@pytest.fixture(scope="module")
def all_int8_worst(bev_recipe, bev_converted_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "probe"
    # An unreachable target with budget 0 measures everything and reports the baseline.
    with pytest.raises(CheckFailedError, match=r"all-int8 gives (-?[\d.]+) dB") as err:
        quantize(_with(bev_recipe, target_sqnr_db=999.0, int16_budget=0), bev_converted_dir, out,
                 int16_sensitive=True, quiet=True)
    assert not out.exists()  # nothing half-written
    import re

    return float(re.search(r"all-int8 gives (-?[\d.]+) dB", str(err.value)).group(1))


def test_search_lifts_the_fewest_modules_that_meet_the_target(bev_recipe, bev_converted_dir, tmp_path,
                                                            all_int8_worst):
    recipe = _with(bev_recipe, target_sqnr_db=all_int8_worst + 0.5, int16_budget=6)
    out = tmp_path / "q"
    quantize(recipe, bev_converted_dir, out, int16_sensitive=True, quiet=True)
    search = json.loads((out / "sensitivity.json").read_text())
    assert search["met"] and 1 <= len(search["chosen"]) <= 6
    assert search["final_worst_sqnr_db"] >= recipe.quantize.target_sqnr_db
    # Greedy by measured gain: the chosen modules are the top of the ranking, in order.
    ranked = [m["module"] for m in search["modules"]]
    assert search["chosen"] == ranked[:len(search["chosen"])]
    gains = [m["gain_db"] for m in search["modules"]]
    assert gains == sorted(gains, reverse=True)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["int16"]["sensitivity"]["chosen"] == search["chosen"]
    assert manifest["int16"]["patterns"] == []  # the hand-written patterns are replaced
    assert manifest["quantizers"]["int16"] == sum(len(m["quantizers"]) for m in search["modules"]
                                                  if m["module"] in search["chosen"])
    assert (out / "sensitivity.png").stat().st_size > 1000 and "Greedy choice" in (out / "sensitivity.md").read_text()
    # Cost: every module's MACs, the deformable samplers' too; an int16 set's extra adds up over its modules.
    modules = {m["module"]: m for m in search["modules"]}
    assert all(m["macs"] > 0 for m in modules.values())
    assert any(name.endswith("sampler") for name in modules)
    assert search["chosen_extra_cost"] == pytest.approx(sum(modules[m]["extra_cost"] for m in search["chosen"]))
    pareto = search["pareto"]
    chosen = pareto["points"][pareto["chosen"]]
    assert chosen["modules"] == search["chosen"] and chosen["worst_sqnr_db"] == search["final_worst_sqnr_db"]
    front = [pareto["points"][i] for i in pareto["front"]]
    assert [p["extra_cost"] for p in front] == sorted(p["extra_cost"] for p in front)
    assert (out / "pareto.png").stat().st_size > 1000 and "## Fidelity against cost" in (out / "sensitivity.md").read_text()


def test_unreachable_target_names_the_closest_modules(bev_recipe, bev_converted_dir, tmp_path):
    with pytest.raises(CheckFailedError, match=r"no int16 set of at most 2 modules reaches 200.0 dB.*help most: \S+ \(\+"):
        quantize(_with(bev_recipe, target_sqnr_db=200.0, int16_budget=2), bev_converted_dir, tmp_path / "q",
                 int16_sensitive=True, quiet=True)
    assert not (tmp_path / "q").exists()


def test_cost_budget_is_part_of_the_search(bev_recipe, bev_converted_dir, tmp_path, all_int8_worst):
    recipe = _with(bev_recipe, target_sqnr_db=all_int8_worst + 0.5, int16_budget=6, int16_cost_budget=1e-12)
    with pytest.raises(CheckFailedError, match=r"at most 6 modules and 0.00% extra bit-ops reaches.*int16_cost_budget"):
        quantize(recipe, bev_converted_dir, tmp_path / "q", int16_sensitive=True, quiet=True)
    assert not (tmp_path / "q").exists()
    with pytest.raises(ValueError, match="int16_cost_budget"):
        _with(bev_recipe, int16_cost_budget=-0.1)


def test_latency_cost_times_the_front_on_onnxruntime(synth_converted_dir, tmp_path):
    """--latency-cost: every front set (all int8 first) built as its ORT flavour and timed
    against all int8; on this recipe the front holds int16 sets in the pillar encoder and in
    the heads, so the ORT flavour of a head-only int16 set is exercised (it once failed to load)."""
    from deploykit.recipe import load_recipe

    recipe = load_recipe("centerpoint_pillar_synth")
    # A target these few samples reach in a step or two (all int8 is about 18 dB on them).
    recipe = dataclasses.replace(recipe, quantize=dataclasses.replace(recipe.quantize, calib_samples=4,
                                                                      target_sqnr_db=19.0, int16_budget=3),
                                 check=dataclasses.replace(recipe.check, samples=1))
    out = tmp_path / "q"
    quantize(recipe, synth_converted_dir, out, int16_sensitive=True, eval_scenes=0, quiet=True, latency_cost=True)
    search = json.loads((out / "sensitivity.json").read_text())
    rows, pareto = search["latency_onnxruntime"], search["pareto"]
    front = [pareto["points"][i]["modules"] for i in pareto["front"]]
    assert rows[0]["modules"] == [] and rows[0]["ratio_to_int8"] == 1.0
    assert [r["modules"] for r in rows[1:len(front)]] == [m for m in front if m]
    assert any(m and not any(x.startswith("pts_voxel_encoder") for x in m) for m in front)
    assert all(r["median_ms"] > 0 and r["ratio_ci95"][0] <= r["ratio_to_int8"] <= r["ratio_ci95"][1] for r in rows)
    assert "| ORT ms |" in (out / "sensitivity.md").read_text()
    with pytest.raises(InputError, match="--int16-sensitive"):
        quantize(recipe, synth_converted_dir, tmp_path / "q2", quiet=True, latency_cost=True)
