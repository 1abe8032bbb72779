"""Keep freed CPU memory in the process instead of handing it back to the OS after every
step (glibc's malloc; a no-op elsewhere).

Why: a training step frees and re-allocates the same ~10 MB of gradients and activations
(at CIFAR width the three (T + 1, H) gamma-table gradients alone are 6 MB). glibc returns
the freed top of its heap to the OS once it exceeds its trim threshold (a few MiB by
default), so the next step page-faults every page back in and zero-fills it: 3.3 ms per
step for the model's 2.5 M gradient entries, ~15 % of a CIFAR-scale step on the 2-core VM
(`bench/README.md`, train). With the thresholds below, blocks under MMAP_THRESHOLD come
from the heap and up to TRIM_THRESHOLD of free heap stays mapped, so those pages are
reused. Arrays larger than MMAP_THRESHOLD (the (N, D) feature matrix) are still mapped
on their own and returned when freed; the retained heap raised the CIFAR-scale train
benchmark's peak from 554 to 596 MiB.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import sys

log = logging.getLogger(__name__)

MMAP_THRESHOLD = 16 << 20  # bytes: larger blocks get their own mapping (returned when freed)
TRIM_THRESHOLD = 64 << 20  # bytes of free heap top kept mapped: a step's buffers, with room
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers


@functools.cache
def retain_freed_memory() -> bool:
    """Set glibc's trim and mmap thresholds (once per process). Returns whether they
    were set: False off Linux, under another C library, or if mallopt refused."""
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and \
        bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    if not ok:
        log.debug("mallopt refused the allocator thresholds; keeping the defaults")
    return ok
