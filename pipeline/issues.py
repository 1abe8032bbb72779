"""Label issues: which training labels the trained model thinks are wrong, as a ranked
table with the column names a cleanlab user knows.

Per training sample:
    given_label        the observed (possibly noisy) label, int64
    predicted_label    the majority vote of S stochastic DDIM trajectories from
                       y_T ~ N(0, I) (METHOD.md section 6), int64
    confidence         fraction of the S trajectories voting for predicted_label, float32
    mean_start_label   the deterministic mean-start prediction (what metrics.json scores)
    neighbour_agreement  own_label_agreement of the retrieval stage: the fraction of the
                       k + 1 candidates (own label + k neighbours' labels) equal to
                       given_label, float32
    knn_vote           majority label of the k neighbours (evaluate's knn_vote), int64
    label_score        in [0, 1], higher = the given label is more likely correct (as in
                       cleanlab): the mean-start y_0's coordinate of the given label
                       through a logistic centred at 0.5 (the network is trained to
                       generate the one-hot label, so a correct label's coordinate is
                       near 1)
    is_label_issue     predicted_label != given_label and mean_start_label != given_label
                       and confidence >= min_confidence
    issue_rank         0 = most suspect: ascending label_score, ties by sample_id.

Measured on the digits default (1,079 train labels, 432 corrupted; S = 16), against the
injected corruptions: label_score AUROC 0.9987 (neighbour_agreement alone 0.9939, the
stochastic vote share 0.992); the flag precision 0.973, recall 0.984, F1 0.978, and
2.5 % of the clean validation labels flagged. The vote alone as the rule: F1 0.959
(7.5 % of clean validation labels flagged); a confidence threshold trades recall for
precision (the vote alone at 0.5: precision 0.99, recall 0.68), because with
y_T ~ N(0, I) the vote share is low even where the vote is right (mean 0.56).

When LRA-diffusion trails the noisy linear probe on validation (metrics.json
`model.below_baseline`, baseline noisy_linear) by more than two standard errors
(pipeline.crossfit.clearly_ahead), the report scores the labels with that probe instead, cross-fitted so that no label scores itself (pipeline.crossfit):
predicted_label and confidence are then the out-of-fold probe's class and probability,
label_score its probability of the given label, mean_start_label stays LRA-diffusion's
prediction, and the flag is the probe's class != given_label (FLAG_RULES). report.json
`scored_by` says which scorer ran.

`score_rows` runs the model through `DiffusionScorer` (the checkpoint's own normaliser and
seeded, chunk-independent stochastic vote); everything else is NumPy on (n,) arrays.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from pipeline.inference import DiffusionScorer
from pipeline.tables import UNKNOWN, EmbeddingsFile

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RowScores:
    """What the model says about n selected rows: vote (n,) int64 and confidence (n,)
    float32 (the stochastic vote), mean_start (n,) int64 (the deterministic prediction)
    and given_score (n,) float32 (the mean-start y_0 coordinate of the given label)."""

    vote: np.ndarray
    confidence: np.ndarray
    mean_start: np.ndarray
    given_score: np.ndarray

    @staticmethod
    def empty(n: int) -> RowScores:
        return RowScores(np.empty(n, np.int64), np.empty(n, np.float32),
                         np.empty(n, np.int64), np.empty(n, np.float32))

    def take(self, rows: np.ndarray) -> RowScores:
        return RowScores(self.vote[rows], self.confidence[rows], self.mean_start[rows],
                         self.given_score[rows])


def score_rows(emb: EmbeddingsFile, scorer: DiffusionScorer, *, rows: np.ndarray,
               given: np.ndarray, chunk_rows: int = 4096,
               progress: Callable[[int], None] | None = None) -> RowScores:
    """Score the increasing row positions `rows` ((n,) int64) of the embeddings, streaming
    chunk_rows rows at a time; given: (N,) int64 labels of every row. The j-th selected
    row gets the stochastic starting noise of row position j (`first_row`), so the result
    does not depend on chunk_rows (byte-identical from 37 rows per chunk up; chunks of a
    few rows run other matrix kernels, whose y_0 can differ in the last bit). Needs
    scorer.samples >= 1."""
    if scorer.samples < 1:
        raise ValueError(f"the scorer needs samples >= 1 for a vote, got {scorer.samples}")
    out = RowScores.empty(len(rows))
    for positions, x, part in selected_chunks(emb, rows, chunk_rows, progress):
        chunk = scorer.score(x, first_row=part.start)
        out.vote[part] = chunk.vote
        out.confidence[part] = chunk.confidence
        out.mean_start[part] = chunk.predicted
        out.given_score[part] = chunk.scores[np.arange(len(x)), given[positions]]
    return out


def selected_chunks(emb: EmbeddingsFile, rows: np.ndarray, chunk_rows: int,
                    progress: Callable[[int], None] | None = None
                    ) -> Iterator[tuple[np.ndarray, np.ndarray, slice]]:
    """Stream the increasing row positions `rows` ((n,) int64) of the embeddings,
    chunk_rows rows read at a time: yields (positions (m,) int64, their vectors (m, D)
    float32, the slice of `rows` they are) for every chunk holding any; progress gets
    every chunk's row count."""
    selected = np.zeros(len(emb.sample_id), dtype=bool)
    selected[rows] = True
    done = 0
    for start, raw in emb.iter_chunks(chunk_rows):
        pick = np.flatnonzero(selected[start:start + len(raw)])
        if len(pick):
            yield start + pick, raw[pick], slice(done, done + len(pick))
            done += len(pick)
        if progress is not None:
            progress(len(raw))


