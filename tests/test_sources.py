"""File-based dataset sources, each on a tiny fixture in the dataset's official layout."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from fixtures_datasets import (CLOTHING_NAMES, FOOD_CLASSES, corrupt, make_animal10n,
                               make_cifar10, make_cifar100, make_clothing1m, make_food101n,
                               make_imagefolder, make_manifest, make_webvision, truncate,
                               write_image)
from PIL import Image

from pipeline.config import DataConfig
from pipeline.errors import ArtifactError, ConfigError
from pipeline.sources import PREPARED_SCHEMA, REJECTS_SCHEMA, PreparedDataset, load_source
from pipeline.sources import common
from pipeline.sources.files import LOADERS, image_root


def load(source: str, root: Path | str, **kw) -> PreparedDataset:
    return load_source(DataConfig(source=source, root=str(root), **kw))


def counts(ds: PreparedDataset) -> dict[str, int]:
    split = ds.table["split"].to_pylist()
    return {s: split.count(s) for s in sorted(set(split))}


def column(ds: PreparedDataset, name: str, split: str | None = None) -> list:
    values = ds.table[name].to_pylist()
    if split is None:
        return values
    return [v for v, s in zip(values, ds.table["split"].to_pylist()) if s == split]


def check_common(ds: PreparedDataset, cfg_root: Path | None) -> None:
    """Schema, contiguous sample ids, label range, exactly one of image/path, paths
    resolvable under the image root."""
    t = ds.table
    assert t.schema.equals(PREPARED_SCHEMA)
    assert ds.rejects.schema.equals(REJECTS_SCHEMA)
    assert t["sample_id"].to_pylist() == list(range(t.num_rows))
    labels = np.array(column(ds, "label"))
    assert labels.min() >= 0 and labels.max() < ds.num_classes
    clean = [c for c in column(ds, "clean_label") if c is not None]
    assert all(0 <= c < ds.num_classes for c in clean)
    has_image = t["image"].is_valid().to_numpy(zero_copy_only=False)
    has_path = t["path"].is_valid().to_numpy(zero_copy_only=False)
    assert (has_image ^ has_path).all()
    if cfg_root is not None:
        for p in column(ds, "path"):
            assert (cfg_root / p).is_file(), p


def clean_is_null(ds: PreparedDataset, split: str) -> bool:
    return all(c is None for c in column(ds, "clean_label", split))


def clean_is_label(ds: PreparedDataset, split: str) -> bool:
    return column(ds, "clean_label", split) == column(ds, "label", split)


# --------------------------------------------------------------------------- CIFAR


def test_cifar10_protocol_split_and_pixels(tmp_path):
    fx = make_cifar10(tmp_path)
    ds = load("cifar10", fx["root"])
    check_common(ds, None)
    # the last tenth of the training images is val (5,000 of 50,000 at full size)
    assert counts(ds) == {"train": 90, "val": 10, "test": 20}
    assert column(ds, "split") == ["train"] * 90 + ["val"] * 10 + ["test"] * 20
    assert column(ds, "label") == fx["labels"].tolist()
    assert column(ds, "clean_label") == fx["labels"].tolist()
    assert ds.labels_are_clean and ds.class_names == fx["class_names"]
    assert ds.table["path"].null_count == ds.table.num_rows
    images = column(ds, "image")
    for row in (0, 90, 99, 100, 119):  # first train, first / last val, first / last test
        decoded = np.asarray(Image.open(io.BytesIO(images[row])))
        expected = fx["data"][row].reshape(3, 32, 32).transpose(1, 2, 0)
        np.testing.assert_array_equal(decoded, expected)
    assert load("cifar10", fx["root"]).table.equals(ds.table)  # deterministic


def test_cifar100_fine_labels_and_parent_root(tmp_path):
    fx = make_cifar100(tmp_path)
    ds = load("cifar100", tmp_path)  # the directory that contains cifar-100-python/
    check_common(ds, None)
    assert counts(ds) == {"train": 45, "val": 5, "test": 10}
    assert column(ds, "label") == fx["labels"].tolist()
    assert ds.class_names == fx["class_names"] and ds.num_classes == 100
    assert ds.labels_are_clean


def test_cifar_errors(tmp_path):
    fx = make_cifar10(tmp_path)
    (fx["root"] / "data_batch_3").unlink()
    with pytest.raises(ArtifactError, match="data_batch_3"):
        load("cifar10", fx["root"])
    (fx["root"] / "test_batch").write_bytes(b"garbage")
    with pytest.raises(ArtifactError):
        load("cifar10", fx["root"])


# --------------------------------------------------------------------------- Food-101N


def test_food101n_sibling_food101(tmp_path):
    fx = make_food101n(tmp_path)
    ds = load("food101n", fx["root"])
    check_common(ds, fx["root"])
    # val: round(0.2 * 5) = 1 per class carved out of train, with noisy labels
    assert counts(ds) == {"train": 12, "val": 3, "test": 6}
    assert ds.class_names == FOOD_CLASSES and not ds.labels_are_clean
    assert clean_is_null(ds, "train") and clean_is_null(ds, "val")
    assert clean_is_label(ds, "test")
    assert sorted(column(ds, "label", "val")) == [0, 1, 2]
    train_paths = [p for p, s in zip(column(ds, "path"), column(ds, "split")) if s != "test"]
    assert train_paths == [f"images/{k}" for k in fx["keys"]]  # imagelist order
    test_paths = column(ds, "path", "test")
    assert all(p.startswith("../food-101/images/") and p.endswith(".jpg") for p in test_paths)
    assert column(ds, "label", "test") == [0, 0, 1, 1, 2, 2]
    assert len(ds.rejects) == 0
    again = load("food101n", fx["root"])
    assert again.table.equals(ds.table)
    other_seed = load("food101n", fx["root"], seed=1)
    assert counts(other_seed) == counts(ds)


def test_food101n_explicit_food101_root(tmp_path):
    fx = make_food101n(tmp_path)
    moved = tmp_path / "elsewhere" / "food101"
    moved.parent.mkdir()
    shutil.move(fx["food101"], moved)
    with pytest.raises(ArtifactError, match="food-101"):
        load("food101n", fx["root"])
    ds = load("food101n", fx["root"], food101_root=str(moved))
    check_common(ds, fx["root"])
    assert counts(ds)["test"] == 6


# --------------------------------------------------------------------------- Clothing1M


@pytest.mark.parametrize("annotations", [False, True])
def test_clothing1m(tmp_path, annotations):
    fx = make_clothing1m(tmp_path, annotations=annotations)
    ds = load("clothing1m", fx["root"])
    check_common(ds, fx["root"])
    assert counts(ds) == {"train": 28, "val": 14, "test": 14}
    assert ds.class_names == CLOTHING_NAMES and not ds.labels_are_clean
    assert column(ds, "path", "train") == fx["train"]
    assert column(ds, "label", "train") == fx["train_labels"]
    assert column(ds, "label", "val") == list(range(14))  # clean labels, not the noisy kv
    assert clean_is_null(ds, "train")
    assert clean_is_label(ds, "val") and clean_is_label(ds, "test")
    assert load("clothing1m", fx["root"]).table.equals(ds.table)


def test_clothing1m_default_class_names(tmp_path):
    fx = make_clothing1m(tmp_path)
    (fx["ann"] / "category_names_eng.txt").unlink()
    assert load("clothing1m", fx["root"]).class_names == CLOTHING_NAMES


# --------------------------------------------------------------------------- WebVision


def test_webvision_with_ilsvrc12(tmp_path):
    fx = make_webvision(tmp_path)
    ds = load("webvision", fx["root"], ilsvrc12_root=str(fx["imagenet"]))
    check_common(ds, fx["root"])
    # class 55 is outside the first 50 and dropped everywhere; val = 1 per class of 4
    assert counts(ds) == {"train": 9, "val": 3, "test": 6, "test_ilsvrc12": 6}
    assert ds.num_classes == 50 and ds.class_names[:3] == ["name0", "name1", "name2"]
    assert not ds.labels_are_clean
    assert clean_is_null(ds, "train") and clean_is_null(ds, "val")
    assert clean_is_label(ds, "test") and clean_is_label(ds, "test_ilsvrc12")
    assert column(ds, "label", "test_ilsvrc12") == [0, 0, 1, 1, 2, 2]
    assert all(p.startswith("val_images_256/val") for p in column(ds, "path", "test"))
    assert all(p.startswith("../imagenet_val/n") for p in column(ds, "path", "test_ilsvrc12"))
    assert max(column(ds, "label")) < 50
    assert load("webvision", fx["root"], ilsvrc12_root=str(fx["imagenet"])).table.equals(ds.table)


def test_webvision_without_ilsvrc12(tmp_path):
    fx = make_webvision(tmp_path)
    ds = load("webvision", fx["root"])
    assert counts(ds) == {"train": 9, "val": 3, "test": 6}


def test_webvision_ilsvrc12_without_wnid_folders(tmp_path):
    fx = make_webvision(tmp_path, imagenet_classes=(55,))
    with pytest.raises(ArtifactError, match="wnid"):
        load("webvision", fx["root"], ilsvrc12_root=str(fx["imagenet"]))


# --------------------------------------------------------------------------- ANIMAL-10N


def test_animal10n(tmp_path):
    fx = make_animal10n(tmp_path)
    ds = load("animal10n", fx["root"])
    check_common(ds, fx["root"])
    assert counts(ds) == {"train": 30, "val": 10, "test": 10}
    assert ds.class_names[0] == "cat" and ds.class_names[9] == "guinea pig"
    assert not ds.labels_are_clean
    assert clean_is_null(ds, "train") and clean_is_null(ds, "val")
    assert clean_is_label(ds, "test")
    for path, label in zip(column(ds, "path"), column(ds, "label")):
        assert int(Path(path).name.split("_")[0]) == label
    assert column(ds, "path") == sorted(column(ds, "path", "train") + column(ds, "path", "val")) \
        + sorted(column(ds, "path", "test"))
    assert len(ds.rejects) == 0  # readme.txt is not an image and is ignored


def test_animal10n_bad_file_name_is_rejected(tmp_path):
    fx = make_animal10n(tmp_path)
    write_image(fx["root"] / "training" / "cat_00001.jpg")
    write_image(fx["root"] / "training" / "12_00001.jpg")
    ds = load("animal10n", fx["root"])
    assert sorted(ds.rejects["path"].to_pylist()) == ["training/12_00001.jpg",
                                                      "training/cat_00001.jpg"]
    assert counts(ds)["test"] == 10


# --------------------------------------------------------------------------- imagefolder


def test_imagefolder_split_layout(tmp_path):
    fx = make_imagefolder(tmp_path, layout="split")
    ds = load("imagefolder", fx["root"])
    check_common(ds, fx["root"])
    assert counts(ds) == {"test": 9, "test_shift": 3, "train": 30, "val": 6}
    assert column(ds, "split")[:30] == ["train"] * 30
    assert ds.class_names == fx["classes"] and ds.labels_are_clean
    assert clean_is_label(ds, "train")
    for path, label in zip(column(ds, "path"), column(ds, "label")):
        assert path.split("/")[1] == fx["classes"][label]
    assert "train/cat/nested/cat_000.jpeg" in column(ds, "path")


def test_imagefolder_flat_and_carved(tmp_path):
    flat = make_imagefolder(tmp_path, layout="flat")
    ds = load("imagefolder", flat["root"], val_fraction=0.2, test_fraction=0.3)
    check_common(ds, flat["root"])
    assert counts(ds) == {"test": 9, "train": 15, "val": 6}
    assert load("imagefolder", flat["root"], val_fraction=0.2,
                test_fraction=0.3).table.equals(ds.table)
    only = make_imagefolder(tmp_path, layout="train_only")
    ds = load("imagefolder", only["root"], val_fraction=0.1, test_fraction=0.2)
    assert counts(ds) == {"test": 6, "train": 21, "val": 3}


# --------------------------------------------------------------------------- manifest


def test_manifest_csv_names_split_clean(tmp_path):
    fx = make_manifest(tmp_path, kind="csv")
    ds = load("manifest", fx["file"])
    check_common(ds, fx["root"])
    assert image_root(DataConfig(source="manifest", root=str(fx["file"]))) == fx["root"]
    assert counts(ds) == {"test": 3, "test_x": 3, "train": 15, "val": 3}
    assert ds.class_names == ["ant", "bee", "cow"] and not ds.labels_are_clean
    index = {n: i for i, n in enumerate(ds.class_names)}
    assert column(ds, "label") == [index[r["label"]] for r in fx["rows"]]
    assert column(ds, "clean_label") == [None if r["clean_label"] is None
                                         else index[r["clean_label"]] for r in fx["rows"]]
    assert column(ds, "path") == [r["path"] for r in fx["rows"]]


def test_manifest_parquet_int_labels_no_split(tmp_path):
    fx = make_manifest(tmp_path, kind="parquet")
    ds = load("manifest", fx["file"], val_fraction=0.25, test_fraction=0.25)
    check_common(ds, fx["root"])
    assert ds.labels_are_clean and ds.class_names == ["0", "1", "2"]
    assert clean_is_label(ds, "train")
    assert sum(counts(ds).values()) == 24 and set(counts(ds)) == {"train", "val", "test"}


def test_manifest_bad_inputs(tmp_path):
    fx = make_manifest(tmp_path, kind="csv")
    with pytest.raises(ConfigError, match="manifest"):
        load("manifest", fx["root"] / "manifest.json")
    bad = fx["root"] / "bad.csv"
    bad.write_text("path,label,split\nimg/ant_0.png,0,training\n")
    with pytest.raises(ArtifactError, match="training"):
        load("manifest", bad)
    bad.write_text("file,label\nimg/ant_0.png,0\n")
    with pytest.raises(ArtifactError, match="path"):
        load("manifest", bad)


# --------------------------------------------------------------------------- rejects


def test_bad_images_are_skipped_and_reported(tmp_path):
    fx = make_clothing1m(tmp_path)
    root = fx["root"]
    corrupt(root / fx["train"][0])            # not an image at all
    truncate(root / fx["train"][5])           # a JPEG cut in half
    (root / fx["test"][3]).unlink()           # listed but missing
    (fx["ann"] / "noisy_train_key_list.txt").write_text(
        "\n".join(fx["train"] + ["images/9/99/nolabel.jpg"]) + "\n")  # listed, no label
    ds = load("clothing1m", root)
    check_common(ds, root)
    assert counts(ds) == {"train": 26, "val": 14, "test": 13}
    rejects = dict(zip(ds.rejects["path"].to_pylist(), ds.rejects["reason"].to_pylist()))
    assert set(rejects) == {fx["train"][0], fx["train"][5], fx["test"][3],
                            "images/9/99/nolabel.jpg"}
    assert rejects[fx["test"][3]] == "missing file"
    assert rejects[fx["train"][0]].startswith("unreadable image")
    assert rejects[fx["train"][5]].startswith("unreadable image")
    assert "no label" in rejects["images/9/99/nolabel.jpg"]
    kept = column(ds, "path")
    assert fx["train"][0] not in kept and fx["train"][1] in kept


def test_no_readable_image_is_an_error(tmp_path):
    fx = make_animal10n(tmp_path, per_class=1, test_per_class=1)
    for f in (fx["root"]).rglob("*.jpg"):
        corrupt(f)
    with pytest.raises(ArtifactError, match="no readable image"):
        load("animal10n", fx["root"])


def test_check_images_runs_in_chunks(tmp_path):
    files = [str(write_image(tmp_path / f"{i}.png", fmt="PNG")) for i in range(9)]
    files.insert(4, str(tmp_path / "missing.png"))
    assert len(common._chunk_bounds(10, 2)) > 1
    reasons = common.check_images(files)
    assert reasons == [None] * 4 + ["missing file"] + [None] * 5


# --------------------------------------------------------------------------- errors


BUILDERS = {
    "imagefolder": lambda p: make_imagefolder(p, layout="split")["root"],
    "manifest": lambda p: make_manifest(p, kind="csv")["file"],
    "cifar10": lambda p: make_cifar10(p)["root"],
    "cifar100": lambda p: make_cifar100(p)["root"],
    "food101n": lambda p: make_food101n(p)["root"],
    "clothing1m": lambda p: make_clothing1m(p)["root"],
    "webvision": lambda p: make_webvision(p)["root"],
    "animal10n": lambda p: make_animal10n(p)["root"],
}


def test_loaders_cover_every_file_source():
    assert set(LOADERS) == set(BUILDERS)


@pytest.mark.parametrize("source", sorted(BUILDERS))
def test_missing_root_names_the_path(tmp_path, source):
    missing = tmp_path / "nowhere" / ("m.csv" if source == "manifest" else "data")
    with pytest.raises(ArtifactError) as err:
        load(source, missing)
    assert str(missing) in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("source, relpath", [
    ("cifar10", "batches.meta"),
    ("cifar100", "meta"),
    ("food101n", "meta/imagelist.tsv"),
    ("food101n", "meta/classes.txt"),
    ("food101n", "../food-101/meta/test.txt"),
    ("clothing1m", "noisy_label_kv.txt"),
    ("clothing1m", "clean_label_kv.txt"),
    ("clothing1m", "noisy_train_key_list.txt"),
    ("clothing1m", "clean_val_key_list.txt"),
    ("clothing1m", "clean_test_key_list.txt"),
    ("webvision", "info/train_filelist_google.txt"),
    ("webvision", "info/val_filelist.txt"),
    ("webvision", "val_images_256"),
    ("animal10n", "testing"),
    ("animal10n", "training"),
])
def test_missing_annotation_names_the_path(tmp_path, source, relpath):
    root = Path(BUILDERS[source](tmp_path))
    target = root / relpath
    if target.is_dir():
        shutil.rmtree(target)
    else:
        target.unlink()
    with pytest.raises(ArtifactError) as err:
        load(source, root)
    assert Path(relpath).name in str(err.value)


def test_malformed_annotation_line(tmp_path):
    fx = make_webvision(tmp_path)
    (fx["root"] / "info" / "val_filelist.txt").write_text("val000001.jpg zero\n")
    with pytest.raises(ArtifactError, match="val_filelist.txt line 1"):
        load("webvision", fx["root"])


def test_image_root():
    assert image_root(DataConfig(source="animal10n", root="/d/a10n")) == Path("/d/a10n")
    assert image_root(DataConfig(source="manifest", root="/d/m.csv")) == Path("/d")
    assert image_root(DataConfig(source="cifar10", root="/d/c")) is None
    assert image_root(DataConfig()) is None


def test_rejects_table_schema_when_empty(tmp_path):
    fx = make_animal10n(tmp_path, per_class=2)
    ds = load("animal10n", fx["root"])
    assert ds.rejects.num_rows == 0 and ds.rejects.schema.equals(REJECTS_SCHEMA)
    assert isinstance(ds.table, pa.Table)
