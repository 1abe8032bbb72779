"""Label retrieval (METHOD.md section 2): neighbours in f_p space, self excluded by id,
and the neighbour-label statistics that training draws its targets from."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import faiss
import numpy as np

from pipeline.errors import ArtifactError
from pipeline.index import search

BASELINE_MARGIN = 0.005
"""Validation accuracies closer than this (half a point) count as level at validation-set
sizes: the margin of evaluate's below-baseline guard and of train's retry at another k."""

FALLBACK_K = 1
"""The k train retries at when the noisy linear probe beats its model on validation: the
own label and the nearest neighbour's. Where the k-neighbour vote is mostly wrong (100
classes of 200 train rows each: the k = 10 vote scores 13-28 %), candidates from ten
neighbours teach the model wrong labels; at k = 1 the same cells score above the probe
(bench/README, "100 classes")."""


def neighbours_excluding_self(index: faiss.Index, queries: np.ndarray,
                              query_ids: np.ndarray, *, k: int
                              ) -> tuple[np.ndarray, np.ndarray]:
    """k nearest indexed neighbours of each query, never the query itself.

    queries: (M, D) float32; query_ids: (M,) int64 sample ids (ids that are not in the
    index, e.g. test samples, simply exclude nothing). Searches k + 1 and removes the
    query's own id wherever it ranks (with duplicate images the duplicate may rank
    first, so dropping column 0 would be wrong); when the own id is absent the last
    column is dropped. Returns (ids (M, k) int64, similarities (M, k) float32).
    """
    sims, ids = search(index, queries, k + 1)
    if (ids < 0).any():
        raise ArtifactError(f"the index returned fewer than k+1={k + 1} neighbours for some "
                            "queries; raise index.search_params (nprobe / efSearch) or k is "
                            "too large for the train split")
    is_self = ids == np.asarray(query_ids, dtype=np.int64)[:, None]  # (M, k+1)
    # A stable sort on the mask moves the self column (True) last, keeping rank order.
    order = np.argsort(is_self, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(ids, order, axis=1), np.take_along_axis(sims, order, axis=1)


def candidate_labels(own: np.ndarray, neighbour_labels: np.ndarray) -> np.ndarray:
    """The k + 1 candidates: own observed label first, then the k neighbours'.
    own: (N,) int64; neighbour_labels: (N, k) int64. Returns (N, k + 1) int64."""
    return np.concatenate([own[:, None], neighbour_labels], axis=1)


def label_distribution(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Class frequencies among each row's labels. labels: (N, m) int64 in [0, C).
    Returns (N, C) float32 rows summing to 1."""
    n, m = labels.shape
    counts = np.zeros((n, num_classes), dtype=np.float32)
    np.add.at(counts, (np.repeat(np.arange(n), m), labels.ravel()), 1.0)
    return counts / m


def own_label_agreement(candidates: np.ndarray) -> np.ndarray:
    """Fraction of the k + 1 candidates equal to the sample's own label (column 0).
    candidates: (N, k + 1). Returns (N,) float32; 1 / (k + 1) means no neighbour agrees."""
    return (candidates == candidates[:, :1]).mean(axis=1, dtype=np.float32)


def knn_vote(neighbour_labels: np.ndarray, similarities: np.ndarray, num_classes: int
             ) -> np.ndarray:
    """Majority vote of neighbours' labels; ties go to the class with the larger summed
    similarity. neighbour_labels, similarities: (N, k). Returns (N,) int64."""
    n, k = neighbour_labels.shape
    rows = np.repeat(np.arange(n), k)
    votes = np.zeros((n, num_classes), dtype=np.float64)
    np.add.at(votes, (rows, neighbour_labels.ravel()), 1.0)
    tie_break = np.zeros((n, num_classes), dtype=np.float64)
    np.add.at(tie_break, (rows, neighbour_labels.ravel()), similarities.ravel() + 1.0)
    # Each class's summed (similarity + 1) is at most 2k < 2k + 1, so after the division
    # it is worth less than one vote: it orders ties and nothing else.
    return np.argmax(votes + tie_break / (2.0 * k + 1.0), axis=1).astype(np.int64)


