"""Ordered parallel work for the sources (image checks, PNG encoding) and its runtime
knobs: `lra prepare --workers N --progress` set them with `parallel_options`.

`parallel_chunks(fn, items, n)` splits `items` into ordered chunks, runs `fn` on each in
a `concurrent.futures.ProcessPoolExecutor` of `worker_count()` processes (or in this
process for one worker or one chunk), and concatenates the results in input order, with
a `prepare` progress bar over the items.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any

MAX_WORKERS = 16
CHUNKS_PER_WORKER = 4
MAX_CHUNK = 1024

_OPTIONS = {"workers": 0, "progress": False}


@contextlib.contextmanager
def parallel_options(*, workers: int = 0, progress: bool = False) -> Iterator[None]:
    """Runtime knobs of the parallel image work below (`lra prepare --workers
    --progress`): workers 0 means one per usable CPU, at most MAX_WORKERS."""
    before = dict(_OPTIONS)
    _OPTIONS.update(workers=workers, progress=progress)
    try:
        yield
    finally:
        _OPTIONS.update(before)


def progress_bar(total: int) -> Any:
    """A `prepare` progress bar over `total` images, shown under
    `parallel_options(progress=True)`."""
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="img", desc="prepare", disable=not _OPTIONS["progress"],
                dynamic_ncols=True)


def worker_count() -> int:
    """Processes for parallel image work: `parallel_options(workers=N)` when N > 0, else
    the usable CPUs, at most MAX_WORKERS."""
    if _OPTIONS["workers"] > 0:
        return int(_OPTIONS["workers"])
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, MAX_WORKERS))


def _chunk_bounds(n: int, workers: int) -> list[tuple[int, int]]:
    """[start, stop) bounds of ordered chunks: about CHUNKS_PER_WORKER per worker,
    at most MAX_CHUNK items each (so progress is even and memory per task small)."""
    if n == 0:
        return []
    size = max(1, min(MAX_CHUNK, -(-n // (workers * CHUNKS_PER_WORKER))))
    return [(start, min(start + size, n)) for start in range(0, n, size)]


def parallel_chunks(fn: Callable[[Any], list], items: Any, n: int) -> list:
    """Apply `fn` to ordered chunks `items[start:stop]` in worker processes; results are
    concatenated in input order. `fn` must be a module-level function (picklable)."""
    workers = worker_count()
    bounds = _chunk_bounds(n, workers)
    chunks = [items[a:b] for a, b in bounds]
    parts = []
    with progress_bar(n) as bar, contextlib.ExitStack() as stack:
        if workers == 1 or len(chunks) <= 1:
            results: Iterator[list] = map(fn, chunks)
        else:
            pool = stack.enter_context(ProcessPoolExecutor(max_workers=min(workers,
                                                                           len(chunks))))
            results = pool.map(fn, chunks)
        for (a, b), part in zip(bounds, results):
            parts.append(part)
            bar.update(b - a)
    return [result for part in parts for result in part]
