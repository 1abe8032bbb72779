"""Tests for pipeline.noise: synthetic noise models, noise files, measurement helpers."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from pipeline.config import NoiseConfig
from pipeline.errors import ArtifactError, ConfigError
from pipeline.noise import (
    make_noisy_labels,
    needs_probe,
    observed_rate,
    parse_asym_map,
    transition_matrix,
)


def balanced(num_classes: int, per_class: int, seed: int = 0) -> np.ndarray:
    """(C * per_class,) int64 labels, every class exactly per_class times, shuffled."""
    labels = np.repeat(np.arange(num_classes, dtype=np.int64), per_class)
    return np.random.default_rng(seed).permutation(labels)


def probe_probs(clean: np.ndarray, num_classes: int, *, top: float, second: float,
                seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities with `top` on the clean class and `second` on a random other class;
    the rest spread evenly. Returns (probs (N, C), second_class (N,))."""
    rng = np.random.default_rng(seed)
    n = len(clean)
    other = (clean + rng.integers(1, num_classes, size=n)) % num_classes
    rest = (1.0 - top - second) / (num_classes - 2)
    probs = np.full((n, num_classes), rest)
    probs[np.arange(n), clean] = top
    probs[np.arange(n), other] = second
    return probs, other


def noisy(clean, num_classes, **kw):
    probs = kw.pop("probs", None)
    sample_ids = kw.pop("sample_ids", None)
    return make_noisy_labels(clean, num_classes=num_classes, cfg=NoiseConfig(**kw),
                             probs=probs, sample_ids=sample_ids)


# --------------------------------------------------------------------------- none / probe
def test_none_returns_clean_copy():
    clean = balanced(5, 20)
    out = noisy(clean, 5, kind="none")
    assert out.dtype == np.int64
    np.testing.assert_array_equal(out, clean)
    assert out is not clean


def test_needs_probe_only_for_pmd_and_hybrid():
    kinds = {k: needs_probe(NoiseConfig(kind=k, file="x.npy" if k == "file" else None))
             for k in ("none", "symmetric", "asymmetric", "pairflip", "pmd", "hybrid", "file")}
    assert kinds == {"none": False, "symmetric": False, "asymmetric": False,
                     "pairflip": False, "pmd": True, "hybrid": True, "file": False}
    # A hybrid whose PMD step comes from a noise file needs no probe.
    assert not needs_probe(NoiseConfig(kind="hybrid", file="x.npy"))
    assert needs_probe(NoiseConfig(kind="pmd", file="x.npy"))


# --------------------------------------------------------------------------- symmetric
@pytest.mark.parametrize("n,rate", [(1003, 0.4), (1000, 0.2), (999, 0.55), (10, 0.25), (7, 0.0)])
def test_symmetric_exact_rate_without_self_flips(n, rate):
    clean = np.random.default_rng(3).integers(0, 10, size=n)
    out = noisy(clean, 10, kind="symmetric", rate=rate, seed=1)
    # Every chosen sample really changed, so the count of changes is exactly round(rN).
    assert np.count_nonzero(out != clean) == round(rate * n)
    assert observed_rate(clean, out) == round(rate * n) / n
    assert out.dtype == np.int64 and out.min() >= 0 and out.max() < 10


def test_symmetric_two_classes_flips_to_the_other():
    clean = balanced(2, 500)
    out = noisy(clean, 2, kind="symmetric", rate=0.3)
    changed = out != clean
    assert changed.sum() == 300
    np.testing.assert_array_equal(out[changed], 1 - clean[changed])


def test_symmetric_uniform_over_other_classes():
    c, per_class = 5, 40_000
    clean = balanced(c, per_class)
    out = noisy(clean, c, kind="symmetric", rate=0.5, seed=7)
    counts = np.zeros((c, c))
    np.add.at(counts, (clean, out), 1)
    assert np.trace(counts) == c * per_class - round(0.5 * c * per_class)
    for k in range(c):
        off = np.delete(counts[k], k)  # where class k's flips went
        expected = off.sum() / (c - 1)
        chi2 = ((off - expected) ** 2 / expected).sum()
        assert chi2 < 30, (k, off)  # df = 3; P(chi2 > 30) ~ 1e-6
        # Flipped samples are a uniform subset: each class loses about half.
        assert abs(off.sum() - per_class / 2) < 5 * np.sqrt(per_class / 4)


