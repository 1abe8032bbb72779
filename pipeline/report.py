"""The report stage's work: score every training label with the trained model, rank the
suspects (pipeline.issues), and assemble the HTML page (pipeline.report_page) from the
pipeline's artifacts. `build_report` does no writing; the stage publishes its results.

The train and val rows are scored (val labels are clean: the share of them the rule
flags is its false-positive rate, report.json `val_flag_rate`); test rows are not.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from pipeline.artifacts import read_json, read_table
from pipeline.checkpoint import load_checkpoint
from pipeline.config import EvaluateConfig, ReportConfig
from pipeline.crossfit import (FOLDS, STANDARD_ERRORS, assign_folds, clearly_ahead,
                               cross_fit_scores, fit_fold_probes)
from pipeline.errors import ArtifactError
from pipeline.inference import DiffusionScorer
from pipeline.issues import (FLAG_RULES, LabelIssues, RowScores, find_label_issues,
                             flag_issues, score_rows, summary)
from pipeline.report_io import (image_refs, issues_table, load_images, read_neighbourhood,
                                read_predictions, read_train_log)
from pipeline.report_page import GalleryEntry, Neighbour, ReportInputs, render
from pipeline.tables import UNKNOWN, check_same_samples, open_embeddings, read_labels

log = logging.getLogger(__name__)

SMALL_MODEL_WEIGHTS = 10_000_000
"""On CPU without --threads, models below this many weights score on one thread: their
matrix products are too small to split, and on a shared machine the second thread's
spin-waiting made scoring 4x slower (digits: 3.6 s on one thread, 38 s on two)."""


@dataclass(frozen=True)
class ReportPaths:
    """The stage's inputs (defaults: the DVC layout)."""

    model: Path = Path("data/model/model.pt")
    embeddings: Path = Path("data/embeddings/embeddings.parquet")
    labels: Path = Path("data/labels/labels.parquet")
    retrieval: Path = Path("data/retrieval/neighbours.parquet")
    predictions: Path = Path("data/evaluate/predictions.parquet")
    prepared: Path = Path("data/prepared/samples.parquet")
    metrics: Path = Path("data/evaluate/metrics.json")
    train_log: Path = Path("data/model/train_log.csv")
    noise: Path = Path("data/labels/noise.json")
    retrieval_summary: Path = Path("data/retrieval/retrieval.json")


@dataclass(frozen=True)
class Report:
    """What the stage writes: the issues table (with its metadata), report.json, the page."""

    table: pa.Table
    table_meta: dict[str, Any]
    summary: dict[str, Any]
    html: str


