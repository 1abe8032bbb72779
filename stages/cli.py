"""The whole `lra` app with every command registered (tests and Python callers import
it; the console script, stages.launch, loads only the command it runs).

Commands register in pipeline order (stages.launch.COMMANDS), which is the order
`lra --help` lists them in, and each gets the first sentence of its docstring as the
listing's one-line summary."""

from __future__ import annotations

import importlib

from stages.app import app, set_short_help
from stages.launch import COMMANDS

for _name in COMMANDS:
    importlib.import_module(f"stages.{_name}")
set_short_help(app)

__all__ = ["app"]
