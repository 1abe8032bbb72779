"""Image encoding and decoding shared by sources and encoders."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def encode_png(pixels: np.ndarray) -> bytes:
    """(H, W) or (H, W, 3) uint8 -> PNG bytes (lossless, deterministic)."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def open_image(image: bytes | None, path: str | None, root: str | Path | None = None
               ) -> Image.Image:
    """Decode one prepared-table row's image (bytes, or a path under `root`), fully loaded."""
    if image is not None:
        img = Image.open(io.BytesIO(image))
    elif path is not None:
        img = Image.open(Path(root) / path if root is not None else Path(path))
    else:
        raise ValueError("row has neither image bytes nor a path")
    img.load()
    return img
