"""The dataset sources that read files from disk, collected for `load_source`.

Each loader takes a `DataConfig` and returns a `PreparedDataset`; see the module of each
source for its on-disk layout, split protocol and noise semantics:

    imagefolder   pipeline.sources.imagefolder   root/<class>/..., root/{train,val,test}/<class>/...
    manifest      pipeline.sources.manifest      CSV / Parquet of path, label[, split, clean_label]
    cifar10/100   pipeline.sources.cifar         official python pickles, 45k/5k/10k
    food101n      pipeline.sources.food101n      Food-101N train, Food-101 test
    clothing1m    pipeline.sources.clothing1m    official key / label files
    webvision     pipeline.sources.webvision     mini-WebVision + ILSVRC12 val
    animal10n     pipeline.sources.animal10n     training/ testing/ <label>_<n>.jpg

Path-based rows store `path` relative to `pipeline.sources.image_root(cfg)`.
"""

from __future__ import annotations

from collections.abc import Callable

from pipeline.config import DataConfig
from pipeline.sources import PreparedDataset, image_root  # noqa: F401 (re-exported)
from pipeline.sources import (animal10n, cifar, clothing1m, food101n, imagefolder, manifest,
                              webvision)


LOADERS: dict[str, Callable[[DataConfig], PreparedDataset]] = {
    "imagefolder": imagefolder.load,
    "manifest": manifest.load,
    "cifar10": cifar.load_cifar10,
    "cifar100": cifar.load_cifar100,
    "food101n": food101n.load,
    "clothing1m": clothing1m.load,
    "webvision": webvision.load,
    "animal10n": animal10n.load,
}
