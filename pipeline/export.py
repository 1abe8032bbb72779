"""A cleaned copy of the dataset as a manifest (`lra export`, outside the DVC graph).

The manifest is in the `manifest` source's format (pipeline.sources.manifest), so the
cleaned labels feed any training code, this pipeline included (`data.source: manifest`,
`data.root: <the file>`, `noise.kind: none`). Columns:

    path            image path relative to the manifest's folder
    label           int64    the exported label (after the policy)
    split           string   the pipeline's split (train / val / test / test_<name>)
    clean_label     int64?   the clean label where known, else null. The column is always
                             written: the manifest source then takes `label` as observed
                             (possibly noisy) labels and injects no noise of its own
    original_label  int64    the label the model was trained on (labels.parquet's
                             observed_label)
    label_name      string   class name of `label`
    is_label_issue  bool     the decision: the report's scorer disagrees with the original
                             label (the model, or the cross-fitted linear probe where the
                             model was below it on validation: report.json `scored_by`)
    sample_id       int64    the pipeline's sample id

Policies (applied to the train split; val and test rows are never changed):
    keep     every row, labels unchanged
    relabel  flagged train rows take the issues table's predicted label (the model's
             prediction when read from predictions.parquet)
    drop     flagged train rows are left out

Decisions come from an issues table: data/report/label_issues.parquet (`is_label_issue`,
optional `predicted_label`) when present, else data/evaluate/predictions.parquet
(flagged = `predicted` != `observed`). Sources that keep pixels in the prepared table
(digits, cifar10, cifar100) have no image files: their images are written as PNG files
to `<manifest stem>_images/<sample_id>.png` beside the manifest.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.artifacts import (check_output_file, read_table, reading, require,
                                write_table_or_csv)
from pipeline.errors import ArtifactError, ConfigError
from pipeline.tables import UNKNOWN, Labels, Prepared

log = logging.getLogger(__name__)

POLICIES = ("relabel", "drop", "keep")
SUFFIXES = (".csv", ".parquet", ".pq")
REPORT_ISSUES = Path("data/report/label_issues.parquet")
PREDICTIONS = Path("data/evaluate/predictions.parquet")


@dataclass(frozen=True)
class Decisions:
    """Per row of the labels table: flagged (N,) bool (train rows only) and suggested
    (N,) int64, the model's label (UNKNOWN where it gave none)."""

    flagged: np.ndarray
    suggested: np.ndarray
    source: str


def default_issues(predictions: Path = PREDICTIONS) -> Path:
    """The report's label-issue table when present, else evaluate's `predictions`."""
    return REPORT_ISSUES if REPORT_ISSUES.is_file() else predictions


def _by_sample(table: pa.Table, column: str, sample_id: np.ndarray, fill: int | bool,
               dtype: type) -> np.ndarray:
    """`column` of `table` laid out by the labels' sample ids (fill where absent)."""
    out = np.full(len(sample_id), fill, dtype=dtype)
    ids = table.column("sample_id").to_numpy()
    pos = np.searchsorted(sample_id, ids)
    ok = (pos < len(sample_id)) & (sample_id[np.minimum(pos, len(sample_id) - 1)] == ids)
    if not ok.all():
        raise ArtifactError(f"issues table: {int((~ok).sum())} sample id(s) not in the "
                            "labels table; it belongs to another run")
    values = table.column(column)
    values = values.fill_null(fill) if values.null_count else values
    out[pos] = values.to_numpy(zero_copy_only=False).astype(dtype)
    return out


def _read_issues(path: Path) -> pa.Table:
    """The issues table: Parquet, or CSV by the suffix (a table the user edited or made
    with another tool, in the label_issues columns)."""
    if Path(path).suffix.lower() != ".csv":
        return read_table(path, "issues table")[0]
    import pyarrow.csv as pacsv

    with reading(require(path, "issues table"), "issues table", "the tool that wrote it"):
        return pacsv.read_csv(path)


