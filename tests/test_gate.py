"""The regression gate: planted slowdowns fail, unchanged models pass, bad baselines are refused."""

import contextlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from deploykit.cli import main
from deploykit.gate import FORMAT, decide, gate, update_baseline


def conv_chain(path, layers: int, side: int = 48):
    """``layers`` identical 3x3 convs: k + 20% layers is a planted 20% slowdown."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array((rng.standard_normal((16, 16, 3, 3)) * 0.05).astype(np.float32), "w")
    nodes, x = [], "x"
    for i in range(layers):
        nodes.append(helper.make_node("Conv", [x, "w"], [f"c{i}"], pads=[1, 1, 1, 1]))
        x = f"c{i}"
    shape = [1, 16, side, side]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, shape)], [w])
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.fixture(scope="module")
def chains(tmp_path_factory):
    root = tmp_path_factory.mktemp("gate")
    base = conv_chain(root / "base" / "model.onnx", 10)
    same = conv_chain(root / "same" / "model.onnx", 10)
    slow = conv_chain(root / "slow" / "model.onnx", 12)
    baseline = root / "baseline.json"  # stores the model: candidates are timed against it, as in CI
    update_baseline(baseline, [base], rounds=30, store_models=True)
    return baseline, base, same, slow


@pytest.fixture()
def reference_baseline(chains, tmp_path):
    """A baseline without a stored model (reference-workload units), written right before use:
    that mode compares with a past measurement, so load must not change in between."""
    path = tmp_path / "reference.json"
    update_baseline(path, [chains[1]], rounds=30, store_models=False)
    return path


def test_ten_percent_slowdown_fails_at_the_default_five_percent_limit(chains, tmp_path):
    baseline, base, _, _ = chains
    slower = conv_chain(tmp_path / "c" / "model.onnx", 11)
    result = gate(baseline, slower, against=base)
    assert result.latency.limit == pytest.approx(1.05)
    assert result.latency.verdict == "fail", result.latency


def test_decision_rule():
    rng = np.random.default_rng(0)
    base = 1 + 0.03 * rng.standard_normal(40)
    assert decide(1.25 + 0.03 * rng.standard_normal(40), base, 0.10)[4] == "fail"
    assert decide(1.00 + 0.03 * rng.standard_normal(40), base, 0.10)[4] == "pass"
    ratio, lo, hi, p, verdict = decide(1.10 + 0.10 * rng.standard_normal(40), base, 0.10)
    assert lo < 1.10 < hi and verdict == "pass (inconclusive)" and 0 < p < 1  # only confident regressions fail


def test_planted_20_percent_slowdown_fails_and_unchanged_passes(chains):
    baseline, base, same, slow = chains
    slow_result = gate(baseline, slow)
    assert slow_result.latency.method == "interleaved A/B"
    assert not slow_result.passed and slow_result.latency.verdict == "fail"
    assert 1.12 < slow_result.latency.ratio < 1.3 and slow_result.latency.p_regression > 0.9
    for _ in range(3):  # repeated runs: no chance failures
        result = gate(baseline, same)
        assert result.passed, result.latency
        assert 0.92 < result.latency.ratio < 1.08


def test_reference_workload_mode(chains, reference_baseline):
    _, _, same, slow = chains
    slow_result = gate(reference_baseline, slow)
    assert slow_result.latency.method == "reference workload" and slow_result.latency.verdict == "fail"
    assert gate(reference_baseline, same).passed


def test_against_the_baseline_model_interleaved(chains):
    _, base, same, slow = chains
    baseline = chains[0]
    assert gate(baseline, slow, against=base).latency.verdict.startswith("fail")
    result = gate(baseline, same, against=base)
    assert result.passed and result.latency.method == "interleaved A/B"


def test_cli_exit_codes(chains, reference_baseline, tmp_path):
    baseline, base, same, slow = chains
    run = CliRunner().invoke
    assert run(main, ["gate", "--baseline", str(baseline), str(same)]).exit_code == 0
    failed = run(main, ["gate", "--baseline", str(baseline), str(slow), "--json", str(tmp_path / "v.json")])
    assert failed.exit_code == 10, failed.output
    assert "regression in" in failed.output
    assert json.loads((tmp_path / "v.json").read_text())["results"][0]["passed"] is False

    missing = run(main, ["gate", "--baseline", str(tmp_path / "none.json"), str(same)])
    assert missing.exit_code == 11 and "--update" in missing.output
    assert not (tmp_path / "none.json").exists()  # never written without --update

    data = json.loads(reference_baseline.read_text())
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**data, "machine_class": {"cpu": "Some Other CPU", "cores": 64}}))
    refused = run(main, ["gate", "--baseline", str(other), str(same)])
    assert refused.exit_code == 11 and "machine class" in refused.output
    # "warn" goes on to measure in reference units, whose verdict a change of load can move
    # (test_the_default_gate_holds_when_load_changes_between_update_and_check): not asserted here.
    warned = run(main, ["gate", "--baseline", str(other), str(same), "--other-machine", "warn"])
    assert warned.exit_code in (0, 10) and "does not carry across machine classes" in warned.output

    (tmp_path / "bad.json").write_text("{not json")
    assert run(main, ["gate", "--baseline", str(tmp_path / "bad.json"), str(same)]).exit_code == 11
    (tmp_path / "old.json").write_text(json.dumps({**data, "format": "something-else"}))
    assert run(main, ["gate", "--baseline", str(tmp_path / "old.json"), str(same)]).exit_code == 11

    renamed = tmp_path / "x" / "model.int8.qdq.onnx"
    renamed.parent.mkdir()
    shutil.copy(same, renamed)
    no_entry = run(main, ["gate", "--baseline", str(baseline), str(renamed)])
    assert no_entry.exit_code == 11 and "no entry for model.int8.qdq.onnx" in no_entry.output

    garbage = tmp_path / "g" / "model.onnx"
    garbage.parent.mkdir()
    garbage.write_bytes(b"not an onnx file")
    assert run(main, ["gate", "--baseline", str(baseline), str(garbage)]).exit_code == 9


def test_baseline_of_another_recipe_is_refused(chains, tmp_path):
    baseline, _, same, _ = chains
    cand = tmp_path / "c" / "model.onnx"
    cand.parent.mkdir()
    shutil.copy(same, cand)
    (cand.parent / "manifest.json").write_text(json.dumps({"recipe": {"name": "bevformer_small"}}))
    data = json.loads(baseline.read_text())
    other = tmp_path / "b.json"
    other.write_text(json.dumps({**data, "recipe": "centerpoint_pillar_small"}))
    result = CliRunner().invoke(main, ["gate", "--baseline", str(other), str(cand)])
    assert result.exit_code == 11 and "recipe bevformer_small" in result.output


def test_fidelity_regression_fails_without_timing_noise(chains, tmp_path):
    _, base, _, _ = chains

    def quantized_dir(name, sqnr, map_):
        d = tmp_path / name
        d.mkdir()
        shutil.copy(base, d / "model.int8.qdq.onnx")
        (d / "manifest.json").write_text(json.dumps({"recipe": "centerpoint_pillar_synth"}))
        (d / "fidelity.json").write_text(json.dumps({
            "int8": [{"name": "a", "sqnr_db": sqnr}, {"name": "b", "sqnr_db": sqnr + 5}],
            "task_map": {"int8": {"mAP": map_}}}))
        return d / "model.int8.qdq.onnx"

    baseline = tmp_path / "q.json"
    data = update_baseline(baseline, [quantized_dir("base", 25.0, 0.93)], rounds=10)
    assert data["entries"]["model.int8.qdq.onnx"]["fidelity"] == {"configuration": "int8", "worst_sqnr_db": 25.0,
                                                                   "worst_output": "a", "mAP": 0.93}
    ok = gate(baseline, quantized_dir("ok", 24.5, 0.925))  # within 1 dB and 0.01 mAP (the recipe's [gate])
    assert [f["passed"] for f in ok.fidelity] == [True, True]
    worse = gate(baseline, quantized_dir("worse", 22.0, 0.90))
    assert [f["passed"] for f in worse.fidelity] == [False, False] and not worse.passed


def test_gate_sqnr_counts_only_the_recipes_target_outputs():
    from deploykit.gate import fidelity_summary

    report = {"target_outputs": ["heat"], "int8": [{"name": "heat", "sqnr_db": 30.0}, {"name": "vel", "sqnr_db": 12.0}]}
    assert fidelity_summary(report, "model.int8.qdq.onnx") == {"configuration": "int8", "worst_sqnr_db": 30.0,
                                                              "worst_output": "heat"}
    del report["target_outputs"]  # reports from before target outputs were recorded: all outputs count
    assert fidelity_summary(report, "model.int8.qdq.onnx")["worst_output"] == "vel"


def test_update_is_explicit_and_keeps_other_entries(chains, tmp_path):
    _, base, same, _ = chains
    baseline = tmp_path / "b.json"
    update_baseline(baseline, [base], rounds=5)
    other = tmp_path / "q" / "model.int8.qdq.onnx"
    other.parent.mkdir()
    shutil.copy(same, other)
    data = update_baseline(baseline, [other], rounds=5)
    assert data["format"] == FORMAT and set(data["entries"]) == {"model.onnx", "model.int8.qdq.onnx"}


def test_stored_baseline_model_is_timed_interleaved_on_any_machine(chains, tmp_path):
    _, base, same, slow = chains
    baseline = tmp_path / "recipe.json"
    update_baseline(baseline, [base], rounds=5, store_models=True)
    stored = tmp_path / "recipe" / "model.onnx"
    assert stored.read_bytes() == base.read_bytes()
    data = json.loads(baseline.read_text())
    assert data["entries"]["model.onnx"]["model_file"] == "recipe/model.onnx"
    baseline.write_text(json.dumps({**data, "machine_class": {"cpu": "Some Other CPU", "cores": 64}}))
    result = gate(baseline, slow)  # no machine-class refusal: both models are timed here
    assert result.latency.method == "interleaved A/B" and not result.passed
    assert gate(baseline, same).passed
    stored.write_bytes(slow.read_bytes())
    refused = CliRunner().invoke(main, ["gate", "--baseline", str(baseline), str(same)])
    assert refused.exit_code == 11 and "sha256 differs" in refused.output


def test_both_models_run_on_the_candidates_feeds(chains, tmp_path):
    from deploykit.errors import BaselineError

    _, base, _, _ = chains
    other = conv_chain(tmp_path / "o" / "model.onnx", 10, side=32)
    with pytest.raises(BaselineError, match="takes other inputs than the candidate"):
        gate(chains[0], other, against=base)


@pytest.mark.parametrize("damage", ["entries", "settings", "latency", "rounds", "machine_class"])
def test_a_baseline_missing_fields_is_one_line_and_exit_11(chains, tmp_path, damage):
    baseline, _, same, _ = chains
    data = json.loads(baseline.read_text())
    entry = data["entries"]["model.onnx"]
    if damage == "entries":
        del data["entries"]
    elif damage == "machine_class":
        del data["machine_class"]
    elif damage == "rounds":
        entry["latency"]["normalized_rounds"] = []
    else:
        del entry[damage]
    path = tmp_path / "damaged.json"
    path.write_text(json.dumps(data))
    result = CliRunner().invoke(main, ["gate", "--baseline", str(path), str(same)])
    assert result.exit_code == 11, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: baseline") and "malformed" in lines[0]
    assert "Traceback" not in result.output


def test_update_refuses_two_candidates_of_one_file_name(chains, tmp_path):
    _, base, same, _ = chains
    path = tmp_path / "two.json"
    result = CliRunner().invoke(main, ["gate", "--update", "--baseline", str(path), str(base), str(same)])
    assert result.exit_code == 11 and "2 candidates are named model.onnx" in result.output
    assert not path.exists()


@contextlib.contextmanager
def other_jobs():
    """Busy processes on every core, as other CI jobs on a shared runner: streaming through
    memory (64 MB copies), which contends for the caches and memory bandwidth as well as the cores."""
    job = "import numpy as np\na = np.ones(8_000_000); b = np.empty_like(a)\nwhile True: np.copyto(b, a)"
    procs = [subprocess.Popen([sys.executable, "-c", job]) for _ in range(os.cpu_count() or 2)]
    try:
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_stored_models_are_the_default(chains, tmp_path):
    _, base, _, _ = chains
    data = update_baseline(tmp_path / "b.json", [base], rounds=5)
    assert data["entries"]["model.onnx"]["model_file"] == "b/model.onnx"
    result = CliRunner().invoke(main, ["gate", "--update", "--no-store-models", "--baseline", str(tmp_path / "c.json"),
                                       str(base), "--rounds", "5"])
    assert result.exit_code == 0, result.output
    assert "model_file" not in json.loads((tmp_path / "c.json").read_text())["entries"]["model.onnx"]


@pytest.mark.parametrize("load", ["starts", "stops"])
def test_the_default_gate_holds_when_load_changes_between_update_and_check(chains, tmp_path, load):
    """Other jobs start (or stop) between writing the baseline and checking: the default
    gate (baseline model stored, timed interleaved) still passes the unchanged model and
    fails a planted 1.4x slowdown. The reference-workload mode runs under the same change,
    but its verdict is not asserted: that is the mode that flakes (measured: 2 failures in
    3 on an unchanged model; here its intervals straddle the limit, "inconclusive")."""
    _, base, same, _ = chains
    slower = conv_chain(tmp_path / "slower" / "model.onnx", 14)
    during_update = other_jobs() if load == "stops" else contextlib.nullcontext()
    during_check = other_jobs() if load == "starts" else contextlib.nullcontext()
    with during_update:
        update_baseline(tmp_path / "stored.json", [base], rounds=20)
        update_baseline(tmp_path / "reference.json", [base], rounds=20, store_models=False)
    with during_check:
        unchanged = gate(tmp_path / "stored.json", same)
        slow = gate(tmp_path / "stored.json", slower)
        reference = gate(tmp_path / "reference.json", same)
    assert unchanged.passed and unchanged.latency.method == "interleaved A/B", unchanged.latency
    assert slow.latency.verdict == "fail", slow.latency
    assert not unchanged.latency.warnings
    assert reference.latency.method == "reference workload" and reference.latency.rounds >= 20


def test_reference_mode_warns_when_the_reference_ran_at_another_speed(chains, reference_baseline, tmp_path):
    _, _, same, _ = chains
    data = json.loads(reference_baseline.read_text())
    assert not gate(reference_baseline, same).latency.warnings
    entry = data["entries"]["model.onnx"]["latency"]
    for factor in (0.5, 2.0):  # the machine then was twice as fast / as slow as now
        moved = tmp_path / f"moved{factor}.json"
        moved.write_text(json.dumps({**data, "entries": {"model.onnx": {**data["entries"]["model.onnx"], "latency": {
            **entry, "reference_median_ms": entry["reference_median_ms"] * factor}}}}))
        warnings = gate(moved, same).latency.warnings
        assert len(warnings) == 1 and "load changed" in warnings[0] and "--no-store-models" in warnings[0]
