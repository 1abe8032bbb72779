"""`lra preset list | show NAME | apply NAME`: the paper's experiments in one line."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
import yaml

from pipeline.artifacts import atomic_path
from pipeline.params_io import read_yaml
from pipeline.errors import ConfigError
from pipeline.presets import apply_preset, load_preset, preset_names, preset_updates
from pipeline.yaml_edit import set_leaves
from stages.app import app, stage

preset_app = typer.Typer(help="Presets for the paper's experiments: CIFAR-10/100 PMD and "
                              "hybrid noise, Food-101N, mini-WebVision, Clothing1M and "
                              "Animal-10N.",
                         short_help="Params presets for the paper's experiments (lra preset "
                                    "list).",
                         no_args_is_help=True)
app.add_typer(preset_app, name="preset")


@preset_app.command("list")
def list_presets() -> None:
    """List presets with the accuracy the paper reports for each."""
    with stage("preset"):
        for name in preset_names():
            info = load_preset(name)["reported"]
            reported = info.get("lra_diffusion")
            shown = "n/a" if reported is None else f"{reported:.2f} %"
            if info.get("lra_diffusion_ilsvrc12") is not None:  # webvision's second test set
                shown += f" ({info['lra_diffusion_ilsvrc12']:.2f} % on ILSVRC12 val)"
            noise = f" (noise: {info['paper_noise']})" if info.get("paper_noise") else ""
            typer.echo(f"{name:<22} paper LRA-diffusion test accuracy: {shown}{noise}")


@preset_app.command("show")
def show(name: str) -> None:
    """Print a preset's params and reported numbers."""
    with stage("preset"):
        typer.echo(yaml.safe_dump(load_preset(name), sort_keys=False).rstrip())


@preset_app.command("apply")
def apply(name: str,
          root: Annotated[str | None, typer.Option(
              help="Dataset directory, or manifest file (data.root); must exist.")] = None,
          params: Annotated[Path, typer.Option("--params", help="params file to update.")]
          = Path("params.yaml"),
          noise_file: Annotated[str | None, typer.Option(
              help="The authors' released noise labels for this setting (e.g. "
                   "noise_label/cifar10-1-0.35.npy), used instead of PMD from this "
                   "project's linear probe: the paper's numbers were measured on those "
                   "files (see `lra preset list`).")] = None) -> None:
    """Merge a preset into params.yaml, keeping its comments."""
    with stage("preset"):
        if root is not None and not Path(root).exists():
            raise ConfigError(f"--root {root}: no such file or directory; give the dataset's "
                              "directory (or the manifest file)")
        text = params.read_text() if params.exists() else ""
        current = read_yaml(text) if text else {}
        if noise_file is not None and not Path(noise_file).is_file():
            raise ConfigError(f"--noise-file {noise_file}: no such file")
        merged = apply_preset(current or {}, name, root=root, noise_file=noise_file)
        updates = preset_updates(name, root=root, noise_file=noise_file)
        try:
            new_text = set_leaves(text, updates, parse=read_yaml)
        except ValueError as exc:  # a layout the line editor does not handle
            logging.getLogger(__name__).warning("%s: comments not kept (%s)", params, exc)
            new_text = yaml.safe_dump(merged, sort_keys=False)
        with atomic_path(params) as tmp:
            tmp.write_text(new_text)
        typer.echo(f"{params}: preset {name} applied; run `uv run dvc repro` "
                   "(or `uv run dvc exp run` to keep it as an experiment)")
