"""Measuring one stage: a fresh `spawn` child process per measurement (so peaks never
accumulate across stages), wall-clock timers, and peak-memory probes.

Peak memory on Linux is the kernel's resident-set high-water mark (VmHWM in
/proc/self/status). `MemoryProbe()` resets it (writing 5 to /proc/self/clear_refs, Linux
>= 4.0) and records the resident set at that moment as the baseline: the interpreter and
the imported libraries (torch alone is ~0.5 GiB), after handing freed heap pages back to
the OS (malloc_trim) so new allocations cannot hide in them. `report()` is then the growth of the
peak over that baseline: the stage's own memory, what the "2 x the arrays it must hold" rule
is about. Where the reset is not allowed the probe falls back to ru_maxrss, which still
includes import-time peaks (the record says which was used: `memory_probe`). On CUDA the
probe also reports torch's peak allocated device memory.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import gc
import multiprocessing
import os
import re
import resource
import time
from collections.abc import Callable
from typing import Any


def _status_kib(field: str) -> int | None:
    try:
        text = open("/proc/self/status").read()
    except OSError:
        return None
    found = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(found.group(1)) if found else None


def rss_bytes() -> int:
    kib = _status_kib("VmRSS")
    return kib * 1024 if kib is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def release_free_heap() -> None:
    """Return freed heap memory to the OS (glibc malloc_trim), so that later allocations
    show up in the resident set instead of silently reusing pages freed earlier."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class MemoryProbe:
    """Peak resident memory of this process since construction, over the baseline then."""

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        gc.collect()
        release_free_heap()
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # reset VmHWM to the current RSS
            self.method = "VmHWM reset at stage start"
        except OSError:
            self.method = "ru_maxrss (includes import-time peaks)"
        self.baseline = rss_bytes()
        if device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.device_baseline = torch.cuda.memory_allocated()

    def process_peak(self) -> int:
        kib = _status_kib("VmHWM")
        if kib is not None and self.method.startswith("VmHWM"):
            return kib * 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def report(self) -> dict[str, Any]:
        peak = self.process_peak()
        out: dict[str, Any] = {"peak_memory_bytes": max(0, peak - self.baseline),
                               "process_peak_rss_bytes": peak,
                               "baseline_rss_bytes": self.baseline,
                               "memory_probe": self.method}
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            out["peak_device_memory_bytes"] = int(torch.cuda.max_memory_allocated()
                                                  - self.device_baseline)
        return out


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


class Timer:
    """with Timer(device) as t: ...; t.seconds. Synchronises CUDA at both ends."""

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self.seconds = float("nan")

    def __enter__(self) -> Timer:
        sync(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        sync(self.device)
        self.seconds = time.perf_counter() - self._start


def configure_threads(threads: int) -> None:
    """Set torch and FAISS CPU threads (0: leave the libraries' defaults)."""
    if threads > 0:
        import faiss
        import torch

        torch.set_num_threads(threads)
        faiss.omp_set_num_threads(threads)


def _child(func: Callable[..., dict], threads: int, kwargs: dict) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    configure_threads(threads)
    import torch

    out = func(**kwargs)
    out.setdefault("threads", torch.get_num_threads())
    return out


def run_isolated(func: Callable[..., dict], *, threads: int = 0, **kwargs: Any) -> dict:
    """Run func(**kwargs) in a fresh spawned process and return its dict. func must be a
    module-level function; it creates its own `MemoryProbe` after its imports."""
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(_child, func, threads, kwargs).result()
