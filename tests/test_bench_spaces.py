"""bench.spaces: the long-tailed digits space keeps the pipeline's table invariants."""

from __future__ import annotations

import numpy as np

from bench.spaces import LONG_TAIL_RATIO, _long_tailed
from pipeline.artifacts import write_table
from pipeline.lineage import check_built_from
from pipeline.sources import make_table
from pipeline.tables import open_embeddings, read_prepared, table_stamp, write_embeddings


def _source(folder, per_class=(40, 20, 8)):
    """A prepared table + embeddings with `per_class` train / val / test rows per class,
    each row's vector [sample_id, label] so rows can be traced after the cut."""
    classes = 10
    split, label = [], []
    for part, n in zip(("train", "val", "test"), per_class):
        for c in range(classes):
            split += [part] * n
            label += [c] * n
    split, label = np.array(split, dtype=object), np.array(label)
    n = len(label)
    (folder / "prepared").mkdir(parents=True)
    write_table(make_table(split=split, label=label, clean_label=label,
                           path=[f"img/{i}.png" for i in range(n)]),
                folder / "prepared/samples.parquet",
                metadata={"source": "test", "class_names": [str(c) for c in range(classes)],
                          "num_classes": classes, "labels_are_clean": True,
                          "image_root": None}, fingerprint=True)
    vectors = np.stack([np.arange(n), label], axis=1).astype(np.float32)
    write_embeddings(folder / "embeddings/embeddings.parquet",
                     sample_id=np.arange(n, dtype=np.int64), split=split, vectors=vectors,
                     provenance={"encoder": "test", "built_from": {
                         "prepared": table_stamp(folder / "prepared/samples.parquet")}})
    return folder


def test_long_tailed_space_cuts_train_and_val_by_class_and_keeps_test_whole(tmp_path):
    source = _source(tmp_path / "source")
    _long_tailed(tmp_path / "lt", source)
    prep = read_prepared(tmp_path / "lt/prepared/samples.parquet")
    emb = open_embeddings(tmp_path / "lt/embeddings/embeddings.parquet")
    split = np.asarray(prep.table.column("split").to_pylist(), dtype=object)
    label = prep.table.column("label").to_numpy()
    counts = {part: np.bincount(label[split == part], minlength=10)
              for part in ("train", "val", "test")}
    fraction = LONG_TAIL_RATIO ** (-np.arange(10) / 9)
    assert counts["train"].tolist() == np.maximum(1, np.round(40 * fraction)).tolist()
    assert counts["train"][0] / counts["train"][9] == LONG_TAIL_RATIO
    assert counts["val"].tolist() == np.maximum(1, np.round(20 * fraction)).tolist()
    assert counts["test"].tolist() == [8] * 10
    # Ids are row positions again, and every kept row brings its own vector and label.
    n = len(label)
    assert prep.table.column("sample_id").to_pylist() == list(range(n))
    assert emb.sample_id.tolist() == list(range(n)) and emb.split.tolist() == split.tolist()
    vectors = emb.read_rows()
    assert (vectors[:, 1] == label).all()
    old = vectors[:, 0].astype(int)
    assert (np.diff(old) > 0).all()  # the source's row order is kept
    source_split = np.asarray(read_prepared(source / "prepared/samples.parquet")
                              .table.column("split").to_pylist(), dtype=object)
    assert (source_split[old] == split).all()
    check_built_from(emb.ref(), prep.ref(tmp_path / "lt/prepared/samples.parquet"))
