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


def evaluation_metrics(predicted: dict[str, np.ndarray], *, clean: np.ndarray,
                       observed: np.ndarray, split: np.ndarray,
                       methods_always: Iterable[str] = ()) -> dict:
    """metrics.json's accuracy part: per-split accuracies (`accuracy_by_split`), the
    observed noise rate of the train split and, where clean train labels are known,
    how often each method's train prediction is the clean label (label cleaning).

    predicted: method -> (N,) int64; clean: (N,) int64 with UNKNOWN; observed: (N,)
    int64; split: (N,) object."""
    metrics: dict = accuracy_by_split(predicted, truth=clean, split=split,
                                      methods_always=methods_always)
    train = np.flatnonzero(split == "train")
    known = train[clean[train] != UNKNOWN]
    metrics["noise"] = {"observed_rate": (float((observed[known] != clean[known]).mean())
                                          if len(known) else None)}
    if len(known):
        metrics["train_label_accuracy"] = {
            "observed": float((observed[known] == clean[known]).mean()),
            **{m: float((pred[known] == clean[known]).mean()) for m, pred in predicted.items()}}
    return metrics
