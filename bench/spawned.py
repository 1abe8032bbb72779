"""Run benchmark work items a few at a time, each in a freshly spawned interpreter.

spawn, not fork: a forked child would inherit torch's and OpenMP's thread state. The
function is named by module, because under `python -m bench.x` that module is
`__main__`, which a spawned worker does not import under that name.
"""

from __future__ import annotations

import concurrent.futures
import importlib
import multiprocessing
from typing import Any, Callable, Sequence


def run_spawned(module: str, function: str,
                calls: Sequence[tuple[Any, tuple, dict]], *, jobs: int,
                on_result: Callable[[Any, Any], None]) -> None:
    """Call module.function(*args, **kwargs) for each (tag, args, kwargs) of `calls`,
    `jobs` at a time, and on_result(tag, result) as each one finishes (in `calls` order
    when run in this process: jobs <= 1 or a single call)."""
    fn = getattr(importlib.import_module(module), function)
    if jobs <= 1 or len(calls) <= 1:
        for tag, args, kwargs in calls:
            on_result(tag, fn(*args, **kwargs))
        return
    with concurrent.futures.ProcessPoolExecutor(
            max_workers=min(jobs, len(calls)),
            mp_context=multiprocessing.get_context("spawn")) as pool:
        running = {pool.submit(fn, *args, **kwargs): tag for tag, args, kwargs in calls}
        for future in concurrent.futures.as_completed(running):
            on_result(running[future], future.result())
