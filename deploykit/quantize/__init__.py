"""Quantization: calibration data, observers and fake-quant, overrides, QDQ export.

``deploykit.quantize(recipe, converted, out, ...)`` calls deploykit.quantize.pipeline.quantize.
"""

from ..api import callable_module

callable_module(__name__, "deploykit.quantize.pipeline:quantize")
