"""bench/label_issues.py's metric function on a hand-made example (no cleanlab needed), and
bench/relabel_round.py's relabel rule."""

import numpy as np
import pytest

from bench.label_issues import auroc, detection_metrics


def test_detection_metrics_hand_example_with_ties():
    corrupted = np.array([True, False, True, False, True, False])
    flag = np.array([True, True, False, False, True, False])
    score = np.array([0.9, 0.5, 0.5, 0.1, 0.5, 0.5])
    m = detection_metrics(flag, score, corrupted)
    # tp = 2 of 3 flagged, of 3 corrupted
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    assert (m["flagged"], m["true_positives"], m["corrupted"]) == (3, 2, 3)
    # 9 (positive, negative) pairs: 0.9 beats all 3; each 0.5 positive beats 0.1 and ties
    # the two 0.5 negatives (1/2 each): 3 + 2 + 2 = 7
    assert m["auroc"] == pytest.approx(7 / 9)


def test_auroc_extremes_and_missing_class():
    positive = np.array([False, True, False, True])
    assert auroc(np.array([0.0, 1.0, 0.0, 1.0]), positive) == 1.0
    assert auroc(np.array([1.0, 0.0, 1.0, 0.0]), positive) == 0.0
    assert auroc(np.full(4, 0.3), positive) == 0.5          # all tied
    assert auroc(np.arange(4.0), np.zeros(4, dtype=bool)) is None


def test_detection_metrics_empty_flag_and_shape_check():
    m = detection_metrics(np.zeros(3, dtype=bool), np.arange(3.0),
                          np.array([True, False, False]))
    assert m["precision"] is None and m["recall"] == 0.0 and m["f1"] is None
    assert m["auroc"] == 0.0
    with pytest.raises(ValueError, match="same shape"):
        detection_metrics(np.zeros(3, dtype=bool), np.zeros(2), np.zeros(3, dtype=bool))


def test_cell_keys_ignore_only_what_the_cell_does_not_read():
    """bench.accuracy's cells run noise..evaluate: a report-param change keeps them done;
    a train-param change makes them stale. The detection cells run the report too."""
    from bench.accuracy import params_key

    base = {"train": {"epochs": 10}, "report": {"samples": 16}}
    report_changed = {**base, "report": {"samples": 32}}
    train_changed = {**base, "train": {"epochs": 11}}
    assert params_key(report_changed) == params_key(base)
    assert params_key(train_changed) != params_key(base)
    assert params_key(report_changed, ignore=()) != params_key(base, ignore=())


def test_a_param_added_at_its_old_behaviour_keeps_finished_cells_current():
    """train.class_balance arrived after the grid ran: at "none" (the older runs' loss,
    bit for bit) a cell's key is unchanged; at "inverse" the cell is stale."""
    from bench.accuracy import params_key

    old = {"train": {"epochs": 10}, "report": {"samples": 16}}
    assert params_key({**old, "train": {"epochs": 10, "class_balance": "none"}}) == \
        params_key(old)
    assert params_key({**old, "train": {"epochs": 10, "class_balance": "inverse"}}) != \
        params_key(old)
    assert old["train"] == {"epochs": 10}  # the caller's dict is left alone

def test_auto_class_balance_cells_are_keyed_by_the_resolved_loss(monkeypatch):
    """bench.auto_balance: "auto" is replaced by what `lra train` applies, so a cell
    whose candidates are balanced keeps the key of a finished "none" cell (older cells
    carry no class_balance at all) and an imbalanced one the key of an "inverse" cell;
    the imbalance is computed once per noise / retrieve setting and space version."""
    import bench.auto_balance as auto_balance
    from bench.accuracy import params_key

    ratios = {0: 1.5, 1: 2.5}  # by noise seed: what the candidates' imbalance would be
    calls = []

    def fake_imbalance(space_dir, params, *, threads):
        calls.append(params["noise"]["seed"])
        return ratios[params["noise"]["seed"]]

    monkeypatch.setattr(auto_balance, "candidate_imbalance", fake_imbalance)
    cache: dict = {}
    old = {"noise": {"seed": 0}, "train": {"epochs": 10}}
    auto = {**old, "train": {"epochs": 10, "class_balance": "auto"}}
    resolved, ratio = auto_balance.resolve_auto(None, auto, "s", "v1", cache, threads=1)
    assert ratio == 1.5 and resolved["train"]["class_balance"] == "none"
    assert params_key(resolved) == params_key(old)
    assert auto["train"]["class_balance"] == "auto"  # the caller's dict is left alone
    other_epochs = {**auto, "train": {**auto["train"], "epochs": 20}}
    auto_balance.resolve_auto(None, other_epochs, "s", "v1", cache, threads=1)
    assert calls == [0]  # train params do not change the candidates: cached
    auto_balance.resolve_auto(None, auto, "s", "v2", cache, threads=1)
    assert calls == [0, 0]  # a rebuilt space does
    auto_balance.resolve_auto(None, auto, "other", "v1", cache, threads=1)
    assert calls == [0, 0, 0]  # and so does another space at the same version
    skewed = {**auto, "noise": {"seed": 1}}
    resolved, _ = auto_balance.resolve_auto(None, skewed, "s", "v1", cache, threads=1)
    inverse = {**skewed, "train": {"epochs": 10, "class_balance": "inverse"}}
    assert resolved == inverse and params_key(resolved) != params_key({**old, **skewed})
    explicit = {**old, "train": {"epochs": 10, "class_balance": "none"}}
    assert auto_balance.resolve_auto(None, explicit, "s", "v1", cache,
                                     threads=1) == (explicit, None)
    assert calls == [0, 0, 0, 1]


