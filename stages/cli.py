"""The whole `lra` app with every command registered (tests and Python callers import
it; the console script, stages.launch, loads only the command it runs)."""

from __future__ import annotations

from stages import (  # noqa: F401
    embed, evaluate, index, noise, prepare, preset, report, retrieve, train)
from stages.app import app  # noqa: F401

