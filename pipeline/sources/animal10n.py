"""`animal10n`: ANIMAL-10N (10 classes, ~8 % real label noise from human annotators).

Layout (data.root):

    training/<label>_<number>.jpg    50,000 images
    testing/<label>_<number>.jpg     5,000 images

The label is the integer before the first underscore of the file name; classes (the
dataset's label table): 0 cat, 1 lynx, 2 wolf, 3 coyote, 4 cheetah, 5 jaguar,
6 chimpanzee, 7 orangutan, 8 hamster, 9 guinea pig.

Splits, each sorted by file name: "train" = training/ with its noisy labels (clean_label
null); "val" is carved out of train (seeded, stratified, data.val_fraction) with its NOISY
labels, so model selection on it is on noisy labels (clean_label null); "test" =
testing/, whose labels the authors kept only where they match the search keyword: clean
(clean_label = label). labels_are_clean=False. An image file whose name does not start
with "<label 0..9>_" is skipped and reported; other files are ignored. `path` is
relative to data.root.
"""

from __future__ import annotations

import re

from pipeline.config import DataConfig
from pipeline.sources import PreparedDataset
from pipeline.sources.common import Candidates, finish, require_dir, require_root, scan_images

SOURCE = "animal10n"
CLASS_NAMES = ["cat", "lynx", "wolf", "coyote", "cheetah", "jaguar", "chimpanzee",
               "orangutan", "hamster", "guinea pig"]
_NAME = re.compile(r"^(\d+)_")


def load(cfg: DataConfig) -> PreparedDataset:
    root = require_root(cfg.root, SOURCE, "the ANIMAL-10N directory (training/, testing/)")
    rows = Candidates()
    for split, folder in (("train", "training"), ("test", "testing")):
        directory = require_dir(root / folder, SOURCE, "images named <label>_<number>.jpg")
        for file in scan_images(directory):
            path = file.relative_to(root).as_posix()
            match = _NAME.match(file.name)
            label = int(match.group(1)) if match else -1
            if not 0 <= label < len(CLASS_NAMES):
                rows.reject(path, f"file name does not start with a label "
                                  f"0..{len(CLASS_NAMES) - 1} and '_'")
            else:
                rows.add(path, split, label, label if split == "test" else -1)
    return finish(rows, root=root, source=SOURCE, class_names=CLASS_NAMES,
                  labels_are_clean=False, val_fraction=cfg.val_fraction, seed=cfg.seed)
