"""OpenClipEncoder with random weights: shipped ViT-S-32 (the smallest shipped CLIP) and a
tiny ResNet config registered by the tests (BatchNorm, so train vs eval mode shows)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before huggingface_hub is imported: no 46 s retries

import json
import time
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

import open_clip  # a hard dependency: a broken import must fail the suite

from pipeline.encoders import RuntimeOptions
from pipeline.encoders import clip_download
from pipeline.encoders.clip import OpenClipEncoder
from pipeline.errors import ArtifactError, ConfigError
from pipeline.images import encode_png
from pipeline.sources import make_table

VIT = "ViT-S-32"
TINY = "lra-test-tiny-rn"  # registered below; file stem = model name
TINY_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 1000, "width": 16, "heads": 2,
                 "layers": 1},
}
CPU = RuntimeOptions(device="cpu", batch_size=2, workers=0, progress=False)


def _images(n: int = 5) -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    out = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(n - 2)]
    out.append(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8))  # non-square: centre crop
    out.append(rng.integers(0, 256, (32, 32), dtype=np.uint8))  # grayscale -> RGB
    return out


def _table(pixels: list[np.ndarray]) -> pa.Table:
    n = len(pixels)
    return make_table(split=np.array(["train"] * n), label=np.arange(n) % 3,
                      clean_label=None, image=[encode_png(p) for p in pixels])


def _reference(model, preprocess_val, pixels) -> np.ndarray:
    """What the encoder should produce: eval model + validation transform, one by one."""
    from PIL import Image

    model.eval()
    with torch.inference_mode():
        x = torch.stack([preprocess_val(Image.fromarray(p).convert("RGB")) for p in pixels])
        return model.encode_image(x, normalize=False).numpy()


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Single-threaded torch: on a shared 2-core machine OpenMP spin-waits made the
    suite 2-3x slower and erratic; results do not depend on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_model_name(tmp_path_factory) -> str:
    cfg = tmp_path_factory.mktemp("cfg") / f"{TINY}.json"
    cfg.write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(cfg)
    assert TINY in open_clip.list_models()
    return TINY


@pytest.fixture(scope="module")
def pixels() -> list[np.ndarray]:
    return _images()


@pytest.fixture(scope="module")
def table(pixels) -> pa.Table:
    return _table(pixels)


@pytest.fixture(scope="module")
def vit() -> OpenClipEncoder:
    return OpenClipEncoder(model=VIT, pretrained=None)


@pytest.fixture(scope="module")
def vit_emb(vit, table) -> np.ndarray:
    return vit.encode(table, root=None, runtime=CPU)


def test_shape_dtype_and_provenance(vit, vit_emb, table):
    assert vit_emb.shape == (table.num_rows, 384)
    assert vit_emb.dtype == np.float32 and vit_emb.flags.c_contiguous
    assert np.isfinite(vit_emb).all()
    assert np.abs(vit_emb).max() > 0
    # raw features, not L2-normalised
    assert not np.allclose(np.linalg.norm(vit_emb, axis=1), 1.0, atol=1e-3)
    prov = vit.provenance()
    assert prov["encoder"] == "open_clip" and prov["model"] == VIT
    assert prov["pretrained"] is None and prov["dim"] == 384
    assert prov["normalised"] is False and prov["precision"] == "fp32"
    assert prov["image_size"] == [224, 224]
    json.dumps(prov)  # goes into Parquet metadata as JSON


def test_constructing_is_cheap():
    enc = OpenClipEncoder(model="no-such-model", pretrained="nonsense")
    assert enc._model is None  # nothing resolved or built yet


def test_row_order(vit, vit_emb, table):
    for i in range(table.num_rows):
        alone = vit.encode(table.slice(i, 1), root=None, runtime=CPU)
        np.testing.assert_allclose(alone[0], vit_emb[i], rtol=1e-5, atol=1e-5)
    rev = vit.encode(table.take(np.arange(table.num_rows)[::-1]), root=None, runtime=CPU)
    np.testing.assert_allclose(rev, vit_emb[::-1], rtol=1e-5, atol=1e-5)
    # distinct images give distinct rows (the order test is not vacuous)
    assert np.abs(vit_emb[0] - vit_emb[1]).max() > 1e-3


def test_deterministic(vit, vit_emb, table):
    again = vit.encode(table, root=None, runtime=CPU)
    assert np.array_equal(again, vit_emb)
    # random weights are seeded: a fresh encoder gives the same embeddings
    fresh = OpenClipEncoder(model=VIT, pretrained=None).encode(table, root=None, runtime=CPU)
    assert np.array_equal(fresh, vit_emb)


def test_batch_size_invariance(vit, vit_emb, table):
    big = vit.encode(table, root=None,
                     runtime=RuntimeOptions(device="cpu", batch_size=5, workers=0,
                                            progress=False))
    np.testing.assert_allclose(big, vit_emb, rtol=1e-5, atol=1e-5)


def test_eval_mode(vit, vit_emb, tiny_model_name, pixels, table):
    assert vit._model is not None
    assert not any(m.training for m in vit._model.modules())
    # BatchNorm model: in train mode a row's embedding would depend on its batch mates.
    enc = OpenClipEncoder(model=tiny_model_name, pretrained=None)
    batch = enc.encode(table, root=None, runtime=RuntimeOptions(
        batch_size=5, workers=0, progress=False))
    singles = np.concatenate([enc.encode(table.slice(i, 1), root=None, runtime=CPU)
                              for i in range(table.num_rows)])
    np.testing.assert_allclose(batch, singles, rtol=1e-5, atol=1e-5)
    assert not any(m.training for m in enc._model.modules())
    # sanity: the same model in train mode does give different features
    model = enc._model
    model.train()
    try:
        x = torch.stack([enc._transform(open_clip_image(p)) for p in pixels])
        with torch.no_grad():
            train_feats = model.encode_image(x, normalize=False).numpy()
    finally:
        model.eval()
    assert not np.allclose(train_feats, batch, atol=1e-3)


def open_clip_image(p: np.ndarray):
    from PIL import Image

    return Image.fromarray(p).convert("RGB")


def _tiny_checkpoint(path: Path, seed: int = 123):
    torch.manual_seed(seed)
    model, _, preprocess_val = open_clip.create_model_and_transforms(TINY, pretrained=None)
    torch.save(model.state_dict(), path)
    return model, preprocess_val


def test_local_checkpoint_round_trip(tiny_model_name, tmp_path, pixels, table):
    model, preprocess_val = _tiny_checkpoint(tmp_path / "weights.bin")
    expected = _reference(model, preprocess_val, pixels)
    enc = OpenClipEncoder(model=tiny_model_name, pretrained=str(tmp_path / "weights.bin"))
    got = enc.encode(table, root=None, runtime=CPU)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    random_weights = OpenClipEncoder(model=tiny_model_name, pretrained=None).encode(
        table, root=None, runtime=CPU)
    assert not np.allclose(got, random_weights, atol=1e-3)  # weights really were loaded
    assert enc.provenance()["pretrained"] == str(tmp_path / "weights.bin")


def test_mismatched_checkpoint_is_artifact_error(tiny_model_name, tmp_path):
    torch.save({"nonsense": torch.zeros(3)}, tmp_path / "bad.bin")
    with pytest.raises(ArtifactError, match="bad.bin"):
        OpenClipEncoder(model=tiny_model_name, pretrained=str(tmp_path / "bad.bin")).load()
    with pytest.raises(ArtifactError, match="not found"):
        OpenClipEncoder(model=tiny_model_name, pretrained=str(tmp_path / "missing.bin")).load()


def _open_clip_folder(folder: Path, preprocess: dict | None = None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": TINY_CFG, "preprocess_cfg": preprocess or {}}))
    return _tiny_checkpoint(folder / "open_clip_pytorch_model.bin", seed=5)


def test_local_dir_form(tiny_model_name, tmp_path, pixels, table):
    model, preprocess_val = _open_clip_folder(tmp_path / "m")
    expected = _reference(model, preprocess_val, pixels)
    got = OpenClipEncoder(model=f"local-dir:{tmp_path / 'm'}", pretrained=None).encode(
        table, root=None, runtime=CPU)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    # also accepted as `pretrained` (EmbedConfig documents that spelling)
    got2 = OpenClipEncoder(model=tiny_model_name, pretrained=f"local-dir:{tmp_path / 'm'}"
                           ).encode(table, root=None, runtime=CPU)
    np.testing.assert_allclose(got2, expected, rtol=1e-5, atol=1e-5)
    # a folder without weights must not silently give random weights
    (tmp_path / "m" / "open_clip_pytorch_model.bin").unlink()
    with pytest.raises(ArtifactError, match="no checkpoint"):
        OpenClipEncoder(model=f"local-dir:{tmp_path / 'm'}", pretrained=None).load()


def _hf_snapshot(cache: Path, repo_id: str) -> Path:
    """The Hugging Face cache layout: models--org--name/{refs/main, snapshots/<rev>/}."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    rev = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    snap = repo / "snapshots" / rev
    snap.mkdir(parents=True)
    return snap


