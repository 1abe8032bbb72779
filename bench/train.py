"""train: one epoch of `pipeline.training.train_diffusion` at the scale's N.

Timed as one run of EPOCHS epochs: the reported `seconds` is the faster of the epochs after
the first (what each epoch of a 200-epoch run costs); `first_epoch_seconds` carries the
one-off setup too (model build, EMA copy, the guidance PCA, timed on its own as
`guidance_pca_seconds`), and `epoch_seconds` lists every epoch.

Limit: this machine's fp32 matrix-multiply throughput. A training step costs about 3 x the
forward FLOPs (forward, and the two products of the backward pass), forward FLOPs from
`DiffusionClassifier.flops_per_sample`; achieved FLOP/s = 3 x forward x samples / seconds.
Elementwise work (BatchNorm, Softplus, the gamma-table gathers and their scatter-add
gradients, Adam over the gamma tables, gradient clipping, EMA) is not counted: it is the
overhead the fraction exposes.

Inputs are the pipeline's Parquet artifacts (`bench.tables`), loaded as `stages/train.py`
loads them: the train and val rows read by record batch, `FeatureNormalizer.apply_inplace`,
the retrieval table's candidates, then the epoch. The arrays the stage must hold are one
(N, D) float32 feature matrix, the (N, k + 1) int64 candidates, and the model with its
gradients, two Adam moments and the EMA copy.

Diagnostics (not part of the headline): the fp32 throughput of the network's own GEMM
shapes at this batch size (the small-matrix ceiling), and a split of a step's time into
forward, backward and optimizer (clip + Adam + EMA).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from typing import Any

from bench.records import record

TARGET = 0.6
EPOCHS = 3  # timed epochs: the first includes setup, the best of the others is reported


def _now(device: str) -> float:
    from bench.measure import sync
    sync(device)
    return time.perf_counter()


def child(*, data_dir: str, scale: dict, batch: int, device: str, val_rows: int = 16,
          diag_samples: int = 2560) -> dict[str, Any]:
    """Runs in a fresh process (bench.measure.run_isolated)."""
    import torch
    from torch.nn import functional as F

    from bench import tables
    from bench.limits import gemm_throughput
    from bench.measure import MemoryProbe, Timer
    from pipeline.allocator import retain_freed_memory
    from pipeline.config import TrainConfig
    from pipeline.diffusion import alphas_cumprod, antithetic_timesteps, cosine_betas, q_sample
    from pipeline.features import FeatureNormalizer
    from pipeline.model import DiffusionClassifier, ModelSpec
    from pipeline.neighbours import read_candidates
    from pipeline.tables import open_embeddings, read_labels
    from pipeline.training import (TrainData, clip_gradients_, draw_targets, guidance_basis,
                                   train_diffusion)

    retain_freed_memory()  # as stages/train.py does
    folder = tables.materialise(data_dir, rows=scale["n"], scale=scale)
    cfg = TrainConfig(epochs=1, warmup_epochs=0, batch_size=batch, feature_dim=scale["hidden"],
                      eval_every=1)
    # Warm-up on random data before measuring memory: one-time costs (lazy imports such as
    # torch.optim's, ~150 MiB; thread pools; kernel selection for these shapes) are not the
    # stage's per-dataset memory. Same batch and width as the timed epoch.
    gen = torch.Generator().manual_seed(0)
    tiny = 4 * batch
    train_diffusion(TrainData(
        features=torch.randn(tiny, scale["dim"], generator=gen).to(device),
        candidates=torch.randint(0, scale["classes"], (tiny, scale["k"] + 1),
                                 generator=gen).to(device),
        val_features=torch.randn(val_rows, scale["dim"], generator=gen).to(device),
        val_labels=torch.randint(0, scale["classes"], (val_rows,), generator=gen).to(device),
        num_classes=scale["classes"]), cfg, progress=False)
    stage_probe = MemoryProbe(device)
    # As stages/train.py loads: train and val rows read by record batch, normalised in place.
    emb = open_embeddings(folder / "embeddings.parquet")
    lab = read_labels(folder / "labels.parquet")
    _, candidates = read_candidates(folder / "neighbours.parquet")
    train_rows, val = emb.rows("train"), emb.rows("val")[:val_rows]
    train_x, val_x = emb.read_rows(train_rows), emb.read_rows(val)
    norm = FeatureNormalizer.fit(train_x, "standardize")
    data = TrainData(features=torch.from_numpy(norm.apply_inplace(train_x)).to(device),
                     candidates=torch.from_numpy(candidates[train_rows]).to(device),
                     val_features=torch.from_numpy(norm.apply_inplace(val_x)).to(device),
                     val_labels=torch.from_numpy(lab.clean[val]).to(device),
                     num_classes=scale["classes"])
    n, d = data.features.shape
    prep_peak = stage_probe.process_peak()

    # EPOCHS epochs: the first carries the one-off setup (model build, the guidance PCA,
    # the EMA copy), the later ones are what each epoch of a long run costs.
    epoch_probe = MemoryProbe(device)
    ends: list[float] = []
    timed_cfg = dataclasses.replace(cfg, epochs=EPOCHS)
    start = _now(device)
    result = train_diffusion(data, timed_cfg, progress=False,
                             on_epoch_end=lambda _row: ends.append(_now(device)))
    epoch_mem = epoch_probe.report()
    epoch_seconds = [b - a for a, b in zip([start, *ends], ends)]
    steady = min(epoch_seconds[1:])  # best steady epoch: robust to other load
    with Timer(device) as pca_timer:
        if result.spec.guidance_dim is not None:
            guidance_basis(data.features, result.spec.guidance_dim)
    stage_peak = max(prep_peak, epoch_probe.process_peak()) - stage_probe.baseline

    # The network the epoch trained (guidance projection, init): FLOPs and diagnostics
    # of another spec would misstate the fraction.
    spec = ModelSpec(**result.spec.to_dict())
    model = DiffusionClassifier(spec).to(device)
    if spec.guidance_dim is not None:  # any orthonormal basis: speed only
        with torch.no_grad():
            model.guidance.copy_(torch.linalg.qr(torch.randn(d, spec.guidance_dim))[0])
    params = sum(p.numel() for p in model.parameters())
    buffers = sum(b.numel() for b in model.buffers())
    # param + grad + Adam exp_avg + exp_avg_sq + EMA copy (params and buffers), float32
    model_bytes = 4 * (5 * params + 2 * buffers)
    array_bytes = n * d * 4 + data.candidates.numel() * 8 + model_bytes

    # ---- diagnostics: GEMM ceiling at the layer shapes, and a step split
    c, h, g = scale["classes"], scale["hidden"], spec.guidance_width
    counts = {(batch, d, h): 1, (batch, c + g, h): 1, (batch, h, h): 2, (batch, h, c): 1}
    if spec.guidance_dim is not None:
        counts[(batch, d, g)] = 1  # the fixed guidance basis
    shapes = list(counts)
    gemms = gemm_throughput(shapes, device=device)
    fwd_flops = model.flops_per_sample()
    gemm_seconds = sum(counts[(g["m"], g["k"], g["n"])] * 2.0 * g["m"] * g["k"] * g["n"]
                       / g["flop_per_s"] for g in gemms)  # one forward of a batch
    gemm_bound = batch / (3.0 * gemm_seconds)  # samples/s if every product ran at that rate

    gen = torch.Generator(device=device).manual_seed(0)
    params_list = list(model.parameters())
    optimizer = torch.optim.Adam(params_list, lr=1e-3, fused=True)
    ema = copy.deepcopy(model)
    ema_floats = [v for v in ema.state_dict().values() if v.is_floating_point()]
    raw_floats = [v for v in model.state_dict().values() if v.is_floating_point()]
    abar = alphas_cumprod(cosine_betas(cfg.timesteps)).float().to(device)
    idx = torch.randperm(n, generator=gen, device=device)[:batch]

    def inputs():
        labels, weights = draw_targets(data.candidates[idx], generator=gen, uniform=False)
        y0 = F.one_hot(labels, c).float()
        t = antithetic_timesteps(batch, cfg.timesteps, generator=gen, device=device)
        eps = torch.randn(y0.shape, generator=gen, device=device)
        return q_sample(y0, t, eps, abar), t, data.features[idx], eps, weights

    def forward():
        y_t, t, f, eps, w = inputs()
        return (w * (model(y_t, t, f) - eps).pow(2).mean(dim=1)).sum()

    def backward():
        loss = forward()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()

    def full():
        backward()
        clip_gradients_(params_list, 1.0)  # as train_diffusion clips
        optimizer.step()
        torch._foreach_lerp_(ema_floats, raw_floats, 0.005)

    diag_steps = max(2, diag_samples // batch)
    split = {}
    for name, fn in (("forward", forward), ("forward_backward", backward), ("full_step", full)):
        fn()
        best = float("inf")
        for _ in range(3):  # best of 3 rounds: robust to other load on the machine
            with Timer(device) as t:
                for _ in range(diag_steps):
                    fn()
            best = min(best, t.seconds / diag_steps)
        split[name] = best
    n_batches = max(1, math.ceil(n / batch))
    return {
        "n": n, "dim": d, "batch": batch, "hidden": h, "classes": c, "device": device,
        "seconds": steady, "epoch_seconds": epoch_seconds,
        "first_epoch_seconds": epoch_seconds[0], "guidance_pca_seconds": pca_timer.seconds,
        "steps": n_batches,
        "flops_per_sample_forward": fwd_flops, "parameters": params,
        "array_bytes": array_bytes, "model_state_bytes": model_bytes,
        "stage_peak_memory_bytes": stage_peak, "epoch": epoch_mem,
        "loss": result.history[-1]["loss"],
        "gemm_at_layer_shapes": gemms, "gemm_bound_samples_per_s": gemm_bound,
        "step_split_seconds": split,
    }


def limit_suspect(gemms: list[dict], matmul_flops: float) -> bool:
    """Small products more than 5 % faster than the large-matrix "limit": the limit was
    measured while the machine was busy; treat every fraction of the run as suspect."""
    return max(g["flop_per_s"] for g in gemms) > 1.05 * matmul_flops


def records(raw: dict, *, scale: str, matmul_flops: float) -> list[dict]:
    fwd = raw["flops_per_sample_forward"]
    samples_per_s = raw["n"] / raw["seconds"]
    split = raw["step_split_seconds"]
    return [record(
        "train", scale, variant=f"batch={raw['batch']}", seconds=raw["seconds"],
        peak_memory_bytes=raw["stage_peak_memory_bytes"], throughput=samples_per_s,
        throughput_unit="samples/s", limit=matmul_flops / (3 * fwd),
        limit_kind="fp32 matmul FLOP/s / (3 x forward FLOPs per sample)",
        array_bytes=raw["array_bytes"], target={"fraction_of_limit": TARGET},
        achieved_flop_per_s=3 * fwd * samples_per_s, matmul_flop_per_s=matmul_flops,
        epoch_peak_memory_bytes=raw["epoch"]["peak_memory_bytes"],
        peak_device_memory_bytes=raw["epoch"].get("peak_device_memory_bytes"),
        process_peak_rss_bytes=raw["epoch"]["process_peak_rss_bytes"],
        gemm_bound_samples_per_s=raw["gemm_bound_samples_per_s"],
        gemm_bound_fraction_of_limit=raw["gemm_bound_samples_per_s"] / (matmul_flops / (3 * fwd)),
        limit_suspect=limit_suspect(raw["gemm_at_layer_shapes"], matmul_flops),
        step_split_seconds=split,
        optimizer_share_of_step=(split["full_step"] - split["forward_backward"]) / split["full_step"],
        **{k: raw[k] for k in ("n", "dim", "batch", "hidden", "classes", "device", "steps",
                               "flops_per_sample_forward", "parameters", "model_state_bytes",
                               "gemm_at_layer_shapes", "threads", "loss", "epoch_seconds",
                               "first_epoch_seconds", "guidance_pca_seconds") if k in raw})]
