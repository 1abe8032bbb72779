"""Seeded, stratified train / val / test splits for sources without an official one."""

from __future__ import annotations

import numpy as np


def stratified_split(labels: np.ndarray, *, val_fraction: float, test_fraction: float,
                     seed: int) -> np.ndarray:
    """Assign each sample to "train", "val" or "test", stratified by label.

    labels: (N,) int. Returns (N,) object array of split names. Within each class the
    samples are shuffled with `seed` and cut by the fractions (rounded to nearest), so
    every class keeps its proportion in every split. Deterministic for a given seed.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    split = np.empty(len(labels), dtype=object)
    for cls in np.unique(labels):  # loop over classes (C), not samples
        idx = rng.permutation(np.flatnonzero(labels == cls))
        n_test = int(round(len(idx) * test_fraction))
        n_val = int(round(len(idx) * val_fraction))
        split[idx[:n_test]] = "test"
        split[idx[n_test:n_test + n_val]] = "val"
        split[idx[n_test + n_val:]] = "train"
    return split
