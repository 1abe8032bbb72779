"""`lra evaluate`: model + baselines -> data/evaluate/ (metrics, predictions, confusion).

Streams: the embeddings and the neighbours' labels are read, scored and written one
chunk of rows at a time (`--chunk-rows`), so memory holds one chunk, the linear probes'
fitting subset (evaluate.linear_max_rows rows) and, per row, only ids, split, labels
and predicted classes (about 130 bytes, against 3 KiB for a 768-d embedding).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from pipeline.artifacts import (StageWriter, TableStream, fixed_list_array, row_group_rows,
                                write_csv, write_json)
from pipeline.baselines import fit_linear_baselines
from pipeline.checkpoint import load_checkpoint
from pipeline.errors import ArtifactError
from pipeline.inference import ChunkPredictions, DiffusionScorer
from pipeline.lineage import check_built_from, ref
from pipeline.metrics import evaluation_metrics
from pipeline.retrieval import BASELINE_MARGIN, knn_vote
from pipeline.neighbours import open_neighbours
from pipeline.tables import (UNKNOWN, EmbeddingsFile, Labels, check_same_samples,
                             open_embeddings, read_labels)
from stages.app import (ChunkRowsOption, DeviceOption, EmbeddingsOption, LabelsOption,
                        ModelOption, OutDirOption, ParamsOption, ProgressOption,
                        RetrievalOption, ThreadsOption, app, resolve_device, set_threads,
                        stage)


log = logging.getLogger(__name__)


@app.command()
def evaluate(params: ParamsOption = Path("params.yaml"),
             model: ModelOption = Path("data/model/model.pt"),
             embeddings: EmbeddingsOption = Path("data/embeddings/embeddings.parquet"),
             labels: LabelsOption = Path("data/labels/labels.parquet"),
             retrieval: RetrievalOption = Path("data/retrieval/neighbours.parquet"),
             out_dir: OutDirOption = Path("data/evaluate"), device: DeviceOption = "auto",
             chunk_rows: ChunkRowsOption = 4096,
             threads: ThreadsOption = 0, progress: ProgressOption = True) -> None:
    """Score LRA-diffusion and the baselines on every split with known labels."""
    with stage("evaluate", params) as p:
        set_threads(threads)
        dev = resolve_device(device)
        emb = open_embeddings(embeddings)
        lab = read_labels(labels)
        ret = open_neighbours(retrieval)
        check_same_samples(emb.sample_id, lab.sample_id, "embeddings", "labels")
        check_same_samples(emb.sample_id, ret.sample_id, "embeddings", "retrieval table")
        net, ckpt = load_checkpoint(model, device=dev)
        if ckpt["spec"]["feature_dim_in"] != emb.dim:
            raise ArtifactError(f"model expects {ckpt['spec']['feature_dim_in']}-d embeddings "
                                f"but the embeddings are {emb.dim}-d; rerun `lra train`")
        inputs = (emb.ref(), lab.ref(labels), ret.ref())
        check_built_from(ret.ref(), *inputs[:2])
        check_built_from(ref("model", "model checkpoint", model, "lra train", ckpt["info"]),
                         *inputs)
        c = lab.num_classes
        cfg = p.evaluate
        scorer = DiffusionScorer.from_checkpoint(net, ckpt, num_classes=c, device=dev,
                                                 samples=cfg.stochastic_samples)
        probes, chosen_l2, _ = fit_linear_baselines(emb, lab, cfg)
        names = lab.meta.get("class_names") or [str(i) for i in range(c)]

        n = len(emb.sample_id)
        methods = ["lra_diffusion", "knn_vote", *probes]
        if cfg.stochastic_samples > 0:
            methods.append("lra_diffusion_vote")
        predicted = {m: np.empty(n, dtype=np.int64) for m in methods}
        with StageWriter() as out:
            with TableStream(out.path(out_dir / "predictions.parquet"),
                             _prediction_schema(c, vote=cfg.stochastic_samples > 0),
                             metadata={"class_names": names, "readout": ckpt["readout"]},
                             row_group_rows=row_group_rows(4 * c + 80)) as table, \
                    tqdm(total=n, unit="row", desc="evaluate", disable=not progress,
                         dynamic_ncols=True) as bar:
                for (start, raw), (_, neighbour_labels, distances) in zip(
                        emb.iter_chunks(chunk_rows), ret.iter_chunks(chunk_rows), strict=True):
                    rows = slice(start, start + len(raw))
                    chunk = scorer.score(raw, first_row=start)
                    predicted["lra_diffusion"][rows] = chunk.predicted
                    predicted["knn_vote"][rows] = knn_vote(neighbour_labels, 1.0 - distances, c)
                    for name, probe in probes.items():
                        predicted[name][rows] = probe.predict(raw)
                    if chunk.vote is not None:
                        predicted["lra_diffusion_vote"][rows] = chunk.vote
                    table.write(_prediction_rows(emb, lab, rows, chunk,
                                                 predicted["knn_vote"][rows]))
                    bar.update(len(raw))

            metrics = evaluation_metrics(predicted, clean=lab.clean, observed=lab.observed,
                                         split=emb.split, methods_always=("clean_linear",))
            metrics["model"] = {k: ckpt["info"][k] for k in ("epoch", "weights", "readout",
                                                              "val_accuracy", "k")}
            metrics["model"].update(below_baseline(metrics["val_accuracy"]))
            metrics["linear_l2"] = chosen_l2
            write_json(metrics, out.path(out_dir / "metrics.json"))
            test = emb.rows("test")
            test = test[lab.clean[test] != UNKNOWN]
            rows = [{"actual": names[a], "predicted": names[b]}
                    for a, b in zip(lab.clean[test], predicted["lra_diffusion"][test])]
            write_csv(rows or [{"actual": "", "predicted": ""}],
                      out.path(out_dir / "confusion.csv"))


def below_baseline(val_accuracy: dict[str, float | None]) -> dict:
    """The guard: is LRA-diffusion's validation accuracy below kNN vote's or the noisy
    linear probe's on the same validation rows? Returns {"below_baseline": bool, and,
    when True, "baseline": name, "baseline_val_accuracy": its accuracy}; logs one
    warning line naming both numbers."""
    lra = val_accuracy.get("lra_diffusion")
    rivals = {m: val_accuracy.get(m) for m in ("knn_vote", "noisy_linear")}
    rivals = {m: v for m, v in rivals.items() if v is not None}
    if lra is None or not rivals:
        return {"below_baseline": False}
    best = max(rivals, key=lambda m: rivals[m])
    if lra >= rivals[best] - BASELINE_MARGIN:
        return {"below_baseline": False}
    log.warning("warning: LRA-diffusion validation accuracy %.4f is below %s's %.4f; see "
                "README, Troubleshooting: 'below_baseline'", lra, best.replace("_", " "),
                rivals[best])
    return {"below_baseline": True, "baseline": best, "baseline_val_accuracy": rivals[best]}


def _prediction_schema(num_classes: int, *, vote: bool) -> pa.Schema:
    fields = [("sample_id", pa.int64()), ("split", pa.string()), ("true", pa.int64()),
              ("observed", pa.int64()), ("predicted", pa.int64()), ("knn_vote", pa.int64()),
              ("scores", pa.list_(pa.float32(), num_classes))]
    if vote:
        fields += [("vote", pa.int64()), ("confidence", pa.float32())]
    return pa.schema(fields)


def _prediction_rows(emb: EmbeddingsFile, lab: Labels, rows: slice, chunk: ChunkPredictions,
                     knn: np.ndarray) -> pa.Table:
    """predictions.parquet rows for one chunk (schema: `_prediction_schema`)."""
    clean = lab.clean[rows]
    columns = {
        "sample_id": pa.array(emb.sample_id[rows], type=pa.int64()),
        "split": pa.array(list(emb.split[rows]), type=pa.string()),
        "true": pa.array(clean, type=pa.int64(), mask=clean == UNKNOWN),
        "observed": pa.array(lab.observed[rows], type=pa.int64()),
        "predicted": pa.array(chunk.predicted, type=pa.int64()),
        "knn_vote": pa.array(knn, type=pa.int64()),
        "scores": fixed_list_array(chunk.scores.astype(np.float32), pa.float32()),
    }
    if chunk.vote is not None:
        columns["vote"] = pa.array(chunk.vote, type=pa.int64())
        columns["confidence"] = pa.array(chunk.confidence, type=pa.float32())
    return pa.table(columns)
