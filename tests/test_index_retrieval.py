"""pipeline.index and pipeline.retrieval: FAISS search by sample id, self-exclusion by id
(duplicates included), neighbour-label statistics, and a synthetic noisy-label problem
with known ground truth."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import ArtifactError, ConfigError
from pipeline.index import (apply_search_params, build_index, load_index, normalized,
                            save_index, search)
from pipeline.retrieval import (BASELINE_MARGIN, candidate_labels, choose_k, choose_space,
                                falls_back_to_small_k, knn_vote, label_distribution,
                                neighbours_excluding_self, own_label_agreement, retry_k,
                                search_rows, vote_hits_by_k)


def random_vectors(n: int, d: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


def brute_force(x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    """Row positions of the k most cosine-similar rows of x for each query."""
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    return np.argsort(-(qn @ xn.T), axis=1, kind="stable")[:, :k]


class FakeIndex:
    """Stands in for a FAISS index: returns a fixed, crafted ranking."""

    def __init__(self, ids: np.ndarray, sims: np.ndarray, d: int = 4) -> None:
        self.ids, self.sims, self.d = ids, sims, d

    def search(self, q: np.ndarray, k: int):
        assert k == self.ids.shape[1]
        return self.sims[:len(q)], self.ids[:len(q)]


# --------------------------------------------------------------------------- index
def test_normalized_is_a_unit_float32_copy():
    x = np.array([[3.0, 4.0], [0.0, 2.0]])
    out = normalized(x)
    assert out.dtype == np.float32 and out.flags.c_contiguous
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 1.0]], rtol=1e-6)
    assert x[0, 0] == 3.0  # input untouched


def test_flat_search_returns_sample_ids_not_positions():
    x = random_vectors(50, 8)
    ids = np.arange(50, dtype=np.int64) * 10 + 7
    index = build_index(x, ids, factory="Flat")
    q = random_vectors(5, 8, seed=1)
    sims, got = search(index, q, 4)
    assert got.dtype == np.int64 and sims.dtype == np.float32
    np.testing.assert_array_equal(got, ids[brute_force(x, q, 4)])
    assert (np.diff(sims, axis=1) <= 1e-6).all()  # best first
    # cosine similarity, whatever the input scale
    sims2, got2 = search(index, q * 100.0, 4)
    np.testing.assert_array_equal(got2, got)
    np.testing.assert_allclose(sims2, sims, atol=1e-6)


def test_search_chunking_is_invariant():
    x = random_vectors(60, 6)
    index = build_index(x, np.arange(60), factory="Flat")
    q = random_vectors(23, 6, seed=3)
    s1, i1 = search(index, q, 5)
    s2, i2 = search(index, q, 5, chunk_rows=4)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(s1, s2)


def test_build_index_in_place_normalises_the_callers_array():
    x = random_vectors(40, 8) * 3.0
    q = random_vectors(4, 8, seed=2)
    ids = np.arange(40, dtype=np.int64)
    copy_index = build_index(x, ids, factory="Flat")
    buf = np.ascontiguousarray(x, dtype=np.float32)
    in_place = build_index(buf, ids, factory="Flat", in_place=True)
    np.testing.assert_allclose(np.linalg.norm(buf, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(search(in_place, q, 5)[1], search(copy_index, q, 5)[1])
    with pytest.raises(TypeError):
        build_index(x.astype(np.float64), ids, factory="Flat", in_place=True)


def anisotropic_vectors(n: int, seed: int = 0) -> np.ndarray:
    """(n, 8) float32 with an offset and very unequal coordinate scales: raw, centred and
    standardised cosine rank neighbours differently."""
    scale = np.array([40.0, 0.5, 1.0, 2.0, 0.1, 1.0, 3.0, 0.3], dtype=np.float32)
    return (random_vectors(n, 8, seed) * scale + 5.0).astype(np.float32)


@pytest.mark.parametrize("space", ["center", "standardize"])
def test_space_index_searches_raw_queries_in_its_space(space):
    x = anisotropic_vectors(200)
    ids = np.arange(200, dtype=np.int64) + 500
    q = anisotropic_vectors(25, seed=9)
    mean = x.mean(axis=0)
    # center: one pooled scale, which cosine ignores; standardize: per coordinate.
    std = x.std(axis=0) if space == "standardize" else np.float32(1.0)
    index = build_index(x, ids, factory="Flat", space=space)
    sims, got = search(index, q, 6)
    np.testing.assert_array_equal(got, ids[brute_force((x - mean) / std, (q - mean) / std, 6)])
    assert np.abs(sims).max() <= 1.0 + 1e-5  # cosine in that space
    # the raw space ranks these differently: the transform is really applied
    assert (search(build_index(x, ids, factory="Flat"), q, 6)[1] != got).any()
    # in place: the same index, and the caller's rows are left transformed
    buf = x.copy()
    np.testing.assert_array_equal(
        search(build_index(buf, ids, factory="Flat", space=space, in_place=True), q, 6)[1],
        got)
    assert not np.allclose(buf, x)


def test_space_index_survives_save_load_and_search_params(tmp_path):
    x = anisotropic_vectors(400)
    ids = np.arange(400, dtype=np.int64)
    q = anisotropic_vectors(20, seed=4)
    z = (x - x.mean(axis=0)) / x.std(axis=0)
    index = build_index(x, ids, factory="IVF4,Flat", space="standardize")
    save_index(index, tmp_path / "standardize.faiss")
    loaded = load_index(tmp_path / "standardize.faiss")
    apply_search_params(loaded, "nprobe=4")  # reaches the IVF inside the pre-transform
    _, got = search(loaded, q, 5)
    np.testing.assert_array_equal(got, ids[brute_force(z, (q - x.mean(axis=0))
                                                       / x.std(axis=0), 5)])


def test_unknown_space_is_config_error():
    with pytest.raises(ConfigError, match="index.spaces"):
        build_index(random_vectors(10, 4), np.arange(10), factory="Flat", space="whiten")


def test_choose_space_takes_another_space_only_when_clearly_better():
    spaces = ("raw", "center", "standardize")
    assert choose_space(spaces, [0.80, 0.90, 0.85]) == "center"
    assert choose_space(spaces, [0.80, 0.84, 0.85]) == "standardize"
    # within the margin of the first listed space: keep it
    assert choose_space(spaces, [0.80, 0.80 + BASELINE_MARGIN, 0.79]) == "raw"
    assert choose_space(spaces, [0.80, 0.80 + 2 * BASELINE_MARGIN, 0.79]) == "center"
    assert choose_space(("standardize", "raw"), [0.7, 0.9]) == "raw"
    assert choose_space(("raw",), [0.3]) == "raw"


def test_dimension_mismatch_is_artifact_error():
    index = build_index(random_vectors(10, 8), np.arange(10), factory="Flat")
    with pytest.raises(ArtifactError, match="dimension 6"):
        search(index, random_vectors(3, 6), 2)


@pytest.mark.parametrize("factory", ["Bogus77", "IVF,Flat,,", "HNSWx"])
def test_invalid_factory_is_config_error(factory):
    with pytest.raises(ConfigError, match="index.factory"):
        build_index(random_vectors(20, 8), np.arange(20), factory=factory)


def test_ivf_with_more_lists_than_vectors_is_config_error():
    with pytest.raises(ConfigError, match="lists"):
        build_index(random_vectors(20, 8), np.arange(20), factory="IVF64,Flat")


def test_ivf_builds_and_is_exact_with_full_probing():
    x = random_vectors(400, 8)
    ids = np.arange(400, dtype=np.int64) + 1000
    index = build_index(x, ids, factory="IVF4,Flat", seed=0)
    apply_search_params(index, "nprobe=4")
    q = random_vectors(20, 8, seed=5)
    _, got = search(index, q, 5)
    np.testing.assert_array_equal(got, ids[brute_force(x, q, 5)])


def test_hnsw_builds_and_searches():
    x = random_vectors(300, 8)
    ids = np.arange(300, dtype=np.int64)
    index = build_index(x, ids, factory="HNSW32")
    apply_search_params(index, "efSearch=128")
    q = random_vectors(30, 8, seed=6)
    _, got = search(index, q, 5)
    truth = brute_force(x, q, 5)
    recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(got, truth)])
    assert recall >= 0.95


def test_bad_search_params_is_config_error():
    index = build_index(random_vectors(20, 4), np.arange(20), factory="Flat")
    with pytest.raises(ConfigError, match="search_params"):
        apply_search_params(index, "nosuchparam=3")
    apply_search_params(index, "  ")  # empty: nothing to set, no error


def test_save_load_round_trip_and_determinism(tmp_path):
    x = random_vectors(40, 8)
    ids = np.arange(40, dtype=np.int64) * 3
    save_index(build_index(x, ids, factory="Flat"), tmp_path / "a.faiss")
    save_index(build_index(x, ids, factory="Flat"), tmp_path / "b.faiss")
    assert (tmp_path / "a.faiss").read_bytes() == (tmp_path / "b.faiss").read_bytes()
    loaded = load_index(tmp_path / "a.faiss")
    q = random_vectors(4, 8, seed=2)
    np.testing.assert_array_equal(search(loaded, q, 3)[1], ids[brute_force(x, q, 3)])


def test_load_index_errors(tmp_path):
    with pytest.raises(ArtifactError, match="missing FAISS index"):
        load_index(tmp_path / "none.faiss")
    junk = tmp_path / "junk.faiss"
    junk.write_bytes(b"not an index")
    with pytest.raises(ArtifactError, match="FAISS index at .* is damaged"):
        load_index(junk)


# --------------------------------------------------------------------------- self-exclusion
def test_self_excluded_wherever_it_ranks():
    # query ids 0, 1, 2, 3; own id ranked at columns 1, 0, 3, and absent
    ids = np.array([[7, 0, 3, 4],
                    [1, 5, 6, 8],
                    [9, 4, 5, 2],
                    [4, 5, 6, 7]], dtype=np.int64)
    sims = np.tile(np.array([0.9, 0.8, 0.7, 0.6], dtype=np.float32), (4, 1))
    got_ids, got_sims = neighbours_excluding_self(FakeIndex(ids, sims),
                                                  np.zeros((4, 4), np.float32),
                                                  np.array([0, 1, 2, 3]), k=3)
    np.testing.assert_array_equal(got_ids, [[7, 3, 4], [5, 6, 8], [9, 4, 5], [4, 5, 6]])
    np.testing.assert_allclose(got_sims, [[0.9, 0.7, 0.6], [0.8, 0.7, 0.6],
                                          [0.9, 0.8, 0.7], [0.9, 0.8, 0.7]])


def test_exact_duplicates_are_neighbours_but_self_is_not():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(30, 8)).astype(np.float32)
    x = base.copy()
    x[1] = x[0]  # an exact duplicate pair
    x[11] = x[10]
    x[12] = x[10]  # and a triple
    ids = np.arange(30, dtype=np.int64) + 100  # ids differ from positions
    index = build_index(x, ids, factory="Flat")
    got, sims = neighbours_excluding_self(index, x, ids, k=2)
    assert not (got == ids[:, None]).any()
    assert got[0, 0] == 101 and got[1, 0] == 100
    assert set(got[10]) == {111, 112}
    assert set(got[11]) == {110, 112}
    assert set(got[12]) == {110, 111}
    np.testing.assert_allclose(sims[[0, 1, 10, 11, 12], 0], 1.0, atol=1e-5)
    # among the duplicates faiss must have ranked some sample's own copy behind its twin
    # at least once, or the plain "drop column 0" rule would also pass: check it here
    _, raw = search(index, x, 3)
    dup_rows = [0, 1, 10, 11, 12]
    assert any(raw[r, 0] != ids[r] for r in dup_rows)


def test_queries_outside_the_index_keep_k_neighbours():
    x = random_vectors(40, 8)
    ids = np.arange(40, dtype=np.int64)
    index = build_index(x, ids, factory="Flat")
    q = random_vectors(6, 8, seed=9)
    q[0] = x[5]  # a test image identical to a train image: that train image is kept
    got, sims = neighbours_excluding_self(index, q, np.arange(6) + 1000, k=4)
    exp_sims, exp_ids = search(index, q, 4)
    np.testing.assert_array_equal(got, exp_ids)
    np.testing.assert_array_equal(sims, exp_sims)
    assert got[0, 0] == 5


def test_too_few_indexed_vectors_is_artifact_error():
    x = random_vectors(4, 8)
    index = build_index(x, np.arange(4), factory="Flat")
    with pytest.raises(ArtifactError, match="k\\+1"):
        neighbours_excluding_self(index, x, np.arange(4), k=4)
    got, _ = neighbours_excluding_self(index, x, np.arange(4), k=3)
    for i in range(4):
        assert sorted(got[i]) == sorted(set(range(4)) - {i})


# --------------------------------------------------------------------------- label statistics
def test_candidate_labels_layout():
    own = np.array([4, 1])
    nb = np.array([[0, 1, 2], [3, 3, 1]])
    cand = candidate_labels(own, nb)
    np.testing.assert_array_equal(cand, [[4, 0, 1, 2], [1, 3, 3, 1]])
    assert cand.shape == (2, 4)


def test_label_distribution_matches_counts():
    labels = np.array([[0, 0, 2, 1], [3, 3, 3, 3], [1, 2, 1, 0]])
    dist = label_distribution(labels, 4)
    assert dist.dtype == np.float32 and dist.shape == (3, 4)
    np.testing.assert_allclose(dist, [[0.5, 0.25, 0.25, 0], [0, 0, 0, 1],
                                      [0.25, 0.5, 0.25, 0]])
    rng = np.random.default_rng(0)
    many = rng.integers(0, 7, size=(100, 11))
    dist = label_distribution(many, 7)
    np.testing.assert_allclose(dist.sum(axis=1), 1.0, rtol=1e-6)
    counts = np.stack([np.bincount(r, minlength=7) for r in many]) / 11
    np.testing.assert_allclose(dist, counts, rtol=1e-6)


def test_own_label_agreement():
    cand = np.array([[2, 2, 1, 2], [0, 1, 1, 1], [3, 3, 3, 3]])
    agree = own_label_agreement(cand)
    assert agree.dtype == np.float32
    np.testing.assert_allclose(agree, [0.75, 0.25, 1.0])


def test_knn_vote_majority_beats_similarity():
    labels = np.array([[0, 0, 1], [2, 1, 1]])
    sims = np.array([[-1.0, -1.0, 1.0], [1.0, 0.1, 0.1]])
    np.testing.assert_array_equal(knn_vote(labels, sims, 3), [0, 1])


def test_knn_vote_ties_go_to_larger_summed_similarity():
    labels = np.array([[0, 1, 1, 0], [0, 1, 1, 0], [2, 2, 0, 0]])
    sims = np.array([[0.9, 0.8, 0.8, 0.1],   # 0: 1.0, 1: 1.6 -> 1
                     [0.9, 0.1, 0.1, 0.9],   # 0: 1.8, 1: 0.2 -> 0
                     [-0.5, -0.5, -0.2, -0.3]])  # 2: -1.0, 0: -0.5 -> 0
    np.testing.assert_array_equal(knn_vote(labels, sims, 3), [1, 0, 0])
    assert knn_vote(labels, sims, 3).dtype == np.int64


def test_knn_vote_extreme_k():
    k = 50
    labels = np.zeros((1, k), dtype=np.int64)
    labels[0, 25:] = 1
    labels[0, 0] = 1  # 26 votes for 1 with the smallest possible similarities
    sims = np.ones((1, k))
    sims[0, labels[0] == 1] = -1.0
    assert knn_vote(labels, sims, 2)[0] == 1


# --------------------------------------------------------------------------- ground truth
def test_retrieval_recovers_clean_labels_under_symmetric_noise():
    """Gaussian clusters, exactly 40 % of labels flipped uniformly to another class:
    the neighbour majority is far more often right than the observed label, and the
    neighbours' observed labels carry the injected noise rate."""
    rng = np.random.default_rng(0)
    c, d, per, k, rate = 5, 16, 120, 20, 0.4
    centers = rng.normal(size=(c, d)) * 3.0
    clean = np.repeat(np.arange(c), per)
    x = (centers[clean] + rng.normal(size=(len(clean), d))).astype(np.float32)
    n = len(clean)
    flip = rng.choice(n, size=int(round(rate * n)), replace=False)
    observed = clean.copy()
    observed[flip] = (clean[flip] + rng.integers(1, c, size=len(flip))) % c
    assert (observed != clean).mean() == pytest.approx(rate)

    # shuffle rows; ids are sample ids
    perm = rng.permutation(n)
    x, clean, observed = x[perm], clean[perm], observed[perm]
    ids = np.arange(n, dtype=np.int64)
    index = build_index(x, ids, factory="Flat")
    nb_ids, sims = neighbours_excluding_self(index, x, ids, k=k)
    assert not (nb_ids == ids[:, None]).any()
    nb_labels = observed[nb_ids]
    # the clean neighbourhood is pure: every neighbour shares the query's clean class
    assert (clean[nb_ids] == clean[:, None]).mean() > 0.99

    # Binomial(20, 0.6) against four Binomial(20, 0.1): majority right ~99.6 % of the time
    vote = knn_vote(nb_labels, sims, c)
    assert (observed == clean).mean() == pytest.approx(1 - rate)
    assert (vote == clean).mean() > 0.97

    cand = candidate_labels(observed, nb_labels)
    dist = label_distribution(cand, c)
    assert (dist.argmax(axis=1) == clean).mean() > 0.97
    # candidate mass on the clean class ~ 1 - rate (hub neighbours add some spread)
    assert dist[np.arange(n), clean].mean() == pytest.approx(1 - rate, abs=0.06)
    # symmetric noise: the wrong mass is spread over the other classes (~rate / (C-1)
    # each), not concentrated on one as a pair flip would be (~rate)
    trans = np.zeros((c, c))
    np.add.at(trans, (np.repeat(clean, k), nb_labels.ravel()), 1.0)
    trans /= trans.sum(axis=1, keepdims=True)
    assert trans[~np.eye(c, dtype=bool)].max() < 0.25
    assert (np.diag(trans) > 0.4).all()

    agree = own_label_agreement(cand)
    corrupted = observed != clean
    assert agree[corrupted].mean() < 0.2
    assert agree[~corrupted].mean() > 0.5


