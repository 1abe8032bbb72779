"""Bad input that used to pass silently (or half-done) is refused: one line on stderr,
the documented exit code, nothing written (issue 9). Damaged artifacts: test_damaged.py;
artifacts built from other inputs: test_lineage.py."""

from __future__ import annotations

import pytest
from conftest import assert_one_line_error, files_under, invoke, small_params, write_params
from fixtures_datasets import make_imagefolder, make_manifest

from pipeline.config import DataConfig
from pipeline.errors import ArtifactError
from pipeline.sources import load_source


def _prepare(tmp_path, **data):
    params = write_params(tmp_path / "params.yaml", small_params(data=data))
    out = tmp_path / "prepared"
    return invoke(["prepare", "--params", params, "--out-dir", out]), out


def _manifest(tmp_path, rows: list[str]) -> str:
    fx = make_manifest(tmp_path, kind="csv")
    file = fx["root"] / "m.csv"
    file.write_text("path,label\n" + "\n".join(rows) + "\n")
    return str(file)


def _images(n: int) -> list[str]:
    return [f"img/{cls}_{i}.png" for cls in ("ant", "bee", "cow") for i in range(8)][:n]


# --------------------------------------------------------------------------- manifest
def test_one_class_name_among_integer_labels_is_refused(tmp_path):
    """`dog` among 0..11 made the whole column strings, sorted "0", "1", "10", ...: every
    integer label was silently remapped."""
    rows = [f"{p},{i % 12}" for i, p in enumerate(_images(24))]
    rows[17] = rows[17].rsplit(",", 1)[0] + ",dog"
    result, out = _prepare(tmp_path, source="manifest", root=_manifest(tmp_path, rows))
    assert result.exit_code == 1, result.output
    assert_one_line_error(result.stderr, "prepare", "mixes integer", "'dog'", "row 18")
    assert files_under(out) == []


def test_integer_labels_read_as_text_keep_their_numbers(tmp_path):
    """A Parquet manifest with labels "0".."11" as strings: numeric order, not text order."""
    import polars as pl

    fx = make_manifest(tmp_path, kind="parquet")
    file = fx["root"] / "text.parquet"
    pl.DataFrame({"path": _images(24), "label": [str(i % 12) for i in range(24)]}
                 ).write_parquet(file)
    ds = load_source(DataConfig(source="manifest", root=str(file)))
    assert ds.class_names == [str(i) for i in range(12)]
    order = {p: i for i, p in enumerate(_images(24))}
    labels = dict(zip(ds.table["path"].to_pylist(), ds.table["label"].to_pylist()))
    assert all(labels[p] == order[p] % 12 for p in labels)


def test_path_listed_twice_with_two_labels_is_refused(tmp_path):
    rows = [f"{p},{i % 3}" for i, p in enumerate(_images(24))]
    rows.append(f"{_images(1)[0]},2")  # row 0 says 0
    result, out = _prepare(tmp_path, source="manifest", root=_manifest(tmp_path, rows))
    assert result.exit_code == 1, result.output
    assert_one_line_error(result.stderr, "prepare", "different labels", "img/ant_0.png")
    assert files_under(out) == []


def test_path_listed_twice_with_the_same_label_is_kept(tmp_path):
    rows = [f"{p},{i % 3}" for i, p in enumerate(_images(24))] + [f"{_images(1)[0]},0"]
    ds = load_source(DataConfig(source="manifest", root=_manifest(tmp_path, rows)))
    assert ds.table.num_rows == 25


@pytest.mark.parametrize("source", ["imagefolder", "manifest"])
def test_a_single_class_is_refused(tmp_path, source):
    if source == "imagefolder":
        root = str(make_imagefolder(tmp_path, layout="flat", classes=("cat",))["root"])
    else:
        root = _manifest(tmp_path, [f"{p},0" for p in _images(24)])
    result, out = _prepare(tmp_path, source=source, root=root)
    assert result.exit_code == 1, result.output
    assert_one_line_error(result.stderr, "prepare", "1 class", "at least two")
    assert files_under(out) == []
    with pytest.raises(ArtifactError, match="at least two"):
        load_source(DataConfig(source=source, root=root))


# --------------------------------------------------------------------------- half-done work
def test_quickgelu_mismatch_is_refused_before_the_cache_is_created(pipeline_run, tmp_path):
    """ViT-B-32 + tag openai (trained with QuickGELU) used to be refused only after the
    embedding cache was set up, leaving .lra-cache/embed/<key>/key.json behind."""
    params = write_params(tmp_path / "params.yaml", small_params(
        embed={"encoder": "open_clip", "model": "ViT-B-32", "pretrained": "openai"}))
    cache, out = tmp_path / "cache", tmp_path / "emb"
    result = invoke(["embed", "--params", params, "--prepared", pipeline_run.path("samples"),
                     "--out-dir", out, "--cache-dir", cache, "--device", "cpu"])
    assert result.exit_code == 2, result.output
    assert_one_line_error(result.stderr, "embed", "QuickGELU", "ViT-B-32-quickgelu")
    assert not cache.exists() and not out.exists()
