"""GPU implementations of deploykit's custom ops, one folder per op (``pillar_scatter/``,
``bev_pool/``, ``msda/``):

  * ``triton_kernel.py``: the op as Triton kernel(s) and a plain-Python ``launch(...)``
    taking the ONNX node's inputs (torch tensors) and attributes;
  * ``torch_op.py``: the kernel registered as a ``torch.library`` custom op
    (``torch.ops.deploykit.<op>``), Triton on CUDA tensors, deploykit's reference on CPU
    ones (the kernel there too under TRITON_INTERPRET=1);
  * ``trt_plugin.py``: its TensorRT plugin.

The semantics stay in ``deploykit.ops`` (each op's ``reference``); plugins only implement
them. Importing ``plugins`` (or a torch_op module) needs neither Triton nor TensorRT:
they are imported where a kernel or a plugin is used.
"""
