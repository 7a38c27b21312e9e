"""Temporal state for BEV models: ego-motion alignment and sequence runners.

``sequence_runner(cfg, engine)`` gives the runner of a model config: BEVDepth's two
key frames (deploykit.temporal.two_key) or BEVFormer's previous BEV
(deploykit.temporal.runner). Both take frames in scene order with ``step(frame)``,
say which engine inputs they make (``state_inputs``) and which per-frame pose a
stored sample keeps for them (``pose_input``: name, shape, dtype), and rebuild a
frame from a stored sample (``frame_from_arrays``).
"""


def sequence_runner(cfg, engine):
    from ..models import camera_config
    from ..models.bevdepth import BEVDepthConfig

    if isinstance(cfg, BEVDepthConfig):
        from .two_key import TwoKeyRunner

        return TwoKeyRunner(engine, cfg)
    from .runner import SequenceRunner

    return SequenceRunner(engine, camera_config(cfg))


def runner_type(cfg) -> type:
    from ..models.bevdepth import BEVDepthConfig

    if isinstance(cfg, BEVDepthConfig):
        from .two_key import TwoKeyRunner

        return TwoKeyRunner
    from .runner import SequenceRunner

    return SequenceRunner
