"""Batched inference with a trained diffusion classifier: the deterministic mean-start
DDIM trajectory (what the paper reports) and stochastic sampling for a vote confidence."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pipeline.diffusion import (alphas_cumprod, cosine_betas, ddim_sample, ddim_timesteps,
                                folded_steps, readout)
from pipeline.features import FeatureNormalizer


STEP_BATCH_ROWS = 1024
"""Trajectories per batch through the DDIM steps. A (1024, 512) float32 activation is
2 MiB, so a step's layers reuse it from cache; at 4,096 rows the same stochastic
sampling ran at 0.35-0.43 of the matmul limit instead of 0.50 (CIFAR width, one
thread, `bench --stages sample`). CPU only: a GPU wants the whole chunk at once."""


def step_batch(features: torch.Tensor, chunk_rows: int) -> int:
    """Rows of trajectories per ddim_sample call for features on their device."""
    cap = STEP_BATCH_ROWS if features.device.type == "cpu" else chunk_rows
    return max(1, min(chunk_rows, cap))


def predict_scores(model: nn.Module, features: torch.Tensor, *, abar: torch.Tensor,
                   timesteps: np.ndarray, num_classes: int, chunk_rows: int = 16_384
                   ) -> torch.Tensor:
    """Mean-start DDIM y_0 scores for every row. features: (N, D) float32 on the model's
    device. Batched (`step_batch` rows at a time) so memory does not grow with N.
    Returns (N, C) float32."""
    was_training = model.training
    model.eval()
    batch = step_batch(features, chunk_rows)
    try:
        folds = folded_steps(model, timesteps)
        parts = [ddim_sample(model, features[i:i + batch], abar=abar, timesteps=timesteps,
                             num_classes=num_classes, folds=folds)
                 for i in range(0, features.shape[0], batch)]
    finally:
        model.train(was_training)
    return torch.cat(parts) if parts else features.new_zeros((0, num_classes))


NOISE_BLOCK_ROWS = 1024
"""Rows per block of stochastic starting points; each block has its own seeded generator."""


def start_noise(first_row: int, rows: int, *, samples: int, num_classes: int, seed: int,
                device: torch.device | str, blocks: dict[int, torch.Tensor] | None = None
                ) -> torch.Tensor:
    """y_T ~ N(0, I) for `samples` trajectories of each row in [first_row, first_row + rows),
    row-major: (rows * samples, C) float32. Block b of NOISE_BLOCK_ROWS rows draws from a
    generator seeded with (seed, b), so a row's draws do not depend on how the rows are
    chunked.

    blocks: a cache {block: (NOISE_BLOCK_ROWS * samples, C) draws} kept by the caller
    across consecutive chunks, so a block is drawn once, not once per chunk (a chunk is
    NOISE_BLOCK_ROWS / samples rows at the default step batch). Blocks before the first
    one asked for are dropped from it."""
    if rows == 0:
        return torch.zeros((0, num_classes), device=device)
    first_block = first_row // NOISE_BLOCK_ROWS
    last_block = (first_row + rows - 1) // NOISE_BLOCK_ROWS
    cache = {} if blocks is None else blocks
    for old in [b for b in cache if b < first_block]:
        del cache[old]
    parts = []
    for block in range(first_block, last_block + 1):
        if block not in cache:
            gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + block)
            cache[block] = torch.randn(NOISE_BLOCK_ROWS * samples, num_classes,
                                       generator=gen, device=device)
        parts.append(cache[block])
    offset = (first_row - first_block * NOISE_BLOCK_ROWS) * samples
    whole = parts[0] if len(parts) == 1 else torch.cat(parts)
    return whole[offset:offset + rows * samples]


def stochastic_vote(model: nn.Module, features: torch.Tensor, *, abar: torch.Tensor,
                    timesteps: np.ndarray, num_classes: int, samples: int, rule: str,
                    seed: int = 0, chunk_rows: int = 16_384, first_row: int = 0
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """`samples` DDIM trajectories per image from y_T ~ N(0, I); majority vote.

    features: (N, D), the rows first_row .. first_row + N - 1 of the dataset (the row
    numbers pick the starting noise, so chunked calls agree with one call).
    Returns (vote (N,) int64, confidence (N,) float32 = fraction of samples agreeing).
    All samples of a chunk run as one (rows * samples, C) batch; the features-only part
    of the network runs once per row.
    """
    votes, confidence = [], []
    was_training = model.training
    model.eval()
    per_chunk = max(1, step_batch(features, chunk_rows) // samples)
    try:
        folds = folded_steps(model, timesteps)
        blocks: dict[int, torch.Tensor] = {}  # start_noise's draws, reused across chunks
        for i in range(0, features.shape[0], per_chunk):
            f = features[i:i + per_chunk]
            y_start = start_noise(first_row + i, f.shape[0], samples=samples,
                                  num_classes=num_classes, seed=seed, device=f.device,
                                  blocks=blocks)
            y0 = ddim_sample(model, f, abar=abar, timesteps=timesteps, repeats=samples,
                             num_classes=num_classes, y_start=y_start,
                             folds=folds)  # (n * S, C)
            decided = readout(y0, rule).view(f.shape[0], samples)  # (n, S)
            counts = torch.nn.functional.one_hot(decided, num_classes).sum(dim=1)  # (n, C)
            top = counts.max(dim=1)
            votes.append(top.indices)
            confidence.append(top.values.float() / samples)
    finally:
        model.train(was_training)
    if not votes:
        return (torch.zeros(0, dtype=torch.long, device=features.device),
                torch.zeros(0, device=features.device))
    return torch.cat(votes), torch.cat(confidence)


@dataclass(frozen=True)
class ChunkPredictions:
    """What the classifier says about one chunk of b rows: scores (b, C) float32 (the
    mean-start DDIM y_0), predicted (b,) int64, and with stochastic sampling on, vote (b,)
    int64 and confidence (b,) float32 (else None)."""

    scores: np.ndarray
    predicted: np.ndarray
    vote: np.ndarray | None = None
    confidence: np.ndarray | None = None


@dataclass(frozen=True)
class DiffusionScorer:
    """A trained classifier ready to score raw embeddings chunk by chunk: the checkpoint's
    normalisation, the mean-start DDIM trajectory, its readout rule and, when `samples`
    > 0, a stochastic vote. Memory is one chunk's, whatever the dataset size."""

    model: nn.Module
    normalizer: FeatureNormalizer
    abar: torch.Tensor  # (T,) float32 on the model's device
    timesteps: np.ndarray  # ascending DDIM steps
    num_classes: int
    rule: str
    samples: int = 0
    device: str = "cpu"

    @classmethod
    def from_checkpoint(cls, model: nn.Module, ckpt: dict, *, num_classes: int,
                        device: str, samples: int = 0) -> DiffusionScorer:
        """model, ckpt: `pipeline.checkpoint.load_checkpoint`'s result."""
        timesteps = ckpt["spec"]["timesteps"]
        return cls(model=model, normalizer=ckpt["normalizer"],
                   abar=alphas_cumprod(cosine_betas(timesteps)).float().to(device),
                   timesteps=ddim_timesteps(timesteps, ckpt["ddim_steps"]),
                   num_classes=num_classes, rule=ckpt["readout"], samples=samples,
                   device=device)

    def score(self, raw: np.ndarray, *, first_row: int = 0) -> ChunkPredictions:
        """raw: (b, D) float32 embeddings of rows first_row .. first_row + b - 1."""
        feats = torch.from_numpy(self.normalizer.apply(raw)).to(self.device)
        common = {"abar": self.abar, "timesteps": self.timesteps,
                  "num_classes": self.num_classes, "chunk_rows": max(len(raw), 1)}
        scores = predict_scores(self.model, feats, **common)
        out = {"scores": scores.cpu().numpy(),
               "predicted": readout(scores, self.rule).cpu().numpy().astype(np.int64)}
        if self.samples > 0:
            vote, conf = stochastic_vote(self.model, feats, samples=self.samples,
                                         rule=self.rule, first_row=first_row, **common)
            out["vote"] = vote.cpu().numpy().astype(np.int64)
            out["confidence"] = conf.cpu().numpy().astype(np.float32)
        return ChunkPredictions(**out)
