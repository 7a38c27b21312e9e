"""TensorRT plugin "deploykit::DeformConv" (tensorrt.plugin, TensorRT >= 10.6).

Node (deploykit.ops.deform_conv, export form "custom"): input (B, C, H, W), offset
(B, dg * 2 * kh * kw, Ho, Wo), mask (B, dg * kh * kw, Ho, Wo) or 0 elements (v1), weight
(Cout, C / groups, kh, kw), bias (Cout,) or 0 elements, all float32 as exported (float16 in
an fp16 engine); attributes stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, groups,
deform_groups (int); output (B, Cout, Ho, Wo) in input's dtype, with Ho = (H + 2 pad_h - dilation_h (kh - 1) - 1) // stride_h + 1.

  register  output = (input[0], weight[0], Ho, Wo) from the shape expressions of input and
            weight and the attributes, dtype of input
  autotune  the float I/O FP32 or FP16 together, LINEAR
  impl      JIT: plugins.deform_conv.triton_kernel.launch on TensorRT's stream, result
            copied into the output buffer. Absent mask/bias (0-element inputs) pass as
            absent.
  aot_impl  (TensorRT >= 10.9) plugins.deform_conv.triton_kernel.aot_plan: the same
            implicit-GEMM kernel (it writes every output element), compiled to PTX at build
            time, launched by TensorRT with (the five inputs, 15 int32 shapes and
            attributes, output)

Parser caveat: ONNX has a standard DeformConv (opset 19) with another input order (X, W,
offset, B, mask). The TensorRT ONNX parser dispatches on op_type, not domain; it prefers a
registered plugin over its built-in importer only when the node has the plugin_namespace
attribute (with_plugin_attributes adds it) and the parser is recent enough to honour it.

No annotations here may be strings (no ``from __future__ import annotations``):
tensorrt.plugin reads them with ``issubclass``.
"""

OP_TYPE = "DeformConv"
PLUGIN_ID = "deploykit::DeformConv"


def define(trtp) -> None:
    """Register the plugin with ``trtp`` (``tensorrt.plugin`` or a stand-in for it)."""

    @trtp.register(PLUGIN_ID)
    def deform_conv_desc(input: trtp.TensorDesc, offset: trtp.TensorDesc, mask: trtp.TensorDesc,
                         weight: trtp.TensorDesc, bias: trtp.TensorDesc, stride_h: int, stride_w: int, pad_h: int,
                         pad_w: int, dilation_h: int, dilation_w: int, groups: int,
                         deform_groups: int) -> trtp.TensorDesc:
        x, w = input.shape_expr, weight.shape_expr
        # Left operands are shape expressions throughout: tensorrt.plugin's ShapeExpr has no
        # reflected operators (int * expr), only expr (+ - * //) int-or-expr.
        ho = (x[2] + pad_h * 2 - (w[2] - 1) * dilation_h - 1) // stride_h + 1
        wo = (x[3] + pad_w * 2 - (w[3] - 1) * dilation_w - 1) // stride_w + 1
        return trtp.from_shape_expr((x[0], w[0], ho, wo), dtype=input.dtype)

    @trtp.autotune(PLUGIN_ID)
    def deform_conv_autotune(input: trtp.TensorDesc, offset: trtp.TensorDesc, mask: trtp.TensorDesc,
                             weight: trtp.TensorDesc, bias: trtp.TensorDesc,
                             outputs: tuple[trtp.TensorDesc]) -> list[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination("FP32|FP16, FP32|FP16, FP32|FP16, FP32|FP16, FP32|FP16, FP32|FP16",
                                         "LINEAR")]

    @trtp.impl(PLUGIN_ID)
    def deform_conv_impl(input: trtp.Tensor, offset: trtp.Tensor, mask: trtp.Tensor, weight: trtp.Tensor,
                         bias: trtp.Tensor, stride_h: int, stride_w: int, pad_h: int, pad_w: int, dilation_h: int,
                         dilation_w: int, groups: int, deform_groups: int, outputs: tuple[trtp.Tensor],
                         stream: int) -> None:
        from plugins import trt as shared
        from plugins.deform_conv import triton_kernel

        def compute(x, off, m, w, b):
            return triton_kernel.launch(x, off, m, w, b, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w,
                                        groups, deform_groups)

        shared.on_stream(stream, compute, (input, offset, mask, weight, bias), outputs[0])

    if not hasattr(trtp, "aot_impl"):  # TensorRT 10.6 to 10.8: JIT only
        return

    @trtp.aot_impl(PLUGIN_ID)
    def deform_conv_aot_impl(input: trtp.TensorDesc, offset: trtp.TensorDesc, mask: trtp.TensorDesc,
                             weight: trtp.TensorDesc, bias: trtp.TensorDesc, stride_h: int, stride_w: int, pad_h: int,
                             pad_w: int, dilation_h: int, dilation_w: int, groups: int, deform_groups: int,
                             outputs: tuple[trtp.TensorDesc], tactic: int):
        from plugins import _aot
        from plugins.deform_conv import triton_kernel

        descs = (input, offset, mask, weight, bias)
        names = ("input", "offset", "mask", "weight", "bias")
        plan = triton_kernel.aot_plan([_aot.static_dims(d, f"DeformConv {n}") for d, n in zip(descs, names)],
                                      [d.dtype for d in descs], stride_h, stride_w, pad_h, pad_w, dilation_h,
                                      dilation_w, groups, deform_groups)
        return _aot.result(trtp, plan)
