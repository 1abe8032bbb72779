"""`lra train`: embeddings + retrieved labels -> data/model/ (checkpoint, log, metrics).

Under torchrun (or `--nproc N`) every rank loads the same tables and trains with
DistributedDataParallel on its share of each global batch; rank 0 validates and writes
(pipeline.training, docs/distributed.md).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import typer

from pipeline import distributed
from pipeline.allocator import retain_freed_memory
from pipeline.artifacts import StageWriter, write_csv, write_json
from pipeline.checkpoint import save_checkpoint
from pipeline.config import Params, as_dict
from pipeline.errors import ArtifactError
from pipeline.features import FeatureNormalizer
from pipeline.lineage import BUILT_FROM, check_built_from
from pipeline.neighbours import read_candidates_meta
from pipeline.tables import UNKNOWN, check_same_samples, open_embeddings, read_labels
from pipeline.training import TrainData, model_spec, train_diffusion
from stages.app import (DeviceOption, EmbeddingsOption, LabelsOption, NprocOption,
                        OutDirOption, ParamsOption, ProgressOption, RetrievalOption,
                        ThreadsOption, app, resolve_device, set_threads, stage)


@app.command()
def train(params: ParamsOption = Path("params.yaml"),
          embeddings: EmbeddingsOption = Path("data/embeddings/embeddings.parquet"),
          labels: LabelsOption = Path("data/labels/labels.parquet"),
          retrieval: RetrievalOption = Path("data/retrieval/neighbours.parquet"),
          out_dir: OutDirOption = Path("data/model"), device: DeviceOption = "auto",
          threads: ThreadsOption = 0, progress: ProgressOption = True,
          nproc: NprocOption = 1) -> None:
    """Train the diffusion classifier; keep the best validation epoch."""
    with stage("train", params) as p:
        if nproc > 1 and not distributed.launched():
            raise typer.Exit(distributed.relaunch(nproc, [
                "train", "--params", str(params), "--embeddings", str(embeddings),
                "--labels", str(labels), "--retrieval", str(retrieval), "--out-dir",
                str(out_dir), "--device", device, "--threads", str(threads),
                "--progress" if progress else "--no-progress"]))
        ctx = distributed.env_context()
        if not ctx.is_main:  # one rank speaks
            logging.getLogger().setLevel(logging.WARNING)
        dev = distributed.rank_device(resolve_device(device), ctx)
        with distributed.session(device=dev) as ctx:
            _train(p, embeddings=embeddings, labels=labels, retrieval=retrieval,
                   out_dir=out_dir, dev=dev, threads=threads, progress=progress, ctx=ctx)


log = logging.getLogger(__name__)

SMALL_STEP_FLOPS = 1e8
"""Below this many forward FLOPs per training step, CPU training runs on one thread."""


def _one_thread_for_small_steps(p: Params, *, dim: int, num_classes: int) -> None:
    """Small steps (digits: 32 x 1.2 MFLOP) are too short to split across threads: on a
    quiet 2-core machine two threads saved 30 %, but with one core busy elsewhere the
    threads' spin-waiting made each step 30x slower. One thread costs 12 ms per step
    either way. Larger steps (CIFAR: 256 x 2.6 MFLOP) keep the library's threads."""
    spec = model_spec(p.train, num_classes=num_classes, dim=dim)  # the network trained
    if p.train.batch_size * spec.flops_per_sample() < SMALL_STEP_FLOPS:
        torch.set_num_threads(1)
        log.info("small training steps: using one CPU thread (pass --threads to override)")


def _train(p: Params, *, embeddings: Path, labels: Path, retrieval: Path, out_dir: Path,
           dev: str, threads: int, progress: bool, ctx: distributed.DistContext) -> None:
    """The stage body on one rank; only rank 0 writes."""
    set_threads(threads)
    retain_freed_memory()  # each step re-allocates the same buffers (pipeline.allocator)
    emb = open_embeddings(embeddings)  # vectors are read below, train and val rows only
    lab = read_labels(labels)
    if threads == 0 and dev == "cpu":
        _one_thread_for_small_steps(p, dim=emb.dim, num_classes=lab.num_classes)
    ret_ids, candidates, ret_ref = read_candidates_meta(retrieval)
    check_same_samples(emb.sample_id, lab.sample_id, "embeddings", "labels")
    check_same_samples(emb.sample_id, ret_ids, "embeddings", "retrieval table")
    inputs = (emb.ref(), lab.ref(labels), ret_ref)
    check_built_from(ret_ref, *inputs[:2])
    built_from = {r.name: r.stamp() for r in inputs}  # before training: fails fast
    train_rows, val_rows = emb.rows("train"), emb.rows("val")
    if len(val_rows) == 0:
        raise ArtifactError("no validation split: model selection needs one "
                            "(set data.val_fraction or use a source with a val split)")
    # Selection uses clean validation labels where known (CIFAR protocol), else the
    # observed ones (real-noise datasets without a clean val split).
    val_truth = np.where(lab.clean[val_rows] != UNKNOWN, lab.clean[val_rows],
                         lab.observed[val_rows])
    # Only the rows training uses, read by record batch and normalised in place: the
    # stage holds one copy of the train features (test rows are never read here).
    train_x, val_x = emb.read_rows(train_rows), emb.read_rows(val_rows)
    norm = FeatureNormalizer.fit(train_x, p.train.feature_norm)
    data = TrainData(features=torch.from_numpy(norm.apply_inplace(train_x)).to(dev),
                     candidates=torch.from_numpy(candidates[train_rows]).to(dev),
                     val_features=torch.from_numpy(norm.apply_inplace(val_x)).to(dev),
                     val_labels=torch.from_numpy(val_truth).to(dev),
                     num_classes=lab.num_classes)
    result = train_diffusion(data, p.train, progress=progress)
    if not ctx.is_main:
        return
    info = {**result.best, "train_config": as_dict(p.train), "k": candidates.shape[1] - 1,
            "encoder": emb.meta.get("encoder"), "model": emb.meta.get("model"),
            "val_labels": "clean" if (lab.clean[val_rows] != UNKNOWN).all() else "observed",
            BUILT_FROM: built_from}
    with StageWriter() as out:
        save_checkpoint(out.path(out_dir / "model.pt"), spec=result.spec,
                        state_dict=result.state_dict, normalizer=norm,
                        ddim_steps=p.train.ddim_steps, readout=result.best["readout"],
                        info=info)
        write_csv(result.history, out.path(out_dir / "train_log.csv"))
        write_json({"best_epoch": result.best["epoch"],
                    "best_val_accuracy": result.best["val_accuracy"],
                    "best_weights": result.best["weights"],
                    "readout": result.best["readout"],
                    "final_loss": result.history[-1]["loss"]},
                   out.path(out_dir / "train.json"))
