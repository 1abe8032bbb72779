"""The `lra` CLI: every stage command on real artifacts of a reduced pipeline run.

Bad input gives one line on stderr, never a traceback, and the documented exit code:
2 for usage errors (bad option, failed validator, bad params value), 1 for domain errors
(missing, mismatched or corrupt upstream artifact). A failing stage writes nothing.
"""

from __future__ import annotations

import json
import re
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import (
    ARTIFACTS,
    REPO,
    STAGES,
    VENV_BIN,
    assert_one_line_error,
    deep_merge,
    hashes,
    invoke,
    run,
    sha256,
    stage_args,
    temp_leftovers,
    write_params,
)

from pipeline.config import ENCODERS, NOISE_KINDS, SOURCES
from pipeline.retrieval import BASELINE_MARGIN

STAGE_OUTS = {
    "prepare": ("samples", "rejects", "summary"),
    "embed": ("embeddings",),
    "index": ("index_raw", "index_center", "index_standardize", "index_json"),
    "noise": ("labels", "noise_json"),
    "retrieve": ("neighbours", "retrieval_json"),
    "train": ("model", "train_json", "train_log"),
    "evaluate": ("predictions", "metrics", "confusion"),
    "report": ("label_issues", "report_json", "report_html"),
}


def clear_outputs(run_, stage: str) -> None:
    for name in STAGE_OUTS[stage]:
        run_.path(name).unlink(missing_ok=True)


def assert_nothing_written(run_, stage: str) -> None:
    for name in STAGE_OUTS[stage]:
        assert not run_.path(name).exists(), f"{stage} wrote {ARTIFACTS[name]}"
        assert temp_leftovers(run_.path(name).parent) == []


def bad_params(run_, tmp_path, **sections):
    """A params file: the run's params with `sections` merged in."""
    return write_params(tmp_path / "bad_params.yaml", deep_merge(run_.params, sections))


def n_train(run_) -> int:
    return json.loads(run_.path("summary").read_text())["splits"]["train"]


def rewrite_embeddings(run_, vectors: np.ndarray) -> None:
    """Replace the run's embeddings (same samples and splits) with `vectors` (N, D')."""
    from pipeline.tables import read_embeddings, write_embeddings

    emb = read_embeddings(run_.path("embeddings"))
    write_embeddings(run_.path("embeddings"), sample_id=emb.sample_id, split=emb.split,
                     vectors=vectors.astype(np.float32),
                     provenance={k: v for k, v in emb.meta.items() if k != "dim"})


def rewrite_embeddings_random(run_, dim: int, seed: int) -> None:
    """Replace the run's embeddings with random (N, dim) vectors."""
    from pipeline.tables import open_embeddings

    n = len(open_embeddings(run_.path("embeddings")).sample_id)
    rewrite_embeddings(run_, np.random.default_rng(seed).normal(size=(n, dim)))


def rewrite_observed_labels(run_, observed: np.ndarray) -> None:
    from pipeline.artifacts import read_metadata
    from pipeline.tables import UNKNOWN, write_labels

    path = run_.path("labels")
    table = pq.read_table(path)
    write_labels(path, sample_id=table["sample_id"].to_numpy(),
                 split=np.asarray(table["split"].to_pylist(), dtype=object),
                 clean=table["clean_label"].fill_null(UNKNOWN).to_numpy(), observed=observed,
                 metadata=read_metadata(table.schema))


def observed_labels(run_) -> np.ndarray:
    return pq.read_table(run_.path("labels"))["observed_label"].to_numpy().copy()


# --------------------------------------------------------------------------- the app
def test_help_lists_every_stage_command():
    result = invoke(["--help"])
    assert result.exit_code == 0, result.output
    for name in STAGES:
        assert re.search(rf"^\W*{name}\s{{2,}}\S", result.stdout, re.M), (name, result.stdout)


@pytest.mark.parametrize("stage", STAGES)
def test_stage_help_documents_params_option(stage):
    result = invoke([stage, "--help"])
    assert result.exit_code == 0, result.output
    assert "--params" in result.stdout


def test_python_m_stages_help():
    proc = run([sys.executable, "-m", "stages", "--help"], REPO)
    for name in STAGES:
        assert re.search(rf"^\W*{name}\s{{2,}}\S", proc.stdout, re.M), (name, proc.stdout)
    assert "Traceback" not in proc.stderr


