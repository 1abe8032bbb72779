"""`lra predict` (new images -> classes) and `lra export` (cleaned-label manifest).

predict is checked against evaluate: on an ImageFolder built from the digits images and
run through the reduced pipeline, predicting the test folder's images from disk gives
exactly evaluate's `predicted` for the test split. export is checked by loading its
manifest through the `manifest` source and comparing labels with the policy's rule.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
from conftest import (STAGES, assert_one_line_error, deep_merge, invoke, small_params,
                      stage_args, write_params)
from PIL import Image

from pipeline.config import DataConfig
from pipeline.sources import manifest

NAMES = [f"digit{c}" for c in range(10)]


def run_args(root: Path) -> dict[str, str]:
    """predict's artifact options for a pipeline run below `root`."""
    return {"--model": str(root / "data/model/model.pt"),
            "--embeddings": str(root / "data/embeddings/embeddings.parquet"),
            "--labels": str(root / "data/labels/labels.parquet")}


def flat(options: dict[str, str]) -> list[str]:
    return [x for kv in options.items() for x in kv]


@pytest.fixture(scope="module")
def folder_run(pipeline_run, tmp_path_factory):
    """The digits images written as PNG files in an ImageFolder split layout
    (root/{train,val,test}/digit<c>/<id>.png, by clean label), then the reduced
    pipeline run on it with the `imagefolder` source."""
    base = tmp_path_factory.mktemp("folder_run")
    images = base / "images"
    samples = pq.read_table(pipeline_run.path("samples"))
    for sid, split, label, data in zip(*(samples.column(c).to_pylist() for c in (
            "sample_id", "split", "clean_label", "image"))):
        target = images / split / NAMES[label] / f"{sid:05d}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    params = small_params(data={"source": "imagefolder", "root": str(images)})
    params_path = write_params(base / "params.yaml", params)
    for stage in STAGES:
        result = invoke(stage_args(stage, base, params_path))
        assert result.exit_code == 0, (stage, result.stderr, result.exception)
    return base


def evaluate_test_predictions(root: Path) -> pl.DataFrame:
    """evaluate's test-split predictions with each row's image path relative to the test
    folder."""
    prepared = pl.read_parquet(root / "data/prepared/samples.parquet",
                               columns=["sample_id", "path"])
    preds = pl.read_parquet(root / "data/evaluate/predictions.parquet")
    return (preds.join(prepared, on="sample_id").filter(pl.col("split") == "test")
            .with_columns(pl.col("path").str.strip_prefix("test/"))
            .select("path", "predicted").sort("path"))


# --------------------------------------------------------------------------- predict
def test_predict_on_a_folder_equals_evaluate(folder_run, tmp_path):
    out = tmp_path / "preds.parquet"
    result = invoke(["predict", "--images", folder_run / "images" / "test", "--out", out,
                     *flat(run_args(folder_run))])
    assert result.exit_code == 0, (result.stderr, result.exception)
    got = pl.read_parquet(out)
    expected = evaluate_test_predictions(folder_run)
    assert got["path"].to_list() == sorted(got["path"].to_list())  # sorted, recursive
    assert got["path"].to_list() == expected["path"].to_list()
    assert got["predicted"].to_list() == expected["predicted"].to_list()
    assert got["predicted_name"].to_list() == [NAMES[i] for i in got["predicted"]]
    assert got["vote"].null_count() == len(got) == got["confidence"].null_count()
    meta = pq.read_schema(out).metadata
    assert json.loads(meta[b"class_names"]) == NAMES
    assert json.loads(meta[b"encoder"])["encoder"] == "pixels"


def test_predict_on_a_manifest_writes_csv_with_confidence(folder_run, tmp_path):
    expected = evaluate_test_predictions(folder_run)
    listing = folder_run / "images" / "predict_manifest.csv"  # paths relative to its folder
    pl.DataFrame({"path": ["test/" + p for p in expected["path"]]}).write_csv(listing)
    out = tmp_path / "preds.csv"
    result = invoke(["predict", "--images", listing, "--out", out, "--samples", "3",
                     "--batch-size", "64", *flat(run_args(folder_run))])
    assert result.exit_code == 0, (result.stderr, result.exception)
    got = pl.read_csv(out)
    assert got.columns == ["path", "predicted", "predicted_name", "vote", "confidence"]
    assert got["path"].to_list() == ["test/" + p for p in expected["path"]]
    assert got["predicted"].to_list() == expected["predicted"].to_list()
    conf = got["confidence"].to_numpy()
    assert np.allclose(np.round(conf * 3), conf * 3, atol=1e-4)  # k of 3 samples agree
    assert ((conf > 0.3) & (conf <= 1.0)).all()
    assert got["vote"].is_between(0, 9).all()


