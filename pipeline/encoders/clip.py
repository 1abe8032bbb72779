"""`open_clip`: frozen CLIP image features f_p(x) (the paper's best: ViT-L/14, 768-d).

Features are the raw image-tower outputs (`encode_image(normalize=False)`), NOT
L2-normalised, as in the released code; later stages normalise where they need cosine.
Images go through open_clip's *validation* transform (resize + centre crop, no random
augmentation) with the model in eval mode, so embeddings are deterministic.

Weight sources (`model`, `pretrained`):
    "ViT-L-14-quickgelu", "openai"      built-in architecture + open_clip pretrained tag
    "ViT-B-32", "/path/to/weights.bin"  built-in architecture + local checkpoint file
    "hf-hub:org/repo", None             open_clip config + weights from a Hugging Face repo
    "local-dir:/path/to/dir", None      open_clip_config.json + checkpoint in a folder
    "ViT-B-32", None                    random weights (tests only; seeded, reproducible)
The `hf-hub:` / `local-dir:` forms are also accepted as `pretrained` (then they name the
weights and `model` is only a label).

Offline behaviour: open_clip's own download path retries for ~46 s before failing when
the Hub cannot be reached. Here every remote source is resolved to a local file first:
the Hugging Face cache (`cache_dir`, else the default hub cache) and open_clip's legacy URL
cache are searched without any network access; only when the file is absent is the Hub
contacted, and only after a quick reachability probe (DNS + TCP connect, ~3 s at most,
through the HTTPS proxy if one is configured). When offline (HF_HUB_OFFLINE=1 or the probe
fails) `ArtifactError` is raised at once with a one-line message saying how to pass a
local checkpoint. With internet access the normal download happens (into `cache_dir`).
open_clip itself is then only ever given local files, so it never touches the network and
never silently falls back to random weights.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import logging
import os
import socket
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.encoders import RuntimeOptions
from pipeline.errors import ArtifactError, ConfigError
from pipeline.images import open_image

log = logging.getLogger(__name__)

HF_HUB_PREFIX = "hf-hub:"
LOCAL_DIR_PREFIX = "local-dir:"
HF_CONFIG_NAME = "open_clip_config.json"
CHECKPOINT_SUFFIXES = (".bin", ".pt", ".pth", ".safetensors", ".ckpt", ".npz")
PROBE_TIMEOUT_S = 3.0
RANDOM_WEIGHTS_SEED = 0


# --------------------------------------------------------------------------- resolution

@dataclass(frozen=True)
class _Source:
    """What open_clip is given: only local things (a built-in name or `local-dir:`, and
    optionally a checkpoint file), plus the tag's preprocessing overrides."""

    model_name: str
    checkpoint: str | None = None
    preprocess: dict[str, Any] = field(default_factory=dict)
    # True only for checksum-verified files from open_clip's URL cache: OpenAI's
    # TorchScript archives (also what the paper's `clip.load` caches) need a full unpickle.
    trusted_archive: bool = False


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _hub_cache_dir(cache_dir: str | None) -> str:
    if cache_dir:
        return cache_dir
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _hf_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _hf_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _probe(host: str, port: int, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None when a TCP connection to host:port opens within `timeout` seconds (DNS
    included: getaddrinfo ignores socket timeouts, so it runs in a daemon thread);
    otherwise a short reason."""
    result: list[str | None] = []

    def attempt() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(None)
        except OSError as exc:
            result.append(_one_line(exc, 120))

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(timeout)
    if not result:
        return f"no answer within {timeout:g} s"
    return result[0]


def _reachability(url: str) -> str | None:
    """None if `url`'s host (or the HTTPS proxy in front of it) answers; else why not."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    proxies = urllib.request.getproxies()
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if proxy and not urllib.request.proxy_bypass(host):
        p = urllib.parse.urlsplit(proxy if "://" in proxy else "http://" + proxy)
        reason = _probe(p.hostname or "", p.port or 80)
        if reason is None:
            return None
        return f"proxy {p.hostname}:{p.port or 80} unreachable: {reason}"
    reason = _probe(host, port)
    return None if reason is None else f"{host} unreachable: {reason}"


def _require_online(url: str, what: str, hint: str) -> None:
    """Raise ArtifactError at once unless a download from `url` can be attempted."""
    if _hf_offline():
        why = "HF_HUB_OFFLINE is set"
    else:
        why = _reachability(url)
        if why is None:
            return
    raise ArtifactError(f"{what} not found locally and cannot be downloaded ({why}); {hint}")


def _hf_cached(repo_id: str, filenames: list[str], cache_dir: str | None) -> str | None:
    """First of `filenames` present in the local Hugging Face cache (no network)."""
    from huggingface_hub import try_to_load_from_cache

    for name in filenames:
        found = try_to_load_from_cache(repo_id, name, cache_dir=cache_dir)
        if isinstance(found, str) and os.path.isfile(found):
            return found
    return None


def _hf_download(repo_id: str, filenames: list[str], cache_dir: str | None) -> str:
    """Download the first of `filenames` that the repo has; ArtifactError if none."""
    from huggingface_hub import hf_hub_download
    from open_clip.version import __version__

    errors = []
    for name in filenames:
        try:
            return hf_hub_download(repo_id, name, cache_dir=cache_dir,
                                   library_name="open_clip", library_version=__version__)
        except Exception as exc:  # noqa: BLE001 - any hub failure becomes one line below
            errors.append(f"{name}: {_one_line(exc, 150)}")
    raise ArtifactError(f"download from Hugging Face repo {repo_id} failed "
                        f"({'; '.join(errors)})")


def _weight_names(filename: str) -> list[str]:
    """open_clip's preference: a .safetensors twin first, then the named file."""
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    names = []
    if filename == HF_WEIGHTS_NAME:
        names.append(HF_SAFE_WEIGHTS_NAME)
    elif filename.endswith((".bin", ".pth")):
        names.append(filename[:-4] + ".safetensors")
    return names + [filename]


def _url_cached(url: str, cache_dir: str | None) -> tuple[str, bool] | None:
    """open_clip's legacy URL cache (`cache_dir` or ~/.cache/clip; the OpenAI `clip`
    package caches there too) -> (file, checksum verified), checked the way open_clip
    checks it; None if absent or its checksum does not match."""
    target = Path(cache_dir or os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
    if not target.is_file():
        return None
    name = os.path.basename(url)
    if "openaipublic" in url:
        expected = url.split("/")[-2]
    elif "mlfoundations" in url:
        expected = os.path.splitext(name)[0].split("-")[-1]
    else:
        return str(target), False
    digest = hashlib.sha256()
    with open(target, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    if not digest.hexdigest().startswith(expected):
        log.warning("%s does not match its SHA256 %s; ignoring it", target, expected)
        return None
    return str(target), True


def _local_checkpoint_hint(model: str) -> str:
    return (f"pass a local checkpoint instead (embed.pretrained: "
            f"/path/to/open_clip_pytorch_model.bin for {model}, or embed.cache_dir: a "
            f"Hugging Face / open_clip cache that holds it)")


def _resolve_tag(name: str, tag: str, cfg: dict[str, Any], cache_dir: str | None
                 ) -> tuple[str, bool]:
    """A pretrained tag -> (local checkpoint file, came from the verified URL cache).
    Caches first (no network), then a download if the source is reachable."""
    what = f"open_clip weights for model {name!r} tag {tag!r}"
    hf_hub = cfg.get("hf_hub", "")
    url = cfg.get("url", "")
    if cfg.get("file"):
        return cfg["file"], False
    repo_id, filename = os.path.split(hf_hub) if hf_hub else ("", "")
    names = _weight_names(filename or "open_clip_pytorch_model.bin") if repo_id else []
    found = _hf_cached(repo_id, names, cache_dir) if repo_id else None
    if found:
        log.info("%s: using cached %s", what, found)
        return found, False
    cached = _url_cached(url, cache_dir) if url else None
    if cached:
        log.info("%s: using cached %s", what, cached[0])
        return cached
    where = f"Hugging Face repo {repo_id} (cache {_hub_cache_dir(cache_dir)})" if repo_id else url
    hint = _local_checkpoint_hint(name)
    if repo_id:
        _require_online(_hf_endpoint(), f"{what} ({where})", hint)
        log.info("%s: downloading from %s", what, where)
        try:
            return _hf_download(repo_id, names, cache_dir), False
        except ArtifactError as exc:
            raise ArtifactError(f"{what}: {exc}; {hint}") from None
    _require_online(url, f"{what} ({where})", hint)
    from open_clip.pretrained import download_pretrained_from_url

    try:
        verified = "openaipublic" in url or "mlfoundations" in url  # checksummed by open_clip
        return download_pretrained_from_url(url, cache_dir=cache_dir), verified
    except Exception as exc:  # noqa: BLE001 - reported as one line
        raise ArtifactError(f"{what}: download from {url} failed ({_one_line(exc)}); "
                            f"{hint}") from None


def _checked_local_dir(path: str) -> str:
    """`local-dir:` folder must hold open_clip_config.json and a checkpoint (open_clip
    would otherwise only warn and use random weights)."""
    folder = Path(path)
    if not folder.is_dir():
        raise ArtifactError(f"open_clip local-dir {path} is not a directory")
    config = folder / HF_CONFIG_NAME
    if not config.is_file():
        raise ArtifactError(f"open_clip local-dir {path} lacks {HF_CONFIG_NAME}")
    try:
        if "model_cfg" not in json.loads(config.read_text(encoding="utf-8")):
            raise ArtifactError(f"{config} has no 'model_cfg' entry")
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{config} is not valid JSON: {exc}") from None
    if not any(True for s in (".safetensors", ".bin", ".pth") for _ in folder.glob(f"*{s}")):
        raise ArtifactError(f"open_clip local-dir {path} holds no checkpoint "
                            f"(*.safetensors, *.bin or *.pth)")
    return LOCAL_DIR_PREFIX + str(folder)


def _resolve_hf_repo(repo_id: str, cache_dir: str | None) -> str:
    """`hf-hub:org/repo` -> `local-dir:<snapshot folder>` holding config + weights."""
    if not repo_id.strip("/"):
        raise ConfigError("embed: 'hf-hub:' needs a repository, e.g. hf-hub:org/repo")
    names = _weight_names("open_clip_pytorch_model.bin")
    config = _hf_cached(repo_id, [HF_CONFIG_NAME], cache_dir)
    weights = _hf_cached(repo_id, names, cache_dir)
    if config is None or weights is None:
        what = f"open_clip model hf-hub:{repo_id} (cache {_hub_cache_dir(cache_dir)})"
        hint = ("pass a local copy instead (embed.model: local-dir:/path/to/folder holding "
                f"{HF_CONFIG_NAME} and the weights, or embed.cache_dir: a Hugging Face cache "
                "that holds the repo)")
        _require_online(_hf_endpoint(), what, hint)
        try:
            config = config or _hf_download(repo_id, [HF_CONFIG_NAME], cache_dir)
            weights = weights or _hf_download(repo_id, names, cache_dir)
        except ArtifactError as exc:
            raise ArtifactError(f"{exc}; {hint}") from None
    if os.path.dirname(config) != os.path.dirname(weights):
        raise ArtifactError(f"hf-hub:{repo_id}: config and weights come from different "
                            f"revisions ({config}, {weights}); clear that repo from the cache")
    return _checked_local_dir(os.path.dirname(config))


def _builtin_name(model: str) -> str:
    import open_clip

    name = model.replace("/", "-")  # open_clip accepts "ViT-L/14" for "ViT-L-14"
    if name not in open_clip.list_models():
        close = difflib.get_close_matches(name, open_clip.list_models(), n=3, cutoff=0.6)
        raise ConfigError(
            f"embed.model: {model!r} is not an open_clip model"
            + (f" (did you mean {', '.join(close)}?)" if close else "")
            + "; see python -c 'import open_clip; print(open_clip.list_models())', "
              "or use hf-hub:org/repo / local-dir:/path")
    return name


def _check_activation(model: str, name: str, pretrained: str, cfg: dict) -> None:
    import open_clip

    model_quick = bool((open_clip.get_model_config(name) or {}).get("quick_gelu", False))
    tag_quick = bool(cfg.get("quick_gelu", False))
    if model_quick != tag_quick:
        other = name + "-quickgelu" if tag_quick else name.removesuffix("-quickgelu")
        raise ConfigError(
            f"embed: tag {pretrained!r} was trained with "
            f"{'QuickGELU' if tag_quick else 'GELU'} but model {model!r} uses "
            f"{'QuickGELU' if model_quick else 'GELU'}; use model {other!r}")


def check_names(model: str, pretrained: str | None) -> None:
    """The checks of `_resolve` that read no file and load nothing (model name, tag,
    activation): run before a stage creates anything (the embedding cache)."""
    import open_clip

    for form in (model, pretrained):
        if form and form.startswith((HF_HUB_PREFIX, LOCAL_DIR_PREFIX)):
            return
    name = _builtin_name(model)
    if pretrained is None:
        return
    cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if cfg:
        _check_activation(model, name, pretrained, cfg)
    elif not os.path.isfile(pretrained):
        _check_pretrained_file_or_tag(name, pretrained)


def _resolve(model: str, pretrained: str | None, cache_dir: str | None) -> _Source:
    """Map (model, pretrained) to local inputs for open_clip. Fails fast and offline-safe."""
    import open_clip

    for form in (model, pretrained):
        if form and form.startswith(HF_HUB_PREFIX):
            if form is model and pretrained:
                log.warning("embed.pretrained %r ignored: model %s names its own weights",
                            pretrained, model)
            return _Source(_resolve_hf_repo(form[len(HF_HUB_PREFIX):], cache_dir))
        if form and form.startswith(LOCAL_DIR_PREFIX):
            if form is model and pretrained:
                log.warning("embed.pretrained %r ignored: model %s names its own weights",
                            pretrained, model)
            return _Source(_checked_local_dir(form[len(LOCAL_DIR_PREFIX):]))

    name = _builtin_name(model)
    if pretrained is None:
        return _Source(name)
    cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if cfg:
        _check_activation(model, name, pretrained, cfg)
        checkpoint, trusted = _resolve_tag(name, pretrained, cfg, cache_dir)
        keys = ("mean", "std", "interpolation", "resize_mode")
        return _Source(name, checkpoint, {k: cfg[k] for k in keys if cfg.get(k) is not None},
                       trusted_archive=trusted)
    if os.path.isfile(pretrained):
        return _Source(name, pretrained)
    _check_pretrained_file_or_tag(name, pretrained)
    raise AssertionError("unreachable")  # pragma: no cover


def _check_pretrained_file_or_tag(name: str, pretrained: str) -> None:
    """`pretrained` is neither a known tag nor an existing file: say which was meant."""
    import open_clip

    if os.sep in pretrained or "/" in pretrained or pretrained.endswith(CHECKPOINT_SUFFIXES):
        raise ArtifactError(f"embed.pretrained: checkpoint file {pretrained} not found "
                            f"(cwd {os.getcwd()})")
    tags = open_clip.list_pretrained_tags_by_model(name)
    raise ConfigError(
        f"embed.pretrained: {pretrained!r} is not a pretrained tag of {name} nor a file; "
        + (f"valid tags: {', '.join(tags[:8])}{', ...' if len(tags) > 8 else ''}"
           if tags else f"{name} has no pretrained tags in open_clip")
        + " (open_clip.list_pretrained_tags_by_model), or a local checkpoint path")


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
            return i, None, f"{type(exc).__name__}: {_one_line(exc, 200)}"


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
            source = _resolve(self.model_name, self.pretrained, self.cache_dir)
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

    def _build(self, source: _Source) -> tuple[Any, Any]:
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
                                f"{_one_line(exc)}") from exc
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