def test_console_script_domain_error_is_one_line(tmp_path, pipeline_run):
    """The installed `lra` script, as DVC runs it: exit 1, one stderr line, no output."""
    missing = tmp_path / "missing.parquet"
    proc = run([str(VENV_BIN / "lra"), "index", "--params", str(pipeline_run.params_path),
                "--embeddings", str(missing), "--out-dir", str(tmp_path / "out")],
               tmp_path, check=False)
    assert proc.returncode == 1, proc.stderr
    assert_one_line_error(proc.stderr, "index", "missing embeddings", str(missing))
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- a good run
def test_pipeline_run_publishes_every_artifact_and_no_temporaries(pipeline_run):
    for name in ARTIFACTS:
        assert pipeline_run.path(name).is_file(), ARTIFACTS[name]
    assert temp_leftovers(pipeline_run.root / "data") == []
    metrics = json.loads(pipeline_run.path("metrics").read_text())
    assert set(metrics["test_accuracy"]) >= {"lra_diffusion", "knn_vote", "noisy_linear",
                                              "clean_linear"}
    for value in metrics["test_accuracy"].values():
        assert 0.0 <= value <= 1.0
    # 40 % symmetric noise on the train split, measured against the clean labels.
    assert metrics["noise"]["observed_rate"] == pytest.approx(0.4, abs=0.03)
    # Pixel-space neighbours recover most clean digit labels despite the noise.
    assert metrics["test_accuracy"]["knn_vote"] > 0.8
    schema = pq.read_schema(pipeline_run.path("embeddings"))
    assert schema.field("embedding").type == pa.list_(pa.float32(), 64)
    index_info = json.loads(pipeline_run.path("index_json").read_text())
    assert index_info["dim"] == 64 and index_info["vectors"] == n_train(pipeline_run)


def test_rerun_writes_byte_identical_outputs(run_copy, pipeline_run):
    """Deterministic stages: rerunning with unchanged inputs reproduces every byte."""
    names = [n for s in ("noise", "retrieve", "train") for n in STAGE_OUTS[s]]
    for stage in ("noise", "retrieve", "train"):
        clear_outputs(run_copy, stage)
        result = invoke(stage_args(stage, run_copy.root, run_copy.params_path))
        assert result.exit_code == 0, (stage, result.stderr)
    assert hashes(run_copy.root, [ARTIFACTS[n] for n in names]) == \
        hashes(pipeline_run.root, [ARTIFACTS[n] for n in names])


def test_evaluate_streams_the_same_result_whatever_the_chunk_size(run_copy, tmp_path):
    """Evaluation scores the embeddings chunk by chunk: predictions (scores, votes and
    their stochastic confidence) and metrics are byte-identical for any --chunk-rows."""
    params = deep_merge(run_copy.params, {"evaluate": {"stochastic_samples": 4}})
    params_path = write_params(tmp_path / "params.yaml", params)
    outputs = []
    for chunk in ("16384", "37"):
        out_dir = tmp_path / f"eval-{chunk}"
        args = stage_args("evaluate", run_copy.root, params_path)
        args[args.index("--out-dir") + 1] = str(out_dir)
        result = invoke([*args, "--chunk-rows", chunk])
        assert result.exit_code == 0, result.stderr
        outputs.append(out_dir)
    for name in ("predictions.parquet", "metrics.json", "confusion.csv"):
        assert sha256(outputs[0] / name) == sha256(outputs[1] / name), name
    table = pq.read_table(outputs[1] / "predictions.parquet")
    assert table.num_rows == len(pq.read_table(run_copy.path("embeddings"))) > 37
    conf = table.column("confidence").to_numpy()
    assert ((conf >= 0.25) & (conf <= 1.0)).all()
    assert pq.ParquetFile(outputs[1] / "predictions.parquet").metadata.num_row_groups == 1


def test_evaluate_fits_linear_probes_on_at_most_linear_max_rows(run_copy, pipeline_run,
                                                                tmp_path):
    """The probes see a fixed subset of linear_max_rows train rows; the diffusion model's
    and kNN's results do not depend on it."""
    params = deep_merge(run_copy.params, {"evaluate": {"linear_max_rows": 40}})
    params_path = write_params(tmp_path / "params.yaml", params)
    result = invoke(stage_args("evaluate", run_copy.root, params_path))
    assert result.exit_code == 0, result.stderr
    small = json.loads(run_copy.path("metrics").read_text())["test_accuracy"]
    full = json.loads(pipeline_run.path("metrics").read_text())["test_accuracy"]
    assert small["lra_diffusion"] == full["lra_diffusion"]
    assert small["knn_vote"] == full["knn_vote"]
    # 40 rows (4 per class) make a weaker clean probe than the whole train split.
    assert small["clean_linear"] < full["clean_linear"] - 0.02


# --------------------------------------------------------------------------- usage errors
def test_unknown_option_is_a_usage_error(tmp_path):
    result = invoke(["prepare", "--bogus", "--out-dir", tmp_path / "out"])
    assert result.exit_code == 2
    assert "No such option" in result.stderr and "--bogus" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_unknown_command_is_a_usage_error():
    result = invoke(["bogus"])
    assert result.exit_code == 2
    assert "No such command" in result.stderr


