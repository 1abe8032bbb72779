"""Training the diffusion classifier on retrieved labels (METHOD.md sections 2-5).

The whole train split lives on the device as tensors: features (N, D), candidate labels
(N, k + 1). Each step gathers a batch by index, draws one target per sample from its
k + 1 candidates, weights the loss by neighbour agreement, and takes an Adam step. No
per-sample Python loop, no host-device copy inside the loop (the epoch loss is summed on
the device and read once per epoch).

Model selection uses the validation split only: after every `eval_every` epochs the raw
and the EMA weights are scored with the mean-start DDIM trajectory under each readout
rule, and the best (epoch, weights, readout) by validation accuracy is kept.

Several processes (torchrun; `ddp`): every rank holds the whole train split and the same
seeded generator, so every rank draws the same global permutation, targets, weights,
timesteps and noise as a single process would, and then computes only its contiguous
share of each global batch (global batch = train.batch_size, as with one process).
DistributedDataParallel averages the gradients; each rank's loss is scaled by the world
size, so the average is the gradient of the single-process loss. The agreement weights
w_i = n_i / sum_j n_j are those of the global batch (drawn whole on every rank), and
BatchNorm uses the global batch's statistics (`GlobalBatchNorm1d`). The result equals
the single-process one up to floating-point summation order. Validation, EMA and model
selection run on rank 0 only; the other ranks return an empty state_dict.
"""

from __future__ import annotations

import copy
import inspect
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from pipeline import distributed
from pipeline.config import TrainConfig
from pipeline.errors import ArtifactError, ConfigError
from pipeline.diffusion import (alphas_cumprod, antithetic_timesteps, cosine_betas,
                                ddim_timesteps, q_sample, readout)
from pipeline.inference import predict_scores
from pipeline.model import DiffusionClassifier, ModelSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainData:
    """Device tensors for one run.

    features: (N, D) float32 normalised train embeddings; candidates: (N, k + 1) int64
    (own observed label first); val_features: (V, D) float32; val_labels: (V,) int64.
    """

    features: torch.Tensor
    candidates: torch.Tensor
    val_features: torch.Tensor
    val_labels: torch.Tensor
    num_classes: int


@dataclass
class TrainResult:
    spec: ModelSpec
    state_dict: dict[str, torch.Tensor]  # best weights (raw or EMA), on the CPU
    best: dict  # epoch, weights ("raw" | "ema"), readout, val_accuracy
    history: list[dict] = field(default_factory=list)


def model_spec(cfg: TrainConfig, *, num_classes: int, dim: int) -> ModelSpec:
    """The network `train_diffusion` builds for D = dim inputs: the guidance is projected
    to cfg.guidance_dim coordinates only when the embedding is wider."""
    return ModelSpec(num_classes=num_classes, feature_dim_in=dim, hidden=cfg.feature_dim,
                     timesteps=cfg.timesteps, projection=cfg.projection,
                     guidance_dim=cfg.guidance_dim if 0 < cfg.guidance_dim < dim else None,
                     init=cfg.init)


def learning_rate(epoch: float, cfg: TrainConfig) -> float:
    """Linear warm-up to cfg.lr over `warmup_epochs`, then half-cosine to 0 at the last
    epoch actually run (the released CIFAR script decays over a hard-coded 1000 epochs
    while training 200; we do not copy that). `epoch` is fractional (step / steps_per_epoch)."""
    if epoch < cfg.warmup_epochs:
        return cfg.lr * epoch / cfg.warmup_epochs
    progress = (epoch - cfg.warmup_epochs) / (cfg.epochs - cfg.warmup_epochs)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def guidance_basis(features: torch.Tensor, width: int, *, chunk_rows: int = 8192
                   ) -> torch.Tensor:
    """PCA basis of the (normalised) train features, scaled so the projected coordinates
    have mean variance 1 over the kept components: (D, G) float32.

    features: (N, D) float32. The covariance is accumulated in float64 over row chunks.
    Components with (numerically) zero variance get zero columns, so duplicated or
    constant coordinates (a 3072-d embedding of 8x8 images has rank 64) add nothing.
    """
    n, d = features.shape
    mean = features.double().sum(0) / n  # (D,)
    cov = torch.zeros(d, d, dtype=torch.float64, device=features.device)
    for start in range(0, n, chunk_rows):
        part = features[start:start + chunk_rows].double() - mean
        cov += part.T @ part
    cov /= n
    evals, evecs = torch.linalg.eigh(cov)  # ascending
    evals, evecs = evals.flip(0)[:width], evecs.flip(1)[:, :width]  # (G,), (D, G)
    # Fix each component's sign (eigh's is arbitrary): largest-magnitude entry positive.
    pivot = evecs.abs().argmax(dim=0)
    evecs = evecs * torch.sign(evecs[pivot, torch.arange(evecs.shape[1])])
    kept = evals > evals[0].clamp_min(1e-30) * 1e-6
    scale = evals[kept].mean().sqrt()
    return (evecs * kept / scale).float()


