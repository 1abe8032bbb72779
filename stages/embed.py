"""`lra embed`: prepared images -> data/embeddings/embeddings.parquet.

Resumable: chunks of rows are cached outside DVC's outs (`--cache-dir`, default
.lra-cache/embed/<key>/), so a killed run picks up where it stopped; the output is
byte-identical to an uninterrupted run. Under torchrun (or `--nproc N`) the chunks are
shared out over the processes and rank 0 writes the output (docs/distributed.md).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from pipeline import distributed
from pipeline.embed_cache import DEFAULT_CACHE_ROOT, DEFAULT_CHUNK_ROWS, embed_table, release
from pipeline.encoders import RuntimeOptions, build_encoder
from pipeline.errors import ArtifactError
from pipeline.lineage import BUILT_FROM
from pipeline.tables import read_prepared, write_embeddings
from stages.app import (DeviceOption, NprocOption, OutDirOption, ParamsOption,
                        PreparedOption, ProgressOption, ThreadsOption, WorkersOption, app,
                        resolve_device, set_threads, stage)


@app.command()
def embed(params: ParamsOption = Path("params.yaml"),
          prepared: PreparedOption = Path("data/prepared/samples.parquet"),
          out_dir: OutDirOption = Path("data/embeddings"),
          device: DeviceOption = "auto",
          batch_size: Annotated[int, typer.Option(min=1, envvar="LRA_EMBED_BATCH",
                                                  help="Images per forward pass.")] = 256,
          workers: WorkersOption = 0,
          threads: ThreadsOption = 0, progress: ProgressOption = True,
          cache_dir: Annotated[Path, typer.Option(
              "--cache-dir", envvar="LRA_CACHE_DIR",
              help="Root of the resumable chunk cache (chunks go to DIR/embed/<key>/; "
                   "not DVC-tracked; put it on a shared filesystem for multi-node runs). "
                   "Not embed.cache_dir, which is where model weights are cached.")
          ] = DEFAULT_CACHE_ROOT,
          chunk_rows: Annotated[int, typer.Option(
              min=1, envvar="LRA_CHUNK_ROWS",
              help="Rows per cached chunk (rounded up to a multiple of --batch-size); "
                   "changes how much a killed run loses, never the output.")
          ] = DEFAULT_CHUNK_ROWS,
          keep_cache: Annotated[bool, typer.Option(
              "--keep-cache/--no-keep-cache", envvar="LRA_KEEP_CACHE",
              help="Keep the chunks after the output is written (default: delete them).")
          ] = False,
          nproc: NprocOption = 1) -> None:
    """Embed every image with the frozen encoder f_p (embed.encoder)."""
    with stage("embed", params) as p:
        if nproc > 1 and not distributed.launched():
            raise typer.Exit(distributed.relaunch(nproc, [
                "embed", "--params", str(params), "--prepared", str(prepared), "--out-dir",
                str(out_dir), "--device", device, "--batch-size", str(batch_size), "--workers",
                str(workers), "--threads", str(threads),
                "--progress" if progress else "--no-progress", "--cache-dir", str(cache_dir),
                "--chunk-rows", str(chunk_rows),
                "--keep-cache" if keep_cache else "--no-keep-cache"]))
        ctx = distributed.env_context()
        if not ctx.is_main:  # one rank speaks
            logging.getLogger().setLevel(logging.WARNING)
        dev = distributed.rank_device(resolve_device(device), ctx)
        # Embedding exchanges only small objects and waits at barriers: gloo (CPU).
        with distributed.session(device=dev, backend="gloo") as ctx:
            set_threads(threads, libraries=("torch",))  # no FAISS here
            data = read_prepared(prepared)
            built_from = {"prepared": data.ref(prepared).stamp()}  # fails now, not after
            encoder = build_encoder(p.embed)
            runtime = RuntimeOptions(device=dev, batch_size=batch_size, workers=workers,
                                     progress=progress and ctx.is_main)
            result = embed_table(encoder, data.table, root=data.image_root, runtime=runtime,
                                 cache_root=cache_dir, chunk_rows=chunk_rows, ctx=ctx)
            if ctx.is_main:
                vectors = result.vectors
                if not np.isfinite(vectors).all():
                    raise ArtifactError("the encoder produced NaN or infinite embeddings; "
                                        "nothing was written")
                write_embeddings(out_dir / "embeddings.parquet",
                                 sample_id=data.table.column("sample_id").to_numpy(),
                                 split=data.table.column("split").to_pylist(), vectors=vectors,
                                 provenance={**result.provenance, BUILT_FROM: built_from})
            release(result, ctx, keep=keep_cache)
