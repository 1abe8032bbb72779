"""Presets: one-line setups for the paper's experiments (pipeline/presets/*.yaml).

Each preset file holds `params` (a partial params.yaml: only the keys that differ for
that experiment) and `reported` (the test accuracy the paper reports, so a user can see
how close they got). `apply_preset` deep-merges a preset onto an existing params mapping
and validates the result.
"""

from __future__ import annotations

import copy
from importlib import resources
from typing import Any


from pipeline.params_io import params_from_dict, read_yaml
from pipeline.errors import ConfigError


def _files() -> dict[str, Any]:
    folder = resources.files("pipeline") / "presets"
    return {p.name.removesuffix(".yaml"): p for p in folder.iterdir() if p.name.endswith(".yaml")}


def preset_names() -> list[str]:
    return sorted(_files())


def load_preset(name: str) -> dict[str, Any]:
    """{"params": {...}, "reported": {...}} of one preset; ConfigError if unknown."""
    files = _files()
    if name not in files:
        raise ConfigError(f"unknown preset {name!r}; valid: {', '.join(sorted(files))}")
    data = read_yaml(files[name].read_text())
    return {"params": data.get("params") or {}, "reported": data.get("reported") or {}}


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """A new mapping: `update` laid over `base`, recursing into nested mappings."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def preset_updates(name: str, *, root: str | None = None, noise_file: str | None = None
                   ) -> dict[str, Any]:
    """The keys `lra preset apply` sets: the preset's params, data.root, and with a
    noise file (the authors' released labels) noise.file: kind pmd becomes kind file,
    kind hybrid keeps its second noise and takes the file as its PMD step."""
    updates = load_preset(name)["params"]
    if root is not None:
        updates = deep_merge(updates, {"data": {"root": root}})
    if noise_file is not None:
        kind = updates.get("noise", {}).get("kind")
        if kind not in ("pmd", "hybrid"):
            raise ConfigError(f"--noise-file: preset {name!r} has noise.kind {kind!r}; a "
                              "noise file replaces PMD labels (presets with pmd or hybrid)")
        updates = deep_merge(updates, {"noise": {"file": noise_file,
                                                 "kind": "file" if kind == "pmd" else kind}})
    return updates


def apply_preset(current: dict[str, Any], name: str, *, root: str | None = None,
                 noise_file: str | None = None) -> dict[str, Any]:
    """Merge preset `name` (see `preset_updates`) onto `current`; validate."""
    merged = deep_merge(current, preset_updates(name, root=root, noise_file=noise_file))
    params_from_dict(merged)  # raises ConfigError naming the bad key
    return merged
