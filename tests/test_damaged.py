"""Damaged artifacts (fuzz-style): every artifact, truncated, with garbage over its start
or in its middle, read by every stage that reads it: exit 1, exactly one line on stderr
naming the file and the command that rebuilds it, no traceback, and the stage's
outputs byte-identical to before (no temporaries left)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import (ARTIFACTS, assert_one_line_error, hashes, invoke, stage_args,
                      temp_leftovers)
from test_cli import STAGE_OUTS

REBUILDS = {"samples": "lra prepare", "embeddings": "lra embed", "labels": "lra noise",
            "neighbours": "lra retrieve", "index_raw": "lra index",
            "index_standardize": "lra index", "index_json": "lra index",
            "model": "lra train"}

READERS = [("samples", "embed"), ("samples", "noise"), ("embeddings", "index"),
           ("embeddings", "retrieve"), ("embeddings", "train"), ("embeddings", "evaluate"),
           ("labels", "retrieve"), ("labels", "train"), ("labels", "evaluate"),
           ("neighbours", "train"), ("neighbours", "evaluate"), ("index_raw", "retrieve"),
           ("index_standardize", "retrieve"),
           ("index_json", "retrieve"), ("model", "evaluate")]


def damage(path, how: str) -> None:
    data = bytearray(path.read_bytes())
    garbage = np.random.default_rng(len(data)).integers(0, 256, 100, dtype=np.uint8).tobytes()
    if how == "truncated":
        data = data[: len(data) // 2]
    elif how == "garbage_start":
        data[:100] = garbage
    else:  # garbage_middle
        middle = len(data) // 2
        data[middle:middle + 100] = garbage
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncated", "garbage_start", "garbage_middle"])
@pytest.mark.parametrize("artifact, stage", READERS, ids=[f"{a}-{s}" for a, s in READERS])
def test_damaged_artifact_is_one_line_and_nothing_written(run_copy, artifact, stage, how):
    outputs = [ARTIFACTS[name] for name in STAGE_OUTS[stage]]
    before = hashes(run_copy.root, outputs)
    path = run_copy.path(artifact)
    damage(path, how)
    result = invoke(stage_args(stage, run_copy.root, run_copy.params_path))
    assert result.exit_code == 1, (result.output, result.exception)
    assert_one_line_error(result.stderr, stage, str(path), REBUILDS[artifact], "damaged")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert hashes(run_copy.root, outputs) == before
    for name in STAGE_OUTS[stage]:
        assert temp_leftovers(run_copy.path(name).parent) == []


def test_damaged_noise_file_is_one_line(run_copy, tmp_path):
    """noise.file is the user's input, not an artifact, but a damaged one is also refused
    with one line (garbage bytes used to raise UnicodeDecodeError from the CSV reader)."""
    from conftest import write_params

    bad = tmp_path / "noisy.csv"
    bad.write_bytes(b"sample_id,label\n" + bytes(range(128, 256)) * 4)
    params = write_params(tmp_path / "p.yaml", {**run_copy.params, "noise": {
        **run_copy.params["noise"], "kind": "file", "file": str(bad)}})
    outputs = [ARTIFACTS[name] for name in STAGE_OUTS["noise"]]
    before = hashes(run_copy.root, outputs)
    result = invoke(stage_args("noise", run_copy.root, params))
    assert result.exit_code == 1, (result.output, result.exception)
    assert_one_line_error(result.stderr, "noise", str(bad))
    assert hashes(run_copy.root, outputs) == before
