"""`lra report`: what a user takes home -> data/report/ (label_issues.parquet, the ranked
table of suspected wrong training labels; report.json, its summary and measured
detection quality; index.html, a self-contained page to open in a browser)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from tqdm.auto import tqdm

from pipeline.artifacts import StageWriter, write_json
from pipeline.report import ReportPaths, build_report
from pipeline.report_io import write_issues
from stages.app import (ChunkRowsOption, DeviceOption, EmbeddingsOption, LabelsOption,
                        ModelOption, OutDirOption, ParamsOption, PreparedOption,
                        ProgressOption, RetrievalOption, ThreadsOption, app, resolve_device,
                        set_threads, stage)

_D = ReportPaths()


@app.command()
def report(params: ParamsOption = Path("params.yaml"),
           model: ModelOption = _D.model, embeddings: EmbeddingsOption = _D.embeddings,
           labels: LabelsOption = _D.labels, retrieval: RetrievalOption = _D.retrieval,
           predictions: Annotated[Path, typer.Option(
               help="Predictions table, written by lra evaluate.")
           ] = _D.predictions,
           prepared: PreparedOption = _D.prepared,
           metrics: Annotated[Path, typer.Option(
               help="Metrics, written by lra evaluate.")] = _D.metrics,
           train_log: Annotated[Path, typer.Option(
               help="Training log, written by lra train.")] = _D.train_log,
           noise_summary: Annotated[Path, typer.Option(
               help="Noise summary, written by lra noise.")] = _D.noise,
           retrieval_summary: Annotated[Path, typer.Option(
               help="Retrieval summary, written by lra retrieve.")
           ] = _D.retrieval_summary,
           out_dir: OutDirOption = Path("data/report"), device: DeviceOption = "auto",
           chunk_rows: ChunkRowsOption = 4096,
           threads: ThreadsOption = 0, progress: ProgressOption = True) -> None:
    """Rank the training labels most likely wrong and write the HTML report."""
    with stage("report", params) as p:
        set_threads(threads)
        dev = resolve_device(device)
        paths = ReportPaths(model=model, embeddings=embeddings, labels=labels,
                            retrieval=retrieval, predictions=predictions, prepared=prepared,
                            metrics=metrics, train_log=train_log, noise=noise_summary,
                            retrieval_summary=retrieval_summary)
        with tqdm(unit="row", desc="report", disable=not progress, dynamic_ncols=True) as bar:
            result = build_report(p.report, paths, device=dev, threads=threads,
                                  chunk_rows=chunk_rows, progress=bar.update,
                                  linear=p.evaluate)
        with StageWriter() as out:
            write_issues(out.path(out_dir / "label_issues.parquet"), result.table,
                         metadata=result.table_meta)
            write_json(result.summary, out.path(out_dir / "report.json"))
            out.path(out_dir / "index.html").write_text(result.html, encoding="utf-8")
