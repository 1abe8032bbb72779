"""Diffusion over label vectors: the cosine noise schedule, the forward process, antithetic
timestep draws, and deterministic DDIM sampling (METHOD.md sections 3 and 6).

Timesteps are integer indices t in [0, T); `alphas_cumprod[t]` is abar_t.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn


def cosine_betas(timesteps: int, *, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal's cosine schedule. Returns betas: (T,) float64.

    abar(t) = f(t) / f(0), f(t) = cos(((t / T) + s) / (1 + s) * pi / 2)^2,
    beta_t = min(1 - abar(t + 1) / abar(t), max_beta).
    """
    steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    abar = f / f[0]
    return torch.clamp(1 - abar[1:] / abar[:-1], max=max_beta)


def alphas_cumprod(betas: torch.Tensor) -> torch.Tensor:
    """abar_t = prod_{s<=t} (1 - beta_s). (T,) float64."""
    return torch.cumprod(1 - betas, dim=0)


def ddim_timesteps(timesteps: int, steps: int) -> np.ndarray:
    """The DDIM sub-sequence used at inference, ascending: {1, 1 + T/steps, ...}.

    T=1000, steps=10 gives {1, 101, ..., 901}, the released scripts' (and the paper's)
    sequence. Returns (steps,) int64.
    """
    stride = timesteps // steps
    return (np.arange(steps, dtype=np.int64) * stride + 1).clip(max=timesteps - 1)


def antithetic_timesteps(n: int, timesteps: int, *, generator: torch.Generator,
                         device: torch.device | str = "cpu") -> torch.Tensor:
    """Draw t for half the batch and pair it with T-1-t (lower-variance loss estimate).

    Returns (n,) int64 on `device`.
    """
    half = torch.randint(0, timesteps, ((n + 1) // 2,), generator=generator, device=device)
    return torch.cat([half, timesteps - 1 - half])[:n]


def q_sample(y0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, abar: torch.Tensor
             ) -> torch.Tensor:
    """Forward process y_t = sqrt(abar_t) y0 + sqrt(1 - abar_t) eps (prior mean 0).

    y0, eps: (B, C) float32; t: (B,) int64; abar: (T,) float32 on the same device.
    """
    a = abar[t].unsqueeze(1)  # (B, 1)
    return a.sqrt() * y0 + (1 - a).sqrt() * eps


@torch.inference_mode()
def folded_steps(model: nn.Module, timesteps: np.ndarray) -> dict[int, Any] | None:
    """{t: model.folded_step(t)} for each DDIM step: built once and passed to every
    `ddim_sample` call over a dataset's batches (H x H work per step, not per batch).
    None for a model in training mode or without folded steps."""
    if model.training or not hasattr(model, "folded_step"):
        return None
    return {int(t): model.folded_step(int(t)) for t in timesteps}


@torch.inference_mode()
def ddim_sample(model: nn.Module, features: torch.Tensor, *, abar: torch.Tensor,
                timesteps: np.ndarray, num_classes: int, y_start: torch.Tensor | None = None,
                repeats: int = 1, folds: dict[int, Any] | None = None) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) from y_T to y_0, conditioned on `features`.

    features: (N, D) float32; abar: (T,) float32; timesteps: ascending DDIM steps.
    repeats: trajectories per image, run as rows i * repeats .. (i + 1) * repeats - 1.
    y_start: (N * repeats, C) starting points; None means the prior mean 0 (the paper's
    "mean-start" trajectory). folds: `folded_steps(model, timesteps)`, built here when
    None. Returns y_0: (N * repeats, C) float32 label-space scores.
    """
    n = features.shape[0] * repeats
    y = (torch.zeros(n, num_classes, device=features.device, dtype=features.dtype)
         if y_start is None else y_start)
    steps = [int(t) for t in timesteps[::-1]]
    # The features-only part of the network is the same at every step and for every
    # trajectory of an image: compute it once per image. In eval mode each step's layers
    # run with gamma_t and BatchNorm folded into the weights (`folded_step`). Models
    # without that split (test doubles) run whole at each step.
    if hasattr(model, "condition"):
        cond = model.condition(features)
        if repeats > 1:
            cond = tuple(c.repeat_interleave(repeats, dim=0) for c in cond)
        if not model.training:
            folds = folds if folds is not None else folded_steps(model, timesteps)
            predict = lambda y_t, t: model.forward_folded(y_t, cond, folds[t])  # noqa: E731
        else:
            predict = lambda y_t, t: model.forward_conditioned(  # noqa: E731
                y_t, torch.full((n,), t, dtype=torch.long, device=y_t.device), cond)
    else:
        whole = features.repeat_interleave(repeats, dim=0) if repeats > 1 else features
        predict = lambda y_t, t: model(  # noqa: E731
            y_t, torch.full((n,), t, dtype=torch.long, device=y_t.device), whole)
    for i, t in enumerate(steps):
        a_t = abar[t]
        a_prev = abar[steps[i + 1]] if i + 1 < len(steps) else abar.new_tensor(1.0)
        eps = predict(y, t)  # (N * repeats, C)
        y0_hat = (y - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        y = a_prev.sqrt() * y0_hat + (1 - a_prev).sqrt() * eps
    return y


def readout(scores: torch.Tensor, rule: str) -> torch.Tensor:
    """Class decisions from y_0 scores (N, C): "argmax", or "nearest_one" (the class
    whose coordinate is closest to 1, the released code's rule). Returns (N,) int64."""
    if rule == "argmax":
        return scores.argmax(dim=1)
    if rule == "nearest_one":
        return (scores - 1).abs().argmin(dim=1)
    raise ValueError(f"unknown readout {rule!r}; valid: argmax, nearest_one")