def test_confusion_matrix_uses_class_names(folder_run):
    confusion = pl.read_csv(folder_run / "data/evaluate/confusion.csv")
    assert set(confusion["actual"]) <= set(NAMES) and set(confusion["predicted"]) <= set(NAMES)


def _rewrite_embeddings(root: Path, *, vectors: np.ndarray | None = None, **provenance):
    from pipeline.tables import read_embeddings, write_embeddings

    path = root / "data/embeddings/embeddings.parquet"
    emb = read_embeddings(path)
    meta = {k: v for k, v in emb.meta.items() if k != "dim"} | provenance
    write_embeddings(path, sample_id=emb.sample_id, split=emb.split,
                     vectors=emb.vectors if vectors is None else vectors, provenance=meta)


def _digits_images(run, folder: Path, n: int = 5, size: int | None = None) -> Path:
    folder.mkdir(parents=True)
    for i, data in enumerate(pq.read_table(run.path("samples")).column("image")
                             .to_pylist()[:n]):
        img = Image.open(io.BytesIO(data))
        if size is not None:
            img = img.resize((size, size))
        img.save(folder / f"img{i}.png")
    return folder


@pytest.mark.parametrize("case", ["encoder", "dimension", "image size", "suffix"])
def test_predict_refuses_what_does_not_match_the_model(run_copy, tmp_path, case):
    images = _digits_images(run_copy, tmp_path / "new", size=16 if case == "image size"
                            else None)
    if case == "encoder":
        _rewrite_embeddings(run_copy.root, encoder="open_clip", model="ViT-B-32",
                            pretrained="openai")
    elif case == "dimension":
        vectors = np.random.default_rng(0).random((1797, 32), dtype=np.float32)
        _rewrite_embeddings(run_copy.root, vectors=vectors)
    out = tmp_path / ("preds.txt" if case == "suffix" else "preds.parquet")
    result = invoke(["predict", "--images", images, "--out", out,
                     *flat(run_args(run_copy.root))])
    needle = {"encoder": "trained on pixels embeddings", "dimension": "expects 64-d",
              "image size": "give 256-d embeddings", "suffix": "--out"}[case]
    assert result.exit_code == (2 if case == "suffix" else 1), result.stderr
    assert_one_line_error(result.stderr, "predict", needle)
    assert not out.exists()


def test_predict_flat_folder_matches_evaluate_on_digits(run_copy, tmp_path):
    """A flat folder of the pipeline's own (digits) images: same classes as evaluate."""
    images = _digits_images(run_copy, tmp_path / "flat", n=12)
    out = tmp_path / "p.parquet"
    result = invoke(["predict", "--images", images, "--out", out,
                     *flat(run_args(run_copy.root))])
    assert result.exit_code == 0, result.stderr
    got = pl.read_parquet(out)
    expected = pl.read_parquet(run_copy.path("predictions"))["predicted"][:12]
    order = sorted(range(12), key=lambda i: f"img{i}.png")
    assert got["path"].to_list() == [f"img{i}.png" for i in order]
    assert got["predicted"].to_list() == [expected[i] for i in order]


# --------------------------------------------------------------------------- export
def decisions(run_root: Path) -> pl.DataFrame:
    preds = pl.read_parquet(run_root / "data/evaluate/predictions.parquet")
    return preds.select("sample_id", "split", "observed", "predicted", "true").with_columns(
        flagged=(pl.col("split") == "train") & (pl.col("predicted") != pl.col("observed")))


def export(run_root: Path, policy: str, out: Path, *extra) -> None:
    d = run_root / "data"
    result = invoke(["export", "--policy", policy, "--out", out,
                     "--prepared", d / "prepared/samples.parquet",
                     "--labels", d / "labels/labels.parquet",
                     "--issues", d / "evaluate/predictions.parquet",
                     "--predictions", d / "evaluate/predictions.parquet", *extra])
    assert result.exit_code == 0, (result.stderr, result.exception)