def build_report(cfg: ReportConfig, paths: ReportPaths, *, device: str, threads: int = 0,
                 chunk_rows: int = 4096, progress: Callable[[int], None] | None = None,
                 linear: EvaluateConfig | None = None) -> Report:
    """Score, rank and render; `linear` (default: EvaluateConfig()) sets the cross-fitted
    probe's iterations and row cap when that fallback scorer runs."""
    linear = linear or EvaluateConfig()
    emb = open_embeddings(paths.embeddings)
    lab = read_labels(paths.labels)
    nbh = read_neighbourhood(paths.retrieval)
    preds = read_predictions(paths.predictions, num_classes=lab.num_classes)
    check_same_samples(emb.sample_id, lab.sample_id, "embeddings", "labels")
    check_same_samples(emb.sample_id, nbh.sample_id, "embeddings", "retrieval table")
    check_same_samples(emb.sample_id, preds.sample_id, "embeddings", "predictions")
    net, ckpt = load_checkpoint(paths.model, device=device)
    if ckpt["spec"]["feature_dim_in"] != emb.dim:
        raise ArtifactError(f"model expects {ckpt['spec']['feature_dim_in']}-d embeddings "
                            f"but the embeddings are {emb.dim}-d; rerun `lra train`")
    if threads == 0 and device == "cpu" and \
            sum(w.numel() for w in net.parameters()) < SMALL_MODEL_WEIGHTS:
        torch.set_num_threads(1)
        log.info("small model: scoring on one CPU thread (pass --threads to override)")
    metrics = read_json(paths.metrics, "evaluation metrics")
    train, val = emb.rows("train"), emb.rows("val")
    rows = np.union1d(train, val)
    fallback = _fallback(metrics, train_rows=len(train), val_rows=len(val))
    if fallback is None:
        scored_by = "lra_diffusion"
        scorer = DiffusionScorer.from_checkpoint(net, ckpt, num_classes=lab.num_classes,
                                                 device=device, samples=cfg.samples)
        log.info("scoring %d train and %d val labels with %d stochastic samples each",
                 len(train), len(val), cfg.samples)
        scores = score_rows(emb, scorer, rows=rows, given=lab.observed,
                            chunk_rows=chunk_rows, progress=progress)
    else:
        scored_by = "noisy_linear"
        log.warning("LRA-diffusion is below the noisy linear probe on validation (%.4f "
                    "against %.4f): scoring the labels with that probe, cross-fitted over "
                    "%d folds", fallback["lra_val_accuracy"], fallback["probe_val_accuracy"],
                    fallback["folds"])
        scores = _cross_fit(emb, lab, rows=rows, train=train, l2=fallback["l2"],
                            linear=linear, mean_start=preds.predicted, chunk_rows=chunk_rows,
                            progress=progress)
    issues = find_label_issues(
        sample_id=emb.sample_id[train], given=lab.observed[train],
        scores=scores.take(np.searchsorted(rows, train)), agreement=nbh.agreement[train],
        knn=preds.knn_vote[train], clean=lab.clean[train], min_confidence=cfg.min_confidence,
        scored_by=scored_by)
    val_scores = scores.take(np.searchsorted(rows, val))
    summ = summary(issues, samples=cfg.samples if fallback is None else 0,
                   min_confidence=cfg.min_confidence,
                   val_flag_rate=_val_flag_rate(lab, val, val_scores, cfg, scored_by),
                   scored_by=scored_by, fallback=fallback)
    names = preds.class_names
    refs = image_refs(paths.prepared, issues.sample_id)
    table = issues_table(issues, names, refs)
    meta = {"class_names": names, "samples": summ["stochastic_samples"],
            "min_confidence": cfg.min_confidence, "readout": ckpt["readout"],
            "scored_by": scored_by, "flag_rule": FLAG_RULES[scored_by]}
    test = np.flatnonzero((preds.split == "test") & (preds.true != UNKNOWN))
    page = ReportInputs(
        title="LRA-diffusion report",
        facts=_facts(paths, emb, lab, ckpt, nbh),
        metrics=metrics,
        train_log=read_train_log(paths.train_log),
        confusion_actual=preds.true[test], confusion_predicted=preds.predicted[test],
        class_names=names, noise=read_json(paths.noise, "noise summary"),
        retrieval=read_json(paths.retrieval_summary, "retrieval summary"), issues=summ,
        gallery=_gallery(issues, nbh, lab.clean, names, refs, paths.prepared, cfg))
    return Report(table, meta, summ, render(page))


def _val_flag_rate(lab, val: np.ndarray, scores, cfg: ReportConfig, scored_by: str
                   ) -> float | None:
    """Share of the val labels known to be right that the rule flags (false positives)."""
    right = (lab.clean[val] != UNKNOWN) & (lab.clean[val] == lab.observed[val])
    if not right.any():
        return None
    flags = flag_issues(lab.observed[val], scores, min_confidence=cfg.min_confidence,
                        scored_by=scored_by)
    return float(flags[right].mean())


def _fallback(metrics: dict, *, train_rows: int, val_rows: int) -> dict | None:
    """The cross-fitted probe's settings when evaluate's guard found LRA-diffusion below
    the noisy linear probe on validation (and recorded the probe's L2), the probe is
    clearly ahead over the val_rows validation rows (`clearly_ahead`), and there are
    enough train rows for the folds; else None."""
    model = metrics.get("model", {})
    l2 = metrics.get("linear_l2", {}).get("noisy_linear")
    if not model.get("below_baseline") or model.get("baseline") != "noisy_linear" \
            or l2 is None or train_rows < FOLDS:
        return None
    lra, probe = model.get("val_accuracy"), model.get("baseline_val_accuracy")
    if not clearly_ahead(probe, lra, val_rows):
        log.info("the noisy linear probe's validation accuracy %.4f is within %.0f standard "
                 "errors of LRA-diffusion's %.4f: the labels stay scored by the model",
                 probe, STANDARD_ERRORS, lra)
        return None
    return {"reason": "LRA-diffusion below the noisy linear probe on validation",
            "lra_val_accuracy": lra, "probe_val_accuracy": probe, "val_rows": val_rows,
            "folds": FOLDS, "l2": l2}


