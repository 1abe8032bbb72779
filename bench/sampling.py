"""sample: the DDIM trajectories of a trained network at the scale's width, on their own
(no I/O, no probes): the report's stochastic confidence (`report.samples` = S
trajectories per image from y_T ~ N(0, I), `pipeline.inference.stochastic_vote`) and,
for comparison, evaluate's single mean-start trajectory (`predict_scores`).

Limit: rows/s = fp32 matmul FLOP/s / the FLOPs a row needs. Stochastic: the features-only
part of the network once per image, the per-step part S x ddim_steps times
(`ModelSpec.condition_flops_per_sample` + S x steps x `step_flops_per_sample`); mean-start:
`sampling_flops_per_sample(steps)`. Elementwise work (Softplus, the x_emb product, the
DDIM updates, the vote) is not counted: it is the overhead the fraction exposes.

The network is randomly initialised with non-trivial BatchNorm statistics and gammas
(speed does not depend on the weights); its spec is what `train` builds from the default
`train` params at this width. Features are standard normal, as after the normaliser.
"""

from __future__ import annotations

from typing import Any

from bench.records import record

TARGET = 0.5


def default_spec(classes: int, dim: int, hidden: int) -> Any:
    """The ModelSpec `train` builds from the default train params at this width."""
    from pipeline.config import TrainConfig
    from pipeline.training import model_spec

    return model_spec(TrainConfig(feature_dim=hidden), num_classes=classes, dim=dim)


def stochastic_flops(spec: Any, *, samples: int, steps: int) -> int:
    """FLOPs per row of `samples` trajectories of `steps` DDIM steps, conditioned once."""
    return spec.condition_flops_per_sample() + samples * steps * spec.step_flops_per_sample()


def plan(sc: Any, *, matmul_flops: float, budget_s: float) -> tuple[int, int]:
    """(rows, S): all N rows when they fit the budget at an assumed 40 % of the matmul
    limit, else whole 1,024-row batches that do; S = the default `report.samples`."""
    from pipeline.config import ReportConfig, TrainConfig

    samples, steps = ReportConfig().samples, TrainConfig().ddim_steps
    spec = default_spec(sc.classes, sc.dim, sc.hidden)
    per_row = stochastic_flops(spec, samples=samples, steps=steps) / (0.4 * matmul_flops)
    if sc.n * per_row <= budget_s:
        return sc.n, samples
    return max(1024, int(budget_s / per_row) // 1024 * 1024), samples


def child(*, scale: dict, rows: int, samples: int, device: str, chunk_rows: int = 4096
          ) -> dict[str, Any]:
    """Runs in a fresh process (bench.measure.run_isolated)."""
    import torch

    from bench.measure import MemoryProbe, Timer
    from pipeline.config import TrainConfig
    from pipeline.diffusion import alphas_cumprod, cosine_betas, ddim_timesteps
    from pipeline.inference import STEP_BATCH_ROWS, predict_scores, stochastic_vote
    from pipeline.model import DiffusionClassifier

    cfg = TrainConfig()
    dim = scale["dim"]
    spec = default_spec(scale["classes"], dim, scale["hidden"])
    gen = torch.Generator().manual_seed(0)
    model = DiffusionClassifier(spec)
    with torch.no_grad():  # trained-looking statistics, so folding is not a no-op
        for norm in (model.norm_x, model.norm1, model.norm2, model.norm3):
            norm.running_mean.normal_(generator=gen)
            norm.running_var.uniform_(0.5, 2.0, generator=gen)
        for layer in (model.lin1, model.lin2, model.lin3):
            layer.gamma.weight.uniform_(0.5, 1.5, generator=gen)
        if spec.guidance_dim is not None:
            model.guidance.copy_(torch.linalg.qr(torch.randn(dim, spec.guidance_dim,
                                                             generator=gen))[0])
    model = model.to(device).eval()
    abar = alphas_cumprod(cosine_betas(cfg.timesteps)).float().to(device)
    steps = ddim_timesteps(cfg.timesteps, cfg.ddim_steps)
    feats = torch.randn(rows, dim, generator=gen).to(device)
    common = {"abar": abar, "timesteps": steps, "num_classes": spec.num_classes,
              "chunk_rows": chunk_rows}

    def stochastic(x: torch.Tensor) -> None:
        stochastic_vote(model, x, samples=samples, rule="argmax", **common)

    def mean_start(x: torch.Tensor) -> None:
        predict_scores(model, x, **common)

    out: dict[str, Any] = {"rows": rows, "samples": samples, "ddim_steps": cfg.ddim_steps,
                           "device": device, "chunk_rows": chunk_rows,
                           "step_batch_rows": STEP_BATCH_ROWS, "spec": spec.to_dict()}
    for name, fn, flops in (
            ("stochastic", stochastic,
             stochastic_flops(spec, samples=samples, steps=cfg.ddim_steps)),
            ("mean_start", mean_start, spec.sampling_flops_per_sample(cfg.ddim_steps))):
        fn(feats[:min(rows, 256)])  # warm-up: thread pools, kernel selection
        probe = MemoryProbe(device)
        with Timer(device) as timer:
            fn(feats)
        out[name] = {"seconds": timer.seconds, "flops_per_row": flops, **probe.report()}
    return out


def records(raw: dict[str, Any], *, scale: str, n: int, matmul_flops: float) -> list[dict]:
    out = []
    rows, s = raw["rows"], raw["samples"]
    for name, label, what in (
            ("stochastic", f"report confidence: S={s} trajectories per row",
             f"FLOPs of S={s} {raw['ddim_steps']}-step trajectories per row (conditioned once)"),
            ("mean_start", "evaluate: 1 mean-start trajectory per row",
             f"FLOPs of one {raw['ddim_steps']}-step trajectory per row")):
        res = raw[name]
        flops_row = res["flops_per_row"]
        out.append(record(
            "sample", scale, variant=f"{label}, rows={rows} ({raw['device']})",
            seconds=res["seconds"], peak_memory_bytes=res["peak_memory_bytes"],
            throughput=rows / res["seconds"], throughput_unit="rows/s",
            limit=matmul_flops / flops_row, limit_kind=f"fp32 matmul FLOP/s / {what}",
            target={"fraction_of_limit": TARGET} if name == "stochastic" else None,
            rows=rows, n=n, samples=s if name == "stochastic" else 1,
            seconds_at_scale=res["seconds"] * n / rows,
            extrapolated_from_rows=rows if rows < n else None,
            achieved_flop_per_s=flops_row * rows / res["seconds"],
            matmul_flop_per_s=matmul_flops, chunk_rows=raw["chunk_rows"],
            step_batch_rows=raw["step_batch_rows"],
            process_peak_rss_bytes=res["process_peak_rss_bytes"]))
    return out
