"""Predictions on new images with a trained model (`lra predict`, outside the DVC graph).

The images are embedded with exactly the encoder recorded in the embeddings table's
provenance (the one the model was trained on), scored with `DiffusionScorer` (the
checkpoint's feature normaliser, the mean-start DDIM trajectory, its readout rule and,
when asked, the stochastic vote), and written as a table:

    path            string   the image's path as listed: relative to DIR, or the
                             manifest's `path` value (relative to the manifest's folder)
    predicted       int64    class id (the mean-start DDIM trajectory: what evaluate
                             reports as `predicted`)
    predicted_name  string   class name (class_names of the labels / predictions table)
    vote            int64?   majority class of `samples` stochastic trajectories (null
                             without them)
    confidence      float32? fraction of those trajectories that voted for `vote`

Inputs: a directory (an ImageFolder-like tree or a flat folder: every image file below
it, recursively, by suffix, in sorted path order) or a manifest (CSV / Parquet with a
`path` column, the `manifest` source's format; other columns are ignored).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.artifacts import check_output_file, write_table_or_csv
from pipeline.config import ENCODERS, EmbedConfig
from pipeline.encoders import Encoder, RuntimeOptions, build_encoder, iter_encode
from pipeline.errors import ArtifactError, ConfigError
from pipeline.sources import make_table

log = logging.getLogger(__name__)

MANIFEST_SUFFIXES = (".csv", ".parquet", ".pq")
OUT_SUFFIXES = (".csv", ".parquet", ".pq")
CHUNK_ROWS = 4096
"""Images embedded and scored per chunk (rounded up to a multiple of the batch size)."""

PREDICTION_SCHEMA = pa.schema([
    pa.field("path", pa.string(), nullable=False),
    pa.field("predicted", pa.int64(), nullable=False),
    pa.field("predicted_name", pa.string(), nullable=False),
    pa.field("vote", pa.int64()),
    pa.field("confidence", pa.float32()),
])


@dataclass(frozen=True)
class ImageList:
    """paths: N image paths relative to `root` (or absolute), in prediction order."""

    root: Path
    paths: list[str]

    def table(self) -> pa.Table:
        """A prepared-like table (PREPARED_SCHEMA: path set, labels unknown) that the
        encoders read."""
        n = len(self.paths)
        return make_table(split=np.full(n, "test", dtype=object),
                          label=np.zeros(n, dtype=np.int64), clean_label=None,
                          path=self.paths)


def list_images(images: str | Path) -> ImageList:
    """A directory (every image file below it, sorted by relative path) or a manifest
    (CSV / Parquet with a `path` column; rows in file order)."""
    from pipeline.sources.common import scan_images

    images = Path(images)
    if not images.exists():
        raise ArtifactError(f"--images {images}: no such folder or manifest file")
    if images.is_dir():
        paths = [p.relative_to(images).as_posix() for p in scan_images(images)]
        if not paths:
            raise ArtifactError(f"--images {images}: no image files below this folder")
        return ImageList(images, paths)
    if images.suffix.lower() not in MANIFEST_SUFFIXES:
        raise ConfigError(f"--images {str(images)!r}: expected a folder of images or a "
                          f"manifest ending in {', '.join(MANIFEST_SUFFIXES)}")
    if not images.is_file():
        raise ArtifactError(f"--images {images}: no such manifest file")
    import polars as pl

    try:
        df = (pl.read_csv(images, infer_schema_length=None) if images.suffix.lower() == ".csv"
              else pl.read_parquet(images))
    except Exception as exc:  # noqa: BLE001 - any reader failure: an unreadable manifest
        raise ArtifactError(f"--images {images}: cannot read the manifest: "
                            f"{type(exc).__name__}: {str(exc).splitlines()[0]}") from None
    if "path" not in df.columns:
        raise ArtifactError(f"--images {images}: the manifest lacks a `path` column (has "
                            f"{', '.join(df.columns) or 'none'})")
    if df["path"].null_count():
        row = int(df["path"].is_null().arg_true()[0])
        raise ArtifactError(f"--images {images}: null path in data row {row + 1}")
    if len(df) == 0:
        raise ArtifactError(f"--images {images}: the manifest has no rows")
    return ImageList(images.parent, df["path"].cast(pl.String).to_list())


def check_readable(images: ImageList) -> None:
    """ArtifactError naming the first unreadable image (and how many there are)."""
    from pipeline.sources.common import check_images

    reasons = check_images([str(images.root / p) for p in images.paths])
    bad = [(p, r) for p, r in zip(images.paths, reasons) if r is not None]
    if bad:
        raise ArtifactError(f"{len(bad)} of {len(images.paths)} image(s) cannot be read, "
                            f"e.g. {bad[0][0]}: {bad[0][1]}")


def encoder_config(provenance: dict[str, Any], *, weights_dir: str | None = None
                   ) -> EmbedConfig:
    """The EmbedConfig that rebuilds the encoder recorded in an embeddings table's
    provenance (encoder, model, pretrained). `weights_dir`: where open_clip weights are
    cached (embed.cache_dir); it changes where they are found, not the numbers."""
    encoder = provenance.get("encoder")
    if encoder not in ENCODERS:
        raise ArtifactError(f"embeddings provenance names encoder {encoder!r}; known: "
                            f"{', '.join(ENCODERS)}; rerun `lra embed`")
    if encoder == "pixels":
        return EmbedConfig(encoder="pixels", cache_dir=weights_dir)
    return EmbedConfig(encoder=encoder, model=provenance.get("model"),
                       pretrained=provenance.get("pretrained"), cache_dir=weights_dir)


def _describe(encoder: Any, model: Any) -> str:
    return f"{encoder}" + (f" ({model})" if model else "")


def check_model_matches(provenance: dict[str, Any], dim: int, ckpt: dict[str, Any], *,
                        model_path: Path, embeddings_path: Path) -> None:
    """The model must have been trained on embeddings from this encoder and of this width:
    ArtifactError otherwise (one line naming both)."""
    info = ckpt.get("info", {})
    trained = (info.get("encoder"), info.get("model"))
    recorded = (provenance.get("encoder"), provenance.get("model"))
    if trained[0] is not None and trained != recorded:
        raise ArtifactError(
            f"{model_path} was trained on {_describe(*trained)} embeddings but "
            f"{embeddings_path} records the {_describe(*recorded)} encoder; pass the "
            "matching --embeddings / --model (or rerun `uv run dvc repro`)")
    expected = int(ckpt["spec"]["feature_dim_in"])
    if dim != expected:
        raise ArtifactError(f"{model_path} expects {expected}-d embeddings but "
                            f"{embeddings_path} holds {dim}-d ones; pass the matching "
                            "--embeddings / --model (or rerun `uv run dvc repro`)")


def class_names(num_classes: int, *candidates: Path) -> list[str]:
    """class_names from the first of the tables (labels, predictions) that has them for
    `num_classes` classes; "0".."C-1" if none does."""
    from pipeline.artifacts import read_metadata, read_schema

    for path in candidates:
        if Path(path).is_file():
            schema = read_schema(path, f"{path} (read for the class names)", "uv run dvc repro")
            names = read_metadata(schema).get("class_names")
            if isinstance(names, list) and len(names) == num_classes:
                return [str(n) for n in names]
    log.warning("no class names found in %s: using class ids as names",
                ", ".join(map(str, candidates)))
    return [str(i) for i in range(num_classes)]


def embed_chunks(encoder: Encoder, images: ImageList, *, runtime: RuntimeOptions,
                 expected_dim: int, chunk_rows: int = CHUNK_ROWS
                 ) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, (b, D) float32 embeddings) per chunk of about chunk_rows images
    (rounded up to a multiple of the batch size), in order."""
    from pipeline.embed_cache import aligned_chunk_rows, chunk_ranges

    table = images.table()
    ranges = chunk_ranges(table.num_rows, aligned_chunk_rows(chunk_rows, runtime.batch_size))
    for (start, _), vectors in zip(ranges, iter_encode(encoder, table, ranges,
                                                       root=str(images.root),
                                                       runtime=runtime)):
        if vectors.shape[1] != expected_dim:
            raise ArtifactError(f"the images give {vectors.shape[1]}-d embeddings but the "
                                f"model expects {expected_dim}-d ones (the pixels encoder "
                                "needs images of the training images' size and mode)")
        if not np.isfinite(vectors).all():
            raise ArtifactError("the encoder produced NaN or infinite embeddings")
        yield start, vectors


