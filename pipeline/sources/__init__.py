"""Dataset sources: each turns a dataset on disk (or shipped in a package) into the
prepared table that every later stage reads.

The prepared table (`PREPARED_SCHEMA`), one row per image, in a fixed order:
    sample_id   int64    0..N-1, stable across reruns
    split       string   "train" | "val" | "test" | "test_<name>" (extra test sets)
    label       int64    the label as the dataset ships it (noisy for real-noise sets)
    clean_label int64?   the clean label where known, else null
    image       binary?  encoded image bytes (PNG) for sources that hold pixels in memory
    path        string?  image path relative to `data.root` for sources that read files
Exactly one of image / path is set in each row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.config import DataConfig
from pipeline.errors import ArtifactError, ConfigError

PREPARED_SCHEMA = pa.schema([
    pa.field("sample_id", pa.int64(), nullable=False),
    pa.field("split", pa.string(), nullable=False),
    pa.field("label", pa.int64(), nullable=False),
    pa.field("clean_label", pa.int64()),
    pa.field("image", pa.binary()),
    pa.field("path", pa.string()),
])

REJECTS_SCHEMA = pa.schema([
    pa.field("path", pa.string(), nullable=False),
    pa.field("reason", pa.string(), nullable=False),
])


@dataclass(frozen=True)
class PreparedDataset:
    """A source's output.

    table: PREPARED_SCHEMA rows. class_names: C names, index = label.
    labels_are_clean: True when `label` is clean (synthetic noise may be injected on the
    train split); False for real-noise datasets (observed label = `label`).
    rejects: images that could not be read, with the reason (REJECTS_SCHEMA).
    """

    table: pa.Table
    class_names: list[str]
    labels_are_clean: bool
    rejects: pa.Table = field(default_factory=REJECTS_SCHEMA.empty_table)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def make_table(*, split: np.ndarray, label: np.ndarray, clean_label: np.ndarray | None,
               image: list[bytes] | None = None, path: list[str] | None = None) -> pa.Table:
    """Assemble a PREPARED_SCHEMA table; sample_id is the row position."""
    n = len(label)
    if (image is None) == (path is None):
        raise ValueError("give exactly one of image / path")
    clean = (pa.nulls(n, pa.int64()) if clean_label is None
             else pa.array(np.asarray(clean_label, dtype=np.int64), type=pa.int64()))
    return pa.table({
        "sample_id": pa.array(np.arange(n, dtype=np.int64)),
        "split": pa.array(np.asarray(split, dtype=object), type=pa.string()),
        "label": pa.array(np.asarray(label, dtype=np.int64)),
        "clean_label": clean,
        "image": pa.array(image, type=pa.binary()) if image is not None else pa.nulls(n, pa.binary()),
        "path": pa.array(path, type=pa.string()) if path is not None else pa.nulls(n, pa.string()),
    }, schema=PREPARED_SCHEMA)


def image_root(cfg: DataConfig) -> Path | None:
    """The directory that the prepared table's `path` values are relative to:
    the manifest's directory for `manifest`, data.root for the other file sources,
    None for sources that store pixels (digits, cifar10, cifar100)."""
    if cfg.source in ("digits", "cifar10", "cifar100") or not cfg.root:
        return None
    if cfg.source == "manifest":
        return Path(cfg.root).parent
    return Path(cfg.root)


Loader = Callable[[DataConfig], PreparedDataset]


def _loaders(source: str) -> dict[str, Loader]:
    # Imported lazily: `digits` never pays for the file sources' imports (polars, ...).
    if source == "digits":
        from pipeline.sources import digits

        return {"digits": digits.load}
    from pipeline.sources import files

    return files.LOADERS


def load_source(cfg: DataConfig) -> PreparedDataset:
    """Load the dataset named by `cfg.source` (see DataConfig)."""
    loaders = _loaders(cfg.source)
    if cfg.source not in loaders:
        raise ConfigError(f"data.source: {cfg.source!r} is not available; "
                          f"valid: {', '.join(sorted(loaders))}")
    ds = loaders[cfg.source](cfg)
    if ds.num_classes < 2:
        raise ArtifactError(f"source {cfg.source}: the dataset has {ds.num_classes} class(es) "
                            f"({', '.join(map(repr, ds.class_names)) or 'none'}); learning "
                            "from noisy labels needs at least two")
    return ds
