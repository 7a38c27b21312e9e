"""Backward passes for the custom ops, so models that contain them train (QAT).

Each op's forward runs its PyTorch reference under an autograd Function (the
Function is what carries the ONNX symbolic); the backward recomputes that
reference with autograd on and differentiates it, so the gradient is exactly
the reference's, with no second implementation to keep in step.
"""

from __future__ import annotations

from typing import Callable

import torch


def save_inputs(ctx, tensors: tuple[torch.Tensor, ...], constants: tuple = ()) -> None:
    ctx.save_for_backward(*tensors)
    ctx.constants = constants


def recompute_backward(ctx, reference: Callable, grad_output: torch.Tensor) -> tuple:
    """Gradients for every input of the Function (tensors first, then constants: None)."""
    inputs = [t.detach().requires_grad_(t.is_floating_point()) for t in ctx.saved_tensors]
    wanted = [t for t in inputs if t.requires_grad]
    with torch.enable_grad():
        out = reference(*inputs, *ctx.constants)
        grads = iter(torch.autograd.grad(out, wanted, grad_output, allow_unused=True))
    return tuple(next(grads) if t.requires_grad else None for t in inputs) + (None,) * len(ctx.constants)
