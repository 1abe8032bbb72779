"""Reading artifacts back, with the checks that turn a missing or damaged file into one
ArtifactError naming the file and the command that rebuilds it (`lra ...`), never a
library traceback: Parquet tables (page checksums verified), row groups, JSON.

`pipeline.artifacts` re-exports these, so callers import every artifact helper from there.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import ArtifactError

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



# --------------------------------------------------------------------------- JSON
def read_json(path: str | Path, what: str, rebuild: str = "the stage that writes it"
              ) -> dict[str, Any]:
    path = require(path, what)
    with reading(path, what, rebuild):
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise damaged(path, what, rebuild, "not a JSON object")
    return data
