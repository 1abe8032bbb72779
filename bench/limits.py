"""The limits every figure is reported against, measured on this machine in the same run,
and a description of the machine.

Matrix-multiply throughput: the best of repeated `torch.mm` of square float32 matrices
(C = A @ B, 2 n^3 FLOP; n = 1024, 2048, 4096, each repeated for at least 3 s), after a
warm-up, at the thread count of the run. It is the practical ceiling of dense fp32
arithmetic here: a stage made of matrix products can approach it, never beat it. Taking
the best of many short products also keeps the figure honest on a shared machine, where a
single long product is likely to be preempted (on a quiet machine the largest size wins). On CUDA the same is measured in fp32 with TF32 off (what the
pipeline's fp32 training and inference use; torch leaves TF32 off for matmul by default),
with TF32 on, and in bf16.
"""

from __future__ import annotations

import os
import platform
import time
from typing import Any

CPU_SIZES = (1024, 2048, 4096)
CUDA_SIZE = 8192
MIN_SECONDS = 3.0  # per size: repeat until at least this long (and `repeats` times)
MAX_REPEATS = 200


def _best_mm(n: int, *, device: str, dtype: Any, repeats: int, tf32: bool = False) -> dict:
    import torch

    from bench.measure import sync

    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = tf32
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    c = torch.empty(n, n, device=device, dtype=dtype)
    torch.mm(a, b, out=c)  # warm-up: thread pool, kernels, page faults
    times: list[float] = []
    while len(times) < MAX_REPEATS and (len(times) < repeats or sum(times) < MIN_SECONDS):
        sync(device)
        start = time.perf_counter()
        torch.mm(a, b, out=c)
        sync(device)
        times.append(time.perf_counter() - start)
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False
    flop = 2.0 * n ** 3
    return {"n": n, "flop_per_s": flop / min(times),
            "median_flop_per_s": flop / sorted(times)[len(times) // 2], "repeats": len(times)}


def matmul_throughput(device: str = "cpu", repeats: int = 5) -> dict:
    """{'fp32': FLOP/s, ..., 'trials': [...]} for `device`; 'fp32' is the limit used
    everywhere (the pipeline computes in fp32)."""
    import torch

    trials: list[dict] = []
    if device.startswith("cuda"):
        for name, dtype, tf32 in (("fp32", torch.float32, False), ("tf32", torch.float32, True),
                                  ("bf16", torch.bfloat16, False)):
            trial = _best_mm(CUDA_SIZE, device=device, dtype=dtype, repeats=repeats, tf32=tf32)
            trials.append({"precision": name, **trial})
    else:
        for n in CPU_SIZES:
            trials.append({"precision": "fp32", **_best_mm(n, device=device, dtype=torch.float32,
                                                          repeats=repeats)})
    best: dict[str, float] = {}
    for t in trials:
        best[t["precision"]] = max(best.get(t["precision"], 0.0), t["flop_per_s"])
    return {**best, "device": device, "threads": torch.get_num_threads(), "trials": trials}


def matmul_child(device: str, repeats: int = 5) -> dict:
    """Entry point for `run_isolated`."""
    return matmul_throughput(device, repeats)


def gemm_throughput(shapes: list[tuple[int, int, int]], *, device: str, repeats: int = 20
                    ) -> list[dict]:
    """fp32 FLOP/s of (m, k) @ (k, n) products at given shapes (the layer shapes of a
    stage), best of `repeats` after a warm-up: what the small products can reach here."""
    import torch

    from bench.measure import sync

    out = []
    for m, k, n in shapes:
        a = torch.randn(m, k, device=device)
        b = torch.randn(k, n, device=device)
        torch.mm(a, b)
        best = float("inf")
        for _ in range(repeats):
            sync(device)
            start = time.perf_counter()
            torch.mm(a, b)
            sync(device)
            best = min(best, time.perf_counter() - start)
        out.append({"m": m, "k": k, "n": n, "flop_per_s": 2.0 * m * k * n / best})
    return out


def _read(path: str) -> str | None:
    try:
        with open(path) as fh:
            return fh.read().strip()
    except OSError:
        return None


def _cpuinfo() -> dict[str, Any]:
    text = _read("/proc/cpuinfo") or ""
    info: dict[str, Any] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key in ("model name", "cpu MHz", "flags", "cache size") and key not in info:
            info[key] = value
    flags = set(info.pop("flags", "").split())
    simd = [f for f in ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16",
                        "amx_tile") if f in flags]
    return {"model": info.get("model name", platform.processor() or "unknown"),
            "mhz": info.get("cpu MHz"), "cache": info.get("cache size"), "simd": simd}


def _mem_total() -> int | None:
    for line in (_read("/proc/meminfo") or "").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return None


def describe_machine(device: str) -> dict[str, Any]:
    """CPU, cores, memory, cgroup limits, load, library versions, GPU."""
    import faiss
    import numpy
    import torch

    try:
        import open_clip

        open_clip_version = open_clip.__version__
    except Exception:  # noqa: BLE001 - only a label
        open_clip_version = None
    cfg = torch.__config__.show()
    blas = next((b for b in ("mkl", "openblas", "accelerate") if f"BLAS_INFO={b}" in cfg), None)
    gpu = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = {"name": props.name, "memory_bytes": props.total_memory,
               "count": torch.cuda.device_count(), "cuda": torch.version.cuda}
    return {
        "cpu": _cpuinfo(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cgroup_cpu_max": _read("/sys/fs/cgroup/cpu.max"),
        "memory_bytes": _mem_total(),
        "cgroup_memory_max": _read("/sys/fs/cgroup/memory.max"),
        "loadavg_at_start": list(os.getloadavg()),
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__, "torch_blas": blas, "torch_threads": torch.get_num_threads(),
        "faiss": faiss.__version__, "faiss_compile_options": faiss.get_compile_options(),
        "numpy": numpy.__version__, "open_clip": open_clip_version,
        "gpu": gpu, "device": device,
    }
