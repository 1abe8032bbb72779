"""What each artifact was built from, so a stage that reads two artifacts together can
refuse a pair that does not belong together (32-d embeddings with neighbours found in
a 64-d index; labels of another noise seed than the retrieval table's).

Every artifact records
    fingerprint   a hash of its content (Parquet tables: every column's values; the
                  FAISS index: its file's bytes), 16 hex digits; and
    built_from    {input name: stamp} for the artifacts its stage read, a stamp being
                  {"fingerprint", "rows"[, "dim"]} of that input.
Parquet tables keep both in the schema's key-value metadata, the index in index.json
beside it, the checkpoint in its `info`. Fingerprints hold no timestamps and no paths,
so reruns stay byte-identical.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.errors import ArtifactError

FINGERPRINT = "fingerprint"
BUILT_FROM = "built_from"
DIGITS = 16
WHAT = {"prepared": "prepared table", "retrieval": "retrieval table", "index": "FAISS index"}


def _type_name(t: pa.DataType) -> str:
    """A type's name without list child-field names (Parquet reads `item` back as
    `element`)."""
    if pa.types.is_fixed_size_list(t):
        return f"fixed_size_list[{_type_name(t.value_type)}][{t.list_size}]"
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return f"list[{_type_name(t.value_type)}]"
    return str(t)


def _update(h: Any, column: pa.Array) -> None:
    """Feed one column to the hash without copying its values (buffers are hashed in
    place: an embeddings table of 1M x 768 costs no second copy)."""
    h.update(_type_name(column.type).encode())
    if column.null_count:
        h.update(column.is_null().to_numpy(zero_copy_only=False))
    else:
        h.update(b"-")
    t = column.type
    if pa.types.is_fixed_size_list(t) or pa.types.is_list(t) or pa.types.is_large_list(t):
        if not pa.types.is_fixed_size_list(t):
            h.update(np.ascontiguousarray(column.value_lengths().fill_null(0)))
        _update(h, column.flatten())
    elif pa.types.is_string(t) or pa.types.is_binary(t) or pa.types.is_large_string(t) \
            or pa.types.is_large_binary(t):
        for value in column.to_pylist():
            data = b"" if value is None else (value.encode() if isinstance(value, str)
                                              else value)
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)
    elif pa.types.is_null(t):
        h.update(len(column).to_bytes(8, "little"))
    else:
        if column.null_count:
            column = column.fill_null(False if pa.types.is_boolean(t) else 0)
        h.update(np.ascontiguousarray(column.to_numpy(zero_copy_only=False)))


def table_fingerprint(table: pa.Table) -> str:
    """Hash of a table's column names, types and values (metadata and chunk layout
    left out): equal tables give equal fingerprints."""
    h = hashlib.sha256()
    for name, column in zip(table.column_names, table.columns):
        h.update(name.encode() + b"\0")
        _update(h, column.combine_chunks())
    return h.hexdigest()[:DIGITS]


def file_fingerprint(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()[:DIGITS]


def fingerprint_of(*parts: Any) -> str:
    """Hash of JSON-able parts (for artifacts defined by their inputs and settings)."""
    import json

    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:DIGITS]


@dataclass(frozen=True)
class Ref:
    """An artifact as a lineage check sees it. name: its input name in `built_from`
    ("embeddings"); what: how messages name it; stage: the command that rebuilds it."""

    name: str
    what: str
    path: Path
    stage: str
    meta: dict[str, Any]
    rows: int | None = None
    dim: int | None = None
    built_from: dict[str, Any] = field(default_factory=dict)

    @property
    def fingerprint(self) -> str | None:
        value = self.meta.get(FINGERPRINT)
        return str(value) if value else None

    def stamp(self) -> dict[str, Any]:
        """What a downstream artifact records of this one."""
        if self.fingerprint is None:
            raise ArtifactError(f"{self.what} at {self.path} has no fingerprint (written "
                                f"before lineage was recorded); rerun `{self.stage}`")
        out: dict[str, Any] = {FINGERPRINT: self.fingerprint}
        if self.rows is not None:
            out["rows"] = int(self.rows)
        if self.dim is not None:
            out["dim"] = int(self.dim)
        return out


def ref(name: str, what: str, path: str | Path, stage: str, meta: dict[str, Any], *,
        rows: int | None = None, dim: int | None = None) -> Ref:
    built = meta.get(BUILT_FROM)
    return Ref(name, what, Path(path), stage, meta, rows, dim,
               built if isinstance(built, dict) else {})


def _describe(stamp: dict[str, Any]) -> str:
    """"<fingerprint> (N rows, dimension D)"."""
    extra = [f"{stamp['rows']} rows" if "rows" in stamp else "",
             f"dimension {stamp['dim']}" if "dim" in stamp else ""]
    shown = ", ".join(e for e in extra if e)
    return f"{stamp.get(FINGERPRINT)}" + (f" ({shown})" if shown else "")


def check_built_from(consumer: Ref, *inputs: Ref) -> None:
    """`consumer` must have been built from exactly these `inputs` (their fingerprints);
    ArtifactError naming both artifacts and the stage to rerun otherwise."""
    for inp in inputs:
        current = inp.stamp()
        recorded = consumer.built_from.get(inp.name)
        if not isinstance(recorded, dict):
            raise ArtifactError(f"{consumer.what} at {consumer.path} does not record which "
                                f"{inp.name} it was built from (written before lineage was "
                                f"recorded); rerun `{consumer.stage}`")
        if recorded.get(FINGERPRINT) != current[FINGERPRINT]:
            raise ArtifactError(
                f"{consumer.what} at {consumer.path} was built from {inp.what} "
                f"{_describe(recorded)}, not from {inp.path}, which is "
                f"{_describe(current)}; rerun `{consumer.stage}` (or `uv run dvc repro`)")


def check_same_origin(a: Ref, b: Ref) -> None:
    """Two artifacts read together must agree on every input they both record (e.g.
    embeddings and labels built from the same prepared table)."""
    for name in sorted(set(a.built_from) & set(b.built_from)):
        fa = (a.built_from[name] or {}).get(FINGERPRINT)
        fb = (b.built_from[name] or {}).get(FINGERPRINT)
        if fa != fb:
            raise ArtifactError(
                f"{a.what} at {a.path} and {b.what} at {b.path} were built from "
                f"different {WHAT.get(name, name)}s ({fa} vs {fb}); rerun `{a.stage}` or "
                f"`{b.stage}`, whichever is stale (or `uv run dvc repro`)")