def test_pretrained_tag_from_local_hf_cache(tiny_model_name, tmp_path, pixels, table,
                                            monkeypatch):
    """A tag whose weights sit in the HF cache loads offline, with the tag's preprocessing."""
    tag_cfg = {"url": "", "hf_hub": "lra-test/tiny-rn/", "mean": (0.5, 0.5, 0.5),
               "std": (0.25, 0.25, 0.25), "interpolation": "bilinear",
               "resize_mode": "squash"}
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, tiny_model_name,
                        {"lra_test": tag_cfg})
    snap = _hf_snapshot(tmp_path / "hub", "lra-test/tiny-rn")
    model, _ = _tiny_checkpoint(snap / "open_clip_pytorch_model.bin", seed=9)
    _, _, preprocess_val = open_clip.create_model_and_transforms(
        tiny_model_name, pretrained=None, image_mean=(0.5,) * 3, image_std=(0.25,) * 3,
        image_interpolation="bilinear", image_resize_mode="squash")
    expected = _reference(model, preprocess_val, pixels)
    enc = OpenClipEncoder(model=tiny_model_name, pretrained="lra_test",
                          cache_dir=str(tmp_path / "hub"))
    start = time.perf_counter()
    got = enc.encode(table, root=None, runtime=CPU)
    assert time.perf_counter() - start < 10
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    prov = enc.provenance()
    assert prov["pretrained"] == "lra_test"
    assert prov["preprocess"]["mean"] == [0.5, 0.5, 0.5]
    assert prov["preprocess"]["resize_mode"] == "squash"


