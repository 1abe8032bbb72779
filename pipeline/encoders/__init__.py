"""Frozen encoders f_p: prepared table -> (N, D) float32 embeddings.

Every encoder implements `Encoder`: `encode` takes the whole prepared table (so it can
use split information, e.g. train-split statistics) and returns embeddings in table row
order; `provenance` is stored in the embeddings table's schema metadata.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pyarrow as pa

from pipeline.config import EmbedConfig


@dataclass(frozen=True)
class RuntimeOptions:
    """Knobs that change speed, never results; not tracked DVC params."""

    device: str = "cpu"
    batch_size: int = 256
    workers: int = 0
    progress: bool = True


class Encoder(Protocol):
    def encode(self, table: pa.Table, *, root: str | None, runtime: RuntimeOptions
               ) -> np.ndarray:
        """table: prepared table (PREPARED_SCHEMA). Returns (N, D) float32, row order."""
        ...

    def provenance(self) -> dict:
        """encoder, model, pretrained, dim, normalised, ... for the schema metadata."""
        ...


def build_encoder(cfg: EmbedConfig) -> Encoder:
    if cfg.encoder == "pixels":
        from pipeline.encoders.pixels import PixelEncoder

        return PixelEncoder()
    from pipeline.encoders.clip import OpenClipEncoder

    return OpenClipEncoder(model=cfg.model, pretrained=cfg.pretrained, cache_dir=cfg.cache_dir)
