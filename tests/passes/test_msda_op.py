import pytest

from deploykit.errors import RecipeError
from deploykit.passes import msda_op
from tests.passes.bev_helpers import export_bev, worst_rel
from tests.passes.helpers import op_counts


def test_custom_op_matches_reference_exactly(bev_model, bev_samples):
    # In PyTorch the op runs the same reference code: any difference is a wiring bug.
    assert worst_rel(bev_model, msda_op.apply(bev_model), bev_samples) == 0.0


def test_onnx_has_one_node_per_attention_and_no_gridsample(bev_model, bev_samples, tmp_path):
    cfg = bev_model.config
    calls = 2 * cfg.encoder_layers + cfg.decoder_layers  # TSA + SCA per encoder layer, one per decoder layer
    before = op_counts(export_bev(bev_model, bev_samples[0], tmp_path))
    assert before["GridSample"] == calls * cfg.num_levels - cfg.encoder_layers * (cfg.num_levels - 1) - \
        cfg.decoder_layers * (cfg.num_levels - 1)
    graph = export_bev(msda_op.apply(bev_model), bev_samples[0], tmp_path)
    ops = op_counts(graph)
    assert ops["MultiScaleDeformableAttn"] == calls and ops["GridSample"] == 0
    assert {n.domain for n in graph.graph.node if n.op_type == "MultiScaleDeformableAttn"} == {"deploykit"}


def test_runs_once(bev_model):
    with pytest.raises(RecipeError, match="already converted"):
        msda_op.apply(msda_op.apply(bev_model))
