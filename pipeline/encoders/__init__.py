"""Frozen encoders f_p: prepared table -> (N, D) float32 embeddings.

Every encoder implements `Encoder`: `encode` takes the whole prepared table (so it can
use split information, e.g. train-split statistics) and returns embeddings in table row
order; `provenance` is stored in the embeddings table's schema metadata.

Optional members that the resumable, chunked `lra embed` (pipeline.embed_cache) uses:
    per_image: bool        True when a row's embedding depends on that row's image only,
                           so any slice of the table can be embedded on its own (chunks,
                           ranks). Encoders without it are run on the whole table at once.
    fingerprint(runtime)   JSON-able dict of everything besides the images that decides
                           the numbers (weights, device type, batch size, versions): part
                           of the chunk cache's key.
    encode_ranges(table, ranges, root=, runtime=)
                           yield the embeddings of each [start, stop) row range in turn;
                           lets an encoder keep its model and DataLoader workers across
                           chunks. `iter_encode` falls back to `encode` on table slices.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
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


def iter_encode(encoder: Encoder, table: pa.Table, ranges: Sequence[tuple[int, int]], *,
                root: str | None, runtime: RuntimeOptions) -> Iterator[np.ndarray]:
    """Embeddings of each row range [start, stop) of `table`, in the order given: one
    (stop - start, D) float32 array per range. Uses the encoder's `encode_ranges` when it
    has one, else `encode` on each slice (one progress bar over all ranges)."""
    if hasattr(encoder, "encode_ranges"):
        yield from encoder.encode_ranges(table, ranges, root=root, runtime=runtime)
        return
    from tqdm.auto import tqdm

    quiet = dataclasses.replace(runtime, progress=False)
    with tqdm(total=sum(b - a for a, b in ranges), unit="img", desc="embed",
              disable=not runtime.progress, dynamic_ncols=True) as bar:
        for start, stop in ranges:
            vectors = encoder.encode(table.slice(start, stop - start), root=root, runtime=quiet)
            # Before the yield: a caller that stops after the last range (zip) never
            # resumes the generator, and the bar would end short (0/1797).
            bar.update(stop - start)
            yield vectors


def build_encoder(cfg: EmbedConfig) -> Encoder:
    """The encoder `cfg` names, checked before any image is read (open_clip: the model
    and its weights are found, else a one-line error)."""
    if cfg.encoder == "pixels":
        from pipeline.encoders.pixels import PixelEncoder

        return PixelEncoder()
    from pipeline.encoders.clip import OpenClipEncoder

    encoder = OpenClipEncoder(model=cfg.model, pretrained=cfg.pretrained,
                              cache_dir=cfg.cache_dir)
    encoder.check()  # params first: nothing (the embedding cache) is created for bad ones
    return encoder
