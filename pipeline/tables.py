"""Typed readers and writers for the pipeline's Parquet artifacts, with the checks that
make a mismatched or corrupt upstream artifact fail early and clearly.

    prepared    data/prepared/samples.parquet   (pipeline.sources.PREPARED_SCHEMA)
    embeddings  data/embeddings/embeddings.parquet
                sample_id int64, split string, embedding fixed_size_list<float32>[D]
    labels      data/labels/labels.parquet
                sample_id, split, clean_label int64?, observed_label int64, is_corrupted bool?
    retrieval   data/retrieval/neighbours.parquet: `pipeline.neighbours`
All tables are sorted by sample_id; the readers check that tables that must describe the
same samples do.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from pipeline.artifacts import (ROW_GROUP_ROWS, embedding_array, iter_chunks,
                                iter_row_groups, list_column_to_numpy, read_metadata, read_schema, read_table,
                                row_group_rows, write_table)
from pipeline.errors import ArtifactError
from pipeline.lineage import Ref, ref

UNKNOWN = -1
"""Stands for a null label in int64 arrays (clean labels of real-noise datasets)."""

# The commands that rebuild each table (named in the error for a damaged one).
PREPARE, EMBED, NOISE, RETRIEVE = "lra prepare", "lra embed", "lra noise", "lra retrieve"


def split_column(table: pa.Table) -> np.ndarray:
    """The split column as an (N,) object array."""
    return np.asarray(table.column("split").to_pylist(), dtype=object)


def check_same_samples(a: np.ndarray, b: np.ndarray, what_a: str, what_b: str) -> None:
    """Two artifacts must list the same sample ids in the same order."""
    if len(a) != len(b) or not np.array_equal(a, b):
        raise ArtifactError(f"{what_a} ({len(a)} rows) and {what_b} ({len(b)} rows) describe "
                            "different samples; rerun the pipeline (`uv run dvc repro`)")


def table_stamp(path: str | Path) -> dict[str, Any]:
    """The lineage stamp of a table written by this module ({fingerprint, rows[, dim]}),
    for code that assembles artifacts itself (benchmarks, tests) and records what
    they were built from as `built_from`."""
    schema = read_schema(path, "table", "the stage that writes it")
    rows = read_table(path, "table", columns=schema.names[:1])[0].num_rows
    dim = None
    if "embedding" in schema.names:
        dim = schema.field("embedding").type.list_size
    return ref("", "table", path, "the stage that writes it", read_metadata(schema),
               rows=rows, dim=dim).stamp()


# --------------------------------------------------------------------------- prepared
@dataclass(frozen=True)
class Prepared:
    table: pa.Table
    class_names: list[str]
    labels_are_clean: bool
    image_root: str | None
    meta: dict[str, Any]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def ref(self, path: str | Path) -> Ref:
        return ref("prepared", "prepared table", path, PREPARE, self.meta,
                   rows=self.table.num_rows)


def read_prepared(path: str | Path) -> Prepared:
    """prepare's table (sample_id, split, label, clean_label, image, path) with its class
    names and whether its labels are clean; a missing key is an ArtifactError."""
    table, meta = read_table(path, "prepared table", required=(
        "sample_id", "split", "label", "clean_label", "image", "path"), rebuild=PREPARE)
    for key in ("class_names", "labels_are_clean"):
        if key not in meta:
            raise ArtifactError(f"prepared table at {path} lacks metadata {key!r}; "
                                "rerun `lra prepare`")
    return Prepared(table, list(meta["class_names"]), bool(meta["labels_are_clean"]),
                    meta.get("image_root"), meta)


# --------------------------------------------------------------------------- embeddings
@dataclass(frozen=True)
class Embeddings:
    """sample_id: (N,) int64; split: (N,) object; vectors: (N, D) float32; meta: provenance."""

    sample_id: np.ndarray
    split: np.ndarray
    vectors: np.ndarray
    meta: dict[str, Any]

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    def rows(self, split: str) -> np.ndarray:
        """Row positions of one split: (n,) int64."""
        return np.flatnonzero(self.split == split)


def write_embeddings(path: str | Path, *, sample_id: np.ndarray, split: np.ndarray,
                     vectors: np.ndarray, provenance: dict[str, Any]) -> None:
    """Write embed's table. sample_id: (N,) int64; split: (N,) str; vectors: (N, D)
    float32, stored as a fixed-size list column; provenance (encoder, model, ...) and D
    go in the schema metadata, with a content fingerprint."""
    table = pa.table({
        "sample_id": pa.array(sample_id, type=pa.int64()),
        "split": pa.array(list(split), type=pa.string()),
        "embedding": embedding_array(vectors),
    })
    write_table(table, path, metadata={**provenance, "dim": int(vectors.shape[1])},
                row_group_rows=row_group_rows(4 * vectors.shape[1] + 16), fingerprint=True)


@dataclass(frozen=True)
class EmbeddingsFile:
    """An embeddings table opened without its vectors: ids, splits and provenance are read
    now, vectors later, one row group at a time (`read_rows`, `iter_chunks`), so a stage
    holds only the rows it needs and never the whole decoded table next to them.

    sample_id: (N,) int64 (= row positions); split: (N,) object; dim: D.
    """

    path: Path
    sample_id: np.ndarray
    split: np.ndarray
    dim: int
    meta: dict[str, Any]

    def rows(self, split: str) -> np.ndarray:
        """Row positions of one split: (n,) int64."""
        return np.flatnonzero(self.split == split)

    def ref(self) -> Ref:
        return ref("embeddings", "embeddings", self.path, EMBED, self.meta,
                   rows=len(self.sample_id), dim=self.dim)

    def _checked(self, vectors: np.ndarray, start: int) -> np.ndarray:
        bad = ~np.isfinite(vectors).all(axis=1)
        if bad.any():
            raise ArtifactError(
                f"embeddings at {self.path}: {int(bad.sum())} row(s) among rows {start}-"
                f"{start + len(vectors) - 1} contain NaN or infinite values "
                f"(first sample_id {int(self.sample_id[start + int(np.argmax(bad))])})")
        return vectors

    def iter_chunks(self, chunk_rows: int = ROW_GROUP_ROWS) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (first row, vectors (b, D) float32) over all rows in order, b = chunk_rows
        except for the last chunk (row-aligned with `NeighbourChunks.iter_chunks`); each
        chunk is checked for NaN / inf."""
        start = 0
        for table in iter_chunks(self.path, ["embedding"], chunk_rows, what="embeddings",
                                 rebuild=EMBED):
            vectors = self._checked(list_column_to_numpy(table.column(0), np.float32), start)
            yield start, vectors
            start += len(vectors)
        self._check_count(start)

    def read_rows(self, rows: np.ndarray | None = None) -> np.ndarray:
        """Vectors of the increasing row positions `rows` (None: all): (len(rows), D)
        float32, filled row group by row group, so the peak is the result plus one row
        group's decoding."""
        rows = np.arange(len(self.sample_id)) if rows is None else np.asarray(rows, np.int64)
        if len(rows) > 1 and not (np.diff(rows) > 0).all():
            raise ValueError("read_rows needs strictly increasing row positions")
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        start = 0
        for group in iter_row_groups(self.path, ["embedding"], what="embeddings",
                                     rebuild=EMBED):
            vectors = self._checked(list_column_to_numpy(group.column(0), np.float32), start)
            lo, hi = np.searchsorted(rows, [start, start + len(vectors)])
            np.take(vectors, rows[lo:hi] - start, axis=0, out=out[lo:hi])  # no temporary
            start += len(vectors)
        self._check_count(start)
        # Hand the decoded row groups' pages back to the OS now: Arrow's allocator keeps
        # them (measured: ~120 MiB after reading 45,000 x 768) under the stage's next peak.
        pa.default_memory_pool().release_unused()
        return out

    def _check_count(self, rows_read: int) -> None:
        if rows_read != len(self.sample_id):
            raise ArtifactError(f"embeddings at {self.path}: {rows_read} vectors for "
                                f"{len(self.sample_id)} sample ids; rerun `lra embed`")


