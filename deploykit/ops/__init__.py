"""deploykit's custom ONNX ops, one module per op, in one explicit table.

Every op module provides:
  * ``reference(...)``: the semantics, in PyTorch, that all backends must match;
  * an autograd Function whose ``symbolic`` emits one ``deploykit::<Op>`` node,
    the node TensorRT plugins and NPU toolchains bind to;
  * ``onnx_function()``: the same op as an ONNX model-local function built from
    standard ops, which ONNX Runtime inlines (or which deploykit inlines itself
    to hand a plain graph to any runtime);
  * ``register_ortx()``: a Python kernel for onnxruntime-extensions.
"""

from __future__ import annotations

from types import ModuleType

from . import pillar_scatter

DOMAIN = "deploykit"
OPSET_VERSION = 1

CUSTOM_OPS: dict[str, ModuleType] = {
    pillar_scatter.OP_TYPE: pillar_scatter,
}
