"""`lra evaluate`: model + baselines -> data/evaluate/ (metrics, predictions, confusion)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import numpy as np
import pyarrow as pa
import torch
import typer

from pipeline.artifacts import (StageWriter, fixed_list_array, write_csv, write_json,
                                write_table)
from pipeline.checkpoint import load_checkpoint
from pipeline.errors import ArtifactError
from pipeline.diffusion import alphas_cumprod, cosine_betas, ddim_timesteps, readout
from pipeline.inference import predict_scores, stochastic_vote
from pipeline.linear import fit_linear
from pipeline.metrics import accuracy_by_split
from pipeline.retrieval import knn_vote
from pipeline.tables import (UNKNOWN, check_same_samples, read_embeddings, read_labels,
                             read_retrieval)
from stages.app import (DeviceOption, ParamsOption, ThreadsOption, app, resolve_device,
                        set_threads, stage)


@app.command()
def evaluate(params: ParamsOption = Path("params.yaml"),
             model: Path = Path("data/model/model.pt"),
             embeddings: Path = Path("data/embeddings/embeddings.parquet"),
             labels: Path = Path("data/labels/labels.parquet"),
             retrieval: Path = Path("data/retrieval/neighbours.parquet"),
             out_dir: Path = Path("data/evaluate"), device: DeviceOption = "auto",
             chunk_rows: Annotated[int, typer.Option(min=1, envvar="LRA_EVAL_CHUNK",
                                                     help="Rows per inference chunk.")] = 16_384,
             threads: ThreadsOption = 0) -> None:
    """Score LRA-diffusion and the baselines on every split with known labels."""
    with stage("evaluate", params) as p:
        set_threads(threads)
        dev = resolve_device(device)
        emb = read_embeddings(embeddings)
        lab = read_labels(labels)
        ret = read_retrieval(retrieval)
        check_same_samples(emb.sample_id, lab.sample_id, "embeddings", "labels")
        check_same_samples(emb.sample_id, ret.sample_id, "embeddings", "retrieval table")
        net, ckpt = load_checkpoint(model, device=dev)
        if ckpt["spec"]["feature_dim_in"] != emb.dim:
            raise ArtifactError(f"model expects {ckpt['spec']['feature_dim_in']}-d embeddings "
                                f"but the embeddings are {emb.dim}-d; rerun `lra train`")
        c = lab.num_classes
        timesteps = ckpt["spec"]["timesteps"]
        abar = alphas_cumprod(cosine_betas(timesteps)).float().to(dev)
        steps = ddim_timesteps(timesteps, ckpt["ddim_steps"])
        feats = torch.from_numpy(ckpt["normalizer"].apply(emb.vectors)).to(dev)
        scores = predict_scores(net, feats, abar=abar, timesteps=steps, num_classes=c,
                                chunk_rows=chunk_rows)
        predicted = {"lra_diffusion": readout(scores, ckpt["readout"]).cpu().numpy()}
        predicted["knn_vote"] = knn_vote(ret.neighbour_labels, 1.0 - ret.distances, c)
        train = emb.rows("train")
        cfg = p.evaluate
        predicted["noisy_linear"] = fit_linear(
            emb.vectors[train], lab.observed[train], num_classes=c, l2=cfg.linear_l2,
            iters=cfg.linear_iters).predict(emb.vectors)
        clean_known = bool((lab.clean[train] != UNKNOWN).all())
        if clean_known:
            predicted["clean_linear"] = fit_linear(
                emb.vectors[train], lab.clean[train], num_classes=c, l2=cfg.linear_l2,
                iters=cfg.linear_iters).predict(emb.vectors)
        confidence = None
        if cfg.stochastic_samples > 0:
            vote, conf = stochastic_vote(net, feats, abar=abar, timesteps=steps, num_classes=c,
                                         samples=cfg.stochastic_samples, rule=ckpt["readout"],
                                         chunk_rows=chunk_rows)
            predicted["lra_diffusion_vote"] = vote.cpu().numpy()
            confidence = conf.cpu().numpy()

        metrics = accuracy_by_split(predicted, truth=lab.clean, split=emb.split,
                                    methods_always=("clean_linear",))
        known = train[lab.clean[train] != UNKNOWN]
        metrics["noise"] = {"observed_rate": (float((lab.observed[known] != lab.clean[known])
                                                    .mean()) if len(known) else None)}
        if len(known):
            # Label cleaning: how often each method's train prediction is the clean label.
            metrics["train_label_accuracy"] = {
                "observed": float((lab.observed[known] == lab.clean[known]).mean()),
                **{m: float((pred[known] == lab.clean[known]).mean())
                   for m, pred in predicted.items()}}
        metrics["model"] = {k: ckpt["info"][k] for k in ("epoch", "weights", "readout",
                                                          "val_accuracy")}

        names = lab.meta.get("class_names") or [str(i) for i in range(c)]
        test = emb.rows("test")
        test = test[lab.clean[test] != UNKNOWN]
        columns = {
            "sample_id": pa.array(emb.sample_id, type=pa.int64()),
            "split": pa.array(list(emb.split), type=pa.string()),
            "true": pa.array(lab.clean, type=pa.int64(), mask=lab.clean == UNKNOWN),
            "observed": pa.array(lab.observed, type=pa.int64()),
            "predicted": pa.array(predicted["lra_diffusion"], type=pa.int64()),
            "knn_vote": pa.array(predicted["knn_vote"], type=pa.int64()),
            "scores": fixed_list_array(scores.cpu().numpy().astype(np.float32), pa.float32()),
        }
        if confidence is not None:
            columns["vote"] = pa.array(predicted["lra_diffusion_vote"], type=pa.int64())
            columns["confidence"] = pa.array(confidence, type=pa.float32())
        with StageWriter() as out:
            write_json(metrics, out.path(out_dir / "metrics.json"))
            write_table(pa.table(columns), out.path(out_dir / "predictions.parquet"),
                        metadata={"class_names": names, "readout": ckpt["readout"]})
            rows = [{"actual": names[a], "predicted": names[b]}
                    for a, b in zip(lab.clean[test], predicted["lra_diffusion"][test])]
            write_csv(rows or [{"actual": "", "predicted": ""}],
                      out.path(out_dir / "confusion.csv"))
