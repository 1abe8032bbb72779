"""All artifact I/O: Parquet tables, JSON metrics, CSV plots, FAISS indexes, checkpoints.
(Reading back, with the damaged-file checks, lives in `pipeline.reading`; its helpers are
re-exported here.)

Every write is atomic: data goes to a temporary file beside the target and is renamed
into place only when complete, so an interrupted stage never leaves a partial artifact.
`StageWriter` extends this to a whole stage: nothing is published unless every output
was written.

Tables are written deterministically (zstd, fixed row-group size, no timestamps), so a
rerun with unchanged inputs gives byte-identical files and DVC skips downstream stages.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import ArtifactError, ConfigError
from pipeline.reading import (READ_ERRORS, check_intact, damaged, iter_chunks,  # noqa: F401
                              iter_row_groups, read_json, read_metadata, read_schema,
                              read_table, reading, require)

ROW_GROUP_ROWS = 65_536
"""Rows per Parquet row group (at most): later stages can stream a table group by group."""
ROW_GROUP_BYTES = 16 * 2**20
"""Target decoded size of a row group of a wide table: reading one costs a few times this
(compressed bytes, decoded pages, arrays), so tens of MiB whatever the width."""


def row_group_rows(bytes_per_row: int) -> int:
    """Rows per row group for rows of about `bytes_per_row` bytes: the largest power of two
    within ROW_GROUP_BYTES, between 1,024 and ROW_GROUP_ROWS (65,536 for narrow tables,
    4,096 for 768-d float32 embeddings)."""
    rows = ROW_GROUP_ROWS
    while rows > 1024 and rows * bytes_per_row > ROW_GROUP_BYTES:
        rows //= 2
    return rows


# --------------------------------------------------------------------------- atomic files
def check_output_file(path: Path, option: str) -> None:
    """Refuse, before any work, an output file path that cannot be written: an existing
    folder, or one below an existing file. ConfigError naming the option."""
    if path.is_dir():
        raise ConfigError(f"{option} {str(path)!r} is a folder; give a file name in it")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"{option} {str(path)!r}: {str(parent)!r} is a file, "
                                  "not a folder")
            break


def _file_mode() -> int:
    """The mode a plain open() would give a new file (0o666 less the umask)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_FILE_MODE = _file_mode()


def _temp_beside(target: Path) -> Path:
    """A new empty temporary file in target's folder, with the usual file mode (mkstemp
    makes it 0600, which would leave artifacts unreadable to the rest of a team)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    os.chmod(tmp, _FILE_MODE)
    return Path(tmp)


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; rename it onto `target` on success only."""
    tmp_path = _temp_beside(Path(target))
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


class StageWriter:
    """Collects a stage's outputs in temporary files and publishes them all at the end.

    with StageWriter() as out:
        write_table(table, out.path("data/x/table.parquet"))
        write_json(metrics, out.path("data/x/metrics.json"))
    # all renamed into place here; on an exception none are, and the temporaries go.
    """

    def __init__(self) -> None:
        self._pending: list[tuple[Path, Path]] = []

    def path(self, target: str | Path) -> Path:
        tmp = _temp_beside(Path(target))
        self._pending.append((tmp, Path(target)))
        return tmp

    def __enter__(self) -> StageWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if exc_type is None:
                for tmp, target in self._pending:
                    os.replace(tmp, target)
        finally:
            for tmp, _ in self._pending:
                tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------- Parquet
def embedding_array(matrix: np.ndarray) -> pa.FixedSizeListArray:
    """(N, D) float32 -> fixed_size_list<float32>[D] without copying row by row."""
    matrix = np.ascontiguousarray(matrix, dtype=np.float32)
    if matrix.ndim != 2:
        raise ValueError(f"expected an (N, D) matrix, got shape {matrix.shape}")
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), matrix.shape[1])


def fixed_list_array(matrix: np.ndarray, value_type: pa.DataType) -> pa.FixedSizeListArray:
    """(N, K) numeric array -> fixed_size_list<value_type>[K]."""
    matrix = np.ascontiguousarray(matrix)
    flat = pa.array(matrix.reshape(-1), type=value_type)
    return pa.FixedSizeListArray.from_arrays(flat, matrix.shape[1])


