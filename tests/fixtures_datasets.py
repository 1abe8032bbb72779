"""Tiny datasets written in each real dataset's official on-disk layout.

Every builder writes real image files (JPEG / PNG via PIL) and real annotation files
under a directory it is given, and returns a small dict describing what it wrote (roots
and the expected per-split counts) for the tests to check against.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from PIL import Image

_counter = iter(range(10**9))


def write_image(path: Path, *, fmt: str = "JPEG", size: tuple[int, int] = (24, 20)) -> Path:
    """A small random RGB image file (distinct content per call)."""
    rng = np.random.default_rng(next(_counter))
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


def corrupt(path: Path) -> Path:
    """Overwrite a file with bytes that no image decoder accepts."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"this is not an image\n" * 4)
    return path


def truncate(path: Path) -> Path:
    """Cut an existing image file to half its size."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines))


# --------------------------------------------------------------------------- CIFAR


def _pickle_py2(path: Path, obj: dict) -> None:
    """Pickle like the official (Python 2) files: bytes keys and bytes strings."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def make_cifar10(base: Path, *, per_batch: int = 20, n_test: int = 20) -> dict:
    """cifar-10-batches-py/ with 5 data batches of `per_batch` images and a test batch.

    data rows: 1024 R, 1024 G, 1024 B values of a 32x32 image; labels i % 10.
    """
    root = base / "cifar-10-batches-py"
    rng = np.random.default_rng(10)
    train_data, train_labels = [], []
    for b in range(1, 6):
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [(b * per_batch + i) % 10 for i in range(per_batch)]
        _pickle_py2(root / f"data_batch_{b}", {
            b"batch_label": f"training batch {b} of 5".encode(), b"labels": labels,
            b"data": data, b"filenames": [f"img_{b}_{i}.png".encode() for i in range(per_batch)]})
        train_data.append(data)
        train_labels += labels
    test = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)
    test_labels = [i % 10 for i in range(n_test)]
    _pickle_py2(root / "test_batch", {b"batch_label": b"testing batch 1 of 1",
                                      b"labels": test_labels, b"data": test,
                                      b"filenames": [b"t.png"] * n_test})
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
             "truck"]
    _pickle_py2(root / "batches.meta", {b"num_cases_per_batch": per_batch,
                                        b"label_names": [n.encode() for n in names],
                                        b"num_vis": 3072})
    return {"root": root, "data": np.concatenate(train_data + [test]),
            "labels": np.array(train_labels + test_labels), "class_names": names,
            "n_train": 5 * per_batch, "n_test": n_test}


