"""pipeline.splits (seeded stratified split) and the offline digits source."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.config import DataConfig
from pipeline.sources import PREPARED_SCHEMA, load_source
from pipeline.splits import stratified_split


def per_class_counts(labels: np.ndarray, split: np.ndarray) -> dict[int, dict[str, int]]:
    return {int(c): {s: int(((labels == c) & (split == s)).sum())
                     for s in ("train", "val", "test")}
            for c in np.unique(labels)}


# --------------------------------------------------------------------------- splits
def test_stratified_proportions_per_class():
    labels = np.repeat([0, 1, 2, 5], [100, 50, 30, 7])
    labels = np.random.default_rng(0).permutation(labels)
    split = stratified_split(labels, val_fraction=0.2, test_fraction=0.1, seed=0)
    assert split.dtype == object and split.shape == labels.shape
    assert set(split) == {"train", "val", "test"}
    expected = {0: (100, 20, 10), 1: (50, 10, 5), 2: (30, 6, 3), 5: (7, 1, 1)}
    for cls, (n, val, test) in expected.items():
        got = per_class_counts(labels, split)[cls]
        assert got == {"train": n - val - test, "val": val, "test": test}, cls


def test_stratified_rounds_to_nearest():
    labels = np.zeros(7, dtype=np.int64)
    split = stratified_split(labels, val_fraction=0.3, test_fraction=0.2, seed=0)
    # 7 * 0.2 = 1.4 -> 1 test; 7 * 0.3 = 2.1 -> 2 val
    assert (split == "test").sum() == 1 and (split == "val").sum() == 2
    split = stratified_split(np.zeros(9, dtype=np.int64), val_fraction=0.3,
                             test_fraction=0.3, seed=0)
    # 9 * 0.3 = 2.7 -> 3 each
    assert (split == "test").sum() == 3 and (split == "val").sum() == 3


def test_stratified_is_deterministic_and_seeds_differ():
    labels = np.repeat(np.arange(5), 40)
    a = stratified_split(labels, val_fraction=0.2, test_fraction=0.2, seed=1)
    b = stratified_split(labels, val_fraction=0.2, test_fraction=0.2, seed=1)
    c = stratified_split(labels, val_fraction=0.2, test_fraction=0.2, seed=2)
    assert a.tolist() == b.tolist()
    assert a.tolist() != c.tolist()
    # a different seed reshuffles, but keeps the per-class counts
    assert per_class_counts(labels, a) == per_class_counts(labels, c)


def test_stratified_split_is_a_random_subset_within_class():
    labels = np.zeros(1000, dtype=np.int64)
    split = stratified_split(labels, val_fraction=0.2, test_fraction=0.2, seed=0)
    test_idx = np.flatnonzero(split == "test")
    assert len(test_idx) == 200
    # not the first 200 rows: the shuffle happens inside the class
    assert test_idx.max() > 500 and test_idx.min() < 500


# --------------------------------------------------------------------------- digits
@pytest.fixture(scope="module")
def digits_ds():
    return load_source(DataConfig(source="digits", seed=0))


def test_digits_table(digits_ds):
    from sklearn.datasets import load_digits

    ds = digits_ds
    t = ds.table
    assert t.num_rows == 1797
    assert t.schema.equals(PREPARED_SCHEMA)
    assert ds.class_names == [str(i) for i in range(10)] and ds.num_classes == 10
    assert ds.labels_are_clean is True
    assert ds.rejects.num_rows == 0
    np.testing.assert_array_equal(t.column("sample_id").to_numpy(), np.arange(1797))
    label = t.column("label").to_numpy()
    np.testing.assert_array_equal(label, load_digits().target)
    np.testing.assert_array_equal(t.column("clean_label").to_numpy(), label)
    assert t.column("path").null_count == 1797
    assert t.column("image").null_count == 0


def test_digits_png_decodes_to_scaled_grey_levels(digits_ds):
    from sklearn.datasets import load_digits

    images = load_digits().images  # (1797, 8, 8) in 0..16
    expected = np.rint(images * 255.0 / 16.0).astype(np.uint8)
    assert expected.max() == 255 and expected.min() == 0
    pngs = digits_ds.table.column("image").to_pylist()
    for i in (0, 1, 100, 1796) + tuple(range(2, 1797, 97)):
        img = Image.open(io.BytesIO(pngs[i]))
        assert img.format == "PNG" and img.mode == "L" and img.size == (8, 8)
        np.testing.assert_array_equal(np.asarray(img), expected[i])
    # grey level 8 of 16 -> 127.5 -> 128 (rounded, not truncated)
    assert np.rint(8 * 255.0 / 16.0) == 128


def test_digits_split_counts(digits_ds):
    t = digits_ds.table
    split = np.asarray(t.column("split").to_pylist(), dtype=object)
    label = t.column("label").to_numpy()
    counts = per_class_counts(label, split)
    for cls, got in counts.items():
        n = int((label == cls).sum())
        test, val = int(round(n * 0.2)), int(round(n * 0.2))
        assert got == {"train": n - test - val, "val": val, "test": test}
    total = {s: int((split == s).sum()) for s in ("train", "val", "test")}
    assert sum(total.values()) == 1797
    assert total["test"] == total["val"] == 359  # sum over classes of round(0.2 * n_c)
    assert total["train"] == 1079
    # the split is the one stratified_split gives for this seed
    assert split.tolist() == stratified_split(label, val_fraction=0.2, test_fraction=0.2,
                                              seed=0).tolist()


def test_digits_split_follows_config():
    ds = load_source(DataConfig(source="digits", seed=1, val_fraction=0.1, test_fraction=0.3))
    split = np.asarray(ds.table.column("split").to_pylist(), dtype=object)
    label = ds.table.column("label").to_numpy()
    assert split.tolist() == stratified_split(label, val_fraction=0.1, test_fraction=0.3,
                                              seed=1).tolist()
    assert abs((split == "test").mean() - 0.3) < 0.01
    assert abs((split == "val").mean() - 0.1) < 0.01
