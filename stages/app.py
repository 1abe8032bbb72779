"""The one Typer app (`lra`) and what every stage command shares: params loading, the
error-to-exit-code mapping, logging, runtime knobs (device, threads), progress bars.

Exit codes: 2 for usage errors (bad option, failed validator, bad params value), 1 for
domain errors (missing or mismatched artifact, bad data). Expected errors print one line
on stderr, never a traceback.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from pipeline.config import Params
from pipeline.params_io import load_params
from pipeline.errors import ConfigError, LraError

app = typer.Typer(
    name="lra",
    help="LRA-diffusion: label-retrieval-augmented diffusion for learning from noisy labels. "
         "One command per DVC stage; `uv run dvc repro` runs them in order.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)



def short_help(doc: str | None) -> str | None:
    """A command's one-line summary for `lra --help`: the first sentence of its docstring's
    first paragraph, whitespace collapsed (Typer would list the whole paragraph with its
    source line breaks)."""
    if not doc:
        return None
    paragraph = " ".join(inspect.cleandoc(doc).split("\n\n")[0].split())
    return paragraph.split(". ", 1)[0].removesuffix(".") + "."


def set_short_help(group: typer.Typer) -> None:
    """Give every registered command without one its `short_help` summary."""
    for info in group.registered_commands:
        if info.short_help is None and info.help is None and info.callback is not None:
            info.short_help = short_help(info.callback.__doc__)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"lra {version('lra-diffusion')}")
        except PackageNotFoundError:  # pragma: no cover - running from a bare checkout
            typer.echo("lra (version unknown: the package is not installed)")
        raise typer.Exit()


@app.callback()
def _group(show_version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True,
        help="Print the package version and exit.")] = False) -> None:
    """Keeps `lra` a command group even when only one command is loaded (stages.launch
    imports only the command it runs; a one-command Typer app would swallow its name)."""


ParamsOption = Annotated[Path, typer.Option("--params", help="params.yaml to read.")]


OutDirOption = Annotated[Path, typer.Option(
    "--out-dir", help="Folder the stage writes its outputs to (created if missing).")]
# Input options are named after the artifact they read.
PreparedOption = Annotated[Path, typer.Option(
    "--prepared", help="Prepared table, written by lra prepare.")]
EmbeddingsOption = Annotated[Path, typer.Option(
    "--embeddings", help="Embeddings table, written by lra embed.")]
IndexOption = Annotated[Path, typer.Option(
    "--index", help="FAISS index folder, written by lra index: one <space>.faiss per "
                    "retrieval space and their index.json.")]
LabelsOption = Annotated[Path, typer.Option(
    "--labels", help="Labels table, written by lra noise.")]
RetrievalOption = Annotated[Path, typer.Option(
    "--retrieval", help="Retrieval table, written by lra retrieve.")]
ModelOption = Annotated[Path, typer.Option(
    "--model", help="Model checkpoint, written by lra train.")]
DeviceOption = Annotated[str, typer.Option(
    "--device", envvar="LRA_DEVICE",
    help="auto | cpu | cuda | cuda:N. A runtime knob: it changes speed, not results.")]
ThreadsOption = Annotated[int, typer.Option(
    "--threads", envvar="LRA_THREADS", min=0,
    help="CPU threads for torch / FAISS (0: the library default).")]
WorkersOption = Annotated[int, typer.Option(
    "--workers", min=0, envvar="LRA_WORKERS",
    help="Worker processes for image decoding / checking (0: prepare uses one per CPU, "
         "at most 16; embed decodes in the main process).")]
ChunkRowsOption = Annotated[int, typer.Option(
    "--chunk-rows", min=1, envvar="LRA_CHUNK_ROWS",
    help="Rows per inference chunk; changes memory, never the output.")]
ProgressOption = Annotated[bool, typer.Option(
    "--progress/--no-progress", envvar="LRA_PROGRESS", help="Show progress bars on stderr.")]
NprocOption = Annotated[int, typer.Option(
    "--nproc", min=1, envvar="LRA_NPROC",
    help="Processes on this machine (one per GPU): N > 1 relaunches the command under "
         "`torchrun --standalone --nproc-per-node N` (docs/distributed.md). Ignored "
         "inside torchrun.")]


def resolve_device(device: str) -> str:
    """"auto" -> "cuda" when available else "cpu"; validate the rest."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: CUDA is not available on this machine; "
                              "use --device cpu or auto")
        return device
    raise ConfigError(f"--device: unknown device {device!r}; valid: auto, cpu, cuda, cuda:N")


def set_threads(threads: int, *, libraries: tuple[str, ...] = ("torch", "faiss")) -> None:
    """Use `threads` CPU threads (0: the libraries' defaults) in polars (read when it is
    first imported) and in `libraries` (imported here: pass only those the stage uses,
    importing torch costs seconds)."""
    if threads <= 0:
        return
    os.environ["POLARS_MAX_THREADS"] = str(threads)
    if "torch" in libraries:
        import torch

        torch.set_num_threads(threads)
    if "faiss" in libraries:
        import faiss

        faiss.omp_set_num_threads(threads)


def _one_line(exc: Exception) -> str:
    """The message on one line, even when it quotes a multi-line library error."""
    return "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())


class Terminated(KeyboardInterrupt):
    """SIGTERM (a killed job, torchrun stopping its ranks) raised like Ctrl-C, so the
    atomic writers remove their temporary files on the way out."""


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return

    def handler(signum: int, frame: object) -> None:
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def stage(name: str, params_path: Path | None = None) -> Iterator[Params | None]:
    """Run a stage body: configure logging, load params, map errors to exit codes.

    with stage("train", params) as p: ...  # p is the validated Params
    """
    logging.basicConfig(level=os.environ.get("LRA_LOG_LEVEL", "INFO"),
                        format=f"lra {name}: %(message)s", stream=sys.stderr, force=True)
    # faiss's loader logs at INFO every instruction set it could not load ("Could not
    # load library with AVX512 support ..."): not the stage's business.
    logging.getLogger("faiss").setLevel(logging.WARNING)
    try:
        with _sigterm_as_interrupt():
            yield load_params(params_path) if params_path is not None else None
    except Terminated:
        typer.echo(f"lra {name}: terminated; no output was published", err=True)
        raise typer.Exit(143) from None
    except ConfigError as exc:
        typer.echo(f"lra {name}: error: {_one_line(exc)}", err=True)
        raise typer.Exit(2) from None
    except LraError as exc:
        typer.echo(f"lra {name}: error: {_one_line(exc)}", err=True)
        raise typer.Exit(1) from None
    except OSError as exc:  # the file system refused: a full disk, a permission, a folder
        logging.getLogger(__name__).debug("file system error", exc_info=True)
        where = f": {exc.filename}" if exc.filename else ""
        typer.echo(f"lra {name}: error: {exc.strerror or exc}{where} (nothing was "
                   "published; LRA_LOG_LEVEL=DEBUG shows where)", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        typer.echo(f"lra {name}: interrupted; no output was published", err=True)
        raise typer.Exit(130) from None