def load_manifest(path: Path):
    return manifest.load(DataConfig(source="manifest", root=str(path)))


@pytest.mark.parametrize("policy,suffix", [("relabel", ".csv"), ("drop", ".parquet"),
                                           ("keep", ".csv")])
def test_export_digits_manifest_loads_with_policy_semantics(pipeline_run, tmp_path, policy,
                                                            suffix):
    out = tmp_path / "clean" / f"digits{suffix}"
    export(pipeline_run.root, policy, out)
    d = decisions(pipeline_run.root)
    assert d["flagged"].sum() > 0
    if policy == "drop":
        d = d.filter(~pl.col("flagged"))
    expected = d.select(
        "sample_id", "split", "true", "observed",
        label=pl.when(pl.col("flagged") & (policy == "relabel")).then("predicted")
        .otherwise("observed"))

    ds = load_manifest(out)  # the manifest source reads it as shipped
    assert ds.rejects.num_rows == 0
    assert not ds.labels_are_clean  # clean_label column: labels are taken as observed
    assert ds.class_names == [str(c) for c in range(10)]
    t = ds.table
    assert t.num_rows == len(expected)
    assert t.column("label").to_pylist() == expected["label"].to_list()
    assert t.column("split").to_pylist() == expected["split"].to_list()
    assert t.column("clean_label").to_pylist() == expected["true"].to_list()

    table = pl.read_csv(out) if suffix == ".csv" else pl.read_parquet(out)
    assert table["original_label"].to_list() == expected["observed"].to_list()
    assert table["sample_id"].to_list() == expected["sample_id"].to_list()
    if policy == "keep":
        assert (table["label"] == table["original_label"]).all()
    else:
        assert (table["label"] != table["original_label"]).any() == (policy == "relabel")
    # digits keeps pixels in samples.parquet: the images were written beside the manifest
    samples = pq.read_table(pipeline_run.path("samples")).column("image").to_pylist()
    for path, sid in zip(table["path"][:20], table["sample_id"][:20]):
        assert path.startswith("digits_images/")
        assert (out.parent / path).read_bytes() == samples[sid]
    assert len(list((out.parent / "digits_images").iterdir())) == len(table)


def test_export_reads_the_report_issue_table(pipeline_run, tmp_path):
    flagged_ids = [3, 10, 11]
    train = decisions(pipeline_run.root).filter(pl.col("split") == "train")
    ids = train["sample_id"][:20].to_list()
    issues = tmp_path / "label_issues.parquet"
    pl.DataFrame({"sample_id": ids, "is_label_issue": [i in [ids[j] for j in flagged_ids]
                                                       for i in ids],
                  "predicted_label": [7] * len(ids)}).write_parquet(issues)
    out = tmp_path / "m.parquet"
    export(pipeline_run.root, "relabel", out, "--issues", issues)
    table = pl.read_parquet(out)
    changed = table.filter(pl.col("is_label_issue"))
    assert changed["sample_id"].to_list() == [ids[j] for j in flagged_ids]
    assert (changed["label"] == 7).all()
    assert table.filter(~pl.col("is_label_issue")).select(
        (pl.col("label") == pl.col("original_label")).all()).item()
    out2 = tmp_path / "d.csv"
    export(pipeline_run.root, "drop", out2, "--issues", issues)
    assert len(pl.read_csv(out2)) == len(table) - len(flagged_ids)


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_an_exported_manifest_is_a_noise_file_for_a_second_round(run_copy, tmp_path, suffix):
    """The relabel round of README, Troubleshooting: `lra export --policy relabel`, then
    `noise.kind: file` with `noise.file:` that manifest. The noise stage reads the
    exported train labels as the observed labels; val and test stay clean."""
    out = tmp_path / f"relabel{suffix}"
    export(run_copy.root, "relabel", out)
    exported = pl.read_csv(out) if suffix == ".csv" else pl.read_parquet(out)
    params = deep_merge(run_copy.params, {"noise": {"kind": "file", "file": str(out)}})
    result = invoke(stage_args("noise", run_copy.root,
                               write_params(tmp_path / "p.yaml", params)))
    assert result.exit_code == 0, result.stderr
    labels = pl.read_parquet(run_copy.path("labels"))
    joined = labels.join(exported.select("sample_id", "label"), on="sample_id")
    train = joined.filter(pl.col("split") == "train")
    assert len(train) == int((labels["split"] == "train").sum())
    assert (train["observed_label"] == train["label"]).all()
    relabelled = exported.filter((pl.col("split") == "train")
                                 & (pl.col("label") != pl.col("original_label")))
    assert len(relabelled) > 0  # the round changed some labels, and the stage took them
    rest = labels.filter(pl.col("split") != "train")
    assert (rest["observed_label"] == rest["clean_label"]).all()


