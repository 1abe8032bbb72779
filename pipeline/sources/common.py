"""Machinery shared by the file-based sources (`pipeline.sources.files`).

- Parallel work: `check_images` (PIL open + cheap full decode of every listed file) and
  `encode_pngs` (CIFAR pixels -> PNG bytes) split their input into ordered chunks and run
  them in worker processes (`pipeline.sources.parallel`).
- `finish`: drops unreadable / missing images (listed in the rejects table with a reason),
  optionally carves seeded stratified val / test splits out of train, renumbers
  sample_id 0..N-1 and assembles the PREPARED_SCHEMA table.
- Annotation helpers that turn a missing directory or file into an `ArtifactError` naming
  the path and what was expected there.

Null clean labels are carried as -1 in int64 arrays (`NO_LABEL`) until the table is built.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from pipeline.errors import ArtifactError
from pipeline.images import encode_png
from pipeline.sources import REJECTS_SCHEMA, PreparedDataset, make_table
from pipeline.sources.parallel import (MAX_WORKERS, _chunk_bounds,  # noqa: F401
                                       parallel_chunks, parallel_options, worker_count)
from pipeline.splits import stratified_split

log = logging.getLogger(__name__)

NO_LABEL = -1
"""Placeholder for a null clean label in int64 arrays."""

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".gif", ".tif",
                    ".tiff", ".webp")
"""File suffixes (lower case) that directory-scanning sources treat as images."""

def check_image(path: str) -> str | None:
    """None when the file at `path` is a decodable image, else a one-line reason.

    JPEGs are decoded at 1/8 scale (`draft`), which still walks the whole entropy-coded
    stream, so truncated files are caught at a fraction of a full decode's cost.
    """
    try:
        with Image.open(path) as img:
            img.draft(None, (1, 1))
            img.load()
    except FileNotFoundError:
        return "missing file"
    except IsADirectoryError:
        return "not a file (directory)"
    except Exception as exc:  # noqa: BLE001 - any decoder failure means "unreadable"
        message = str(exc).splitlines()[0] if str(exc) else ""
        return f"unreadable image: {type(exc).__name__}: {message}"[:300]
    return None


def _check_chunk(paths: list[str]) -> list[str | None]:
    return [check_image(p) for p in paths]


def check_images(files: Sequence[str]) -> list[str | None]:
    """Check every file in parallel; (N,) list of None (ok) or a reason string."""
    return parallel_chunks(_check_chunk, list(files), len(files))


def _encode_chunk(pixels: np.ndarray) -> list[bytes]:
    return [encode_png(img) for img in pixels]


def encode_pngs(pixels: np.ndarray) -> list[bytes]:
    """(N, H, W, 3) uint8 -> N PNG byte strings, encoded in parallel, in order."""
    return parallel_chunks(_encode_chunk, pixels, len(pixels))


# --------------------------------------------------------------------------- annotations


def require_root(root: str | Path, source: str, expected: str) -> Path:
    """data.root as a Path; ArtifactError when it is not an existing directory."""
    path = Path(root)
    if not path.is_dir():
        raise ArtifactError(f"{source}: data.root {str(path)!r} is not a directory; "
                            f"expected {expected}")
    return path


def require_dir(path: Path, source: str, expected: str) -> Path:
    if not path.is_dir():
        raise ArtifactError(f"{source}: directory not found: {path}; expected {expected}")
    return path


def read_lines(path: Path, source: str, expected: str) -> list[str]:
    """Non-empty, stripped lines of an annotation file (ArtifactError if it is missing)."""
    if not path.is_file():
        raise ArtifactError(f"{source}: annotation file not found: {path}; expected {expected}")
    with open(path, encoding="utf-8") as f:
        return [s for s in (line.strip() for line in f) if s]


def parse_key_labels(lines: list[str], path: Path, source: str) -> tuple[list[str], np.ndarray]:
    """Lines "<key> <int label>" -> (keys, (N,) int64 labels); ArtifactError on a bad line."""
    keys: list[str] = []
    labels = np.empty(len(lines), dtype=np.int64)
    for i, line in enumerate(lines):
        parts = line.split()
        try:
            if len(parts) != 2:
                raise ValueError
            labels[i] = int(parts[1])
        except ValueError:
            raise ArtifactError(f"{source}: {path} line {i + 1}: expected '<path> <integer "
                                f"label>', got {line[:120]!r}") from None
        keys.append(parts[0])
    return keys, labels


def scan_images(directory: Path) -> list[Path]:
    """Image files (by suffix) anywhere under `directory`, sorted by relative path;
    hidden files and folders are skipped."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(directory, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(Path(dirpath) / name)
    return sorted(found, key=lambda p: p.relative_to(directory).as_posix())


def relative_to_root(path: Path, root: Path) -> str:
    """`path` relative to `root` (POSIX); through "../" when it lies outside `root`.
    Both are resolved first so that `root / result` reaches the file even when `root`
    is a symlink."""
    return Path(os.path.relpath(path.resolve(), root.resolve())).as_posix()


