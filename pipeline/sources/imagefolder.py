"""`imagefolder`: images sorted into one folder per class.

Two layouts, told apart by whether data.root has a `train/` sub-directory:

1. Split layout (data.root/train exists):

       root/train/<class>/<image>           required
       root/val/<class>/<image>             optional
       root/test/<class>/<image>            optional
       root/test_<name>/<class>/<image>     optional extra test sets, split "test_<name>"

   A missing `val/` is carved out of train (seeded, stratified, data.val_fraction); a
   missing `test/` likewise (data.test_fraction). Other top-level folders are ignored
   with a warning.

2. Flat layout: root/<class>/<image>; the split is `pipeline.splits.stratified_split`
   with data.val_fraction / data.test_fraction / data.seed.

Class index = position in the sorted list of class-folder names (the union over all split
folders). Images may sit in nested sub-folders of a class folder; files are recognised
by suffix (`common.IMAGE_EXTENSIONS`, case-insensitive); hidden files are skipped.
Labels are taken as clean (labels_are_clean=True, clean_label = label): noise is injected
later; for a folder of real-noise labels use the `manifest` source with a clean_label
column. `path` is relative to data.root; rows are ordered by split (train, val, test,
test_<name> sorted) and then by path. Unreadable images are skipped and reported.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.config import DataConfig
from pipeline.errors import ArtifactError
from pipeline.sources import PreparedDataset
from pipeline.sources.common import Candidates, finish, require_root, scan_images

log = logging.getLogger(__name__)

SOURCE = "imagefolder"


def _class_dirs(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))


def load(cfg: DataConfig) -> PreparedDataset:
    root = require_root(cfg.root, SOURCE, "root/<class>/<image> or root/train/<class>/<image>")
    if (root / "train").is_dir():
        split_dirs = {"train": root / "train"}
        for child in sorted(p for p in root.iterdir() if p.is_dir() and p.name != "train"):
            if child.name in ("val", "test") or (child.name.startswith("test_")
                                                 and len(child.name) > len("test_")):
                split_dirs[child.name] = child
            elif not child.name.startswith("."):
                log.warning("%s: ignoring folder %s (not train, val, test or test_<name>)",
                            SOURCE, child)
        order = ["train"] + [s for s in ("val", "test") if s in split_dirs] + sorted(
            s for s in split_dirs if s.startswith("test_"))
        val_fraction = 0.0 if "val" in split_dirs else cfg.val_fraction
        test_fraction = 0.0 if "test" in split_dirs else cfg.test_fraction
    else:
        split_dirs, order = {"train": root}, ["train"]
        val_fraction, test_fraction = cfg.val_fraction, cfg.test_fraction

    class_names = sorted({c for d in split_dirs.values() for c in _class_dirs(d)})
    if not class_names:
        raise ArtifactError(f"{SOURCE}: no class folders in {split_dirs['train']}; expected "
                            "<class>/<image> sub-folders")
    index = {c: i for i, c in enumerate(class_names)}

    rows = Candidates()
    for split in order:
        directory = split_dirs[split]
        for cls in _class_dirs(directory):
            files = scan_images(directory / cls)
            paths = [f.relative_to(root).as_posix() for f in files]
            rows.add_many(paths, split, [index[cls]] * len(paths), clean=True)
    return finish(rows, root=root, source=SOURCE, class_names=class_names,
                  labels_are_clean=True, val_fraction=val_fraction,
                  test_fraction=test_fraction, seed=cfg.seed)
