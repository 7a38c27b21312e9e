"""BEVFormer's encoder, decoder and PerceptionTransformer (public key names)."""

from __future__ import annotations

import torch
from torch import nn

from .attention import (FFN, CustomMSDeformableAttention, MSDeformableAttention3D, MultiheadAttention,
                        SpatialCrossAttention, TemporalSelfAttention)


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    # mmdet's clamped logit; the clamps keep refined references finite at 0 and 1.
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def reference_points_2d(bev_h: int, bev_w: int) -> torch.Tensor:
    """(1, H*W, 1, 2) cell centres normalised to [0, 1], (x, y), as BEVFormerEncoder builds them."""
    ys, xs = torch.meshgrid(torch.linspace(0.5, bev_h - 0.5, bev_h), torch.linspace(0.5, bev_w - 0.5, bev_w),
                            indexing="ij")
    return torch.stack((xs.reshape(-1) / bev_w, ys.reshape(-1) / bev_h), -1)[None, :, None, :]


class BEVFormerLayer(nn.Module):
    """self_attn (TSA), norm, cross_attn (SCA), norm, ffn, norm."""

    def __init__(self, cfg):
        super().__init__()
        c = cfg.embed_dims
        self.attentions = nn.ModuleList([
            TemporalSelfAttention(c, cfg.num_heads, 1, cfg.tsa_points),
            SpatialCrossAttention(c, cfg.num_cams,
                                  MSDeformableAttention3D(c, cfg.num_heads, cfg.num_levels, cfg.sca_points)),
        ])
        self.ffns = nn.ModuleList([FFN(c, cfg.ffn_dims)])
        self.norms = nn.ModuleList([nn.LayerNorm(c) for _ in range(3)])

    def forward(self, query, temporal_value, bev_pos, ref_2d, bev_shape, feats, ref_cam, bev_mask, shapes):
        query = self.norms[0](self.attentions[0](query, temporal_value, bev_pos, ref_2d, bev_shape))
        query = self.norms[1](self.attentions[1](query, feats, ref_cam, bev_mask, shapes))
        return self.norms[2](self.ffns[0](query))


class BEVFormerEncoder(nn.Module):
    def __init__(self, cfg, reference_points_cam: torch.Tensor, bev_mask: torch.Tensor):
        super().__init__()
        self.bev_shape = (cfg.bev_h, cfg.bev_w)
        self.layers = nn.ModuleList([BEVFormerLayer(cfg) for _ in range(cfg.encoder_layers)])
        # The rig is fixed at build time, so BEVFormer's point_sampling is a constant
        # of the deployed model: (N, 1, Q, D, 2) image coordinates and (N, 1, Q, D) visibility.
        self.register_buffer("reference_points_cam", reference_points_cam, persistent=False)
        self.register_buffer("bev_mask", bev_mask, persistent=False)
        self.register_buffer("ref_2d", reference_points_2d(cfg.bev_h, cfg.bev_w), persistent=False)

    def forward(self, bev_query, feats, bev_pos, shapes, prev_bev, shift, use_prev_bev):
        """bev_query, bev_pos, prev_bev (bs, Q, C); feats (N, L, bs, C); shift (bs, 2); use_prev_bev (1,).

        BEVFormer takes a different path on a scene's first frame (no previous
        BEV: TSA attends to the current query twice, unshifted). The engine has
        one static graph, so both paths are computed from the same tensors and
        selected with ``use_prev_bev`` in {0, 1}, which is exact: x*1 + y*0 == x.
        """
        bs, num_query, dims = bev_query.shape
        ref_2d = self.ref_2d.expand(bs, -1, -1, -1)
        shifted = ref_2d + (use_prev_bev * shift)[:, None, None, :]
        ref_2d_hybrid = torch.stack([shifted, ref_2d], 1).reshape(bs * 2, num_query, 1, 2)
        with_prev = torch.stack([prev_bev, bev_query], 1).reshape(bs * 2, num_query, dims)
        ref_cam = self.reference_points_cam.expand(-1, bs, -1, -1, -1)
        bev_mask = self.bev_mask.expand(-1, bs, -1, -1)
        query = bev_query
        for layer in self.layers:
            first_frame = torch.stack([query, query], 1).reshape(bs * 2, num_query, dims)
            temporal_value = use_prev_bev * with_prev + (1 - use_prev_bev) * first_frame
            query = layer(query, temporal_value, bev_pos, ref_2d_hybrid, self.bev_shape, feats, ref_cam, bev_mask,
                          shapes)
        return query


class DetrTransformerDecoderLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        c = cfg.embed_dims
        self.attentions = nn.ModuleList([
            MultiheadAttention(c, cfg.num_heads),
            CustomMSDeformableAttention(c, cfg.num_heads, 1, cfg.decoder_points),
        ])
        self.ffns = nn.ModuleList([FFN(c, cfg.ffn_dims)])
        self.norms = nn.ModuleList([nn.LayerNorm(c) for _ in range(3)])

    def forward(self, query, query_pos, value, reference_points, bev_shape):
        query = self.norms[0](self.attentions[0](query, query_pos))
        query = self.norms[1](self.attentions[1](query, value, query_pos, reference_points, [bev_shape]))
        return self.norms[2](self.ffns[0](query))


class DetectionTransformerDecoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layers = nn.ModuleList([DetrTransformerDecoderLayer(cfg) for _ in range(cfg.decoder_layers)])

    def forward(self, query, query_pos, value, reference_points, reg_branches, bev_shape):
        """Returns the last layer's output and the reference points it was given:
        deployment needs only the final predictions, so the refinement after the
        last layer (used by training's auxiliary losses) is not computed."""
        for i, layer in enumerate(self.layers):
            query = layer(query, query_pos, value, reference_points[..., :2].unsqueeze(2), bev_shape)
            if i + 1 < len(self.layers):
                delta = reg_branches[i](query.permute(1, 0, 2))
                xy = delta[..., :2] + inverse_sigmoid(reference_points[..., :2])
                z = delta[..., 4:5] + inverse_sigmoid(reference_points[..., 2:3])
                reference_points = torch.cat([xy, z], -1).sigmoid()
        return query, reference_points


class _Decoding:
    """The DETR half of PerceptionTransformer (``decoder`` and ``reference_points``):
    BEVFormer's own, and the detection head BEVFusion runs on the fused BEV."""

    def _build_decoding(self, cfg) -> None:
        self.decoder = DetectionTransformerDecoder(cfg)
        self.reference_points = nn.Linear(cfg.embed_dims, 3)
        self.embed_dims = cfg.embed_dims

    def decode(self, bev_embed, object_query_embed, reg_branches, bev_shape):
        bs = bev_embed.shape[0]
        query_pos, query = torch.split(object_query_embed, self.embed_dims, dim=1)
        query_pos = query_pos[None].expand(bs, -1, -1)
        query = query[None].expand(bs, -1, -1)
        reference_points = self.reference_points(query_pos).sigmoid()
        return self.decoder(query.permute(1, 0, 2), query_pos.permute(1, 0, 2), bev_embed.permute(1, 0, 2),
                            reference_points, reg_branches, bev_shape)


class DecoderTransformer(_Decoding, nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self._build_decoding(cfg)


class PerceptionTransformer(_Decoding, nn.Module):
    """``decoder=False`` builds the BEV encoder alone (BEVFusion's camera stream)."""

    def __init__(self, cfg, reference_points_cam: torch.Tensor, bev_mask: torch.Tensor, decoder: bool = True):
        super().__init__()
        c = cfg.embed_dims
        self.encoder = BEVFormerEncoder(cfg, reference_points_cam, bev_mask)
        if decoder:
            self._build_decoding(cfg)
        self.level_embeds = nn.Parameter(torch.zeros(cfg.num_feature_levels, c))
        self.cams_embeds = nn.Parameter(torch.zeros(cfg.num_cams, c))
        self.can_bus_mlp = nn.Sequential(nn.Linear(18, c // 2), nn.ReLU(inplace=True), nn.Linear(c // 2, c),
                                         nn.ReLU(inplace=True))
        self.can_bus_mlp.add_module("norm", nn.LayerNorm(c))
        self.embed_dims = c

    def get_bev_features(self, mlvl_feats, bev_queries, bev_pos, can_bus, prev_bev, shift, use_prev_bev):
        """mlvl_feats: list of (bs, N, C, h, w); bev_queries (Q, C); bev_pos (bs, C, H, W)."""
        bs = mlvl_feats[0].shape[0]
        bev_pos = bev_pos.flatten(2).transpose(1, 2)  # (bs, Q, C)
        bev_queries = bev_queries[None] + self.can_bus_mlp(can_bus)[:, None, :]
        flat, shapes = [], []
        for lvl, feat in enumerate(mlvl_feats):
            _, n, _, h, w = feat.shape
            feat = feat.flatten(3).permute(1, 0, 3, 2) + self.cams_embeds[:, None, None, :]
            flat.append(feat + self.level_embeds[None, None, lvl:lvl + 1, :])
            shapes.append((int(h), int(w)))  # Python ints: constants of the traced graph
        feats = torch.cat(flat, 2).permute(0, 2, 1, 3)  # (N, L, bs, C)
        return self.encoder(bev_queries.expand(bs, -1, -1), feats, bev_pos, shapes, prev_bev, shift, use_prev_bev)
