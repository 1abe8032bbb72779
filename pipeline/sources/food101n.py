"""`food101n`: train on Food-101N (real label noise), test on the Food-101 test split.

Two roots:

    data.root = Food-101N_release/
        meta/classes.txt       header line "class_name", then the 101 class names
        meta/imagelist.tsv     header line "class_name/key", then "<class>/<file>.jpg"
        images/<class>/<file>.jpg
    data.food101_root = food-101/   (default: a sibling `food-101` next to data.root,
                                     i.e. <data.root>/../food-101, as both archives extract)
        meta/test.txt          "<class>/<id>" per line (no suffix), 25,250 lines
        images/<class>/<id>.jpg

Splits: "train" = every image of meta/imagelist.tsv (~310k), in file order, label = index
of its class folder in meta/classes.txt (the same 101 names as Food-101). Food-101N has
no clean validation split, so "val" is carved out of train: seeded, stratified,
data.val_fraction of each class, with its NOISY labels; model selection on it is
selection on noisy labels (clean_label null). (Consider a small val_fraction such as 0.02
here: the carved images are removed from training.) "test" = Food-101 meta/test.txt, in
file order, clean labels (clean_label = label). Train clean_label is null:
meta/verified_train.tsv only says whether a label is right for ~55k images, and is not
read.

labels_are_clean=False. `path` is relative to data.root; test images live under the
Food-101 root, so their paths go through "../" (computed on resolved paths, so
`data.root / path` reaches them). Missing or unreadable images are skipped and reported.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config import DataConfig
from pipeline.errors import ArtifactError
from pipeline.sources import PreparedDataset
from pipeline.sources.common import (Candidates, finish, read_lines, relative_to_root,
                                     require_dir, require_root)

SOURCE = "food101n"


def food101_dir(cfg: DataConfig) -> Path:
    """The Food-101 directory: data.food101_root, else <data.root>/../food-101."""
    if cfg.food101_root:
        return Path(cfg.food101_root)
    return Path(cfg.root).absolute().parent / "food-101"


def _classes(path: Path) -> list[str]:
    lines = read_lines(path, SOURCE, "the 101 class names, one per line")
    if lines and lines[0] == "class_name":
        lines = lines[1:]
    if len(lines) != len(set(lines)):
        raise ArtifactError(f"{SOURCE}: {path} lists a class twice")
    return lines


def load(cfg: DataConfig) -> PreparedDataset:
    root = require_root(cfg.root, SOURCE, "the Food-101N_release directory (meta/, images/)")
    food101 = food101_dir(cfg)
    require_dir(food101, SOURCE, "the Food-101 directory (meta/test.txt, images/); set "
                "data.food101_root")
    class_names = _classes(root / "meta" / "classes.txt")
    index = {c: i for i, c in enumerate(class_names)}

    rows = Candidates()
    imagelist = read_lines(root / "meta" / "imagelist.tsv", SOURCE,
                           "a 'class_name/key' header and one <class>/<file>.jpg per line")
    for key in imagelist[1:] if imagelist and imagelist[0].startswith("class_name") else imagelist:
        cls = key.split("/", 1)[0]
        path = f"images/{key}"
        if "/" not in key or cls not in index:
            rows.reject(path, f"class {cls!r} not in meta/classes.txt")
        else:
            rows.add(path, "train", index[cls])

    for key in read_lines(food101 / "meta" / "test.txt", SOURCE, "one <class>/<id> per line"):
        cls = key.split("/", 1)[0]
        path = relative_to_root(food101 / "images" / f"{key}.jpg", root)
        if "/" not in key or cls not in index:
            rows.reject(path, f"class {cls!r} not in Food-101N meta/classes.txt")
        else:
            rows.add(path, "test", index[cls], index[cls])
    return finish(rows, root=root, source=SOURCE, class_names=class_names,
                  labels_are_clean=False, val_fraction=cfg.val_fraction, seed=cfg.seed)
