"""pipeline.allocator: freed step-sized buffers stay mapped instead of faulting back in."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

# Ten 2 MiB arrays allocated and freed together, as a training step frees its gradients:
# prints the page faults of 20 such steps after a warm-up step.
PROBE = textwrap.dedent("""
    import resource, sys
    import numpy as np
    if sys.argv[1] == "retain":
        from pipeline.allocator import retain_freed_memory
        assert retain_freed_memory() and retain_freed_memory()  # idempotent
    def step():
        parts = [np.ones(512 * 1024, dtype=np.float32) for _ in range(10)]
        del parts
    step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        step()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], check=True,
                         capture_output=True, text=True).stdout
    return int(out.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_retained_memory_is_reused_without_page_faults():
    default, retained = _faults("default"), _faults("retain")
    # 20 steps x 20 MiB = 102,400 pages if every step faults them back in.
    assert default > 50_000, default  # the probe shows the cost it is meant to remove
    assert retained < 1_000, retained
