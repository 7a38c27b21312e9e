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
    """WorstSqnr on a pool: each worker holds the quantized model, the samples and the references."""

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
    """The int16 search's evaluator: here on the live model, or on the pool's workers."""
    if pool is None or pool.workers == 1:
        return WorstSqnr(qmodel, samples, references, outputs)
    return PooledWorstSqnr(pool, qmodel, samples, references, outputs)


def scene_outputs(pool, model, qmodel, lifted: list[str], configurations, feeds: list[dict], *,
                  quiet: bool = True) -> dict[str, list[dict]]:
    """Outputs of the float model ("float") and of each quantized configuration (key ->
    int16 quantizers) on every scene's feeds, in scene order, computed on the pool's workers
    a shard of scenes at a time."""
    from ..distributed import contiguous

    keys = ["float"] + [key for key, _ in configurations]
    int16 = {key: list(names) for key, names in configurations}
    shards = contiguous(len(feeds), pool.workers * 2)
    pool.share(model=model, qmodel=qmodel, lifted=list(lifted))
    items = [{"key": key, "int16": int16.get(key), "feeds": [feeds[i] for i in r]} for key in keys for r in shards]
    names = [f"{it['key']} on scenes {r.start + 1}-{r.stop} of {len(feeds)}" for it, r in
             zip(items, [r for _ in keys for r in shards])]
    results = pool.map(_outputs, items, "scoring scenes", quiet=quiet, names=names)
    out: dict[str, list[dict]] = {key: [] for key in keys}
    for item, result in zip(items, results):
        out[item["key"]].extend(result)
    return out


def _outputs(shared: dict, item: dict) -> list[dict]:
    from ..samples import torch_outputs

    if item["int16"] is None:
        return [torch_outputs(shared["model"], f) for f in item["feeds"]]
    qmodel = shared["qmodel"]
    set_bits(qmodel, shared["lifted"], 8)
    set_bits(qmodel, item["int16"], 16)
    return [torch_outputs(qmodel, f) for f in item["feeds"]]


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
