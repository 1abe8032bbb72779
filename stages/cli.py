"""The `lra` console script: one Typer app, one command per DVC stage."""

from __future__ import annotations

from stages import embed, evaluate, index, noise, prepare, preset, retrieve, train  # noqa: F401
from stages.app import app


def main() -> None:
    app()
