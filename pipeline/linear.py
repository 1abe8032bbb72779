"""Multinomial logistic regression on fixed embeddings, in torch, full batch with L-BFGS.

Used as the noisy_linear / clean_linear baselines and as the probe classifier whose
class probabilities drive PMD noise. Deterministic (zero initialisation, full batch).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F


@dataclass(frozen=True)
class LinearProbe:
    """weight: (D, C) float32; bias: (C,) float32; mean / std: (D,) standardisation."""

    weight: torch.Tensor
    bias: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor

    def logits(self, x: np.ndarray) -> torch.Tensor:
        """x: (N, D) float32 -> (N, C) float32 logits."""
        z = torch.tensor(x, dtype=torch.float32).sub_(self.mean).div_(self.std)
        return z @ self.weight + self.bias

    def predict(self, x: np.ndarray) -> np.ndarray:
        """(N, D) -> (N,) int64 classes."""
        return self.logits(x).argmax(dim=1).numpy().astype(np.int64)

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """(N, D) -> (N, C) float64 probabilities."""
        return F.softmax(self.logits(x).double(), dim=1).numpy()


def fit_linear(x: np.ndarray, y: np.ndarray, *, num_classes: int, l2: float = 1e-4,
               iters: int = 200) -> LinearProbe:
    """Fit softmax regression: mean cross-entropy + l2 * ||W||^2 on standardised x.

    x: (N, D) float32; y: (N,) int64 in [0, C). L-BFGS with strong-Wolfe line search on
    the full batch: a convex problem, so the result does not depend on a seed.
    """
    z = torch.tensor(x, dtype=torch.float32)  # the one (N, D) copy, standardised in place
    mean = z.mean(dim=0)
    std = z.std(dim=0).clamp_min(1e-6)
    z.sub_(mean).div_(std)
    yt = torch.tensor(y, dtype=torch.long)
    weight = torch.zeros(z.shape[1], num_classes, requires_grad=True)
    bias = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=iters, history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-6,
                            tolerance_change=1e-9)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z @ weight + bias, yt) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return LinearProbe(weight.detach(), bias.detach(), mean, std)


def fit_linear_selected(x: np.ndarray, y: np.ndarray, *, x_val: np.ndarray,
                        y_val: np.ndarray, num_classes: int, l2_values: tuple[float, ...],
                        iters: int = 200) -> tuple[LinearProbe, float, float]:
    """`fit_linear` for each L2 strength in `l2_values`; keep the best on validation (the
    first on ties), as LRA-diffusion keeps its best validation epoch.

    x_val: (V, D) float32; y_val: (V,) int64 validation labels (clean where known).
    Returns (probe, chosen l2, its validation accuracy). With no validation rows the
    first strength is used.
    """
    best: tuple[LinearProbe, float, float] | None = None
    for l2 in l2_values:
        probe = fit_linear(x, y, num_classes=num_classes, l2=l2, iters=iters)
        acc = float((probe.predict(x_val) == y_val).mean()) if len(y_val) else 0.0
        if best is None or acc > best[2]:
            best = (probe, l2, acc)
        if not len(y_val):
            break
    assert best is not None, "l2_values must not be empty"
    return best