def make_cifar100(base: Path, *, n_train: int = 50, n_test: int = 10) -> dict:
    """cifar-100-python/ with train, test (fine and coarse labels) and meta."""
    root = base / "cifar-100-python"
    rng = np.random.default_rng(100)
    data = rng.integers(0, 256, (n_train + n_test, 3072), dtype=np.uint8)
    fine = [(7 * i) % 100 for i in range(n_train + n_test)]
    for name, sl in (("train", slice(0, n_train)), ("test", slice(n_train, None))):
        _pickle_py2(root / name, {
            b"filenames": [b"x.png"] * len(fine[sl]), b"batch_label": name.encode(),
            b"fine_labels": fine[sl], b"coarse_labels": [f // 5 for f in fine[sl]],
            b"data": data[sl]})
    names = [f"fine_{i:02d}" for i in range(100)]
    _pickle_py2(root / "meta", {b"fine_label_names": [n.encode() for n in names],
                                b"coarse_label_names": [f"c{i}".encode() for i in range(20)]})
    return {"root": root, "data": data, "labels": np.array(fine), "class_names": names,
            "n_train": n_train, "n_test": n_test}


# --------------------------------------------------------------------------- Food-101N


FOOD_CLASSES = ["apple_pie", "baby_back_ribs", "baklava"]


def make_food101n(base: Path, *, per_class: int = 5, test_per_class: int = 2) -> dict:
    """Food-101N_release/ (meta/classes.txt, meta/imagelist.tsv, meta/verified_train.tsv,
    images/<class>/<hash>.jpg) next to food-101/ (meta/classes.txt, meta/train.txt,
    meta/test.txt, images/<class>/<id>.jpg)."""
    n101n, f101 = base / "Food-101N_release", base / "food-101"
    keys = []
    for c, cls in enumerate(FOOD_CLASSES):
        for i in range(per_class):
            key = f"{cls}/{c:02d}{i:030x}.jpg"
            write_image(n101n / "images" / key)
            keys.append(key)
    _write_lines(n101n / "meta" / "classes.txt", ["class_name"] + FOOD_CLASSES)
    _write_lines(n101n / "meta" / "imagelist.tsv", ["class_name/key"] + keys)
    _write_lines(n101n / "meta" / "verified_train.tsv",
                 ["class_name/key\tverification_label"] + [f"{k}\t1" for k in keys[::2]])
    test = []
    for c, cls in enumerate(FOOD_CLASSES):
        for i in range(test_per_class + 1):
            key = f"{cls}/{100000 + 10 * c + i}"
            write_image(f101 / "images" / f"{key}.jpg")
            test.append(key)
    _write_lines(f101 / "meta" / "classes.txt", FOOD_CLASSES)
    _write_lines(f101 / "meta" / "test.txt",
                 [k for k in test if int(k.split("/")[1]) % 10 < test_per_class])
    _write_lines(f101 / "meta" / "train.txt",
                 [k for k in test if int(k.split("/")[1]) % 10 >= test_per_class])
    return {"root": n101n, "food101": f101, "keys": keys, "per_class": per_class,
            "n_test": test_per_class * len(FOOD_CLASSES)}


# --------------------------------------------------------------------------- Clothing1M


CLOTHING_NAMES = ["T-Shirt", "Shirt", "Knitwear", "Chiffon", "Sweater", "Hoodie",
                  "Windbreaker", "Jacket", "Down Coat", "Suit", "Shawl", "Dress", "Vest",
                  "Underwear"]


def make_clothing1m(base: Path, *, train_per_class: int = 2, annotations: bool = False) -> dict:
    """Clothing1M: key/label files (in root or root/annotations/) and
    images/<d>/<dd>/<name>.jpg. Clean images also carry a (possibly different) noisy
    label, as in the real noisy_label_kv.txt."""
    root = base / "clothing1m"
    ann = root / "annotations" if annotations else root
    noisy_kv, clean_kv, train, val, test = [], [], [], [], []
    n = 0

    def key() -> str:
        nonlocal n
        n += 1
        k = f"images/{n % 10}/{n % 100:02d}/{1000 + n}.jpg"
        write_image(root / k)
        return k

    for c in range(14):
        for _ in range(train_per_class):
            k = key()
            train.append(k)
            noisy_kv.append(f"{k} {c}")
        k = key()
        val.append(k)
        clean_kv.append(f"{k} {c}")
        noisy_kv.append(f"{k} {(c + 1) % 14}")
        k = key()
        test.append(k)
        clean_kv.append(f"{k} {c}")
    for name, lines in (("noisy_label_kv.txt", noisy_kv), ("clean_label_kv.txt", clean_kv),
                        ("noisy_train_key_list.txt", train), ("clean_val_key_list.txt", val),
                        ("clean_test_key_list.txt", test), ("clean_train_key_list.txt", val),
                        ("category_names_eng.txt", CLOTHING_NAMES)):
        _write_lines(ann / name, lines)
    return {"root": root, "ann": ann, "train": train, "val": val, "test": test,
            "train_labels": [c for c in range(14) for _ in range(train_per_class)]}


# --------------------------------------------------------------------------- WebVision


def make_webvision(base: Path, *, classes: tuple[int, ...] = (0, 1, 2, 55),
                   per_class: int = 4, val_per_class: int = 2,
                   imagenet_classes: tuple[int, ...] = (0, 1, 2, 55)) -> dict:
    """WebVision 1.0 (info/*.txt, google/q<nnnn>/*.jpg, val_images_256/val*.jpg) and an
    ILSVRC2012 val folder in <wnid>/ILSVRC2012_val_*.JPEG layout. Class 55 lies beyond
    the first 50 and must be filtered out."""
    root, imagenet = base / "webvision", base / "imagenet_val"
    wnids = [f"n{1440764 + 1000 * i:08d}" for i in range(60)]
    _write_lines(root / "info" / "synsets.txt",
                 [f"{w} name{i}, alias{i}" for i, w in enumerate(wnids)])
    train, val = [], []
    v = 0
    for c in classes:
        for i in range(per_class):
            k = f"google/q{c + 1:04d}/{c:02d}_{i:04d}.jpg"
            write_image(root / k)
            train.append(f"{k} {c}")
        for _ in range(val_per_class):
            v += 1
            write_image(root / "val_images_256" / f"val{v:06d}.jpg")
            val.append(f"val{v:06d}.jpg {c}")
    _write_lines(root / "info" / "train_filelist_google.txt", train)
    _write_lines(root / "info" / "val_filelist.txt", val)
    _write_lines(root / "info" / "train_filelist_flickr.txt", [])
    n = 0
    for c in imagenet_classes:
        for _ in range(2):
            n += 1
            write_image(imagenet / wnids[c] / f"ILSVRC2012_val_{n:08d}.JPEG")
    first50 = [c for c in classes if c < 50]
    return {"root": root, "imagenet": imagenet, "wnids": wnids,
            "n_train": per_class * len(first50), "n_test": val_per_class * len(first50),
            "n_ilsvrc": 2 * len([c for c in imagenet_classes if c < 50])}


# --------------------------------------------------------------------------- ANIMAL-10N


def make_animal10n(base: Path, *, per_class: int = 4, test_per_class: int = 1) -> dict:
    """ANIMAL-10N: training/<label>_<n>.jpg and testing/<label>_<n>.jpg."""
    root = base / "animal10n"
    n = 0
    for split, count in (("training", per_class), ("testing", test_per_class)):
        for label in range(10):
            for _ in range(count):
                n += 1
                write_image(root / split / f"{label}_{n:05d}.jpg")
    (root / "training" / "readme.txt").write_text("not an image\n")
    return {"root": root, "n_train": 10 * per_class, "n_test": 10 * test_per_class}


# --------------------------------------------------------------------------- generic


def make_imagefolder(base: Path, *, layout: str, classes: tuple[str, ...] = ("cat", "dog", "eel"),
                     per_class: int = 10) -> dict:
    """layout "flat": root/<class>/*; "split": root/{train,val,test,test_shift}/<class>/*."""
    root = base / f"folder_{layout}"
    splits = {"flat": {"": per_class},
              "split": {"train": per_class, "val": 2, "test": 3, "test_shift": 1},
              "train_only": {"train": per_class}}[layout]
    for split, count in splits.items():
        for c, cls in enumerate(classes):
            for i in range(count):
                fmt = "PNG" if i % 2 else "JPEG"
                sub = "nested/" if i == 0 else ""
                write_image(root / split / cls / f"{sub}{cls}_{i:03d}.{fmt.lower()}", fmt=fmt)
    return {"root": root, "classes": list(classes), "splits": splits}


def make_manifest(base: Path, *, kind: str) -> dict:
    """A manifest next to its images. kind "csv": class-name labels, split and
    clean_label columns (some null); "parquet": integer labels, no split column."""
    import polars as pl

    root = base / f"manifest_{kind}"
    rows = []
    for c, cls in enumerate(("ant", "bee", "cow")):
        for i in range(8):
            path = f"img/{cls}_{i}.png"
            write_image(root / path, fmt="PNG")
            split = "train" if i < 5 else ("val" if i < 6 else ("test" if i < 7 else "test_x"))
            noisy = ("ant", "bee", "cow")[(c + (i == 1)) % 3]
            clean = cls if (split != "train" or i == 1) else None
            rows.append({"path": path, "label": noisy if kind == "csv" else (c + (i == 1)) % 3,
                         "split": split, "clean_label": clean})
    df = pl.DataFrame(rows)
    if kind == "csv":
        file = root / "manifest.csv"
        df.write_csv(file)
    else:
        file = root / "manifest.parquet"
        df.select("path", "label").write_parquet(file)
    return {"file": file, "root": root, "rows": rows}
