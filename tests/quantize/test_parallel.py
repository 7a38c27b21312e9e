"""quantize on Ray workers gives the serial results: calibration, the int16 search, mAP.

A local Ray instance with 2 workers (one per core here) serves the module; each test runs
the same work serially and on the pool and asserts the results equal, bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os

import pytest
import torch

from deploykit.distributed import by_scene, contiguous, worker_pool
from deploykit.errors import DeployError, InputError

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def pool():
    from deploykit.distributed import RayPool

    p = RayPool(2)
    yield p
    p.close()


def test_shards_are_contiguous_and_keep_scenes_whole():
    assert [list(r) for r in contiguous(5, 2)] == [[0, 1, 2], [3, 4]]
    assert [list(r) for r in contiguous(2, 4)] == [[0], [1]]
    scenes = ["a", "a", "a", "b", "c", "c", "d"]
    shards = by_scene(scenes, 2)
    assert sum(shards, []) == list(range(7))  # order kept
    assert all(len({scenes[i] for i in s} & {scenes[j] for t in shards if t is not s for j in t}) == 0
               for s in shards)  # no scene in two shards
    with pytest.raises(ValueError, match="not consecutive"):
        by_scene(["a", "b", "a"], 2)


def test_pool_without_ray_or_with_zero_workers_says_what_to_do(monkeypatch):
    with pytest.raises(InputError, match="1 or more"):
        with worker_pool(0):
            pass
    monkeypatch.setattr("deploykit.distributed.pool.ray_available", lambda: False)
    with pytest.raises(InputError, match=r"need Ray.*pip install 'deploykit\[ray\]'"):
        with worker_pool(2):
            pass
    with worker_pool(1) as serial:  # one worker is the serial path, Ray or not
        assert serial.workers == 1


def _square(shared, x):
    if x == 3 and shared.get("fail"):
        raise InputError("three is bad")
    return x * x + shared["offset"]


def _die_once(shared, x):
    marker = shared["marker"]
    if x == 1 and not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(1)  # the worker process dies mid-item
    return x


def _die_always(shared, x):
    os._exit(1)


def test_map_keeps_order_names_a_failing_item_and_survives_a_dying_worker(pool, tmp_path):
    pool.share(offset=1)
    assert pool.map(_square, range(6), "squares", quiet=True) == [1, 2, 5, 10, 17, 26]
    pool.share(offset=0, fail=True)
    with pytest.raises(InputError, match="squares: shard 4 failed on a Ray worker: three is bad"):
        pool.map(_square, range(6), "squares", quiet=True, names=[f"shard {i + 1}" for i in range(6)])
    pool.share(marker=str(tmp_path / "died"))
    assert pool.map(_die_once, range(4), "dying", quiet=True) == [0, 1, 2, 3]  # restarted, item run again
    assert (tmp_path / "died").exists()
    pool.share()
    with pytest.raises(DeployError, match=r"doomed: item 1 of 1 failed on a Ray worker after 2 retries"):
        pool.map(_die_always, [0], "doomed", quiet=True)


@contextlib.contextmanager
def one_thread():
    """PyTorch's CPU convolutions round differently on 1 and 2 threads (a folded 1x1 conv by
    1e-6 here), and each worker has one: the serial run compared with them has one too, so
    what is compared is the distribution alone. bench_scale.py measures the default."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _calibrated(recipe, converted, calib_dir, pool=None):
    from deploykit.quantize.calib_set import load_calib_set
    from deploykit.quantize.calibrate import calibrate
    from deploykit.quantize.fold_bn import fold_batchnorms
    from deploykit.quantize.insert import insert_quantizers, quantizers
    from deploykit.quantize.pipeline import load_converted

    model, _ = load_converted(recipe, converted)
    qmodel = insert_quantizers(fold_batchnorms(model)[0], recipe.quantize.calibrator,
                               recipe.quantize.calibrator_overrides)
    suspects, ranges = [], {}
    unused = calibrate(qmodel, recipe, load_calib_set(calib_dir), quiet=True, suspects=suspects,
                       output_ranges=ranges, pool=pool)
    return {n: q.amax.clone() for n, q in quantizers(qmodel).items()}, unused, ranges, suspects


@pytest.mark.parametrize("method", ["max", "entropy"])
def test_temporal_calibration_on_two_workers_equals_serial(pool, bev_recipe, bev_converted_dir, tmp_path, method):
    from deploykit.quantize.calib_set import build_calib_set

    # Two scenes of three frames: each shard carries its own previous BEV.
    recipe = dataclasses.replace(bev_recipe, quantize=dataclasses.replace(bev_recipe.quantize, calibrator=method))
    calib = build_calib_set(recipe, tmp_path / "calib", samples=6, frames_per_scene=3)
    with one_thread():
        serial = _calibrated(recipe, bev_converted_dir, calib)
    sharded = _calibrated(recipe, bev_converted_dir, calib, pool)
    assert serial[1:] == sharded[1:]
    assert serial[0].keys() == sharded[0].keys()
    assert all(torch.equal(serial[0][n], sharded[0][n]) for n in serial[0]), \
        [n for n in serial[0] if not torch.equal(serial[0][n], sharded[0][n])][:5]


