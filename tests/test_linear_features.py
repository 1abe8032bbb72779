"""pipeline.linear (softmax-regression probe) and pipeline.features (train-fitted
normalisation stored in checkpoints)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.features import FeatureNormalizer
from pipeline.linear import LinearProbe, fit_linear


def clusters(n_per: int, *, c: int = 3, d: int = 10, seed: int = 0, scale: float = 4.0,
             centers: np.ndarray | None = None):
    rng = np.random.default_rng(seed)
    if centers is None:
        centers = rng.normal(size=(c, d)) * scale
    y = np.repeat(np.arange(c), n_per)
    x = (centers[y] + rng.normal(size=(len(y), d)) + 5.0).astype(np.float32)
    return x, y.astype(np.int64), centers


# --------------------------------------------------------------------------- linear probe
def test_fit_linear_separable_data():
    x, y, centers = clusters(60, seed=0)
    probe = fit_linear(x, y, num_classes=3, l2=1e-4, iters=100)
    assert isinstance(probe, LinearProbe)
    assert probe.weight.shape == (10, 3) and probe.bias.shape == (3,)
    assert (probe.predict(x) == y).all()
    xt, yt, _ = clusters(50, seed=1, centers=centers)
    assert (probe.predict(xt) == yt).mean() > 0.97
    assert probe.predict(xt).dtype == np.int64


def test_predict_proba_rows_sum_to_one_and_agree_with_predict():
    x, y, _ = clusters(40, c=4, seed=2)
    probe = fit_linear(x, y, num_classes=4, iters=50)
    p = probe.predict_proba(x)
    assert p.shape == (160, 4) and p.dtype == np.float64
    assert (p >= 0).all()
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-12)
    np.testing.assert_array_equal(p.argmax(axis=1), probe.predict(x))
    # confident on separable training data
    assert p[np.arange(len(y)), y].mean() > 0.9


def test_fit_linear_is_deterministic():
    x, y, _ = clusters(30, seed=3)
    a = fit_linear(x, y, num_classes=3, iters=30)
    b = fit_linear(x, y, num_classes=3, iters=30)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)


def test_fit_linear_standardises_with_train_statistics():
    x, y, _ = clusters(30, seed=4)
    x[:, 3] = 7.0  # a constant column: no division by zero
    probe = fit_linear(x, y, num_classes=3, iters=30)
    np.testing.assert_allclose(probe.mean.numpy(), x.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(probe.std.numpy()[[0, 1, 2]],
                               x.std(axis=0, ddof=1)[[0, 1, 2]], rtol=1e-4)
    assert probe.std[3].item() == pytest.approx(1e-6)
    assert np.isfinite(probe.weight.numpy()).all()
    assert (probe.predict(x) == y).all()
    # logits are computed on (x - mean) / std of the training data
    z = (x - probe.mean.numpy()) / probe.std.numpy()
    np.testing.assert_allclose(probe.logits(x).numpy(),
                               z @ probe.weight.numpy() + probe.bias.numpy(), rtol=1e-4,
                               atol=1e-4)


def test_l2_penalty_shrinks_weights():
    x, y, _ = clusters(30, seed=5)
    small = fit_linear(x, y, num_classes=3, l2=1e-4, iters=50)
    large = fit_linear(x, y, num_classes=3, l2=1.0, iters=50)
    assert large.weight.norm() < 0.5 * small.weight.norm()


def test_fit_linear_recovers_majority_under_label_noise():
    """20 % symmetric noise on separable clusters: the probe still predicts the clean class."""
    x, y, centers = clusters(100, seed=6)
    rng = np.random.default_rng(0)
    noisy = y.copy()
    flip = rng.choice(len(y), size=len(y) // 5, replace=False)
    noisy[flip] = (y[flip] + rng.integers(1, 3, size=len(flip))) % 3
    probe = fit_linear(x, noisy, num_classes=3, l2=1e-2, iters=100)
    xt, yt, _ = clusters(50, seed=7, centers=centers)
    assert (probe.predict(xt) == yt).mean() > 0.95


# --------------------------------------------------------------------------- normaliser
def test_standardize_uses_train_statistics():
    rng = np.random.default_rng(0)
    train = (rng.normal(size=(200, 5)) * [1, 2, 3, 4, 5] + [10, -3, 0, 2, 1]).astype(np.float32)
    test = (rng.normal(size=(50, 5)) * 7 + 100).astype(np.float32)
    norm = FeatureNormalizer.fit(train, "standardize")
    assert norm.mean.dtype == np.float32 and norm.mean.shape == (5,)
    np.testing.assert_allclose(norm.mean, train.mean(axis=0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(norm.std, train.std(axis=0), rtol=1e-5)
    z = norm.apply(train)
    np.testing.assert_allclose(z.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(z.std(axis=0), 1.0, rtol=1e-4)
    zt = norm.apply(test)
    assert zt.dtype == np.float32
    np.testing.assert_allclose(zt, (test - norm.mean) / norm.std, rtol=1e-6)
    # not re-fitted on the test data: its mean is far from 0
    assert abs(zt.mean()) > 5


def test_constant_columns_get_std_one():
    train = np.array([[1.0, 5.0, 0.0], [3.0, 5.0, 0.0], [5.0, 5.0, 0.0]], dtype=np.float32)
    norm = FeatureNormalizer.fit(train, "standardize")
    np.testing.assert_array_equal(norm.std[1:], [1.0, 1.0])
    z = norm.apply(np.array([[3.0, 7.0, -2.0]], dtype=np.float32))
    np.testing.assert_allclose(z, [[0.0, 2.0, -2.0]], atol=1e-6)
    assert np.isfinite(norm.apply(train)).all()


def test_l2_gives_unit_rows_and_handles_zero_rows():
    x = np.array([[3.0, 4.0], [0.0, 0.0], [-1.0, 0.0]], dtype=np.float64)
    norm = FeatureNormalizer.fit(x, "l2")
    out = norm.apply(x)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 0.0], [-1.0, 0.0]], atol=1e-7)
    rng = np.random.default_rng(0)
    out = norm.apply(rng.normal(size=(20, 7)) * 50)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-6)


def test_none_is_a_float32_copy():
    x = np.arange(6, dtype=np.float64).reshape(2, 3)
    out = FeatureNormalizer.fit(x, "none").apply(x)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, x)
    out[0, 0] = 99
    assert x[0, 0] == 0


def test_unknown_kind():
    with pytest.raises(ValueError, match="standardize"):
        FeatureNormalizer.fit(np.zeros((2, 2)), "minmax")


@pytest.mark.parametrize("kind", ["standardize", "l2", "none"])
def test_to_dict_from_dict_round_trip(kind):
    rng = np.random.default_rng(1)
    train = (rng.normal(size=(30, 4)) * 3 + 1).astype(np.float32)
    norm = FeatureNormalizer.fit(train, kind)
    d = json.loads(json.dumps(norm.to_dict()))  # checkpoints store it as plain data
    back = FeatureNormalizer.from_dict(d)
    assert back.kind == kind
    if kind == "standardize":
        assert back.mean.dtype == np.float32
        np.testing.assert_array_equal(back.mean, norm.mean)
        np.testing.assert_array_equal(back.std, norm.std)
    else:
        assert back.mean is None and back.std is None
    x = rng.normal(size=(5, 4)).astype(np.float32)
    np.testing.assert_array_equal(back.apply(x), norm.apply(x))


@pytest.mark.parametrize("kind", ["standardize", "center", "l2", "none"])
def test_chunked_fit_and_in_place_apply_match_whole_array_numpy(kind, monkeypatch):
    """Statistics are accumulated over row chunks and apply_inplace normalises without a
    copy; both agree with the whole-array numpy formulas."""
    from pipeline import features

    monkeypatch.setattr(features, "_CHUNK_ROWS", 7)  # many chunks, a partial last one
    x = (np.random.default_rng(3).normal(size=(50, 6)) * [1, 2, 3, 4, 5, 1e-9] + 10
         ).astype(np.float32)
    norm = FeatureNormalizer.fit(x, kind)
    if kind == "standardize":
        np.testing.assert_allclose(norm.mean, x.astype(np.float64).mean(0), rtol=1e-6)
        std = x.astype(np.float64).std(0)
        np.testing.assert_allclose(norm.std[:5], std[:5], rtol=1e-5)
        assert norm.std[5] == 1.0  # (near-)constant column
    elif kind == "center":
        centred = x.astype(np.float64) - x.astype(np.float64).mean(0)
        np.testing.assert_allclose(norm.std, np.sqrt((centred ** 2).mean()), rtol=1e-5)
    expected = norm.apply(x)
    buf = x.copy()
    out = norm.apply_inplace(buf)
    assert out is buf
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(norm.apply(x), expected)  # apply leaves x unchanged
    with pytest.raises(TypeError):
        norm.apply_inplace(x.astype(np.float64))
