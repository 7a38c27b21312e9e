"""Spatial cross-attention over all BEV queries -> the static virtual-BEV layout.

Each camera sees only a fraction of the BEV (one or two cameras per pillar),
so attending with every query from every camera wastes most of the work;
BEVFormer gathers the visible queries per camera with a data-dependent
``nonzero``, which no static-shape compiler accepts. With the rig fixed at
export time the gather is a constant: this pass plans it once
(deploykit.camera.virtual_bev), keeping at most ``max_numcam_overlap``
cameras per pillar and ``virtual_bev_h x virtual_bev_w`` slots per camera.
Scattering back is then also a gather: each query reads its (at most
``max_numcam_overlap``) camera slots, in camera order, from the flattened
results plus one zero row, which adds up exactly as BEVFormer's ``+=`` loop.

Where the caps do not bind the result equals BEVFormer's; where they do, the
dropped camera-pillar pairs are listed in the coverage report and the
deviation is measured by deploykit.passes.sca_virtual_bev.deviation.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from ..camera.rig import load_rig
from ..camera.virtual_bev import VirtualBEV, plan_virtual_bev
from ..errors import RecipeError
from ..models.bevformer.attention import SpatialCrossAttention
from ..models.bevformer.transformer import BEVFormerEncoder

NAME = "sca_virtual_bev"


class VirtualBEVSpatialCrossAttention(nn.Module):
    def __init__(self, sca: SpatialCrossAttention, plan: VirtualBEV, reference_points_cam: torch.Tensor):
        super().__init__()
        self.num_cams = sca.num_cams
        self.deformable_attention = sca.deformable_attention
        self.output_proj = sca.output_proj
        self.residual = sca.residual
        self.coverage = plan.coverage
        num_cams, num_queries = plan.kept.shape
        slots = plan.indices  # (N, S), padding = num_queries
        used = slots < num_queries
        # Empty slots attend with query 0 and zero reference points; nothing reads their result.
        gather = np.where(used, slots, 0)
        ref = reference_points_cam[:, 0].numpy()  # (N, Q, D, 2)
        slot_ref = np.where(used[..., None, None], ref[np.arange(num_cams)[:, None], gather], 0).astype(np.float32)
        # For each query, the flat (camera * S + slot) of its kept cameras in camera order;
        # the zero row at N*S stands in for "no further camera".
        k = max(int(plan.kept.sum(0).max()), 1)
        inverse = np.full((k, num_queries), num_cams * plan.slots, np.int64)
        filled = np.zeros(num_queries, np.int64)
        for cam in range(num_cams):
            for slot in np.flatnonzero(used[cam]):
                q = slots[cam, slot]
                inverse[filled[q], q] = cam * plan.slots + slot
                filled[q] += 1
        self.register_buffer("gather_index", torch.from_numpy(gather.reshape(-1)), persistent=False)
        self.register_buffer("slot_reference_points", torch.from_numpy(slot_ref), persistent=False)
        self.register_buffer("scatter_index", torch.from_numpy(inverse), persistent=False)
        self.register_buffer("count", torch.from_numpy(plan.count), persistent=False)

    def forward(self, query, value, reference_points_cam, bev_mask, shapes):  # noqa: ARG002 - planned at export
        bs, num_query, dims = query.shape
        n, length, _, _ = value.shape
        slots = self.slot_reference_points.shape[1]
        queries = query[:, self.gather_index].reshape(bs * n, slots, dims)
        refs = self.slot_reference_points[None].expand(bs, -1, -1, -1, -1).reshape(bs * n, slots, -1, 2)
        value = value.permute(2, 0, 1, 3).reshape(bs * n, length, dims)
        out = self.deformable_attention(queries, value, refs, shapes).reshape(bs, n * slots, dims)
        flat = torch.cat([out, out.new_zeros(bs, 1, dims)], 1)
        gathered = flat[:, self.scatter_index[0]]
        for k in range(1, self.scatter_index.shape[0]):
            gathered = gathered + flat[:, self.scatter_index[k]]
        return self.residual(self.output_proj(gathered / self.count[:, None]), query)


def plan_for(model: nn.Module, encoder: BEVFormerEncoder) -> VirtualBEV:
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "camera", cfg)  # BEVFusion: its camera stream's
    if cfg is None or not hasattr(cfg, "virtual_bev"):
        raise RecipeError(f"pass '{NAME}' needs a BEVFormer model whose config has a [model.virtual_bev] table")
    vb = cfg.virtual_bev
    rig = load_rig(cfg.rig)
    mask = encoder.bev_mask[:, 0].numpy()
    return plan_virtual_bev(rig, mask, max_cams_per_pillar=vb.max_numcam_overlap, virtual_h=vb.virtual_bev_h,
                            virtual_w=vb.virtual_bev_w)


def apply(model: nn.Module) -> nn.Module:
    model = copy.deepcopy(model)
    encoders = [m for m in model.modules() if isinstance(m, BEVFormerEncoder)]
    targets = [(e, layer) for e in encoders for layer in e.layers
               if type(layer.attentions[1]) is SpatialCrossAttention]
    if not targets:
        raise RecipeError(f"pass '{NAME}' found no dense spatial cross-attention to rewrite (already converted?)")
    plans = {id(e): plan_for(model, e) for e in encoders}
    for encoder, layer in targets:
        layer.attentions[1] = VirtualBEVSpatialCrossAttention(layer.attentions[1], plans[id(encoder)],
                                                              encoder.reference_points_cam)
    return model


def coverage(model: nn.Module) -> dict | None:
    """The virtual-BEV coverage report of a rewritten model, or None."""
    for m in model.modules():
        if isinstance(m, VirtualBEVSpatialCrossAttention):
            return m.coverage
    return None
