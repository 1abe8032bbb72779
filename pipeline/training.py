"""Training the diffusion classifier on retrieved labels (METHOD.md sections 2-5).

The whole train split lives on the device as tensors: features (N, D), candidate labels
(N, k + 1). Each step gathers a batch by index, draws one target per sample from its
k + 1 candidates, weights the loss by neighbour agreement, and takes an Adam step. No
per-sample Python loop, no host-device copy inside the loop (the epoch loss is summed on
the device and read once per epoch).

Model selection uses the validation split only: after every `eval_every` epochs the raw
and the EMA weights are scored with the mean-start DDIM trajectory under each readout
rule, and the best (epoch, weights, readout) by validation accuracy is kept.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from pipeline.config import TrainConfig
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


def learning_rate(epoch: float, cfg: TrainConfig) -> float:
    """Linear warm-up to cfg.lr over `warmup_epochs`, then half-cosine to 0 at the last
    epoch actually run (the released CIFAR script decays over a hard-coded 1000 epochs
    while training 200; we do not copy that). `epoch` is fractional (step / steps_per_epoch)."""
    if epoch < cfg.warmup_epochs:
        return cfg.lr * epoch / cfg.warmup_epochs
    progress = (epoch - cfg.warmup_epochs) / (cfg.epochs - cfg.warmup_epochs)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def draw_targets(candidates: torch.Tensor, *, generator: torch.Generator, uniform: bool
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """One label per row drawn uniformly from its candidates, and the loss weights.

    candidates: (B, m) int64. Returns (labels (B,) int64, weights (B,) float32 summing
    to 1): w_i = n_i / sum_j n_j, n_i = how many candidates equal the drawn label
    (or 1 / B each when `uniform`).
    """
    b, m = candidates.shape
    pick = torch.randint(0, m, (b, 1), generator=generator, device=candidates.device)
    labels = candidates.gather(1, pick).squeeze(1)  # (B,)
    if uniform:
        return labels, torch.full((b,), 1.0 / b, device=candidates.device)
    agree = (candidates == labels[:, None]).sum(dim=1).float()  # (B,) in [1, m]
    return labels, agree / agree.sum()


def validation_accuracy(model: nn.Module, data: TrainData, *, abar: torch.Tensor,
                        timesteps: np.ndarray, rules: tuple[str, ...]) -> dict[str, float]:
    """Accuracy of the mean-start trajectory on the validation split, per readout rule."""
    scores = predict_scores(model, data.val_features, abar=abar, timesteps=timesteps,
                            num_classes=data.num_classes)
    return {rule: (readout(scores, rule) == data.val_labels).float().mean().item()
            for rule in rules}


def train_diffusion(data: TrainData, cfg: TrainConfig, *, progress: bool = True
                    ) -> TrainResult:
    """Train with cfg and return the best validation checkpoint and per-epoch history."""
    device = data.features.device
    n, dim = data.features.shape
    if n < 2:
        raise ValueError(f"need at least 2 training samples, got {n}")
    torch.manual_seed(cfg.seed)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    spec = ModelSpec(num_classes=data.num_classes, feature_dim_in=dim, hidden=cfg.feature_dim,
                     timesteps=cfg.timesteps, projection=cfg.projection)
    model = DiffusionClassifier(spec).to(device)
    ema = copy.deepcopy(model)
    ema_floats = [v for v in ema.state_dict().values() if v.is_floating_point()]
    raw_floats = [v for v in model.state_dict().values() if v.is_floating_point()]
    # fused: one kernel for all parameters; the per-timestep gamma tables (T + 1 rows
    # each) outweigh the rest of the network, and a per-tensor Adam loop was 25 % slower.
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.999),
                                 weight_decay=0.0, fused=True)
    abar = alphas_cumprod(cosine_betas(cfg.timesteps)).float().to(device)  # (T,)
    steps = ddim_timesteps(cfg.timesteps, cfg.ddim_steps)
    rules = ("nearest_one", "argmax") if cfg.readout == "auto" else (cfg.readout,)
    n_batches = max(1, math.ceil(n / cfg.batch_size))
    if n // n_batches < 2:
        raise ValueError("batches of fewer than 2 samples: lower train.batch_size")

    best = {"epoch": -1, "weights": "raw", "readout": rules[0], "val_accuracy": -1.0}
    best_state: dict[str, torch.Tensor] = {}
    history: list[dict] = []
    bar = tqdm(range(cfg.epochs), desc="train", unit="epoch", disable=not progress)
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
                                           uniform=cfg.weighting == "uniform")
            y0 = F.one_hot(labels, data.num_classes).float()  # (B, C)
            t = antithetic_timesteps(len(idx), cfg.timesteps, generator=gen, device=device)
            eps = torch.randn(y0.shape, generator=gen, device=device)
            pred = model(q_sample(y0, t, eps, abar), t, data.features[idx])  # (B, C)
            loss = (weights * (pred - eps).pow(2).mean(dim=1)).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip, foreach=True)
            optimizer.step()
            torch._foreach_lerp_(ema_floats, raw_floats, 1.0 - cfg.ema_decay)
            loss_sum += loss.detach()

        row = {"epoch": epoch + 1, "loss": loss_sum.item() / n_batches,
               "lr": learning_rate(epoch + 1, cfg), "val_accuracy": None,
               "val_accuracy_ema": None}
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            for name, net in (("raw", model), ("ema", ema)):
                accs = validation_accuracy(net, data, abar=abar, timesteps=steps, rules=rules)
                rule = max(rules, key=lambda r: accs[r])  # ties keep the first rule
                row["val_accuracy" if name == "raw" else "val_accuracy_ema"] = accs[rule]
                if accs[rule] > best["val_accuracy"]:
                    best = {"epoch": epoch + 1, "weights": name, "readout": rule,
                            "val_accuracy": accs[rule]}
                    best_state = {k: v.detach().to("cpu", copy=True)
                                  for k, v in net.state_dict().items()}
            bar.set_postfix(loss=f"{row['loss']:.4f}", val=f"{row['val_accuracy']:.3f}",
                            best=f"{best['val_accuracy']:.3f}")
        history.append(row)
    log.info("best validation accuracy %.4f at epoch %d (%s weights, %s readout)",
             best["val_accuracy"], best["epoch"], best["weights"], best["readout"])
    return TrainResult(spec=spec, state_dict=best_state, best=best, history=history)
