"""Resolving `embed.model` / `embed.pretrained` to local inputs for open_clip.

Weight sources (`model`, `pretrained`):
    "ViT-L-14-quickgelu", "openai"      built-in architecture + open_clip pretrained tag
    "ViT-B-32", "/path/to/weights.bin"  built-in architecture + local checkpoint file
    "hf-hub:org/repo", None             open_clip config + weights from a Hugging Face repo
    "local-dir:/path/to/dir", None      open_clip_config.json + checkpoint in a folder
    "ViT-B-32", None                    random weights (tests only; seeded, reproducible)
The `hf-hub:` / `local-dir:` forms are also accepted as `pretrained` (then they name the
weights and `model` is only a label).

Every remote source is resolved to a local file first (`pipeline.encoders.clip_download`:
caches without network, then a download only if the source answers), so open_clip itself
is only ever given local files: it never touches the network and never silently falls
back to random weights. Offline, a one-line `ArtifactError` says how to pass a local
checkpoint.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.encoders.clip_download import (hf_cached, hf_download, hf_endpoint,
                                             hub_cache_dir, one_line, require_online,
                                             url_cached, weight_names)
from pipeline.errors import ArtifactError, ConfigError

log = logging.getLogger(__name__)

HF_HUB_PREFIX = "hf-hub:"
LOCAL_DIR_PREFIX = "local-dir:"
HF_CONFIG_NAME = "open_clip_config.json"
CHECKPOINT_SUFFIXES = (".bin", ".pt", ".pth", ".safetensors", ".ckpt", ".npz")


@dataclass(frozen=True)
class Source:
    """What open_clip is given: only local things (a built-in name or `local-dir:`, and
    optionally a checkpoint file), plus the tag's preprocessing overrides."""

    model_name: str
    checkpoint: str | None = None
    preprocess: dict[str, Any] = field(default_factory=dict)
    # True only for checksum-verified files from open_clip's URL cache: OpenAI's
    # TorchScript archives (also what the paper's `clip.load` caches) need a full unpickle.
    trusted_archive: bool = False



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
    names = weight_names(filename or "open_clip_pytorch_model.bin") if repo_id else []
    found = hf_cached(repo_id, names, cache_dir) if repo_id else None
    if found:
        log.info("%s: using cached %s", what, found)
        return found, False
    cached = url_cached(url, cache_dir) if url else None
    if cached:
        log.info("%s: using cached %s", what, cached[0])
        return cached
    where = f"Hugging Face repo {repo_id} (cache {hub_cache_dir(cache_dir)})" if repo_id else url
    hint = _local_checkpoint_hint(name)
    if repo_id:
        require_online(hf_endpoint(), f"{what} ({where})", hint)
        log.info("%s: downloading from %s", what, where)
        try:
            return hf_download(repo_id, names, cache_dir), False
        except ArtifactError as exc:
            raise ArtifactError(f"{what}: {exc}; {hint}") from None
    require_online(url, f"{what} ({where})", hint)
    from open_clip.pretrained import download_pretrained_from_url

    try:
        verified = "openaipublic" in url or "mlfoundations" in url  # checksummed by open_clip
        return download_pretrained_from_url(url, cache_dir=cache_dir), verified
    except Exception as exc:  # noqa: BLE001 - reported as one line
        raise ArtifactError(f"{what}: download from {url} failed ({one_line(exc)}); "
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
    names = weight_names("open_clip_pytorch_model.bin")
    config = hf_cached(repo_id, [HF_CONFIG_NAME], cache_dir)
    weights = hf_cached(repo_id, names, cache_dir)
    if config is None or weights is None:
        what = f"open_clip model hf-hub:{repo_id} (cache {hub_cache_dir(cache_dir)})"
        hint = ("pass a local copy instead (embed.model: local-dir:/path/to/folder holding "
                f"{HF_CONFIG_NAME} and the weights, or embed.cache_dir: a Hugging Face cache "
                "that holds the repo)")
        require_online(hf_endpoint(), what, hint)
        try:
            config = config or hf_download(repo_id, [HF_CONFIG_NAME], cache_dir)
            weights = weights or hf_download(repo_id, names, cache_dir)
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
    """The checks of `resolve` that read no file and load nothing (model name, tag,
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


def resolve(model: str, pretrained: str | None, cache_dir: str | None) -> Source:
    """Map (model, pretrained) to local inputs for open_clip. Fails fast and offline-safe."""
    import open_clip

    for form in (model, pretrained):
        if form and form.startswith(HF_HUB_PREFIX):
            if form is model and pretrained:
                log.warning("embed.pretrained %r ignored: model %s names its own weights",
                            pretrained, model)
            return Source(_resolve_hf_repo(form[len(HF_HUB_PREFIX):], cache_dir))
        if form and form.startswith(LOCAL_DIR_PREFIX):
            if form is model and pretrained:
                log.warning("embed.pretrained %r ignored: model %s names its own weights",
                            pretrained, model)
            return Source(_checked_local_dir(form[len(LOCAL_DIR_PREFIX):]))

    name = _builtin_name(model)
    if pretrained is None:
        return Source(name)
    cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if cfg:
        _check_activation(model, name, pretrained, cfg)
        checkpoint, trusted = _resolve_tag(name, pretrained, cfg, cache_dir)
        keys = ("mean", "std", "interpolation", "resize_mode")
        return Source(name, checkpoint, {k: cfg[k] for k in keys if cfg.get(k) is not None},
                       trusted_archive=trusted)
    if os.path.isfile(pretrained):
        return Source(name, pretrained)
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