def test_export_of_a_file_source_points_at_its_images_and_feeds_prepare(folder_run,
                                                                        tmp_path):
    out = tmp_path / "elsewhere" / "cleaned.csv"
    export(folder_run, "relabel", out)
    assert not (out.parent / "cleaned_images").exists()  # files exist: no copies
    ds = load_manifest(out)
    assert ds.rejects.num_rows == 0
    prepared = pl.read_parquet(folder_run / "data/prepared/samples.parquet")
    table = pl.read_csv(out)
    for path, sid in zip(table["path"][:10], table["sample_id"][:10]):
        original = folder_run / "images" / prepared["path"][sid]
        assert (out.parent / path).resolve() == original.resolve()
    # This pipeline trains on it: `lra prepare` with the manifest source.
    params = write_params(tmp_path / "params.yaml", small_params(
        data={"source": "manifest", "root": str(out)}, noise={"kind": "none"}))
    result = invoke(["prepare", "--params", params, "--out-dir", tmp_path / "prep"])
    assert result.exit_code == 0, result.stderr
    prep = pl.read_parquet(tmp_path / "prep/samples.parquet")
    assert prep["label"].to_list() == table["label"].to_list()
    assert prep["split"].to_list() == table["split"].to_list()


def test_export_reads_a_csv_issue_table_and_refuses_one_of_other_labels(pipeline_run,
                                                                         tmp_path):
    """An issues table the user edited as CSV is read by its suffix. One whose
    given_label is not the labels table's observed label was made from another run's
    labels: applying it would relabel the wrong rows, so it is refused."""
    train = decisions(pipeline_run.root).filter(pl.col("split") == "train")[:30]
    flags = [i % 7 == 0 for i in range(len(train))]
    issues = tmp_path / "issues.csv"
    pl.DataFrame({"sample_id": train["sample_id"], "given_label": train["observed"],
                  "is_label_issue": flags, "predicted_label": [5] * len(train)}
                 ).write_csv(issues)
    out = tmp_path / "m.csv"
    export(pipeline_run.root, "relabel", out, "--issues", issues)
    table = pl.read_csv(out)
    assert table.filter(pl.col("is_label_issue"))["sample_id"].to_list() == \
        train.filter(pl.Series(flags))["sample_id"].to_list()

    other = tmp_path / "other.parquet"
    pl.DataFrame({"sample_id": train["sample_id"],
                  "given_label": (train["observed"] + 1) % 10,
                  "is_label_issue": flags, "predicted_label": [5] * len(train)}
                 ).write_parquet(other)
    d = pipeline_run.root / "data"
    result = invoke(["export", "--policy", "relabel", "--out", tmp_path / "x.csv",
                     "--prepared", d / "prepared/samples.parquet",
                     "--labels", d / "labels/labels.parquet", "--issues", other])
    assert result.exit_code == 1
    assert_one_line_error(result.stderr, "export", "given_label", "30 row(s)")
    assert not (tmp_path / "x.csv").exists()


def test_an_output_path_that_is_a_folder_is_refused_before_any_work(pipeline_run,
                                                                      tmp_path):
    d = pipeline_run.root / "data"
    folder = tmp_path / "taken.csv"
    folder.mkdir()
    result = invoke(["export", "--policy", "keep", "--out", folder,
                     "--prepared", d / "prepared/samples.parquet",
                     "--labels", d / "labels/labels.parquet"])
    assert result.exit_code == 2
    assert_one_line_error(result.stderr, "export", "--out", "is a folder")
    (tmp_path / "file").write_text("")
    result = invoke(["predict", "--images", tmp_path, "--out", tmp_path / "file/p.csv",
                     "--model", d / "model/model.pt",
                     "--embeddings", d / "embeddings/embeddings.parquet"])
    assert result.exit_code == 2
    assert_one_line_error(result.stderr, "predict", "--out", "is a file, not a folder")
    assert list(folder.iterdir()) == []
    result = invoke(["predict", "--images", tmp_path / "no_such_dir", "--out",
                     tmp_path / "p.csv", "--model", d / "model/model.pt",
                     "--embeddings", d / "embeddings/embeddings.parquet"])
    assert result.exit_code == 1
    assert_one_line_error(result.stderr, "predict", "no_such_dir", "no such folder or manifest")
    assert not (tmp_path / "p.csv").exists()


