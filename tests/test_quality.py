"""Tests that can tell a broken model: a reduced end-to-end run on digits with 40 %
pairflip noise must beat the noisy linear probe and kNN vote by margins that a model at
chance, an evaluation that skips the feature normaliser, a wrong noise schedule or a
wrong sampler all miss (each breakage is simulated below and must be caught); and the
protocol's invariants (validation-only selection, clean val / test labels, test rows
never reaching the model)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import (PipelineRun, invoke, sha256, small_params, stage_args,
                      write_params)
from pipeline.tables import open_embeddings, read_labels, read_prepared, write_embeddings

# Measured on this reduced run (seed 0): LRA-diffusion 0.83 test, noisy linear 0.67,
# kNN vote 0.74. The margins leave room for float differences across machines and
# none for a broken model (each breakage below scores under 0.5).
MARGIN_OVER_NOISY_LINEAR = 0.10
MARGIN_OVER_KNN = 0.03
QUALITY = {"noise": {"kind": "pairflip", "rate": 0.4},
           "train": {"epochs": 40, "batch_size": 32, "feature_dim": 128}}


def quality_problems(metrics: dict) -> list[str]:
    """What is wrong with a run's test accuracies ([] when LRA-diffusion holds up)."""
    acc = metrics["test_accuracy"]
    problems = []
    if acc["lra_diffusion"] < acc["noisy_linear"] + MARGIN_OVER_NOISY_LINEAR:
        problems.append(f"LRA {acc['lra_diffusion']:.3f} does not clear noisy linear "
                        f"{acc['noisy_linear']:.3f} by {MARGIN_OVER_NOISY_LINEAR}")
    if acc["lra_diffusion"] < acc["knn_vote"] + MARGIN_OVER_KNN:
        problems.append(f"LRA {acc['lra_diffusion']:.3f} does not clear kNN vote "
                        f"{acc['knn_vote']:.3f} by {MARGIN_OVER_KNN}")
    return problems


@pytest.fixture(scope="session")
def quality_run(tmp_path_factory) -> PipelineRun:
    root = tmp_path_factory.mktemp("quality_run")
    params = small_params(**QUALITY)
    params_path = write_params(root / "params.yaml", params)
    for stage in ("prepare", "embed", "index", "noise", "retrieve", "train", "evaluate"):
        result = invoke(stage_args(stage, root, params_path))
        assert result.exit_code == 0, (stage, result.stderr, result.exception)
    return PipelineRun(root=root, params_path=params_path, params=params)


def _metrics(run: PipelineRun) -> dict:
    return json.loads(run.path("metrics").read_text())


def _evaluate_again(run: PipelineRun, tmp_path) -> dict:
    """Rerun evaluate on the run's model into tmp_path; return its metrics."""
    args = stage_args("evaluate", run.root, run.params_path)
    args[args.index("--out-dir") + 1] = str(tmp_path / "evaluate")
    result = invoke(args)
    assert result.exit_code == 0, (result.stderr, result.exception)
    return json.loads((tmp_path / "evaluate/metrics.json").read_text())


def test_lra_diffusion_clears_the_baselines(quality_run):
    metrics = _metrics(quality_run)
    assert quality_problems(metrics) == [], metrics["test_accuracy"]
    assert metrics["model"]["below_baseline"] is False


def test_the_default_pipeline_run_learns(pipeline_run):
    """The shared reduced run (40 % symmetric) is far from chance, near kNN vote."""
    acc = _metrics(pipeline_run)["test_accuracy"]
    assert acc["lra_diffusion"] > 0.8, acc
    assert acc["lra_diffusion"] > acc["knn_vote"] - 0.1, acc


def test_evaluation_without_the_normaliser_is_caught(quality_run, tmp_path, monkeypatch):
    from pipeline.features import FeatureNormalizer

    monkeypatch.setattr(FeatureNormalizer, "apply", lambda self, x: np.array(x, copy=True))
    assert quality_problems(_evaluate_again(quality_run, tmp_path))


def test_a_wrong_noise_schedule_is_caught(quality_run, tmp_path, monkeypatch):
    """Training with abar_t = 1 - beta_t (the cumulative product forgotten: the model
    never sees a noisy label). Sampling alone barely depends on the schedule (the first
    DDIM step from y_T = 0 already points at the class), so the breakage is in train."""
    import shutil

    from pipeline import training

    monkeypatch.setattr(training, "alphas_cumprod", lambda betas: 1.0 - betas)
    shutil.copytree(quality_run.root, tmp_path / "run")
    run = PipelineRun(root=tmp_path / "run", params_path=tmp_path / "run/params.yaml",
                      params=quality_run.params)
    for stage in ("train", "evaluate"):
        result = invoke(stage_args(stage, run.root, run.params_path))
        assert result.exit_code == 0, (stage, result.stderr)
    assert quality_problems(_metrics(run))


def test_a_wrong_sampler_is_caught(quality_run, tmp_path, monkeypatch):
    """DDIM visiting the timesteps in the wrong order (from t = 1 up to 901)."""
    from pipeline import inference

    real = inference.ddim_timesteps
    monkeypatch.setattr(inference, "ddim_timesteps", lambda t, s: real(t, s)[::-1].copy())
    assert quality_problems(_evaluate_again(quality_run, tmp_path))


