"""`lra report` on the reduced pipeline run: the label issues table (one row per
training sample, ranked, cleanlab's column names), report.json, byte-stable reruns,
chunk independence, the self-contained index.html, and bad input."""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import assert_one_line_error, deep_merge, hashes, invoke, stage_args, write_params

from pipeline.artifacts import read_metadata

REPORT = ("data/report/label_issues.parquet", "data/report/report.json",
          "data/report/index.html")
COLUMNS = ["issue_rank", "sample_id", "image_ref", "given_label", "given_class",
           "predicted_label", "predicted_class", "confidence", "label_score",
           "is_label_issue", "mean_start_label", "neighbour_agreement", "knn_vote",
           "is_corrupted"]


def _col(table, name: str) -> np.ndarray:
    return np.asarray(table.column(name).to_pylist())


def test_label_issues_table(pipeline_run):
    table = pq.read_table(pipeline_run.path("label_issues"))
    assert table.column_names == COLUMNS
    labels = pq.read_table(pipeline_run.path("labels"))  # row = sample_id
    train = np.flatnonzero(_col(labels, "split") == "train")
    t = {name: _col(table, name) for name in COLUMNS}
    sid = t["sample_id"]
    assert len(sid) == len(train) and sorted(sid) == train.tolist()
    assert t["issue_rank"].tolist() == list(range(len(sid)))
    assert (np.diff(t["label_score"]) >= 0).all()
    assert ((t["label_score"] >= 0) & (t["label_score"] <= 1)).all()
    assert np.array_equal(t["given_label"], _col(labels, "observed_label")[sid])
    assert np.array_equal(t["is_corrupted"], _col(labels, "is_corrupted")[sid])
    meta = read_metadata(table.schema)
    names = meta["class_names"]
    assert t["given_class"].tolist() == [names[i] for i in t["given_label"]]
    assert t["predicted_class"].tolist() == [names[i] for i in t["predicted_label"]]
    assert t["image_ref"].tolist() == [f"digits:{i}" for i in sid]
    samples = pipeline_run.params["report"]["samples"]
    assert meta["samples"] == samples
    # confidence is a share of `samples` votes, at least the plurality's 1 / C
    assert np.allclose(t["confidence"] * samples, np.round(t["confidence"] * samples))
    assert (t["confidence"] >= 1 / len(names) - 1e-6).all()
    rule = ((t["predicted_label"] != t["given_label"])
            & (t["mean_start_label"] != t["given_label"]))
    assert np.array_equal(t["is_label_issue"], rule)
    # the kNN vote is evaluate's, the agreement retrieval's
    preds = pq.read_table(pipeline_run.path("predictions"))
    assert np.array_equal(t["knn_vote"], _col(preds, "knn_vote")[sid])
    neigh = pq.read_table(pipeline_run.path("neighbours"))
    agreement = neigh["own_label_agreement"].fill_null(float("nan")).to_numpy()
    assert np.allclose(t["neighbour_agreement"], agreement[sid])


def test_report_json_measures_the_flag(pipeline_run):
    report = json.loads(pipeline_run.path("report_json").read_text())
    table = pq.read_table(pipeline_run.path("label_issues"))
    assert report["train_samples"] == len(table)
    assert report["label_issues"] == int(_col(table, "is_label_issue").sum())
    assert report["corrupted"] == int(_col(table, "is_corrupted").sum())
    assert report["stochastic_samples"] == pipeline_run.params["report"]["samples"]
    for key in ("precision", "recall", "f1", "auroc"):
        assert 0.0 <= report["detection"][key] <= 1.0, key
    assert 0.0 <= report["val_flag_rate"] <= 1.0
    # a 4-epoch model ranks the corruptions above chance (the digits default: 0.9987);
    # pixel-space neighbours alone already find most of them
    assert report["detection"]["auroc"] > 0.5
    assert report["reference"]["knn_vote"]["auroc"] > 0.9


def test_report_rerun_and_chunk_size_give_byte_identical_outputs(run_copy, pipeline_run):
    args = stage_args("report", run_copy.root, run_copy.params_path)
    for chunk in ("37", "4096"):
        for rel in REPORT:
            (run_copy.root / rel).unlink()
        result = invoke([*args, "--chunk-rows", chunk])
        assert result.exit_code == 0, result.stderr
        assert hashes(run_copy.root, REPORT) == hashes(pipeline_run.root, REPORT), chunk


