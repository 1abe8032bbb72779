"""`manifest`: a table of image paths and labels; data.root is the file itself.

Format: CSV (with a header row) or Parquet, chosen by the suffix (.csv / .parquet / .pq).
Columns (others are ignored):

    path         string, required   image path relative to the manifest's directory
                                    (or absolute)
    label        required           the label as shipped: either integer class indices
                                    0..C-1 (class names "0".."C-1", C = max label + 1) or
                                    class names (class index = position in the sorted
                                    list of all names in label and clean_label)
    split        string, optional   "train" | "val" | "test" | "test_<name>"
    clean_label  optional           the clean label where known (same kind as label);
                                    null where unknown

Splits: without a split column, `pipeline.splits.stratified_split` (data.val_fraction,
data.test_fraction, data.seed). With one, its values are used; if no row is "val" (or
"test"), val (test) is carved out of train, seeded and stratified by label, with
data.val_fraction (data.test_fraction).

Noise: without a clean_label column the labels are taken as clean (labels_are_clean=True,
clean_label = label; synthetic noise is injected later). A clean_label column, even an
all-null one, declares real noise: labels_are_clean=False and clean_label as given.

Paths: the prepared `path` column keeps the manifest's paths, relative to the manifest's
directory, which is what `pipeline.sources.files.image_root(cfg)` returns for this
source. Rows keep the manifest order. A null path or label, an unknown split value, a
label column that mixes integers and class names, or a path listed twice with different
labels is an ArtifactError (a malformed manifest); unreadable images are skipped and
reported.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from pipeline.config import DataConfig
from pipeline.errors import ArtifactError, ConfigError
from pipeline.sources import PreparedDataset
from pipeline.sources.common import NO_LABEL, Candidates, finish

SOURCE = "manifest"
SUFFIXES = (".csv", ".parquet", ".pq")


def _read(path: Path) -> pl.DataFrame:
    if path.suffix.lower() not in SUFFIXES:
        raise ConfigError(f"data.root: manifest {str(path)!r} must end in "
                          f"{', '.join(SUFFIXES)}")
    if not path.is_file():
        raise ArtifactError(f"{SOURCE}: manifest file not found: {path}; expected a CSV or "
                            "Parquet file with columns path, label[, split, clean_label]")
    try:
        if path.suffix.lower() == ".csv":
            return pl.read_csv(path, infer_schema_length=None)
        return pl.read_parquet(path)
    except Exception as exc:  # noqa: BLE001
        raise ArtifactError(f"{SOURCE}: cannot read manifest {path}: "
                            f"{type(exc).__name__}: {str(exc).splitlines()[0]}") from None


def _nonnull(col: pl.Series) -> pl.Series:
    return col.drop_nulls()


_INTEGER = r"^\s*[+-]?[0-9]+\s*$"


def _as_integers(col: pl.Series | None, path: Path) -> pl.Series | None:
    """A string column of integer literals ("0", "11") as Int64; a column that mixes
    them with class names ("dog" among 0..11) is refused: read as names, the integers
    would be sorted as text ("0", "1", "10", ...) and every label silently remapped."""
    if col is None or col.dtype != pl.String:
        return col
    values = col.drop_nulls()
    is_int = values.str.contains(_INTEGER)
    if len(values) == 0 or not is_int.any():
        return col
    if is_int.all():
        return col.str.strip_chars().cast(pl.Int64)
    name = values.filter(~is_int)[0]
    number = values.filter(is_int)[0]
    row = int((col == name).arg_true()[0]) + 1
    raise ArtifactError(f"{SOURCE}: {path}: column {col.name} mixes integer class indices "
                        f"({number!r}) and class names ({name!r} in data row {row}); use "
                        "one kind for every row")


def _check_duplicates(df: pl.DataFrame, path: Path) -> None:
    """A path listed twice with two different labels: which one is the image's?"""
    conflicts = (df.group_by("path", maintain_order=True)
                 .agg(pl.col("label").n_unique().alias("labels"),
                      pl.col("label").unique(maintain_order=True).alias("values"))
                 .filter(pl.col("labels") > 1))
    if len(conflicts):
        first = conflicts.row(0, named=True)
        shown = ", ".join(repr(v) for v in first["values"][:3])
        raise ArtifactError(f"{SOURCE}: {path}: {len(conflicts)} image path(s) listed with "
                            f"different labels, e.g. {first['path']!r} ({shown}); "
                            "list each image once")


