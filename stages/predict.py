"""`lra predict`: class predictions for new images with the trained model (not a DVC
stage: it reads the pipeline's artifacts and writes wherever --out says)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import numpy as np
import pyarrow as pa
import typer

from pipeline.checkpoint import load_checkpoint
from pipeline.encoders import RuntimeOptions, build_encoder
from pipeline.inference import DiffusionScorer
from pipeline.predict import (CHUNK_ROWS, check_model_matches, check_out_suffix, check_readable,
                              class_names, embed_chunks, encoder_config, list_images,
                              prediction_rows, write_predictions)
from pipeline.tables import open_embeddings
from stages.app import (ChunkRowsOption, DeviceOption, ProgressOption, ThreadsOption, app,
                        resolve_device, set_threads, stage)


@app.command()
def predict(images: Annotated[Path, typer.Option(
                "--images", help="A folder of images (an ImageFolder-like tree or a flat "
                                 "folder; every image file below it, sorted by path) or a "
                                 "manifest (CSV / Parquet with a `path` column, paths "
                                 "relative to the manifest's folder).")],
            out: Annotated[Path, typer.Option(
                "--out", help="Output table: .parquet / .pq or .csv (by the suffix); "
                              "columns path, predicted, predicted_name, vote, confidence.")],
            model: Annotated[Path, typer.Option(help="Trained checkpoint.")
                             ] = Path("data/model/model.pt"),
            embeddings: Annotated[Path, typer.Option(
                help="The embeddings the model was trained on: their provenance names the "
                     "encoder that embeds the new images.")
            ] = Path("data/embeddings/embeddings.parquet"),
            labels: Annotated[Path, typer.Option(
                help="Where the class names are read (then data/evaluate/predictions."
                     "parquet).")] = Path("data/labels/labels.parquet"),
            samples: Annotated[int, typer.Option(
                "--samples", min=0, help="Stochastic DDIM trajectories per image for the "
                                         "vote and its confidence (0: none).")] = 0,
            weights_dir: Annotated[Path | None, typer.Option(
                "--weights-dir", help="Where open_clip weights are cached (embed.cache_dir); "
                                      "never changes the numbers.")] = None,
            device: DeviceOption = "auto",
            batch_size: Annotated[int, typer.Option(
                min=1, envvar="LRA_EMBED_BATCH",
                help="Images per forward pass (keep `lra embed`'s for bit-equal CLIP "
                     "embeddings).")] = 256,
            workers: Annotated[int, typer.Option(min=0, envvar="LRA_WORKERS",
                                                 help="Image-decoding worker processes.")
                               ] = 0,
            chunk_rows: ChunkRowsOption = CHUNK_ROWS,
            threads: ThreadsOption = 0, progress: ProgressOption = True) -> None:
    """Predict the class of new images with the trained model. They are embedded with
    the pipeline's encoder and scored with the model's normaliser and the mean-start DDIM
    trajectory; --samples adds a stochastic vote with its confidence."""
    with stage("predict"):
        check_out_suffix(out)
        set_threads(threads)
        dev = resolve_device(device)
        emb = open_embeddings(embeddings)
        net, ckpt = load_checkpoint(model, device=dev)
        check_model_matches(emb.meta, emb.dim, ckpt, model_path=model,
                            embeddings_path=embeddings)
        todo = list_images(images)
        check_readable(todo)
        num_classes = int(ckpt["spec"]["num_classes"])
        names = class_names(num_classes, labels, Path("data/evaluate/predictions.parquet"))
        encoder = build_encoder(encoder_config(
            emb.meta, weights_dir=None if weights_dir is None else str(weights_dir)))
        scorer = DiffusionScorer.from_checkpoint(net, ckpt, num_classes=num_classes,
                                                 device=dev, samples=samples)
        runtime = RuntimeOptions(device=dev, batch_size=batch_size, workers=workers,
                                 progress=progress)
        parts = []
        for start, raw in embed_chunks(encoder, todo, runtime=runtime, expected_dim=emb.dim,
                                       chunk_rows=chunk_rows):
            chunk = scorer.score(raw, first_row=start)
            parts.append(prediction_rows(todo.paths[start:start + len(raw)], chunk.predicted,
                                         names, chunk.vote, chunk.confidence))
        table = pa.concat_tables(parts)
        write_predictions(table, out, metadata={
            "class_names": names, "readout": ckpt["readout"], "samples": samples,
            "encoder": {k: emb.meta.get(k) for k in ("encoder", "model", "pretrained", "dim")},
            "model": str(model)})
        counts = np.bincount(table.column("predicted").to_numpy(), minlength=num_classes)
        typer.echo(f"lra predict: {table.num_rows} image(s) -> {out} ("
                   + ", ".join(f"{names[i]}: {n}" for i, n in enumerate(counts) if n) + ")",
                   err=True)