@pytest.mark.parametrize("stage, option", [
    ("embed", ["--batch-size", "0"]),
    ("embed", ["--workers", "-1"]),
    ("index", ["--threads", "-1"]),
    ("evaluate", ["--chunk-rows", "0"]),
    ("train", ["--threads", "many"]),
])
def test_failed_option_validator_is_a_usage_error(run_copy, stage, option):
    clear_outputs(run_copy, stage)
    result = invoke([*stage_args(stage, run_copy.root, run_copy.params_path), *option])
    assert result.exit_code == 2, result.output
    assert option[0] in result.stderr
    assert "Traceback" not in result.stderr
    assert_nothing_written(run_copy, stage)


@pytest.mark.parametrize("value, exit_code", [("0", 1), ("false", 1), ("bogus", 2)])
def test_progress_env_var_is_read_as_a_bool(tmp_path, pipeline_run, value, exit_code):
    """LRA_PROGRESS=0 (as conftest sets it) is a valid off; junk is a usage error. The
    valid values get as far as the missing input (exit 1)."""
    result = invoke(["embed", "--params", pipeline_run.params_path,
                     "--prepared", tmp_path / "missing.parquet", "--out-dir", tmp_path / "e"],
                    env={"LRA_PROGRESS": value})
    assert result.exit_code == exit_code, result.output
    if exit_code == 2:
        assert "LRA_PROGRESS" in result.stderr
    assert not (tmp_path / "e").exists()


def test_unknown_device_is_a_usage_error(run_copy):
    clear_outputs(run_copy, "train")
    result = invoke([*stage_args("train", run_copy.root, run_copy.params_path),
                     "--device", "tpu"])
    assert result.exit_code == 2
    assert_one_line_error(result.stderr, "train", "'tpu'", "auto", "cpu", "cuda")
    assert_nothing_written(run_copy, "train")


def test_cuda_device_without_cuda_is_a_usage_error(run_copy):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    clear_outputs(run_copy, "evaluate")
    result = invoke([*stage_args("evaluate", run_copy.root, run_copy.params_path),
                     "--device", "cuda"])
    assert result.exit_code == 2
    assert_one_line_error(result.stderr, "evaluate", "CUDA is not available")
    assert_nothing_written(run_copy, "evaluate")


@pytest.mark.parametrize("stage, sections, needles", [
    ("prepare", {"data": {"source": "mnist"}}, ("data.source", "'mnist'", *SOURCES)),
    ("embed", {"embed": {"encoder": "resnet"}}, ("embed.encoder", "'resnet'", *ENCODERS)),
    ("noise", {"noise": {"kind": "gaussian"}}, ("noise.kind", "'gaussian'", *NOISE_KINDS)),
    ("noise", {"noise": {"rate": 1.0}}, ("noise.rate", "1.0", "[0, 1)")),
    ("noise", {"noise": {"rate": -0.1}}, ("noise.rate", "-0.1", "[0, 1)")),
    ("retrieve", {"retrieve": {"k": 0}}, ("retrieve.k", "0", ">= 1")),
    ("train", {"train": {"epochs": "four"}}, ("train.epochs", "'four'", "int")),
    ("train", {"train": {"bogus": 1}}, ("train", "unknown key", "bogus", "epochs")),
    ("evaluate", {"extra": {"x": 1}}, ("unknown section", "extra", "evaluate")),
    ("index", {"index": {"factory": "NotAnIndex"}}, ("index.factory", "'NotAnIndex'")),
], ids=["source", "encoder", "noise-kind", "rate-1", "rate-negative", "k-0", "type",
        "unknown-key", "unknown-section", "faiss-factory"])
def test_bad_params_value_is_a_usage_error(run_copy, tmp_path, stage, sections, needles):
    """Inputs are valid, so a missed check would run the stage and write its outputs."""
    params = bad_params(run_copy, tmp_path, **sections)
    clear_outputs(run_copy, stage)
    result = invoke(stage_args(stage, run_copy.root, params))
    assert result.exit_code == 2, result.output
    assert_one_line_error(result.stderr, stage, *needles)
    assert_nothing_written(run_copy, stage)


