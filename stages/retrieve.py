"""`lra retrieve`: index + embeddings + observed labels -> data/retrieval/ neighbours."""

from __future__ import annotations

import logging
from pathlib import Path

import faiss
import numpy as np
from tqdm.auto import tqdm

from pipeline import lineage
from pipeline.artifacts import StageWriter, write_json
from pipeline.errors import ArtifactError, ConfigError
from pipeline.index import (apply_search_params, index_ref, index_spaces,
                            load_index_with_info, read_index_info)
from pipeline.config import Params
from pipeline.retrieval import (candidate_labels, choose_k, choose_space, label_distribution,
                                neighbours_excluding_self, own_label_agreement,
                                vote_hits_by_k)
from pipeline.neighbours import write_retrieval
from pipeline.tables import UNKNOWN, check_same_samples, open_embeddings, read_labels
from stages.app import (EmbeddingsOption, IndexOption, LabelsOption, OutDirOption,
                        ParamsOption, ProgressOption, ThreadsOption, app, set_threads, stage)

log = logging.getLogger(__name__)


@app.command()
def retrieve(params: ParamsOption = Path("params.yaml"),
             index: IndexOption = Path("data/index"),
             embeddings: EmbeddingsOption = Path("data/embeddings/embeddings.parquet"),
             labels: LabelsOption = Path("data/labels/labels.parquet"),
             out_dir: OutDirOption = Path("data/retrieval"), threads: ThreadsOption = 0,
             progress: ProgressOption = True) -> None:
    """Find every sample's k nearest train neighbours (never itself) and their labels.
    They are searched in the indexed space whose neighbour vote is best on the validation
    rows (retrieve.k: auto picks k by that vote too)."""
    with stage("retrieve", params) as p:
        set_threads(threads, libraries=("faiss",))  # no torch here
        emb = open_embeddings(embeddings)
        lab = read_labels(labels)
        check_same_samples(emb.sample_id, lab.sample_id, "embeddings", "labels")
        info = read_index_info(index)
        idx_ref = index_ref(index, info)
        lineage.check_built_from(idx_ref, emb.ref())
        lineage.check_same_origin(emb.ref(), lab.ref(labels))
        built_from = {"index": idx_ref.stamp(), "embeddings": emb.ref().stamp(),
                      "labels": lab.ref(labels).stamp()}
        n_train = int((emb.split == "train").sum())
        if info["vectors"] != n_train:
            # A stale index is a mismatched artifact (exit 1), not a params error.
            raise ArtifactError(f"index at {index} holds {info['vectors']} vectors but the "
                                f"train split has {n_train}; rerun `lra index`")
        spaces = index_spaces(info)
        selection, first_index = _vote_on_validation(index, spaces, emb, lab, p,
                                                  n_train=n_train, required=p.retrieve.auto,
                                                  progress=progress)
        space = selection["space"] if selection else spaces[0]
        if selection and len(spaces) > 1:
            log.info("retrieval space: %s (best validation vote %s)", space, ", ".join(
                f"{name} {max(votes):.3f}" for name, votes in
                selection["vote_by_space"].items()))
        idx = first_index if space == spaces[0] else None  # the vote's last index
        if idx is None:
            idx, _ = load_index_with_info(index, space)
            apply_search_params(idx, p.index.search_params)
        if p.retrieve.auto:
            k = choose_k(tuple(selection["choices"]), selection["validation_vote_accuracy"])
            log.info("retrieve.k auto: k = %d (neighbour vote on %d validation rows: %s)", k,
                     selection["validation_rows"], _votes(selection))
        else:
            k = p.retrieve.k
            if selection is not None:
                log.info("neighbour vote on %d validation rows: %s", selection["validation_rows"],
                         _votes(selection))
        if k >= n_train:
            raise ConfigError(f"retrieve.k: {k} must be smaller than the train split "
                              f"({n_train} samples)")
        # Queries stream by record batch: the index and the (N, k) results are held, the
        # embeddings one chunk at a time.
        n = len(emb.sample_id)
        ids, sims = np.empty((n, k), dtype=np.int64), np.empty((n, k), dtype=np.float32)
        with tqdm(total=n, unit="row", desc="retrieve", disable=not progress,
                  dynamic_ncols=True) as bar:
            for start, chunk in emb.iter_chunks():
                rows = slice(start, start + len(chunk))
                ids[rows], sims[rows] = neighbours_excluding_self(
                    idx, chunk, emb.sample_id[rows], k=k)
                bar.update(len(chunk))
        # Sample ids are 0..N-1 row positions in every table, so ids index arrays directly.
        neighbour_labels = lab.observed[ids]  # (N, k)
        is_train = emb.split == "train"
        candidates = candidate_labels(lab.observed, neighbour_labels)  # (N, k + 1)
        distribution = np.where(is_train[:, None],
                                label_distribution(candidates, lab.num_classes),
                                label_distribution(neighbour_labels, lab.num_classes))
        agreement = own_label_agreement(candidates)
        train = np.flatnonzero(is_train)
        known = train[lab.clean[train] != UNKNOWN]
        summary = {"k": k, "mean_own_label_agreement": float(agreement[train].mean())}
        if selection is not None:  # what auto chose by, and what train's retry reads
            summary["k_selection"] = selection
        if len(known):
            # How often a drawn training target is right, and how often the neighbour
            # majority recovers the clean label: the quality of the retrieved labels.
            summary["candidate_clean_rate"] = float(
                (candidates[known] == lab.clean[known][:, None]).mean())
            summary["majority_clean_accuracy"] = float(
                (distribution[known].argmax(axis=1) == lab.clean[known]).mean())
            summary["observed_clean_accuracy"] = float(
                (lab.observed[known] == lab.clean[known]).mean())
        with StageWriter() as out:
            write_retrieval(out.path(out_dir / "neighbours.parquet"), sample_id=emb.sample_id,
                            split=emb.split, neighbour_ids=ids, distances=1.0 - sims,
                            neighbour_labels=neighbour_labels, candidates=candidates,
                            distribution=distribution, agreement=agreement, is_train=is_train,
                            metadata={"k": k, "space": space,
                                      "k_chosen_on_validation": p.retrieve.auto,
                                      "k_selection": selection,
                                      "num_classes": lab.num_classes,
                                      "distance": f"cosine (1 - cos similarity), {space} space",
                                      lineage.BUILT_FROM: built_from})
            write_json(summary, out.path(out_dir / "retrieval.json"))


