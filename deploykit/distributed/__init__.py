"""Dataset-scale quantization work on Ray workers (an optional extra), serial without them.

``worker_pool(workers, address)`` gives a pool; calibration, the int16 sensitivity search and
the task-metric evaluation hand it their work (deploykit.quantize.parallel) and get the
serial path's results back.
"""

from .pool import RayPool, SerialPool, ray_available, worker_pool
from .shards import by_scene, contiguous

__all__ = ["RayPool", "SerialPool", "by_scene", "contiguous", "ray_available", "worker_pool"]
