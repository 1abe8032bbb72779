"""Lineage: every artifact records a fingerprint of its content and of the inputs it was
built from; a stage that reads artifacts together refuses a pair that does not belong
together with one line naming both and the stage to rerun (exit 1), and writes nothing."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
from conftest import assert_one_line_error, hashes, invoke, stage_args, write_params
from test_cli import STAGE_OUTS, rewrite_embeddings_random

from pipeline.artifacts import read_metadata
from pipeline.lineage import table_fingerprint


def _outputs(run_, stage):
    return {name: run_.path(name) for name in STAGE_OUTS[stage]}


def _refused(run_, stage, *needles, params=None):
    rel = [str(p.relative_to(run_.root)) for p in _outputs(run_, stage).values()]
    before = hashes(run_.root, rel)
    result = invoke(stage_args(stage, run_.root, params or run_.params_path))
    assert result.exit_code == 1, result.output
    line = assert_one_line_error(result.stderr, stage, *needles)
    after = hashes(run_.root, before)
    assert after == before, f"{stage} changed its outputs"
    print(line)
    return line


def test_train_on_embeddings_of_another_width_is_refused(run_copy):
    """32-d embeddings with neighbours retrieved from a 64-d index: used to train, exit 0."""
    rewrite_embeddings_random(run_copy, dim=32, seed=0)
    _refused(run_copy, "train", str(run_copy.path("neighbours")),
             str(run_copy.path("embeddings")), "dimension 64", "dimension 32",
             "rerun `lra retrieve`")


def test_retrieve_with_an_index_of_other_embeddings_is_refused(run_copy):
    """Same width, other vectors: the index no longer describes these embeddings."""
    rewrite_embeddings_random(run_copy, dim=64, seed=3)
    _refused(run_copy, "retrieve", str(run_copy.path("index")), "rerun `lra index`")


def test_labels_of_another_noise_run_are_refused_downstream(run_copy, tmp_path):
    """New labels (another noise seed) next to the old retrieval table and model."""
    params = write_params(tmp_path / "seed1.yaml", {**run_copy.params,
                                                    "noise": {**run_copy.params["noise"],
                                                              "seed": 1}})
    result = invoke(stage_args("noise", run_copy.root, params))
    assert result.exit_code == 0, result.output
    _refused(run_copy, "train", str(run_copy.path("labels")), "was built from labels",
             "rerun `lra retrieve`")
    _refused(run_copy, "evaluate", "was built from labels", "rerun `lra retrieve`")
    result = invoke(stage_args("retrieve", run_copy.root, params))
    assert result.exit_code == 0, result.output
    _refused(run_copy, "evaluate", str(run_copy.path("model")), "rerun `lra train`")


def test_tables_of_another_prepared_table_are_refused(run_copy, tmp_path):
    """A new prepared table (another split seed: the same sample ids, other splits) next
    to the old embeddings: noise (PMD reads both) and retrieve (embeddings from the old
    one, labels from the new one) refuse."""
    params = write_params(tmp_path / "seed1.yaml", {
        **run_copy.params, "data": {**run_copy.params["data"], "seed": 1},
        "noise": {**run_copy.params["noise"], "kind": "pmd"}})
    result = invoke(stage_args("prepare", run_copy.root, params))
    assert result.exit_code == 0, result.output
    _refused(run_copy, "noise", str(run_copy.path("embeddings")), "was built from prepared table",
             "rerun `lra embed`", params=params)
    symmetric = write_params(tmp_path / "sym.yaml", {
        **run_copy.params, "data": {**run_copy.params["data"], "seed": 1}})
    result = invoke(stage_args("noise", run_copy.root, symmetric))
    assert result.exit_code == 0, result.output
    _refused(run_copy, "retrieve", "different prepared tables", "`lra embed` or `lra noise`",
             params=symmetric)


def test_artifact_without_lineage_is_refused(run_copy):
    """An artifact written before lineage was recorded says which stage rebuilds it."""
    path = run_copy.path("neighbours")
    table = pq.read_table(path)
    meta = read_metadata(table.schema)
    meta.pop("built_from")
    pq.write_table(table.replace_schema_metadata(
        {k: json.dumps(v) for k, v in meta.items()}), path)
    _refused(run_copy, "train", "does not record", "rerun `lra retrieve`")


def test_every_artifact_records_its_lineage_without_paths(pipeline_run):
    root = str(pipeline_run.root)
    for name in ("samples", "embeddings", "labels", "neighbours"):
        meta = read_metadata(pq.read_schema(pipeline_run.path(name)))
        # The fingerprint is the table's content: reading the file back gives it again.
        assert meta["fingerprint"] == table_fingerprint(pq.read_table(pipeline_run.path(name)))
        assert root not in json.dumps(meta.get("built_from")), name
    index = json.loads(pipeline_run.path("index_json").read_text())
    assert index["built_from"]["embeddings"]["dim"] == 64
    emb = read_metadata(pq.read_schema(pipeline_run.path("embeddings")))
    assert emb["built_from"]["prepared"]["fingerprint"] == read_metadata(
        pq.read_schema(pipeline_run.path("samples")))["fingerprint"]
    ret = read_metadata(pq.read_schema(pipeline_run.path("neighbours")))["built_from"]
    assert set(ret) == {"index", "embeddings", "labels"}
    assert ret["index"]["fingerprint"] == index["fingerprint"]


def test_table_fingerprint_is_content_only():
    a = pa.table({"x": pa.array([1, None, 3]), "s": ["a", None, "bc"],
                  "v": pa.FixedSizeListArray.from_arrays(pa.array([1.0, 2, 3, 4, 5, 6],
                                                                  pa.float32()), 2)})
    chunked = pa.concat_tables([a.slice(0, 1), a.slice(1)])
    assert table_fingerprint(a) == table_fingerprint(chunked)
    assert table_fingerprint(a) == table_fingerprint(a.replace_schema_metadata({"k": "v"}))
    b = a.set_column(0, "x", pa.array([1, None, 4]))
    assert table_fingerprint(a) != table_fingerprint(b)
    assert table_fingerprint(a) != table_fingerprint(a.rename_columns(["y", "s", "v"]))
