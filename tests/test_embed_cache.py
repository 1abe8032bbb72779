"""pipeline.embed_cache and the resumable `lra embed`: a run killed after some chunks
resumes without recomputing them and writes the same bytes as an uninterrupted run; the
chunk size never changes the output; the cache key follows the images and the encoder."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub is imported

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import yaml
from typer.testing import CliRunner

import stages.cli  # noqa: F401  (registers every command on the app)
from pipeline import embed_cache
from pipeline.artifacts import write_table
from pipeline.embed_cache import ChunkStore, cache_key, chunk_ranges, embed_table
from pipeline.encoders import RuntimeOptions
from pipeline.encoders.pixels import PixelEncoder
from pipeline.errors import ArtifactError
from pipeline.images import encode_png
from pipeline.sources import make_table
from pipeline.tables import write_embeddings
from stages import embed as embed_stage
from stages.app import app

N = 37  # not a multiple of any chunk size used below: a short last chunk
RT = RuntimeOptions(device="cpu", batch_size=4, workers=0, progress=False)


class Killed(RuntimeError):
    """Stands for the process being killed mid-run."""


class CountingEncoder:
    """Wraps PixelEncoder: counts encode calls and the rows they covered, and raises
    Killed on call number `fail_on` (1-based) before doing any work."""

    per_image = True

    def __init__(self, fail_on: int | None = None) -> None:
        self.inner = PixelEncoder()
        self.fail_on = fail_on
        self.calls: list[tuple[int, int]] = []  # (first sample_id, rows)

    def encode(self, table: pa.Table, *, root, runtime) -> np.ndarray:
        if self.fail_on is not None and len(self.calls) + 1 == self.fail_on:
            raise Killed(f"killed during call {self.fail_on}")
        self.calls.append((table.column("sample_id")[0].as_py(), table.num_rows))
        return self.inner.encode(table, root=root, runtime=runtime)

    def fingerprint(self, runtime) -> dict:
        return self.inner.fingerprint(runtime)

    def provenance(self) -> dict:
        return self.inner.provenance()


def _pixels(n: int = N, seed: int = 0, size: tuple[int, int] = (8, 8)) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size, dtype=np.uint8) for _ in range(n)]


def _table(pixels: list[np.ndarray]) -> pa.Table:
    n = len(pixels)
    split = np.array(["train", "val", "test"])[np.arange(n) % 3]
    return make_table(split=split, label=np.arange(n) % 3, clean_label=np.arange(n) % 3,
                      image=[encode_png(p) for p in pixels])


def _write(path: Path, table: pa.Table, vectors: np.ndarray, provenance: dict) -> bytes:
    write_embeddings(path, sample_id=table.column("sample_id").to_numpy(),
                     split=table.column("split").to_pylist(), vectors=vectors,
                     provenance=provenance)
    return path.read_bytes()


@pytest.fixture(scope="module")
def table() -> pa.Table:
    return _table(_pixels())


@pytest.fixture(scope="module")
def reference(table, tmp_path_factory) -> bytes:
    """The output of the whole-table path (what `lra embed` wrote before chunking)."""
    enc = PixelEncoder()
    vectors = enc.encode(table, root=None, runtime=RT)
    return _write(tmp_path_factory.mktemp("ref") / "emb.parquet", table, vectors,
                  enc.provenance())


@pytest.fixture(scope="module")
def stage_reference(table, tmp_path_factory) -> bytes:
    """What `lra embed` writes: `reference` plus the prepared table's lineage stamp."""
    from pipeline.lineage import table_fingerprint

    enc = PixelEncoder()
    vectors = enc.encode(table, root=None, runtime=RT)
    stamp = {"fingerprint": table_fingerprint(table), "rows": table.num_rows}
    return _write(tmp_path_factory.mktemp("ref") / "emb.parquet", table, vectors,
                  {**enc.provenance(), "built_from": {"prepared": stamp}})


def _chunk_files(root: Path) -> list[Path]:
    return sorted(root.glob("embed/*/rows-*.npy"))