def read_decisions(issues: Path, labels: Labels, *, predictions: Path = PREDICTIONS
                   ) -> Decisions:
    """Which train labels the model disputes, and what it suggests instead."""
    table = _read_issues(issues)
    names = table.column_names
    train = labels.split == "train"
    if "sample_id" not in names:
        raise ArtifactError(f"issues table {issues} lacks a sample_id column")
    if "is_label_issue" in names:
        flagged = _by_sample(table, "is_label_issue", labels.sample_id, False, bool)
        if "given_label" in names:  # a table of another run's labels must not be applied
            given = _by_sample(table, "given_label", labels.sample_id, UNKNOWN, np.int64)
            listed = given != UNKNOWN
            if not np.array_equal(given[listed], labels.observed[listed]):
                raise ArtifactError(
                    f"{issues}: `given_label` differs from the labels table's observed_label "
                    f"in {int((given[listed] != labels.observed[listed]).sum())} row(s): it "
                    "was made from other labels; rerun `uv run dvc repro` (or pass --labels)")
        if "predicted_label" in names:
            suggested = _by_sample(table, "predicted_label", labels.sample_id, UNKNOWN,
                                   np.int64)
        else:
            pred, _ = read_table(predictions, "predictions", columns=("sample_id", "predicted"),
                                 required=("sample_id", "predicted"))
            suggested = _by_sample(pred, "predicted", labels.sample_id, UNKNOWN, np.int64)
    elif "predicted" in names and "observed" in names:
        suggested = _by_sample(table, "predicted", labels.sample_id, UNKNOWN, np.int64)
        observed = _by_sample(table, "observed", labels.sample_id, UNKNOWN, np.int64)
        if not np.array_equal(observed[suggested != UNKNOWN],
                              labels.observed[suggested != UNKNOWN]):
            raise ArtifactError(f"{issues}: `observed` differs from the labels table's "
                                "observed_label; rerun `uv run dvc repro`")
        flagged = (suggested != UNKNOWN) & (suggested != labels.observed)
    else:
        raise ArtifactError(f"issues table {issues} has neither `is_label_issue` nor "
                            f"`predicted` + `observed` (has {', '.join(names)})")
    flagged &= train
    missing = flagged & (suggested == UNKNOWN)
    if missing.any():
        raise ArtifactError(f"issues table {issues}: {int(missing.sum())} flagged row(s) "
                            "have no predicted label")
    return Decisions(flagged, suggested, str(issues))


def apply_policy(policy: str, labels: Labels, decisions: Decisions
                 ) -> tuple[np.ndarray, np.ndarray]:
    """-> (kept row positions (n,) int64, exported label of each kept row (n,) int64)."""
    if policy not in POLICIES:
        raise ConfigError(f"--policy: unknown value {policy!r}; valid: {', '.join(POLICIES)}")
    label = labels.observed.copy()
    keep = np.ones(len(label), dtype=bool)
    if policy == "relabel":
        label[decisions.flagged] = decisions.suggested[decisions.flagged]
    elif policy == "drop":
        keep = ~decisions.flagged
    rows = np.flatnonzero(keep)
    return rows, label[rows]


def _publish_dir(tmp: Path, target: Path) -> None:
    """Replace the folder `target` with `tmp` (two renames; the old one is removed)."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old.{os.getpid()}")
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def image_paths(prepared: Prepared, rows: np.ndarray, out: Path) -> list[str]:
    """Paths of the rows' images relative to the manifest's folder. Rows that hold
    image bytes are written as PNG files to <stem>_images/ beside the manifest."""
    from pipeline.sources.common import relative_to_root

    table = prepared.table
    paths = table.column("path").to_pylist()
    sample_ids = table.column("sample_id").to_pylist()
    images = table.column("image")
    folder = out.parent / f"{out.stem}_images"
    root = Path(prepared.image_root) if prepared.image_root is not None else None
    result: list[str] = []
    tmp: Path | None = None
    try:
        for i in rows:
            path = paths[i]
            if path is not None:
                full = Path(path) if root is None else root / path
                result.append(relative_to_root(full, out.parent))
                continue
            data = images[int(i)].as_py()
            if data is None:
                raise ArtifactError(f"prepared row {int(i)} has neither image bytes nor a path")
            if tmp is None:
                out.parent.mkdir(parents=True, exist_ok=True)
                tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp",
                                            dir=out.parent))
            name = f"{sample_ids[i]:07d}.png"
            (tmp / name).write_bytes(data)
            result.append(f"{folder.name}/{name}")
        if tmp is not None:
            os.chmod(tmp, 0o755)
            _publish_dir(tmp, folder)
            tmp = None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return result


def manifest_table(*, prepared: Prepared, labels: Labels, decisions: Decisions,
                   rows: np.ndarray, label: np.ndarray, paths: list[str]) -> pa.Table:
    """The exported manifest: one row per kept sample. rows: (M,) int64 positions in the
    labels table; label: (M,) int64 the exported labels; paths: M image paths. Columns:
    path, label, split, clean_label (null where unknown), original_label (the observed
    one), label_name, is_label_issue (disputed) and sample_id."""
    clean = labels.clean[rows]
    names = prepared.class_names
    return pa.table({
        "path": pa.array(paths, type=pa.string()),
        "label": pa.array(label, type=pa.int64()),
        "split": pa.array(list(labels.split[rows]), type=pa.string()),
        "clean_label": pa.array(clean, type=pa.int64(), mask=clean == UNKNOWN),
        "original_label": pa.array(labels.observed[rows], type=pa.int64()),
        "label_name": pa.array([names[i] for i in label], type=pa.string()),
        "is_label_issue": pa.array(decisions.flagged[rows], type=pa.bool_()),
        "sample_id": pa.array(labels.sample_id[rows], type=pa.int64()),
    })


def check_out(out: Path) -> None:
    if out.suffix.lower() not in SUFFIXES:
        raise ConfigError(f"--out {str(out)!r}: a manifest ends in {', '.join(SUFFIXES)} "
                          "(the suffix picks CSV or Parquet)")
    check_output_file(out, "--out")


def write_manifest(table: pa.Table, out: Path, *, metadata: dict) -> None:
    """CSV or Parquet by the suffix, atomically."""
    check_out(out)
    write_table_or_csv(table, out, metadata=metadata)