# --------------------------------------------------------------------------- k on validation
def test_vote_hits_by_k_counts_knn_vote_on_each_prefix_and_adds_over_chunks():
    rng = np.random.default_rng(3)
    m, kmax, c, ks = 300, 40, 4, (1, 5, 10, 40)
    labels = rng.integers(0, c, size=(m, kmax))
    sims = -np.sort(-rng.random((m, kmax)), axis=1).astype(np.float32)
    truth = rng.integers(0, c, size=m)
    hits = vote_hits_by_k(labels, sims, truth, ks, c)
    expected = [int((knn_vote(labels[:, :k], sims[:, :k], c) == truth).sum()) for k in ks]
    assert hits.tolist() == expected
    halves = (vote_hits_by_k(labels[:120], sims[:120], truth[:120], ks, c)
              + vote_hits_by_k(labels[120:], sims[120:], truth[120:], ks, c))
    assert halves.tolist() == expected


def test_choose_k_takes_the_most_hits_and_the_smallest_k_on_ties():
    assert choose_k((10, 20, 50), np.array([5, 9, 7])) == 20
    assert choose_k((10, 20, 50), np.array([9, 9, 7])) == 10
    assert choose_k((10, 20, 50), np.array([1, 9, 9])) == 20


def test_choose_k_finds_a_wide_k_when_the_noise_is_local():
    """PMD-like noise: each class cluster has 4 sub-clusters, and 70 % of a sub-cluster's
    labels are flipped to one class of its own. The 10 nearest neighbours share the
    sub-cluster, so their vote returns the flip; a vote over the whole cluster returns
    the class (30 % against 17.5 % for each flip). Choosing k on validation rows finds
    the wide k, and its vote on held-out rows beats k = 10's by far."""
    rng = np.random.default_rng(0)
    c, subs, per, d = 5, 4, 60, 16
    centres = rng.normal(size=(c, d)) * 12.0
    offsets = rng.normal(size=(c, subs, d)) * 2.0
    clean = np.repeat(np.arange(c), subs * per)
    sub = np.tile(np.repeat(np.arange(subs), per), c)
    x = (centres[clean] + offsets[clean, sub] + rng.normal(size=(len(clean), d)) * 0.5)
    flip_to = (clean + 1 + sub) % c  # each sub-cluster's own wrong class
    observed = np.where(rng.random(len(clean)) < 0.7, flip_to, clean)
    order = rng.permutation(len(clean))
    x, clean, observed = x[order].astype(np.float32), clean[order], observed[order]
    train, val, test = np.arange(800), np.arange(800, 1000), np.arange(1000, 1200)
    index = build_index(x[train], train.astype(np.int64), factory="Flat")
    ks = (10, 20, 50, 100, 200)

    def hits(rows: np.ndarray) -> np.ndarray:
        ids, sims = neighbours_excluding_self(index, x[rows], rows, k=max(ks))
        return vote_hits_by_k(observed[ids], sims, clean[rows], ks, c)

    val_hits, test_hits = hits(val), hits(test)
    assert val_hits[0] / len(val) < 0.5  # k = 10 votes for the flips
    k = choose_k(ks, val_hits)
    assert k >= 100
    assert test_hits[ks.index(k)] / len(test) > test_hits[0] / len(test) + 0.3