def test_export_refuses_a_bad_policy_or_suffix(pipeline_run, tmp_path):
    result = invoke(["export", "--policy", "fix", "--out", tmp_path / "m.csv"])
    assert result.exit_code == 2
    assert "relabel, drop, keep" in result.stderr
    d = pipeline_run.root / "data"
    result = invoke(["export", "--policy", "keep", "--out", tmp_path / "m.json",
                     "--prepared", d / "prepared/samples.parquet",
                     "--labels", d / "labels/labels.parquet"])
    assert result.exit_code == 2
    assert_one_line_error(result.stderr, "export", "--out")
    assert not (tmp_path / "m.json").exists()


def test_help_lists_the_new_commands():
    result = invoke(["--help"])
    assert "predict" in result.stdout and "export" in result.stdout
    result = invoke(["export", "--help"])
    assert "PNG" in result.stdout
    from stages.launch import COMMANDS

    assert {"predict", "export"} <= set(COMMANDS)


def test_console_script_runs_export(pipeline_run, tmp_path):
    """`lra export` through the installed script (stages.launch loads only it)."""
    from conftest import VENV_BIN, run

    d = pipeline_run.root / "data"
    out = tmp_path / "m.parquet"
    proc = run([str(VENV_BIN / "lra"), "export", "--policy", "drop", "--out", str(out),
                "--prepared", str(d / "prepared/samples.parquet"),
                "--labels", str(d / "labels/labels.parquet"),
                "--issues", str(d / "evaluate/predictions.parquet")], tmp_path)
    assert "lra export: drop:" in proc.stderr
    assert len(pl.read_parquet(out)) == len(decisions(pipeline_run.root).filter(
        ~pl.col("flagged")))


def test_encoder_is_rebuilt_from_the_embeddings_provenance(tmp_path):
    from pipeline.encoders import build_encoder
    from pipeline.encoders.clip import OpenClipEncoder
    from pipeline.encoders.pixels import PixelEncoder
    from pipeline.errors import ArtifactError
    from pipeline.predict import encoder_config

    weights = tmp_path / "b32.bin"  # build_encoder checks that a local checkpoint exists
    weights.write_bytes(b"")
    clip = build_encoder(encoder_config(
        {"encoder": "open_clip", "model": "ViT-B-32", "pretrained": str(weights), "dim": 512},
        weights_dir="/cache"))
    assert isinstance(clip, OpenClipEncoder)  # constructing is cheap: nothing loaded
    assert (clip.model_name, clip.pretrained, clip.cache_dir) == ("ViT-B-32", str(weights),
                                                                  "/cache")
    assert isinstance(build_encoder(encoder_config({"encoder": "pixels", "dim": 64})),
                      PixelEncoder)
    with pytest.raises(ArtifactError, match="encoder 'mystery'"):
        encoder_config({"encoder": "mystery"})


def test_export_help_names_the_policies():
    """`--policy` shows its three choices where the help would say <str>."""
    result = invoke(["export", "--help"])
    assert result.exit_code == 0 and "relabel|drop|keep" in result.stdout


def test_predict_output_does_not_depend_on_chunk_rows(folder_run, tmp_path):
    """--chunk-rows (rounded up to a multiple of --batch-size: here 8-image chunks)
    changes memory only: the classes, the stochastic vote and its confidence are equal."""
    outs = []
    for name, chunking in (("one", []), ("many", ["--chunk-rows", "5", "--batch-size", "4"])):
        outs.append(tmp_path / f"{name}.parquet")
        result = invoke(["predict", "--images", folder_run / "images" / "test", "--out",
                         outs[-1], "--samples", "3", *chunking, *flat(run_args(folder_run))])
        assert result.exit_code == 0, (result.stderr, result.exception)
    one, many = (pl.read_parquet(out) for out in outs)
    assert len(one) > 8  # more than one chunk of 8
    assert one.equals(many)