def open_embeddings(path: str | Path) -> EmbeddingsFile:
    """Read the ids, splits and provenance of an embeddings table and check its schema;
    the vectors stay on disk until asked for."""
    table, meta = read_table(path, "embeddings", columns=("sample_id", "split"),
                             required=("sample_id", "split", "embedding"), rebuild=EMBED)
    col_type = read_schema(path, "embeddings", EMBED).field("embedding").type
    if not (pa.types.is_fixed_size_list(col_type) and pa.types.is_float32(col_type.value_type)):
        raise ArtifactError(f"embeddings at {path}: column 'embedding' is {col_type}, expected "
                            "fixed_size_list<float32>[D]; rerun `lra embed`")
    if "dim" in meta and int(meta["dim"]) != col_type.list_size:
        raise ArtifactError(f"embeddings at {path}: metadata says dim {meta['dim']} but vectors "
                            f"have {col_type.list_size}; rerun `lra embed`")
    sample_id = table.column("sample_id").to_numpy()
    if not np.array_equal(sample_id, np.arange(len(sample_id))):
        # Later stages index arrays by sample id: ids must be the row positions.
        raise ArtifactError(f"embeddings at {path}: sample_id must be 0..N-1 in row order; "
                            "rerun `lra prepare` and `lra embed`")
    return EmbeddingsFile(Path(path), sample_id, split_column(table), col_type.list_size, meta)