def test_pretrained_tag_from_legacy_url_cache(tiny_model_name, tmp_path, pixels, table,
                                             monkeypatch):
    """Not in the HF cache, but in open_clip's URL cache (where OpenAI's `clip` package
    also caches, e.g. ~/.cache/clip/ViT-L-14.pt): used offline if its SHA256 matches."""
    import hashlib

    cache = tmp_path / "cache"
    cache.mkdir()
    model, preprocess_val = _tiny_checkpoint(cache / "tiny.pt", seed=11)
    sha = hashlib.sha256((cache / "tiny.pt").read_bytes()).hexdigest()
    tag_cfg = {"url": f"https://openaipublic.azureedge.net/clip/models/{sha}/tiny.pt",
               "hf_hub": "lra-test/not-cached/"}
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, tiny_model_name,
                        {"lra_url": tag_cfg})
    enc = OpenClipEncoder(model=tiny_model_name, pretrained="lra_url", cache_dir=str(cache))
    got = enc.encode(table, root=None, runtime=CPU)
    np.testing.assert_allclose(got, _reference(model, preprocess_val, pixels),
                               rtol=1e-5, atol=1e-5)
    # a corrupt / partial file is ignored, so offline this is the usual one-line error
    with open(cache / "tiny.pt", "ab") as f:
        f.write(b"junk")
    enc = OpenClipEncoder(model=tiny_model_name, pretrained="lra_url", cache_dir=str(cache))
    _assert_quick_one_line(enc, tiny_model_name, "'lra_url'", "embed.pretrained")


def test_hf_hub_form_from_local_cache(tiny_model_name, tmp_path, pixels, table):
    snap = _hf_snapshot(tmp_path / "hub", "lra-test/tiny-rn-hub")
    model, preprocess_val = _open_clip_folder(snap)
    expected = _reference(model, preprocess_val, pixels)
    got = OpenClipEncoder(model="hf-hub:lra-test/tiny-rn-hub", pretrained=None,
                          cache_dir=str(tmp_path / "hub")).encode(table, root=None, runtime=CPU)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def _assert_quick_one_line(enc: OpenClipEncoder, *needles: str) -> str:
    start = time.perf_counter()
    with pytest.raises(ArtifactError) as info:
        enc.encode(_table(_images(2)), root=None, runtime=CPU)
    elapsed = time.perf_counter() - start
    message = str(info.value)
    assert elapsed < 10, f"offline failure took {elapsed:.1f} s"
    assert "\n" not in message
    for needle in needles:
        assert needle in message
    return message