# --------------------------------------------------------------------------- assembly


@dataclass
class Candidates:
    """Rows listed by a dataset's annotations, before their images are checked.

    path: N paths relative to the image root. split: (N,) object. label: (N,) int64.
    clean_label: (N,) int64, NO_LABEL where unknown. rejects: (path, reason) pairs of
    rows already dropped while reading the annotations.
    """

    path: list[str] = field(default_factory=list)
    split: list[str] = field(default_factory=list)
    label: list[int] = field(default_factory=list)
    clean_label: list[int] = field(default_factory=list)
    rejects: list[tuple[str, str]] = field(default_factory=list)

    def add(self, path: str, split: str, label: int, clean_label: int = NO_LABEL) -> None:
        self.path.append(path)
        self.split.append(split)
        self.label.append(int(label))
        self.clean_label.append(int(clean_label))

    def add_many(self, paths: Sequence[str], split: str, labels: np.ndarray,
                 clean: bool) -> None:
        """Append rows of one split; clean=True copies label into clean_label."""
        labels = np.asarray(labels, dtype=np.int64)
        self.path.extend(paths)
        self.split.extend([split] * len(paths))
        self.label.extend(labels.tolist())
        self.clean_label.extend(labels.tolist() if clean else [NO_LABEL] * len(paths))

    def reject(self, path: str, reason: str) -> None:
        self.rejects.append((path, reason))


def carve(split: np.ndarray, labels: np.ndarray, *, val_fraction: float,
          test_fraction: float, seed: int) -> np.ndarray:
    """Move a seeded, stratified share of the "train" rows to "val" / "test".

    split: (N,) object; labels: (N,) int64 (the labels the split is stratified by).
    A fraction of 0 carves nothing. Returns a new (N,) object array.
    """
    split = np.asarray(split, dtype=object).copy()
    train = np.flatnonzero(split == "train")
    if len(train) and (val_fraction > 0 or test_fraction > 0):
        split[train] = stratified_split(labels[train], val_fraction=val_fraction,
                                        test_fraction=test_fraction, seed=seed)
    return split


def rejects_table(rejects: list[tuple[str, str]]) -> pa.Table:
    return pa.table({"path": [p for p, _ in rejects], "reason": [r for _, r in rejects]},
                    schema=REJECTS_SCHEMA)


def clean_label_array(clean: np.ndarray) -> pa.Array:
    """(N,) int64 with NO_LABEL for unknown -> nullable int64 Arrow array."""
    clean = np.asarray(clean, dtype=np.int64)
    return pa.array(clean, type=pa.int64(), mask=clean < 0)


def finish(rows: Candidates, *, root: Path, source: str, class_names: list[str],
           labels_are_clean: bool, val_fraction: float = 0.0, test_fraction: float = 0.0,
           seed: int = 0) -> PreparedDataset:
    """Check every listed image, drop and report the bad ones, carve val / test splits
    out of train (fractions > 0), and build the PreparedDataset.

    Row order is the candidates' order; sample_id is renumbered 0..N-1 after dropping.
    Raises ArtifactError when no image is readable or the train split ends up empty.
    """
    n = len(rows.path)
    reasons = check_images([str(root / p) for p in rows.path])
    keep = np.array([r is None for r in reasons], dtype=bool)
    rejects = list(rows.rejects) + [(p, r) for p, r in zip(rows.path, reasons) if r is not None]
    if not keep.any():
        first = f"; first reject: {rejects[0][0]}: {rejects[0][1]}" if rejects else ""
        raise ArtifactError(f"{source}: no readable image under {root} "
                            f"({n} listed, {len(rejects)} rejected){first}")
    paths = [p for p, k in zip(rows.path, keep) if k]
    split = np.asarray(rows.split, dtype=object)[keep]
    label = np.asarray(rows.label, dtype=np.int64)[keep]
    clean = np.asarray(rows.clean_label, dtype=np.int64)[keep]
    split = carve(split, label, val_fraction=val_fraction, test_fraction=test_fraction,
                  seed=seed)
    if not (split == "train").any():
        raise ArtifactError(f"{source}: no readable training image under {root}")

    table = make_table(split=split, label=label, clean_label=None, path=paths)
    table = table.set_column(table.schema.get_field_index("clean_label"),
                             table.schema.field("clean_label"), clean_label_array(clean))
    names, counts = np.unique(split.astype(str), return_counts=True)
    log.info("%s: %d images (%s), %d classes", source, len(paths),
             ", ".join(f"{s} {c}" for s, c in zip(names, counts)), len(class_names))
    if rejects:
        log.warning("%s: skipped %d unreadable or unlabelled image(s); first: %s (%s)",
                    source, len(rejects), rejects[0][0], rejects[0][1])
    return PreparedDataset(table=table, class_names=list(class_names),
                           labels_are_clean=labels_are_clean, rejects=rejects_table(rejects))
