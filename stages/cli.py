"""The whole `lra` app with every command registered (tests and Python callers import
it; the console script, stages.launch, loads only the command it runs)."""

from __future__ import annotations

from stages import (embed, evaluate, index, noise, prepare, preset, retrieve,  # noqa: F401
                    train, validate)
from stages.app import app  # noqa: F401

