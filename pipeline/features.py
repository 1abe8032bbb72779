"""Feature normalisation fitted on the train split and stored in the checkpoint, so
training and evaluation transform embeddings identically."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class FeatureNormalizer:
    """kind: "standardize" (per-coordinate train mean / std), "center" (per-coordinate
    train mean, one pooled std for all coordinates: keeps the feature space's geometry,
    so rarely-active coordinates are not blown up), "l2" (unit rows) or "none".

    mean, std: (D,) float32 for "standardize" and "center", else None.
    """

    kind: str
    mean: np.ndarray | None = None
    std: np.ndarray | None = None

    @classmethod
    def fit(cls, train: np.ndarray, kind: str) -> FeatureNormalizer:
        """train: (N, D) float32 train-split embeddings."""
        if kind == "standardize":
            mean = train.mean(axis=0, dtype=np.float64).astype(np.float32)
            std = train.std(axis=0, dtype=np.float64).astype(np.float32)
            std[std < 1e-6] = 1.0  # constant coordinates carry nothing; avoid dividing by 0
            return cls(kind, mean, std)
        if kind == "center":
            mean = train.mean(axis=0, dtype=np.float64)
            pooled = float(np.sqrt(((train - mean) ** 2).mean())) or 1.0
            return cls(kind, mean.astype(np.float32),
                       np.full(train.shape[1], pooled, dtype=np.float32))
        if kind in ("l2", "none"):
            return cls(kind)
        raise ValueError(f"unknown feature_norm {kind!r}; valid: standardize, center, l2, "
                         "none")

    def apply(self, x: np.ndarray) -> np.ndarray:
        """(N, D) float32 -> (N, D) float32 normalised (a new array)."""
        if self.kind in ("standardize", "center"):
            out = np.subtract(x, self.mean, dtype=np.float32)  # the one new (N, D) array
            out /= self.std
            return out
        if self.kind == "l2":
            norms = np.linalg.norm(x, axis=1, keepdims=True)
            return (x / np.maximum(norms, 1e-12)).astype(np.float32)
        return np.array(x, dtype=np.float32)

    def to_dict(self) -> dict:
        return {"kind": self.kind,
                "mean": None if self.mean is None else self.mean.tolist(),
                "std": None if self.std is None else self.std.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> FeatureNormalizer:
        as_arr = (lambda v: None if v is None else np.asarray(v, dtype=np.float32))
        return cls(d["kind"], as_arr(d["mean"]), as_arr(d["std"]))
