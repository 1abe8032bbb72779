"""The trained model's checkpoint: weights plus everything evaluation needs to use them
(network spec, feature normaliser, schedule length, DDIM steps, readout, provenance)."""

from __future__ import annotations

import io
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
    buf = io.BytesIO()
    torch.save(payload, buf)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())


def load_checkpoint(path: str | Path, *, device: str = "cpu"
                    ) -> tuple[DiffusionClassifier, dict[str, Any]]:
    """Rebuild the network in eval mode on `device`; returns (model, payload)."""
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"missing model checkpoint: {path} (run `lra train` first)")
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # torch raises several types for a corrupt file
        raise ArtifactError(f"{path} is not a readable checkpoint: {exc}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ArtifactError(f"{path} is not an {FORMAT} checkpoint; rerun `lra train`")
    model = DiffusionClassifier(ModelSpec(**payload["spec"])).to(device)
    model.load_state_dict(payload["state_dict"])
    model.eval()
    payload["normalizer"] = FeatureNormalizer.from_dict(payload["normalizer"])
    return model, payload
