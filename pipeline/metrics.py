"""Accuracy tables for the evaluate stage's metrics.json."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from pipeline.tables import UNKNOWN


def accuracy_by_split(predicted: dict[str, np.ndarray], *, truth: np.ndarray,
                      split: np.ndarray, methods_always: Iterable[str] = ()
                      ) -> dict[str, dict[str, float | None]]:
    """{"<split>_accuracy": {method: accuracy}} for "val" and every "test*" split.

    predicted: method -> (N,) int64; truth: (N,) int64 with UNKNOWN (-1) where the true
    label is not known (those rows are left out). A split with no known label, or a
    method in `methods_always` that was not run, reports None, so the keys are stable.
    """
    out: dict[str, dict[str, float | None]] = {}
    names = sorted({s for s in split if s == "val" or str(s).startswith("test")})
    for name in names:
        rows = np.flatnonzero((split == name) & (truth != UNKNOWN))
        scores: dict[str, float | None] = {m: None for m in methods_always}
        for method, pred in predicted.items():
            scores[method] = float((pred[rows] == truth[rows]).mean()) if len(rows) else None
        out[f"{name}_accuracy"] = scores
    return out