def test_missing_or_invalid_params_file_is_a_usage_error(run_copy, tmp_path):
    clear_outputs(run_copy, "prepare")
    result = invoke(stage_args("prepare", run_copy.root, tmp_path / "nope.yaml"))
    assert result.exit_code == 2
    assert_one_line_error(result.stderr, "prepare", "params file not found", "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("data: [unclosed\n")
    result = invoke(stage_args("prepare", run_copy.root, broken))
    assert result.exit_code == 2
    assert_one_line_error(result.stderr, "prepare", "not valid YAML")
    assert_nothing_written(run_copy, "prepare")


def test_k_not_below_train_split_size_is_a_usage_error(run_copy, tmp_path):
    """retrieve.k >= train-split size: the data are fine, the params value is not (fixed
    by editing params.yaml), so it is a usage error, exit 2, like k < 1."""
    n = n_train(run_copy)
    params = bad_params(run_copy, tmp_path, retrieve={"k": n})
    clear_outputs(run_copy, "retrieve")
    result = invoke(stage_args("retrieve", run_copy.root, params))
    assert result.exit_code == 2
    assert_one_line_error(result.stderr, "retrieve", "retrieve.k", str(n))
    assert_nothing_written(run_copy, "retrieve")


def test_retrieve_k_auto_keeps_the_best_validation_vote(run_copy, tmp_path):
    """retrieve.k = auto: the stage searches the space, then the k, whose neighbour vote
    is most accurate on the validation rows (recomputed here from each space's index and
    the labels), and says so in retrieval.json and the table's metadata."""
    from pipeline.index import index_file, load_index, search
    from pipeline.neighbours import read_retrieval
    from pipeline.retrieval import choose_space, knn_vote
    from pipeline.tables import read_embeddings, read_labels

    choices, spaces = (3, 10, 30), ("raw", "center", "standardize")
    params = bad_params(run_copy, tmp_path, retrieve={"k": "auto", "k_choices": "30,3,10"})
    result = invoke(stage_args("retrieve", run_copy.root, params))
    assert result.exit_code == 0, result.stderr
    assert "retrieve.k auto: k = " in result.stderr
    emb, lab = read_embeddings(run_copy.path("embeddings")), read_labels(run_copy.path("labels"))
    val = np.flatnonzero(emb.split == "val")
    accuracy, neighbours = {}, {}
    for space in spaces:
        sims, ids = search(load_index(index_file(run_copy.path("index"), space)),
                           emb.vectors[val], 30)
        neighbours[space] = ids
        accuracy[space] = [float((knn_vote(lab.observed[ids[:, :k]], sims[:, :k],
                                           lab.num_classes) == lab.observed[val]).mean())
                           for k in choices]
    assert len({tuple(a) for a in accuracy.values()}) > 1  # the spaces really differ
    space = choose_space(spaces, [max(a) for a in accuracy.values()])
    best = choices[int(np.argmax(accuracy[space]))]
    summary = json.loads(run_copy.path("retrieval_json").read_text())
    assert summary["k"] == best
    selection = summary["k_selection"]
    assert selection["choices"] == list(choices) and selection["space"] == space
    assert selection["validation_rows"] == len(val)
    for name in spaces:
        assert selection["vote_by_space"][name] == pytest.approx(accuracy[name], abs=1e-6)
    assert selection["validation_vote_accuracy"] == selection["vote_by_space"][space]
    table = read_retrieval(run_copy.path("neighbours"))
    assert table.k == best and table.meta["k_chosen_on_validation"] is True
    assert table.meta["space"] == space
    assert table.candidates.shape[1] == best + 1
    # The main pass searched the chosen space's index (not the vote's last one).
    np.testing.assert_array_equal(table.neighbour_ids[val], neighbours[space][:, :best])


def test_index_spaces_keep_their_order_and_the_first_wins_a_tie(run_copy, tmp_path):
    """index.json lists the spaces in index.spaces order (a JSON object would be sorted),
    a dropped space's file goes, and retrieve prefers the first listed space: with the
    same space listed first and alone, it searches that space."""
    params = bad_params(run_copy, tmp_path, index={"spaces": "standardize,raw"})
    for stage_name in ("index", "retrieve"):
        result = invoke(stage_args(stage_name, run_copy.root, params))
        assert result.exit_code == 0, result.stderr
    info = json.loads(run_copy.path("index_json").read_text())
    assert [entry["space"] for entry in info["spaces"]] == ["standardize", "raw"]
    assert not run_copy.path("index_center").exists()
    selection = json.loads(run_copy.path("retrieval_json").read_text())["k_selection"]
    votes = {name: max(v) for name, v in selection["vote_by_space"].items()}
    assert selection["space"] == ("raw" if votes["raw"] > votes["standardize"]
                                  + BASELINE_MARGIN else "standardize")
    params = bad_params(run_copy, tmp_path, index={"spaces": "raw"})
    for stage_name in ("index", "retrieve"):
        result = invoke(stage_args(stage_name, run_copy.root, params))
        assert result.exit_code == 0, result.stderr
    selection = json.loads(run_copy.path("retrieval_json").read_text())["k_selection"]
    assert selection["space"] == "raw" and list(selection["vote_by_space"]) == ["raw"]
    assert not run_copy.path("index_standardize").exists()


def test_train_retries_at_the_k_whose_vote_beats_the_model(run_copy, tmp_path, monkeypatch):
    """A model below the best validation neighbour vote of retrieve.k_choices is trained
    once more at that vote's k and the better run is kept; the retry is exactly a plain
    run at that k (same candidates, same seed), and every record names both runs."""
    import torch

    from pipeline.retrieval import BASELINE_MARGIN, choose_k

    import stages.train

    weak = {"epochs": 2, "eval_every": 1, "warmup_epochs": 1}  # far below a k = 10 vote
    # The retry at k = 1 when the probe is ahead (tested below) would follow: kept off.
    monkeypatch.setattr(stages.train, "falls_back_to_small_k", lambda **_: False)
    params = bad_params(run_copy, tmp_path, retrieve={"k": 3, "k_choices": "3,10,30"},
                        train=weak)
    for stage_name in ("retrieve", "train"):
        result = invoke(stage_args(stage_name, run_copy.root, params))
        assert result.exit_code == 0, result.stderr
    vote = json.loads(run_copy.path("retrieval_json").read_text())["k_selection"]
    best_k = choose_k(tuple(vote["choices"]), vote["validation_vote_accuracy"])
    assert best_k != 3
    assert f"training again at k={best_k}" in result.stderr
    info = json.loads(run_copy.path("train_json").read_text())
    assert "probe_retry" not in info
    retry = info["k_retry"]
    assert retry["first_k"] == 3 and retry["retry_k"] == best_k
    assert retry["vote_val_accuracy"] == max(vote["validation_vote_accuracy"])
    assert retry["vote_val_accuracy"] > retry["first_val_accuracy"] + BASELINE_MARGIN
    kept = max((retry["first_val_accuracy"], 3), (retry["retry_val_accuracy"], best_k),
               key=lambda pair: pair[0])  # ties keep the first run
    assert info["best_val_accuracy"] == kept[0]
    assert info["k"] == retry["kept_k"] == kept[1]
    ckpt = torch.load(run_copy.path("model"), map_location="cpu", weights_only=False)
    assert ckpt["info"]["k"] == kept[1]
    assert ckpt["info"]["k_retry"] == pytest.approx(retry, abs=1e-6)  # json rounds
    result = invoke(stage_args("evaluate", run_copy.root, params))
    assert result.exit_code == 0, result.stderr
    assert json.loads(run_copy.path("metrics").read_text())["model"]["k"] == kept[1]

    plain = bad_params(run_copy, tmp_path / "plain", train=weak,
                       retrieve={"k": best_k, "k_choices": str(best_k)})
    for stage_name in ("retrieve", "train"):
        result = invoke(stage_args(stage_name, run_copy.root, plain))
        assert result.exit_code == 0, result.stderr
    info = json.loads(run_copy.path("train_json").read_text())
    assert "k_retry" not in info and info["k"] == best_k  # its only choice: no retry
    assert info["best_val_accuracy"] == retry["retry_val_accuracy"]


def test_train_retries_at_k_1_when_the_noisy_linear_probe_beats_the_model(run_copy, tmp_path):
    """A model below the noisy linear probe on validation (the probe evaluate scores) is
    trained once more on the own label and the nearest neighbour's, and the better run is
    kept; the retry is exactly a plain run at k = 1, which never retries itself."""
    import torch

    from pipeline.neighbours import read_retrieval

    weak = {"epochs": 2, "eval_every": 1, "warmup_epochs": 1}  # far below the probe
    one_space = {"spaces": "raw"}  # both runs below search the same space
    params = bad_params(run_copy, tmp_path, retrieve={"k": 3, "k_choices": "3"}, train=weak,
                        index=one_space)
    for stage_name in ("index", "retrieve", "train", "evaluate"):
        result = invoke(stage_args(stage_name, run_copy.root, params))
        assert result.exit_code == 0, result.stderr
        if stage_name == "train":
            assert "training again at k=1" in result.stderr
    info = json.loads(run_copy.path("train_json").read_text())
    assert "k_retry" not in info  # k = 3 is the only vote: no retry at another vote's k
    retry = info["probe_retry"]
    assert retry["first_k"] == 3 and retry["retry_k"] == 1
    val_accuracy = json.loads(run_copy.path("metrics").read_text())["val_accuracy"]
    assert retry["probe_val_accuracy"] == pytest.approx(val_accuracy["noisy_linear"], abs=1e-6)
    assert retry["probe_val_accuracy"] > retry["first_val_accuracy"] + BASELINE_MARGIN
    kept = max((retry["first_val_accuracy"], 3), (retry["retry_val_accuracy"], 1),
               key=lambda pair: pair[0])  # ties keep the first run
    assert info["best_val_accuracy"] == kept[0] and info["k"] == retry["kept_k"] == kept[1]
    ckpt = torch.load(run_copy.path("model"), map_location="cpu", weights_only=False)
    assert ckpt["info"]["probe_retry"] == pytest.approx(retry, abs=1e-6)  # json rounds
    assert json.loads(run_copy.path("metrics").read_text())["model"]["k"] == kept[1]
    first_neighbour = read_retrieval(run_copy.path("neighbours")).neighbour_ids[:, :1]

    plain = bad_params(run_copy, tmp_path / "plain", train=weak, index=one_space,
                       retrieve={"k": 1, "k_choices": "1"})
    for stage_name in ("retrieve", "train"):
        result = invoke(stage_args(stage_name, run_copy.root, plain))
        assert result.exit_code == 0, result.stderr
    np.testing.assert_array_equal(read_retrieval(run_copy.path("neighbours")).neighbour_ids,
                                  first_neighbour)  # the same nearest neighbours
    info = json.loads(run_copy.path("train_json").read_text())
    assert "probe_retry" not in info and info["k"] == 1  # k = 1 is the smallest: no retry
    assert info["best_val_accuracy"] == retry["retry_val_accuracy"]


def test_retrieve_k_auto_without_a_usable_choice_is_a_usage_error(run_copy, tmp_path):
    n = n_train(run_copy)
    params = bad_params(run_copy, tmp_path, retrieve={"k": "auto", "k_choices": str(n)})
    clear_outputs(run_copy, "retrieve")
    result = invoke(stage_args("retrieve", run_copy.root, params))
    assert result.exit_code == 2
    assert_one_line_error(result.stderr, "retrieve", "retrieve.k_choices", str(n))
    assert_nothing_written(run_copy, "retrieve")


# --------------------------------------------------------------------------- domain errors
@pytest.mark.parametrize("stage, missing", [
    ("embed", "samples"), ("index", "embeddings"), ("noise", "samples"),
    ("retrieve", "index_raw"), ("retrieve", "index_standardize"), ("retrieve", "index_json"),
    ("retrieve", "labels"), ("train", "neighbours"),
    ("train", "embeddings"), ("evaluate", "model"), ("evaluate", "labels"),
])
def test_missing_upstream_artifact_is_a_domain_error(run_copy, stage, missing):
    run_copy.path(missing).unlink()
    clear_outputs(run_copy, stage)
    result = invoke(stage_args(stage, run_copy.root, run_copy.params_path))
    assert result.exit_code == 1, result.output
    assert_one_line_error(result.stderr, stage, "missing", str(run_copy.path(missing)))
    assert_nothing_written(run_copy, stage)


def test_index_of_another_dimension_is_a_domain_error(run_copy):
    """The index holds D=64 pixel vectors; embeddings of D=32 cannot be searched in it."""
    rewrite_embeddings_random(run_copy, dim=32, seed=0)
    clear_outputs(run_copy, "retrieve")
    result = invoke(stage_args("retrieve", run_copy.root, run_copy.params_path))
    assert result.exit_code == 1, result.output
    assert_one_line_error(result.stderr, "retrieve", "dimension", "32", "64")
    assert_nothing_written(run_copy, "retrieve")


def test_model_of_another_dimension_is_a_domain_error(run_copy):
    rewrite_embeddings_random(run_copy, dim=32, seed=1)
    clear_outputs(run_copy, "evaluate")
    result = invoke(stage_args("evaluate", run_copy.root, run_copy.params_path))
    assert result.exit_code == 1, result.output
    assert_one_line_error(result.stderr, "evaluate", "64-d", "32-d")
    assert_nothing_written(run_copy, "evaluate")


def test_stale_index_is_a_domain_error(run_copy):
    """An index over another train split (here: half of it) is a mismatched artifact."""
    from pipeline.index import build_index, save_index
    from pipeline.tables import read_embeddings

    emb = read_embeddings(run_copy.path("embeddings"))
    half = emb.rows("train")[: len(emb.rows("train")) // 2]
    save_index(build_index(emb.vectors[half], emb.sample_id[half], factory="Flat"),
               run_copy.path("index_raw"))
    clear_outputs(run_copy, "retrieve")
    result = invoke(stage_args("retrieve", run_copy.root, run_copy.params_path))
    assert result.exit_code == 1, result.output
    # index.json fingerprints the index it describes: the replaced file does not match.
    assert_one_line_error(result.stderr, "retrieve", "index.json", "`lra index` rebuilds it")
    assert_nothing_written(run_copy, "retrieve")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_embeddings_are_a_domain_error(run_copy, bad):
    from pipeline.tables import read_embeddings

    vectors = read_embeddings(run_copy.path("embeddings")).vectors.copy()
    vectors[7, 3] = bad
    rewrite_embeddings(run_copy, vectors)
    clear_outputs(run_copy, "index")
    result = invoke(stage_args("index", run_copy.root, run_copy.params_path))
    assert result.exit_code == 1, result.output
    assert_one_line_error(result.stderr, "index", "NaN or infinite", "sample_id 7")
    assert_nothing_written(run_copy, "index")


@pytest.mark.parametrize("stage, label", [("retrieve", 10), ("train", -2), ("evaluate", 99)])
def test_labels_outside_class_range_are_a_domain_error(run_copy, stage, label):
    observed = observed_labels(run_copy)
    observed[5] = label
    rewrite_observed_labels(run_copy, observed)
    clear_outputs(run_copy, stage)
    result = invoke(stage_args(stage, run_copy.root, run_copy.params_path))
    assert result.exit_code == 1, result.output
    assert_one_line_error(result.stderr, stage, "observed_label", "outside [0, 10)", str(label))
    assert_nothing_written(run_copy, stage)


def test_tables_of_different_samples_are_a_domain_error(run_copy):
    labels = pq.read_table(run_copy.path("labels"))
    pq.write_table(labels.slice(0, labels.num_rows - 1), run_copy.path("labels"))
    # pq.write_table drops nothing of the metadata, so only the row count differs.
    clear_outputs(run_copy, "train")
    result = invoke(stage_args("train", run_copy.root, run_copy.params_path))
    assert result.exit_code == 1, result.output
    assert_one_line_error(result.stderr, "train", "different samples")
    assert_nothing_written(run_copy, "train")


def test_wrong_embedding_column_type_is_a_domain_error(run_copy):
    table = pq.read_table(run_copy.path("embeddings"))
    as_double = table["embedding"].cast(pa.list_(pa.float64(), 64))
    pq.write_table(table.set_column(2, "embedding", as_double), run_copy.path("embeddings"))
    clear_outputs(run_copy, "index")
    result = invoke(stage_args("index", run_copy.root, run_copy.params_path))
    assert result.exit_code == 1, result.output
    assert_one_line_error(result.stderr, "index", "fixed_size_list<float32>")
    assert_nothing_written(run_copy, "index")


@pytest.mark.parametrize("stage, corrupt", [
    ("retrieve", "embeddings"), ("retrieve", "index_center"), ("evaluate", "model")])
def test_corrupt_artifact_is_a_domain_error(run_copy, stage, corrupt):
    run_copy.path(corrupt).write_bytes(b"not what you expect\n" * 8)
    clear_outputs(run_copy, stage)
    result = invoke(stage_args(stage, run_copy.root, run_copy.params_path))
    assert result.exit_code == 1, result.output
    assert_one_line_error(result.stderr, stage, str(run_copy.path(corrupt)))
    assert_nothing_written(run_copy, stage)


# --------------------------------------------------------------------------- crashes
def test_interrupt_mid_write_keeps_previous_outputs(run_copy, monkeypatch):
    """Ctrl-C after some outputs were written to temporaries: exit 130, the previous
    outputs stay byte for byte, and the temporaries are gone."""
    import stages.evaluate

    out_dir = run_copy.path("metrics").parent
    before = hashes(run_copy.root, [ARTIFACTS[n] for n in STAGE_OUTS["evaluate"]])
    pending: list[str] = []

    def interrupted(rows, path):
        pending.extend(temp_leftovers(out_dir))
        raise KeyboardInterrupt

    monkeypatch.setattr(stages.evaluate, "write_csv", interrupted)
    result = invoke(stage_args("evaluate", run_copy.root, run_copy.params_path))
    assert result.exit_code == 130
    assert result.stderr.strip().splitlines()[-1] == \
        "lra evaluate: interrupted; no output was published"
    assert "Traceback" not in result.stderr
    assert len(pending) >= 2  # metrics and predictions were complete, in temporaries
    assert hashes(run_copy.root, [ARTIFACTS[n] for n in STAGE_OUTS["evaluate"]]) == before
    assert temp_leftovers(out_dir) == []


def test_sigterm_mid_write_keeps_previous_outputs(run_copy, monkeypatch):
    """A killed job (SIGTERM) cleans up like Ctrl-C: exit 143, previous outputs intact,
    no temporaries left, and the previous SIGTERM handler is back afterwards."""
    import os
    import signal

    import stages.evaluate

    out_dir = run_copy.path("metrics").parent
    before = hashes(run_copy.root, [ARTIFACTS[n] for n in STAGE_OUTS["evaluate"]])
    pending: list[str] = []

    def killed(rows, path):
        pending.extend(temp_leftovers(out_dir))
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(stages.evaluate, "write_csv", killed)
    handler = signal.getsignal(signal.SIGTERM)
    result = invoke(stage_args("evaluate", run_copy.root, run_copy.params_path))
    assert result.exit_code == 143, result.output
    assert result.stderr.strip().splitlines()[-1] == \
        "lra evaluate: terminated; no output was published"
    assert len(pending) >= 2
    assert hashes(run_copy.root, [ARTIFACTS[n] for n in STAGE_OUTS["evaluate"]]) == before
    assert temp_leftovers(out_dir) == []
    assert signal.getsignal(signal.SIGTERM) == handler


def test_crash_mid_write_publishes_nothing(run_copy, monkeypatch):
    import stages.noise

    def disk_full(data, path):
        raise OSError(28, "No space left on device")

    clear_outputs(run_copy, "noise")
    monkeypatch.setattr(stages.noise, "write_json", disk_full)
    result = invoke(stage_args("noise", run_copy.root, run_copy.params_path))
    assert result.exit_code == 1  # one line, not a traceback: the disk, not the code
    assert_one_line_error(result.stderr, "noise", "No space left on device",
                          "nothing was published")
    assert_nothing_written(run_copy, "noise")  # labels.parquet was written, not published


def test_failed_stage_leaves_other_artifacts_untouched(run_copy, tmp_path):
    """A failing stage touches neither its own previous outputs nor anything else."""
    before = {p: sha256(run_copy.root / p) for p in ARTIFACTS.values()}
    params = bad_params(run_copy, tmp_path, retrieve={"k": n_train(run_copy) + 5})
    result = invoke(stage_args("retrieve", run_copy.root, params))
    assert result.exit_code == 2
    assert {p: sha256(run_copy.root / p) for p in ARTIFACTS.values()} == before
    assert temp_leftovers(run_copy.root / "data") == []


def test_outputs_are_readable_by_stage_readers(pipeline_run):
    """What one stage publishes, the next one's reader accepts (schema round trip)."""
    from pipeline.neighbours import read_retrieval
    from pipeline.tables import read_embeddings, read_labels

    emb = read_embeddings(pipeline_run.path("embeddings"))
    lab = read_labels(pipeline_run.path("labels"))
    ret = read_retrieval(pipeline_run.path("neighbours"))
    assert np.array_equal(emb.sample_id, lab.sample_id)
    assert np.array_equal(emb.sample_id, ret.sample_id)
    k = pipeline_run.params["retrieve"]["k"]
    assert ret.k == k and ret.candidates.shape == (len(emb.sample_id), k + 1)
    train = emb.rows("train")
    assert (ret.candidates[train, 0] == lab.observed[train]).all()  # own label first
    assert not np.isin(ret.neighbour_ids, emb.sample_id[emb.split != "train"]).any()
    assert not (ret.neighbour_ids == emb.sample_id[:, None]).any()  # never itself


def test_train_resolves_class_balance_auto_on_the_candidate_imbalance(run_copy, tmp_path,
                                                                     monkeypatch):
    """train.json carries the candidate labels' largest / smallest class count. Below
    CLASS_BALANCE_AUTO_RATIO, "auto" trains exactly the paper's loss ("none"); from it
    up, exactly "inverse", with one line saying so; an explicit "none" then logs one
    hint instead, and "inverse" nothing."""
    import torch

    import pipeline.training
    import stages.train
    from pipeline.checkpoint import load_checkpoint
    from pipeline.neighbours import read_retrieval
    from pipeline.training import CLASS_BALANCE_AUTO_RATIO, class_imbalance

    weak = {"epochs": 2, "eval_every": 1, "warmup_epochs": 1}

    def train(balance: str) -> tuple[dict, dict, str]:
        """(train.json, weights, stderr) of one training at this class_balance."""
        params = bad_params(run_copy, tmp_path / balance,
                            train={**weak, "class_balance": balance})
        result = invoke(stage_args("train", run_copy.root, params))
        assert result.exit_code == 0, result.stderr
        model, _ = load_checkpoint(run_copy.path("model"))
        return (json.loads(run_copy.path("train_json").read_text()), model.state_dict(),
                result.stderr)

    def same(a: dict, b: dict) -> bool:
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    table = read_retrieval(run_copy.path("neighbours"))
    ratio = class_imbalance(torch.from_numpy(table.candidates[table.split == "train"]), 10)
    assert 1.0 < ratio < CLASS_BALANCE_AUTO_RATIO  # balanced digits, 40 % symmetric noise
    (auto, auto_w, auto_err), (none, none_w, _) = train("auto"), train("none")
    assert auto["candidate_class_imbalance"] == pytest.approx(ratio, abs=1e-4)
    assert auto["class_balance"] == none["class_balance"] == "none"
    assert same(auto_w, none_w) and "imbalanced" not in auto_err

    for module in (pipeline.training, stages.train):  # as if the labels were imbalanced
        monkeypatch.setattr(module, "CLASS_BALANCE_AUTO_RATIO", ratio)
    (auto, auto_w, auto_err), (inverse, inverse_w, inverse_err) = train("auto"), train("inverse")
    assert auto["class_balance"] == inverse["class_balance"] == "inverse"
    assert same(auto_w, inverse_w) and not same(auto_w, none_w)
    assert len([line for line in auto_err.splitlines() if "imbalanced" in line]) == 1
    assert "weighting the loss by inverse class share" in auto_err
    assert "imbalanced" not in inverse_err
    _, _, none_err = train("none")
    hints = [line for line in none_err.splitlines() if "hint:" in line]
    assert len(hints) == 1 and "train.class_balance: auto or inverse" in hints[0], none_err
