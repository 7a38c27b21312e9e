"""Stand-in BEVFormer weights that behave like trained ones.

BEVFormer's own init_weights puts the deformable attentions' sampling offsets
on rings around each reference point (one direction per head, radius growing
with the point index) with zero weights and uniform attention. A trained model
keeps that structure and adds query-dependent terms; the small random weights
added here play that part, so sampling locations move with the input, mostly
stay on the feature maps, and the custom op and its lowering are exercised on
realistic coordinates rather than all-off-map ones.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .attention import CustomMSDeformableAttention, MSDeformableAttention3D, TemporalSelfAttention


def _ring_bias(heads: int, groups: int, points: int) -> torch.Tensor:
    theta = torch.arange(heads, dtype=torch.float32) * (2.0 * math.pi / heads)
    grid = torch.stack([theta.cos(), theta.sin()], -1)
    grid = grid / grid.abs().max(-1, keepdim=True)[0]
    grid = grid.view(heads, 1, 1, 2).repeat(1, groups, points, 1)
    grid *= torch.arange(1, points + 1, dtype=torch.float32)[None, None, :, None]
    return grid.reshape(-1)


def synthetic_init(model: nn.Module, cfg, gen: torch.Generator) -> None:
    init_camera_stream(model.pts_bbox_head, gen)
    init_detr_branches(model.pts_bbox_head)


def init_camera_stream(head: nn.Module, gen: torch.Generator) -> None:
    """BEVFormerHead's attention stack and the transformer's level and camera embeddings."""
    init_attention_stack(head, gen)
    with torch.no_grad():
        transformer = head.transformer
        transformer.level_embeds.copy_(torch.randn(*transformer.level_embeds.shape, generator=gen))
        transformer.cams_embeds.copy_(torch.randn(*transformer.cams_embeds.shape, generator=gen))


def init_attention_stack(root: nn.Module, gen: torch.Generator) -> None:
    def rand(*shape, std=1.0):
        return torch.randn(*shape, generator=gen) * std

    with torch.no_grad():
        for module in root.modules():
            if isinstance(module, nn.Linear):
                bound = math.sqrt(6.0 / (module.in_features + module.out_features))
                module.weight.copy_((torch.rand(module.weight.shape, generator=gen) * 2 - 1) * bound)
                module.bias.copy_(rand(module.out_features, std=0.02))
            elif isinstance(module, nn.LayerNorm):
                module.weight.copy_(1.0 + rand(module.normalized_shape[0], std=0.1))
                module.bias.copy_(rand(module.normalized_shape[0], std=0.05))
            elif isinstance(module, nn.Embedding):
                module.weight.copy_(rand(*module.weight.shape))
            elif isinstance(module, nn.MultiheadAttention):
                bound = math.sqrt(6.0 / (2 * module.embed_dim))
                module.in_proj_weight.copy_((torch.rand(module.in_proj_weight.shape, generator=gen) * 2 - 1) * bound)
                module.in_proj_bias.zero_()
        for module in root.modules():
            if isinstance(module, (TemporalSelfAttention, MSDeformableAttention3D, CustomMSDeformableAttention)):
                groups = module.num_levels * getattr(module, "num_bev_queue", 1)
                module.sampling_offsets.bias.copy_(_ring_bias(module.num_heads, groups, module.num_points))
                module.sampling_offsets.weight.copy_(rand(*module.sampling_offsets.weight.shape, std=0.01))
                module.attention_weights.weight.copy_(rand(*module.attention_weights.weight.shape, std=0.02))
                module.attention_weights.bias.zero_()


def init_detr_branches(head: nn.Module) -> None:
    with torch.no_grad():
        # DETR heads start from a 1% prior per class (bias_init_with_prob(0.01)).
        for branch in head.cls_branches:
            branch[-1].bias.fill_(-math.log((1 - 0.01) / 0.01))
        # A trained box-refining decoder moves its references by small steps
        # (Deformable DETR even starts the last layer at zero). Full-gain random
        # steps would saturate the sigmoids and make the six-layer refinement
        # chaotic, amplifying fp32 rounding in a way trained weights do not.
        for branch in head.reg_branches:
            branch[-1].weight.mul_(0.1)
