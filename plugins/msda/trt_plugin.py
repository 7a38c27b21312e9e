"""TensorRT plugin "deploykit::MultiScaleDeformableAttn" (tensorrt.plugin, TensorRT >= 10.6).

Node (deploykit.ops.multi_scale_deformable_attn): value (bs, keys, heads, dims) float,
spatial_shapes (levels, 2) int64, level_start_index (levels,) int64, sampling_locations
(bs, queries, heads, levels, points, 2) float, attention_weights (bs, queries, heads,
levels, points) float; no attributes; output (bs, queries, heads * dims) in value's dtype.

  register  output = (value[0], sampling_locations[1], value[2] * value[3]), dtype of value
  autotune  the float inputs and the output FP32 or FP16 together, the level tables INT64
            (as exported), all LINEAR
  impl      JIT: plugins.msda.triton_kernel.launch on TensorRT's stream, result copied into
            the output buffer. The level tables reach the kernel as device tensors.
  aot_impl  (TensorRT >= 10.9) plugins.msda.triton_kernel.aot_plan: the same kernel,
            specialised to the node's heads, head dims and points, compiled to PTX at build
            time, launched by TensorRT with (the five inputs, num_keys, num_queries,
            num_levels, output)

The fused int8 variant (launch_int8) is not a plugin: in deploykit's TensorRT-flavoured QDQ
graphs the node sits between DequantizeLinear/QuantizeLinear pairs and sees float tensors.

No annotations here may be strings (no ``from __future__ import annotations``):
tensorrt.plugin reads them with ``issubclass``.
"""

OP_TYPE = "MultiScaleDeformableAttn"
PLUGIN_ID = "deploykit::MultiScaleDeformableAttn"


def define(trtp) -> None:
    """Register the plugin with ``trtp`` (``tensorrt.plugin`` or a stand-in for it)."""

    @trtp.register(PLUGIN_ID)
    def msda_desc(value: trtp.TensorDesc, spatial_shapes: trtp.TensorDesc, level_start_index: trtp.TensorDesc,
                  sampling_locations: trtp.TensorDesc, attention_weights: trtp.TensorDesc) -> trtp.TensorDesc:
        v = value.shape_expr
        return trtp.from_shape_expr((v[0], sampling_locations.shape_expr[1], v[2] * v[3]), dtype=value.dtype)

    @trtp.autotune(PLUGIN_ID)
    def msda_autotune(value: trtp.TensorDesc, spatial_shapes: trtp.TensorDesc, level_start_index: trtp.TensorDesc,
                      sampling_locations: trtp.TensorDesc, attention_weights: trtp.TensorDesc,
                      outputs: tuple[trtp.TensorDesc]) -> list[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination("FP32|FP16, INT64, INT64, FP32|FP16, FP32|FP16, FP32|FP16", "LINEAR")]

    @trtp.impl(PLUGIN_ID)
    def msda_impl(value: trtp.Tensor, spatial_shapes: trtp.Tensor, level_start_index: trtp.Tensor,
                  sampling_locations: trtp.Tensor, attention_weights: trtp.Tensor, outputs: tuple[trtp.Tensor],
                  stream: int) -> None:
        from plugins import trt as shared
        from plugins.msda import triton_kernel

        shared.on_stream(stream, triton_kernel.launch,
                         (value, spatial_shapes, level_start_index, sampling_locations, attention_weights), outputs[0])

    if not hasattr(trtp, "aot_impl"):  # TensorRT 10.6 to 10.8: JIT only
        return

    @trtp.aot_impl(PLUGIN_ID)
    def msda_aot_impl(value: trtp.TensorDesc, spatial_shapes: trtp.TensorDesc, level_start_index: trtp.TensorDesc,
                      sampling_locations: trtp.TensorDesc, attention_weights: trtp.TensorDesc,
                      outputs: tuple[trtp.TensorDesc], tactic: int):
        from plugins import _aot
        from plugins.msda import triton_kernel

        descs = (value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
        names = ("value", "spatial_shapes", "level_start_index", "sampling_locations", "attention_weights")
        plan = triton_kernel.aot_plan([_aot.static_dims(d, f"MultiScaleDeformableAttn {n}")
                                       for d, n in zip(descs, names)], [d.dtype for d in descs])
        return _aot.result(trtp, plan)