def test_chunk_ranges():
    assert chunk_ranges(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert chunk_ranges(8, 4) == [(0, 4), (4, 8)]
    assert chunk_ranges(0, 4) == []
    assert embed_cache.aligned_chunk_rows(10, 4) == 12
    assert embed_cache.aligned_chunk_rows(8, 4) == 8


def test_resume_after_kill_is_byte_identical(table, reference, tmp_path):
    cache = tmp_path / "cache"
    killed = CountingEncoder(fail_on=3)
    with pytest.raises(Killed):
        embed_table(killed, table, root=None, runtime=RT, cache_root=cache, chunk_rows=8)
    assert killed.calls == [(0, 8), (8, 8)]  # two chunks done before the kill
    assert [p.name for p in _chunk_files(cache)] == [
        "rows-000000000000-000000000008.npy", "rows-000000000008-000000000016.npy"]

    resumed = CountingEncoder()
    result = embed_table(resumed, table, root=None, runtime=RT, cache_root=cache,
                         chunk_rows=8)
    # only the chunks after the kill were computed
    assert resumed.calls == [(16, 8), (24, 8), (32, 5)]
    assert (result.computed, result.reused) == (3, 2)
    got = _write(tmp_path / "emb.parquet", table, result.vectors, result.provenance)
    assert got == reference

    # a third run computes nothing and still writes the same bytes
    idle = CountingEncoder()
    again = embed_table(idle, table, root=None, runtime=RT, cache_root=cache, chunk_rows=8)
    assert idle.calls == [] and again.reused == 5
    assert _write(tmp_path / "emb2.parquet", table, again.vectors, again.provenance) == reference


@pytest.mark.parametrize("chunk_rows", [1, 4, 12, 36, 37, 1000])
def test_chunk_size_does_not_change_output(table, reference, tmp_path, chunk_rows):
    enc = CountingEncoder()
    result = embed_table(enc, table, root=None, runtime=RT, cache_root=tmp_path,
                         chunk_rows=chunk_rows)
    rows = max(4, -(-chunk_rows // 4) * 4)  # rounded up to a multiple of the batch size
    assert len(enc.calls) == len(chunk_ranges(N, rows))
    assert _write(tmp_path / "e.parquet", table, result.vectors, result.provenance) == reference


def test_corrupt_chunk_is_recomputed(table, reference, tmp_path):
    embed_table(CountingEncoder(), table, root=None, runtime=RT, cache_root=tmp_path,
                chunk_rows=8)
    files = _chunk_files(tmp_path)
    data = files[1].read_bytes()
    files[1].write_bytes(data[: len(data) // 2])  # torn write
    files[3].write_bytes(b"not a npy file")
    enc = CountingEncoder()
    result = embed_table(enc, table, root=None, runtime=RT, cache_root=tmp_path, chunk_rows=8)
    assert enc.calls == [(8, 8), (24, 8)]
    assert _write(tmp_path / "e.parquet", table, result.vectors, result.provenance) == reference


def test_key_follows_images_and_encoder(table, tmp_path):
    key, described = cache_key(PixelEncoder(), table, root=None, runtime=RT)
    assert cache_key(PixelEncoder(), table, root=None, runtime=RT)[0] == key
    # runtime knobs that do not change pixel vectors do not change the key
    assert cache_key(PixelEncoder(), table, root=None,
                     runtime=RuntimeOptions(batch_size=64, workers=3))[0] == key
    assert described["encoder"] == {"encoder": "pixels"} and described["rows"] == N
    # one changed image changes the key
    pixels = _pixels()
    pixels[5] = 255 - pixels[5]
    assert cache_key(PixelEncoder(), _table(pixels), root=None, runtime=RT)[0] != key
    # so does another row order, and another encoder
    assert cache_key(PixelEncoder(), table.take(np.arange(N)[::-1]), root=None,
                     runtime=RT)[0] != key
    assert cache_key(CountingEncoder(), table, root=None, runtime=RT)[0] != key  # other code


def test_key_follows_image_files(tmp_path):
    from PIL import Image

    root = tmp_path / "images"
    root.mkdir()
    for i, px in enumerate(_pixels(4)):
        Image.fromarray(px).save(root / f"{i}.png")
    table = make_table(split=np.array(["train"] * 4), label=np.zeros(4), clean_label=None,
                       path=[f"{i}.png" for i in range(4)])
    key = cache_key(PixelEncoder(), table, root=str(root), runtime=RT)[0]
    assert cache_key(PixelEncoder(), table, root=str(root), runtime=RT)[0] == key
    Image.fromarray(255 - _pixels(1, seed=9)[0]).save(root / "2.png")
    os.utime(root / "2.png", ns=(1, 1))  # and a different mtime for sure
    assert cache_key(PixelEncoder(), table, root=str(root), runtime=RT)[0] != key
    # path rows are embedded through the cache too
    result = embed_table(PixelEncoder(), table, root=str(root), runtime=RT,
                         cache_root=tmp_path / "c", chunk_rows=2)
    direct = PixelEncoder().encode(table, root=str(root), runtime=RT)
    assert np.array_equal(result.vectors, direct)


def test_whole_table_encoder_is_one_chunk(table, tmp_path):
    class WholeTable(CountingEncoder):
        per_image = False  # e.g. an encoder using train-split statistics

    enc = WholeTable()
    result = embed_table(enc, table, root=None, runtime=RT, cache_root=tmp_path, chunk_rows=4)
    assert enc.calls == [(0, N)] and result.ranges == [(0, N)]


def test_mixed_image_sizes_across_chunks(tmp_path):
    pixels = _pixels(8) + _pixels(4, size=(6, 6))
    with pytest.raises(ArtifactError, match="one size"):
        embed_table(PixelEncoder(), _table(pixels), root=None, runtime=RT,
                    cache_root=tmp_path, chunk_rows=8)


def test_chunk_store_writes_atomically(tmp_path):
    store = ChunkStore(tmp_path / "k")
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    store.save(3, 6, arr)
    assert store.probe(3, 6) and not store.probe(0, 3)
    assert np.array_equal(store.load(3, 6), arr)
    assert [p.name for p in store.directory.iterdir()] == ["rows-000000000003-000000000006.npy"]
    with pytest.raises(ValueError):
        store.save(0, 2, arr)
    store.remove()
    assert not store.directory.exists()


def test_empty_table(tmp_path):
    empty = _table(_pixels(1)).slice(0, 0)

    class Empty(CountingEncoder):
        def encode(self, table, *, root, runtime):
            return np.zeros((0, 64), dtype=np.float32)

    result = embed_table(Empty(), empty, root=None, runtime=RT, cache_root=tmp_path)
    assert result.vectors.shape == (0, 64)


# --------------------------------------------------------------------------- open_clip
TINY = "lra-test-cache-tiny-rn"  # a tiny open_clip config (file stem = model name)
TINY_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 1000, "width": 16, "heads": 2,
                 "layers": 1},
}


def test_open_clip_ranges_match_whole_table_pass(tmp_path):
    import open_clip
    import json

    import torch

    from pipeline.encoders.clip import OpenClipEncoder

    cfg = tmp_path / f"{TINY}.json"
    cfg.write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(cfg)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rgb = [np.random.default_rng(i).integers(0, 256, (24, 24, 3), dtype=np.uint8)
               for i in range(6)]
        tab = _table(rgb)
        enc = OpenClipEncoder(model=TINY, pretrained=None)
        rt = RuntimeOptions(device="cpu", batch_size=2, workers=0, progress=False)
        whole = enc.encode(tab, root=None, runtime=rt)
        parts = list(enc.encode_ranges(tab, [(0, 2), (2, 4), (4, 6), (6, 6)], root=None,
                                       runtime=rt))
        assert [p.shape[0] for p in parts] == [2, 2, 2, 0]
        assert np.array_equal(np.concatenate(parts), whole)
        fp = enc.fingerprint(rt)
        assert fp["encoder"] == "open_clip" and fp["batch_size"] == 2 and fp["device"] == "cpu"
        # resumable through the cache, same bytes as the whole-table pass
        result = embed_table(enc, tab, root=None, runtime=rt, cache_root=tmp_path / "c",
                             chunk_rows=3)
        assert result.ranges == [(0, 4), (4, 6)]  # 3 rounded up to the batch size
        assert np.array_equal(result.vectors, whole)
        assert result.provenance == enc.provenance()
    finally:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------- the stage
@pytest.fixture
def prepared(tmp_path, table) -> tuple[Path, Path]:
    path = tmp_path / "prepared" / "samples.parquet"
    write_table(table, path, metadata={"source": "test", "class_names": ["a", "b", "c"],
                                       "num_classes": 3, "labels_are_clean": True,
                                       "image_root": None}, fingerprint=True)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"embed": {"encoder": "pixels"}}))
    return path, params