def list_column_to_numpy(column: pa.ChunkedArray | pa.Array, dtype: Any = None) -> np.ndarray:
    """fixed_size_list<T>[D] column -> (N, D) array (offset-safe: flatten, not .values)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    width = column.type.list_size
    if column.null_count:
        raise ArtifactError(f"list column has {column.null_count} null rows")
    values = column.flatten().to_numpy(zero_copy_only=False)
    out = values.reshape(-1, width)
    return out.astype(dtype, copy=False) if dtype is not None else out


def _with_metadata(schema: pa.Schema, metadata: dict[str, Any] | None) -> pa.Schema:
    """`metadata` values stored as JSON strings in the schema's key-value metadata."""
    if not metadata:
        return schema
    merged = dict(schema.metadata or {})
    merged.update({k.encode(): json.dumps(v, sort_keys=True).encode()
                   for k, v in metadata.items()})
    return schema.with_metadata(merged)


# Page checksums: garbage over a data page is an error on reading, never wrong values.
_PARQUET_OPTIONS = {"compression": "zstd", "write_statistics": True,
                    "write_page_checksum": True}


def write_table(table: pa.Table, path: str | Path, *, metadata: dict[str, Any] | None = None,
                row_group_rows: int = ROW_GROUP_ROWS, fingerprint: bool = False) -> None:
    """Write `table` to Parquet atomically; `metadata` values are stored as JSON strings
    in the schema's key-value metadata (provenance: encoder, dim, source, ...).
    fingerprint: also store the hash of the table's values (`pipeline.lineage`) under
    "fingerprint", replacing any given in `metadata`."""
    if fingerprint:
        from pipeline.lineage import FINGERPRINT, table_fingerprint

        metadata = {**(metadata or {}), FINGERPRINT: table_fingerprint(table)}
    table = table.replace_schema_metadata(_with_metadata(table.schema, metadata).metadata)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, row_group_size=row_group_rows, **_PARQUET_OPTIONS)


def write_table_or_csv(table: pa.Table, path: str | Path, *,
                       metadata: dict[str, Any] | None = None) -> None:
    """A user-facing table: CSV when `path` ends in .csv (no metadata), else Parquet
    with `metadata` (`write_table`); atomic either way."""
    path = Path(path)
    if path.suffix.lower() == ".csv":
        import pyarrow.csv as pacsv

        with atomic_path(path) as tmp:
            pacsv.write_csv(table, tmp)
    else:
        write_table(table, path, metadata=metadata)


class TableStream:
    """Write a Parquet table chunk by chunk, holding at most one row group in memory.

    Rows are regrouped into row groups of `row_group_rows` whatever the chunk sizes, so
    the file is byte-identical to `write_table` of the whole table. Use it on a path
    from `StageWriter.path` or `atomic_path`: the caller publishes the file. `schema`
    must match the chunks' (without metadata).
    """

    def __init__(self, path: str | Path, schema: pa.Schema, *,
                 metadata: dict[str, Any] | None = None,
                 row_group_rows: int = ROW_GROUP_ROWS) -> None:
        self._schema = _with_metadata(schema, metadata)
        self._writer = pq.ParquetWriter(str(path), self._schema, **_PARQUET_OPTIONS)
        self._rows = row_group_rows
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._written = False

    def write(self, chunk: pa.Table) -> None:
        self._pending.append(chunk.replace_schema_metadata(self._schema.metadata))
        self._pending_rows += len(chunk)
        if self._pending_rows >= self._rows:
            table = pa.concat_tables(self._pending)
            full = len(table) // self._rows * self._rows
            self._writer.write_table(table.slice(0, full), row_group_size=self._rows)
            self._written = True
            rest = table.slice(full)
            self._pending, self._pending_rows = [rest], len(rest)

    def close(self) -> None:
        if self._pending_rows or not self._written:  # an empty table still gets its group
            table = (pa.concat_tables(self._pending) if self._pending
                     else self._schema.empty_table())
            self._writer.write_table(table, row_group_size=self._rows)
        self._pending, self._pending_rows = [], 0
        self._writer.close()

    def __enter__(self) -> TableStream:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close()


# --------------------------------------------------------------------------- JSON / CSV
def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return None if math.isnan(value) else round(value, 6)
    if isinstance(value, np.integer):
        return int(value)
    return value


def write_json(data: dict[str, Any], path: str | Path) -> None:
    """Write a JSON document atomically, keys sorted, floats rounded to 6 places
    (so reruns compare equal and `dvc metrics diff` stays readable)."""
    text = json.dumps(_json_safe(data), indent=2, sort_keys=True) + "\n"
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_csv(rows: Sequence[dict[str, Any]], path: str | Path) -> None:
    """Write rows of equal keys as CSV atomically (DVC plots read it)."""
    if not rows:
        raise ValueError("no rows to write")
    header = list(rows[0])
    lines = [",".join(header)]
    for row in rows:
        cells = []
        for key in header:
            value = _json_safe(row[key])
            cells.append("" if value is None else str(value))
        lines.append(",".join(cells))
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
