"""The quantize steps that evaluate many model runs, on a worker pool (deploykit.distributed).

Each work item is computed whole on one worker exactly as the serial path computes it (one
configuration of the int16 search on all its samples; one configuration's outputs on a shard
of scenes), and the driver assembles the results in order, so the search and the scores are
the serial ones. Only where the work runs changes.
"""

from __future__ import annotations

from .insert import set_bits
from .sensitivity import Configuration, WorstSqnr


class PooledWorstSqnr:
    """WorstSqnr on a pool: each worker holds the quantized model, the samples and the references
    (a SerialPool holds the live ones)."""

    def __init__(self, pool, qmodel, samples, references, outputs: list[str] | None = None):
        self.pool = pool
        pool.share(evaluator=WorstSqnr(qmodel, samples, references, outputs))

    def __call__(self, configs: list[Configuration], description: str, quiet: bool = False) -> list[float]:
        names = [f"configuration {i + 1} of {len(configs)} ({len(c.quantized)} quantizers, {len(c.int16)} int16)"
                 for i, c in enumerate(configs)]
        return self.pool.map(_worst_sqnr, configs, description, quiet=quiet, names=names)


def _worst_sqnr(shared: dict, config: Configuration) -> float:
    return shared["evaluator"].one(config)


def evaluator(pool, qmodel, samples, references, outputs=None):
    """The int16 search's evaluator on the pool (a SerialPool runs it here, on the live model,
    and times its items as the workers do), or without one here."""
    if pool is None:
        return WorstSqnr(qmodel, samples, references, outputs)
    return PooledWorstSqnr(pool, qmodel, samples, references, outputs)


def labelled_scene_outputs(pool, recipe, model, qmodel, lifted: list[str], configurations, seeds: range, *,
                           quiet: bool = True) -> tuple[list[tuple], dict[str, list[dict]]]:
    """The architecture's labelled scenes for ``seeds`` (their feeds left out) and the outputs
    of the float model ("float") and of each quantized configuration (key -> int16
    quantizers) on them, in seed order. Each worker generates a shard of scenes itself (a
    scene is a function of its seed) and runs every model on it: only seeds go out and
    outputs and ground truth come back, where sending the feeds would cost more than the
    model runs."""
    from ..distributed import contiguous

    # More shards than workers: shards finish unevenly, the last ones fill the gaps.
    shards = contiguous(len(seeds), pool.workers * 4)
    pool.share(recipe=recipe, model=model, qmodel=qmodel, lifted=list(lifted),
               configurations=[(key, list(names)) for key, names in configurations])
    items = [seeds[r.start:r.stop] for r in shards]
    names = [f"scenes {r.start + 1}-{r.stop} of {len(seeds)}" for r in shards]
    results = pool.map(_scene_shard, items, "scoring scenes", quiet=quiet, names=names)
    scenes = [scene for shard in results for scene in shard["scenes"]]
    keys = ["float"] + [key for key, _ in configurations]
    return scenes, {key: [o for shard in results for o in shard["outputs"][key]] for key in keys}


def _scene_shard(shared: dict, seeds: range) -> dict:
    import dataclasses

    from ..models import ARCHITECTURES
    from ..samples import torch_outputs

    recipe, model, qmodel = shared["recipe"], shared["model"], shared["qmodel"]
    scenes = ARCHITECTURES[recipe.arch].labelled_scenes(recipe, model, seeds)
    outputs = {"float": [torch_outputs(model, s[0].feeds) for s in scenes]}
    for key, names16 in shared["configurations"]:
        set_bits(qmodel, shared["lifted"], 8)
        set_bits(qmodel, names16, 16)
        outputs[key] = [torch_outputs(qmodel, s[0].feeds) for s in scenes]
    return {"scenes": [(dataclasses.replace(s[0], feeds={}), *s[1:]) for s in scenes], "outputs": outputs}


def frame_predictions(pool, data, model, qmodel, lifted: list[str], configurations, frames: list, *,
                      quiet: bool = True) -> dict[str, dict]:
    """Boxes per frame token of the float model and each configuration on the user's held-out
    ``frames``, a shard of whole scenes per item (a temporal model's state stays in its scene)."""
    from ..distributed import by_scene

    keys = ["float"] + [key for key, _ in configurations]
    int16 = {key: list(names) for key, names in configurations}
    shards = by_scene([f.scene for f in frames], pool.workers * 2)
    pool.share(model=model, qmodel=qmodel, lifted=list(lifted), data=data)
    items = [{"key": key, "int16": int16.get(key), "frames": [frames[i] for i in shard]}
             for key in keys for shard in shards]
    names = [f"{it['key']} on scenes {', '.join(dict.fromkeys(f.scene for f in it['frames']))}" for it in items]
    results = pool.map(_predict, items, "scoring held-out frames", quiet=quiet, names=names)
    out: dict[str, dict] = {key: {} for key in keys}
    for item, result in zip(items, results):
        out[item["key"]].update(result)
    return out


def _predict(shared: dict, item: dict) -> dict:
    from ..detect import predict_frames
    from ..temporal.runner import TorchEngine

    data = shared["data"]
    if item["int16"] is None:
        engine = TorchEngine(shared["model"])
    else:
        engine = TorchEngine(shared["qmodel"])
        set_bits(shared["qmodel"], shared["lifted"], 8)
        set_bits(shared["qmodel"], item["int16"], 16)
    return predict_frames(data.recipe, engine, item["frames"], pillars=data.pillars, rig=data.rig, quiet=True)
