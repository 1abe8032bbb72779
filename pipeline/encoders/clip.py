"""`open_clip`: frozen CLIP image features f_p(x) (the paper's best: ViT-L/14, 768-d).

Features are the raw image-tower outputs (`encode_image(normalize=False)`), NOT
L2-normalised, as in the released code; later stages normalise where they need cosine.
Images go through open_clip's *validation* transform (resize + centre crop, no random
augmentation) with the model in eval mode, so embeddings are deterministic.

Weights are resolved to local files before open_clip sees them
(`pipeline.encoders.clip_weights`: the accepted `model` / `pretrained` forms, and the
offline behaviour: caches first, a download only when the source answers, else one
`ArtifactError` line at once), so open_clip never touches the network and never silently
falls back to random weights.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.encoders import RuntimeOptions
from pipeline.encoders.clip_download import one_line
from pipeline.encoders.clip_weights import LOCAL_DIR_PREFIX, Source, check_names, resolve
from pipeline.errors import ArtifactError, ConfigError
from pipeline.images import open_image

log = logging.getLogger(__name__)

RANDOM_WEIGHTS_SEED = 0


# --------------------------------------------------------------------------- decoding

class _RowImages:
    """Map-style dataset over prepared-table rows: i -> (i, preprocessed (3, H, W) tensor
    or None, error or None). Decoding errors are returned, not raised, so the main process
    can name the row in a one-line message.

    Holds the table's Arrow columns and takes one row's bytes at a time, so no second
    copy of the images is made however many there are."""

    def __init__(self, images: pa.ChunkedArray, paths: pa.ChunkedArray,
                 root: str | None, transform: Any) -> None:
        self.images, self.paths, self.root, self.transform = images, paths, root, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[int, Any, str | None]:
        try:
            img = open_image(self.images[i].as_py(), self.paths[i].as_py(),
                             self.root).convert("RGB")
            return i, self.transform(img), None
        except Exception as exc:  # noqa: BLE001 - reported with the row by encode()
            return i, None, f"{type(exc).__name__}: {one_line(exc, 200)}"


def _collate(items: list[tuple[int, Any, str | None]]) -> tuple[Any, Any, list]:
    import torch

    index = torch.tensor([i for i, _, _ in items], dtype=torch.int64)
    errors = [(i, e) for i, _, e in items if e is not None]
    if errors:
        return index, None, errors
    return index, torch.stack([x for _, x, _ in items]), []  # (B, 3, H, W)


def _device(name: str) -> Any:
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"device: {name!r} is not a torch device; use cpu or cuda[:i]") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device: {name!r} is not supported; use cpu or cuda[:i]")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device: {name!r} requested but CUDA is not available; use cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device: {name!r} but only {torch.cuda.device_count()} "
                              f"CUDA device(s) are visible")
    return device


# --------------------------------------------------------------------------- encoder

class OpenClipEncoder:
    """open_clip image tower as f_p. Constructing is cheap; weights are resolved and the
    model built on first use (`load`, `encode` or `provenance`).

    encode(table) -> (N, D) float32 C-contiguous raw image features (not normalised), in
    table row order. fp32 on CPU (no autocast); on CUDA autocast bf16 (fp16 where bf16 is
    not supported). Independent of batch size and worker count up to float rounding.
    """

    def __init__(self, *, model: str, pretrained: str | None, cache_dir: str | None = None
                 ) -> None:
        if not model or not model.strip():
            raise ConfigError("embed.model: empty; e.g. ViT-L-14-quickgelu")
        self.model_name = model
        self.pretrained = pretrained or None
        self.cache_dir = cache_dir or None
        self._model: Any = None
        self._device: Any = None
        self._transform: Any = None
        self._dim: int | None = None
        self._image_size: list[int] | None = None
        self._preprocess: dict[str, Any] = {}
        self._precision: str | None = None

    def check(self) -> None:
        """Fail now on a bad model name or a tag of the other activation (ConfigError),
        before anything is loaded or created."""
        check_names(self.model_name, self.pretrained)

    # ---- model
    def load(self, device: str = "cpu") -> None:
        """Resolve the weights (offline-safe) and build the model in eval mode on `device`."""
        import torch

        dev = _device(device)
        if self._model is None:
            start = time.perf_counter()
            source = resolve(self.model_name, self.pretrained, self.cache_dir)
            self._model, self._transform = self._build(source)
            log.info("open_clip %s (%s) ready in %.1f s", self.model_name,
                     self.pretrained or "random weights", time.perf_counter() - start)
        self._model.to(dev)
        self._model.eval()
        self._device = dev
        if dev.type == "cuda":
            self._precision = "amp_bf16" if torch.cuda.is_bf16_supported() else "amp_fp16"
        else:
            self._precision = "fp32"

    def _build(self, source: Source) -> tuple[Any, Any]:
        import open_clip
        import torch

        pp = source.preprocess
        kwargs: dict[str, Any] = {
            "pretrained": source.checkpoint, "precision": "fp32", "device": "cpu",
            "image_mean": pp.get("mean"), "image_std": pp.get("std"),
            "image_interpolation": pp.get("interpolation"),
            "image_resize_mode": pp.get("resize_mode"),
            "cache_dir": self.cache_dir, "pretrained_image": False, "pretrained_text": False,
            "weights_only": not source.trusted_archive,
            "require_pretrained": source.checkpoint is not None
            or source.model_name.startswith(LOCAL_DIR_PREFIX)}
        where = source.checkpoint or source.model_name
        try:
            if source.checkpoint is None and not source.model_name.startswith(LOCAL_DIR_PREFIX):
                # Random weights (tests): seeded so that two runs agree, global RNG untouched.
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(RANDOM_WEIGHTS_SEED)
                    model, _, preprocess_val = open_clip.create_model_and_transforms(
                        source.model_name, **kwargs)
            else:
                model, _, preprocess_val = open_clip.create_model_and_transforms(
                    source.model_name, **kwargs)
        except Exception as exc:
            raise ArtifactError(f"open_clip could not build {self.model_name} from {where}: "
                                f"{one_line(exc)}") from exc
        model.eval()  # create_model_and_transforms returns train mode
        visual = model.visual
        self._preprocess = {k: (list(v) if isinstance(v, tuple) else v)
                            for k, v in getattr(visual, "preprocess_cfg", {}).items()}
        size = self._preprocess.get("size", getattr(visual, "image_size", None))
        self._image_size = ([int(size), int(size)] if isinstance(size, int)
                            else [int(s) for s in size] if size is not None else None)
        self._dim = getattr(visual, "output_dim", None)
        if self._dim is None:  # e.g. some timm towers: measure with one blank image
            with torch.inference_mode():
                h, w = self._image_size or (224, 224)
                self._dim = int(model.encode_image(torch.zeros(1, 3, h, w),
                                                   normalize=False).shape[-1])
        return model, preprocess_val

    # ---- encoding
    per_image = True  # eval mode, no batch statistics: a row's features are its image's

    def fingerprint(self, runtime: RuntimeOptions) -> dict:
        """What decides the numbers besides the images (the chunk cache's key): weights,
        device type (and GPU model: CUDA runs autocast), batch size (batched kernels may
        round differently), torch and open_clip versions."""
        import torch
        from open_clip.version import __version__

        dev = _device(runtime.device)
        out: dict[str, Any] = {"encoder": "open_clip", "model": self.model_name,
                               "pretrained": self.pretrained, "device": dev.type,
                               "batch_size": runtime.batch_size, "torch": torch.__version__,
                               "open_clip": __version__}
        if dev.type == "cuda":
            out["gpu"] = torch.cuda.get_device_name(dev)
        if self.pretrained and os.path.isfile(self.pretrained):
            st = os.stat(self.pretrained)
            out["pretrained_file"] = [st.st_size, st.st_mtime_ns]
        return out

    def encode(self, table: pa.Table, *, root: str | None, runtime: RuntimeOptions
               ) -> np.ndarray:
        """table: prepared table (image bytes or path per row). Returns (N, D) float32,
        C-contiguous, row order = table order; raw (unnormalised) image features."""
        (out,) = self.encode_ranges(table, [(0, table.num_rows)], root=root, runtime=runtime)
        return out

    def encode_ranges(self, table: pa.Table, ranges: Sequence[tuple[int, int]], *,
                      root: str | None, runtime: RuntimeOptions) -> Iterator[np.ndarray]:
        """Yield (stop - start, D) float32 C-contiguous features of each row range
        [start, stop) of `table`, in the order given, from one DataLoader (workers and
        model stay up across ranges). Batches never straddle two ranges: a range is cut
        into batches from its own start, so ranges starting at multiples of batch_size
        give the same batches, hence the same numbers, as one whole-table pass."""
        import torch
        from torch.utils.data import DataLoader
        from tqdm.auto import tqdm

        if runtime.batch_size < 1:
            raise ConfigError(f"batch_size: {runtime.batch_size} must be >= 1")
        if runtime.workers < 0:
            raise ConfigError(f"workers: {runtime.workers} must be >= 0")
        self.load(runtime.device)
        model, device = self._model, self._device
        cuda = device.type == "cuda"
        n = table.num_rows
        ranges = [(int(a), int(b)) for a, b in ranges]
        for a, b in ranges:
            if not 0 <= a <= b <= n:
                raise ValueError(f"row range [{a}, {b}) outside the table's {n} rows")
        total = sum(b - a for a, b in ranges)
        if total == 0:
            for a, b in ranges:
                yield np.empty((b - a, self._dim), dtype=np.float32)
            return

        paths = table.column("path")
        bs = runtime.batch_size
        batches = [list(range(s, min(s + bs, b))) for a, b in ranges for s in range(a, b, bs)]
        loader = DataLoader(_RowImages(table.column("image"), paths, root, self._transform),
                            batch_sampler=batches, num_workers=runtime.workers,
                            collate_fn=_collate, pin_memory=cuda)
        dtype = torch.bfloat16 if self._precision == "amp_bf16" else torch.float16

        def autocast() -> Any:  # fp32 on CPU: bf16 autocast there moves features
            return torch.autocast("cuda", dtype=dtype) if cuda else contextlib.nullcontext()

        start = time.perf_counter()
        batch_iter = iter(loader)
        with tqdm(total=total, unit="img", desc=f"embed {self.model_name}", file=sys.stderr,
                  disable=not runtime.progress, dynamic_ncols=True) as bar:
            for a, b in ranges:
                out = np.empty((b - a, self._dim), dtype=np.float32)  # (rows, D)
                done = a
                while done < b:
                    index, batch, errors = next(batch_iter)
                    if errors:
                        i, err = errors[0]
                        where = paths[i].as_py() or "image bytes"
                        sid = table.column("sample_id")[i].as_py() if "sample_id" in \
                            table.column_names else i
                        raise ArtifactError(
                            f"cannot decode image of sample_id {sid} ({where}): {err}"
                            + (f" (+{len(errors) - 1} more in this batch)"
                               if len(errors) > 1 else ""))
                    assert int(index[0]) == done, "DataLoader broke row order"
                    # Inference mode per batch, not around the yields: the caller's code
                    # between chunks must not run under it.
                    with torch.inference_mode():
                        x = batch.to(device, non_blocking=cuda)  # (B, 3, H, W)
                        with autocast():
                            feats = model.encode_image(x, normalize=False)  # (B, D)
                        out[done - a:done - a + len(index)] = feats.float().cpu().numpy()
                    done += len(index)
                    bar.update(len(index))
                bad = ~np.isfinite(out).all(axis=1)
                if bad.any():
                    where = "" if (a, b) == (0, n) else f" (rows {a}..{b - 1})"
                    raise ArtifactError(f"open_clip {self.model_name}: {int(bad.sum())} of "
                                        f"{b - a} embeddings{where} are not finite "
                                        f"(precision {self._precision}); try device cpu")
                yield out
        elapsed = time.perf_counter() - start
        log.info("open_clip %s: embedded %d images in %.1f s (%.1f images/s, %s, %s, "
                 "batch %d, %d workers)", self.model_name, total, elapsed,
                 total / max(elapsed, 1e-9), device, self._precision, bs, runtime.workers)

    def provenance(self) -> dict:
        """encoder, model, pretrained, dim, normalised (False), precision, image_size,
        preprocess (open_clip's validation-transform settings)."""
        if self._model is None:
            self.load("cpu")
        return {"encoder": "open_clip", "model": self.model_name,
                "pretrained": self.pretrained, "dim": self._dim, "normalised": False,
                "precision": self._precision, "image_size": self._image_size,
                "preprocess": self._preprocess}

