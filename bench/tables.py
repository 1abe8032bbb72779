"""The pipeline's own artifacts, written from the synthetic arrays, so the train and evaluate
benchmarks read their inputs exactly as `lra train` and `lra evaluate` do (Parquet read by
record batch, the checkpoint's normaliser) and the evaluate benchmark runs the stage itself.

For the first `rows` synthetic rows (cached in the synthetic folder, `tables-<rows>/`):
    embeddings.parquet   the embeddings; the last 16 rows are "val", the others "train"
    labels.parquet       clean and observed (40 % noisy) labels
    neighbours.parquet   k neighbours per row: random same-sub-cluster candidates' labels
                         (speed does not depend on which rows they are), distances
    model.pt             a randomly initialised classifier of the scale's width with a
                         normaliser fitted on the train rows (10 DDIM steps, argmax)
    params.yaml          the repository's params.yaml with train.feature_dim set to the
                         scale's width
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml

from bench import synthetic

REPO = Path(__file__).resolve().parents[1]
VERSION = 4  # bump when the tables change


def val_rows(rows: int) -> int:
    """The last 16 rows are the val split (train: the other N - 16)."""
    return min(16, rows // 2)


def materialise(data_dir: str | Path, *, rows: int, scale: dict) -> Path:
    """Write (once) the artifacts of the first `rows` synthetic rows; returns their folder."""
    import torch

    from pipeline.artifacts import StageWriter
    from pipeline.checkpoint import save_checkpoint
    from pipeline.features import FeatureNormalizer
    from pipeline.lineage import BUILT_FROM
    from pipeline.model import DiffusionClassifier, ModelSpec
    from pipeline.retrieval import label_distribution, own_label_agreement
    from pipeline.neighbours import write_retrieval
    from pipeline.tables import table_stamp, write_embeddings, write_labels

    folder = Path(data_dir) / f"tables-v{VERSION}-{rows}-h{scale['hidden']}"
    if (folder / "params.yaml").exists():
        return folder
    arrays = synthetic.load(data_dir, rows=rows)
    emb, candidates = arrays["embeddings"], arrays["candidates"]
    n, c, k = len(emb), scale["classes"], candidates.shape[1] - 1
    split = np.array(["train"] * (n - val_rows(n)) + ["val"] * val_rows(n), dtype=object)
    is_train = split == "train"
    ids = np.arange(n)
    rng = np.random.default_rng(0)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["train"]["feature_dim"] = scale["hidden"]
    torch.manual_seed(0)
    spec = ModelSpec(num_classes=c, feature_dim_in=emb.shape[1], hidden=scale["hidden"],
                     timesteps=params["train"]["timesteps"])
    with StageWriter() as out:
        paths = {name: out.path(folder / f"{name}.parquet")
                 for name in ("embeddings", "labels", "neighbours")}
        write_embeddings(paths["embeddings"], sample_id=ids, split=split,
                         vectors=emb, provenance={"encoder": "synthetic"})
        write_labels(paths["labels"], sample_id=ids, split=split,
                     clean=arrays["clean"], observed=arrays["observed"],
                     metadata={"num_classes": c, "class_names": [str(i) for i in range(c)]})
        built_from = {"embeddings": table_stamp(paths["embeddings"]),
                      "labels": table_stamp(paths["labels"])}
        write_retrieval(paths["neighbours"], sample_id=ids, split=split,
                        neighbour_ids=rng.integers(0, n, (n, k)),
                        distances=rng.random((n, k), dtype=np.float32),
                        neighbour_labels=candidates[:, 1:], candidates=candidates,
                        distribution=label_distribution(candidates, c),
                        agreement=own_label_agreement(candidates), is_train=is_train,
                        metadata={"k": k, "num_classes": c, BUILT_FROM: built_from})
        built_from = {**built_from, "retrieval": table_stamp(paths["neighbours"])}
        save_checkpoint(out.path(folder / "model.pt"), spec=spec,
                        state_dict=DiffusionClassifier(spec).state_dict(),
                        normalizer=FeatureNormalizer.fit(emb[is_train], "standardize"),
                        ddim_steps=10, readout="argmax",
                        info={"epoch": 0, "weights": "raw", "readout": "argmax",
                              "val_accuracy": 0.0, BUILT_FROM: built_from})
        (out.path(folder / "params.yaml")).write_text(yaml.safe_dump(params, sort_keys=False))
    return folder