def _results(out):
    fidelity = json.loads((out / "fidelity.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    return (fidelity, json.loads((out / "sensitivity.json").read_text()),
            json.loads((out / "quantizers.json").read_text()), manifest["int16"])


def test_quantize_with_sensitivity_and_map_on_two_workers_equals_serial(pool, synth_converted_dir, tmp_path,
                                                                        monkeypatch):
    from deploykit.quantize import pipeline
    from deploykit.quantize.pipeline import quantize
    from deploykit.recipe import load_recipe

    # Two greedy steps whatever they reach: an unmet target would stop the run before the report.
    monkeypatch.setattr(pipeline, "raise_if_unmet", lambda search: None)
    recipe = load_recipe("centerpoint_pillar_synth")
    # A search of a few steps and a quick mAP: the same work items as the full run, fewer of them.
    recipe = dataclasses.replace(recipe, quantize=dataclasses.replace(recipe.quantize, eval_scenes=4,
                                                                      calib_samples=4, int16_budget=2,
                                                                      target_sqnr_db=99.0),
                                 check=dataclasses.replace(recipe.check, samples=1))
    with one_thread():  # here too, as on the workers: the driver's own steps are compared as well
        serial = quantize(recipe, synth_converted_dir, tmp_path / "serial", int16_sensitive=True, quiet=True)
        # The module's Ray instance is running: quantize's pool joins it instead of starting another,
        # once this pool's workers have given back their CPUs.
        pool.release()
        parallel = quantize(recipe, synth_converted_dir, tmp_path / "ray", int16_sensitive=True, quiet=True,
                            workers=2)
    assert serial.fidelity["task_map"]["int8"]["mAP"] > 0.5  # the model works: the comparison means something
    a, b = _results(tmp_path / "serial"), _results(tmp_path / "ray")
    assert a == b
    workers = json.loads((tmp_path / "ray" / "manifest.json").read_text())["workers"]
    assert (workers["count"], workers["where"]) == (2, "2 Ray workers (local)")
    # The same work items in the same maps, each timed where it ran (serially, calibration is one
    # pass over the set, not a map of shards).
    serial_maps = json.loads((tmp_path / "serial" / "manifest.json").read_text())["workers"]["maps"]
    assert ([(m["description"], m["items"]) for m in workers["maps"] if m["description"] != "calibrating"]
            == [(m["description"], m["items"]) for m in serial_maps])
    assert all(m["item_s"] > 0 and m["wall_s"] >= m["slowest_item_s"] for m in workers["maps"])
    assert parallel.fidelity["task_map"] == serial.fidelity["task_map"]


def test_nds_on_held_out_user_frames_on_two_workers_equals_serial(pool, synth_converted_dir, nuscenes_dir, tmp_path):
    from deploykit.quantize.calib_set import calib
    from deploykit.quantize.pipeline import quantize

    calib("centerpoint_pillar_synth", tmp_path / "calib", source=nuscenes_dir, samples=4)
    with one_thread():
        serial = quantize(None, synth_converted_dir, tmp_path / "serial", calib=tmp_path / "calib", quiet=True)
        pool.release()
        parallel = quantize(None, synth_converted_dir, tmp_path / "ray", calib=tmp_path / "calib", quiet=True,
                            workers=2)
    assert serial.fidelity["task_nds"]["frames"] == 4 and serial.fidelity["task_nds"]["float"]["NDS"] > 0
    assert parallel.fidelity["task_nds"] == serial.fidelity["task_nds"]
    assert parallel.fidelity["int8"] == serial.fidelity["int8"]  # calibrated on user frames, sharded by scene


def test_a_failing_shard_is_named_and_nothing_is_written(pool, synth_converted_dir, tmp_path):
    from deploykit.quantize.calib_set import build_calib_set
    from deploykit.quantize.pipeline import quantize
    from deploykit.recipe import load_recipe

    recipe = load_recipe("centerpoint_pillar_synth")
    calib = build_calib_set(recipe, tmp_path / "calib", samples=4, frames_per_scene=1)
    bad = sorted(calib.glob("*.npz"))[2]
    bad.write_bytes(b"not an npz")  # read on the worker that gets this shard
    pool.release()
    with pytest.raises(InputError, match=rf"calibration shard \d of \d \(.*\) failed on a Ray worker: "
                                         rf"calibration sample .*{bad.name} cannot be read"):
        quantize(recipe, synth_converted_dir, tmp_path / "q", calib=calib, quiet=True, workers=2)
    assert not (tmp_path / "q").exists() and not list(tmp_path.glob("q.*"))
