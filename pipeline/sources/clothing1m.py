"""`clothing1m`: Clothing1M (14 classes, real label noise) from its official key files.

Layout (data.root; the annotation files sit in data.root itself or, if
data.root/annotations/noisy_train_key_list.txt exists, in data.root/annotations/):

    noisy_label_kv.txt        "images/<a>/<bc>/<name>.jpg <label>" (~1M lines)
    clean_label_kv.txt        same format, the human-checked labels
    noisy_train_key_list.txt  "images/<a>/<bc>/<name>.jpg" per line: the noisy train set
    clean_val_key_list.txt    keys of the clean validation set (14,313)
    clean_test_key_list.txt   keys of the clean test set (10,526)
    category_names_eng.txt    optional, the 14 class names in label order
    images/<a>/<bc>/<name>.jpg

(clean_train_key_list.txt, the 47,570 clean training images, is not used: the protocol
trains on the noisy set.) Keys are paths relative to data.root and become `path` as is.

Splits, each in key-list order: "train" = noisy_train_key_list with labels from
noisy_label_kv (clean_label null); "val" = clean_val_key_list and "test" =
clean_test_key_list, both with labels from clean_label_kv (clean_label = label).
A listed key without a label in its kv file, or with a label outside 0..13, is skipped
and reported like an unreadable image. labels_are_clean=False. Class names come from
category_names_eng.txt when present, else the paper's English names.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.config import DataConfig
from pipeline.errors import ArtifactError
from pipeline.sources import PreparedDataset
from pipeline.sources.common import (NO_LABEL, Candidates, finish, parse_key_labels, read_lines,
                                     require_root)

log = logging.getLogger(__name__)

SOURCE = "clothing1m"
CLASS_NAMES = ["T-Shirt", "Shirt", "Knitwear", "Chiffon", "Sweater", "Hoodie", "Windbreaker",
               "Jacket", "Down Coat", "Suit", "Shawl", "Dress", "Vest", "Underwear"]
NUM_CLASSES = len(CLASS_NAMES)


def annotation_dir(root: Path) -> Path:
    nested = root / "annotations"
    return nested if (nested / "noisy_train_key_list.txt").is_file() else root


def _kv(path: Path) -> dict[str, int]:
    keys, labels = parse_key_labels(
        read_lines(path, SOURCE, "'<image key> <label>' per line"), path, SOURCE)
    return dict(zip(keys, labels.tolist()))


def _class_names(path: Path) -> list[str]:
    if not path.is_file():
        log.info("%s: %s not found; using the built-in English class names", SOURCE, path)
        return list(CLASS_NAMES)
    names = read_lines(path, SOURCE, "14 class names")
    if len(names) != NUM_CLASSES:
        raise ArtifactError(f"{SOURCE}: {path} lists {len(names)} class names; expected "
                            f"{NUM_CLASSES}")
    return names


def load(cfg: DataConfig) -> PreparedDataset:
    root = require_root(cfg.root, SOURCE, "the Clothing1M directory (key files, images/)")
    ann = annotation_dir(root)
    class_names = _class_names(ann / "category_names_eng.txt")
    noisy = _kv(ann / "noisy_label_kv.txt")
    clean = _kv(ann / "clean_label_kv.txt")

    rows = Candidates()
    for split, list_name, kv, kv_name in (
            ("train", "noisy_train_key_list.txt", noisy, "noisy_label_kv.txt"),
            ("val", "clean_val_key_list.txt", clean, "clean_label_kv.txt"),
            ("test", "clean_test_key_list.txt", clean, "clean_label_kv.txt")):
        keys = read_lines(ann / list_name, SOURCE, "one image key per line")
        for key in keys:
            label = kv.get(key)
            if label is None:
                rows.reject(key, f"no label in {kv_name}")
            elif not 0 <= label < NUM_CLASSES:
                rows.reject(key, f"label {label} in {kv_name} outside 0..{NUM_CLASSES - 1}")
            else:
                rows.add(key, split, label, label if split != "train" else NO_LABEL)
    return finish(rows, root=root, source=SOURCE, class_names=class_names,
                  labels_are_clean=False)
