"""deploykit: BEV perception checkpoints to fast, quantized, trusted engines."""

__version__ = "0.1.0"
