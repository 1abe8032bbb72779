"""One consistent command line (issue 9): output folders are `--out-dir`, inputs are
named after their artifact, every path option has help, one chunk-size variable,
`--workers` / `--threads` / progress where work is done, `lra --version`, and only
the stage's own lines on stderr."""

from __future__ import annotations

import re
from importlib.metadata import version
from pathlib import Path

import pytest
import typer
from conftest import STAGES, VENV_BIN, invoke, run, small_params, stage_args, write_params

from stages.cli import app

COMMANDS = ("validate", *STAGES)


def _command(name: str):
    return typer.main.get_command(app).commands[name]


def _options(name: str) -> dict:
    """{first flag: option} (typer vendors its own click: duck-typed)."""
    return {opt.opts[0]: opt for opt in _command(name).params
            if getattr(opt, "param_type_name", "") == "option"}


def test_version():
    result = invoke(["--version"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"lra {version('lra-diffusion')}"


@pytest.mark.parametrize("name", COMMANDS)
def test_every_path_option_has_help_and_outputs_are_out_dir(name):
    opts = _options(name)
    for flag, opt in opts.items():
        if isinstance(opt.default, Path) or "path" in (opt.name or ""):
            assert opt.help, f"lra {name} {flag} has no help text"
    assert "--out-dir" in opts and "--out" not in opts, sorted(opts)
    assert not any(flag.endswith("-path") for flag in opts), sorted(opts)


def test_inputs_are_named_after_their_artifact():
    assert "--index" in _options("retrieve")
    for name, flags in {"evaluate": ("--model", "--embeddings", "--labels", "--retrieval"),
                        "train": ("--embeddings", "--labels", "--retrieval"),
                        "noise": ("--prepared", "--embeddings"), "embed": ("--prepared",),
                        "index": ("--embeddings",)}.items():
        assert set(flags) <= set(_options(name)), name


def test_one_chunk_rows_variable():
    for name in ("embed", "evaluate"):
        assert _options(name)["--chunk-rows"].envvar == "LRA_CHUNK_ROWS", name


@pytest.mark.parametrize("name", ["prepare", "embed"])
def test_workers_option_reads_lra_workers(name):
    assert _options(name)["--workers"].envvar == "LRA_WORKERS"


@pytest.mark.parametrize("name", ["prepare", "embed", "index", "noise", "retrieve", "train",
                                  "evaluate"])
def test_threads_and_progress_everywhere(name):
    opts = _options(name)
    assert opts["--threads"].envvar == "LRA_THREADS"
    assert opts["--progress"].envvar == "LRA_PROGRESS"


def test_prepare_honours_workers(tmp_path, monkeypatch):
    """`--workers N` (LRA_WORKERS) sets the image-checking processes (it started up to 16
    whatever was asked); the output does not depend on it."""
    from fixtures_datasets import make_imagefolder

    from pipeline.sources import parallel

    root = make_imagefolder(tmp_path, layout="flat")["root"]
    params = write_params(tmp_path / "params.yaml",
                          small_params(data={"source": "imagefolder", "root": str(root)}))
    seen = []
    real = parallel.worker_count
    monkeypatch.setattr(parallel, "worker_count", lambda: seen.append(real()) or seen[-1])
    outs = []
    for workers, env in (("1", None), (None, {"LRA_WORKERS": "2"})):
        out = tmp_path / f"p{len(outs)}"
        args = ["prepare", "--params", params, "--out-dir", out]
        result = invoke(args + (["--workers", workers] if workers else []), env=env)
        assert result.exit_code == 0, result.output
        outs.append((out / "samples.parquet").read_bytes())
    assert seen == [1, 2]
    assert outs[0] == outs[1]


@pytest.mark.parametrize("stage, total", [("prepare", None), ("embed", 1797), ("index", None),
                                          ("noise", 3), ("retrieve", 1797)])
def test_progress_bar_ends_at_100_percent(run_copy, stage, total):
    """--progress (LRA_PROGRESS) shows a bar on stderr that ends full; the embed bar used
    to end at `embed: 0%| 0/1797`."""
    result = invoke([*stage_args(stage, run_copy.root, run_copy.params_path), "--progress"])
    assert result.exit_code == 0, result.output
    bar = result.stderr.replace("\r", "\n")
    finals = [line for line in bar.splitlines() if line.startswith(stage) and "|" in line]
    assert finals, result.stderr
    assert "100%" in finals[-1], finals[-1]
    if total is not None:
        assert f"{total}/{total}" in finals[-1], finals[-1]


def test_stage_stderr_has_only_its_own_lines(pipeline_run, tmp_path):
    """With LRA_THREADS set, FAISS is imported after logging is set up: its loader's INFO
    lines ("Could not load library with AVX512 support ...") are not shown."""
    proc = run([str(VENV_BIN / "lra"), "train", "--params", str(pipeline_run.params_path),
                "--embeddings", str(pipeline_run.path("embeddings")),
                "--labels", str(pipeline_run.path("labels")),
                "--retrieval", str(pipeline_run.path("neighbours")),
                "--index", str(pipeline_run.path("index")),
                "--out-dir", str(tmp_path / "model"), "--no-progress"], tmp_path,
               LRA_THREADS="1", LRA_LOG_LEVEL="INFO")
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines and all(line.startswith("lra train: ") for line in lines), proc.stderr
    assert not re.search(r"(?i)faiss|AVX", proc.stderr)
    assert (tmp_path / "model" / "model.pt").read_bytes() == \
        pipeline_run.path("model").read_bytes()


def test_help_lists_commands_in_pipeline_order_with_one_sentence_each(tmp_path):
    """The console script's `lra --help`: validate, the stages in run order, then the
    commands outside the DVC graph; each summary is its docstring's first sentence on
    one line (Typer alone keeps the docstring's line breaks and whole paragraph)."""
    from stages.launch import COMMANDS as LAUNCH_ORDER

    proc = run([str(VENV_BIN / "lra"), "--help"], tmp_path, COLUMNS="160")
    listed = re.findall(r"^[^\w\n]*(\w+)\s{2,}(\S.*?)[\s│]*$",
                        proc.stdout.split("Commands")[1], flags=re.M)
    names = [name for name, _ in listed]
    assert names == [c for c in LAUNCH_ORDER if c != "preset"] + ["preset"]
    summaries = dict(listed)
    assert summaries["train"] == ("Train the diffusion classifier; keep the best "
                                  "validation epoch.")
    assert all(s.endswith(".") and ". " not in s and len(s) <= 100
               for s in summaries.values()), summaries


def test_short_help_is_the_first_sentence():
    from stages.app import short_help

    assert short_help("""Do one thing.  Then
        another.

        Details.""") == "Do one thing."
    assert short_help("One line,\n    wrapped (a, b, ...) here") == "One line, wrapped (a, b, ...) here."
    assert short_help(None) is None
