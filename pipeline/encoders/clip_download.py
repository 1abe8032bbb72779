"""Finding open_clip weights on disk, and downloading them only when the source answers.

The Hugging Face cache and open_clip's legacy URL cache are searched without any network
access. A download is attempted only after a quick reachability probe (DNS + TCP connect,
~3 s at most, through the HTTPS proxy if one is configured): open_clip's own download
path retries for ~46 s before failing when the Hub cannot be reached. When offline
(HF_HUB_OFFLINE=1 or the probe fails) `require_online` raises `ArtifactError` at once.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
import urllib.parse
import urllib.request
from pathlib import Path

from pipeline.errors import ArtifactError

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 3.0


def one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def hub_cache_dir(cache_dir: str | None) -> str:
    if cache_dir:
        return cache_dir
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _hf_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hf_endpoint() -> str:
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
            result.append(one_line(exc, 120))

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


def require_online(url: str, what: str, hint: str) -> None:
    """Raise ArtifactError at once unless a download from `url` can be attempted."""
    if _hf_offline():
        why = "HF_HUB_OFFLINE is set"
    else:
        why = _reachability(url)
        if why is None:
            return
    raise ArtifactError(f"{what} not found locally and cannot be downloaded ({why}); {hint}")


def hf_cached(repo_id: str, filenames: list[str], cache_dir: str | None) -> str | None:
    """First of `filenames` present in the local Hugging Face cache (no network)."""
    from huggingface_hub import try_to_load_from_cache

    for name in filenames:
        found = try_to_load_from_cache(repo_id, name, cache_dir=cache_dir)
        if isinstance(found, str) and os.path.isfile(found):
            return found
    return None


def hf_download(repo_id: str, filenames: list[str], cache_dir: str | None) -> str:
    """Download the first of `filenames` that the repo has; ArtifactError if none."""
    from huggingface_hub import hf_hub_download
    from open_clip.version import __version__

    errors = []
    for name in filenames:
        try:
            return hf_hub_download(repo_id, name, cache_dir=cache_dir,
                                   library_name="open_clip", library_version=__version__)
        except Exception as exc:  # noqa: BLE001 - any hub failure becomes one line below
            errors.append(f"{name}: {one_line(exc, 150)}")
    raise ArtifactError(f"download from Hugging Face repo {repo_id} failed "
                        f"({'; '.join(errors)})")


def weight_names(filename: str) -> list[str]:
    """open_clip's preference: a .safetensors twin first, then the named file."""
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    names = []
    if filename == HF_WEIGHTS_NAME:
        names.append(HF_SAFE_WEIGHTS_NAME)
    elif filename.endswith((".bin", ".pth")):
        names.append(filename[:-4] + ".safetensors")
    return names + [filename]


def url_cached(url: str, cache_dir: str | None) -> tuple[str, bool] | None:
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

