"""TensorRT plugin "deploykit::PillarScatter" (tensorrt.plugin, TensorRT >= 10.6).

Node (deploykit.ops.pillar_scatter): features (1, C, P) float, coords (P, 4) int32;
attributes height, width (int); output canvas (1, C, height, width) in features' dtype.

  register  canvas = (1, features[1], height, width), dtype of features
  autotune  features/canvas FP32 or FP16 together, coords INT32, all LINEAR
  impl      JIT: plugins.pillar_scatter.triton_kernel.launch on TensorRT's stream, result
            copied into the output buffer
  aot_impl  (TensorRT >= 10.9) plugins.pillar_scatter.triton_kernel.aot_plan: the owner
            kernel (zero-fills its cells itself), compiled to PTX at build time for the
            build GPU, launched by TensorRT with (features, coords, P, C, H, W, canvas)

No annotations here may be strings (no ``from __future__ import annotations``):
tensorrt.plugin reads them with ``issubclass``.
"""

OP_TYPE = "PillarScatter"
PLUGIN_ID = "deploykit::PillarScatter"


def define(trtp) -> None:
    """Register the plugin with ``trtp`` (``tensorrt.plugin`` or a stand-in for it)."""

    @trtp.register(PLUGIN_ID)
    def pillar_scatter_desc(features: trtp.TensorDesc, coords: trtp.TensorDesc, height: int,
                            width: int) -> trtp.TensorDesc:
        return trtp.from_shape_expr((1, features.shape_expr[1], height, width), dtype=features.dtype)

    @trtp.autotune(PLUGIN_ID)
    def pillar_scatter_autotune(features: trtp.TensorDesc, coords: trtp.TensorDesc,
                                outputs: tuple[trtp.TensorDesc]) -> list[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination("FP32|FP16, INT32, FP32|FP16", "LINEAR")]

    @trtp.impl(PLUGIN_ID)
    def pillar_scatter_impl(features: trtp.Tensor, coords: trtp.Tensor, height: int, width: int,
                            outputs: tuple[trtp.Tensor], stream: int) -> None:
        from plugins import trt as shared
        from plugins.pillar_scatter import triton_kernel

        shared.on_stream(stream, lambda f, c: triton_kernel.launch(f, c, height, width), (features, coords),
                         outputs[0])

    if not hasattr(trtp, "aot_impl"):  # TensorRT 10.6 to 10.8: JIT only
        return

    @trtp.aot_impl(PLUGIN_ID)
    def pillar_scatter_aot_impl(features: trtp.TensorDesc, coords: trtp.TensorDesc, height: int, width: int,
                                outputs: tuple[trtp.TensorDesc], tactic: int):
        from plugins import _aot
        from plugins.pillar_scatter import triton_kernel

        plan = triton_kernel.aot_plan(_aot.static_dims(features, "PillarScatter features"), features.dtype,
                                      _aot.static_dims(coords, "PillarScatter coords"), coords.dtype, height, width)
        return _aot.result(trtp, plan)