def test_a_model_at_chance_is_caught(quality_run):
    metrics = _metrics(quality_run)
    metrics["test_accuracy"]["lra_diffusion"] = 0.1
    assert len(quality_problems(metrics)) == 2


def test_evaluate_validation_accuracy_equals_train_selection(quality_run, pipeline_run):
    for run in (quality_run, pipeline_run):
        train = json.loads(run.path("train_json").read_text())
        metrics = _metrics(run)
        assert metrics["val_accuracy"]["lra_diffusion"] == pytest.approx(
            train["best_val_accuracy"], abs=1e-6)
        assert metrics["model"]["val_accuracy"] == pytest.approx(
            train["best_val_accuracy"], abs=1e-6)


def test_noise_leaves_val_and_test_labels_untouched(pipeline_run, quality_run):
    for run in (pipeline_run, quality_run):
        prepared = read_prepared(run.path("samples")).table
        lab = read_labels(run.path("labels"))
        split = np.asarray(prepared.column("split").to_pylist())
        truth = prepared.column("label").to_numpy()
        assert np.array_equal(lab.clean, truth)
        held_out = split != "train"
        assert held_out.sum() > 0
        assert np.array_equal(lab.observed[held_out], truth[held_out])
        train = split == "train"
        changed = int((lab.observed[train] != truth[train]).sum())
        if run.params["noise"]["kind"] == "symmetric":  # exact: round(rate * N) changed
            assert changed == round(0.4 * train.sum()) == 432
        else:  # pairflip rounds per class
            assert abs(changed - 0.4 * train.sum()) <= 10
        noise = json.loads(run.path("noise_json").read_text())
        assert noise["corrupted"] == changed
        assert noise["observed_rate"] == pytest.approx(changed / train.sum(), abs=1e-6)


def _checkpoint_without_lineage(path) -> bytes:
    """model.pt's payload minus its lineage stamp (`info.built_from`: the fingerprints of
    the whole input tables, which change with any row by design), serialised again."""
    import io

    import torch

    from pipeline.lineage import BUILT_FROM

    payload = torch.load(path, weights_only=True)
    payload["info"] = {k: v for k, v in payload["info"].items() if k != BUILT_FROM}
    payload.pop("digest", None)
    buf = io.BytesIO()
    torch.save(payload, buf)
    return buf.getvalue()


def test_changing_test_rows_leaves_the_model_identical(run_copy, tmp_path):
    """Train never reads test rows: replace every test embedding with noise and rerun
    index, retrieve and train. The checkpoint (weights, normaliser, guidance basis,
    spec, selection) is byte-identical once its lineage stamp, which fingerprints the
    whole input tables, is set aside."""
    before = _checkpoint_without_lineage(run_copy.path("model"))
    emb = open_embeddings(run_copy.path("embeddings"))
    vectors = emb.read_rows()
    test = emb.rows("test")
    vectors[test] = np.random.default_rng(0).random((len(test), emb.dim), dtype=np.float32)
    meta = {k: v for k, v in emb.meta.items() if k not in ("dim", "fingerprint")}
    write_embeddings(run_copy.path("embeddings"), sample_id=emb.sample_id, split=emb.split,
                     vectors=vectors, provenance=meta)
    for stage in ("index", "retrieve", "train"):
        result = invoke(stage_args(stage, run_copy.root, run_copy.params_path))
        assert result.exit_code == 0, (stage, result.stderr)
    assert _checkpoint_without_lineage(run_copy.path("model")) == before


def test_below_baseline_guard_warns_and_records(run_copy, tmp_path):
    """A model trained for one epoch is far below kNN vote: evaluate says so in one
    warning line and in metrics.json."""
    params = small_params(train={"epochs": 2, "eval_every": 1, "warmup_epochs": 1})
    write_params(run_copy.params_path, params)
    assert invoke(stage_args("train", run_copy.root, run_copy.params_path)).exit_code == 0
    result = invoke(stage_args("evaluate", run_copy.root, run_copy.params_path))
    assert result.exit_code == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "is below" in line]
    assert len(warnings) == 1, result.stderr
    metrics = _metrics(run_copy)
    model = metrics["model"]
    assert model["below_baseline"] is True
    assert model["baseline"] in ("knn_vote", "noisy_linear")
    lra = metrics["val_accuracy"]["lra_diffusion"]
    assert f"{lra:.4f}" in warnings[0]
    assert f"{model['baseline_val_accuracy']:.4f}" in warnings[0]


def test_below_baseline_rule():
    from stages.evaluate import below_baseline

    assert below_baseline({"lra_diffusion": 0.90, "knn_vote": 0.904,
                           "noisy_linear": 0.8})["below_baseline"] is False
    out = below_baseline({"lra_diffusion": 0.90, "knn_vote": 0.91, "noisy_linear": 0.95})
    assert out == {"below_baseline": True, "baseline": "noisy_linear",
                   "baseline_val_accuracy": 0.95}
    assert below_baseline({"lra_diffusion": None})["below_baseline"] is False

