"""Fidelity and task metrics on the user's own data, on frames the calibration did not see.

A calibration set made with ``deploykit calib --from DATA`` records its source and
the frame each sample is. Quantize then measures on the other frames of that
source: SQNR and detection agreement on a few of them, and, where the source has
annotations (a nuScenes-layout dataset), nuScenes mAP and NDS of the float model
and of each quantized configuration on all held-out scenes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..samples import Sample

FIDELITY_FRAMES = 8  # frames SQNR and agreement are measured on (temporal models: runs of consecutive ones)


@dataclass
class HeldOut:
    recipe: object
    source: object  # deploykit.data.sources.Source
    frames: list  # the source's frames that are not calibration samples
    pillars: object  # the engine's PillarFormat (deploykit.preprocess.pillar_inputs)
    rig: object | None
    warnings: list[str]

    @property
    def temporal(self) -> bool:
        from ..models import camera_config

        return camera_config(self.recipe.model) is not None

    def samples(self, model, count: int = FIDELITY_FRAMES, exclude: set[str] = frozenset()) -> list[Sample]:
        """Engine feeds of ``count`` held-out frames (not in ``exclude``), spread over the
        data. For BEVFormer each run of consecutive frames is fed through the float model
        in order, so every frame's previous BEV is the one it would really carry."""
        from ..data.sources import lidar_feeds, runner_frame
        from .calib_set import pick_frames

        pool = [f for f in self.frames if f.token not in exclude]
        picked = pick_frames(pool, count, run=self.recipe.quantize.frames_per_scene if self.temporal else 1)
        out = []
        if self.temporal:
            from ..temporal import sequence_runner
            from ..temporal.runner import TorchEngine

            runner = sequence_runner(self.recipe.model, TorchEngine(model))
            for frame in picked:
                if runner.scene != frame.scene or runner.index != frame.index - 1:
                    runner.reset()
                f, _, _ = runner_frame(frame, self.recipe.model, self.rig, self.pillars)
                out.append(Sample(runner.feeds(f), {}, _info(frame)))
                runner.step(f)
        else:
            for frame in picked:
                feeds, _, _ = lidar_feeds(frame, self.recipe.model, self.pillars)
                out.append(Sample(feeds, {}, _info(frame)))
        return out

    def eval_frames(self, scenes: int | None) -> list:
        """The held-out frames of the first ``scenes`` scenes that have any (None: all)."""
        names = list(dict.fromkeys(f.scene for f in self.frames))[:scenes]
        return [f for f in self.frames if f.scene in names]


def _info(frame) -> dict:
    return {"scene": frame.scene, "index": frame.index, "token": frame.token}


def held_out(calib_set, recipe, manifest: dict) -> HeldOut | None:
    """The frames of the calibration set's source that it does not hold; None for a synthetic set."""
    if calib_set.source is None:
        return None
    from ..camera.rig import load_rig
    from ..data.sources import open_source
    from ..export import pillar_format
    from ..models import camera_config

    path = Path(calib_set.source["path"])
    if not path.exists():
        raise InputError(f"calibration set {calib_set.path} was made from {path}, which is gone; quantize measures "
                         "fidelity on that data's other frames: restore it or make the set again")
    source = open_source(path, recipe)
    used = calib_set.origin_tokens()
    frames = [f for f in source.frames if f.token not in used]
    warnings = []
    if not frames:
        warnings.append(f"every frame of {path} is in the calibration set, so fidelity is measured on calibration "
                        "frames; hold some out (calib -n fewer) to measure on unseen data")
        frames = source.frames
    # ``recipe`` carries the converted model's rig (deploykit.export.converted_rig).
    camera = camera_config(recipe.model)
    rig = load_rig(camera.rig) if camera is not None else None
    return HeldOut(recipe, source, frames, pillar_format(manifest), rig, warnings)


def score_nds(data: HeldOut, engines: dict, frames: list, *, quiet: bool = False,
              predictions: dict[str, dict] | None = None) -> dict:
    """nuScenes metrics of each engine (name -> anything with ``run``) on ``frames``;
    ``predictions`` (name -> boxes per frame token, as predict_frames returns them) scores
    what was predicted elsewhere instead."""
    from ..detect import predict_frames
    from ..detection.submission import evaluation_classes
    from ..detection.nuscenes_eval import evaluate_frames

    classes = evaluation_classes(data.recipe.model)
    out = {"source": str(data.source.path), "frames": len(frames),
           "scenes": list(dict.fromkeys(f.scene for f in frames)), "classes": classes}
    for key in predictions or engines:
        results = predictions[key] if predictions else predict_frames(
            data.recipe, engines[key], frames, pillars=data.pillars, rig=data.rig, description=f"scoring {key}",
            quiet=quiet)
        out[key] = evaluate_frames(frames, results, class_names=classes)
    return out


def suspect_sample(arrays: dict[str, np.ndarray]) -> str | None:
    """Why a calibration sample cannot be real data, or None: a sweep with (almost) no
    pillars, camera images that are noise."""
    if "coords" in arrays:
        pillars = int((arrays["coords"][:, -1] >= 0).sum())
        if pillars < 10 or not np.abs(arrays.get("pillars", np.ones(1))).any():
            return f"{pillars} non-empty pillars"
    if "img" in arrays:
        from ..data.images import image_looks_like_noise

        noisy = sum(image_looks_like_noise(cam) for cam in arrays["img"][0])
        if noisy * 2 >= arrays["img"].shape[1]:
            return f"{noisy} of {arrays['img'].shape[1]} camera images look like noise"
    return None
