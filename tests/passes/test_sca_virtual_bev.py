import dataclasses
import json

import pytest
import torch

from deploykit.camera.rig import camera_looking
from deploykit.compare import agreement
from deploykit.errors import RecipeError, RigError
from deploykit.models.bevformer import BEVFormer
from deploykit.passes import sca_virtual_bev
from deploykit.samples import torch_outputs
from tests.passes.bev_helpers import export_bev, worst_rel


def _with(recipe, **virtual):
    vb = dataclasses.replace(recipe.model.virtual_bev, **virtual)
    return dataclasses.replace(recipe.model, virtual_bev=vb)


def _model_like(bev_model, cfg):
    model = BEVFormer(cfg).eval()
    model.load_state_dict(bev_model.state_dict())
    return model


def bevformer_rebatch_sca(sca, query, value, ref_cam, bev_mask, shapes):
    """BEVFormer's SpatialCrossAttention.forward, transcribed: nonzero() gather per
    camera, zero-padded to the longest list, ``+=`` scatter in camera order."""
    bs, num_query, dims = query.shape
    indexes = [m[0].sum(-1).nonzero().squeeze(-1) for m in bev_mask]
    max_len = max(len(i) for i in indexes)
    d = ref_cam.size(3)
    queries = query.new_zeros(bs, sca.num_cams, max_len, dims)
    refs = ref_cam.new_zeros(bs, sca.num_cams, max_len, d, 2)
    for j in range(bs):
        for i, ref in enumerate(ref_cam):
            queries[j, i, :len(indexes[i])] = query[j, indexes[i]]
            refs[j, i, :len(indexes[i])] = ref[j, indexes[i]]
    n, length, _, _ = value.shape
    value = value.permute(2, 0, 1, 3).reshape(bs * n, length, dims)
    out = sca.deformable_attention(queries.view(bs * n, max_len, dims), value, refs.view(bs * n, max_len, d, 2),
                                   shapes).view(bs, n, max_len, dims)
    slots = torch.zeros_like(query)
    for j in range(bs):
        for i, index in enumerate(indexes):
            slots[j, index] += out[j, i, :len(index)]
    count = (bev_mask.sum(-1) > 0).permute(1, 2, 0).sum(-1).clamp(min=1.0)
    return sca.output_proj(slots / count[..., None]) + query


def _sca_inputs(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    enc = model.pts_bbox_head.transformer.encoder
    shapes = [(6, 10), (3, 5)][: cfg.num_levels]
    length = sum(h * w for h, w in shapes)
    query = torch.randn(1, cfg.num_bev_queries, cfg.embed_dims, generator=g)
    value = torch.randn(cfg.num_cams, length, 1, cfg.embed_dims, generator=g)
    return enc, query, value, shapes


def test_dense_sca_equals_bevformer_rebatch(bev_model):
    enc, query, value, shapes = _sca_inputs(bev_model)
    sca = enc.layers[0].attentions[1]
    with torch.no_grad():
        ref = bevformer_rebatch_sca(sca, query, value, enc.reference_points_cam, enc.bev_mask, shapes)
        dense = sca(query, value, enc.reference_points_cam, enc.bev_mask, shapes)
    torch.testing.assert_close(dense, ref, rtol=1e-5, atol=1e-5)


def test_virtual_sca_equals_bevformer_rebatch_exactly_when_caps_do_not_bind(bev_model):
    after = sca_virtual_bev.apply(bev_model)
    cov = sca_virtual_bev.coverage(after)
    assert cov["hits_kept"] == cov["camera_pillar_hits"]
    enc, query, value, shapes = _sca_inputs(bev_model, seed=1)
    virtual = after.pts_bbox_head.transformer.encoder.layers[0].attentions[1]
    with torch.no_grad():
        ref = bevformer_rebatch_sca(enc.layers[0].attentions[1], query, value, enc.reference_points_cam,
                                    enc.bev_mask, shapes)
        out = virtual(query, value, None, None, shapes)
    # Same gathers, same camera order in the sum: bit-exact.
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_whole_model_within_fp32_tolerance(bev_model, bev_samples):
    assert worst_rel(bev_model, sca_virtual_bev.apply(bev_model), bev_samples) <= 1e-5


def test_binding_cap_reports_coverage_and_deviation(bev_model, bev_recipe, bev_samples):
    capped = _model_like(bev_model, _with(bev_recipe, max_numcam_overlap=1))
    after = sca_virtual_bev.apply(capped)
    cov = sca_virtual_bev.coverage(after)
    assert cov["hits_kept"] < cov["camera_pillar_hits"] and cov["pillars_losing_a_camera"] > 0
    json.dumps(cov)  # goes into manifest.json
    ref = torch_outputs(capped, bev_samples[1].feeds)["bev_embed"]
    out = torch_outputs(after, bev_samples[1].feeds)["bev_embed"]
    dev = agreement("bev_embed", ref, out)
    # Pillars lose a camera by design: a visible but bounded change of the BEV.
    assert 1e-4 < dev.max_rel_error and 0.9 < dev.cosine < 1.0


def test_too_small_virtual_grid_suggests_sizes(bev_model, bev_recipe):
    small = _model_like(bev_model, _with(bev_recipe, virtual_bev_h=4, virtual_bev_w=10))
    with pytest.raises(RigError, match=r"virtual_bev_h=7 with virtual_bev_w=10"):
        sca_virtual_bev.apply(small)


def test_camera_seeing_no_pillar_is_named(bev_model, bev_recipe, tmp_path, monkeypatch):
    from deploykit.camera import rig as rig_module

    rig = json.loads((rig_module.RIGS_DIR / "nuscenes_surround.json").read_text())
    rig["cameras"][3] = camera_looking("CAM_BACK", 180.0, (0.0, 0.0, 1.8), 1266.0, 816.0, 491.0, pitch_deg=-90.0)
    (tmp_path / "sky.json").write_text(json.dumps(rig))
    cfg = dataclasses.replace(bev_recipe.model, rig=str(tmp_path / "sky.json"))
    with pytest.raises(RigError, match="camera CAM_BACK sees none of the 256 BEV pillars"):
        sca_virtual_bev.apply(_model_like(bev_model, cfg))


def test_onnx_sca_attends_only_virtual_slots(bev_model, bev_samples, tmp_path):
    def sca_queries(graph):
        # SCA's attention_weights Linear runs on (bs*N, queries, C): its MatMul output tells the query count.
        shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in graph.graph.value_info}
        names = [n.output[0] for n in graph.graph.node if "attentions.1/deformable_attention/attention_weights"
                 in n.name and n.op_type == "MatMul"]
        return {shapes[n][1] for n in names if n in shapes}

    import onnx

    cfg = bev_model.config
    dense = onnx.shape_inference.infer_shapes(export_bev(bev_model, bev_samples[0], tmp_path, simplified=True))
    virtual = onnx.shape_inference.infer_shapes(export_bev(sca_virtual_bev.apply(bev_model), bev_samples[0],
                                                           tmp_path, "v.onnx", simplified=True))
    vb = cfg.virtual_bev
    assert sca_queries(dense) == {cfg.num_bev_queries}
    assert sca_queries(virtual) == {vb.virtual_bev_h * vb.virtual_bev_w}
    assert not any(n.op_type == "NonZero" for n in virtual.graph.node)


def test_needs_dense_sca(bev_model):
    with pytest.raises(RecipeError, match="already converted"):
        sca_virtual_bev.apply(sca_virtual_bev.apply(bev_model))