def test_cells_on_an_older_space_version_are_stale_and_left_out_of_the_table():
    """A space rebuilt at a new version (bench/spaces.py) reruns its cells, and the table
    never mixes cells from two versions of one space."""
    from bench.accuracy import is_current, table
    from bench.spaces import space_version

    params = {"train": {"epochs": 10}}
    now = space_version("synth10k")
    done = {"params": params, "space_version": now}
    assert is_current(done, params, now)
    assert not is_current({**done, "space_version": "v0"}, params, now)
    assert not is_current(done, {"train": {"epochs": 11}}, now)
    assert not is_current(None, params, now)

    def cell(version: str, lra: float) -> dict:
        acc = {"lra_diffusion": lra, "knn_vote": 0.5, "noisy_linear": 0.5, "clean_linear": 0.9}
        return {"space": "synth10k", "noise": "sym40", "seed": 0, "space_version": version,
                "params": {"retrieve": {"k": 10}},
                "metrics": {"test_accuracy": acc, "noise": {"observed_rate": 0.4},
                            "model": {"below_baseline": False}, "seconds": 1.0}}

    rows = table({"cells": {"a": cell(now, 0.8), "b": cell("v0", 0.2)}}).splitlines()
    assert len(rows) == 3 and "| 1 | 10 | 80.0 |" in rows[2]


def test_the_table_names_the_k_each_seed_retrieved_with():
    """retrieve.k = auto: the k column lists the k retrieve chose, per seed in seed order;
    one number when every seed used the same k."""
    from bench.accuracy import cell_ks

    def cell(seed: int, chosen: int | None) -> dict:
        metrics = {} if chosen is None else {"retrieval": {"k": chosen}}
        return {"seed": seed, "params": {"retrieve": {"k": "auto" if chosen else 10}},
                "metrics": metrics}

    assert cell_ks([cell(2, 20), cell(0, 100), cell(1, 200)]) == "100/200/20"
    assert cell_ks([cell(0, 50), cell(1, 50)]) == "50"
    assert cell_ks([cell(0, None), cell(1, None)]) == "10"
    retried = cell(1, None)
    retried["metrics"] = {"train": {"k": 50}, "retrieval": {"k": 10}}  # train's retry wins
    assert cell_ks([cell(0, None), retried]) == "10/50"


def test_cells_run_in_parallel_share_the_cpus_out(monkeypatch):
    """Several jobs split the usable CPUs (at least one thread each); one job keeps each
    stage's own default (0); an explicit --threads always wins."""
    from bench import accuracy

    monkeypatch.setattr(accuracy, "usable_cpus", lambda: 8)
    assert accuracy.job_threads(1, 0) == 0
    assert accuracy.job_threads(2, 0) == 4
    assert accuracy.job_threads(16, 0) == 1
    assert accuracy.job_threads(2, 3) == 3


def test_parallel_grid_starts_the_longest_cells_first():
    """The 45k-row cells go first (else the last one runs alone at the end while the
    other CPUs idle); cells of one space keep their order; unknown spaces go last."""
    from bench import accuracy

    names = ["digits64/sym40/0", "synth45k/sym40/0", "rgb3072/sym40/0", "other/x/0",
             "synth45k/pair40/0"]
    assert accuracy.longest_first(names) == [
        "synth45k/sym40/0", "synth45k/pair40/0", "rgb3072/sym40/0", "digits64/sym40/0",
        "other/x/0"]
    assert set(accuracy.CELL_SECONDS) == set(accuracy.ALL_SPACES)


def test_relabel_round_takes_the_suggestion_only_where_flagged(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bench.relabel_round import relabel_table
    from pipeline.tables import read_labels, write_labels

    write_labels(tmp_path / "labels.parquet", sample_id=np.arange(9),
                 split=np.array(["train"] * 8 + ["val"], dtype=object),
                 clean=np.zeros(9, dtype=np.int64),
                 observed=np.array([0, 2, 0, 0, 0, 0, 0, 1, 0]),
                 metadata={"num_classes": 4, "class_names": list("abcd")})
    pq.write_table(pa.table({"sample_id": [4, 1, 7], "given_label": [0, 2, 1],
                             "predicted_label": [3, 3, 3],
                             "is_label_issue": [True, False, True]}),
                   tmp_path / "label_issues.parquet")
    ids, label = relabel_table(tmp_path / "label_issues.parquet",
                               read_labels(tmp_path / "labels.parquet"))
    assert ids.tolist() == list(range(9))
    assert label[[4, 1, 7]].tolist() == [3, 2, 3]
    assert label[[0, 2, 8]].tolist() == [0, 0, 0]  # not in the table / not train: kept


def test_set_overrides_one_params_value_and_refuses_unknown_keys():
    import argparse

    from bench.accuracy import with_override

    parser = argparse.ArgumentParser()
    base = {"train": {"class_balance": "none", "epochs": 10}, "retrieve": {"k": 10}}
    out = with_override(base, "train.class_balance=inverse", parser)
    assert out == {"train": {"class_balance": "inverse", "epochs": 10}, "retrieve": {"k": 10}}
    assert base["train"]["class_balance"] == "none"  # the base is left alone
    assert with_override(base, "retrieve.k=auto", parser)["retrieve"]["k"] == "auto"
    assert with_override(base, "train.epochs=12", parser)["train"]["epochs"] == 12  # YAML int
    for bad in ("train.class_balanc=inverse", "train=1", "nosection.k=1", "train.epochs"):
        with pytest.raises(SystemExit):
            with_override(base, bad, parser)