def _cross_fit(emb, lab, *, rows: np.ndarray, train: np.ndarray, l2: float,
               linear: EvaluateConfig, mean_start: np.ndarray, chunk_rows: int,
               progress: Callable[[int], None] | None) -> RowScores:
    """pipeline.crossfit's scores of `rows`, with mean_start set to LRA-diffusion's own
    prediction (evaluate's `predicted`, (N,) int64) so the table keeps it."""
    fold = assign_folds(len(train))
    log.info("fitting %d linear probes, each on the train rows outside its fold (at most "
             "%d rows; CIFAR scale: ~4 s each)", FOLDS, linear.linear_max_rows)
    probes = fit_fold_probes(emb, train, lab.observed[train], fold=fold,
                             num_classes=lab.num_classes, l2=l2, iters=linear.linear_iters,
                             max_rows=linear.linear_max_rows)
    fold_by_row = np.full(len(emb.sample_id), -1, dtype=np.int64)
    fold_by_row[train] = fold
    scores = cross_fit_scores(emb, probes, rows=rows, fold=fold_by_row, given=lab.observed,
                              chunk_rows=chunk_rows, progress=progress)
    return RowScores(scores.vote, scores.confidence, mean_start[rows], scores.given_score)


def _facts(paths: ReportPaths, emb, lab, ckpt: dict, nbh) -> dict[str, Any]:
    counts = {s: int((emb.split == s).sum()) for s in sorted(set(emb.split))}
    info = ckpt.get("info", {})
    return {"source": _source(paths), "encoder":
            emb.meta.get("encoder", "?"), "embedding dim": emb.dim, "classes": lab.num_classes,
            **{f"{s} images": n for s, n in counts.items()},
            "neighbours k": f"{nbh.neighbour_ids.shape[1]}"
                            + (" (chosen on validation)" if nbh.k_chosen_on_validation
                               else ""),
            "model": f"epoch {info.get('epoch', '?')}, {info.get('weights', '?')} weights, "
                     f"{ckpt.get('readout', '?')} readout" + _retry_note(info)}


def _retry_note(info: dict) -> str:
    """How train's retries went, when they ran (stages/train.py): at the k of a better
    neighbour vote, then at k = 1 when the noisy linear probe was still ahead."""
    parts = []
    for key, rival, rival_score in (
            ("k_retry", "the k={retry_k} neighbour vote", "vote_val_accuracy"),
            ("probe_retry", "the noisy linear probe", "probe_val_accuracy")):
        retry = info.get(key)
        if not retry:
            continue
        if not parts:
            parts.append(f"trained at k={retry['first_k']} "
                         f"(validation {retry['first_val_accuracy']:.3f})")
        parts.append(f"as {rival.format(**retry)} scored {retry[rival_score]:.3f}, again at "
                     f"k={retry['retry_k']} ({retry['retry_val_accuracy']:.3f}): kept "
                     f"k={retry['kept_k']}")
    return "; " + " and, ".join(parts) if parts else ""


def _source(paths: ReportPaths) -> str:
    _, meta = read_table(paths.prepared, "prepared table", columns=("sample_id",))
    return str(meta.get("source", "?"))


def _gallery(issues: LabelIssues, nbh, clean: np.ndarray, names: list[str],
             refs: list[str], prepared: Path, cfg: ReportConfig) -> list[GalleryEntry]:
    """The cfg.gallery_items most suspect training labels with their first
    cfg.gallery_neighbours neighbours (sample ids are row positions; clean: (N,) int64
    with UNKNOWN)."""
    top = range(min(cfg.gallery_items, len(issues.sample_id)))
    neighbour_ids = {i: nbh.neighbour_ids[issues.sample_id[i], :cfg.gallery_neighbours]
                     for i in top}
    neighbour_labels = {i: nbh.neighbour_labels[issues.sample_id[i], :cfg.gallery_neighbours]
                        for i in top}
    wanted = [int(issues.sample_id[i]) for i in top]
    wanted += [int(j) for i in top for j in neighbour_ids[i]]
    images = load_images(prepared, wanted)
    entries = []
    for i in top:
        sid = int(issues.sample_id[i])
        suggested = int(issues.predicted_label[i])
        entries.append(GalleryEntry(
            rank=int(issues.issue_rank[i]), sample_id=sid, image_ref=refs[i],
            image=images.get(sid), given=names[issues.given_label[i]],
            suggested=names[suggested], confidence=float(issues.confidence[i]),
            label_score=float(issues.label_score[i]), flagged=bool(issues.is_label_issue[i]),
            clean=names[clean[sid]] if clean[sid] != UNKNOWN else None,
            neighbours=[Neighbour(int(j), images.get(int(j)), names[int(y)],
                                  int(y) == suggested, int(y) == int(issues.given_label[i]))
                        for j, y in zip(neighbour_ids[i], neighbour_labels[i])]))
    return entries
