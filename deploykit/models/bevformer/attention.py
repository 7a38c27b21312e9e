"""BEVFormer's attention blocks with the public key names.

Every deformable-attention call goes through a parameter-free ``Sampler``
submodule so that the ``msda_op`` pass can swap the PyTorch reference for the
``deploykit::MultiScaleDeformableAttn`` custom op without touching weights, and
TSA's reduction over the BEV queue goes through ``QueueMean`` so that
``tsa_mean_to_conv`` can swap it for a fixed-weight 1x1 conv.
"""

from __future__ import annotations

import torch
from torch import nn

from ...ops import multi_scale_deformable_attn as msda
from ..layers import Add


def level_tensors(shapes: list[tuple[int, int]], device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(spatial_shapes, level_start_index) as mmcv expects them, int64."""
    spatial = torch.tensor(shapes, dtype=torch.long, device=device)
    starts, total = [], 0
    for h, w in shapes:
        starts.append(total)
        total += h * w
    return spatial, torch.tensor(starts, dtype=torch.long, device=device)


def offset_normalizer(shapes: list[tuple[int, int]]) -> torch.Tensor:
    """(levels, 2) = (W, H) per level: offsets are in pixels of each level."""
    return torch.tensor([[w, h] for h, w in shapes], dtype=torch.float32)


class Sampler(nn.Module):
    """mmcv multi-scale deformable attention, PyTorch reference (grid_sample)."""

    def forward(self, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        return msda.reference(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


class QueueMean(nn.Module):
    """TSA's average over the BEV queue (previous, current): (bs*queue, Q, C) -> (bs, Q, C)."""

    def __init__(self, num_bev_queue: int):
        super().__init__()
        self.num_bev_queue = num_bev_queue

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, q, c = x.shape
        return x.view(n // self.num_bev_queue, self.num_bev_queue, q, c).mean(1)


class TemporalSelfAttention(nn.Module):
    def __init__(self, embed_dims: int, num_heads: int, num_levels: int, num_points: int, num_bev_queue: int = 2):
        super().__init__()
        if embed_dims % num_heads:
            raise ValueError(f"embed_dims {embed_dims} is not divisible by num_heads {num_heads}")
        self.num_heads, self.num_levels, self.num_points = num_heads, num_levels, num_points
        self.num_bev_queue = num_bev_queue
        n = num_bev_queue * num_heads * num_levels * num_points
        self.sampling_offsets = nn.Linear(embed_dims * num_bev_queue, n * 2)
        self.attention_weights = nn.Linear(embed_dims * num_bev_queue, n)
        self.value_proj = nn.Linear(embed_dims, embed_dims)
        self.output_proj = nn.Linear(embed_dims, embed_dims)
        self.sampler = Sampler()
        self.queue_reduce = QueueMean(num_bev_queue)
        self.residual = Add()

    def forward(self, query, value, query_pos, reference_points, bev_shape: tuple[int, int]):
        """query (bs, Q, C); value (bs*queue, Q, C) = [previous BEV, current]; reference_points (bs*queue, Q, 1, 2)."""
        identity = query
        query = query + query_pos
        bs, num_query, _ = query.shape
        queue, heads, levels, points = self.num_bev_queue, self.num_heads, self.num_levels, self.num_points
        # The offsets see the previous BEV next to the current query.
        query = torch.cat([value[:bs], query], -1)
        value = self.value_proj(value).reshape(bs * queue, num_query, heads, -1)
        offsets = self.sampling_offsets(query).view(bs, num_query, heads, queue, levels, points, 2)
        weights = self.attention_weights(query).view(bs, num_query, heads, queue, levels * points).softmax(-1)
        weights = weights.view(bs, num_query, heads, queue, levels, points).permute(0, 3, 1, 2, 4, 5)
        weights = weights.reshape(bs * queue, num_query, heads, levels, points)
        offsets = offsets.permute(0, 3, 1, 2, 4, 5, 6).reshape(bs * queue, num_query, heads, levels, points, 2)
        shapes = [bev_shape] * levels
        locations = reference_points[:, :, None, :, None, :] + offsets / offset_normalizer(shapes)[None, None, None, :, None, :]
        spatial, starts = level_tensors(shapes)
        out = self.sampler(value, spatial, starts, locations, weights)
        return self.residual(self.output_proj(self.queue_reduce(out)), identity)


class _DeformableProjections(nn.Module):
    """The projections every deformable attention here shares: per query, offsets
    and softmaxed weights for heads x levels x points samples, and the value
    projection."""

    def __init__(self, embed_dims: int, num_heads: int, num_levels: int, num_points: int):
        super().__init__()
        self.num_heads, self.num_levels, self.num_points = num_heads, num_levels, num_points
        n = num_heads * num_levels * num_points
        self.sampling_offsets = nn.Linear(embed_dims, n * 2)
        self.attention_weights = nn.Linear(embed_dims, n)
        self.value_proj = nn.Linear(embed_dims, embed_dims)
        self.sampler = Sampler()

    def project(self, query, value):
        """query (B, Q, C), value (B, L, C) -> value (B, L, heads, C/heads), offsets
        (B, Q, heads, levels, points, 2) in pixels, weights (B, Q, heads, levels, points)."""
        bs, num_query, _ = query.shape
        heads, levels, points = self.num_heads, self.num_levels, self.num_points
        value = self.value_proj(value).view(bs, value.shape[1], heads, -1)
        offsets = self.sampling_offsets(query).view(bs, num_query, heads, levels, points, 2)
        weights = self.attention_weights(query).view(bs, num_query, heads, levels * points).softmax(-1)
        return value, offsets, weights.view(bs, num_query, heads, levels, points)


class MSDeformableAttention3D(_DeformableProjections):
    """SCA's inner attention: ``num_points`` samples spread over the pillar's Z anchors."""

    def forward(self, query, value, reference_points, shapes: list[tuple[int, int]]):
        """query (B, Q, C); value (B, L, C); reference_points (B, Q, D, 2) in [0, 1] image coordinates."""
        bs, num_query, _ = query.shape
        value, offsets, weights = self.project(query, value)
        heads, levels, points = self.num_heads, self.num_levels, self.num_points
        anchors = reference_points.shape[2]
        # Each of the pillar's Z anchors owns points // anchors consecutive samples.
        offsets = offsets / offset_normalizer(shapes)[None, None, None, :, None, :]
        offsets = offsets.view(bs, num_query, heads, levels, points // anchors, anchors, 2)
        locations = reference_points[:, :, None, None, None, :, :] + offsets
        locations = locations.view(bs, num_query, heads, levels, points, 2)
        spatial, starts = level_tensors(shapes)
        return self.sampler(value, spatial, starts, locations, weights)


class SpatialCrossAttention(nn.Module):
    """Dense form of BEVFormer's SCA: every camera attends with every BEV query and
    the results are masked by ``bev_mask``. BEVFormer gathers the visible queries
    per camera first (``queries_rebatch``); since each query's attention is
    independent of the others, the sum over visible cameras is the same, and this
    form exports with static shapes. ``sca_virtual_bev`` turns it into the sparse
    static layout."""

    def __init__(self, embed_dims: int, num_cams: int, deformable_attention: MSDeformableAttention3D):
        super().__init__()
        self.num_cams = num_cams
        self.deformable_attention = deformable_attention
        self.output_proj = nn.Linear(embed_dims, embed_dims)
        self.residual = Add()

    def forward(self, query, value, reference_points_cam, bev_mask, shapes: list[tuple[int, int]]):
        """query (bs, Q, C); value (N, L, bs, C); reference_points_cam (N, bs, Q, D, 2); bev_mask (N, bs, Q, D)."""
        bs, num_query, dims = query.shape
        n, length, _, _ = value.shape
        queries = query[:, None].expand(bs, n, num_query, dims).reshape(bs * n, num_query, dims)
        refs = reference_points_cam.transpose(0, 1).reshape(bs * n, num_query, -1, 2)
        value = value.permute(2, 0, 1, 3).reshape(bs * n, length, dims)
        out = self.deformable_attention(queries, value, refs, shapes).view(bs, n, num_query, dims)
        visible = (bev_mask.sum(-1) > 0).transpose(0, 1).to(out.dtype)  # (bs, N, Q)
        slots = (out * visible[..., None]).sum(1)
        count = visible.sum(1).clamp(min=1.0)
        return self.residual(self.output_proj(slots / count[..., None]), query)


class CustomMSDeformableAttention(_DeformableProjections):
    """The decoder's deformable cross-attention into the BEV (sequence-first I/O)."""

    def __init__(self, embed_dims: int, num_heads: int, num_levels: int, num_points: int):
        super().__init__(embed_dims, num_heads, num_levels, num_points)
        self.output_proj = nn.Linear(embed_dims, embed_dims)
        self.residual = Add()

    def forward(self, query, value, query_pos, reference_points, shapes: list[tuple[int, int]]):
        """query (nq, bs, C); value (L, bs, C); reference_points (bs, nq, levels, 2)."""
        identity = query
        value, offsets, weights = self.project((query + query_pos).permute(1, 0, 2), value.permute(1, 0, 2))
        locations = reference_points[:, :, None, :, None, :] + offsets / offset_normalizer(shapes)[None, None, None, :, None, :]
        spatial, starts = level_tensors(shapes)
        out = self.sampler(value, spatial, starts, locations, weights)
        return self.residual(self.output_proj(out).permute(1, 0, 2), identity)


class MultiheadAttention(nn.Module):
    """mmcv's wrapper: positional encoding on query and key, residual added, ``attn`` inside."""

    def __init__(self, embed_dims: int, num_heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(embed_dims, num_heads)
        self.residual = Add()

    def forward(self, query, query_pos):
        q = query + query_pos
        return self.residual(query, self.attn(q, q, query, need_weights=False)[0])


class FFN(nn.Module):
    """mmcv FFN with two fcs: ``layers.0.0`` and ``layers.1``, residual added."""

    def __init__(self, embed_dims: int, feedforward_channels: int):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Sequential(nn.Linear(embed_dims, feedforward_channels), nn.ReLU(inplace=True), nn.Dropout(0.0)),
            nn.Linear(feedforward_channels, embed_dims), nn.Dropout(0.0))
        self.residual = Add()

    def forward(self, x):
        return self.residual(x, self.layers(x))