def prediction_rows(paths: list[str], predicted: np.ndarray, names: list[str],
                    vote: np.ndarray | None, confidence: np.ndarray | None) -> pa.Table:
    """predict's rows for one chunk (PREDICTION_SCHEMA). paths: M strings; predicted:
    (M,) int64 class ids; names: C class names; vote: (M,) int64 and confidence: (M,)
    float32 from the stochastic samples, or None (null columns) without them."""
    n = len(paths)
    return pa.table({
        "path": pa.array(paths, type=pa.string()),
        "predicted": pa.array(predicted, type=pa.int64()),
        "predicted_name": pa.array([names[i] for i in predicted], type=pa.string()),
        "vote": (pa.array(vote, type=pa.int64()) if vote is not None
                 else pa.nulls(n, pa.int64())),
        "confidence": (pa.array(confidence, type=pa.float32()) if confidence is not None
                       else pa.nulls(n, pa.float32())),
    }, schema=PREDICTION_SCHEMA)


def check_out_suffix(out: Path) -> None:
    if out.suffix.lower() not in OUT_SUFFIXES:
        raise ConfigError(f"--out {str(out)!r}: the suffix picks the format; use one of "
                          f"{', '.join(OUT_SUFFIXES)}")
    check_output_file(out, "--out")


def write_predictions(table: pa.Table, out: Path, *, metadata: dict[str, Any]) -> None:
    """Parquet (.parquet / .pq, with `metadata`) or CSV (.csv) by the suffix; atomic."""
    check_out_suffix(out)
    write_table_or_csv(table, out, metadata=metadata)

