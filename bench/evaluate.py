"""evaluate: the `lra evaluate` stage itself (`stages.evaluate.evaluate`, called in-process)
on the pipeline's artifacts for the first `rows` synthetic rows (`bench.tables`): embeddings
and neighbours streamed chunk by chunk, the 10-step mean-start DDIM trajectory of a randomly
initialised network of the scale's width (speed does not depend on the weights), kNN vote,
the two linear probes (fitted on at most evaluate.linear_max_rows train rows), metrics and
predictions.parquet written by chunk.

Limit: rows/s = matmul FLOP/s / FLOPs per row of the trajectory (the features-only part of
the network once, the rest at each of the 10 steps: `ModelSpec.sampling_flops_per_sample`);
the probes' fitting
and the I/O are part of the stage's time but not of the limit. The memory rule is that
evaluation streams: the stage runs on two table sizes and `memory_growth_bytes_per_row`
(the difference of their peaks per extra row) says what memory grows with N. Each child
first runs the stage on a 2,048-row table (one-time costs: lazy imports, thread pools,
allocator arenas; `warm_up_peak_memory_bytes`), then measures. The arrays
it must hold: the probes' fitting subset, one chunk of embeddings and scores, and the
per-row ids, splits, labels and predicted classes; `memory_growth_bytes_per_row` is the
growth of the peak beyond those arrays. When N rows would take longer than the
time budget, the stage runs on the first rows and the time is extrapolated
(`extrapolated_from_rows`).
"""

from __future__ import annotations

from typing import Any

from bench.records import record

PER_ROW_BYTES = 8 + 8 + 8 + 8 + 5 * 8 + 64
"""Per-row arrays the stage holds: sample_id, clean, observed (int64), the split as a
Python object (pointer + ~56-byte str), 5 methods' predicted classes (int64)."""


def child(*, data_dir: str, scale: dict, rows: int, chunk_rows: int, device: str,
          stage_threads: int) -> dict[str, Any]:
    """Runs in a fresh process; stage_threads: the stage's --threads (0: its default)."""
    import tempfile
    from pathlib import Path

    import yaml

    from bench import tables
    from bench.measure import MemoryProbe, Timer
    from pipeline.model import ModelSpec
    from stages.evaluate import evaluate

    def run_stage(folder: Path) -> None:
        with tempfile.TemporaryDirectory() as out:
            evaluate(params=folder / "params.yaml", model=folder / "model.pt",
                     embeddings=folder / "embeddings.parquet",
                     labels=folder / "labels.parquet", retrieval=folder / "neighbours.parquet",
                     out_dir=Path(out), device=device, chunk_rows=chunk_rows,
                     threads=stage_threads, progress=False)

    folder = tables.materialise(data_dir, rows=rows, scale=scale)
    params = yaml.safe_load((folder / "params.yaml").read_text())
    # Warm-up on a small table: one-time costs (lazy imports such as torch.optim's, ~150
    # MiB; thread pools; allocator arenas) are not the stage's per-dataset memory.
    warm_probe = MemoryProbe(device)
    run_stage(tables.materialise(data_dir, rows=min(rows, 2048), scale=scale))
    warm_up_bytes = warm_probe.report()["peak_memory_bytes"]
    probe = MemoryProbe(device)
    with Timer(device) as timer:
        run_stage(folder)
    mem = probe.report()
    spec = ModelSpec(num_classes=scale["classes"], feature_dim_in=scale["dim"],
                     hidden=scale["hidden"], timesteps=params["train"]["timesteps"])
    n_train = rows - tables.val_rows(rows)
    probe_rows = min(n_train, params["evaluate"]["linear_max_rows"])
    chunk = min(chunk_rows, rows)
    # The probes' subset twice: the rows read, and fit_linear's standardised copy.
    array_bytes = (2 * probe_rows * scale["dim"] * 4
                   + chunk * (scale["dim"] + scale["classes"]) * 4 + rows * PER_ROW_BYTES)
    return {"n": scale["n"], "dim": scale["dim"], "rows": rows, "chunk_rows": chunk_rows,
            "device": device, "ddim_steps": 10,
            "flops_per_row": spec.sampling_flops_per_sample(10),
            "seconds": timer.seconds, "probe_rows": probe_rows, **mem,
            "warm_up_peak_memory_bytes": warm_up_bytes,
            "array_bytes": array_bytes}


def records(raw: list[dict[str, Any]], *, scale: str, matmul_flops: float) -> list[dict]:
    out = []
    by_rows = sorted(raw, key=lambda r: r["rows"])
    for res in sorted(raw, key=lambda r: -r["rows"]):
        n, rows = res["n"], res["rows"]
        flops_row = res["flops_per_row"]
        extra: dict[str, Any] = {}
        if res is by_rows[-1] and len(by_rows) > 1:
            a = by_rows[0]
            beyond = (res["peak_memory_bytes"] - res["array_bytes"]) - (
                a["peak_memory_bytes"] - a["array_bytes"])
            extra["memory_growth_bytes_per_row"] = beyond / (rows - a["rows"])
        out.append(record(
            "evaluate", scale, variant=f"lra evaluate rows={rows} chunk={res['chunk_rows']} "
                                       f"({res['device']})",
            seconds=res["seconds"], peak_memory_bytes=res["peak_memory_bytes"],
            throughput=rows / res["seconds"], throughput_unit="rows/s",
            limit=matmul_flops / flops_row,
            limit_kind="fp32 matmul FLOP/s / FLOPs of a 10-step DDIM trajectory per row",
            array_bytes=res["array_bytes"], rows=rows, n=n,
            seconds_at_scale=res["seconds"] * n / rows,
            extrapolated_from_rows=rows if rows < n else None,
            achieved_flop_per_s=flops_row * rows / res["seconds"],
            matmul_flop_per_s=matmul_flops, chunk_rows=res["chunk_rows"],
            probe_rows=res["probe_rows"],
            warm_up_peak_memory_bytes=res.get("warm_up_peak_memory_bytes"),
            peak_device_memory_bytes=res.get("peak_device_memory_bytes"),
            process_peak_rss_bytes=res["process_peak_rss_bytes"], **extra))
    return out
