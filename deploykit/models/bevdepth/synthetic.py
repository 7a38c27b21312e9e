"""Stand-in structure for BEVDepth's synthetic weights (see deploykit.synthetic_checkpoint)."""

from __future__ import annotations

import torch


def synthetic_init(model, cfg, gen: torch.Generator) -> None:
    for task in model.head.task_heads:
        task.heatmap[-1].bias.data.fill_(cfg.head.init_bias)
    # mmcv zero-initialises conv_offset, which makes a fresh DCN a plain conv; trained ones
    # sample around the kernel grid, a pixel or so off: give the stand-in that.
    dcn = model.backbone.depth_net.depth_conv[4]
    offset = dcn.conv_offset
    fan_in = offset.weight[0].numel()
    offset.weight.data = torch.randn(offset.weight.shape, generator=gen) * (1.0 / fan_in ** 0.5)
    offset.bias.data = 0.5 * torch.randn(offset.bias.shape, generator=gen)
    # The camera-aware input mixes focal lengths in pixels with matrix entries near 1. A
    # trained BatchNorm1d has statistics over many rigs; calibrated on one, entries its
    # cameras share would get a variance of ~0. Stand-in: centred on this rig, with a
    # spread of 10% of each entry (at least 1), and kept out of the calibration.
    from .depth_net import mlp_input

    bn = model.backbone.depth_net.bn
    vec = mlp_input(model.rig_intrin, model.rig_ida, model.rig_sensor2ego, model.rig_bda).mean(0)
    bn.running_mean.copy_(vec)
    bn.running_var.copy_((0.1 * vec.abs()).clamp(min=1.0) ** 2)
    bn.momentum = 0.0


def lightning_checkpoint(state: dict, meta: dict) -> dict:
    """A PyTorch Lightning checkpoint as BEVDepth's releases are: the LightningModule holds
    the network as ``self.model``, so every key starts with "model."."""
    return {"epoch": 23, "global_step": 0, "pytorch-lightning_version": "1.5.10",
            "state_dict": {f"model.{k}": v for k, v in state.items()}, "lr_schedulers": [], "optimizer_states": [],
            "meta": meta}
