"""`webvision`: mini-WebVision (real label noise), tested on WebVision val and ILSVRC12 val.

WebVision 1.0 layout (data.root; from info.tar, google_resized_256.tar and
val_images_256.tar):

    info/train_filelist_google.txt   "google/q0001/<name>.jpg <label>" per line
    info/val_filelist.txt            "val000001.jpg <label>" per line (50 per class)
    info/synsets.txt                 "<wnid> <names>" per line, line i = class i
                                     (optional for class names; needed for ILSVRC12)
    google/q<query>/<name>.jpg
    val_images_256/val<n>.jpg

ILSVRC2012 validation images (data.ilsvrc12_root, optional) in the class-folder layout
that valprep.sh or torchvision's ImageNet(split="val") produce:

    <data.ilsvrc12_root>/<wnid>/ILSVRC2012_val_<n>.JPEG

Protocol ("mini"): the first 50 classes (labels 0..49) of the Google subset. Splits:
"train" = train_filelist_google rows with label < 50, in file order, noisy labels
(clean_label null); "val" is carved out of train (seeded, stratified, data.val_fraction)
with its NOISY labels, so model selection on it is on noisy labels (clean_label null);
"test" = val_filelist rows with label < 50 (images in val_images_256/), clean labels;
"test_ilsvrc12" = the images in the folders of the first 50 wnids of info/synsets.txt
under data.ilsvrc12_root, label = the wnid's line number, clean. Without
data.ilsvrc12_root that split is left out (logged); a wnid folder missing there is
logged and skipped. labels_are_clean=False.

Class names: the first name of each synsets.txt line ("n01440764 tench, Tinca tinca"
-> "tench"), else "0".."49". `path` is relative to data.root (ILSVRC12 paths through
"../" when that root lies elsewhere). Missing or unreadable images are skipped and
reported.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.config import DataConfig
from pipeline.errors import ArtifactError
from pipeline.sources import PreparedDataset
from pipeline.sources.common import (Candidates, finish, parse_key_labels, read_lines,
                                     relative_to_root, require_dir, require_root, scan_images)

log = logging.getLogger(__name__)

SOURCE = "webvision"
NUM_CLASSES = 50
VAL_IMAGES = "val_images_256"


def _synsets(path: Path) -> list[tuple[str, str]] | None:
    """info/synsets.txt -> [(wnid, first name)] in class order, None if absent."""
    if not path.is_file():
        return None
    out = []
    for i, line in enumerate(read_lines(path, SOURCE, "'<wnid> <names>' per line")):
        wnid, _, names = line.partition(" ")
        if not wnid.startswith("n"):
            raise ArtifactError(f"{SOURCE}: {path} line {i + 1}: expected '<wnid> <names>', "
                                f"got {line[:120]!r}")
        out.append((wnid, names.split(",")[0].strip() or wnid))
    if len(out) < NUM_CLASSES:
        raise ArtifactError(f"{SOURCE}: {path} lists {len(out)} synsets; expected at least "
                            f"{NUM_CLASSES}")
    return out


def _filelist(rows: Candidates, path: Path, prefix: str, split: str, clean: bool) -> None:
    keys, labels = parse_key_labels(
        read_lines(path, SOURCE, "'<image> <label>' per line"), path, SOURCE)
    keep = (labels >= 0) & (labels < NUM_CLASSES)
    rows.add_many([prefix + k for k, ok in zip(keys, keep) if ok], split, labels[keep],
                  clean=clean)


def load(cfg: DataConfig) -> PreparedDataset:
    root = require_root(cfg.root, SOURCE, "the WebVision directory (info/, google/, "
                       f"{VAL_IMAGES}/)")
    info = root / "info"
    synsets = _synsets(info / "synsets.txt")
    class_names = ([name for _, name in synsets[:NUM_CLASSES]] if synsets
                   else [str(c) for c in range(NUM_CLASSES)])

    rows = Candidates()
    _filelist(rows, info / "train_filelist_google.txt", "", "train", clean=False)
    require_dir(root / "google", SOURCE, "the Google training images "
                "(google_resized_256.tar extracted in data.root)")
    require_dir(root / VAL_IMAGES, SOURCE, "the WebVision validation images "
                f"({VAL_IMAGES}.tar extracted in data.root)")
    _filelist(rows, info / "val_filelist.txt", f"{VAL_IMAGES}/", "test", clean=True)

    if cfg.ilsvrc12_root:
        imagenet = require_dir(Path(cfg.ilsvrc12_root), SOURCE,
                               "the ILSVRC2012 validation images in <wnid>/ folders")
        if synsets is None:
            raise ArtifactError(f"{SOURCE}: annotation file not found: {info / 'synsets.txt'}; "
                                "expected it to map ILSVRC12 wnid folders to classes")
        found = 0
        for label, (wnid, _) in enumerate(synsets[:NUM_CLASSES]):
            folder = imagenet / wnid
            if not folder.is_dir():
                log.warning("%s: ILSVRC12 class folder missing: %s", SOURCE, folder)
                continue
            found += 1
            files = scan_images(folder)
            rows.add_many([relative_to_root(f, root) for f in files], "test_ilsvrc12",
                          [label] * len(files), clean=True)
        if found == 0:
            raise ArtifactError(f"{SOURCE}: none of the first {NUM_CLASSES} wnid folders "
                                f"(e.g. {synsets[0][0]}/) found in {imagenet}; expected the "
                                "ILSVRC2012 val images sorted into <wnid>/ folders")
    else:
        log.warning("%s: data.ilsvrc12_root not set; split test_ilsvrc12 left out", SOURCE)
    return finish(rows, root=root, source=SOURCE, class_names=class_names,
                  labels_are_clean=False, val_fraction=cfg.val_fraction, seed=cfg.seed)