def read_embeddings(path: str | Path) -> Embeddings:
    """The whole table, vectors included (for stages that use every row at once)."""
    emb = open_embeddings(path)
    return Embeddings(emb.sample_id, emb.split, emb.read_rows(), emb.meta)


# --------------------------------------------------------------------------- labels
@dataclass(frozen=True)
class Labels:
    """sample_id, split: (N,); clean, observed: (N,) int64, clean = UNKNOWN where null."""

    sample_id: np.ndarray
    split: np.ndarray
    clean: np.ndarray
    observed: np.ndarray
    num_classes: int
    meta: dict[str, Any]

    def ref(self, path: str | Path) -> Ref:
        return ref("labels", "labels", path, NOISE, self.meta, rows=len(self.sample_id))

    def selection_truth(self, rows: np.ndarray) -> np.ndarray:
        """What model selection scores rows against: the clean label where known (the
        CIFAR protocol), else the observed one (real-noise data without a clean val
        split). rows: (M,) positions. Returns (M,) int64."""
        clean = self.clean[rows]
        return np.where(clean != UNKNOWN, clean, self.observed[rows])


def write_labels(path: str | Path, *, sample_id: np.ndarray, split: np.ndarray,
                 clean: np.ndarray, observed: np.ndarray, metadata: dict[str, Any]) -> None:
    """Write noise's table. sample_id: (N,) int64; split: (N,) str; clean: (N,) int64
    (UNKNOWN where no clean label is known: stored as null); observed: (N,) int64 in
    [0, C). metadata: num_classes, class names and the noise record."""
    known = clean != UNKNOWN
    table = pa.table({
        "sample_id": pa.array(sample_id, type=pa.int64()),
        "split": pa.array(list(split), type=pa.string()),
        "clean_label": pa.array(clean, type=pa.int64(), mask=~known),
        "observed_label": pa.array(observed, type=pa.int64()),
        "is_corrupted": pa.array(clean != observed, type=pa.bool_(), mask=~known),
    })
    write_table(table, path, metadata=metadata, fingerprint=True)


def read_labels(path: str | Path) -> Labels:
    """noise's table as arrays (`Labels`); labels outside [0, num_classes) are an
    ArtifactError naming the column."""
    table, meta = read_table(path, "labels", required=(
        "sample_id", "split", "clean_label", "observed_label"), rebuild=NOISE)
    if "num_classes" not in meta:
        raise ArtifactError(f"labels at {path} lack num_classes metadata; rerun `lra noise`")
    c = int(meta["num_classes"])
    clean = table.column("clean_label").fill_null(UNKNOWN).to_numpy()
    observed = table.column("observed_label").to_numpy()
    for name, arr, lo in (("observed_label", observed, 0), ("clean_label", clean, UNKNOWN)):
        bad = (arr < lo) | (arr >= c)
        if bad.any():
            raise ArtifactError(f"labels at {path}: {int(bad.sum())} {name} value(s) outside "
                                f"[0, {c}), e.g. {int(arr[bad][0])}")
    return Labels(table.column("sample_id").to_numpy(), split_column(table), clean, observed,
                  c, meta)