SCORE_SLOPE = 8.0
"""label_score = 1 / (1 + exp(-SCORE_SLOPE (y - 0.5))) of the given label's y_0
coordinate y: 0.98 at y = 1 (the one-hot target), 0.02 at y = 0, increasing, so the
rank keeps the distinctions of y that clipping to [0, 1] lost (it tied a third of the
digits rows; the logistic ties none there). float32 rounds it to 1 above y ~ 2.6."""


def label_score(given_score: np.ndarray) -> np.ndarray:
    """(n,) float32 in [0, 1], higher = label more likely correct: a logistic squashing
    of the mean-start y_0 coordinate of the given label (see SCORE_SLOPE)."""
    y = np.clip(np.asarray(given_score, dtype=np.float64), -10.0, 11.0)  # no overflow
    return (1.0 / (1.0 + np.exp(-SCORE_SLOPE * (y - 0.5)))).astype(np.float32)


SCORERS = ("lra_diffusion", "noisy_linear")
"""Who scores the labels: the diffusion classifier, or (pipeline.crossfit) the
cross-fitted noisy linear probe when that probe beat it on validation."""

FLAG_RULES = {
    "lra_diffusion": "predicted_label != given_label and mean_start_label != given_label "
                     "and confidence >= min_confidence",
    "noisy_linear": "predicted_label != given_label and confidence >= min_confidence "
                    "(predicted_label: the out-of-fold linear probe's class)",
}


def flag_issues(given: np.ndarray, scores: RowScores, *, min_confidence: float,
                scored_by: str = "lra_diffusion") -> np.ndarray:
    """(n,) bool. LRA-diffusion: both the stochastic vote (with at least min_confidence)
    and the mean-start prediction reject the given label. The cross-fitted probe: its
    class (with at least min_confidence probability) rejects it."""
    if scored_by not in SCORERS:
        raise ValueError(f"scored_by must be one of {SCORERS}, got {scored_by!r}")
    flag = (scores.vote != given) & (scores.confidence >= min_confidence)
    return flag & (scores.mean_start != given) if scored_by == "lra_diffusion" else flag


def issue_ranks(score: np.ndarray, sample_id: np.ndarray) -> np.ndarray:
    """Row order, most suspect first: ascending score, ties by sample_id. (N,) int64."""
    return np.lexsort((sample_id, score)).astype(np.int64)