def test_one_stochastic_sample_always_agrees_with_itself(run_copy, tmp_path):
    params = deep_merge(run_copy.params, {"report": {"samples": 1}})
    result = invoke(stage_args("report", run_copy.root,
                               write_params(tmp_path / "p.yaml", params)))
    assert result.exit_code == 0, result.stderr
    one = json.loads(run_copy.path("report_json").read_text())
    assert one["stochastic_samples"] == 1
    assert (_col(pq.read_table(run_copy.path("label_issues")), "confidence") == 1.0).all()


def test_index_html_is_self_contained(pipeline_run):
    html = pipeline_run.path("report_html").read_text()
    assert html.startswith("<!DOCTYPE html>")
    assert not re.search(r"https?://", html), "the page names a host"
    assert "<script" not in html.lower() and "<link" not in html.lower()
    assert not re.search(r"url\(", html)
    srcs = re.findall(r'<img src="([^"]*)"', html)
    items = pipeline_run.params["report"]["gallery_items"]
    k = pipeline_run.params["report"]["gallery_neighbours"]
    assert len(srcs) == items * (1 + k)
    assert all(s.startswith("data:image/png;base64,") for s in srcs)
    for needle in ("LRA-diffusion", "kNN vote", "Validation accuracy", "Training loss",
                   "confusion", "Most suspect training labels", "<svg"):
        assert needle in html, needle


def test_a_model_below_the_linear_probe_hands_scoring_to_the_cross_fitted_probe(run_copy):
    """When evaluate's guard found LRA-diffusion below the noisy linear probe on
    validation, the table's suggestions, scores and flags come from the out-of-fold probe
    with evaluate's chosen L2; mean_start_label stays LRA-diffusion's prediction."""
    from pipeline.crossfit import FOLDS, assign_folds
    from pipeline.linear import fit_linear
    from pipeline.tables import open_embeddings, read_labels

    metrics = json.loads(run_copy.path("metrics").read_text())
    metrics["model"].update(below_baseline=True, baseline="noisy_linear",
                            baseline_val_accuracy=0.99)
    run_copy.path("metrics").write_text(json.dumps(metrics))
    result = invoke(stage_args("report", run_copy.root, run_copy.params_path))
    assert result.exit_code == 0, result.stderr
    assert "scoring the labels with that probe" in result.stderr
    report = json.loads(run_copy.path("report_json").read_text())
    l2 = metrics["linear_l2"]["noisy_linear"]
    assert report["scored_by"] == "noisy_linear"
    assert report["fallback"]["l2"] == l2 and report["fallback"]["folds"] == FOLDS
    assert report["fallback"]["probe_val_accuracy"] == 0.99
    assert report["fallback"]["val_rows"] == int((_col(pq.read_table(run_copy.path("labels")),
                                                       "split") == "val").sum())
    assert report["stochastic_samples"] == 0
    table = pq.read_table(run_copy.path("label_issues"))
    meta = read_metadata(table.schema)
    assert meta["scored_by"] == "noisy_linear" and "out-of-fold" in meta["flag_rule"]
    t = {name: _col(table, name) for name in COLUMNS}
    assert np.array_equal(t["is_label_issue"], t["predicted_label"] != t["given_label"])
    preds = pq.read_table(run_copy.path("predictions"))
    assert np.array_equal(t["mean_start_label"], _col(preds, "predicted")[t["sample_id"]])
    # fold 0's rows are scored by a probe fitted here on the other folds
    emb = open_embeddings(run_copy.path("embeddings"))
    lab = read_labels(run_copy.path("labels"))
    train = emb.rows("train")
    fold = assign_folds(len(train))
    x, y = emb.read_rows(train), lab.observed[train]
    probe = fit_linear(x[fold != 0], y[fold != 0], num_classes=lab.num_classes, l2=l2,
                       iters=run_copy.params["evaluate"]["linear_iters"])
    proba = probe.predict_proba(x[fold == 0])
    where = {sid: i for i, sid in enumerate(t["sample_id"])}
    mine = [where[sid] for sid in train[fold == 0]]
    assert np.allclose(t["label_score"][mine], proba[np.arange(len(proba)), y[fold == 0]],
                       atol=1e-5)
    assert np.array_equal(t["predicted_label"][mine], proba.argmax(1))
    assert (np.diff(t["label_score"]) >= 0).all()
    html = run_copy.path("report_html").read_text()
    assert "cross-fitted over 5 folds" in html and "cross-fitted linear probe flag" in html