def test_search_rows_streams_only_the_masked_rows_in_order():
    x = random_vectors(300, 8, seed=3)
    index = build_index(x[:200], np.arange(200), factory="Flat")
    mask = np.zeros(300, dtype=bool)
    mask[[0, 5, 150, 199, 230, 299]] = True
    chunks = [(s, x[s:s + 64]) for s in range(0, 300, 64)]
    seen = []
    rows, ids, sims = search_rows(index, chunks, np.arange(300), mask, k=4,
                                  on_rows=seen.append)
    np.testing.assert_array_equal(rows, [0, 5, 150, 199, 230, 299])
    want_ids, want_sims = neighbours_excluding_self(index, x[rows], rows, k=4)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(sims, want_sims)
    assert sum(seen) == 6 and 0 not in seen  # chunks without masked rows are skipped
    assert not (ids == rows[:, None]).any()  # self excluded for the indexed rows


SELECTION = {"choices": [10, 20, 50], "validation_vote_accuracy": [0.40, 0.55, 0.50]}


@pytest.mark.parametrize("trained_k, val_accuracy, expected", [
    (10, 0.39, 20),    # the k = 20 vote beats the k = 10 model: retry there
    (50, 0.39, 20),    # from any other k
    (20, 0.39, None),  # already trained at the vote's best k
    (10, 0.55, None),  # level with the vote
    (10, 0.55 - BASELINE_MARGIN + 1e-4, None),  # within the margin counts as level
    (10, 0.55 - BASELINE_MARGIN - 1e-4, 20),
    (10, 0.90, None),  # the model is far above every vote
])
def test_retry_k_only_when_the_best_vote_beats_the_model(trained_k, val_accuracy, expected):
    assert retry_k(SELECTION, trained_k=trained_k, val_accuracy=val_accuracy) == expected


def test_retry_k_without_a_validation_vote_never_retries():
    assert retry_k(None, trained_k=10, val_accuracy=0.0) is None
    assert retry_k({}, trained_k=10, val_accuracy=0.0) is None


@pytest.mark.parametrize(("model", "probe", "trained_k", "expected"), [
    (0.80, 0.90, 10, True),      # the probe clearly ahead: retry at k = 1
    (0.80, 0.805, 10, False),    # within the half-point margin: level
    (0.90, 0.80, 10, False),     # the model ahead
    (0.80, 0.90, 1, False),      # already trained at k = 1
    (0.80, None, 10, False),     # no probe fitted
])
def test_falls_back_to_small_k_only_when_the_probe_beats_the_model(model, probe, trained_k,
                                                                   expected):
    assert falls_back_to_small_k(model_val_accuracy=model, probe_val_accuracy=probe,
                                 trained_k=trained_k) is expected
