"""Artifact I/O of the report stage: reading what it shows (predictions, neighbours,
training log, gallery images) and writing data/report/label_issues.parquet.

label_issues.parquet: one row per training sample, sorted by issue_rank (0 = most
suspect):
    issue_rank int64, sample_id int64, image_ref string (the image's path, or
    "<source>:<sample_id>" for images stored in the prepared table), given_label int64,
    given_class string, predicted_label int64, predicted_class string, confidence
    float32, label_score float32, is_label_issue bool, mean_start_label int64,
    neighbour_agreement float32, knn_vote int64, is_corrupted bool? (null where the
    clean label is unknown)
Schema metadata: class_names, samples, min_confidence, readout, scored_by, flag_rule.
(pipeline.issues documents each column.)
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline.artifacts import list_column_to_numpy, read_table, require, write_table
from pipeline.errors import ArtifactError
from pipeline.images import open_image
from pipeline.issues import LabelIssues
from pipeline.tables import UNKNOWN


@dataclass(frozen=True)
class Predictions:
    """evaluate's predictions.parquet: (N,) arrays; true is UNKNOWN where null."""

    sample_id: np.ndarray
    split: np.ndarray
    true: np.ndarray
    predicted: np.ndarray
    knn_vote: np.ndarray
    class_names: list[str]


def read_predictions(path: str | Path, *, num_classes: int) -> Predictions:
    """evaluate's predictions (the columns the report needs) as arrays, with the class
    names; names for another number of classes are an ArtifactError."""
    cols = ("sample_id", "split", "true", "predicted", "knn_vote")
    table, meta = read_table(path, "predictions", columns=cols, required=cols)
    names = meta.get("class_names") or [str(i) for i in range(num_classes)]
    if len(names) != num_classes:
        raise ArtifactError(f"predictions at {path} name {len(names)} classes, the labels "
                            f"have {num_classes}; rerun `lra evaluate`")
    return Predictions(table["sample_id"].to_numpy(),
                       np.asarray(table["split"].to_pylist(), dtype=object),
                       table["true"].fill_null(UNKNOWN).to_numpy(),
                       table["predicted"].to_numpy(), table["knn_vote"].to_numpy(),
                       list(names))


@dataclass(frozen=True)
class Neighbourhood:
    """From neighbours.parquet: sample_id (N,), agreement (N,) float32 (NaN off train),
    neighbour_ids and neighbour_labels (N, k) int64; k_chosen_on_validation: whether
    retrieve chose k (retrieve.k = auto)."""

    sample_id: np.ndarray
    agreement: np.ndarray
    neighbour_ids: np.ndarray
    neighbour_labels: np.ndarray
    k_chosen_on_validation: bool = False


def read_neighbourhood(path: str | Path) -> Neighbourhood:
    """retrieve's table as arrays: ids and labels of the k neighbours ((N, k) int64) and
    the own-label agreement ((N,) float32, NaN off the train split)."""
    cols = ("sample_id", "own_label_agreement", "neighbour_ids", "neighbour_labels")
    table, meta = read_table(path, "retrieval table", columns=cols, required=cols)
    return Neighbourhood(
        table["sample_id"].to_numpy(),
        table["own_label_agreement"].fill_null(math.nan).to_numpy().astype(np.float32),
        list_column_to_numpy(table["neighbour_ids"], np.int64),
        list_column_to_numpy(table["neighbour_labels"], np.int64),
        bool(meta.get("k_chosen_on_validation", False)))


def read_train_log(path: str | Path) -> list[dict[str, float | None]]:
    """train_log.csv rows with numbers parsed; empty cells are None."""
    with open(require(path, "training log"), newline="") as f:
        return [{k: (float(v) if v not in ("", None) else None) for k, v in row.items()}
                for row in csv.DictReader(f)]


def image_refs(samples_path: str | Path, sample_ids: np.ndarray) -> list[str]:
    """Per sample id: its image path (joined to the prepared table's image_root when it
    has one), or "<source>:<id>" when the image bytes are stored in the table."""
    table, meta = read_table(samples_path, "prepared table", columns=("sample_id", "path"),
                             required=("sample_id", "path"))
    ids = table["sample_id"].to_numpy()
    if not np.array_equal(ids, np.arange(len(ids))):
        raise ArtifactError(f"prepared table at {samples_path}: sample_id must be 0..N-1; "
                            "rerun `lra prepare`")
    paths = table["path"].to_pylist()
    root, source = meta.get("image_root"), meta.get("source", "image")
    return [f"{source}:{i}" if paths[i] is None else
            (str(Path(root) / paths[i]) if root else paths[i]) for i in sample_ids.tolist()]


def load_images(samples_path: str | Path, sample_ids: list[int]) -> dict[int, Image.Image | None]:
    """Decoded images of a few sample ids, reading only their rows; an unreadable image
    maps to None (the page says so instead of failing the stage)."""
    if not sample_ids:
        return {}
    _, meta = read_table(samples_path, "prepared table", columns=("sample_id",))
    table = pq.read_table(samples_path, columns=["sample_id", "image", "path"],
                          filters=[("sample_id", "in", sorted(set(sample_ids)))])
    out: dict[int, Image.Image | None] = {}
    for row in table.to_pylist():
        try:
            out[row["sample_id"]] = open_image(row["image"], row["path"], meta.get("image_root"))
        except (OSError, ValueError):
            out[row["sample_id"]] = None
    return out


def issues_table(issues: LabelIssues, class_names: list[str], refs: list[str]) -> pa.Table:
    """label_issues.parquet's rows (schema in the module docstring); refs are in the
    issues' row order."""
    names = np.asarray(class_names, dtype=object)
    corrupted = (pa.array(issues.is_corrupted, type=pa.bool_()) if issues.is_corrupted is not None
                 else pa.nulls(len(issues.sample_id), pa.bool_()))
    return pa.table({
        "issue_rank": pa.array(issues.issue_rank, type=pa.int64()),
        "sample_id": pa.array(issues.sample_id, type=pa.int64()),
        "image_ref": pa.array(refs, type=pa.string()),
        "given_label": pa.array(issues.given_label, type=pa.int64()),
        "given_class": pa.array(list(names[issues.given_label]), type=pa.string()),
        "predicted_label": pa.array(issues.predicted_label, type=pa.int64()),
        "predicted_class": pa.array(list(names[issues.predicted_label]), type=pa.string()),
        "confidence": pa.array(issues.confidence, type=pa.float32()),
        "label_score": pa.array(issues.label_score, type=pa.float32()),
        "is_label_issue": pa.array(issues.is_label_issue, type=pa.bool_()),
        "mean_start_label": pa.array(issues.mean_start_label, type=pa.int64()),
        "neighbour_agreement": pa.array(issues.neighbour_agreement, type=pa.float32()),
        "knn_vote": pa.array(issues.knn_vote, type=pa.int64()),
        "is_corrupted": corrupted,
    })


def write_issues(path: str | Path, table: pa.Table, *, metadata: dict[str, Any]) -> None:
    write_table(table, path, metadata=metadata)
