"""Shared test setup: offline, quiet, single-threaded environment; a reduced params set;
one full pipeline run (in-process, through the CLI) reused by the CLI and DVC tests."""

from __future__ import annotations

import os

# Before anything imports huggingface_hub, torch or the CLI: no 46 s hub retries, no
# progress bars, one thread (deterministic and kind to a shared 2-core machine). The
# `lra` subprocesses started by the DVC tests inherit these.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["LRA_PROGRESS"] = "0"  # Typer reads it as a bool: "0" / "false" mean off
os.environ["LRA_THREADS"] = "1"
os.environ.setdefault("LRA_DEVICE", "cpu")  # runtime knob; outputs compared across runs

import hashlib
import logging
import shutil
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import pytest
import torch
import yaml

from pipeline.presets import deep_merge

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent  # where `lra` and `dvc` are installed

STAGES = ("prepare", "embed", "index", "noise", "retrieve", "train", "evaluate", "report")

# A reduced configuration of the default (digits) pipeline: seconds, not minutes, and
# still a model that learns (0.9 test accuracy at 40 % symmetric noise, not chance).
SMALL = {
    "data": {"source": "digits"},
    "train": {"epochs": 30, "feature_dim": 64, "batch_size": 64, "eval_every": 5,
              "warmup_epochs": 1},
    "evaluate": {"linear_iters": 50},
    "report": {"samples": 4, "gallery_items": 6, "gallery_neighbours": 5},
}

# Every artifact of the pipeline, relative to the working directory, as in dvc.yaml.
ARTIFACTS = {
    "samples": "data/prepared/samples.parquet",
    "rejects": "data/prepared/rejects.parquet",
    "summary": "data/prepared/summary.json",
    "embeddings": "data/embeddings/embeddings.parquet",
    "index_raw": "data/index/raw.faiss",
    "index_center": "data/index/center.faiss",
    "index_standardize": "data/index/standardize.faiss",
    "index_json": "data/index/index.json",
    "labels": "data/labels/labels.parquet",
    "noise_json": "data/labels/noise.json",
    "neighbours": "data/retrieval/neighbours.parquet",
    "retrieval_json": "data/retrieval/retrieval.json",
    "model": "data/model/model.pt",
    "train_json": "data/model/train.json",
    "train_log": "data/model/train_log.csv",
    "predictions": "data/evaluate/predictions.parquet",
    "metrics": "data/evaluate/metrics.json",
    "confusion": "data/evaluate/confusion.csv",
    "label_issues": "data/report/label_issues.parquet",
    "report_json": "data/report/report.json",
    "report_html": "data/report/index.html",
}
FOLDERS = {"index": "data/index"}
"""Artifact folders a stage option names (`lra index` writes one file per space)."""


# --------------------------------------------------------------------------- threads
@pytest.fixture(autouse=True)
def _one_thread():
    """One torch / FAISS thread in-process: deterministic reductions, and no thread
    oversubscription on a 2-core machine that also runs the `lra` subprocesses."""
    before = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    yield
    torch.set_num_threads(before[0])
    faiss.omp_set_num_threads(before[1])


# --------------------------------------------------------------------------- params
def small_params(**sections: dict) -> dict:
    """The repository's params.yaml with the SMALL overrides, then `sections` merged in
    (e.g. small_params(noise={"rate": 0.6})). Built from params.yaml, so new keys follow."""
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    return deep_merge(deep_merge(base, SMALL), sections)