def _cli(params: Path, prepared: Path, out: Path, cache: Path, *extra: str):
    return CliRunner().invoke(app, [
        "embed", "--params", str(params), "--prepared", str(prepared), "--out-dir",
        str(out.parent),
        "--device", "cpu", "--no-progress", "--cache-dir", str(cache), "--batch-size", "4",
        "--chunk-rows", "8", *extra])


def test_stage_resumes_after_kill(prepared, stage_reference, tmp_path, monkeypatch):
    path, params = prepared
    out, cache = tmp_path / "emb" / "embeddings.parquet", tmp_path / "cache"
    killed = CountingEncoder(fail_on=3)
    monkeypatch.setattr(embed_stage, "build_encoder", lambda cfg: killed)
    res = _cli(params, path, out, cache)
    assert isinstance(res.exception, Killed)
    assert not out.exists()  # nothing published
    assert len(_chunk_files(cache)) == 2  # what was done is kept

    resumed = CountingEncoder()
    monkeypatch.setattr(embed_stage, "build_encoder", lambda cfg: resumed)
    res = _cli(params, path, out, cache)
    assert res.exit_code == 0, res.output
    assert resumed.calls == [(16, 8), (24, 8), (32, 5)]
    assert out.read_bytes() == stage_reference
    assert not cache.exists()  # cleared once the output is written (empty folders too)


def test_stage_keep_cache_and_env(prepared, stage_reference, tmp_path, monkeypatch):
    path, params = prepared
    out, cache = tmp_path / "embeddings.parquet", tmp_path / "envcache"
    monkeypatch.setenv("LRA_CACHE_DIR", str(cache))
    monkeypatch.setenv("LRA_CHUNK_ROWS", "12")
    res = CliRunner().invoke(app, ["embed", "--params", str(params), "--prepared", str(path),
                                   "--out-dir", str(out.parent), "--device", "cpu",
                                   "--no-progress", "--keep-cache"])
    assert res.exit_code == 0, res.output
    assert out.read_bytes() == stage_reference
    # default batch size 256: chunks of 12 rows rounded up to 256 -> one chunk
    assert [p.name for p in _chunk_files(cache)] == ["rows-000000000000-000000000037.npy"]
