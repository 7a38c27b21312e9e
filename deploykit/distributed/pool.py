"""Run independent work items on Ray workers, or one after another here: the same results either way.

A ``Pool`` holds shared objects (the models, the samples) on every worker once, and maps a
module-level function ``fn(shared, item)`` over work items, returning results in item order.
``SerialPool`` is the same interface on the live objects of this process (nothing is copied):
the default, and what runs when Ray is not installed. Work is handed to whichever worker is
free (items cost unequal time: a temporal shard, a module with a large layer), progress is
one bar over all workers, and a failing item fails the whole map with one message naming
it, before anything is written.

Worker failures: a worker process that dies (killed, out of memory) is restarted by Ray
and its item run again (``RETRIES`` times); an exception raised by the work itself is not
retried (it would fail again) and is re-raised with the item's name.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any, Callable, Iterator, Sequence

from ..errors import DeployError, InputError
from ..progress import console, track

RETRIES = 2


class MapStats:
    """What one map cost: wall time, and the seconds its items computed (on whichever worker)."""

    def __init__(self):
        self.maps: list[dict] = []

    def record(self, description: str, wall_s: float, item_s: list[float]) -> None:
        self.maps.append({"description": description, "items": len(item_s), "wall_s": round(wall_s, 4),
                          "item_s": round(sum(item_s), 4), "slowest_item_s": round(max(item_s, default=0.0), 4)})


class SerialPool:
    """Work items one after another in this process, on the objects themselves."""

    workers = 1
    description = "serial"

    def __init__(self) -> None:
        self.shared: dict[str, Any] = {}
        self.stats = MapStats()

    def share(self, **objects) -> None:
        self.shared = objects

    def map(self, fn: Callable, items: Sequence, description: str, *, quiet: bool = False,
            names: Sequence[str] | None = None) -> list:
        start, results, seconds = time.perf_counter(), [], []
        for item in track(list(items), description, quiet=quiet):
            t = time.perf_counter()
            results.append(fn(self.shared, item))
            seconds.append(time.perf_counter() - t)
        self.stats.record(description, time.perf_counter() - start, seconds)
        return results

    def close(self) -> None:
        self.shared = {}


class RayPool:
    """``workers`` Ray actors, each holding a copy of the shared objects."""

    def __init__(self, workers: int | None, address: str | None = None):
        import ray

        self._ray = ray
        self._started = not ray.is_initialized()
        if self._started:
            kwargs = {"address": address} if address else {"num_cpus": workers}
            # The driver's environment reaches local workers; a cluster's nodes need deploykit installed.
            ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False, **kwargs)
        # On a cluster without --workers: one worker per CPU it has.
        workers = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        self.workers = workers
        self.description = f"{workers} Ray workers" + (f" at {address}" if address else " (local)")
        self._actors: list = []
        self._generation = 0
        self._shared: tuple[int, dict] = (0, {})
        self.stats = MapStats()
        self._worker_cls = ray.remote(num_cpus=1, max_restarts=RETRIES, max_task_retries=RETRIES)(_Worker)
        # Actors start now and boot (import torch: seconds) while the driver loads the model.
        self._start()

    def share(self, **objects) -> None:
        """Put ``objects`` in Ray's object store once; each worker reads them at its next item
        (again after a restart: every item names them, so a restarted worker finds them).
        Workers start once and serve every step: starting a process costs seconds."""
        self._generation += 1
        self._shared = (self._generation, {k: self._ray.put(v) for k, v in objects.items()})
        self._start()

    def _start(self) -> None:
        if not self._actors:
            self._actors = [self._worker_cls.remote() for _ in range(self.workers)]

    def map(self, fn: Callable, items: Sequence, description: str, *, quiet: bool = False,
            names: Sequence[str] | None = None) -> list:
        ray = self._ray
        items = list(items)
        names = list(names) if names is not None else [f"item {i + 1} of {len(items)}" for i in range(len(items))]
        self._start()
        results: list = [None] * len(items)
        seconds: list[float] = [0.0] * len(items)
        start = time.perf_counter()
        pending: dict = {}  # ref -> (item index, actor)
        free = list(self._actors)
        queue = iter(range(len(items)))
        bar = _Bar(len(items), f"{description} [{self.workers} workers]", quiet)
        try:
            with bar:
                for i in queue:
                    actor = free.pop()
                    pending[actor.run.remote(self._shared, fn, items[i])] = (i, actor)
                    if not free:
                        break
                while pending:
                    done, _ = ray.wait(list(pending), num_returns=1)
                    i, actor = pending.pop(done[0])
                    results[i], seconds[i] = _get(ray, done[0], names[i], description)
                    bar.advance()
                    nxt = next(queue, None)
                    if nxt is not None:
                        pending[actor.run.remote(self._shared, fn, items[nxt])] = (nxt, actor)
        except BaseException:
            # Workers may be dead or mid-item: the next share starts fresh ones.
            self.release()
            raise
        self.stats.record(description, time.perf_counter() - start, seconds)
        return results

    def release(self) -> None:
        """Stop the workers (Ray stays up): their CPUs are free for another pool."""
        for actor in self._actors:
            self._ray.kill(actor)
        self._actors = []

    def close(self) -> None:
        self.release()
        if self._started:
            self._ray.shutdown()


class _Worker:
    def __init__(self):
        import ray
        import torch

        # One thread per CPU Ray gave this worker: N workers on N cores do not oversubscribe them.
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
        torch.set_num_threads(max(1, int(cpus)))
        from ..memory import keep_freed_memory

        keep_freed_memory()  # workers sharing a machine otherwise contend on page faults (deploykit.memory)
        self.key, self.shared = None, {}

    def run(self, shared: tuple[int, dict], fn: Callable, item):
        import ray

        key, refs = shared  # refs inside a tuple are not resolved by Ray: fetched once per share
        start = time.perf_counter()  # fetching the shared objects counts: it is the item's cost here
        if key != self.key:
            self.key, self.shared = key, {k: ray.get(v) for k, v in refs.items()}
        return fn(self.shared, item), time.perf_counter() - start


def _get(ray, ref, name: str, description: str):
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause if isinstance(getattr(exc, "cause", None), BaseException) else exc
        first = str(cause).strip().splitlines()[-1] if str(cause).strip() else type(cause).__name__
        err = type(cause) if isinstance(cause, DeployError) else DeployError
        raise err(f"{description}: {name} failed on a Ray worker: {first}") from None
    except ray.exceptions.RayError as exc:  # the worker died more often than it was retried
        first = str(exc).strip().splitlines()[0]
        raise DeployError(f"{description}: {name} failed on a Ray worker after {RETRIES} retries: {first}") from None


class _Bar:
    """One rich progress bar advanced as any worker finishes an item."""

    def __init__(self, total: int, description: str, quiet: bool):
        self.total, self.description, self.quiet = total, description, quiet
        self._progress = self._task = None

    def __enter__(self):
        if not self.quiet:
            from rich.progress import Progress

            self._progress = Progress(console=console(), transient=True)
            self._progress.__enter__()
            self._task = self._progress.add_task(self.description, total=self.total)
        return self

    def advance(self) -> None:
        if self._progress is not None:
            self._progress.advance(self._task)

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.__exit__(*exc)


def ray_available() -> bool:
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def worker_pool(workers: int | None = None, address: str | None = None) -> Iterator[SerialPool | RayPool]:
    """The pool ``--workers N`` / ``--ray-address ADDR`` ask for: serial when neither (or one
    local worker) is asked; a local Ray instance of N workers; or N workers (default: the
    cluster's CPUs) on an existing cluster. Ray is an optional extra."""
    if workers is not None and workers < 1:
        raise InputError(f"--workers must be 1 or more, got {workers}")
    if address is None and (workers or 1) == 1:
        pool: SerialPool | RayPool = SerialPool()
    else:
        if not ray_available():
            raise InputError("--workers/--ray-address need Ray, which is not installed: "
                             "pip install 'deploykit[ray]' (or run without them, serially)")
        if address is None and workers > (os.cpu_count() or 1):
            console().print(f"[yellow]warning:[/yellow] {workers} workers on {os.cpu_count()} CPUs: "
                            "they will share cores, which is slower than one per core")
        pool = RayPool(workers, address)
    try:
        yield pool
    finally:
        pool.close()
