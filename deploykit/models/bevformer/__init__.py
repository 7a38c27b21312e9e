from . import synthetic
from .model import BEVFormer, BEVFormerConfig, VirtualBEVConfig

__all__ = ["BEVFormer", "BEVFormerConfig", "VirtualBEVConfig", "synthetic"]
