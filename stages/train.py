"""`lra train`: embeddings + retrieved labels -> data/model/ (checkpoint, log, metrics).

Under torchrun (or `--nproc N`) every rank loads the same tables and trains with
DistributedDataParallel on its share of each global batch; rank 0 validates and writes
(pipeline.training, docs/distributed.md).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import torch
import typer
from tqdm.auto import tqdm

from pipeline import distributed
from pipeline.allocator import retain_freed_memory
from pipeline.artifacts import StageWriter, write_csv, write_json
from pipeline.baselines import fit_linear_baselines
from pipeline.checkpoint import save_checkpoint
from pipeline.config import Params, as_dict
from pipeline.errors import ArtifactError
from pipeline.features import FeatureNormalizer
from pipeline.index import apply_search_params, index_ref, load_index_with_info
from pipeline.lineage import BUILT_FROM, Ref, check_built_from
from pipeline.neighbours import read_candidates_meta
from pipeline.retrieval import (FALLBACK_K, candidate_labels, falls_back_to_small_k, retry_k,
                                search_rows)
from pipeline.tables import (UNKNOWN, EmbeddingsFile, Labels, check_same_samples,
                             open_embeddings, read_labels)
from pipeline.training import (CLASS_BALANCE_AUTO_RATIO, TrainData, TrainResult,
                               class_imbalance, model_spec, resolve_class_balance,
                               train_diffusion)
from stages.app import (DeviceOption, EmbeddingsOption, IndexOption, LabelsOption,
                        NprocOption, OutDirOption, ParamsOption, ProgressOption, RetrievalOption,
                        ThreadsOption, app, resolve_device, set_threads, stage)


@app.command()
def train(params: ParamsOption = Path("params.yaml"),
          embeddings: EmbeddingsOption = Path("data/embeddings/embeddings.parquet"),
          labels: LabelsOption = Path("data/labels/labels.parquet"),
          retrieval: RetrievalOption = Path("data/retrieval/neighbours.parquet"),
          index: IndexOption = Path("data/index"),
          out_dir: OutDirOption = Path("data/model"), device: DeviceOption = "auto",
          threads: ThreadsOption = 0, progress: ProgressOption = True,
          nproc: NprocOption = 1) -> None:
    """Train the diffusion classifier; keep the best validation epoch. When a neighbour
    vote at another k of retrieve.k_choices beats it on validation, train once more at
    that k (neighbours searched in --index) and keep the better; when the noisy linear
    probe still beats it, train once more on the nearest neighbour alone (k=1)."""
    with stage("train", params) as p:
        if nproc > 1 and not distributed.launched():
            raise typer.Exit(distributed.relaunch(nproc, [
                "train", "--params", str(params), "--embeddings", str(embeddings),
                "--labels", str(labels), "--retrieval", str(retrieval), "--index",
                str(index), "--out-dir",
                str(out_dir), "--device", device, "--threads", str(threads),
                "--progress" if progress else "--no-progress"]))
        ctx = distributed.env_context()
        if not ctx.is_main:  # one rank speaks
            logging.getLogger().setLevel(logging.WARNING)
        dev = distributed.rank_device(resolve_device(device), ctx)
        with distributed.session(device=dev) as ctx:
            _train(p, embeddings=embeddings, labels=labels, retrieval=retrieval,
                   index=index, out_dir=out_dir, dev=dev, threads=threads,
                   progress=progress, ctx=ctx)


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


def _train(p: Params, *, embeddings: Path, labels: Path, retrieval: Path, index: Path,
           out_dir: Path, dev: str, threads: int, progress: bool,
           ctx: distributed.DistContext) -> None:
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
    val_truth = lab.selection_truth(val_rows)
    # Only the rows training uses, read by record batch and normalised in place: the
    # stage holds one copy of the train features (test rows are never read here).
    train_x, val_x = emb.read_rows(train_rows), emb.read_rows(val_rows)
    norm = FeatureNormalizer.fit(train_x, p.train.feature_norm)
    data = TrainData(features=torch.from_numpy(norm.apply_inplace(train_x)).to(dev),
                     candidates=torch.from_numpy(candidates[train_rows]).to(dev),
                     val_features=torch.from_numpy(norm.apply_inplace(val_x)).to(dev),
                     val_labels=torch.from_numpy(val_truth).to(dev),
                     num_classes=lab.num_classes)
    imbalance = class_imbalance(data.candidates, lab.num_classes)
    # Resolved once, on the retrieved candidates, so that a retry at another k trains
    # with the same loss as the first run.
    balance = resolve_class_balance(p.train.class_balance, imbalance)
    if ctx.is_main:
        _log_class_balance(p.train.class_balance, balance, imbalance)
    p = replace(p, train=replace(p.train, class_balance=balance))
    result = train_diffusion(data, p.train, progress=progress)
    k = candidates.shape[1] - 1
    k_retry = retry_k(ret_ref.meta.get("k_selection"), trained_k=k,
                      val_accuracy=result.best["val_accuracy"]) if ctx.is_main else None
    if ctx.enabled:  # only rank 0 validated; every rank must train the retry
        k_retry = distributed.broadcast_object(k_retry, ctx)
    retried = None
    if k_retry is not None:
        result, retried = _retry(p, result, data, k=k, k_retry=k_retry, index=index,
                                 emb=emb, lab=lab, ret_ref=ret_ref, dev=dev, progress=progress)
        k = retried["kept_k"]
    probe_accuracy = (fit_linear_baselines(emb, lab, p.evaluate, clean=False)[2]["noisy_linear"]
                      if ctx.is_main else None)
    fall_back = ctx.is_main and falls_back_to_small_k(
        model_val_accuracy=result.best["val_accuracy"], probe_val_accuracy=probe_accuracy,
        trained_k=k)
    if ctx.enabled:
        fall_back = distributed.broadcast_object(fall_back, ctx)
    fell_back = None
    if fall_back:
        result, fell_back = _fall_back(p, result, data, k=k, probe_accuracy=probe_accuracy,
                                       progress=progress)
        k = fell_back["kept_k"]
    if not ctx.is_main:
        return
    info = {**result.best, "train_config": as_dict(p.train), "k": k, "k_retry": retried,
            "probe_retry": fell_back,
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
                    "final_loss": result.history[-1]["loss"], "k": k,
                    "candidate_class_imbalance": round(imbalance, 4),
                    "class_balance": balance,
                    **({"k_retry": retried} if retried else {}),
                    **({"probe_retry": fell_back} if fell_back else {})},
                   out.path(out_dir / "train.json"))


def _log_class_balance(requested: str, balance: str, imbalance: float) -> None:
    """One line when the loss weighting depends on the class imbalance."""
    if imbalance < CLASS_BALANCE_AUTO_RATIO:
        return
    if requested == "auto":
        log.info("the retrieved training labels are imbalanced (the largest class %.1fx the "
                 "smallest): weighting the loss by inverse class share (train.class_balance: "
                 "auto; none keeps the paper's loss)", imbalance)
    elif balance == "none":
        log.info("hint: the retrieved training labels are imbalanced (the largest class "
                 "%.1fx the smallest); train.class_balance: auto or inverse often does "
                 "better then (README, Troubleshooting)", imbalance)


def _retry(p: Params, first: TrainResult, data: TrainData, *, k: int, k_retry: int,
           index: Path, emb: EmbeddingsFile, lab: Labels, ret_ref: Ref, dev: str,
           progress: bool) -> tuple[TrainResult, dict]:
    """Train again on candidates from the k_retry nearest neighbours (searched in the
    index and space the retrieval table was built from) and keep the run with the higher
    validation accuracy (ties: the first). Returns (kept result, the record for
    train.json and the checkpoint: both ks and both validation accuracies)."""
    vote = ret_ref.meta["k_selection"]
    vote_accuracy = vote["validation_vote_accuracy"][vote["choices"].index(k_retry)]
    log.info("the k=%d neighbour vote scores %.4f on validation, above the model trained "
             "at k=%d (%.4f): training again at k=%d", k_retry, vote_accuracy, k,
             first.best["val_accuracy"], k_retry)
    space = ret_ref.meta.get("space", "raw")  # the space the table was retrieved in
    idx, index_info = load_index_with_info(index, space)
    check_built_from(ret_ref, index_ref(index, index_info))  # the table's own index
    apply_search_params(idx, p.index.search_params)
    is_train = emb.split == "train"
    with tqdm(total=int(is_train.sum()), unit="row", desc=f"retrieve k={k_retry}",
              disable=not progress, dynamic_ncols=True) as bar:
        rows, ids, _ = search_rows(idx, emb.iter_chunks(), emb.sample_id, is_train,
                                   k=k_retry, on_rows=bar.update)
    candidates = candidate_labels(lab.observed[rows], lab.observed[ids])  # (N_train, k+1)
    second = train_diffusion(replace(data, candidates=torch.from_numpy(candidates).to(dev)),
                             p.train, progress=progress)
    kept, kept_k = _keep_better(first, k, second, k_retry)
    return kept, {"first_k": k, "first_val_accuracy": first.best["val_accuracy"],
                  "retry_k": k_retry, "retry_val_accuracy": second.best["val_accuracy"],
                  "vote_val_accuracy": vote_accuracy, "kept_k": kept_k}


def _fall_back(p: Params, first: TrainResult, data: TrainData, *, k: int,
               probe_accuracy: float, progress: bool) -> tuple[TrainResult, dict]:
    """Train again on the own label and the FALLBACK_K nearest neighbours' (the first
    columns of the retrieved candidates, ranked best first) and keep the run with the
    higher validation accuracy (ties: the first). Returns (kept result, the record for
    train.json and the checkpoint)."""
    log.info("the noisy linear probe scores %.4f on validation, above the model trained at "
             "k=%d (%.4f): training again at k=%d", probe_accuracy, k,
             first.best["val_accuracy"], FALLBACK_K)
    small = replace(data, candidates=data.candidates[:, :FALLBACK_K + 1].contiguous())
    second = train_diffusion(small, p.train, progress=progress)
    kept, kept_k = _keep_better(first, k, second, FALLBACK_K)
    return kept, {"probe_val_accuracy": probe_accuracy, "first_k": k,
                  "first_val_accuracy": first.best["val_accuracy"], "retry_k": FALLBACK_K,
                  "retry_val_accuracy": second.best["val_accuracy"], "kept_k": kept_k}


def _keep_better(first: TrainResult, first_k: int, second: TrainResult, second_k: int
                 ) -> tuple[TrainResult, int]:
    """The run with the higher validation accuracy (ties: the first) and its k; logs
    both."""
    keep_second = second.best["val_accuracy"] > first.best["val_accuracy"]
    (kept, kept_k), (other, other_k) = (((second, second_k), (first, first_k)) if keep_second
                                        else ((first, first_k), (second, second_k)))
    log.info("keeping the k=%d model (validation accuracy %.4f; k=%d: %.4f)", kept_k,
             kept.best["val_accuracy"], other_k, other.best["val_accuracy"])
    return kept, kept_k
