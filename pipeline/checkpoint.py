"""The trained model's checkpoint: weights plus everything evaluation needs to use them
(network spec, feature normaliser, schedule length, DDIM steps, readout, provenance)."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import torch

from pipeline.artifacts import atomic_path
from pipeline.errors import ArtifactError
from pipeline.features import FeatureNormalizer
from pipeline.model import DiffusionClassifier, ModelSpec

FORMAT = "lra-diffusion-checkpoint/1"


def save_checkpoint(path: str | Path, *, spec: ModelSpec, state_dict: dict[str, torch.Tensor],
                    normalizer: FeatureNormalizer, ddim_steps: int, readout: str,
                    info: dict[str, Any]) -> None:
    """Write atomically. The payload holds tensors and plain Python values only, so it
    loads with torch.load(weights_only=True)."""
    payload = {"format": FORMAT, "spec": spec.to_dict(), "state_dict": state_dict,
               "normalizer": normalizer.to_dict(), "ddim_steps": ddim_steps,
               "readout": readout, "info": info}
    payload["digest"] = _digest(payload)
    buf = io.BytesIO()
    torch.save(payload, buf)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())


def _digest(payload: dict[str, Any]) -> str:
    """sha256 of everything in the payload: the tensors' bytes and the rest as JSON.
    torch.load does not verify the stored tensors, so damage there would load silently."""
    h = hashlib.sha256()
    rest = {k: v for k, v in payload.items() if k not in ("state_dict", "digest")}
    h.update(json.dumps(rest, sort_keys=True, default=str).encode())
    for name in sorted(payload["state_dict"]):
        tensor = payload["state_dict"][name].detach().cpu().contiguous()
        h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        h.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _damaged(path: Path, why: str) -> ArtifactError:
    return ArtifactError(f"model checkpoint at {path} is damaged ({why}); `lra train` "
                         "rebuilds it")


def load_checkpoint(path: str | Path, *, device: str = "cpu"
                    ) -> tuple[DiffusionClassifier, dict[str, Any]]:
    """Rebuild the network in eval mode on `device`; returns (model, payload)."""
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"missing model checkpoint: {path} (run `lra train` first)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a damaged file
        # Not torch's message: for a damaged file it is a page of weights_only advice.
        raise _damaged(path, f"torch.load failed: {type(exc).__name__}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ArtifactError(f"{path} is not an {FORMAT} checkpoint; rerun `lra train`")
    if "digest" not in payload:
        raise ArtifactError(f"model checkpoint at {path} carries no digest (written before "
                            "they were recorded); `lra train` rebuilds it")
    try:
        intact = payload.get("digest") == _digest(payload)
    except Exception:  # noqa: BLE001 - a payload of the wrong shapes
        intact = False
    if not intact:
        raise _damaged(path, "its contents do not match the digest stored with them")
    try:
        model = DiffusionClassifier(ModelSpec(**payload["spec"]))
        model.load_state_dict(payload["state_dict"])
        payload["normalizer"] = FeatureNormalizer.from_dict(payload["normalizer"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise _damaged(path, f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
                       ) from None
    model = model.to(device)
    model.eval()
    return model, payload