def vote_hits_by_k(neighbour_labels: np.ndarray, similarities: np.ndarray,
                   truth: np.ndarray, ks: tuple[int, ...], num_classes: int) -> np.ndarray:
    """How many rows `knn_vote` over their first k neighbours gets right, for each k.

    neighbour_labels, similarities: (M, K) ranked best first, K >= max(ks); truth: (M,)
    int64. Returns (len(ks),) int64 counts. Rows are independent, so counts from row
    chunks add up to the count over all rows.
    """
    return np.array([int((knn_vote(neighbour_labels[:, :k], similarities[:, :k],
                                   num_classes) == truth).sum()) for k in ks], dtype=np.int64)


def choose_k(ks: tuple[int, ...], hits: np.ndarray) -> int:
    """The k with the most validation hits; ties go to the smallest k (less smoothing,
    and the paper's k = 10 when it is a choice and nothing beats it)."""
    return int(ks[int(np.argmax(hits))])  # argmax returns the first maximum; ks ascend


def choose_space(spaces: tuple[str, ...], best_votes: list[float], *,
                 margin: float = BASELINE_MARGIN) -> str:
    """The retrieval space to search: the one whose best validation vote (over the k
    choices) is highest, unless the first listed space (raw, by default) is within
    `margin` of it: another space must be clearly better to be taken. spaces: in
    `index.spaces` order; best_votes: one accuracy per space."""
    best = int(np.argmax(best_votes))  # the first maximum
    return spaces[0] if best_votes[best] <= best_votes[0] + margin else spaces[best]


def search_rows(index: faiss.Index, chunks: Iterable[tuple[int, np.ndarray]],
                sample_id: np.ndarray, mask: np.ndarray, *, k: int,
                on_rows: Callable[[int], None] = lambda n: None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`neighbours_excluding_self` for the rows where `mask`, streamed by chunk.

    chunks: (first row, (b, D) float32 vectors) covering all N rows in order (e.g. an
    embeddings table's `iter_chunks()`); sample_id: (N,) int64; mask: (N,) bool.
    on_rows(n) is called after each searched chunk (a progress bar's update). Returns
    (positions (M,) int64, ids (M, k) int64, similarities (M, k) float32), M = mask.sum().
    """
    positions = np.flatnonzero(mask)
    ids = np.empty((len(positions), k), dtype=np.int64)
    sims = np.empty((len(positions), k), dtype=np.float32)
    done = 0
    for start, chunk in chunks:
        rows = np.flatnonzero(mask[start:start + len(chunk)])
        if len(rows) == 0:
            continue
        out = slice(done, done + len(rows))
        ids[out], sims[out] = neighbours_excluding_self(index, chunk[rows],
                                                        sample_id[start + rows], k=k)
        done += len(rows)
        on_rows(len(rows))
    return positions, ids, sims


def retry_k(selection: dict | None, *, trained_k: int, val_accuracy: float,
            margin: float = BASELINE_MARGIN) -> int | None:
    """The k to train once more at, or None: the k whose neighbour vote was most accurate
    on validation (`choose_k`), when that vote beats the model trained at `trained_k` by
    more than `margin` there and is another k. A model below a plain vote of its own
    retrieved labels learnt from too few, too noisy neighbours (PMD 70 % on digits: the
    k = 10 model scores 0.39 on validation where the k = 100 vote scores 0.49).

    selection: {"choices": [k, ...] ascending, "validation_vote_accuracy": [a, ...]}
    (retrieve's record; None when it had no validation rows to vote on)."""
    if not selection:
        return None
    choices = tuple(int(c) for c in selection["choices"])
    accuracy = np.asarray(selection["validation_vote_accuracy"], dtype=np.float64)
    k = choose_k(choices, accuracy)
    if k == trained_k or accuracy.max() <= val_accuracy + margin:
        return None
    return k


def falls_back_to_small_k(*, model_val_accuracy: float, probe_val_accuracy: float | None,
                          trained_k: int, margin: float = BASELINE_MARGIN) -> bool:
    """Should train retry at FALLBACK_K? When the noisy linear probe's validation accuracy
    beats the model's by more than `margin` (the gap evaluate's guard warns about) and
    the model was trained at a larger k. probe_val_accuracy: None when not fitted."""
    return (probe_val_accuracy is not None and trained_k > FALLBACK_K
            and probe_val_accuracy > model_val_accuracy + margin)
