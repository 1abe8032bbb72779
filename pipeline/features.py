"""Feature normalisation fitted on the train split and stored in the checkpoint, so
training and evaluation transform embeddings identically."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_CHUNK_ROWS = 2048
"""Rows per chunk of the normaliser's temporaries: bounded, whatever N is."""


def _column_sums(x: np.ndarray, f) -> np.ndarray:
    """sum over rows of f(chunk) in float64, chunk by chunk: (N, D) -> (D,)."""
    total = np.zeros(x.shape[1], dtype=np.float64)
    for start in range(0, len(x), _CHUNK_ROWS):
        total += f(x[start:start + _CHUNK_ROWS].astype(np.float64)).sum(axis=0)
    return total


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
        """train: (N, D) float32 train-split embeddings. Statistics are accumulated in
        float64 over row chunks, so no (N, D) temporary is made."""
        if kind in ("standardize", "center"):
            mean = _column_sums(train, lambda c: c) / max(len(train), 1)  # (D,) float64
            sq = _column_sums(train, lambda c: np.square(c - mean))  # (D,) float64
            if kind == "standardize":
                std = np.sqrt(sq / max(len(train), 1)).astype(np.float32)
                std[std < 1e-6] = 1.0  # constant coordinates carry nothing; avoid dividing by 0
            else:
                pooled = float(np.sqrt(sq.sum() / max(train.size, 1))) or 1.0
                std = np.full(train.shape[1], pooled, dtype=np.float32)
            return cls(kind, mean.astype(np.float32), std)
        if kind in ("l2", "none"):
            return cls(kind)
        raise ValueError(f"unknown feature_norm {kind!r}; valid: standardize, center, l2, "
                         "none")

    def apply(self, x: np.ndarray) -> np.ndarray:
        """(N, D) float32 -> (N, D) float32 normalised (a new array; x is unchanged)."""
        return self.apply_inplace(np.array(x, dtype=np.float32, order="C", copy=True))

    def apply_inplace(self, x: np.ndarray) -> np.ndarray:
        """Normalise the float32 (N, D) array x in place (no (N, D) temporary) and return
        it: for matrices the stage holds once, not twice."""
        if x.dtype != np.float32:
            raise TypeError(f"apply_inplace needs float32, got {x.dtype}")
        if self.kind in ("standardize", "center"):
            x -= self.mean
            x /= self.std
        elif self.kind == "l2":
            for start in range(0, len(x), _CHUNK_ROWS):
                part = x[start:start + _CHUNK_ROWS]
                part /= np.maximum(np.linalg.norm(part, axis=1, keepdims=True), 1e-12)
        return x

    def to_dict(self) -> dict:
        return {"kind": self.kind,
                "mean": None if self.mean is None else self.mean.tolist(),
                "std": None if self.std is None else self.std.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> FeatureNormalizer:
        as_arr = (lambda v: None if v is None else np.asarray(v, dtype=np.float32))
        return cls(d["kind"], as_arr(d["mean"]), as_arr(d["std"]))
