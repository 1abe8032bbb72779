"""evaluate: the deterministic 10-step DDIM trajectory (`pipeline.inference.predict_scores`)
over the scale's N rows, in chunks, with a randomly initialised network of the scale's
width (speed does not depend on the weights).

Limit: rows/s = matmul FLOP/s / (DDIM steps x forward FLOPs per row). No target is set by
the issue; the memory rule is that evaluation streams: peak memory beyond the arrays it
must hold (features (N, D) and scores (N, C)) must not grow with N. Two measurements
check that: all N rows, and one chunk of rows, on the same loaded data;
`memory_growth_bytes_per_row` is the difference of their overheads per extra row.
When N rows would take longer than the time budget, the first rows (a multiple of the
chunk) are run and the time is extrapolated (`extrapolated_from_rows`).

Memory mirrors `stages/evaluate.py`: the raw embeddings stay loaded next to the
normalised copy made by `FeatureNormalizer.apply`.
"""

from __future__ import annotations

from typing import Any

from bench.records import record


def child(*, data_dir: str, scale: dict, rows: int, chunk_rows: int, device: str,
          ddim_steps: int = 10, timesteps: int = 1000) -> dict[str, Any]:
    import torch

    from bench import synthetic
    from bench.measure import MemoryProbe, Timer
    from pipeline.diffusion import alphas_cumprod, cosine_betas, ddim_timesteps, readout
    from pipeline.features import FeatureNormalizer
    from pipeline.inference import predict_scores
    from pipeline.model import DiffusionClassifier, ModelSpec

    stage_probe = MemoryProbe(device)
    raw = synthetic.load(data_dir, ("embeddings",))["embeddings"]
    n, d = raw.shape
    norm = FeatureNormalizer.fit(raw[: min(n, 65_536)], "standardize")  # from the checkpoint
    feats = torch.from_numpy(norm.apply(raw)).to(device)
    c = scale["classes"]
    torch.manual_seed(0)
    spec = ModelSpec(num_classes=c, feature_dim_in=d, hidden=scale["hidden"], timesteps=timesteps)
    model = DiffusionClassifier(spec).to(device).eval()
    abar = alphas_cumprod(cosine_betas(timesteps)).float().to(device)
    steps = ddim_timesteps(timesteps, ddim_steps)
    predict_scores(model, feats[:256], abar=abar, timesteps=steps, num_classes=c)  # warm-up
    prep_peak = stage_probe.process_peak()

    probe = MemoryProbe(device)
    with Timer(device) as timer:
        scores = predict_scores(model, feats[:rows], abar=abar, timesteps=steps, num_classes=c,
                                chunk_rows=chunk_rows)
        readout(scores, "argmax")
    mem = probe.report()
    return {"n": n, "dim": d, "rows": rows, "chunk_rows": chunk_rows, "device": device,
            "ddim_steps": ddim_steps, "flops_per_row_step": model.flops_per_sample(),
            "seconds": timer.seconds, "kernel": mem,
            "stage_peak_memory_bytes": max(prep_peak, probe.process_peak()) - stage_probe.baseline,
            "features_bytes": n * d * 4, "scores_bytes": rows * c * 4}


def records(raw: list[dict[str, Any]], *, scale: str, matmul_flops: float) -> list[dict]:
    out = []
    by_rows = sorted(raw, key=lambda r: r["rows"])
    for res in sorted(raw, key=lambda r: -r["rows"]):
        n, rows = res["n"], res["rows"]
        seconds = res["seconds"] * n / rows
        flops_row = res["ddim_steps"] * res["flops_per_row_step"]
        array_bytes = res["features_bytes"] + n * (res["scores_bytes"] // rows)
        overhead = res["kernel"]["peak_memory_bytes"] - res["scores_bytes"]
        extra: dict[str, Any] = {}
        if res is by_rows[-1] and len(by_rows) > 1:
            a = by_rows[0]
            over_a = a["kernel"]["peak_memory_bytes"] - a["scores_bytes"]
            extra["memory_growth_bytes_per_row"] = (overhead - over_a) / (rows - a["rows"])
        out.append(record(
            "evaluate", scale, variant=f"predict_scores rows={rows} chunk={res['chunk_rows']} "
                                       f"({res['device']})",
            seconds=seconds, peak_memory_bytes=res["stage_peak_memory_bytes"],
            throughput=n / seconds, throughput_unit="rows/s",
            limit=matmul_flops / flops_row,
            limit_kind="fp32 matmul FLOP/s / (DDIM steps x forward FLOPs per row)",
            array_bytes=array_bytes, rows=rows, n=n, measured_seconds=res["seconds"],
            extrapolated_from_rows=rows if rows < n else None,
            achieved_flop_per_s=flops_row * n / seconds, matmul_flop_per_s=matmul_flops,
            kernel_peak_memory_bytes=res["kernel"]["peak_memory_bytes"],
            kernel_overhead_bytes=overhead, chunk_rows=res["chunk_rows"],
            peak_device_memory_bytes=res["kernel"].get("peak_device_memory_bytes"),
            process_peak_rss_bytes=res["kernel"]["process_peak_rss_bytes"], **extra))
    return out