def write_params(path: Path, params: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


# --------------------------------------------------------------------------- running
def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def run(cmd: Sequence[str], cwd: Path, *, check: bool = True, timeout: float = 600,
        **env: str) -> subprocess.CompletedProcess:
    """Run a command with the venv first on PATH; on `check`, fail with its output."""
    proc = subprocess.run(list(cmd), cwd=cwd, env=subprocess_env(**env), text=True,
                          capture_output=True, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited with {proc.returncode}\n"
                    f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    return proc


def invoke(args: Sequence[str], *, env: dict[str, str] | None = None):
    """Run `lra ARGS` in-process with typer's CliRunner; stdout and stderr separate.

    The stage commands point logging at the runner's (temporary) stderr; the root
    logger's handlers are restored afterwards so later log calls do not hit a closed
    stream.
    """
    from typer.testing import CliRunner

    from stages.cli import app

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        return CliRunner().invoke(app, [str(a) for a in args], env=env)
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


# --------------------------------------------------------------------------- checks
def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def hashes(root: Path, rel_paths: Iterable[str]) -> dict[str, str]:
    return {rel: sha256(root / rel) for rel in rel_paths}


def files_under(directory: Path) -> list[str]:
    """Every file below `directory` (relative, sorted); [] when it does not exist."""
    directory = Path(directory)
    if not directory.exists():
        return []
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


def temp_leftovers(directory: Path) -> list[str]:
    """Temporary files of the atomic writers (".<name>.XXXX.tmp") left below a directory."""
    return [f for f in files_under(directory)
            if Path(f).name.startswith(".") and Path(f).name.endswith(".tmp")]


def assert_one_line_error(stderr: str, stage: str, *needles: str) -> str:
    """stderr holds exactly one error line, `lra STAGE: error: ...`, containing every
    needle; every other line is the stage's own log line; no traceback. Returns it."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    prefix = f"lra {stage}: "
    errors = [line for line in lines if line.startswith(f"{prefix}error: ")]
    assert len(errors) == 1, f"expected one error line, got:\n{stderr}"
    assert all(line.startswith(prefix) for line in lines), f"unexpected stderr lines:\n{stderr}"
    for needle in needles:
        assert needle in errors[0], f"{needle!r} not in {errors[0]!r}"
    return errors[0]


# --------------------------------------------------------------------------- the pipeline
@dataclass(frozen=True)
class PipelineRun:
    """A complete pipeline run: `root / ARTIFACTS[name]` are its artifacts."""

    root: Path
    params_path: Path
    params: dict[str, Any]

    def path(self, name: str) -> Path:
        return self.root / (ARTIFACTS[name] if name in ARTIFACTS else FOLDERS[name])


def stage_args(stage: str, root: Path, params_path: Path) -> list[str]:
    """`lra STAGE` arguments that read and write everything below `root`."""
    a = {name: str(root / rel) for name, rel in {**FOLDERS, **ARTIFACTS}.items()}
    d = lambda name: str(Path(a[name]).parent)  # noqa: E731
    paths = {
        "prepare": ["--out-dir", d("samples")],
        "embed": ["--prepared", a["samples"], "--out-dir", d("embeddings")],
        "index": ["--embeddings", a["embeddings"], "--out-dir", a["index"]],
        "noise": ["--prepared", a["samples"], "--embeddings", a["embeddings"],
                  "--out-dir", d("labels")],
        "retrieve": ["--index", a["index"], "--embeddings", a["embeddings"],
                     "--labels", a["labels"], "--out-dir", d("neighbours")],
        "train": ["--embeddings", a["embeddings"], "--labels", a["labels"],
                  "--retrieval", a["neighbours"], "--index", a["index"],
                  "--out-dir", d("model")],
        "evaluate": ["--model", a["model"], "--embeddings", a["embeddings"],
                     "--labels", a["labels"], "--retrieval", a["neighbours"],
                     "--out-dir", d("metrics")],
        "report": ["--model", a["model"], "--embeddings", a["embeddings"],
                   "--labels", a["labels"], "--retrieval", a["neighbours"],
                   "--predictions", a["predictions"], "--prepared", a["samples"],
                   "--metrics", a["metrics"], "--train-log", a["train_log"],
                   "--noise-summary", a["noise_json"],
                   "--retrieval-summary", a["retrieval_json"], "--out-dir", d("report_json")],
    }[stage]
    return [stage, "--params", str(params_path), *paths]


@pytest.fixture(scope="session")
def pipeline_run(tmp_path_factory) -> PipelineRun:
    """The reduced pipeline run once, stage by stage through the CLI (in-process, so
    torch is imported once). Read-only for tests: copy what you want to change."""
    root = tmp_path_factory.mktemp("pipeline_run")
    params = small_params()
    params_path = write_params(root / "params.yaml", params)
    for stage in STAGES:
        result = invoke(stage_args(stage, root, params_path))
        assert result.exit_code == 0, (stage, result.stderr, result.exception)
    return PipelineRun(root=root, params_path=params_path, params=params)


@pytest.fixture
def run_copy(pipeline_run, tmp_path) -> PipelineRun:
    """A writable copy of the pipeline run's artifacts and params."""
    shutil.copytree(pipeline_run.root, tmp_path / "run")
    root = tmp_path / "run"
    return PipelineRun(root=root, params_path=root / "params.yaml", params=pipeline_run.params)