def test_a_probe_within_the_noise_leaves_the_scoring_to_the_model(run_copy, pipeline_run):
    """The guard fires at half a point; the report switches only when the probe is
    clearly ahead (pipeline.crossfit.clearly_ahead): here a 0.6-point gap over the
    reduced run's validation rows is not, and the outputs stay the model's."""
    metrics = json.loads(run_copy.path("metrics").read_text())
    lra = metrics["model"]["val_accuracy"]
    metrics["model"].update(below_baseline=True, baseline="noisy_linear",
                            baseline_val_accuracy=lra + 0.006)
    run_copy.path("metrics").write_text(json.dumps(metrics))
    result = invoke(stage_args("report", run_copy.root, run_copy.params_path))
    assert result.exit_code == 0, result.stderr
    assert "stay scored by the model" in result.stderr
    report = json.loads(run_copy.path("report_json").read_text())
    assert report["scored_by"] == "lra_diffusion" and "fallback" not in report
    assert hashes(run_copy.root, REPORT[:1]) == hashes(pipeline_run.root, REPORT[:1])


def test_bad_report_params_are_usage_errors(run_copy, tmp_path):
    for section, needles in (({"samples": 0}, ("report.samples", ">= 1")),
                             ({"min_confidence": 2}, ("report.min_confidence", "[0, 1]")),
                             ({"size": 3}, ("report", "unknown key", "size"))):
        params = write_params(tmp_path / "bad.yaml",
                              deep_merge(run_copy.params, {"report": section}))
        for rel in REPORT:
            (run_copy.root / rel).unlink(missing_ok=True)
        result = invoke(stage_args("report", run_copy.root, params))
        assert result.exit_code == 2, result.output
        assert_one_line_error(result.stderr, "report", *needles)
        assert not any((run_copy.root / rel).exists() for rel in REPORT)


@pytest.mark.parametrize("missing", ["predictions", "model", "neighbours"])
def test_missing_upstream_artifact_is_a_domain_error(run_copy, missing):
    run_copy.path(missing).unlink()
    for rel in REPORT:
        (run_copy.root / rel).unlink()
    result = invoke(stage_args("report", run_copy.root, run_copy.params_path))
    assert result.exit_code == 1, result.output
    assert_one_line_error(result.stderr, "report", "missing")
    assert not any((run_copy.root / rel).exists() for rel in REPORT)


def test_image_refs_and_images_of_a_path_source(tmp_path):
    """Sources that read files: the reference is the path under the image root, and the
    gallery decodes the file (a missing file gives None, not a failed stage)."""
    import pyarrow as pa
    from PIL import Image

    from pipeline.artifacts import write_table
    from pipeline.report_io import image_refs, load_images

    (tmp_path / "imgs" / "cat").mkdir(parents=True)
    Image.new("RGB", (300, 200), (10, 200, 30)).save(tmp_path / "imgs" / "cat" / "a.jpg")
    table = pa.table({"sample_id": pa.array([0, 1], pa.int64()),
                      "image": pa.nulls(2, pa.binary()),
                      "path": pa.array(["cat/a.jpg", "cat/missing.jpg"])})
    path = tmp_path / "samples.parquet"
    write_table(table, path, metadata={"image_root": str(tmp_path / "imgs"),
                                       "source": "imagefolder"})
    assert image_refs(path, np.array([1, 0])) == [str(tmp_path / "imgs" / "cat/missing.jpg"),
                                                  str(tmp_path / "imgs" / "cat/a.jpg")]
    images = load_images(path, [1, 0, 0])
    assert images[0].size == (300, 200) and images[1] is None


def test_the_report_says_when_train_retried_at_another_k():
    from pipeline.report import _retry_note

    assert _retry_note({"k_retry": None}) == "" and _retry_note({}) == ""
    note = _retry_note({"k_retry": {"first_k": 10, "first_val_accuracy": 0.39,
                                    "retry_k": 100, "retry_val_accuracy": 0.604,
                                    "vote_val_accuracy": 0.493, "kept_k": 100}})
    assert "trained at k=10 (validation 0.390)" in note
    assert "k=100 neighbour vote scored 0.493" in note and note.endswith("kept k=100")
    probe = {"first_k": 10, "first_val_accuracy": 0.92, "probe_val_accuracy": 0.948,
             "retry_k": 1, "retry_val_accuracy": 0.951, "kept_k": 1}
    note = _retry_note({"k_retry": None, "probe_retry": probe})
    assert note == ("; trained at k=10 (validation 0.920) and, as the noisy linear probe "
                    "scored 0.948, again at k=1 (0.951): kept k=1")
    both = _retry_note({"k_retry": {"first_k": 10, "first_val_accuracy": 0.39,
                                    "retry_k": 100, "retry_val_accuracy": 0.604,
                                    "vote_val_accuracy": 0.493, "kept_k": 100},
                        "probe_retry": {**probe, "first_k": 100}})
    assert both.count("trained at") == 1 and both.endswith("scored 0.948, again at k=1 "
                                                           "(0.951): kept k=1")
