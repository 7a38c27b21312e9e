"""TensorRT plugin "deploykit::BEVPool" (tensorrt.plugin, TensorRT >= 10.6).

Node (deploykit.ops.bev_pool): depth (B, N, D, H, W) float, feat (B, N, H, W, C) float,
ranks_depth, ranks_feat, ranks_bev (M,) int32, interval_starts, interval_lengths (K,) int32
(K = 0: unsorted ranks); attributes bev_z, bev_y, bev_x (int); output bev
(B, C, bev_z, bev_y, bev_x) in depth's dtype.

  register  bev = (depth[0], feat[4], bev_z, bev_y, bev_x), dtype of depth
  autotune  depth, feat and bev FP32 or FP16 together, the five rank inputs INT32, all LINEAR
  impl      JIT: plugins.bev_pool.triton_kernel.launch on TensorRT's stream, result copied
            into the output buffer (both modes: the kernel tells them apart by K)
  aot_impl  (TensorRT >= 10.9) plugins.bev_pool.triton_kernel.aot_plan: the owner kernel
            (zero-fills its cells itself; sorted mode walks intervals without atomics,
            unsorted mode adds with atomics), compiled to PTX at build time, launched by
            TensorRT with (the seven inputs, M, K, C, ZYX, CELLS, bev). The mode is chosen
            from K, a static shape.

No annotations here may be strings (no ``from __future__ import annotations``):
tensorrt.plugin reads them with ``issubclass``.
"""

OP_TYPE = "BEVPool"
PLUGIN_ID = "deploykit::BEVPool"


def define(trtp) -> None:
    """Register the plugin with ``trtp`` (``tensorrt.plugin`` or a stand-in for it)."""

    @trtp.register(PLUGIN_ID)
    def bev_pool_desc(depth: trtp.TensorDesc, feat: trtp.TensorDesc, ranks_depth: trtp.TensorDesc,
                      ranks_feat: trtp.TensorDesc, ranks_bev: trtp.TensorDesc, interval_starts: trtp.TensorDesc,
                      interval_lengths: trtp.TensorDesc, bev_z: int, bev_y: int, bev_x: int) -> trtp.TensorDesc:
        return trtp.from_shape_expr((depth.shape_expr[0], feat.shape_expr[4], bev_z, bev_y, bev_x),
                                    dtype=depth.dtype)

    @trtp.autotune(PLUGIN_ID)
    def bev_pool_autotune(depth: trtp.TensorDesc, feat: trtp.TensorDesc, ranks_depth: trtp.TensorDesc,
                          ranks_feat: trtp.TensorDesc, ranks_bev: trtp.TensorDesc, interval_starts: trtp.TensorDesc,
                          interval_lengths: trtp.TensorDesc,
                          outputs: tuple[trtp.TensorDesc]) -> list[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination("FP32|FP16, FP32|FP16, INT32, INT32, INT32, INT32, INT32, FP32|FP16",
                                         "LINEAR")]

    @trtp.impl(PLUGIN_ID)
    def bev_pool_impl(depth: trtp.Tensor, feat: trtp.Tensor, ranks_depth: trtp.Tensor, ranks_feat: trtp.Tensor,
                      ranks_bev: trtp.Tensor, interval_starts: trtp.Tensor, interval_lengths: trtp.Tensor,
                      bev_z: int, bev_y: int, bev_x: int, outputs: tuple[trtp.Tensor], stream: int) -> None:
        from plugins import trt as shared
        from plugins.bev_pool import triton_kernel

        def compute(*tensors):
            return triton_kernel.launch(*tensors, bev_z, bev_y, bev_x)

        shared.on_stream(stream, compute,
                         (depth, feat, ranks_depth, ranks_feat, ranks_bev, interval_starts, interval_lengths),
                         outputs[0])

    if not hasattr(trtp, "aot_impl"):  # TensorRT 10.6 to 10.8: JIT only
        return

    @trtp.aot_impl(PLUGIN_ID)
    def bev_pool_aot_impl(depth: trtp.TensorDesc, feat: trtp.TensorDesc, ranks_depth: trtp.TensorDesc,
                          ranks_feat: trtp.TensorDesc, ranks_bev: trtp.TensorDesc, interval_starts: trtp.TensorDesc,
                          interval_lengths: trtp.TensorDesc, bev_z: int, bev_y: int, bev_x: int,
                          outputs: tuple[trtp.TensorDesc], tactic: int):
        from plugins import _aot
        from plugins.bev_pool import triton_kernel

        descs = (depth, feat, ranks_depth, ranks_feat, ranks_bev, interval_starts, interval_lengths)
        names = ("depth", "feat", "ranks_depth", "ranks_feat", "ranks_bev", "interval_starts", "interval_lengths")
        plan = triton_kernel.aot_plan([_aot.static_dims(d, f"BEVPool {n}") for d, n in zip(descs, names)],
                                      [d.dtype for d in descs], bev_z, bev_y, bev_x)
        return _aot.result(trtp, plan)
