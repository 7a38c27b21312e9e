"""PillarScatter on the GPU: ``triton_kernel`` (kernel and ``launch``), ``torch_op``
(``torch.ops.deploykit.pillar_scatter``), ``trt_plugin`` (TensorRT). Import the one you
need; this package imports none of them (nor Triton or TensorRT)."""
