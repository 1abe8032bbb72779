"""The whole `lra` app with every command registered (tests and Python callers import
it; the console script, stages.launch, loads only the command it runs)."""

from __future__ import annotations

from stages import (embed, evaluate, export, index, noise, predict, prepare,  # noqa: F401
                    preset, report, retrieve, train, validate)
from stages.app import app  # noqa: F401

