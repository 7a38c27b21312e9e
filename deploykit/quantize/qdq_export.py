"""Export a calibrated fake-quant model as a QDQ ONNX graph.

Every active quantizer becomes a QuantizeLinear/DequantizeLinear pair with a
constant scale (per output channel for weights) and a zero point whose dtype
is the width: int8, or int16 for the recipe's overrides. int16 Q/DQ exists
from opset 21 on, so a model with any int16 quantizer is converted to opset
21 after export (onnx.version_converter). The graph is not run through onnxsim:
it would fold the weights' Q/DQ pairs into float constants, and TensorRT and
NPU compilers need them to see int8 weights.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import onnx.version_converter

from ..errors import ExportError
from ..export import export_onnx
from ..onnx_graph import int16_quantize_nodes

INT16_OPSET = 21


def export_qdq(qmodel, feeds, path: Path, opset: int) -> onnx.ModelProto:
    # Per-channel QuantizeLinear (the axis attribute) needs opset 13.
    export_onnx(qmodel, feeds, path, max(opset, 13))
    model = onnx.load(str(path))
    if int16_quantize_nodes(model.graph):
        try:
            model = onnx.version_converter.convert_version(model, INT16_OPSET)
        except Exception as exc:  # noqa: BLE001 - the converter raises bare RuntimeErrors
            raise ExportError(f"cannot move the QDQ model to opset {INT16_OPSET} for int16: "
                              f"{str(exc).splitlines()[0][:200]}") from None
        onnx.save(model, str(path))
    return model
