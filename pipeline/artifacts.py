"""All artifact I/O: Parquet tables, JSON metrics, CSV plots, FAISS indexes, checkpoints.

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

from pipeline.errors import ArtifactError

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


# --------------------------------------------------------------------------- reading
READ_ERRORS = (OSError, EOFError, ValueError, UnicodeDecodeError, pa.ArrowException)
"""What the readers raise on a damaged file (thrift, zstd, CRC, JSON, UTF-8 errors)."""


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def damaged(path: str | Path, what: str, rebuild: str, exc: BaseException | str
            ) -> ArtifactError:
    """The one-line error for an artifact that cannot be read back."""
    why = exc if isinstance(exc, str) else _first_line(exc)
    fix = f"`{rebuild}` rebuilds it" if rebuild.startswith("lra ") else f"rerun {rebuild}"
    return ArtifactError(f"{what} at {path} is damaged ({why}); {fix}")


@contextlib.contextmanager
def reading(path: str | Path, what: str, rebuild: str) -> Iterator[None]:
    """Map a damaged file's read errors (READ_ERRORS) to one ArtifactError naming the file
    and the stage that rebuilds it. Our own ArtifactErrors pass through."""
    try:
        yield
    except ArtifactError:
        raise
    except READ_ERRORS as exc:
        raise damaged(path, what, rebuild, exc) from None


def require(path: str | Path, what: str) -> Path:
    """Fail with a clear message when an upstream artifact is missing."""
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"missing {what}: {path} (run the upstream stage first, "
                            "e.g. `uv run dvc repro`)")
    return path


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


def read_metadata(schema: pa.Schema) -> dict[str, Any]:
    """Decode the JSON-valued key-value metadata written by `write_table`."""
    out: dict[str, Any] = {}
    for key, value in (schema.metadata or {}).items():
        name = key.decode()
        if name.startswith("ARROW:") or name == "pandas":
            continue
        try:
            out[name] = json.loads(value)
        except json.JSONDecodeError:
            out[name] = value.decode()
    return out


def read_schema(path: str | Path, what: str, rebuild: str) -> pa.Schema:
    path = require(path, what)
    with reading(path, what, rebuild):
        return pq.read_schema(path)


def read_table(path: str | Path, what: str, *, columns: Sequence[str] | None = None,
               required: Sequence[str] = (), rebuild: str = "the stage that writes it"
               ) -> tuple[pa.Table, dict[str, Any]]:
    """Read a Parquet artifact, checking that it exists and has the required columns;
    a damaged file is an ArtifactError naming it and `rebuild`, the command that
    rebuilds it. Page checksums are verified.

    Returns (table, metadata) where metadata is `read_metadata` of its schema.
    """
    schema = read_schema(path, what, rebuild)
    missing = [c for c in required if c not in schema.names]
    if missing:
        raise ArtifactError(f"{what} at {path} lacks column(s) {', '.join(missing)} "
                            f"(has {', '.join(schema.names)}); `{rebuild}` rebuilds it")
    with reading(path, what, rebuild):
        table = pq.read_table(path, columns=list(columns) if columns else None,
                              page_checksum_verification=True)
        return table, read_metadata(schema)


def iter_row_groups(path: str | Path, columns: Sequence[str], *, what: str = "table",
                    rebuild: str = "the stage that writes it") -> Iterator[pa.Table]:
    """`columns` of a Parquet file, one row group at a time (page checksums verified;
    a damaged file: ArtifactError naming `what` and `rebuild`). Without pre-buffering:
    pyarrow's default reads ahead the column chunks of many row groups at once (measured:
    3.6x the memory of reading a 12 MiB group at a time)."""
    with reading(path, what, rebuild):
        reader = pq.ParquetFile(path, pre_buffer=False, page_checksum_verification=True)
        groups = reader.num_row_groups
    for i in range(groups):
        with reading(path, what, rebuild):
            group = reader.read_row_group(i, columns=list(columns))
        yield group


def check_intact(path: str | Path, columns: Sequence[str], *, what: str, rebuild: str
                 ) -> None:
    """Read (and drop) `columns` row group by row group, verifying their pages: for the
    columns a stage does not use, so damage anywhere in the file is refused, not only in
    what the stage reads. Holds one row group at a time."""
    if columns:
        for _ in iter_row_groups(path, columns, what=what, rebuild=rebuild):
            pass
        pa.default_memory_pool().release_unused()


def iter_chunks(path: str | Path, columns: Sequence[str], chunk_rows: int, *,
                what: str = "table", rebuild: str = "the stage that writes it"
                ) -> Iterator[pa.Table]:
    """Stream `columns` of a Parquet file as tables of exactly `chunk_rows` rows (the last
    may be shorter), whatever the file's row groups: two files read with the same
    chunk_rows yield row-aligned chunks. Holds at most a chunk and one row group."""
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    pending: list[pa.Table] = []
    count = 0
    for group in iter_row_groups(path, columns, what=what, rebuild=rebuild):
        pending.append(group)
        count += group.num_rows
        while count >= chunk_rows:
            table = pa.concat_tables(pending)
            yield table.slice(0, chunk_rows)
            rest = table.slice(chunk_rows)
            pending, count = [rest], rest.num_rows
    if count:
        yield pa.concat_tables(pending)


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


def read_json(path: str | Path, what: str, rebuild: str = "the stage that writes it"
              ) -> dict[str, Any]:
    path = require(path, what)
    with reading(path, what, rebuild):
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise damaged(path, what, rebuild, "not a JSON object")
    return data


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
