"""deploykit's custom ONNX ops, one module per op, in one explicit table.

Every op module provides:
  * ``reference(...)``: the semantics, in PyTorch, that all backends must match;
  * an autograd Function whose ``symbolic`` emits one ``deploykit::<Op>`` node,
    the node TensorRT plugins and NPU toolchains bind to;
  * ``function_for(node, graph, opset)``: the op as an ONNX model-local function
    of standard ops, which ONNX Runtime inlines (or which deploykit inlines
    itself to hand a plain graph to any runtime); ops whose lowering depends on
    constant inputs return a function specialised to that node;
  * ``register_ortx()``: a Python kernel for onnxruntime-extensions.
"""

from __future__ import annotations

from types import ModuleType

from . import bev_pool, deform_conv, multi_scale_deformable_attn, pillar_scatter

DOMAIN = "deploykit"
OPSET_VERSION = 1

CUSTOM_OPS: dict[str, ModuleType] = {
    pillar_scatter.OP_TYPE: pillar_scatter,
    multi_scale_deformable_attn.OP_TYPE: multi_scale_deformable_attn,
    bev_pool.OP_TYPE: bev_pool,
    deform_conv.OP_TYPE: deform_conv,
}