def draw_targets(candidates: torch.Tensor, *, generator: torch.Generator, uniform: bool,
                 class_weights: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """One label per row drawn uniformly from its candidates, and the loss weights.

    candidates: (B, m) int64; class_weights: (C,) float32 or None. Returns (labels (B,)
    int64, weights (B,) float32 summing to 1): w_i = n_i / sum_j n_j, n_i = how many
    candidates equal the drawn label (1 each when `uniform`), times class_weights[label]
    before normalising when given.
    """
    b, m = candidates.shape
    pick = torch.randint(0, m, (b, 1), generator=generator, device=candidates.device)
    labels = candidates.gather(1, pick).squeeze(1)  # (B,)
    if uniform and class_weights is None:
        return labels, torch.full((b,), 1.0 / b, device=candidates.device)
    agree = (torch.ones(b, device=candidates.device) if uniform
             else (candidates == labels[:, None]).sum(dim=1).float())  # (B,) in [1, m]
    if class_weights is not None:
        agree = agree * class_weights[labels]
    return labels, agree / agree.sum()


CLASS_BALANCE_AUTO_RATIO = 2.0
"""train.class_balance "auto" weighs the loss by inverse class share ("inverse") from
this candidate-label imbalance up (largest class's count / smallest's), else keeps the
paper's loss ("none"). Chosen on validation (bench/README.md, seed 0): 1.14-1.70 on the
three balanced digits spaces at symmetric, pairflip, PMD 35 % and hybrid noise (where
inverse moves validation accuracy by -1.9 to +1.4 points), 2.36-3.23 at PMD 70 % (+7.0
to +13.4), 2.2-15.1 on the long-tailed digits space (+3.4 at 40 % symmetric)."""


def resolve_class_balance(requested: str, imbalance: float) -> str:
    """The loss weighting a training applies: `requested` unless it is "auto", which
    becomes "inverse" when `imbalance` (class_imbalance of the candidates) reaches
    CLASS_BALANCE_AUTO_RATIO and "none" below it."""
    if requested != "auto":
        return requested
    return "inverse" if imbalance >= CLASS_BALANCE_AUTO_RATIO else "none"


def candidate_class_counts(candidates: torch.Tensor, num_classes: int) -> torch.Tensor:
    """How often each class occurs among the candidate labels: (C,) int64.
    candidates: (N, k + 1) int64."""
    return torch.bincount(candidates.reshape(-1), minlength=num_classes)


def class_imbalance(candidates: torch.Tensor, num_classes: int) -> float:
    """Largest / smallest count of a class among the candidate labels, over the classes
    that occur. candidates: (N, k + 1) int64."""
    counts = candidate_class_counts(candidates, num_classes)
    present = counts[counts > 0]
    return float(present.max() / present.min()) if len(present) else 1.0


def class_balance_weights(candidates: torch.Tensor, num_classes: int) -> torch.Tensor:
    """train.class_balance "inverse": (C,) float32 weights 1 / (C x share of class c among
    all the train rows' candidate labels), so every class carries the same total loss
    weight in expectation (an unseen class gets C x count 1). Why: with imbalanced
    classes, or noise that piles labels onto a few classes (PMD), the retrieved label
    distribution carries that prior, and the model then seldom predicts the small classes
    (bench/README.md, `digits64lt`). candidates: (N, k + 1) int64."""
    counts = candidate_class_counts(candidates, num_classes).double()
    return (counts.sum() / (num_classes * counts.clamp_min(1))).float()


def clip_gradients_(params: list[nn.Parameter], max_norm: float) -> None:
    """`nn.utils.clip_grad_norm_(params, max_norm, foreach=True)`, bit for bit, without
    its pass over every gradient when nothing is clipped: torch multiplies by the
    coefficient clamped to 1.0 even then, to avoid a host-device sync. On the CPU there is
    no sync to avoid, and skipping x * 1.0 changes no bit (clipping is rare after the
    first epochs). Elsewhere, or on torch < 2.6 (no `get_total_norm`), torch's call."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or grads[0].device.type != "cpu" or \
            not hasattr(nn.utils, "get_total_norm"):
        nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        return
    total = nn.utils.get_total_norm(grads, foreach=True)
    if (max_norm / (total + 1e-6)).item() < 1.0:  # the same float32 coefficient as torch's
        nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=True)


def validation_accuracy(model: nn.Module, data: TrainData, *, abar: torch.Tensor,
                        timesteps: np.ndarray, rules: tuple[str, ...]) -> dict[str, float]:
    """Accuracy of the mean-start trajectory on the validation split, per readout rule."""
    scores = predict_scores(model, data.val_features, abar=abar, timesteps=timesteps,
                            num_classes=data.num_classes)
    return {rule: (readout(scores, rule) == data.val_labels).float().mean().item()
            for rule in rules}


def _no_buffer_sync() -> dict[str, bool]:
    """DDP option that skips re-broadcasting rank 0's buffers before every forward: the
    global BatchNorm already keeps them equal on every rank. (Recent torch renamed
    `broadcast_buffers` to `forward_sync_buffers` and warns on the old name.)"""
    params = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    key = "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
    return {key: False}


def train_diffusion(data: TrainData, cfg: TrainConfig, *, progress: bool = True,
                    ddp: bool | None = None,
                    on_epoch_end: Callable[[dict], None] | None = None) -> TrainResult:
    """Train with cfg and return the best validation checkpoint and per-epoch history.

    on_epoch_end: called with each epoch's history row once the epoch (and its
    validation, if any) is done, e.g. to time epochs apart from the one-off setup.

    ddp: train with DistributedDataParallel over the joined process group (see the module
    docstring); None = when a process group of more than one rank is joined. Every rank
    must call this with the same data and cfg. Off the main rank the result holds the
    (global) loss history but no weights and no validation scores. cfg.class_balance
    "auto" is resolved on data.candidates (resolve_class_balance).
    """
    device = data.features.device
    n, dim = data.features.shape
    if n < 2:
        raise ArtifactError(f"need at least 2 training samples, got {n}")
    ctx = distributed.current()
    if ddp is None:
        ddp = ctx.enabled
    if ddp and not ctx.enabled:
        raise ValueError("ddp=True needs a joined process group of more than one rank "
                         "(launch with torchrun)")
    main = ctx.is_main or not ddp
    torch.manual_seed(cfg.seed)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    spec = model_spec(cfg, num_classes=data.num_classes, dim=dim)
    model = DiffusionClassifier(spec).to(device)
    if spec.guidance_dim is not None:
        with torch.no_grad():
            model.guidance.copy_(guidance_basis(data.features, spec.guidance_dim))
    ema = copy.deepcopy(model)
    ema_floats = [v for v in ema.state_dict().values() if v.is_floating_point()]
    raw_floats = [v for v in model.state_dict().values() if v.is_floating_point()]
    net: nn.Module = model
    if ddp:
        # Shares the parameters and buffers, so ema/raw_floats above stay valid.
        model = distributed.convert_batchnorm(model)
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index if device.index is not None
                               else torch.cuda.current_device()]
            if device.type == "cuda" else None, **_no_buffer_sync())
    # fused: one kernel for all parameters; the per-timestep gamma tables (T + 1 rows
    # each) outweigh the rest of the network, and a per-tensor Adam loop was 25 % slower.
    params = list(model.parameters())
    optimizer = torch.optim.Adam(params, lr=cfg.lr, betas=(0.9, 0.999),
                                 weight_decay=0.0, fused=True)
    abar = alphas_cumprod(cosine_betas(cfg.timesteps)).float().to(device)  # (T,)
    steps = ddim_timesteps(cfg.timesteps, cfg.ddim_steps)
    rules = ("nearest_one", "argmax") if cfg.readout == "auto" else (cfg.readout,)
    balance = (resolve_class_balance("auto", class_imbalance(data.candidates, data.num_classes))
               if cfg.class_balance == "auto" else cfg.class_balance)
    class_weights = (class_balance_weights(data.candidates, data.num_classes)
                     if balance == "inverse" else None)  # (C,) or None
    n_batches = max(1, math.ceil(n / cfg.batch_size))
    if n // n_batches < 2:
        raise ConfigError(f"train.batch_size: {cfg.batch_size} splits the {n} train rows "
                          "into batches of fewer than 2 samples (BatchNorm needs 2); raise it")
    if ddp and n // n_batches < ctx.world_size:
        raise ConfigError(f"train.batch_size: batches of {n // n_batches} samples cannot be "
                          f"split over {ctx.world_size} processes; raise it or use fewer")

    best = {"epoch": -1, "weights": "raw", "readout": rules[0], "val_accuracy": -1.0}
    best_state: dict[str, torch.Tensor] = {}
    history: list[dict] = []
    bar = tqdm(range(cfg.epochs), desc="train", unit="epoch", disable=not (progress and main))
    for epoch in bar:
        model.train()
        loss_sum = torch.zeros((), device=device)
        # tensor_split gives near-equal batches, so BatchNorm never sees a tiny tail batch.
        for i, idx in enumerate(torch.tensor_split(torch.randperm(n, generator=gen,
                                                                  device=device), n_batches)):
            lr = learning_rate(epoch + i / n_batches, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            labels, weights = draw_targets(data.candidates[idx], generator=gen,
                                           uniform=cfg.weighting == "uniform",
                                           class_weights=class_weights)
            y0 = F.one_hot(labels, data.num_classes).float()  # (B, C)
            t = antithetic_timesteps(len(idx), cfg.timesteps, generator=gen, device=device)
            eps = torch.randn(y0.shape, generator=gen, device=device)
            if ddp:  # this rank's rows of the global batch (drawn whole above)
                lo, hi = distributed.shard_range(len(idx), ctx.rank, ctx.world_size)
                idx, y0, t, eps, weights = (idx[lo:hi], y0[lo:hi], t[lo:hi], eps[lo:hi],
                                            weights[lo:hi])
            pred = net(q_sample(y0, t, eps, abar), t, data.features[idx])  # (B, C)
            loss = (weights * (pred - eps).pow(2).mean(dim=1)).sum()
            optimizer.zero_grad(set_to_none=True)
            # DDP averages gradients over ranks; the total loss is the sum of the ranks'.
            (loss * ctx.world_size if ddp else loss).backward()
            clip_gradients_(params, cfg.grad_clip)
            optimizer.step()
            if main:
                torch._foreach_lerp_(ema_floats, raw_floats, 1.0 - cfg.ema_decay)
            loss_sum += loss.detach()

        if ddp:
            distributed.all_reduce_sum_(loss_sum, ctx)  # the global batches' loss

        row = {"epoch": epoch + 1, "loss": loss_sum.item() / n_batches,
               "lr": learning_rate(epoch + 1, cfg), "val_accuracy": None,
               "val_accuracy_ema": None}
        if main and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
            for name, scored in (("raw", model), ("ema", ema)):
                accs = validation_accuracy(scored, data, abar=abar, timesteps=steps, rules=rules)
                rule = max(rules, key=lambda r: accs[r])  # ties keep the first rule
                row["val_accuracy" if name == "raw" else "val_accuracy_ema"] = accs[rule]
                if accs[rule] > best["val_accuracy"]:
                    best = {"epoch": epoch + 1, "weights": name, "readout": rule,
                            "val_accuracy": accs[rule]}
                    best_state = {k: v.detach().to("cpu", copy=True)
                                  for k, v in scored.state_dict().items()}
            bar.set_postfix(loss=f"{row['loss']:.4f}", val=f"{row['val_accuracy']:.3f}",
                            best=f"{best['val_accuracy']:.3f}")
        history.append(row)
        if on_epoch_end is not None:
            on_epoch_end(row)
    if main:
        log.info("best validation accuracy %.4f at epoch %d (%s weights, %s readout)",
                 best["val_accuracy"], best["epoch"], best["weights"], best["readout"])
    return TrainResult(spec=spec, state_dict=best_state, best=best, history=history)
