"""DeformConv (mmcv's DCN v1 / v2) on the GPU (issue 16): ``triton_kernel`` (one implicit-GEMM
kernel, ``plan`` for its grid and constexprs, ``launch``), ``torch_op``
(``torch.ops.deploykit.deform_conv``: Triton on CUDA, deploykit's reference on CPU unless
TRITON_INTERPRET=1), ``trt_plugin`` (TensorRT). Import the one you need; this package imports
none of them (nor Triton or TensorRT).

``trt_plugin``'s JIT implementation launches the Triton kernel on TensorRT's stream; its AOT
implementation (TensorRT >= 10.9) compiles the same kernel with ``triton_kernel.aot_plan``.
"""