def _vote_on_validation(folder: Path, spaces: tuple[str, ...], emb, lab, p: Params, *,
                        n_train: int, required: bool, progress: bool
                        ) -> tuple[dict | None, faiss.Index | None]:
    """In each indexed space, search the validation rows' max(k_choices) neighbours once
    and score the neighbour vote (evaluate's kNN vote) over the first k of them, for each
    k of `k_choices`; the space with the best vote is searched (`choose_space`).
    retrieve.k = auto keeps that space's best k; with an integer k, train retries at it
    when its vote beats the model (`pipeline.retrieval.retry_k`).

    Returns the record for retrieval.json and the table's metadata, or None when there is
    nothing to vote on (no validation rows or no usable choice), which is an error only
    when `required`; and the first listed space's index, still loaded (it is searched
    last because it is the usual choice), or None."""
    cfg = p.retrieve
    choices = tuple(c for c in cfg.candidate_ks if c < n_train)
    val = np.flatnonzero(emb.split == "val")
    if not choices or len(val) == 0:
        if not required:
            return None, None
        if not choices:
            raise ConfigError(f"retrieve.k_choices: every choice in {cfg.k_choices!r} must "
                              f"be smaller than the train split ({n_train} samples)")
        raise ConfigError("retrieve.k: 'auto' chooses k on the validation split, which is "
                          "empty here; set data.val_fraction > 0 or give an integer k")
    queries, truth = emb.read_rows(val), lab.selection_truth(val)  # (V, D), (V,)
    votes = {}
    with tqdm(total=len(val) * len(spaces), unit="row", desc="validation vote",
              disable=not progress, dynamic_ncols=True) as bar:
        for space in reversed(spaces):  # one index in memory at a time
            idx, _ = load_index_with_info(folder, space)
            apply_search_params(idx, p.index.search_params)
            ids, sims = neighbours_excluding_self(idx, queries, emb.sample_id[val],
                                                  k=choices[-1])
            hits = vote_hits_by_k(lab.observed[ids], sims, truth, choices, lab.num_classes)
            votes[space] = [round(float(h) / len(val), 6) for h in hits]
            bar.update(len(val))
    votes = {space: votes[space] for space in spaces}  # back in the listed order
    space = choose_space(spaces, [max(v) for v in votes.values()])
    # No rule text here: retrieval.json is a DVC metrics file, and `dvc exp show` would
    # give a string its own column (the rules are in RetrieveConfig's docstring).
    return ({"validation_rows": len(val), "choices": list(choices), "space": space,
             "validation_vote_accuracy": votes[space], "vote_by_space": votes},
            idx)


def _votes(selection: dict) -> str:
    return ", ".join(f"k={c} {a:.3f}" for c, a in zip(selection["choices"],
                                                     selection["validation_vote_accuracy"]))
