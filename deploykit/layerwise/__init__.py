"""Layer-wise comparison: where two versions of a model part ways.

Two versions of one model (the released PyTorch model, the rewritten one, its
ONNX export, the fake-quant model, a quantized QDQ graph) are run on the same
inputs, their intermediate tensors are paired by the module path each was
computed in, and the error of every pair is reported in execution order with
the first layer past a threshold:

    scopes      module paths as the ONNX exporter writes them into node names
    torch_taps  a PyTorch model's module outputs, recorded with forward hooks
    onnx_taps   an ONNX graph's scope outputs, marked as graph outputs and run
                with Polygraphy's ONNX Runtime runner
    profile     pairing, per-layer error statistics, the first divergence
    sides       what ``deploykit compare A B`` accepts, and the inputs they share
    report      table, JSON and a plot of error along depth
"""

from .profile import FLOAT_THRESHOLD, LayerProfile, LayerRow, profile_layers
from .run import compare


__all__ = ["FLOAT_THRESHOLD", "LayerProfile", "LayerRow", "compare", "profile_layers"]