def _labels(df: pl.DataFrame, path: Path) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    """-> label (N,) int64, clean (N,) int64 with NO_LABEL for null (None if no column),
    class names."""
    label = _as_integers(df["label"], path)
    clean = _as_integers(df["clean_label"] if "clean_label" in df.columns else None, path)
    if clean is not None and clean.null_count() == len(clean):
        clean = pl.Series("clean_label", [None] * len(df), dtype=label.dtype)
    if label.dtype.is_integer():
        if clean is not None and not clean.dtype.is_integer():
            raise ArtifactError(f"{SOURCE}: {path}: label holds integers but clean_label "
                                f"holds {clean.dtype}; use the same kind in both")
        values = [label] + ([_nonnull(clean)] if clean is not None else [])
        low = min(int(v.min()) for v in values if len(v))
        if low < 0:
            raise ArtifactError(f"{SOURCE}: {path}: negative label {low}")
        num = max(int(v.max()) for v in values if len(v)) + 1
        names = [str(i) for i in range(num)]
        y = label.cast(pl.Int64).to_numpy()
        c = None if clean is None else clean.cast(pl.Int64).fill_null(NO_LABEL).to_numpy()
        return y, c, names
    if label.dtype == pl.String:
        if clean is not None and clean.dtype != pl.String:
            raise ArtifactError(f"{SOURCE}: {path}: label holds class names but clean_label "
                                f"holds {clean.dtype}; use the same kind in both")
        names = sorted(set(label.to_list()) | (set(_nonnull(clean).to_list())
                                               if clean is not None else set()))
        mapping = pl.DataFrame({"name": names, "index": np.arange(len(names), dtype=np.int64)})
        y = label.replace_strict(mapping["name"], mapping["index"], return_dtype=pl.Int64)
        c = None if clean is None else clean.replace_strict(
            mapping["name"], mapping["index"], default=NO_LABEL, return_dtype=pl.Int64)
        return y.to_numpy(), None if c is None else c.to_numpy(), names
    raise ArtifactError(f"{SOURCE}: {path}: label column has type {label.dtype}; expected "
                        "integer class indices or class-name strings")


def load(cfg: DataConfig) -> PreparedDataset:
    path = Path(cfg.root)
    df = _read(path)
    missing = [c for c in ("path", "label") if c not in df.columns]
    if missing:
        raise ArtifactError(f"{SOURCE}: {path} lacks column(s) {', '.join(missing)}; found "
                            f"{', '.join(df.columns) or 'none'}")
    if len(df) == 0:
        raise ArtifactError(f"{SOURCE}: {path} has no rows")
    for col in ("path", "label") + (("split",) if "split" in df.columns else ()):
        nulls = df[col].is_null()
        if nulls.any():
            row = int(nulls.arg_true()[0])
            raise ArtifactError(f"{SOURCE}: {path}: null {col} in data row {row + 1}")
    _check_duplicates(df, path)
    label, clean, class_names = _labels(df, path)

    if "split" in df.columns:
        split = df["split"].cast(pl.String).to_numpy().astype(object)
        valid = (split == "train") | (split == "val") | (split == "test") | np.array(
            [s.startswith("test_") and len(s) > 5 for s in split], dtype=bool)
        if not valid.all():
            bad = split[~valid][0]
            raise ArtifactError(f"{SOURCE}: {path}: unknown split {bad!r}; valid: train, val, "
                                "test, test_<name>")
        val_fraction = 0.0 if (split == "val").any() else cfg.val_fraction
        test_fraction = 0.0 if (split == "test").any() else cfg.test_fraction
    else:
        split = np.full(len(df), "train", dtype=object)
        val_fraction, test_fraction = cfg.val_fraction, cfg.test_fraction

    rows = Candidates()
    rows.path = df["path"].cast(pl.String).to_list()
    rows.split = split.tolist()
    rows.label = label.tolist()
    rows.clean_label = (label if clean is None else clean).tolist()
    return finish(rows, root=path.parent, source=SOURCE, class_names=class_names,
                  labels_are_clean=clean is None, val_fraction=val_fraction,
                  test_fraction=test_fraction, seed=cfg.seed)