def auroc(score: np.ndarray, positive: np.ndarray) -> float | None:
    """Area under the ROC curve of `score` (higher = more likely positive) against the
    boolean `positive`; ties count one half (Mann-Whitney). None without both classes."""
    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(score, kind="stable")
    sorted_scores = score[order]
    ranks = np.empty(len(score), dtype=np.float64)
    # average rank (1-based) within each group of equal scores
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    average = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(average, counts)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def detection_quality(flag: np.ndarray, suspicion: np.ndarray, corrupted: np.ndarray
                      ) -> dict[str, float | int | None]:
    """Precision, recall, F1 of a boolean flag and AUROC of a suspicion score (higher =
    more likely wrong) against the known corruptions (all (n,) arrays, bool / float)."""
    corrupted = np.asarray(corrupted, dtype=bool)
    tp = int((flag & corrupted).sum())
    flagged, actual = int(flag.sum()), int(corrupted.sum())
    precision = tp / flagged if flagged else None
    recall = tp / actual if actual else None
    f1 = (2 * precision * recall / (precision + recall)
          if precision is not None and recall is not None and precision + recall > 0 else None)
    return {"precision": precision, "recall": recall, "f1": f1,
            "auroc": auroc(suspicion, corrupted), "true_positives": tp}


@dataclass(frozen=True)
class LabelIssues:
    """The label issues table's columns for the n training rows, already in rank order
    (row 0 = issue_rank 0). Ids and labels int64, scores float32, flags bool."""

    sample_id: np.ndarray
    given_label: np.ndarray
    predicted_label: np.ndarray
    confidence: np.ndarray
    mean_start_label: np.ndarray
    neighbour_agreement: np.ndarray
    knn_vote: np.ndarray
    label_score: np.ndarray
    is_label_issue: np.ndarray
    issue_rank: np.ndarray
    is_corrupted: np.ndarray | None  # (n,) bool when every clean train label is known


def find_label_issues(*, sample_id: np.ndarray, given: np.ndarray, scores: RowScores,
                      agreement: np.ndarray, knn: np.ndarray, clean: np.ndarray,
                      min_confidence: float, scored_by: str = "lra_diffusion"
                      ) -> LabelIssues:
    """Build the ranked table from per-row arrays of the training rows (all (n,); clean
    is UNKNOWN where the clean label is not known). scored_by "noisy_linear": scores
    come from pipeline.crossfit, whose given_score is already a probability (the
    label_score as it is)."""
    score = (label_score(scores.given_score) if scored_by == "lra_diffusion"
             else np.asarray(scores.given_score, dtype=np.float32))
    flag = flag_issues(given, scores, min_confidence=min_confidence, scored_by=scored_by)
    order = issue_ranks(score, sample_id)
    known = bool(len(clean)) and bool((clean != UNKNOWN).all())
    return LabelIssues(
        sample_id=sample_id[order], given_label=given[order],
        predicted_label=scores.vote[order], confidence=scores.confidence[order],
        mean_start_label=scores.mean_start[order],
        neighbour_agreement=agreement[order].astype(np.float32), knn_vote=knn[order],
        label_score=score[order], is_label_issue=flag[order],
        issue_rank=np.arange(len(order), dtype=np.int64),
        is_corrupted=(clean != given)[order] if known else None)


def summary(issues: LabelIssues, *, samples: int, min_confidence: float,
            val_flag_rate: float | None, scored_by: str = "lra_diffusion",
            fallback: dict | None = None) -> dict:
    """report.json: which scorer ran (and, for the fallback, why), counts, the flag rule,
    the share of clean validation labels the same rule flags (a false-positive rate)
    and, where the train corruptions are known, how well the flag and label_score find
    them, beside two references: the kNN vote as the flag with neighbour_agreement as
    the score, and the vote alone (the scorer's predicted_label)."""
    n = len(issues.sample_id)
    out: dict = {
        "scored_by": scored_by, **({"fallback": fallback} if fallback else {}),
        "train_samples": n, "label_issues": int(issues.is_label_issue.sum()),
        "issue_rate": float(issues.is_label_issue.mean()) if n else None,
        "stochastic_samples": samples, "min_confidence": min_confidence,
        "val_flag_rate": val_flag_rate,
        "mean_confidence": float(issues.confidence.mean()) if n else None,
    }
    if issues.is_corrupted is not None:
        corrupted = issues.is_corrupted
        given = issues.given_label
        out["corrupted"] = int(corrupted.sum())
        out["detection"] = detection_quality(issues.is_label_issue, -issues.label_score,
                                             corrupted)
        out["reference"] = {
            "knn_vote": detection_quality(issues.knn_vote != given,
                                          -issues.neighbour_agreement, corrupted),
            "vote_only": detection_quality(
                issues.predicted_label != given,
                np.where(issues.predicted_label == given, -issues.confidence,
                         issues.confidence), corrupted)}
    return out
