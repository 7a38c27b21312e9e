"""Scale the pillar features to about [-1, 1] on the host and fold the scale into the first PFN layer.

The decorated pillar tensor mixes metres up to the range's edge (x, y up to 51.2),
intensities up to 255 and offsets of a few centimetres in one input: a per-tensor
int8 quantizer sized for the largest channel leaves the offsets a handful of
levels. Horizon's reference feeds normalised points instead (section 4.1). The
engine here takes ``pillars / scale`` per channel and the first PFN layer's
weights become ``W * scale``: its first layer is linear without a bias, so the
product, and everything after it, is unchanged. Each scale is the power of two
at or above its channel's bound, so both the division and the weight product are
exact in floating point and the float model's output is bit for bit the same.

The scale is part of the engine's input contract: ``deploykit convert`` writes it
into the manifest next to the pillar layout, and every host path (samples,
calibration, quantize's held-out data, detect) divides by it.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
from torch import nn

from ..errors import RecipeError
from ..models.centerpoint_pillar import PillarFeatureNet
from .common import stream_config
from .pfn_linear_to_conv import ConvPillarFeatureNet

NAME = "normalise_points"


def channel_bounds(cfg) -> list[float]:
    """The largest magnitude each decorated channel can take, from the recipe's LiDAR
    stream config (range, voxel size, intensity range, sweeps, decorations)."""
    v, enc, pts = cfg.voxelization, cfg.pillar_encoder, cfg.points
    r, size = v.point_cloud_range, v.voxel_size
    reach = [max(abs(r[i]), abs(r[i + 3])) for i in range(3)]
    half_span_z = (r[5] - r[2]) / 2
    centre = [size[0] / 2, size[1] / 2, half_span_z]  # offset from the pillar centre
    raw = {"x": reach[0], "y": reach[1], "z": reach[2],
           "intensity": max(abs(x) for x in pts.intensity_range),
           # nuScenes' ten sweeps span about 0.45 s; a single sweep's dt is 0.
           "dt": 0.5 if pts.sweeps > 1 else 1.0}
    if enc.legacy:  # mmdet3d's legacy decoration writes the centre offsets into x, y, z
        raw.update(x=centre[0], y=centre[1], z=centre[2])
    bounds = [raw[name] for name in cfg.point_columns]
    if enc.with_cluster_center:
        bounds += [size[0], size[1], r[5] - r[2]]  # offset from the pillar's point mean
    if enc.with_voxel_center:
        bounds += centre
    if enc.with_distance:
        bounds.append(math.sqrt(sum((c if enc.legacy else q) ** 2 for c, q in zip(centre, reach))))
    return bounds


def channel_scales(cfg) -> np.ndarray:
    return np.array([2.0 ** math.ceil(math.log2(b)) if b > 0 else 1.0 for b in channel_bounds(cfg)], np.float32)


def input_scale(model: nn.Module) -> np.ndarray | None:
    """The per-channel divisor a model's pillar input expects, or None (raw features)."""
    for m in model.modules():
        if isinstance(m, (PillarFeatureNet, ConvPillarFeatureNet)):
            scale = getattr(m, "input_scale", None)
            return None if scale is None else scale.numpy().copy()
    return None


def apply(model: nn.Module) -> nn.Module:
    model = copy.deepcopy(model)
    encoders = [m for m in model.modules() if isinstance(m, (PillarFeatureNet, ConvPillarFeatureNet))]
    if not encoders:
        raise RecipeError(f"pass '{NAME}' found no pillar feature net to fold the scale into")
    if any(getattr(e, "input_scale", None) is not None for e in encoders):
        raise RecipeError(f"pass '{NAME}' already ran on this model; list it once")
    scale = torch.from_numpy(channel_scales(stream_config(model, NAME)))
    for encoder in encoders:
        first = encoder.pfn_layers[0]
        layer = first.linear if isinstance(encoder, PillarFeatureNet) else first.conv
        if layer.weight.shape[1] != scale.numel():
            raise RecipeError(f"pass '{NAME}': the first PFN layer takes {layer.weight.shape[1]} channels, the "
                              f"recipe's decoration gives {scale.numel()}")
        with torch.no_grad():
            shape = (1, -1) if layer.weight.dim() == 2 else (1, -1, 1, 1)
            layer.weight.mul_(scale.view(shape))
        encoder.register_buffer("input_scale", scale.clone(), persistent=False)
    return model
