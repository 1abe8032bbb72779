"""The offline default: scikit-learn's handwritten digits (1,797 real 8x8 images, 10
classes), shipped inside the package, so the pipeline runs with no download."""

from __future__ import annotations

import numpy as np

from pipeline.config import DataConfig
from pipeline.images import encode_png
from pipeline.sources import PreparedDataset, make_table
from pipeline.sources.parallel import progress_bar
from pipeline.splits import stratified_split


def load(cfg: DataConfig) -> PreparedDataset:
    """Digits as PNG bytes (grey levels 0..16 mapped to 0..255), stratified split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8)
    labels = digits.target.astype(np.int64)
    split = stratified_split(labels, val_fraction=cfg.val_fraction,
                             test_fraction=cfg.test_fraction, seed=cfg.seed)
    with progress_bar(len(pixels)) as bar:
        images = []
        for img in pixels:
            images.append(encode_png(img))
            bar.update()
    table = make_table(split=split, label=labels, clean_label=labels, image=images)
    return PreparedDataset(table=table, class_names=[str(c) for c in range(10)],
                           labels_are_clean=True)
