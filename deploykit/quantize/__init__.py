"""Quantization: calibration data, observers and fake-quant, overrides, QDQ export."""
