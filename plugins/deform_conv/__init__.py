"""TensorRT plugin for ``deploykit::DeformConv`` (issue 16).

There is no Triton kernel for DeformConv yet: ``trt_plugin`` registers the TensorRT plugin
"deploykit::DeformConv" whose JIT implementation runs deploykit's PyTorch reference
(deploykit.ops.deform_conv.reference: grid_sample + a grouped matmul) on CUDA tensors, on
TensorRT's stream. Correct, but not a fused kernel: expect it to be slower than a dedicated
deformable-convolution kernel.

Importing this package imports nothing beyond the standard library.
"""
