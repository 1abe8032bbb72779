"""pipeline.issues, pipeline.charts, pipeline.report_page on synthetic data with known
answers: AUROC against scikit-learn, the flag rule, the rank order, escaping and the
self-contained page."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from pipeline.charts import confusion_matrix, line_chart
from pipeline.issues import (RowScores, auroc, detection_quality, find_label_issues,
                             flag_issues, issue_ranks, label_score, summary)
from pipeline.report_page import (GalleryEntry, Neighbour, ReportInputs, image_data_uri,
                                  render)
from pipeline.tables import UNKNOWN


def test_auroc_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    score = rng.integers(0, 5, 200).astype(np.float64)  # many ties
    positive = rng.random(200) < 0.3 + 0.1 * score
    assert auroc(score, positive) == pytest.approx(roc_auc_score(positive, score))
    assert auroc(score, np.zeros(200, bool)) is None


def test_detection_quality_counts():
    flag = np.array([True, True, False, False, True])
    corrupted = np.array([True, False, True, False, True])
    q = detection_quality(flag, flag.astype(float), corrupted)
    assert q["true_positives"] == 2
    assert q["precision"] == pytest.approx(2 / 3) and q["recall"] == pytest.approx(2 / 3)
    assert q["f1"] == pytest.approx(2 / 3)
    none = detection_quality(np.zeros(5, bool), np.zeros(5), corrupted)
    assert none["precision"] is None and none["f1"] is None and none["recall"] == 0.0


def test_label_score_is_increasing_and_in_unit_interval():
    y = np.array([-1e6, -3.0, 0.0, 0.4, 0.5, 1.0, 1.5, 1e6])
    s = label_score(y)
    assert s.dtype == np.float32 and (s >= 0).all() and (s <= 1).all()
    assert (np.diff(s[1:-1]) > 0).all()
    assert s[4] == pytest.approx(0.5) and s[5] > 0.95 and s[2] < 0.05


def test_flag_needs_vote_and_mean_start_to_reject_the_label():
    given = np.array([0, 0, 0, 0])
    scores = RowScores(vote=np.array([1, 1, 0, 1]), confidence=np.array([.9, .9, .9, .3]),
                       mean_start=np.array([1, 0, 1, 1]), given_score=np.zeros(4))
    assert flag_issues(given, scores, min_confidence=0.0).tolist() == [True, False, False, True]
    assert flag_issues(given, scores, min_confidence=0.5).tolist() == [True, False, False, False]
    # the cross-fitted probe's flag: its class alone (mean_start is LRA's, not its own)
    assert flag_issues(given, scores, min_confidence=0.0, scored_by="noisy_linear").tolist() \
        == [True, True, False, True]
    with pytest.raises(ValueError, match="scored_by"):
        flag_issues(given, scores, min_confidence=0.0, scored_by="cleanlab")


def test_probe_scores_are_label_scores_as_they_are():
    given = np.array([0, 1, 2])
    scores = RowScores(vote=np.array([0, 2, 2]), confidence=np.array([.9, .6, .8], np.float32),
                       mean_start=np.array([0, 1, 2]),
                       given_score=np.array([.9, .1, .8], np.float32))
    issues = find_label_issues(sample_id=np.arange(3), given=given, scores=scores,
                               agreement=np.ones(3), knn=given, clean=given,
                               min_confidence=0.0, scored_by="noisy_linear")
    assert issues.sample_id.tolist() == [1, 2, 0]
    assert np.allclose(issues.label_score, [.1, .8, .9])
    assert issues.is_label_issue.tolist() == [True, False, False]


def test_ranks_ascending_score_ties_by_sample_id():
    score = np.array([0.5, 0.1, 0.5, 0.1], dtype=np.float32)
    ids = np.array([10, 11, 3, 2])
    assert issue_ranks(score, ids).tolist() == [3, 1, 2, 0]


def _synthetic(n: int = 300, c: int = 5, rate: float = 0.3, seed: int = 0):
    """Given labels with known corruptions and a model that mostly sees through them."""
    rng = np.random.default_rng(seed)
    clean = rng.integers(0, c, n)
    corrupted = rng.random(n) < rate
    given = np.where(corrupted, (clean + rng.integers(1, c, n)) % c, clean)
    right = rng.random(n) < 0.95
    vote = np.where(right, clean, (clean + 1) % c)
    y_given = np.where(given == clean, 0.9, 0.1) + rng.normal(0, 0.1, n)
    scores = RowScores(vote=vote, confidence=rng.uniform(0.3, 1, n).astype(np.float32),
                       mean_start=vote, given_score=y_given.astype(np.float32))
    return dict(sample_id=np.arange(n) * 2, given=given, scores=scores,
                agreement=rng.random(n).astype(np.float32), knn=clean, clean=clean,
                min_confidence=0.0), corrupted


def test_find_label_issues_ranks_the_corruptions_first():
    kwargs, corrupted = _synthetic()
    issues = find_label_issues(**kwargs)
    assert issues.issue_rank.tolist() == list(range(300))
    assert (np.diff(issues.label_score) >= 0).all()
    assert sorted(issues.sample_id.tolist()) == kwargs["sample_id"].tolist()
    order = issues.sample_id // 2
    assert np.array_equal(issues.is_corrupted, corrupted[order])
    assert np.array_equal(issues.given_label, kwargs["given"][order])
    # the top of the ranking is (almost) all corrupted
    assert issues.is_corrupted[:60].mean() > 0.95
    out = summary(issues, samples=8, min_confidence=0.0, val_flag_rate=0.01)
    assert out["corrupted"] == int(corrupted.sum())
    assert out["detection"]["auroc"] > 0.99
    assert out["detection"]["recall"] > 0.9
    assert set(out["reference"]) == {"knn_vote", "vote_only"}


def test_unknown_clean_labels_give_no_detection_metrics():
    kwargs, _ = _synthetic()
    kwargs["clean"] = np.full(300, UNKNOWN)
    issues = find_label_issues(**kwargs)
    assert issues.is_corrupted is None
    out = summary(issues, samples=8, min_confidence=0.0, val_flag_rate=None)
    assert "detection" not in out and out["label_issues"] == int(issues.is_label_issue.sum())


def test_line_chart_covers_the_data_and_skips_gaps():
    svg = line_chart({"acc": ([1, 2, 3, 4], [None, 0.5, float("nan"), 0.97])},
                     title="t <&>", x_label="epoch", y_label="accuracy")
    assert svg.startswith("<svg") and "t &lt;&amp;&gt;" in svg
    points = re.search(r'points="([^"]+)"', svg).group(1).split()
    assert len(points) == 2  # the None and the NaN are gaps
    ys = [float(p.split(",")[1]) for p in points]
    assert all(42 <= y <= 260 - 44 for y in ys)  # inside the plot frame


def test_confusion_matrix_counts_and_escapes_class_names():
    html = confusion_matrix(np.array([0, 0, 1, 1, 1]), np.array([0, 1, 1, 1, 0]),
                            ["<cat>", "dog & co"])
    assert "&lt;cat&gt;" in html and "dog &amp; co" in html and "<cat>" not in html
    cells = re.findall(r"<td[^>]*>(\d*)</td>", html)
    assert cells == ["1", "1", "1", "2"]


def test_image_data_uri_enlarges_small_and_shrinks_large_images():
    import base64
    import io

    def size(uri: str) -> tuple[int, int]:
        return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).size

    small = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8))
    assert size(image_data_uri(small, 96)) == (96, 96)
    big = Image.new("RGB", (640, 480), (200, 10, 10))
    assert size(image_data_uri(big, 96)) == (96, 72)
    assert image_data_uri(small, 96) == image_data_uri(small, 96)  # byte-stable


def test_page_is_self_contained_and_escaped():
    img = Image.fromarray(np.eye(8, dtype=np.uint8) * 255)
    nasty = '<script>alert("x")</script>'
    entry = GalleryEntry(rank=0, sample_id=3, image_ref="http://example.com/a.png",
                         image=img, given=nasty, suggested="b", confidence=0.75,
                         label_score=0.01, flagged=True, clean="b",
                         neighbours=[Neighbour(4, img, "b", True), Neighbour(5, None, "a", False)])
    page = render(ReportInputs(
        title="LRA-diffusion report", facts={"source": "digits"},
        metrics={"test_accuracy": {"lra_diffusion": 0.9, "knn_vote": 0.8}},
        train_log=[{"epoch": 1.0, "loss": 1.0, "val_accuracy": None},
                   {"epoch": 2.0, "loss": 0.5, "val_accuracy": 0.7}],
        confusion_actual=np.array([0, 1]), confusion_predicted=np.array([0, 0]),
        class_names=[nasty, "b"], noise={"kind": "symmetric"}, retrieval={"k": 10},
        issues={"train_samples": 1}, gallery=[entry]))
    assert "<script" not in page and "&lt;script&gt;" in page
    # the only http text is the escaped image reference, never a src or href
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", page, re.I)
    assert not re.search(r"url\(", page)
    srcs = re.findall(r'<img src="([^"]+)"', page)
    assert len(srcs) == 2 and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "no image" in page
