"""The retrieval table, data/retrieval/neighbours.parquet (written by `lra retrieve`,
read by `lra train` and `lra evaluate`):

    sample_id, split, neighbour_ids [k] int64, distances [k] float32,
    neighbour_labels [k] int64, candidate_labels [k+1] int64? (train only),
    label_distribution [C] float32, own_label_agreement float32? (train only)

Sorted by sample_id, like every table (`pipeline.tables`). The readers that read only
some columns verify the pages of the others, so damage anywhere in the file is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from pipeline.artifacts import (ROW_GROUP_ROWS, check_intact, fixed_list_array, iter_chunks,
                                list_column_to_numpy, read_schema, read_table, row_group_rows,
                                write_table)
from pipeline.lineage import Ref, ref
from pipeline.tables import RETRIEVE, UNKNOWN, split_column


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
    """Write retrieve's table: one row per sample, N rows in the embeddings' order.

    sample_id: (N,) int64; split: (N,) str; neighbour_ids, neighbour_labels: (N, k) int64
    and distances: (N, k) float32 (1 - cosine similarity), ranked nearest first;
    distribution: (N, C) float32, the neighbours' label frequencies; candidates: (N,
    k + 1) int64 and agreement: (N,) float32 are stored on train rows only (`is_train`,
    (N,) bool), null elsewhere. metadata: the JSON-able schema metadata (k, space,
    built_from, ...)."""
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
    write_table(table, path, metadata=metadata,
                row_group_rows=row_group_rows(table.nbytes // max(len(table), 1)),
                fingerprint=True)


@dataclass(frozen=True)
class NeighbourChunks:
    """A retrieval table opened for streaming the neighbours' labels and distances, which
    is all evaluation needs: sample_id (N,) int64 now, the (b, k) columns chunk by chunk."""

    path: Path
    sample_id: np.ndarray
    meta: dict[str, Any]

    def ref(self) -> Ref:
        return retrieval_ref(self.path, self.meta, len(self.sample_id))

    def iter_chunks(self, chunk_rows: int = ROW_GROUP_ROWS
                    ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """Yield (first row, neighbour_labels (b, k) int64, distances (b, k) float32)."""
        start = 0
        for table in iter_chunks(self.path, ["neighbour_labels", "distances"], chunk_rows,
                                 what="retrieval table", rebuild=RETRIEVE):
            labels = list_column_to_numpy(table.column(0), np.int64)
            yield start, labels, list_column_to_numpy(table.column(1), np.float32)
            start += len(labels)


def open_neighbours(path: str | Path) -> NeighbourChunks:
    table, meta = read_table(path, "retrieval table", columns=("sample_id",), required=(
        "sample_id", "neighbour_labels", "distances"), rebuild=RETRIEVE)
    _check_rest(path, ("sample_id", "neighbour_labels", "distances"))
    return NeighbourChunks(Path(path), table.column("sample_id").to_numpy(), meta)


RETRIEVAL_COLUMNS = ("sample_id", "split", "neighbour_ids", "distances", "neighbour_labels",
                     "candidate_labels")


def _candidates(column: pa.ChunkedArray) -> np.ndarray:
    """candidate_labels column -> (N, k + 1) int64, UNKNOWN on null (non-train) rows."""
    col = column.combine_chunks()
    width = col.type.list_size
    candidates = np.full((len(col), width), UNKNOWN, dtype=np.int64)
    valid = ~np.asarray(col.is_null().to_numpy(zero_copy_only=False))
    # Null rows still occupy their slots in the flat values buffer.
    flat = col.values.to_numpy(zero_copy_only=False)
    flat = flat[col.offset * width:(col.offset + len(col)) * width]
    candidates[valid] = flat.reshape(-1, width)[valid]
    return candidates


def read_retrieval(path: str | Path) -> Retrieval:
    """The columns `Retrieval` holds (not the label distributions, which stages recompute
    or do not need)."""
    table, meta = read_table(path, "retrieval table", columns=RETRIEVAL_COLUMNS,
                             required=RETRIEVAL_COLUMNS, rebuild=RETRIEVE)
    return Retrieval(
        sample_id=table.column("sample_id").to_numpy(), split=split_column(table),
        neighbour_ids=list_column_to_numpy(table.column("neighbour_ids"), np.int64),
        distances=list_column_to_numpy(table.column("distances"), np.float32),
        neighbour_labels=list_column_to_numpy(table.column("neighbour_labels"), np.int64),
        candidates=_candidates(table.column("candidate_labels")), meta=meta)


def read_candidates(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """What training needs of the retrieval table: (sample_id (N,) int64, candidates
    (N, k + 1) int64 with UNKNOWN on non-train rows), reading only those two columns."""
    ids, candidates, _ = read_candidates_meta(path)
    return ids, candidates


def read_candidates_meta(path: str | Path) -> tuple[np.ndarray, np.ndarray, Ref]:
    """`read_candidates` and the table's lineage `Ref`."""
    table, meta = read_table(path, "retrieval table", columns=("sample_id", "candidate_labels"),
                             required=RETRIEVAL_COLUMNS, rebuild=RETRIEVE)
    _check_rest(path, ("sample_id", "candidate_labels"))
    ids = table.column("sample_id").to_numpy()
    return ids, _candidates(table.column("candidate_labels")), retrieval_ref(path, meta,
                                                                             len(ids))


def _check_rest(path: str | Path, read: tuple[str, ...]) -> None:
    """Verify the retrieval table's columns that the caller does not read (a damaged
    page anywhere is refused)."""
    names = read_schema(path, "retrieval table", RETRIEVE).names
    check_intact(path, [n for n in names if n not in read], what="retrieval table",
                 rebuild=RETRIEVE)


def retrieval_ref(path: str | Path, meta: dict[str, Any], rows: int) -> Ref:
    return ref("retrieval", "retrieval table", path, RETRIEVE, meta, rows=rows)
