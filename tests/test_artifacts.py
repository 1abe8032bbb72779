"""pipeline.artifacts: atomic writes, all-or-nothing stage outputs, deterministic Parquet,
offset-safe list columns, JSON / CSV writers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.artifacts import (ROW_GROUP_BYTES, ROW_GROUP_ROWS, StageWriter, TableStream,
                                atomic_path, embedding_array, fixed_list_array, iter_chunks,
                                list_column_to_numpy, read_json, row_group_rows,
                                read_metadata, read_table, require, write_csv, write_json,
                                write_table)
from pipeline.errors import ArtifactError


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


# --------------------------------------------------------------------------- atomic files
def test_atomic_path_publishes_on_success(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp != target
        tmp.write_text("done")
        assert not target.exists()  # nothing visible before the block ends
    assert target.read_text() == "done"
    assert leftovers(target.parent) == []


def test_atomic_path_leaves_nothing_on_exception(tmp_path):
    target = tmp_path / "out.txt"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert not target.exists()
    assert leftovers(tmp_path) == []


def test_atomic_path_keeps_old_content_on_exception(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("new but partial")
            raise RuntimeError
    assert target.read_text() == "old"
    assert leftovers(tmp_path) == []


def test_stage_writer_publishes_all(tmp_path):
    a, b = tmp_path / "x" / "a.txt", tmp_path / "y" / "b.txt"
    with StageWriter() as out:
        out.path(a).write_text("A")
        out.path(b).write_text("B")
        assert not a.exists() and not b.exists()
    assert a.read_text() == "A" and b.read_text() == "B"
    assert leftovers(a.parent) == [] and leftovers(b.parent) == []


def test_stage_writer_publishes_nothing_on_exception(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    b.write_text("old b")
    with pytest.raises(ValueError):
        with StageWriter() as out:
            out.path(a).write_text("A")
            out.path(b).write_text("B")
            raise ValueError("second half failed")
    assert not a.exists()
    assert b.read_text() == "old b"
    assert leftovers(tmp_path) == []


def test_stage_writer_with_table_and_json(tmp_path):
    table = pa.table({"x": pa.array([1, 2, 3], type=pa.int64())})
    with StageWriter() as out:
        write_table(table, out.path(tmp_path / "t.parquet"))
        write_json({"a": 1}, out.path(tmp_path / "m.json"))
    assert pq.read_table(tmp_path / "t.parquet").equals(table)
    assert read_json(tmp_path / "m.json", "metrics") == {"a": 1}
    assert leftovers(tmp_path) == []


def test_require(tmp_path):
    with pytest.raises(ArtifactError, match="missing embeddings"):
        require(tmp_path / "nope.parquet", "embeddings")
    p = tmp_path / "yes"
    p.write_text("")
    assert require(p, "thing") == p


# --------------------------------------------------------------------------- Parquet
def test_embedding_array_type_and_values():
    m = np.arange(12, dtype=np.float64).reshape(4, 3)
    arr = embedding_array(m)
    assert arr.type == pa.list_(pa.float32(), 3)
    assert len(arr) == 4
    np.testing.assert_array_equal(list_column_to_numpy(arr), m.astype(np.float32))
    assert list_column_to_numpy(arr).dtype == np.float32
    with pytest.raises(ValueError):
        embedding_array(np.zeros(5, dtype=np.float32))


def test_embedding_array_from_non_contiguous_input():
    m = np.arange(40, dtype=np.float32).reshape(5, 8)[:, ::2]  # a strided view
    np.testing.assert_array_equal(list_column_to_numpy(embedding_array(m)), m)


def test_list_column_to_numpy_is_offset_safe_on_slices():
    m = np.arange(30, dtype=np.float32).reshape(10, 3)
    arr = embedding_array(m)
    sliced = arr.slice(4, 3)
    assert sliced.offset == 4
    np.testing.assert_array_equal(list_column_to_numpy(sliced), m[4:7])
    # .values would ignore the offset: make sure the test would catch that mistake
    assert not np.array_equal(sliced.values.to_numpy()[:9].reshape(3, 3), m[4:7])


def test_list_column_to_numpy_chunked_and_dtype():
    m = np.arange(24, dtype=np.int64).reshape(8, 3)
    arr = fixed_list_array(m, pa.int64())
    chunked = pa.chunked_array([arr.slice(0, 3), arr.slice(3, 2), arr.slice(5, 3)])
    out = list_column_to_numpy(chunked, np.float32)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, m.astype(np.float32))


def test_list_column_with_nulls_is_rejected():
    values = pa.array(np.arange(6, dtype=np.float32))
    arr = pa.FixedSizeListArray.from_arrays(values, 2, mask=pa.array([False, True, False]))
    with pytest.raises(ArtifactError, match="null"):
        list_column_to_numpy(arr)


def _table(n: int = 1000, d: int = 8) -> pa.Table:
    rng = np.random.default_rng(0)
    return pa.table({
        "sample_id": pa.array(np.arange(n), type=pa.int64()),
        "split": pa.array(["train" if i % 3 else "val" for i in range(n)]),
        "embedding": embedding_array(rng.normal(size=(n, d))),
    })


def test_write_table_is_byte_identical(tmp_path):
    t = _table()
    meta = {"encoder": "pixels", "dim": 8, "nested": {"b": 1, "a": [1, 2]}}
    write_table(t, tmp_path / "a.parquet", metadata=meta)
    write_table(_table(), tmp_path / "b.parquet", metadata=json.loads(json.dumps(meta)))
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()
    # and a different table does not collide
    write_table(_table(999), tmp_path / "c.parquet", metadata=meta)
    assert (tmp_path / "a.parquet").read_bytes() != (tmp_path / "c.parquet").read_bytes()


def test_write_table_metadata_round_trip_and_compression(tmp_path):
    path = tmp_path / "t.parquet"
    meta = {"encoder": "open_clip", "dim": 8, "normalised": False, "weights": None,
            "class_names": ["a", "b"]}
    write_table(_table(), path, metadata=meta)
    table, got = read_table(path, "table", required=("sample_id", "embedding"))
    assert got == meta
    assert table.equals(_table().replace_schema_metadata(table.schema.metadata))
    md = pq.ParquetFile(path).metadata
    assert md.row_group(0).column(0).compression == "ZSTD"


def test_read_metadata_skips_arrow_keys_and_tolerates_non_json():
    schema = pa.schema([pa.field("x", pa.int64())],
                       metadata={b"ARROW:schema": b"xx", b"pandas": b"{}",
                                 b"plain": b"not json", b"num": b"3"})
    assert read_metadata(schema) == {"plain": "not json", "num": 3}


def test_write_table_uses_fixed_row_groups(tmp_path):
    path = tmp_path / "t.parquet"
    write_table(_table(250), path, row_group_rows=100)
    meta = pq.ParquetFile(path).metadata
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [100, 100, 50]


def test_read_table_errors(tmp_path):
    with pytest.raises(ArtifactError, match="missing labels"):
        read_table(tmp_path / "none.parquet", "labels")
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"this is not parquet at all")
    with pytest.raises(ArtifactError, match="is damaged"):
        read_table(bad, "labels")
    good = tmp_path / "good.parquet"
    write_table(_table(10), good)
    with pytest.raises(ArtifactError) as exc:
        read_table(good, "labels", required=("sample_id", "observed_label"))
    assert "observed_label" in str(exc.value) and "embedding" in str(exc.value)
    table, _ = read_table(good, "labels", columns=["split"])
    assert table.column_names == ["split"]


# --------------------------------------------------------------------------- JSON / CSV
def test_write_json_rounds_sorts_and_converts(tmp_path):
    path = tmp_path / "m.json"
    write_json({"b": np.float32(0.1234567891), "a": {"z": np.int64(3), "y": float("nan")},
                "c": [1.23456789, np.float64(2.0)], "d": "text", "e": True}, path)
    text = path.read_text()
    assert text.endswith("\n")
    got = json.loads(text)
    assert got == {"a": {"y": None, "z": 3}, "b": 0.123457, "c": [1.234568, 2.0],
                   "d": "text", "e": True}
    assert list(got) == ["a", "b", "c", "d", "e"]
    assert list(got["a"]) == ["y", "z"]
    # same data in another insertion order: identical bytes
    path2 = tmp_path / "m2.json"
    write_json({"e": True, "d": "text", "c": [1.23456789, 2.0],
                "a": {"y": float("nan"), "z": 3}, "b": np.float32(0.1234567891)}, path2)
    assert path.read_bytes() == path2.read_bytes()


def test_read_json_errors(tmp_path):
    with pytest.raises(ArtifactError, match="missing"):
        read_json(tmp_path / "no.json", "metrics")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ArtifactError, match="is damaged"):
        read_json(bad, "metrics")


def test_write_csv(tmp_path):
    path = tmp_path / "p.csv"
    write_csv([{"step": 1, "loss": np.float32(0.5), "acc": None},
               {"step": np.int64(2), "loss": 0.12345678, "acc": 0.9}], path)
    assert path.read_text() == "step,loss,acc\n1,0.5,\n2,0.123457,0.9\n"
    with pytest.raises(ValueError):
        write_csv([], tmp_path / "empty.csv")
    assert not (tmp_path / "empty.csv").exists()


@pytest.mark.parametrize("chunk", [1, 5, 8, 9, 64])
def test_table_stream_writes_the_bytes_of_write_table(tmp_path, chunk):
    """Streaming chunk by chunk regroups rows into fixed row groups: the file is the one
    write_table makes from the whole table, whatever the chunk size."""
    t = pa.table({"a": np.arange(40), "v": fixed_list_array(
        np.arange(80, dtype=np.float32).reshape(40, 2), pa.float32())})
    write_table(t, tmp_path / "whole.parquet", metadata={"m": [1, 2]}, row_group_rows=8)
    with TableStream(tmp_path / "stream.parquet", t.schema, metadata={"m": [1, 2]},
                     row_group_rows=8) as stream:
        for start in range(0, 40, chunk):
            stream.write(t.slice(start, chunk))
    assert (tmp_path / "whole.parquet").read_bytes() == (tmp_path / "stream.parquet").read_bytes()
    assert pq.ParquetFile(tmp_path / "stream.parquet").metadata.num_row_groups == 5


def test_table_stream_of_no_rows_matches_write_table(tmp_path):
    schema = pa.schema([("a", pa.int64())])
    write_table(schema.empty_table(), tmp_path / "whole.parquet")
    with TableStream(tmp_path / "stream.parquet", schema):
        pass
    assert (tmp_path / "whole.parquet").read_bytes() == (tmp_path / "stream.parquet").read_bytes()


def test_iter_chunks_are_exact_and_row_aligned_across_row_group_layouts(tmp_path):
    """Two tables of the same rows but different row groups yield the same chunk
    boundaries, so stages can zip them row by row."""
    t = _table(100)
    write_table(t, tmp_path / "a.parquet", row_group_rows=7)
    write_table(t, tmp_path / "b.parquet", row_group_rows=64)
    for chunk in (1, 10, 13, 100, 1000):
        a = list(iter_chunks(tmp_path / "a.parquet", ["sample_id"], chunk))
        b = list(iter_chunks(tmp_path / "b.parquet", ["sample_id"], chunk))
        sizes = [len(x) for x in a]
        assert sizes == [len(x) for x in b]
        assert sizes == [chunk] * (100 // chunk) + ([100 % chunk] if 100 % chunk else [])
        ids = np.concatenate([x.column("sample_id").to_numpy() for x in a])
        np.testing.assert_array_equal(ids, t.column("sample_id").to_numpy())
    with pytest.raises(ValueError):
        next(iter_chunks(tmp_path / "a.parquet", ["sample_id"], 0))


def test_row_group_rows_bounds_the_bytes_of_a_group():
    assert row_group_rows(16) == ROW_GROUP_ROWS  # narrow tables: the usual 65,536 rows
    assert row_group_rows(4 * 768 + 16) == 4096  # 768-d float32 embeddings: 12 MiB
    assert row_group_rows(10**9) == 1024  # never fewer rows than that
    for width in (1, 100, 3000, 40_000):
        rows = row_group_rows(width)
        assert rows & (rows - 1) == 0 and (rows * width <= ROW_GROUP_BYTES or rows == 1024)
