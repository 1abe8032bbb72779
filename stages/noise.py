"""`lra noise`: labels -> data/labels/labels.parquet (+ noise.json metrics)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from pipeline.artifacts import StageWriter, write_json
from pipeline.config import as_dict
from pipeline.errors import ConfigError
from pipeline.lineage import BUILT_FROM, check_built_from
from pipeline.noise import make_noisy_labels, needs_probe, observed_rate
from pipeline.tables import (UNKNOWN, check_same_samples, open_embeddings, read_prepared,
                             write_labels)
from stages.app import (EmbeddingsOption, OutDirOption, ParamsOption, PreparedOption,
                        ProgressOption, ThreadsOption, app, set_threads, stage)


@app.command()
def noise(params: ParamsOption = Path("params.yaml"),
          prepared: PreparedOption = Path("data/prepared/samples.parquet"),
          embeddings: EmbeddingsOption = Path("data/embeddings/embeddings.parquet"),
          out_dir: OutDirOption = Path("data/labels"), threads: ThreadsOption = 0,
          progress: ProgressOption = True) -> None:
    """Inject label noise (noise.kind) into the train split; val and test stay clean."""
    with stage("noise", params) as p, tqdm(total=3, unit="step", desc="noise",
                                           disable=not progress, dynamic_ncols=True) as bar:
        # Steps: read the inputs, draw the noisy labels, write (each is one pass).
        set_threads(threads, libraries=("torch",) if needs_probe(p.noise) else ())
        data = read_prepared(prepared)
        t = data.table
        sample_id = t.column("sample_id").to_numpy()
        split = np.asarray(t.column("split").to_pylist(), dtype=object)
        label = t.column("label").to_numpy()
        clean = t.column("clean_label").fill_null(UNKNOWN).to_numpy()
        observed = label.copy()
        train = np.flatnonzero(split == "train")
        cfg = p.noise
        built_from = {"prepared": data.ref(prepared).stamp()}
        bar.update()
        if cfg.kind != "none":
            if not data.labels_are_clean:
                raise ConfigError(f"noise.kind: {cfg.kind!r} injects synthetic noise, but source "
                                  f"{data.meta.get('source')!r} already has real label noise; "
                                  "set noise.kind: none")
            probs = None
            if needs_probe(cfg):
                # PMD margins come from a probe trained on clean train labels (METHOD.md s8).
                # Imported here: only PMD needs torch, and importing it costs seconds.
                from pipeline.linear import fit_linear

                emb = open_embeddings(embeddings)
                check_same_samples(emb.sample_id, sample_id, "embeddings", "prepared table")
                check_built_from(emb.ref(), data.ref(prepared))
                built_from["embeddings"] = emb.ref().stamp()
                x = emb.read_rows(train)  # the train rows only
                # fit_linear's defaults, deliberately not evaluate.*: changing an evaluation
                # knob must not rerun the noise stage and everything after it.
                probe = fit_linear(x, clean[train], num_classes=data.num_classes)
                probs = probe.predict_proba(x)
            observed[train] = make_noisy_labels(clean[train], num_classes=data.num_classes,
                                                cfg=cfg, probs=probs,
                                                sample_ids=sample_id[train])
        bar.update()
        known = clean[train] != UNKNOWN
        rate = (observed_rate(clean[train][known], observed[train][known])
                if known.any() else None)
        with StageWriter() as out:
            write_labels(out.path(out_dir / "labels.parquet"), sample_id=sample_id, split=split,
                         clean=clean, observed=observed, metadata={
                             "num_classes": data.num_classes, "class_names": data.class_names,
                             "noise": as_dict(cfg), "labels_are_clean": data.labels_are_clean,
                             BUILT_FROM: built_from})
            write_json({"observed_rate": rate, "kind": cfg.kind,
                        "train_samples": int(len(train)),
                        "corrupted": None if rate is None else int(
                            (clean[train][known] != observed[train][known]).sum())},
                       out.path(out_dir / "noise.json"))
        bar.update()
