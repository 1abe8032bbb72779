"""pipeline.tables: typed round trips of the embeddings / labels / retrieval / prepared
artifacts, and the checks that reject corrupt or mismatched upstream tables."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.artifacts import embedding_array, write_table
from pipeline.errors import ArtifactError
from pipeline.images import encode_png
from pipeline.sources import make_table
from pipeline.lineage import table_fingerprint
from pipeline.neighbours import read_candidates, read_retrieval, write_retrieval
from pipeline.tables import (UNKNOWN, check_same_samples, open_embeddings, read_embeddings,
                             read_labels, read_prepared, write_embeddings, write_labels)

SPLIT = np.array(["train", "train", "val", "train", "test", "train"], dtype=object)


def vectors(n: int = 6, d: int = 4, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


# --------------------------------------------------------------------------- embeddings
def test_embeddings_round_trip(tmp_path):
    path = tmp_path / "emb.parquet"
    v = vectors()
    write_embeddings(path, sample_id=np.arange(6), split=SPLIT, vectors=v,
                     provenance={"encoder": "pixels", "normalised": False})
    emb = read_embeddings(path)
    np.testing.assert_array_equal(emb.vectors, v)
    assert emb.vectors.dtype == np.float32 and emb.dim == 4
    np.testing.assert_array_equal(emb.sample_id, np.arange(6))
    assert emb.split.tolist() == SPLIT.tolist()
    assert emb.meta == {"encoder": "pixels", "normalised": False, "dim": 4,
                        "fingerprint": table_fingerprint(pq.read_table(path))}
    np.testing.assert_array_equal(emb.rows("train"), [0, 1, 3, 5])
    np.testing.assert_array_equal(emb.rows("test"), [4])
    assert emb.rows("nope").size == 0
    schema = pq.read_schema(path)
    assert schema.field("embedding").type == pa.list_(pa.float32(), 4)
    assert schema.field("sample_id").type == pa.int64()


def test_embeddings_write_is_deterministic(tmp_path):
    for name in ("a", "b"):
        write_embeddings(tmp_path / f"{name}.parquet", sample_id=np.arange(6), split=SPLIT,
                         vectors=vectors(), provenance={"encoder": "pixels"})
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_embeddings_reject_non_finite_rows(tmp_path, bad):
    path = tmp_path / "emb.parquet"
    v = vectors()
    v[3, 2] = bad
    write_embeddings(path, sample_id=np.arange(6), split=SPLIT, vectors=v, provenance={})
    with pytest.raises(ArtifactError) as exc:
        read_embeddings(path)
    msg = str(exc.value)
    assert "1 row(s)" in msg and "sample_id 3" in msg


def test_embeddings_reject_wrong_column_type(tmp_path):
    path = tmp_path / "emb.parquet"
    flat = pa.array(vectors().astype(np.float64).reshape(-1))
    table = pa.table({"sample_id": pa.array(np.arange(6), type=pa.int64()),
                      "split": pa.array(list(SPLIT)),
                      "embedding": pa.FixedSizeListArray.from_arrays(flat, 4)})
    write_table(table, path, metadata={"dim": 4})
    with pytest.raises(ArtifactError, match="fixed_size_list<float32>"):
        read_embeddings(path)
    # a variable-length list is wrong too
    var = pa.array([list(r) for r in vectors()], type=pa.list_(pa.float32()))
    write_table(table.set_column(2, "embedding", var), path)
    with pytest.raises(ArtifactError, match="embedding"):
        read_embeddings(path)


def test_embeddings_reject_dim_metadata_mismatch(tmp_path):
    path = tmp_path / "emb.parquet"
    table = pa.table({"sample_id": pa.array(np.arange(6), type=pa.int64()),
                      "split": pa.array(list(SPLIT)),
                      "embedding": embedding_array(vectors())})
    write_table(table, path, metadata={"dim": 5})
    with pytest.raises(ArtifactError, match="dim 5"):
        read_embeddings(path)


@pytest.mark.parametrize("ids", [[1, 2, 3, 4, 5, 6], [0, 2, 1, 3, 4, 5], [0, 1, 2, 3, 4, 4]])
def test_embeddings_reject_sample_ids_that_are_not_positions(tmp_path, ids):
    path = tmp_path / "emb.parquet"
    write_embeddings(path, sample_id=np.array(ids), split=SPLIT, vectors=vectors(),
                     provenance={})
    with pytest.raises(ArtifactError, match="0..N-1"):
        read_embeddings(path)


def test_embeddings_missing_column_or_file(tmp_path):
    with pytest.raises(ArtifactError, match="missing embeddings"):
        read_embeddings(tmp_path / "none.parquet")
    path = tmp_path / "emb.parquet"
    write_table(pa.table({"sample_id": pa.array([0, 1]), "split": pa.array(["a", "b"])}), path)
    with pytest.raises(ArtifactError, match="embedding"):
        read_embeddings(path)


# --------------------------------------------------------------------------- labels
def test_labels_round_trip_with_unknown_clean_labels(tmp_path):
    path = tmp_path / "labels.parquet"
    clean = np.array([0, 1, 2, UNKNOWN, 1, 2])
    observed = np.array([0, 2, 2, 1, 1, 0])
    write_labels(path, sample_id=np.arange(6), split=SPLIT, clean=clean, observed=observed,
                 metadata={"num_classes": 3, "noise_kind": "symmetric"})
    raw = pq.read_table(path)
    assert raw.column("clean_label").to_pylist() == [0, 1, 2, None, 1, 2]
    assert raw.column("is_corrupted").to_pylist() == [False, True, False, None, False, True]
    labels = read_labels(path)
    np.testing.assert_array_equal(labels.clean, clean)
    np.testing.assert_array_equal(labels.observed, observed)
    assert labels.clean.dtype == np.int64 and labels.observed.dtype == np.int64
    assert labels.num_classes == 3
    assert labels.meta["noise_kind"] == "symmetric"
    assert labels.split.tolist() == SPLIT.tolist()
    np.testing.assert_array_equal(labels.sample_id, np.arange(6))


def test_labels_all_clean_unknown(tmp_path):
    path = tmp_path / "labels.parquet"
    write_labels(path, sample_id=np.arange(3), split=np.array(["train"] * 3, dtype=object),
                 clean=np.full(3, UNKNOWN), observed=np.array([1, 0, 1]),
                 metadata={"num_classes": 2})
    labels = read_labels(path)
    np.testing.assert_array_equal(labels.clean, [UNKNOWN] * 3)
    assert pq.read_table(path).column("is_corrupted").null_count == 3


@pytest.mark.parametrize("observed, clean, name", [
    ([0, 1, 3], [0, 1, 2], "observed_label"),
    ([0, -1, 2], [0, 1, 2], "observed_label"),
    ([0, 1, 2], [0, 5, 2], "clean_label"),
    ([0, 1, 2], [0, -2, 2], "clean_label"),
])
def test_labels_out_of_range_are_rejected(tmp_path, observed, clean, name):
    path = tmp_path / "labels.parquet"
    table = pa.table({"sample_id": pa.array([0, 1, 2], type=pa.int64()),
                      "split": pa.array(["train"] * 3),
                      "clean_label": pa.array(clean, type=pa.int64()),
                      "observed_label": pa.array(observed, type=pa.int64())})
    write_table(table, path, metadata={"num_classes": 3})
    with pytest.raises(ArtifactError) as exc:
        read_labels(path)
    assert name in str(exc.value) and "[0, 3)" in str(exc.value)


def test_labels_need_num_classes(tmp_path):
    path = tmp_path / "labels.parquet"
    write_labels(path, sample_id=np.arange(2), split=np.array(["train", "val"], dtype=object),
                 clean=np.array([0, 1]), observed=np.array([0, 1]), metadata={})
    with pytest.raises(ArtifactError, match="num_classes"):
        read_labels(path)


# --------------------------------------------------------------------------- retrieval
def _retrieval_inputs():
    is_train = SPLIT == "train"
    rng = np.random.default_rng(0)
    k, c = 3, 4
    neighbour_ids = rng.integers(0, 6, size=(6, k))
    distances = rng.random(size=(6, k)).astype(np.float32)
    neighbour_labels = rng.integers(0, c, size=(6, k))
    own = rng.integers(0, c, size=6)
    candidates = np.concatenate([own[:, None], neighbour_labels], axis=1)
    distribution = rng.random(size=(6, c)).astype(np.float32)
    agreement = rng.random(size=6).astype(np.float32)
    return dict(sample_id=np.arange(6), split=SPLIT, neighbour_ids=neighbour_ids,
                distances=distances, neighbour_labels=neighbour_labels,
                candidates=candidates, distribution=distribution, agreement=agreement,
                is_train=is_train, metadata={"k": k, "factory": "Flat"})


def _check_retrieval(r, inputs):
    is_train = inputs["is_train"]
    assert r.k == 3
    np.testing.assert_array_equal(r.neighbour_ids, inputs["neighbour_ids"])
    np.testing.assert_array_equal(r.distances, inputs["distances"])
    np.testing.assert_array_equal(r.neighbour_labels, inputs["neighbour_labels"])
    assert r.neighbour_ids.dtype == np.int64 and r.distances.dtype == np.float32
    assert r.candidates.shape == (6, 4) and r.candidates.dtype == np.int64
    np.testing.assert_array_equal(r.candidates[is_train], inputs["candidates"][is_train])
    assert (r.candidates[~is_train] == UNKNOWN).all()
    assert r.split.tolist() == SPLIT.tolist()
    np.testing.assert_array_equal(r.sample_id, np.arange(6))


def test_retrieval_round_trip_non_train_candidates_unknown(tmp_path):
    path = tmp_path / "nb.parquet"
    inputs = _retrieval_inputs()
    write_retrieval(path, **inputs)
    r = read_retrieval(path)
    _check_retrieval(r, inputs)
    assert r.meta == {"k": 3, "factory": "Flat",
                      "fingerprint": table_fingerprint(pq.read_table(path))}
    raw = pq.read_table(path)
    assert raw.column("candidate_labels").null_count == 2
    agree = raw.column("own_label_agreement").to_pylist()
    assert [a is None for a in agree] == [False, False, True, False, True, False]
    np.testing.assert_allclose(raw.column("label_distribution").combine_chunks()
                               .flatten().to_numpy().reshape(6, 4), inputs["distribution"])


def test_retrieval_read_across_row_groups(tmp_path):
    """Null candidate rows in several chunks (one per row group) must not shift values."""
    path = tmp_path / "nb.parquet"
    inputs = _retrieval_inputs()
    write_retrieval(path, **inputs)
    table = pq.read_table(path)
    pq.write_table(table, path, row_group_size=2)
    assert pq.ParquetFile(path).num_row_groups == 3
    assert pq.read_table(path).column("candidate_labels").num_chunks == 3
    _check_retrieval(read_retrieval(path), inputs)
    ids, candidates = read_candidates(path)  # training's two columns only
    np.testing.assert_array_equal(ids, inputs["sample_id"])
    np.testing.assert_array_equal(candidates, read_retrieval(path).candidates)


def test_retrieval_missing_columns(tmp_path):
    path = tmp_path / "nb.parquet"
    write_table(pa.table({"sample_id": pa.array([0]), "split": pa.array(["train"])}), path)
    with pytest.raises(ArtifactError, match="neighbour_ids"):
        read_retrieval(path)
    with pytest.raises(ArtifactError, match="candidate_labels"):
        read_candidates(path)


# --------------------------------------------------------------------------- misc
def test_check_same_samples():
    check_same_samples(np.arange(4), np.arange(4), "embeddings", "labels")
    with pytest.raises(ArtifactError, match="embeddings \\(4 rows\\) and labels \\(3 rows\\)"):
        check_same_samples(np.arange(4), np.arange(3), "embeddings", "labels")
    with pytest.raises(ArtifactError, match="different samples"):
        check_same_samples(np.arange(4), np.array([0, 1, 3, 2]), "a", "b")


def test_prepared_round_trip_and_missing_metadata(tmp_path):
    img = encode_png(np.zeros((2, 2), dtype=np.uint8))
    table = make_table(split=np.array(["train", "test"]), label=np.array([1, 0]),
                       clean_label=None, image=[img, img])
    path = tmp_path / "samples.parquet"
    write_table(table, path, metadata={"class_names": ["a", "b"], "labels_are_clean": False,
                                       "image_root": None})
    prep = read_prepared(path)
    assert prep.class_names == ["a", "b"] and prep.num_classes == 2
    assert prep.labels_are_clean is False and prep.image_root is None
    assert prep.table.column("clean_label").null_count == 2
    write_table(table, path, metadata={"class_names": ["a", "b"]})
    with pytest.raises(ArtifactError, match="labels_are_clean"):
        read_prepared(path)


def test_open_embeddings_reads_rows_chunk_by_chunk(tmp_path):
    """Vectors are read by record batch: any increasing row subset, any chunk size, the
    same values as the whole table; ids, splits and metadata are there before any vector."""
    from pipeline import tables

    path = tmp_path / "emb.parquet"
    n = 50
    v = vectors(n, 3, seed=4)
    split = np.array(["train", "val", "test", "train", "train"] * 10, dtype=object)
    # Row groups of 8 rows, so reads cross group boundaries.
    table = pa.table({"sample_id": pa.array(np.arange(n)), "split": pa.array(list(split)),
                      "embedding": embedding_array(v)})
    write_table(table, path, metadata={"dim": 3}, row_group_rows=8)
    emb = tables.open_embeddings(path)
    assert emb.dim == 3 and {k: v for k, v in emb.meta.items() if k != "fingerprint"} == {"dim": 3} and emb.split.tolist() == split.tolist()
    for rows in (None, emb.rows("train"), np.array([0, 7, 8, 49]), np.array([], np.int64)):
        want = v if rows is None else v[rows]
        np.testing.assert_array_equal(emb.read_rows(rows), want)
    starts, parts = zip(*emb.iter_chunks(chunk_rows=6))
    assert list(starts) == list(range(0, n, 6)) and all(len(p) <= 6 for p in parts)
    np.testing.assert_array_equal(np.concatenate(parts), v)
    with pytest.raises(ValueError, match="increasing"):
        emb.read_rows(np.array([3, 1]))


def test_open_embeddings_rejects_non_finite_chunk_with_its_rows(tmp_path):
    path = tmp_path / "emb.parquet"
    v = vectors(20, 2)
    v[13, 1] = np.inf
    write_embeddings(path, sample_id=np.arange(20), split=np.array(["train"] * 20, object),
                     vectors=v, provenance={})
    emb = open_embeddings(path)  # ids and splits only: the bad vector is not read yet
    with pytest.raises(ArtifactError, match=r"1 row\(s\) among rows 10-19 .*sample_id 13"):
        list(emb.iter_chunks(chunk_rows=10))
