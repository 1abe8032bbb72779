"""The `lra` console script and `python -m stages`: import only the stage that the
command line names, so `lra prepare`, `lra index` and `lra retrieve` never pay for
importing torch (seconds per stage under `dvc repro`). With no command, or `--help`,
every command is loaded so the help lists them all."""

from __future__ import annotations

import importlib
import sys

COMMANDS = ("validate", "prepare", "embed", "index", "noise", "retrieve", "train", "evaluate",
            "report", "preset", "predict", "export")


def main() -> None:
    name = next((arg for arg in sys.argv[1:] if not arg.startswith("-")), None)
    if name in COMMANDS:
        importlib.import_module(f"stages.{name}")
    else:
        importlib.import_module("stages.cli")
    from stages.app import app

    app()
