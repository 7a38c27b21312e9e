"""BEVPool on the GPU: ``triton_kernel`` (both modes' kernels and ``launch``), ``torch_op``
(``torch.ops.deploykit.bev_pool``), ``trt_plugin`` (TensorRT). Import the one you need;
this package imports none of them (nor Triton or TensorRT)."""
