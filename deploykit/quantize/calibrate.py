"""Calibration: every quantizer's range from the calibration set, here or on Ray workers.

Serially the model runs over the set once, in scene order. On a pool the set is cut into
shards of whole scenes (temporal models carry the previous BEV or key frame within a scene,
never across one); each worker calibrates its shard from fresh statistics and returns its
calibrators, which merge exactly (deploykit.quantize.calibrators: max of maxes, histograms on
a shared power-of-two grid), so the ranges are the serial ones bit for bit.
"""

from __future__ import annotations

import numpy as np

from ..progress import track
from ..samples import torch_outputs
from .insert import quantizers
from .ort_flavour import widen_output_ranges

SHARDS_PER_WORKER = 2  # a little slack for shards of unequal cost


def _collect(qmodel, recipe, samples, temporal: bool, suspects: list | None, output_ranges: dict | None) -> None:
    from ..temporal import sequence_runner
    from ..temporal.runner import TorchEngine
    from .user_data import suspect_sample

    # Temporal models calibrate in scene order on their own state (the fake-quant model's
    # previous BEV, or previous key frame's depth and context), as the int8 engine runs.
    runner = sequence_runner(recipe.model, TorchEngine(qmodel)) if temporal else None
    for sample in samples:
        why = suspect_sample(sample.arrays) if suspects is not None else None
        if why:
            suspects.append(f"{sample.file}: {why}")
        if runner is not None:
            outputs = runner.step(runner.frame_from_arrays(sample.arrays, sample.scene, sample.index))
        else:
            outputs = torch_outputs(qmodel, sample.arrays)
        if output_ranges is not None:  # float outputs: calibrating quantizers pass values through
            widen_output_ranges(output_ranges, outputs)


def calibrate(qmodel, recipe, calib, *, quiet: bool = False, suspects: list[str] | None = None,
              output_ranges: dict | None = None, pool=None) -> list[str]:
    """Calibrate every quantizer; returns the names of those that saw no data (not on the
    deployed path). ``suspects`` collects the samples that cannot be real data (why, per file).
    ``pool`` (deploykit.distributed) runs shards of the set on its workers."""
    for q in quantizers(qmodel).values():
        q.start_calibration()
    if pool is None or pool.workers == 1:
        _collect(qmodel, recipe, track(calib, "calibrating", quiet=quiet, total=len(calib)), calib.temporal,
                 suspects, output_ranges)
    else:
        _merge_shards(qmodel, recipe, calib, pool, quiet, suspects, output_ranges)
    return [name for name, q in quantizers(qmodel).items() if not q.finish_calibration()]


def _calibrate_shard(shared: dict, shard: dict) -> dict:
    qmodel = shared["qmodel"]
    for q in quantizers(qmodel).values():  # a worker's model serves shard after shard
        q.start_calibration()
    suspects: list[str] = []
    ranges: dict = {}
    samples = [shared["calib"].load_sample(e) for e in shard["entries"]]
    _collect(qmodel, shared["recipe"], samples, shard["temporal"], suspects, ranges)
    return {"calibrators": {n: q.calibrator for n, q in quantizers(qmodel).items() if q.calibrator.batches},
            "suspects": suspects, "ranges": ranges}


def _merge_shards(qmodel, recipe, calib, pool, quiet, suspects, output_ranges) -> None:
    from ..distributed import by_scene, contiguous

    entries = list(calib.entries)
    count = pool.workers * SHARDS_PER_WORKER
    groups = (by_scene([str(e["scene"]) for e in entries], count) if calib.temporal
              else [list(r) for r in contiguous(len(entries), count)])
    shards = [{"entries": [entries[i] for i in g], "temporal": calib.temporal} for g in groups]
    # The set's files are read where the work runs: a cluster needs them on shared storage.
    pool.share(qmodel=qmodel, recipe=recipe, calib=calib)
    names = [f"calibration shard {k + 1} of {len(shards)} ({_span(s['entries'])})" for k, s in enumerate(shards)]
    results = pool.map(_calibrate_shard, shards, "calibrating", quiet=quiet, names=names)
    mine = quantizers(qmodel)
    for result in results:  # in shard order, though the merges do not depend on it
        for name, cal in result["calibrators"].items():
            mine[name].calibrator.merge(cal)
        if suspects is not None:
            suspects.extend(result["suspects"])
        if output_ranges is not None:
            for name, (lo, hi) in result["ranges"].items():
                widen_output_ranges(output_ranges, {name: np.array([lo, hi])})


def _span(entries: list[dict]) -> str:
    return entries[0]["file"] if len(entries) == 1 else f"{entries[0]['file']} .. {entries[-1]['file']}"
