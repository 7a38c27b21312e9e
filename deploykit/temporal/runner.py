"""Run a temporal BEV engine over a sequence of frames, carrying its state.

BEVFormer's forward_test keeps three things between frames: the previous BEV,
the previous ego pose and the scene token. This runner keeps the same state on
the host and builds the engine's static inputs for each frame: the CAN bus
made relative to the previous frame, the BEV shift, the previous BEV rotated
into the current heading and the ``use_prev_bev`` switch (0 on a scene's first
frame). The engine is anything with ``run(feeds) -> {name: array}``: an ONNX
Runtime engine, or a PyTorch model through :class:`TorchEngine`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import InputError
from ..samples import torch_outputs
from .ego_motion import EgoPose, bev_shift, relative_can_bus, rotate_bev


@dataclass
class Frame:
    """One time step: normalised images (1, N, 3, H, W), the raw 18-value CAN bus,
    the scene it belongs to and its index within that scene (0, 1, 2 ...). ``sensors``
    are the frame's other engine inputs, passed through as they are (BEVFusion: the
    LiDAR sweep's ``pillars`` and ``coords``)."""

    img: np.ndarray
    can_bus: np.ndarray
    scene: str
    index: int
    sensors: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], scene: str, index: int) -> "Frame":
        """A frame from a calibration sample's arrays: img, the raw can_bus, and any other sensor's."""
        sensors = {k: v for k, v in arrays.items() if k not in ("img", "can_bus")}
        return cls(arrays["img"], np.asarray(arrays["can_bus"], np.float64), scene, index, sensors)

    def arrays(self) -> dict[str, np.ndarray]:
        """What a calibration sample stores of the frame (from_arrays reads it back)."""
        return {"img": self.img, "can_bus": self.can_bus, **self.sensors}


class TorchEngine:
    """A PyTorch model behind the engine interface, for references and tests."""

    def __init__(self, model):
        self.model = model.eval()

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return torch_outputs(self.model, feeds)


class SequenceRunner:
    # Engine inputs made from the previous frames, and the per-frame pose a stored sample
    # keeps instead (the raw absolute CAN bus, float64: global positions need it).
    state_inputs = ("shift", "prev_bev", "use_prev_bev")
    pose_input = ("can_bus", [18], "float64")
    frame_from_arrays = staticmethod(Frame.from_arrays)

    def __init__(self, engine, cfg):
        self.engine = engine
        self.cfg = cfg
        self.reset()

    def reset(self) -> None:
        """Forget the state: the next frame starts cold, whatever its scene."""
        self.scene: str | None = None
        self.index: int | None = None
        self.prev_bev: np.ndarray | None = None
        self.pose: EgoPose | None = None

    def feeds(self, frame: Frame) -> dict[str, np.ndarray]:
        """The engine inputs for ``frame`` given the current state (the state is not changed)."""
        return self._prepare(frame)[0]

    def _prepare(self, frame: Frame) -> tuple[dict[str, np.ndarray], EgoPose]:
        """(engine inputs, the pose this frame leaves for the next one)."""
        cfg = self.cfg
        continues = frame.scene == self.scene and self.prev_bev is not None
        if continues and frame.index != self.index + 1:
            raise InputError(
                f"scene {frame.scene}: frame {frame.index} follows frame {self.index}, so the previous BEV it needs "
                f"(frame {frame.index - 1}) is missing; feed the frames of a scene in order, or call reset() to "
                f"start this scene cold at frame {frame.index}"
            )
        can_bus, pose = relative_can_bus(frame.can_bus, self.pose if continues else None)
        shift = bev_shift(can_bus, bev_h=cfg.bev_h, bev_w=cfg.bev_w, grid_length=cfg.grid_length)
        if continues:
            prev = rotate_bev(self.prev_bev, float(can_bus[-1]), bev_h=cfg.bev_h, bev_w=cfg.bev_w,
                              center=cfg.rotate_center)
        else:
            prev = np.zeros((1, cfg.num_bev_queries, cfg.embed_dims), np.float32)
        feeds = {"img": np.ascontiguousarray(frame.img, np.float32),
                 "can_bus": can_bus[None].astype(np.float32), "shift": shift[None].astype(np.float32),
                 "prev_bev": prev, "use_prev_bev": np.array([1.0 if continues else 0.0], np.float32),
                 **frame.sensors}
        return feeds, pose

    def step(self, frame: Frame) -> dict[str, np.ndarray]:
        feeds, pose = self._prepare(frame)
        outputs = self.engine.run(feeds)
        self.pose = pose
        self.prev_bev = outputs["bev_embed"]
        self.scene, self.index = frame.scene, frame.index
        return outputs

    def run(self, frames) -> list[dict[str, np.ndarray]]:
        return [self.step(f) for f in frames]
