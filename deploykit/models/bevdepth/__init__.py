"""BEVDepth (LSS with camera-aware depth, two key frames) as released, and its engine form."""

from .config import BEVDepthConfig, TrunkConfig
from .model import BEVDepth, head_output_names, rig_mats
from .streaming import StreamingBEVDepth
from .synthetic import lightning_checkpoint, synthetic_init

__all__ = ["BEVDepth", "BEVDepthConfig", "StreamingBEVDepth", "TrunkConfig", "head_output_names",
           "lightning_checkpoint", "rig_mats", "synthetic_init"]
