"""The DVC stages: one thin Typer command per stage (see stages.app, stages.launch)."""

import os

# OpenMP threads that spin while waiting turn any CPU contention into a collapse: with
# one core busy elsewhere, two torch threads ran a training step 33x slower (457 ms vs
# 14 ms); passive waiting costs nothing measurable when the machine is idle. Set before
# torch (libgomp reads it once, at load); a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