def test_offline_tag_fails_fast_with_one_line(tmp_path, monkeypatch):
    from huggingface_hub import constants

    # in case another test module imported huggingface_hub before HF_HUB_OFFLINE was set
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    enc = OpenClipEncoder(model="ViT-L-14-quickgelu", pretrained="openai",
                          cache_dir=str(tmp_path / "empty"))
    message = _assert_quick_one_line(enc, "ViT-L-14-quickgelu", "'openai'", "embed.pretrained",
                                     "embed.cache_dir")
    assert "HF_HUB_OFFLINE" in message


def test_unreachable_hub_fails_fast_without_offline_flag(tmp_path, monkeypatch):
    """Online mode (no HF_HUB_OFFLINE) but the hub does not answer: the reachability probe
    fails fast instead of huggingface_hub's ~46 s of retries. The endpoint is pointed at
    a closed local port, so this never touches the real network."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(urllib.request, "getproxies", dict)
    enc = OpenClipEncoder(model="ViT-L-14-quickgelu", pretrained="openai",
                          cache_dir=str(tmp_path / "empty"))
    message = _assert_quick_one_line(enc, "ViT-L-14-quickgelu", "'openai'", "unreachable")
    assert "127.0.0.1" in message
    enc = OpenClipEncoder(model="hf-hub:org/not-cached", pretrained=None,
                          cache_dir=str(tmp_path / "empty"))
    _assert_quick_one_line(enc, "hf-hub:org/not-cached", "unreachable", "local-dir:")


def test_probe_reports_closed_port_quickly():
    start = time.perf_counter()
    reason = clip_download._probe("127.0.0.1", 9, timeout=2.0)
    assert reason is not None
    assert time.perf_counter() - start < 3


def test_unknown_model_and_tag_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="list_models") as info:
        OpenClipEncoder(model="ViT-L-14-quickgelo", pretrained=None).load()
    assert "ViT-L-14-quickgelu" in str(info.value)  # close match suggested
    with pytest.raises(ConfigError, match="openai") as info:
        OpenClipEncoder(model="ViT-L-14-quickgelu", pretrained="no_such_tag").load()
    assert "list_pretrained_tags_by_model" in str(info.value)
    # plain ViT-L-14 + openai silently used the wrong activation in open_clip >= 2.29
    with pytest.raises(ConfigError, match="ViT-L-14-quickgelu"):
        OpenClipEncoder(model="ViT-L-14", pretrained="openai",
                        cache_dir=str(tmp_path)).load()
    with pytest.raises(ConfigError, match="not a torch device"):
        OpenClipEncoder(model=VIT, pretrained=None).load("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            OpenClipEncoder(model=VIT, pretrained=None).load("cuda")


def test_path_rows_and_workers(vit, vit_emb, pixels, tmp_path):
    from PIL import Image

    root = tmp_path / "imgs"
    (root / "a").mkdir(parents=True)
    paths = []
    for i, p in enumerate(pixels):
        rel = f"a/{i}.png"
        Image.fromarray(p).save(root / rel)
        paths.append(rel)
    n = len(pixels)
    table = make_table(split=np.array(["train"] * n), label=np.zeros(n), clean_label=None,
                       path=paths)
    got = vit.encode(table, root=str(root), runtime=CPU)
    np.testing.assert_allclose(got, vit_emb, rtol=1e-5, atol=1e-5)
    with_workers = vit.encode(table, root=str(root), runtime=RuntimeOptions(
        batch_size=2, workers=2, progress=False))
    np.testing.assert_allclose(with_workers, got, rtol=1e-5, atol=1e-5)


def test_bad_image_names_the_row(vit):
    table = make_table(split=np.array(["train", "val"]), label=np.zeros(2), clean_label=None,
                       image=[encode_png(_images(3)[0]), b"not an image"])
    with pytest.raises(ArtifactError, match="sample_id 1") as info:
        vit.encode(table, root=None, runtime=CPU)
    assert "\n" not in str(info.value)


def test_empty_table(vit):
    table = make_table(split=np.array([], dtype=object), label=np.zeros(0), clean_label=None,
                       image=[])
    out = vit.encode(table, root=None, runtime=CPU)
    assert out.shape == (0, 384) and out.dtype == np.float32
