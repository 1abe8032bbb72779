"""Typed readers and writers for the pipeline's Parquet artifacts, with the checks that
make a mismatched or corrupt upstream artifact fail early and clearly.

    prepared    data/prepared/samples.parquet   (pipeline.sources.PREPARED_SCHEMA)
    embeddings  data/embeddings/embeddings.parquet
                sample_id int64, split string, embedding fixed_size_list<float32>[D]
    labels      data/labels/labels.parquet
                sample_id, split, clean_label int64?, observed_label int64, is_corrupted bool?
    retrieval   data/retrieval/neighbours.parquet
                sample_id, split, neighbour_ids [k] int64, distances [k] float32,
                neighbour_labels [k] int64, candidate_labels [k+1] int64? (train only),
                label_distribution [C] float32, own_label_agreement float32? (train only)
All tables are sorted by sample_id; the readers check that tables that must describe the
same samples do.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.artifacts import (embedding_array, fixed_list_array, list_column_to_numpy,
                                read_table, write_table)
from pipeline.errors import ArtifactError

UNKNOWN = -1
"""Stands for a null label in int64 arrays (clean labels of real-noise datasets)."""


def _split(table: pa.Table) -> np.ndarray:
    return np.asarray(table.column("split").to_pylist(), dtype=object)


def check_same_samples(a: np.ndarray, b: np.ndarray, what_a: str, what_b: str) -> None:
    """Two artifacts must list the same sample ids in the same order."""
    if len(a) != len(b) or not np.array_equal(a, b):
        raise ArtifactError(f"{what_a} ({len(a)} rows) and {what_b} ({len(b)} rows) describe "
                            "different samples; rerun the pipeline (`uv run dvc repro`)")


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


def read_prepared(path: str | Path) -> Prepared:
    table, meta = read_table(path, "prepared table", required=(
        "sample_id", "split", "label", "clean_label", "image", "path"))
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
    table = pa.table({
        "sample_id": pa.array(sample_id, type=pa.int64()),
        "split": pa.array(list(split), type=pa.string()),
        "embedding": embedding_array(vectors),
    })
    write_table(table, path, metadata={**provenance, "dim": int(vectors.shape[1])})


def read_embeddings(path: str | Path) -> Embeddings:
    table, meta = read_table(path, "embeddings", required=("sample_id", "split", "embedding"))
    col_type = table.schema.field("embedding").type
    if not (pa.types.is_fixed_size_list(col_type) and pa.types.is_float32(col_type.value_type)):
        raise ArtifactError(f"embeddings at {path}: column 'embedding' is {col_type}, expected "
                            "fixed_size_list<float32>[D]; rerun `lra embed`")
    vectors = list_column_to_numpy(table.column("embedding"), np.float32)
    if "dim" in meta and int(meta["dim"]) != vectors.shape[1]:
        raise ArtifactError(f"embeddings at {path}: metadata says dim {meta['dim']} but vectors "
                            f"have {vectors.shape[1]}; rerun `lra embed`")
    bad = ~np.isfinite(vectors).all(axis=1)
    if bad.any():
        raise ArtifactError(f"embeddings at {path}: {int(bad.sum())} row(s) contain NaN or "
                            "infinite values (first sample_id "
                            f"{int(table.column('sample_id')[int(np.argmax(bad))].as_py())})")
    sample_id = table.column("sample_id").to_numpy()
    if not np.array_equal(sample_id, np.arange(len(sample_id))):
        # Later stages index arrays by sample id: ids must be the row positions.
        raise ArtifactError(f"embeddings at {path}: sample_id must be 0..N-1 in row order; "
                            "rerun `lra prepare` and `lra embed`")
    return Embeddings(sample_id, _split(table), vectors, meta)


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


def write_labels(path: str | Path, *, sample_id: np.ndarray, split: np.ndarray,
                 clean: np.ndarray, observed: np.ndarray, metadata: dict[str, Any]) -> None:
    known = clean != UNKNOWN
    table = pa.table({
        "sample_id": pa.array(sample_id, type=pa.int64()),
        "split": pa.array(list(split), type=pa.string()),
        "clean_label": pa.array(clean, type=pa.int64(), mask=~known),
        "observed_label": pa.array(observed, type=pa.int64()),
        "is_corrupted": pa.array(clean != observed, type=pa.bool_(), mask=~known),
    })
    write_table(table, path, metadata=metadata)


def read_labels(path: str | Path) -> Labels:
    table, meta = read_table(path, "labels", required=(
        "sample_id", "split", "clean_label", "observed_label"))
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
    return Labels(table.column("sample_id").to_numpy(), _split(table), clean, observed, c, meta)


# --------------------------------------------------------------------------- retrieval
@dataclass(frozen=True)
class Retrieval:
    """neighbour_ids, neighbour_labels: (N, k) int64; distances: (N, k) float32;
    candidates: (N, k + 1) int64, rows of non-train samples filled with UNKNOWN."""

    sample_id: np.ndarray
    split: np.ndarray
    neighbour_ids: np.ndarray
    distances: np.ndarray
    neighbour_labels: np.ndarray
    candidates: np.ndarray
    meta: dict[str, Any]

    @property
    def k(self) -> int:
        return self.neighbour_ids.shape[1]


def write_retrieval(path: str | Path, *, sample_id: np.ndarray, split: np.ndarray,
                    neighbour_ids: np.ndarray, distances: np.ndarray,
                    neighbour_labels: np.ndarray, candidates: np.ndarray,
                    distribution: np.ndarray, agreement: np.ndarray, is_train: np.ndarray,
                    metadata: dict[str, Any]) -> None:
    not_train = pa.array(~is_train)
    candidate_col = pa.FixedSizeListArray.from_arrays(
        pa.array(candidates.reshape(-1), type=pa.int64()), candidates.shape[1], mask=not_train)
    table = pa.table({
        "sample_id": pa.array(sample_id, type=pa.int64()),
        "split": pa.array(list(split), type=pa.string()),
        "neighbour_ids": fixed_list_array(neighbour_ids, pa.int64()),
        "distances": fixed_list_array(distances, pa.float32()),
        "neighbour_labels": fixed_list_array(neighbour_labels, pa.int64()),
        "candidate_labels": candidate_col,
        "label_distribution": fixed_list_array(distribution, pa.float32()),
        "own_label_agreement": pa.array(agreement, type=pa.float32(), mask=~is_train),
    })
    write_table(table, path, metadata=metadata)


def read_retrieval(path: str | Path) -> Retrieval:
    table, meta = read_table(path, "retrieval table", required=(
        "sample_id", "split", "neighbour_ids", "distances", "neighbour_labels",
        "candidate_labels"))
    split = _split(table)
    cand_col = table.column("candidate_labels").combine_chunks()
    width = cand_col.type.list_size
    # Null rows (non-train samples) still occupy their slots in the flat values buffer.
    candidates = np.full((len(table), width), UNKNOWN, dtype=np.int64)
    valid = ~np.asarray(cand_col.is_null().to_numpy(zero_copy_only=False))
    flat = cand_col.values.to_numpy(zero_copy_only=False)
    flat = flat[cand_col.offset * width:(cand_col.offset + len(cand_col)) * width]
    candidates[valid] = flat.reshape(-1, width)[valid]
    return Retrieval(
        sample_id=table.column("sample_id").to_numpy(), split=split,
        neighbour_ids=list_column_to_numpy(table.column("neighbour_ids"), np.int64),
        distances=list_column_to_numpy(table.column("distances"), np.float32),
        neighbour_labels=list_column_to_numpy(table.column("neighbour_labels"), np.int64),
        candidates=candidates, meta=meta)