# --------------------------------------------------------------------------- asymmetric
def test_asymmetric_cifar10_pairs_exact():
    clean = balanced(10, 1000)
    out = noisy(clean, 10, kind="asymmetric", rate=0.3, asym_map="cifar10", seed=2)
    t = transition_matrix(clean, out, 10)
    expected = np.eye(10)
    for src, dst in {9: 1, 2: 0, 3: 5, 5: 3, 4: 7}.items():
        expected[src, src], expected[src, dst] = 0.7, 0.3
    np.testing.assert_allclose(t, expected, atol=0, rtol=0)
    for untouched in (0, 1, 6, 7, 8):
        np.testing.assert_array_equal(out[clean == untouched], untouched)


def test_asymmetric_cifar100_block_structure():
    clean = balanced(100, 50)
    out = noisy(clean, 100, kind="asymmetric", rate=0.4, asym_map="cifar100")
    t = transition_matrix(clean, out, 100)
    for c in range(100):
        nxt = 5 * (c // 5) + (c % 5 + 1) % 5
        assert t[c, c] == pytest.approx(0.6) and t[c, nxt] == pytest.approx(0.4)
        assert np.count_nonzero(t[c]) == 2
    assert t[4, 0] == pytest.approx(0.4) and t[99, 95] == pytest.approx(0.4)


def test_asymmetric_explicit_map_per_class_exact_counts():
    sizes = {0: 11, 1: 13, 2: 9, 3: 17}
    clean = np.random.default_rng(0).permutation(
        np.concatenate([np.full(n, c) for c, n in sizes.items()]))
    out = noisy(clean, 4, kind="asymmetric", rate=0.3, asym_map=" 0:3 , 2:1")
    # round(0.3 * 11) = 3, round(0.3 * 9) = round(2.7) = 3
    assert np.count_nonzero(out[clean == 0] == 3) == 3
    assert np.count_nonzero(out[clean == 0] != 0) == 3
    assert np.count_nonzero(out[clean == 2] == 1) == 3
    assert np.count_nonzero(out[clean == 2] != 2) == 3
    np.testing.assert_array_equal(out[clean == 1], 1)
    np.testing.assert_array_equal(out[clean == 3], 3)


def test_asymmetric_rounds_per_class_ties_to_even():
    clean = np.repeat(np.arange(3), [5, 7, 1])
    out = noisy(clean, 3, kind="asymmetric", rate=0.5, asym_map="pair")
    changed = np.bincount(clean[out != clean], minlength=3)
    np.testing.assert_array_equal(changed, [round(2.5), round(3.5), round(0.5)])  # 2, 4, 0


def test_swap_map_never_double_flips():
    clean = balanced(10, 500)
    out = noisy(clean, 10, kind="asymmetric", rate=0.45, asym_map="cifar10")
    assert np.count_nonzero((clean == 3) & (out == 5)) == 225
    assert np.count_nonzero((clean == 5) & (out == 3)) == 225
    assert np.count_nonzero((clean == 3) & (out == 3)) == 275


def test_pairflip_is_asymmetric_pair():
    clean = np.random.default_rng(1).integers(0, 7, size=3000)
    a = noisy(clean, 7, kind="pairflip", rate=0.35, seed=4, asym_map="0:1")
    b = noisy(clean, 7, kind="asymmetric", rate=0.35, seed=4, asym_map="pair")
    np.testing.assert_array_equal(a, b)
    changed = a != clean
    np.testing.assert_array_equal(a[changed], (clean[changed] + 1) % 7)


@pytest.mark.parametrize("spec,num_classes,fragment", [
    ("banana", 10, "valid: pair, cifar10, cifar100"),
    ("cifar10", 5, "needs 10 classes"),
    ("cifar100", 10, "needs 100 classes"),
    ("0:12", 10, "outside [0, 10)"),
    ("-1:2", 10, "outside [0, 10)"),
    ("3:3", 10, "to itself"),
    ("0:1,0:2", 10, "appears twice"),
    ("0:1:2", 10, "not 'src:dst'"),
    ("a:1", 10, "not 'src:dst'"),
])
def test_bad_asym_map(spec, num_classes, fragment):
    with pytest.raises(ConfigError, match="noise.asym_map") as err:
        parse_asym_map(spec, num_classes)
    assert fragment in str(err.value) and "\n" not in str(err.value)
    clean = np.zeros(10, dtype=np.int64)
    with pytest.raises(ConfigError):
        noisy(clean, num_classes, kind="asymmetric", asym_map=spec)


# --------------------------------------------------------------------------- pmd
def test_pmd_labels_always_top_or_second():
    rng = np.random.default_rng(0)
    n, c = 20_000, 10
    logits = rng.normal(size=(n, c)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    order = np.argsort(-probs, axis=1)
    u, s = order[:, 0], order[:, 1]
    clean = u.copy()
    for pmd_type in ("I", "II", "III"):
        out = noisy(clean, c, kind="pmd", pmd_type=pmd_type, probs=probs)
        assert np.all((out == u) | (out == s))
        assert 0 < np.mean(out == s) < 1


def test_pmd_rate_monotone_in_factor():
    clean = np.random.default_rng(2).integers(0, 10, size=30_000)
    rng = np.random.default_rng(5)
    top = rng.uniform(0.55, 0.99, size=len(clean))  # probe right (u = clean), margin varies
    probs = np.zeros((len(clean), 10))
    probs[np.arange(len(clean)), clean] = top
    probs[np.arange(len(clean)), (clean + 1) % 10] = 1 - top
    rates, flips = [], []
    for factor in (1.1, 1.43, 2.0, 3.4):
        out = noisy(clean, 10, kind="pmd", pmd_factor=factor, probs=probs, seed=9)
        rates.append(observed_rate(clean, out))
        flips.append(out != clean)
    assert all(a < b for a, b in zip(rates, rates[1:])), rates
    # Same seed: a larger factor flips a superset of the samples.
    for small, large in zip(flips, flips[1:]):
        assert np.all(large[small])


@pytest.mark.parametrize("factor,expected", [(1.43, 1 - 1 / 1.43), (3.40, 1 - 1 / 3.40)])
def test_pmd_type1_confident_probe_rate_is_one_minus_inverse_factor(factor, expected):
    # Documented reading: label = u with probability g(delta) / factor. A confident,
    # correct probe (delta = 1, g = 1) gives rate 1 - 1/factor: 30 % for 1.43, 71 % for 3.40.
    n = 100_000
    clean = balanced(10, n // 10)
    probs = np.zeros((n, 10))
    probs[np.arange(n), clean] = 1.0
    out = noisy(clean, 10, kind="pmd", pmd_type="I", pmd_factor=factor, probs=probs)
    sd = np.sqrt(expected * (1 - expected) / n)
    assert abs(observed_rate(clean, out) - expected) < 5 * sd
    # Ties among the zero-probability classes resolve to the lowest index.
    changed = out != clean
    np.testing.assert_array_equal(out[changed], np.where(clean[changed] == 0, 1, 0))


@pytest.mark.parametrize("pmd_type,g", [
    ("I", 0.5 + 0.5**2 / 2), ("II", 0.5**3), ("III", (0.5**3 + 0.5**2 + 0.5) / 3)])
def test_pmd_types_follow_g_of_margin(pmd_type, g):
    n, factor = 60_000, 1.43
    clean = balanced(10, n // 10)
    probs, second = probe_probs(clean, 10, top=0.7, second=0.2)  # delta = 0.5
    out = noisy(clean, 10, kind="pmd", pmd_type=pmd_type, pmd_factor=factor, probs=probs)
    expected = 1 - g / factor
    sd = np.sqrt(expected * (1 - expected) / n)
    assert abs(observed_rate(clean, out) - expected) < 5 * sd
    changed = out != clean
    np.testing.assert_array_equal(out[changed], second[changed])


def test_pmd_needs_valid_probs():
    clean = balanced(4, 10)
    with pytest.raises(ArtifactError, match="probabilities"):
        noisy(clean, 4, kind="pmd")
    scores = np.random.default_rng(0).uniform(0, 3, size=(40, 4))  # unnormalised
    with pytest.raises(ArtifactError, match="sum to 1"):
        noisy(clean, 4, kind="pmd", probs=scores)
    with pytest.raises(ArtifactError, match="finite and non-negative"):
        noisy(clean, 4, kind="pmd", probs=scores - 1.5)
    with pytest.raises(ArtifactError, match="shape"):
        noisy(clean, 4, kind="pmd", probs=np.full((40, 3), 1 / 3))


# --------------------------------------------------------------------------- hybrid
def test_hybrid_symmetric_on_top_of_pmd():
    n = 20_000
    clean = balanced(10, n // 10)
    probs, _ = probe_probs(clean, 10, top=0.8, second=0.15)
    pmd = noisy(clean, 10, kind="pmd", probs=probs, seed=3)
    hyb = noisy(clean, 10, kind="hybrid", rate=0.3, probs=probs, seed=3)
    zero = noisy(clean, 10, kind="hybrid", rate=0.0, probs=probs, seed=3)
    np.testing.assert_array_equal(zero, pmd)  # same seed: the PMD step is reproduced
    # Symmetric step flips exactly round(0.3 N) labels relative to the PMD labels.
    assert np.count_nonzero(hyb != pmd) == round(0.3 * n)
    assert observed_rate(clean, hyb) > observed_rate(clean, pmd) + 0.1


def test_hybrid_asymmetric_on_top_flips_relative_to_pmd_label():
    n = 20_000
    clean = balanced(10, n // 10)
    probs, _ = probe_probs(clean, 10, top=0.8, second=0.15)
    pmd = noisy(clean, 10, kind="pmd", probs=probs, seed=3)
    hyb = noisy(clean, 10, kind="hybrid", hybrid_on_top="asymmetric", asym_map="cifar10",
                rate=0.3, probs=probs, seed=3)
    changed = hyb != pmd
    dst = parse_asym_map("cifar10", 10)
    np.testing.assert_array_equal(hyb[changed], dst[pmd[changed]])
    for src in (9, 2, 3, 5, 4):
        assert np.count_nonzero(changed & (pmd == src)) == round(0.3 * np.sum(pmd == src))
    assert observed_rate(clean, hyb) >= observed_rate(clean, pmd)


# --------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("kw", [
    dict(kind="symmetric", rate=0.4),
    dict(kind="asymmetric", rate=0.4, asym_map="pair"),
    dict(kind="pmd"),
    dict(kind="hybrid", rate=0.3),
])
def test_deterministic_per_seed_and_different_across_seeds(kw):
    clean = balanced(10, 300)
    probs, _ = probe_probs(clean, 10, top=0.6, second=0.3)
    a = noisy(clean, 10, seed=11, probs=probs, **kw)
    b = noisy(clean, 10, seed=11, probs=probs, **kw)
    c = noisy(clean, 10, seed=12, probs=probs, **kw)
    np.testing.assert_array_equal(a, b)
    assert np.any(a != c)


# --------------------------------------------------------------------------- measurement
def test_transition_matrix_recovers_known_transition():
    rng = np.random.default_rng(0)
    true_t = np.array([[0.7, 0.2, 0.1, 0.0],
                       [0.0, 0.9, 0.0, 0.1],
                       [0.25, 0.25, 0.25, 0.25],
                       [0.0, 0.0, 0.4, 0.6]])
    clean = rng.integers(0, 4, size=200_000)
    cdf = np.cumsum(true_t, axis=1)[clean]  # (N, C) per-sample CDF of its row
    observed = (rng.random(len(clean))[:, None] > cdf).sum(axis=1)
    t = transition_matrix(clean, observed, 4)
    assert t.dtype == np.float64 and t.shape == (4, 4)
    np.testing.assert_allclose(t.sum(axis=1), 1.0)
    np.testing.assert_allclose(t, true_t, atol=0.01)


def test_transition_matrix_absent_class_row_is_zero_and_rate_counts():
    clean = np.array([0, 0, 1, 1])
    observed = np.array([0, 1, 1, 1])
    t = transition_matrix(clean, observed, 3)
    np.testing.assert_array_equal(t, [[0.5, 0.5, 0], [0, 1, 0], [0, 0, 0]])
    assert observed_rate(clean, observed) == 0.25
    with pytest.raises(ArtifactError, match="differ in length"):
        observed_rate(clean, observed[:3])
    with pytest.raises(ArtifactError, match="outside"):
        transition_matrix(clean, np.array([0, 1, 3, 1]), 3)


# --------------------------------------------------------------------------- files
def file_cfg(path) -> NoiseConfig:
    return NoiseConfig(kind="file", file=str(path))


def test_file_npy_round_trip(tmp_path):
    clean = balanced(10, 50)
    labels = noisy(clean, 10, kind="symmetric", rate=0.4).astype(np.int32)
    np.save(tmp_path / "noise.npy", labels)
    out = make_noisy_labels(clean, num_classes=10, cfg=file_cfg(tmp_path / "noise.npy"))
    assert out.dtype == np.int64
    np.testing.assert_array_equal(out, labels)


def test_file_longer_array_indexed_by_sample_id(tmp_path):
    # CIFAR-10N style: labels for all 50 training images, train split = first 45.
    full = np.random.default_rng(0).integers(0, 10, size=50)
    np.save(tmp_path / "full.npy", full)
    ids = np.arange(45, dtype=np.int64)
    out = make_noisy_labels(np.zeros(45, dtype=np.int64), num_classes=10,
                            cfg=file_cfg(tmp_path / "full.npy"), sample_ids=ids)
    np.testing.assert_array_equal(out, full[:45])
    with pytest.raises(ArtifactError, match="holds 50 labels but the train split has 45"):
        make_noisy_labels(np.zeros(45, dtype=np.int64), num_classes=10,
                          cfg=file_cfg(tmp_path / "full.npy"))


def test_file_csv_with_shuffled_ids(tmp_path):
    rng = np.random.default_rng(0)
    ids = rng.permutation(np.arange(100, 160))  # train ids, in some order
    labels = rng.integers(0, 5, size=60)
    rows = np.stack([ids, labels], axis=1)[rng.permutation(60)]
    extra = np.array([[999, 4], [7, 0]])  # ids of other splits are ignored
    body = "\n".join(f"{a},{b}" for a, b in np.concatenate([rows, extra]))
    (tmp_path / "noise.csv").write_text("sample_id,label\n" + body + "\n")
    out = make_noisy_labels(np.zeros(60, dtype=np.int64), num_classes=5,
                            cfg=file_cfg(tmp_path / "noise.csv"), sample_ids=ids)
    np.testing.assert_array_equal(out, labels)


def test_file_tables_with_quoting_extra_columns_and_parquet(tmp_path):
    """`lra export`'s manifest as a noise file: quoted strings (a path with a comma),
    other columns, capitalised names; and the same as Parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    ids = np.array([5, 3, 9])
    text = ('"path","Label","split","SAMPLE_ID"\n'
            '"a,b.png",2,"train",3\n"c.png",1,"train",5\n"d.png",0,"train",9\n'
            '"e.png",4,"val",11\n')
    (tmp_path / "m.csv").write_text(text)
    out = make_noisy_labels(np.zeros(3, dtype=np.int64), num_classes=5,
                            cfg=file_cfg(tmp_path / "m.csv"), sample_ids=ids)
    np.testing.assert_array_equal(out, [1, 2, 0])
    pq.write_table(pa.table({"sample_id": [9, 5, 3, 11], "label": [0, 1, 2, 4],
                             "path": ["x", "y", "z", "w"]}), tmp_path / "m.parquet")
    out = make_noisy_labels(np.zeros(3, dtype=np.int64), num_classes=5,
                            cfg=file_cfg(tmp_path / "m.parquet"), sample_ids=ids)
    np.testing.assert_array_equal(out, [1, 2, 0])
    pq.write_table(pa.table({"sample_id": [9, 5, 3], "label": [0.0, 1.5, 2.0]}),
                   tmp_path / "f.parquet")
    with pytest.raises(ArtifactError, match="not integer"):
        make_noisy_labels(np.zeros(3, dtype=np.int64), num_classes=5,
                          cfg=file_cfg(tmp_path / "f.parquet"), sample_ids=ids)
    (tmp_path / "empty.csv").write_text("sample_id,label\n3,\n5,1\n9,0\n")
    with pytest.raises(ArtifactError, match="empty sample_id or label"):
        make_noisy_labels(np.zeros(3, dtype=np.int64), num_classes=5,
                          cfg=file_cfg(tmp_path / "empty.csv"), sample_ids=ids)


def test_file_csv_errors(tmp_path):
    ids = np.arange(4)
    clean = np.zeros(4, dtype=np.int64)
    cases = {
        "missing.csv": ("sample_id,label\n0,1\n1,1\n3,0\n",
                        "misses 1 of the 4 train sample ids (e.g. 2)"),
        "dup.csv": ("sample_id,label\n0,1\n1,1\n2,0\n3,0\n2,1\n", "sample id 2 more than once"),
        "header.csv": ("id,label\n0,1\n", "lacks the columns sample_id and label"),
        "float.csv": ("sample_id,label\n0,1.5\n", "not integer"),
        "range.csv": ("sample_id,label\n0,1\n1,5\n2,0\n3,0\n",
                      "label 5 at row 1 is outside [0, 5)"),
    }
    for name, (text, fragment) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ArtifactError) as err:
            make_noisy_labels(clean, num_classes=5, cfg=file_cfg(tmp_path / name),
                              sample_ids=ids)
        assert fragment in str(err.value), (name, str(err.value))
    with pytest.raises(ArtifactError, match="needs the train sample ids"):
        make_noisy_labels(clean, num_classes=5, cfg=file_cfg(tmp_path / "missing.csv"))


def test_file_cifar10n_like_torch_dict(tmp_path):
    import torch
    rng = np.random.default_rng(0)
    human = {"clean_label": rng.integers(0, 10, 30), "worse_label": rng.integers(0, 10, 30),
             "aggre_label": rng.integers(0, 10, 30), "random_label1": rng.integers(0, 10, 30)}
    torch.save(human, tmp_path / "CIFAR-10_human.pt")
    clean = human["clean_label"]
    out = make_noisy_labels(clean, num_classes=10,
                            cfg=file_cfg(f"{tmp_path}/CIFAR-10_human.pt#worse_label"))
    np.testing.assert_array_equal(out, human["worse_label"])
    with pytest.raises(ArtifactError, match="keys: clean_label, worse_label"):
        make_noisy_labels(clean, num_classes=10, cfg=file_cfg(tmp_path / "CIFAR-10_human.pt"))
    with pytest.raises(ArtifactError, match="key 'nope' not in"):
        make_noisy_labels(clean, num_classes=10,
                          cfg=file_cfg(f"{tmp_path}/CIFAR-10_human.pt#nope"))


@pytest.mark.parametrize("suffix", [".npy", ".pkl", ".npz"])
def test_file_dict_formats_with_key(tmp_path, suffix):
    rng = np.random.default_rng(1)
    human = {"aggre_label": rng.integers(0, 10, 25), "random_label2": rng.integers(0, 10, 25)}
    path = tmp_path / f"human{suffix}"
    if suffix == ".npy":
        np.save(path, human, allow_pickle=True)
    elif suffix == ".pkl":
        path.write_bytes(pickle.dumps(human, protocol=2))
    else:
        np.savez(path, **human)
    out = make_noisy_labels(np.zeros(25, dtype=np.int64), num_classes=10,
                            cfg=file_cfg(f"{path}#random_label2"))
    np.testing.assert_array_equal(out, human["random_label2"])


class _Evil:
    """Unpickling this would call print: the loaders must refuse, never call it."""

    def __reduce__(self):
        return (print, ("pwned",))


@pytest.mark.parametrize("suffix", [".pkl", ".npy", ".pt"])
def test_file_refuses_code_in_pickles(tmp_path, capsys, suffix):
    path = tmp_path / f"evil{suffix}"
    payload = {"worse_label": _Evil()}
    if suffix == ".pkl":
        path.write_bytes(pickle.dumps(payload))
    elif suffix == ".npy":
        np.save(path, payload, allow_pickle=True)
    else:
        import torch
        torch.save(payload, path)
    with pytest.raises(ArtifactError, match=r"GLOBAL (builtins\.)?print|global builtins\.print"):
        make_noisy_labels(np.zeros(3, dtype=np.int64), num_classes=3,
                          cfg=file_cfg(f"{path}#worse_label"))
    assert "pwned" not in capsys.readouterr().out


def test_file_errors(tmp_path):
    clean = np.zeros(20, dtype=np.int64)
    np.save(tmp_path / "short.npy", np.zeros(19, dtype=np.int64))
    np.save(tmp_path / "range.npy", np.r_[np.zeros(19, dtype=np.int64), 10])
    np.save(tmp_path / "neg.npy", np.r_[-1, np.zeros(19, dtype=np.int64)])
    np.save(tmp_path / "float.npy", np.zeros(20, dtype=np.float32))
    np.save(tmp_path / "matrix.npy", np.zeros((20, 2), dtype=np.int64))
    (tmp_path / "labels.txt").write_text("0\n")
    cases = {
        "short.npy": "holds 19 labels but the train split has 20",
        "range.npy": "label 10 at row 19 is outside [0, 10)",
        "neg.npy": "label -1 at row 0 is outside [0, 10)",
        "float.npy": "dtype float32; expected integers",
        "matrix.npy": "shape (20, 2)",
        "labels.txt": "unsupported suffix '.txt'",
        "nowhere.npy": f"{tmp_path / 'nowhere.npy'} does not exist",
        "short.npy#worse_label": "holds a single array, not a dict",
    }
    for name, fragment in cases.items():
        with pytest.raises(ArtifactError) as err:
            make_noisy_labels(clean, num_classes=10, cfg=file_cfg(f"{tmp_path}/{name}"))
        message = str(err.value)
        assert fragment in message, (name, message)
        assert "\n" not in message
