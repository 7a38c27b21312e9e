"""Run a two-key BEVDepth engine over a sequence, carrying the previous key frame.

BEVDepth's dataset pairs each key frame with the one before it in its scene (the
frame itself on a scene's first frame) and expresses the previous frame's cameras in
the current ego frame. The engine (deploykit.models.bevdepth.StreamingBEVDepth)
returns each frame's depth and context; this runner hands them to the next frame
with the ego motion between the two poses, and ``use_prev`` 0 where a scene starts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InputError


@dataclass
class KeyFrame:
    """Normalised images (1, N, 3, H, W), the ego pose (4, 4) ego -> global (or (N, 4, 4),
    one per camera's timestamp, as nuScenes records them), the scene and the frame's index
    in it (0, 1, 2 ...)."""

    img: np.ndarray
    ego2global: np.ndarray
    scene: str
    index: int

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], scene: str, index: int) -> "KeyFrame":
        """A frame from a stored calibration sample's arrays (img, ego2global)."""
        return cls(arrays["img"], np.asarray(arrays["ego2global"], np.float64), scene, index)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"img": self.img, "ego2global": np.asarray(self.ego2global, np.float64)}


def ego_motion(current: np.ndarray, previous: np.ndarray, num_cams: int) -> np.ndarray:
    """(1, N, 4, 4) previous key ego -> current key ego: global2keyego @ prevego2global,
    per camera, in float64 before the cast (global positions need it)."""
    cur = np.broadcast_to(np.asarray(current, np.float64), (num_cams, 4, 4))
    prev = np.broadcast_to(np.asarray(previous, np.float64), (num_cams, 4, 4))
    return (np.linalg.inv(cur) @ prev)[None].astype(np.float32)


class TwoKeyRunner:
    state_inputs = ("prev_depth", "prev_context", "ego_motion", "use_prev")
    pose_input = ("ego2global", None, "float64")  # (4, 4), or (N, 4, 4) per camera
    frame_from_arrays = staticmethod(KeyFrame.from_arrays)

    def __init__(self, engine, cfg):
        self.engine, self.cfg = engine, cfg
        self.reset()

    def reset(self) -> None:
        self.scene: str | None = None
        self.index: int | None = None
        self.state: tuple[np.ndarray, np.ndarray] | None = None
        self.pose: np.ndarray | None = None

    def feeds(self, frame: KeyFrame) -> dict[str, np.ndarray]:
        continues = frame.scene == self.scene and self.state is not None
        if continues and frame.index != self.index + 1:
            raise InputError(
                f"scene {frame.scene}: key frame {frame.index} follows key frame {self.index}, so the previous key "
                f"frame it fuses (frame {frame.index - 1}) is missing; feed a scene's key frames in order, or call "
                f"reset() to start the scene again at frame {frame.index}")
        feeds = {"img": np.ascontiguousarray(frame.img, np.float32)}
        if self.cfg.keys == 1:
            return feeds
        n, (d, h, w) = self.cfg.num_cams, (self.cfg.depth_bins, *self.cfg.feature_size)
        if continues:
            depth, context = self.state
            motion = ego_motion(frame.ego2global, self.pose, n)
        else:
            depth = np.zeros((1, n, d, h, w), np.float32)
            context = np.zeros((1, n, h, w, self.cfg.output_channels), np.float32)
            motion = np.broadcast_to(np.eye(4, dtype=np.float32), (1, n, 4, 4)).copy()
        return {**feeds, "prev_depth": depth, "prev_context": context, "ego_motion": motion,
                "use_prev": np.array([1.0 if continues else 0.0], np.float32)}

    def step(self, frame: KeyFrame) -> dict[str, np.ndarray]:
        outputs = self.engine.run(self.feeds(frame))
        if self.cfg.keys == 2:
            self.state = (outputs["key_depth"], outputs["key_context"])
        self.pose, self.scene, self.index = np.asarray(frame.ego2global, np.float64), frame.scene, frame.index
        return outputs

    def run(self, frames) -> list[dict[str, np.ndarray]]:
        return [self.step(f) for f in frames]
