"""`lra embed`: prepared images -> data/embeddings/embeddings.parquet."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from pipeline.encoders import RuntimeOptions, build_encoder
from pipeline.errors import ArtifactError
from pipeline.tables import read_prepared, write_embeddings
from stages.app import (DeviceOption, ParamsOption, ProgressOption, ThreadsOption, app,
                        resolve_device, set_threads, stage)


@app.command()
def embed(params: ParamsOption = Path("params.yaml"),
          prepared: Path = Path("data/prepared/samples.parquet"),
          out: Path = Path("data/embeddings/embeddings.parquet"),
          device: DeviceOption = "auto",
          batch_size: Annotated[int, typer.Option(min=1, envvar="LRA_EMBED_BATCH",
                                                  help="Images per forward pass.")] = 256,
          workers: Annotated[int, typer.Option(min=0, envvar="LRA_WORKERS",
                                               help="Image-decoding worker processes.")] = 0,
          threads: ThreadsOption = 0, progress: ProgressOption = True) -> None:
    """Embed every image with the frozen encoder f_p (embed.encoder)."""
    with stage("embed", params) as p:
        set_threads(threads)
        data = read_prepared(prepared)
        encoder = build_encoder(p.embed)
        runtime = RuntimeOptions(device=resolve_device(device), batch_size=batch_size,
                                 workers=workers, progress=progress)
        vectors = encoder.encode(data.table, root=data.image_root, runtime=runtime)
        if not np.isfinite(vectors).all():
            raise ArtifactError("the encoder produced NaN or infinite embeddings; "
                                "nothing was written")
        write_embeddings(out, sample_id=data.table.column("sample_id").to_numpy(),
                         split=data.table.column("split").to_pylist(), vectors=vectors,
                         provenance=encoder.provenance())
