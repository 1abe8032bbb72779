"""Batched inference with a trained diffusion classifier: the deterministic mean-start
DDIM trajectory (what the paper reports) and stochastic sampling for a vote confidence."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from pipeline.diffusion import ddim_sample, readout


def predict_scores(model: nn.Module, features: torch.Tensor, *, abar: torch.Tensor,
                   timesteps: np.ndarray, num_classes: int, chunk_rows: int = 16_384
                   ) -> torch.Tensor:
    """Mean-start DDIM y_0 scores for every row. features: (N, D) float32 on the model's
    device. Chunked so memory does not grow with N. Returns (N, C) float32."""
    was_training = model.training
    model.eval()
    try:
        parts = [ddim_sample(model, features[i:i + chunk_rows], abar=abar, timesteps=timesteps,
                             num_classes=num_classes)
                 for i in range(0, features.shape[0], chunk_rows)]
    finally:
        model.train(was_training)
    return torch.cat(parts) if parts else features.new_zeros((0, num_classes))


def stochastic_vote(model: nn.Module, features: torch.Tensor, *, abar: torch.Tensor,
                    timesteps: np.ndarray, num_classes: int, samples: int, rule: str,
                    seed: int = 0, chunk_rows: int = 16_384
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """`samples` DDIM trajectories per image from y_T ~ N(0, I); majority vote.

    Returns (vote (N,) int64, confidence (N,) float32 = fraction of samples agreeing).
    All samples of a chunk run as one (rows * samples, D) batch.
    """
    gen = torch.Generator(device=features.device).manual_seed(seed)
    votes, confidence = [], []
    was_training = model.training
    model.eval()
    per_chunk = max(1, chunk_rows // samples)
    for i in range(0, features.shape[0], per_chunk):
        f = features[i:i + per_chunk]
        rep = f.repeat_interleave(samples, dim=0)  # (n * S, D)
        y_start = torch.randn(rep.shape[0], num_classes, generator=gen, device=f.device)
        y0 = ddim_sample(model, rep, abar=abar, timesteps=timesteps, num_classes=num_classes,
                         y_start=y_start)
        decided = readout(y0, rule).view(f.shape[0], samples)  # (n, S)
        counts = torch.nn.functional.one_hot(decided, num_classes).sum(dim=1)  # (n, C)
        top = counts.max(dim=1)
        votes.append(top.indices)
        confidence.append(top.values.float() / samples)
    model.train(was_training)
    return torch.cat(votes), torch.cat(confidence)
