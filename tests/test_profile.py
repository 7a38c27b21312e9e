"""Per-stage breakdown, peak memory and the bench report."""

import json

import pytest
from click.testing import CliRunner

from deploykit.bench import bench_model
from deploykit.cli import main
from deploykit.models import ARCHITECTURES
from deploykit.profile import CUSTOM_OPS, LAYOUT, UNATTRIBUTED, group_events, stage_breakdown, stage_of

BEV_STAGES = ARCHITECTURES["bevformer"].stages


@pytest.mark.parametrize("node, stage", [
    ("/pts_bbox_head/encoder/layers.0/attentions.1/Add", "BEV encoder"),  # longest prefix wins
    ("/pts_bbox_head/decoder/layers.2/MatMul", "decoder"),
    ("/pts_bbox_head/can_bus_mlp/norm/LayerNormalization", "embeddings and heads"),
    ("fused /img_backbone/layer1/layer1.0/conv1/Conv", "image backbone"),  # ORT's fused nodes keep the name
    ("/pts_bbox_head/encoderx/Add", "embeddings and heads"),  # a prefix is a whole path component
    ("/something_else/Conv", "something_else"),  # no table entry: the top-level module
    ("_inlfunc_MultiScaleDeformableAttn_b2q256_msda/GridSample_34", CUSTOM_OPS),
    ("ReorderOutput_token_91", LAYOUT),
    ("Cast_73", UNATTRIBUTED),
    ("/Add", UNATTRIBUTED),
])
def test_stage_of(node, stage):
    assert stage_of(node, BEV_STAGES) == stage


def test_warm_up_run_is_dropped_and_time_is_per_run():
    def run(conv_us, other_us):
        return [{"cat": "Node", "name": "/pts_backbone/c/Conv_kernel_time", "dur": conv_us},
                {"cat": "Node", "name": "/pts_neck/d/Relu_kernel_time", "dur": other_us},
                {"cat": "Node", "name": "/pts_neck/d/Relu_fence_before", "dur": 999},  # not a kernel
                {"cat": "Session", "name": "model_run", "dur": 1}]

    events = [{"cat": "Session", "name": "session_initialization", "dur": 5}] + run(50_000, 50_000) \
        + run(3000, 1000) + run(5000, 1000)
    rows = group_events(events, runs=2, stages=ARCHITECTURES["centerpoint_pillar"].stages)
    assert rows == [{"stage": "backbone", "ms_per_run": 4.0, "share": 0.8, "nodes": 1},
                    {"stage": "neck", "ms_per_run": 1.0, "share": 0.2, "nodes": 1}]


def test_pillar_model_breakdown(converted_dir):
    rows = stage_breakdown(converted_dir / "model.onnx", runs=3, threads=1,
                           stages=ARCHITECTURES["centerpoint_pillar"].stages)
    names = {r["stage"] for r in rows}
    assert {"pillar encoder", "backbone", "neck", "heads"} <= names
    assert sum(r["share"] for r in rows) == pytest.approx(1.0)
    assert all(r["ms_per_run"] > 0 and r["nodes"] > 0 for r in rows)


def test_bench_reports_memory_size_stages_and_writes_a_report(converted_dir, tmp_path):
    result = bench_model(converted_dir / "model.onnx", warmup=1, iterations=3, threads=1, stages=True)
    assert result["recipe"] == "centerpoint_pillar_small"
    assert result["peak_memory_bytes"] > result["model_bytes"]  # the weights alone are resident once loaded
    assert result["stages"][0]["ms_per_run"] > 0
    out = tmp_path / "report"
    cli = CliRunner().invoke(main, ["bench", str(converted_dir / "model.onnx"), "--warmup", "1", "-n", "3",
                                    "--threads", "1", "--stages", "--report", str(out)])
    assert cli.exit_code == 0, cli.output
    assert sorted(p.name for p in out.iterdir()) == ["bench.json", "bench.md", "bench.png"]
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "bench.md").read_text()
    assert "## Stages of" in md and "pillar encoder" in md and "peak MB" in md
    saved = json.loads((out / "bench.json").read_text())["results"][0]
    assert saved["settings"]["intra_op_threads"] == 1 and saved["machine"]["cores"] >= 1


def test_profiling_leaves_nothing_in_the_working_directory(converted_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    stage_breakdown(converted_dir / "model.onnx", runs=1, threads=1)
    assert list(tmp_path.iterdir()) == []
