"""CIFAR-10 and CIFAR-100 from the official "python version" pickle directories.

Layout (data.root is the extracted directory itself, or a directory that contains it):

    cifar-10-batches-py/   data_batch_1 .. data_batch_5, test_batch, batches.meta
    cifar-100-python/      train, test, meta

Each batch is a pickle (written by Python 2: load with encoding="bytes") holding
`data`: (n, 3072) uint8, one row per image, the 1024 red then 1024 green then 1024 blue
values of a 32x32 image in row-major order, and the labels (`labels` for CIFAR-10,
`fine_labels` for CIFAR-100; the 20 coarse labels are ignored). Class names come from
`batches.meta` (`label_names`) / `meta` (`fine_label_names`).

Protocol (the paper's): the training images, in file order (data_batch_1..5 for
CIFAR-10), are split so that the last tenth is "val" and the rest "train": exactly
the last 5,000 of the 50,000 official training images, 45,000 train. The 10,000 test
images are "test". All labels are clean (labels_are_clean=True, clean_label = label);
synthetic noise is injected on "train" by a later stage. Rows: train, val, then test,
in file order. Pixels are stored as PNG bytes in `image` (encoded in parallel worker
processes); `path` is null.
"""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import DataConfig
from pipeline.errors import ArtifactError
from pipeline.sources import PreparedDataset, make_table
from pipeline.sources.common import encode_pngs, require_root

log = logging.getLogger(__name__)

VAL_DIVISOR = 10
"""The last len(train) // VAL_DIVISOR training images are "val" (5,000 of 50,000)."""


@dataclass(frozen=True)
class CifarLayout:
    source: str
    dirname: str
    train_files: tuple[str, ...]
    test_file: str
    meta_file: str
    label_key: str
    names_key: str


CIFAR10 = CifarLayout("cifar10", "cifar-10-batches-py",
                      tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch",
                      "batches.meta", "labels", "label_names")
CIFAR100 = CifarLayout("cifar100", "cifar-100-python", ("train",), "test", "meta",
                       "fine_labels", "fine_label_names")


def _unpickle(path: Path, layout: CifarLayout) -> dict[str, Any]:
    if not path.is_file():
        raise ArtifactError(f"{layout.source}: file not found: {path}; expected the "
                            f"{layout.dirname} pickle files "
                            f"({', '.join(layout.train_files)}, {layout.test_file}, "
                            f"{layout.meta_file})")
    try:
        with open(path, "rb") as f:
            raw = pickle.load(f, encoding="bytes")  # noqa: S301 - the official format
    except Exception as exc:  # noqa: BLE001
        raise ArtifactError(f"{layout.source}: {path} is not a readable CIFAR pickle "
                            f"({type(exc).__name__}: {exc})") from None
    if not isinstance(raw, dict):
        raise ArtifactError(f"{layout.source}: {path} does not hold a dict")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}


def _batch(path: Path, layout: CifarLayout) -> tuple[np.ndarray, np.ndarray]:
    """One batch file -> (pixels (n, 32, 32, 3) uint8, labels (n,) int64)."""
    raw = _unpickle(path, layout)
    if "data" not in raw or layout.label_key not in raw:
        raise ArtifactError(f"{layout.source}: {path} lacks 'data' or '{layout.label_key}'")
    data = np.asarray(raw["data"])
    labels = np.asarray(raw[layout.label_key], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or data.dtype != np.uint8 \
            or len(labels) != len(data):
        raise ArtifactError(f"{layout.source}: {path}: expected data (n, 3072) uint8 and n "
                            f"labels, got data {data.shape} {data.dtype}, "
                            f"{len(labels)} labels")
    pixels = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # (n, 32, 32, 3)
    return np.ascontiguousarray(pixels), labels


def _find_dir(root: Path, layout: CifarLayout) -> Path:
    nested = root / layout.dirname
    return nested if nested.is_dir() else root


def load(cfg: DataConfig, layout: CifarLayout) -> PreparedDataset:
    root = require_root(cfg.root, layout.source, f"the {layout.dirname} directory")
    base = _find_dir(root, layout)
    meta = _unpickle(base / layout.meta_file, layout)
    if layout.names_key not in meta:
        raise ArtifactError(f"{layout.source}: {base / layout.meta_file} lacks "
                            f"'{layout.names_key}'")
    class_names = [n.decode() if isinstance(n, bytes) else str(n)
                   for n in meta[layout.names_key]]

    batches = [_batch(base / name, layout) for name in layout.train_files]
    train_px = np.concatenate([b[0] for b in batches])
    train_y = np.concatenate([b[1] for b in batches])
    test_px, test_y = _batch(base / layout.test_file, layout)
    for labels, name in ((train_y, "train"), (test_y, "test")):
        if len(labels) and (labels.min() < 0 or labels.max() >= len(class_names)):
            raise ArtifactError(f"{layout.source}: {name} labels outside 0..{len(class_names) - 1}")

    n_train = len(train_y)
    n_val = n_train // VAL_DIVISOR
    if n_train - n_val < 1 or len(test_y) < 1:
        raise ArtifactError(f"{layout.source}: {base} holds {n_train} training and "
                            f"{len(test_y)} test images; expected at least 2 and 1")
    split = np.array(["train"] * (n_train - n_val) + ["val"] * n_val + ["test"] * len(test_y),
                     dtype=object)
    labels = np.concatenate([train_y, test_y])
    images = encode_pngs(np.concatenate([train_px, test_px]))
    log.info("%s: %d train, %d val, %d test images from %s", layout.source,
             n_train - n_val, n_val, len(test_y), base)
    table = make_table(split=split, label=labels, clean_label=labels, image=images)
    return PreparedDataset(table=table, class_names=class_names, labels_are_clean=True)


def load_cifar10(cfg: DataConfig) -> PreparedDataset:
    return load(cfg, CIFAR10)


def load_cifar100(cfg: DataConfig) -> PreparedDataset:
    return load(cfg, CIFAR100)
