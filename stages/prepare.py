"""`lra prepare`: dataset source -> data/prepared/ (samples, rejects, summary)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from pipeline.artifacts import StageWriter, write_json, write_table
from pipeline.errors import ArtifactError
from pipeline.sources import image_root, load_source
from pipeline.sources.common import parallel_options
from stages.app import (OutDirOption, ParamsOption, ProgressOption, ThreadsOption,
                        WorkersOption, app, set_threads, stage)


@app.command()
def prepare(params: ParamsOption = Path("params.yaml"),
            out_dir: OutDirOption = Path("data/prepared"), workers: WorkersOption = 0,
            threads: ThreadsOption = 0, progress: ProgressOption = True) -> None:
    """Read the dataset named by data.source into the prepared table."""
    with stage("prepare", params) as p:
        set_threads(threads, libraries=())  # no torch / FAISS here
        with parallel_options(workers=workers, progress=progress):
            ds = load_source(p.data)
        labels = ds.table.column("label").to_numpy()
        if labels.size and (labels.min() < 0 or labels.max() >= ds.num_classes):
            raise ArtifactError(f"source {p.data.source}: labels outside [0, {ds.num_classes})")
        root = image_root(p.data)
        splits = Counter(ds.table.column("split").to_pylist())
        with StageWriter() as out:
            write_table(ds.table, out.path(out_dir / "samples.parquet"), metadata={
                "source": p.data.source, "class_names": ds.class_names,
                "num_classes": ds.num_classes, "labels_are_clean": ds.labels_are_clean,
                "image_root": None if root is None else str(root)}, fingerprint=True)
            write_table(ds.rejects, out.path(out_dir / "rejects.parquet"))
            write_json({"samples": int(ds.table.num_rows), "rejected": int(ds.rejects.num_rows),
                        "classes": ds.num_classes, "splits": dict(sorted(splits.items())),
                        "train_label_counts": np.bincount(
                            labels[np.asarray(ds.table.column("split").to_pylist()) == "train"],
                            minlength=ds.num_classes).tolist()},
                       out.path(out_dir / "summary.json"))
