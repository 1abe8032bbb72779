"""pipeline.model, pipeline.training and pipeline.inference: network shapes and
initialisation, the learning-rate schedule, target drawing, training on a small synthetic
noisy-label problem with known ground truth, and batched inference."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from pipeline.config import TrainConfig
from pipeline.diffusion import (alphas_cumprod, cosine_betas, ddim_sample, ddim_timesteps,
                                readout)
from pipeline.features import FeatureNormalizer
from pipeline.errors import ArtifactError, ConfigError
from pipeline import inference
from pipeline.inference import predict_scores, start_noise, stochastic_vote
from pipeline.model import ConditionalLinear, DiffusionClassifier, ModelSpec
from pipeline.retrieval import candidate_labels
from pipeline.training import (CLASS_BALANCE_AUTO_RATIO, TrainData, class_balance_weights,
                               class_imbalance, clip_gradients_, draw_targets, learning_rate,
                               model_spec, resolve_class_balance, train_diffusion)


def spec(projection: str = "linear", **kw) -> ModelSpec:
    base = dict(num_classes=4, feature_dim_in=12, hidden=16, timesteps=50,
                projection=projection)
    return ModelSpec(**{**base, **kw})


# --------------------------------------------------------------------------- model
@pytest.mark.parametrize("projection", ["linear", "mlp"])
def test_output_shape_and_projection(projection):
    torch.manual_seed(0)
    model = DiffusionClassifier(spec(projection))
    y = torch.randn(5, 4)
    t = torch.tensor([0, 1, 10, 49, 50])  # T + 1 rows: index T is valid
    out = model(y, t, torch.randn(5, 12))
    assert out.shape == (5, 4) and out.dtype == torch.float32
    linears = [m for m in model.embed_x.modules() if isinstance(m, nn.Linear)]
    if projection == "linear":
        assert isinstance(model.embed_x, nn.Linear)
        assert [(m.in_features, m.out_features) for m in linears] == [(12, 16)]
    else:
        assert [(m.in_features, m.out_features) for m in linears] == [(12, 16), (16, 16)]


def test_unknown_projection():
    with pytest.raises(ValueError, match="linear, mlp"):
        DiffusionClassifier(spec("conv"))


def test_gamma_tables_init_and_size():
    torch.manual_seed(0)
    card = DiffusionClassifier(spec(timesteps=200, hidden=32, init="card"))
    ident = DiffusionClassifier(spec(timesteps=200, hidden=32))
    assert card.lin1.linear.in_features == 4 + 12  # concat[y_t, features]
    for layer in [card.lin1, card.lin2, card.lin3]:
        w = layer.gamma.weight
        assert w.shape == (201, 32)
        assert w.min().item() >= 0.0 and w.max().item() < 1.0
        assert abs(w.mean().item() - 0.5) < 0.05  # uniform, not constant
        assert abs(w.std().item() - 1 / math.sqrt(12)) < 0.03
    for layer in [ident.lin1, ident.lin2, ident.lin3]:
        assert torch.equal(layer.gamma.weight, torch.ones(201, 32))


def test_identity_init_starts_with_unit_modulation():
    """x_emb = 1 and no timestep dependence before training (train.init: identity)."""
    torch.manual_seed(0)
    model = DiffusionClassifier(spec()).train()
    f = torch.randn(8, 12)
    x_emb, _ = model.condition(f)
    assert torch.allclose(x_emb, torch.ones_like(x_emb))
    y = torch.randn(8, 4)
    with torch.no_grad():
        a = model(y, torch.full((8,), 5), f)
        b = model(y, torch.full((8,), 40), f)
    assert torch.allclose(a, b)


def test_conditional_linear_scales_by_gamma_row():
    torch.manual_seed(0)
    layer = ConditionalLinear(3, 5, timesteps=10)
    x = torch.randn(4, 3)
    t = torch.tensor([0, 3, 3, 10])
    out = layer(x, t)
    np.testing.assert_allclose(out.detach().numpy(),
                               (layer.linear(x) * layer.gamma.weight[t]).detach().numpy(),
                               rtol=1e-6)


def test_output_depends_on_timestep_and_features():
    torch.manual_seed(0)
    model = DiffusionClassifier(spec(init="card")).eval()
    y, f = torch.randn(3, 4), torch.randn(3, 12)
    with torch.no_grad():
        a = model(y, torch.full((3,), 5), f)
        b = model(y, torch.full((3,), 40), f)
        c = model(y, torch.full((3,), 5), f + 1.0)
        a2 = model(y, torch.full((3,), 5), f)
    assert not torch.allclose(a, b) and not torch.allclose(a, c)
    assert torch.equal(a, a2)


@pytest.mark.parametrize("projection", ["linear", "mlp"])
def test_flops_per_sample_counts_linear_weights(projection):
    model = DiffusionClassifier(spec(projection, num_classes=10, feature_dim_in=768,
                                     hidden=512, timesteps=10))
    weights = sum(m.in_features * m.out_features for m in model.modules()
                  if isinstance(m, nn.Linear))
    assert model.flops_per_sample() == 2 * weights
    c, d, h = 10, 768, 512
    proj = d * h + (h * h if projection == "mlp" else 0)
    assert model.flops_per_sample() == 2 * (proj + (c + d) * h + 2 * h * h + h * c)


def test_spec_round_trip_rebuilds_the_network():
    s = spec("mlp")
    torch.manual_seed(0)
    a = DiffusionClassifier(s).eval()
    b = DiffusionClassifier(ModelSpec(**s.to_dict())).eval()
    b.load_state_dict(a.state_dict())
    y, t, f = torch.randn(2, 4), torch.tensor([3, 7]), torch.randn(2, 12)
    with torch.no_grad():
        assert torch.equal(a(y, t, f), b(y, t, f))


# --------------------------------------------------------------------------- learning rate
def test_learning_rate_schedule():
    cfg = TrainConfig(epochs=10, warmup_epochs=2, lr=1e-3)
    assert learning_rate(0, cfg) == 0.0
    assert learning_rate(1, cfg) == pytest.approx(5e-4)
    assert learning_rate(2, cfg) == pytest.approx(1e-3)  # peak at the end of warm-up
    assert learning_rate(6, cfg) == pytest.approx(5e-4)  # half-cosine midpoint
    assert learning_rate(4, cfg) == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert learning_rate(10, cfg) == pytest.approx(0.0, abs=1e-15)
    assert learning_rate(12, cfg) == pytest.approx(0.0, abs=1e-15)
    grid = [learning_rate(e / 10, cfg) for e in range(0, 101)]
    peak = grid.index(max(grid))
    assert peak == 20
    assert all(a <= b for a, b in zip(grid[:peak], grid[1:peak + 1]))
    assert all(a >= b for a, b in zip(grid[peak:], grid[peak + 1:]))


def test_learning_rate_without_warmup():
    cfg = TrainConfig(epochs=4, warmup_epochs=0, lr=2e-3)
    assert learning_rate(0, cfg) == pytest.approx(2e-3)
    assert learning_rate(2, cfg) == pytest.approx(1e-3)
    assert learning_rate(4, cfg) == pytest.approx(0.0, abs=1e-15)


# --------------------------------------------------------------------------- targets
def test_draw_targets_labels_weights_and_counts():
    cand = torch.tensor([[2, 2, 2, 2], [0, 1, 2, 3], [1, 1, 3, 3], [0, 0, 0, 5]])
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        labels, w = draw_targets(cand, generator=gen, uniform=False)
        assert labels.dtype == torch.int64 and labels.shape == (4,)
        assert all(labels[i].item() in cand[i].tolist() for i in range(4))
        n = (cand == labels[:, None]).sum(dim=1).float()
        assert labels[0].item() == 2 and n[0].item() == 4 and n[1].item() == 1
        assert n[2].item() == 2
        np.testing.assert_allclose(w.numpy(), (n / n.sum()).numpy(), rtol=1e-6)
        assert w.sum().item() == pytest.approx(1.0)
        assert w.dtype == torch.float32


def test_draw_targets_uniform_weights():
    cand = torch.tensor([[2, 2, 2], [0, 1, 2], [1, 1, 0]])
    labels, w = draw_targets(cand, generator=torch.Generator().manual_seed(0), uniform=True)
    np.testing.assert_allclose(w.numpy(), [1 / 3] * 3, rtol=1e-6)
    assert all(labels[i].item() in cand[i].tolist() for i in range(3))


def test_draws_are_uniform_over_the_k_plus_one_slots():
    """Slot-uniform, not class-uniform: a label that fills 2 of 3 slots is drawn 2/3 of
    the time. Checked with a chi-square bound on 30,000 draws."""
    m, b = 11, 30_000
    cand = torch.arange(m).repeat(b, 1)  # every slot a distinct label
    labels, _ = draw_targets(cand, generator=torch.Generator().manual_seed(1), uniform=False)
    counts = np.bincount(labels.numpy(), minlength=m)
    expected = b / m
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 35.0  # 10 dof: P(chi2 > 35) ~ 1e-4
    cand = torch.tensor([[3, 3, 5]]).repeat(b, 1)
    labels, w = draw_targets(cand, generator=torch.Generator().manual_seed(2), uniform=False)
    share = (labels == 3).float().mean().item()
    assert share == pytest.approx(2 / 3, abs=0.01)
    # agreement weights: label 3 has n = 2, label 5 has n = 1
    ratio = (w[labels == 3].mean() / w[labels == 5].mean()).item()
    assert ratio == pytest.approx(2.0, rel=1e-5)


def test_draw_targets_is_deterministic_per_generator():
    cand = torch.randint(0, 10, (50, 6), generator=torch.Generator().manual_seed(0))
    a = draw_targets(cand, generator=torch.Generator().manual_seed(5), uniform=False)
    b = draw_targets(cand, generator=torch.Generator().manual_seed(5), uniform=False)
    c = draw_targets(cand, generator=torch.Generator().manual_seed(6), uniform=False)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])

def test_class_balance_weights_give_every_class_the_same_total_weight():
    cand = torch.tensor([[0, 0, 1], [0, 0, 0], [1, 0, 3]])  # counts 6, 2, 0, 1 over C = 4
    w = class_balance_weights(cand, 4)
    assert w.dtype == torch.float32
    np.testing.assert_allclose(w.numpy(), [9 / 24, 9 / 8, 9 / 4, 9 / 4], rtol=1e-6)
    counts = torch.tensor([6.0, 2.0, 0.0, 1.0])
    total = counts * w  # what each class weighs in all: the same where it occurs
    np.testing.assert_allclose(total[[0, 1, 3]].numpy(), [9 / 4] * 3, rtol=1e-6)
    balanced = torch.arange(4).repeat(5, 2)  # every class equally often: weights exactly 1
    assert torch.equal(class_balance_weights(balanced, 4), torch.ones(4))


def test_class_balance_auto_switches_to_inverse_at_the_ratio():
    assert resolve_class_balance("auto", CLASS_BALANCE_AUTO_RATIO) == "inverse"
    assert resolve_class_balance("auto", CLASS_BALANCE_AUTO_RATIO - 1e-6) == "none"
    assert resolve_class_balance("none", 50.0) == "none"  # explicit choices stand
    assert resolve_class_balance("inverse", 1.0) == "inverse"


def test_draw_targets_class_weights_reweight_without_changing_the_draws():
    cand = torch.tensor([[2, 2, 0], [0, 1, 2], [1, 1, 1], [0, 0, 0]])
    cw = torch.tensor([0.5, 2.0, 1.0])
    plain = draw_targets(cand, generator=torch.Generator().manual_seed(3), uniform=False)
    weighted = draw_targets(cand, generator=torch.Generator().manual_seed(3), uniform=False,
                            class_weights=cw)
    assert torch.equal(plain[0], weighted[0])
    n = (cand == plain[0][:, None]).sum(dim=1).float()
    expected = n * cw[plain[0]]
    np.testing.assert_allclose(weighted[1].numpy(), (expected / expected.sum()).numpy(),
                               rtol=1e-6)
    labels, w = draw_targets(cand, generator=torch.Generator().manual_seed(3), uniform=True,
                             class_weights=cw)
    np.testing.assert_allclose(w.numpy(), (cw[labels] / cw[labels].sum()).numpy(), rtol=1e-6)


# --------------------------------------------------------------------------- training
def noisy_clusters(seed: int = 0, *, n: int = 300, n_val: int = 90, c: int = 3, d: int = 16,
                   rate: float = 0.3, k: int = 10):
    """3 Gaussian clusters, exactly `rate` symmetric noise on the train labels, candidates
    from each sample's true k nearest neighbours (self excluded), features standardised
    with train statistics. Returns (TrainData, clean train labels, observed labels)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(c, d)) * 2.5
    y = np.arange(n + n_val) % c
    x = (centers[y] + rng.normal(size=(n + n_val, d))).astype(np.float32)
    clean = y[:n]
    observed = clean.copy()
    flip = rng.choice(n, size=int(round(rate * n)), replace=False)
    observed[flip] = (clean[flip] + rng.integers(1, c, size=len(flip))) % c
    xt = x[:n]
    xn = xt / np.linalg.norm(xt, axis=1, keepdims=True)
    sim = xn @ xn.T
    np.fill_diagonal(sim, -np.inf)
    nb = np.argsort(-sim, axis=1)[:, :k]
    cand = candidate_labels(observed, observed[nb])
    norm = FeatureNormalizer.fit(xt, "standardize")
    data = TrainData(features=torch.tensor(norm.apply(xt)), candidates=torch.tensor(cand),
                     val_features=torch.tensor(norm.apply(x[n:])),
                     val_labels=torch.tensor(y[n:]), num_classes=c)
    return data, clean, observed


@pytest.fixture(scope="module")
def trained():
    """One 20-epoch run (380 Adam steps, ~2 s of CPU); its seed reaches ~0.98 and the
    best over seeds 0-4 of problem and training was >= 0.91 when this was written."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data, clean, observed = noisy_clusters(0)
        cfg = TrainConfig(seed=0, epochs=20, warmup_epochs=1, batch_size=16, lr=1e-2,
                          feature_dim=64, timesteps=1000, ddim_steps=10, eval_every=1)
        result = train_diffusion(data, cfg, progress=False)
    finally:
        torch.set_num_threads(before)
    return data, clean, observed, cfg, result


def test_problem_is_as_constructed(trained):
    data, clean, observed, _, _ = trained
    assert (observed != clean).mean() == pytest.approx(0.3)
    # the retrieved candidates carry the clean label more often than the observed one
    cand = data.candidates.numpy()
    assert (cand == clean[:, None]).mean() > 0.68
    majority = np.array([np.bincount(r, minlength=3).argmax() for r in cand])
    assert (majority == clean).mean() > 0.95


def test_training_reaches_high_val_accuracy(trained):
    data, _, _, cfg, result = trained
    best = result.best
    # noisy train labels are 70 % right; the classifier is far better on clean val labels
    assert best["val_accuracy"] >= 0.85
    assert set(best) == {"epoch", "weights", "readout", "val_accuracy"}
    assert 1 <= best["epoch"] <= cfg.epochs
    assert best["weights"] in ("raw", "ema")
    assert best["readout"] in ("nearest_one", "argmax")
    # the loss went down
    assert result.history[-1]["loss"] < result.history[0]["loss"]


def test_history_rows_and_best_is_their_maximum(trained):
    _, _, _, cfg, result = trained
    h = result.history
    assert [row["epoch"] for row in h] == list(range(1, cfg.epochs + 1))
    assert set(h[0]) == {"epoch", "loss", "lr", "val_accuracy", "val_accuracy_ema"}
    assert all(math.isfinite(row["loss"]) for row in h)
    assert h[-1]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert h[0]["lr"] == pytest.approx(learning_rate(1, cfg))
    top = max(max(row["val_accuracy"], row["val_accuracy_ema"]) for row in h)
    assert result.best["val_accuracy"] == pytest.approx(top)
    row = h[result.best["epoch"] - 1]
    key = "val_accuracy" if result.best["weights"] == "raw" else "val_accuracy_ema"
    assert row[key] == pytest.approx(result.best["val_accuracy"])


def test_best_state_dict_reproduces_best_accuracy(trained):
    data, _, _, cfg, result = trained
    assert result.spec == ModelSpec(num_classes=3, feature_dim_in=16, hidden=64,
                                    timesteps=1000, projection="linear")
    assert all(v.device.type == "cpu" for v in result.state_dict.values())
    model = DiffusionClassifier(result.spec)
    model.load_state_dict(result.state_dict)
    abar = alphas_cumprod(cosine_betas(cfg.timesteps)).float()
    scores = predict_scores(model, data.val_features, abar=abar,
                            timesteps=ddim_timesteps(cfg.timesteps, cfg.ddim_steps),
                            num_classes=3)
    acc = (readout(scores, result.best["readout"]) == data.val_labels).float().mean().item()
    assert acc == pytest.approx(result.best["val_accuracy"])


def _small_cfg(**kw) -> TrainConfig:
    base = dict(seed=3, epochs=3, warmup_epochs=1, batch_size=32, lr=1e-2, feature_dim=8,
                timesteps=20, ddim_steps=4, eval_every=2)
    return TrainConfig(**{**base, **kw})


def test_training_is_deterministic_for_a_seed():
    data, _, _ = noisy_clusters(1, n=120, n_val=30)
    a = train_diffusion(data, _small_cfg(), progress=False)
    b = train_diffusion(data, _small_cfg(), progress=False)
    assert a.state_dict.keys() == b.state_dict.keys()
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)
    assert a.history == b.history and a.best == b.best
    # eval_every=2 over 3 epochs: epochs 2 and 3 (the last) are evaluated
    assert [row["val_accuracy"] is None for row in a.history] == [True, False, False]
    assert [row["val_accuracy_ema"] is None for row in a.history] == [True, False, False]
    c = train_diffusion(data, _small_cfg(seed=4), progress=False)
    assert any(not torch.equal(a.state_dict[k], c.state_dict[k]) for k in a.state_dict)
    u = train_diffusion(data, _small_cfg(weighting="uniform", readout="argmax"),
                        progress=False)
    assert u.best["readout"] == "argmax"
    assert u.history[0]["loss"] != a.history[0]["loss"]


def test_class_balance_inverse_is_wired_and_exact_on_balanced_candidates():
    """train.class_balance: "inverse" changes training where the candidate labels are
    imbalanced, and is bit-identical to "none" where every class is equally frequent
    (its weights are then exactly 1)."""
    data, _, _ = noisy_clusters(1, n=120, n_val=30)
    none = train_diffusion(data, _small_cfg(class_balance="none"), progress=False)
    inverse = train_diffusion(data, _small_cfg(class_balance="inverse"), progress=False)
    assert inverse.history[0]["loss"] != none.history[0]["loss"]
    balanced = dataclasses.replace(data, candidates=torch.arange(3).repeat(120, 4))  # (N, 12)
    assert torch.equal(class_balance_weights(balanced.candidates, 3), torch.ones(3))
    a = train_diffusion(balanced, _small_cfg(class_balance="none"), progress=False)
    b = train_diffusion(balanced, _small_cfg(class_balance="inverse"), progress=False)
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)
    assert a.history == b.history
    # "auto" is exactly "inverse" on imbalanced candidates and "none" on balanced ones.
    skewed = dataclasses.replace(data, candidates=data.candidates.clone())
    skewed.candidates[:60] = 0  # half the rows vote class 0 only
    assert class_imbalance(skewed.candidates, 3) >= CLASS_BALANCE_AUTO_RATIO
    assert train_diffusion(skewed, _small_cfg(class_balance="auto"), progress=False).history \
        == train_diffusion(skewed, _small_cfg(class_balance="inverse"), progress=False).history
    assert train_diffusion(balanced, _small_cfg(class_balance="auto"),
                           progress=False).history == a.history


@pytest.mark.parametrize("scale", [1e-3, 10.0])  # under the clip norm, and over it
def test_clip_gradients_equals_torch_bit_for_bit(scale):
    gen = torch.Generator().manual_seed(0)
    shapes = [(21, 8), (8,), (8, 8), (3, 8)]
    ours = [nn.Parameter(torch.zeros(s)) for s in shapes]
    ref = [nn.Parameter(torch.zeros(s)) for s in shapes]
    for a, b in zip(ours, ref):
        a.grad = torch.randn(a.shape, generator=gen) * scale
        b.grad = a.grad.clone()
    before = [p.grad.clone() for p in ours]
    clip_gradients_(ours, 1.0)
    total = nn.utils.clip_grad_norm_(ref, 1.0, foreach=True)
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(ours, ref))
    changed = any(not torch.equal(a.grad, b) for a, b in zip(ours, before))
    assert changed == (total.item() > 1.0)  # clipped exactly when torch clips
    if changed:
        norm = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in ours]))
        assert norm.item() == pytest.approx(1.0, rel=1e-5)


def test_epoch_callback_sees_every_history_row():
    data, _, _ = noisy_clusters(1, n=60, n_val=20)
    seen: list[dict] = []
    result = train_diffusion(data, _small_cfg(), progress=False, on_epoch_end=seen.append)
    assert seen == result.history and len(seen) == 3


def test_batch_larger_than_train_split():
    data, _, _ = noisy_clusters(2, n=10, n_val=6)
    result = train_diffusion(data, _small_cfg(batch_size=64, epochs=2, eval_every=1,
                                              projection="mlp"), progress=False)
    assert len(result.history) == 2
    assert result.best["epoch"] in (1, 2)
    assert result.state_dict


def test_too_few_samples_per_batch():
    data, _, _ = noisy_clusters(2, n=10, n_val=6)
    tiny = TrainData(data.features[:1], data.candidates[:1], data.val_features,
                     data.val_labels, 3)
    with pytest.raises(ArtifactError, match="at least 2"):
        train_diffusion(tiny, _small_cfg(), progress=False)
    three = TrainData(data.features[:3], data.candidates[:3], data.val_features,
                      data.val_labels, 3)
    with pytest.raises(ConfigError, match="train.batch_size: 2 splits the 3 train rows"):
        train_diffusion(three, _small_cfg(batch_size=2), progress=False)


# --------------------------------------------------------------------------- inference
class OracleEps(nn.Module):
    """eps that is exactly consistent with y0 = one-hot(features[:, 0])."""

    def __init__(self, abar: torch.Tensor, num_classes: int) -> None:
        super().__init__()
        self.abar, self.c = abar, num_classes

    def forward(self, y, t, features):
        y0 = nn.functional.one_hot(features[:, 0].long(), self.c).float()
        a = self.abar[t].unsqueeze(1)
        return (y - a.sqrt() * y0) / (1 - a).sqrt()


def test_predict_scores_chunking_invariance_and_mode_restored():
    torch.manual_seed(0)
    model = DiffusionClassifier(spec(timesteps=100))
    # put some non-trivial statistics into the BatchNorm running buffers
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(32, 4), torch.randint(0, 100, (32,)), torch.randn(32, 12) + 1)
    abar = alphas_cumprod(cosine_betas(100)).float()
    steps = ddim_timesteps(100, 5)
    feats = torch.randn(23, 12)
    whole = predict_scores(model, feats, abar=abar, timesteps=steps, num_classes=4)
    chunked = predict_scores(model, feats, abar=abar, timesteps=steps, num_classes=4,
                             chunk_rows=5)
    assert whole.shape == (23, 4)
    np.testing.assert_allclose(chunked.numpy(), whole.numpy(), rtol=1e-5, atol=1e-6)
    assert model.training  # restored
    empty = predict_scores(model, feats[:0], abar=abar, timesteps=steps, num_classes=4)
    assert empty.shape == (0, 4)


def test_stochastic_vote_with_oracle_is_certain():
    abar = alphas_cumprod(cosine_betas(1000)).float()
    target = torch.tensor([2, 0, 1, 1, 2, 0, 0])
    feats = torch.stack([target.float(), torch.randn(7)], dim=1)
    vote, conf = stochastic_vote(OracleEps(abar, 3), feats, abar=abar,
                                 timesteps=ddim_timesteps(1000, 10), num_classes=3,
                                 samples=5, rule="nearest_one", chunk_rows=10)
    assert vote.tolist() == target.tolist()
    assert conf.tolist() == [1.0] * 7


def test_stochastic_vote_shapes_range_and_determinism():
    torch.manual_seed(0)
    model = DiffusionClassifier(spec(timesteps=100))
    abar = alphas_cumprod(cosine_betas(100)).float()
    steps = ddim_timesteps(100, 5)
    feats = torch.randn(9, 12)
    kw = dict(abar=abar, timesteps=steps, num_classes=4, samples=6, rule="argmax")
    vote, conf = stochastic_vote(model, feats, seed=1, **kw)
    assert vote.shape == (9,) and vote.dtype == torch.int64
    assert conf.shape == (9,) and conf.dtype == torch.float32
    assert ((vote >= 0) & (vote < 4)).all()
    c = conf.numpy()
    assert ((c >= 2 / 6 - 1e-6) & (c <= 1.0)).all()  # a plurality of 6 votes, 4 classes
    np.testing.assert_allclose(c * 6, np.round(c * 6), atol=1e-6)  # multiples of 1/6
    vote2, conf2 = stochastic_vote(model, feats, seed=1, **kw)
    assert torch.equal(vote, vote2) and torch.equal(conf, conf2)
    # the vote is the most frequent per-sample decision: recompute it by hand
    rep = feats.repeat_interleave(6, dim=0)
    y_start = start_noise(0, 9, samples=6, num_classes=4, seed=1, device="cpu")
    y0 = ddim_sample(model.eval(), rep, abar=abar, timesteps=steps, num_classes=4,
                     y_start=y_start)
    decided = readout(y0, "argmax").view(9, 6)
    counts = torch.stack([torch.bincount(r, minlength=4) for r in decided])
    assert torch.equal(counts.max(dim=1).values.float() / 6, conf)
    assert (counts.gather(1, vote[:, None]).squeeze(1) == counts.max(dim=1).values).all()
    assert not torch.equal(start_noise(0, 9, samples=6, num_classes=4, seed=2, device="cpu"),
                           y_start)


def test_start_noise_does_not_depend_on_chunking(monkeypatch):
    """A row's starting draws are the same whatever chunk it is scored in, so the vote
    does not change with --chunk-rows."""
    monkeypatch.setattr(inference, "NOISE_BLOCK_ROWS", 4)
    whole = start_noise(0, 11, samples=3, num_classes=2, seed=5, device="cpu")  # (33, 2)
    assert whole.shape == (33, 2)
    parts = torch.cat([start_noise(a, b - a, samples=3, num_classes=2, seed=5, device="cpu")
                       for a, b in [(0, 3), (3, 9), (9, 11)]])
    assert torch.equal(whole, parts)
    assert len(torch.unique(whole)) == whole.numel()  # no block repeats another's draws
    # A cache shared across consecutive chunks gives the same draws, each block drawn once.
    blocks: dict = {}
    cached = torch.cat([start_noise(a, b - a, samples=3, num_classes=2, seed=5,
                                    device="cpu", blocks=blocks)
                        for a, b in [(0, 3), (3, 5), (5, 9), (9, 11)]])
    assert torch.equal(whole, cached)
    assert sorted(blocks) == [2]  # blocks before the last chunk's first are dropped

    torch.manual_seed(0)
    model = DiffusionClassifier(spec(timesteps=100))
    abar = alphas_cumprod(cosine_betas(100)).float()
    kw = dict(abar=abar, timesteps=ddim_timesteps(100, 5), num_classes=4, samples=5,
              rule="argmax", seed=3)
    feats = torch.randn(13, 12)
    vote, conf = stochastic_vote(model, feats, chunk_rows=10, **kw)
    pieces = [stochastic_vote(model, feats[a:b], first_row=a, chunk_rows=15, **kw)
              for a, b in [(0, 5), (5, 13)]]
    assert torch.equal(vote, torch.cat([v for v, _ in pieces]))
    assert torch.equal(conf, torch.cat([c for _, c in pieces]))


def test_conditioning_once_matches_the_whole_forward_pass():
    """ddim_sample computes the features-only part once per image; the trajectory is the
    one a model run whole at every step gives (up to float rounding)."""
    torch.manual_seed(0)
    model = DiffusionClassifier(spec(timesteps=100)).eval()
    feats, y = torch.randn(7, 12), torch.randn(7, 4)
    t = torch.randint(0, 101, (7,))
    # The first layer as written in the paper: one product of the concatenation.
    lin1 = model.lin1.linear(torch.cat([y, feats], dim=1)) * model.lin1.gamma(t)
    x_emb, f_term = model.condition(feats)
    c = model.spec.num_classes
    split = (y @ model.lin1.linear.weight[:, :c].T + f_term) * model.lin1.gamma(t)
    torch.testing.assert_close(split, lin1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model(y, t, feats),
                               model.forward_conditioned(y, t, (x_emb, f_term)))

    class Whole(torch.nn.Module):  # the same network without the split
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, y_t, t_b, f):
            return self.inner(y_t, t_b, f)

    abar = alphas_cumprod(cosine_betas(100)).float()
    steps = ddim_timesteps(100, 10)
    with torch.no_grad():
        fast = ddim_sample(model, feats, abar=abar, timesteps=steps, num_classes=4)
        slow = ddim_sample(Whole(model), feats, abar=abar, timesteps=steps, num_classes=4)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    s = model.spec
    assert s.sampling_flops_per_sample(10) == (s.condition_flops_per_sample()
                                              + 10 * s.step_flops_per_sample())
    assert s.sampling_flops_per_sample(1) == s.flops_per_sample()


def test_guidance_basis_is_a_scaled_pca_that_drops_empty_directions():
    from pipeline.training import guidance_basis

    gen = torch.Generator().manual_seed(0)
    base = torch.randn(500, 6, generator=gen) * torch.tensor([5.0, 3, 2, 1, 0.5, 0.1])
    x = base.repeat_interleave(4, dim=1)  # (500, 24): rank 6, each coordinate 4 times
    basis = guidance_basis(x, 8)
    assert basis.shape == (24, 8) and basis.dtype == torch.float32
    assert torch.count_nonzero(basis[:, 6:]) == 0  # beyond the rank: zero columns
    z = (x - x.mean(0)) @ basis[:, :6]
    var = z.var(0, unbiased=False)
    assert var.mean().item() == pytest.approx(1.0, rel=1e-4)
    assert torch.all(var[:-1] >= var[1:])  # ordered by variance
    cov = (z.T @ z) / len(z)
    assert torch.allclose(cov, torch.diag(var), atol=1e-4)  # decorrelated


def test_wide_features_are_projected_and_the_basis_travels_in_the_checkpoint(tmp_path):
    from pipeline.checkpoint import load_checkpoint, save_checkpoint
    from pipeline.features import FeatureNormalizer

    gen = torch.Generator().manual_seed(1)
    n, c = 120, 3
    labels = torch.arange(n) % c
    x = (torch.randn(n, 6, generator=gen) + 3 * F.one_hot(labels, 6)[:, :6].float())
    x = x.repeat_interleave(20, dim=1)  # (n, 120) > guidance_dim
    data = TrainData(features=x, candidates=labels[:, None].repeat(1, 3),
                     val_features=x[:30], val_labels=labels[:30], num_classes=c)
    cfg = TrainConfig(epochs=2, batch_size=40, feature_dim=16, timesteps=50, ddim_steps=5,
                      warmup_epochs=1, guidance_dim=8, eval_every=1)
    result = train_diffusion(data, cfg, progress=False)
    assert result.spec.guidance_dim == 8
    assert result.state_dict["guidance"].shape == (120, 8)
    save_checkpoint(tmp_path / "m.pt", spec=result.spec, state_dict=result.state_dict,
                    normalizer=FeatureNormalizer.fit(x.numpy(), "none"), ddim_steps=5,
                    readout="argmax", info={})
    model, _ = load_checkpoint(tmp_path / "m.pt")
    assert torch.equal(model.guidance, result.state_dict["guidance"])
    narrow = dataclasses.replace(cfg, guidance_dim=200)  # not wider than D: no projection
    assert train_diffusion(data, narrow, progress=False).spec.guidance_dim is None


def _trained_looking(model: DiffusionClassifier) -> DiffusionClassifier:
    """BatchNorm statistics, affine parameters and gammas away from their initial values,
    so that folding them into the weights is not a no-op."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for norm in (model.norm_x, model.norm1, model.norm2, model.norm3):
            norm.running_mean.normal_(generator=gen)
            norm.running_var.uniform_(0.3, 3.0, generator=gen)
            norm.weight.normal_(generator=gen)
            norm.bias.normal_(generator=gen)
        for layer in (model.lin1, model.lin2, model.lin3):
            layer.gamma.weight.uniform_(0.2, 2.0, generator=gen)
    return model.eval()


def test_folded_step_is_the_eval_forward_pass():
    """forward_folded with gamma_t and BatchNorm folded into the weights computes what
    forward_conditioned does in eval mode, at every timestep; folding refuses train mode
    (batch statistics cannot be folded)."""
    torch.manual_seed(0)
    model = _trained_looking(DiffusionClassifier(spec(timesteps=100)))
    feats, y = torch.randn(9, 12), torch.randn(9, 4)
    cond = model.condition(feats)
    for t in (0, 1, 37, 99, 100):
        want = model.forward_conditioned(y, torch.full((9,), t), cond)
        got = model.forward_folded(y, cond, model.folded_step(t))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # A wrong gamma row (t - 1) is caught: the check above can fail.
    off = model.forward_folded(y, cond, model.folded_step(36))
    assert not torch.allclose(off, model.forward_conditioned(y, torch.full((9,), 37), cond),
                              atol=1e-3)
    with pytest.raises(RuntimeError, match="eval mode"):
        model.train().folded_step(5)


def test_folded_layers_in_place_equal_the_out_of_place_formula_bit_for_bit():
    """forward_folded's in-place bias add and Softplus give exactly the values of the
    plain formula (a fresh tensor per operation): the change is speed only."""
    torch.manual_seed(2)
    model = _trained_looking(DiffusionClassifier(spec(timesteps=100)))
    feats, y = torch.randn(33, 12) * 4, torch.randn(33, 4) * 4
    x_emb, f_term = model.condition(feats)
    step = model.folded_step(37)
    pre = torch.addcmul(step.shift1, f_term, step.scale1)
    h = F.softplus(torch.addmm(pre, y, step.y_weight.t())) * x_emb
    h = F.softplus(F.linear(h, step.weight2, step.bias2))
    h = F.softplus(F.linear(h, step.weight3, step.bias3))
    want = F.linear(h, step.out_weight, step.out_bias)
    assert torch.equal(model.forward_folded(y, (x_emb, f_term), step), want)
    assert torch.equal(x_emb, model.condition(feats)[0])  # the condition is not written to


def test_folds_are_built_once_per_call_over_all_batches(monkeypatch):
    """predict_scores and stochastic_vote fold each DDIM step once, not once per batch of
    trajectories, and give the same scores as folding inside every batch."""
    torch.manual_seed(4)
    model = _trained_looking(DiffusionClassifier(spec(timesteps=100)))
    feats = torch.randn(40, 12)
    kw = {"abar": alphas_cumprod(cosine_betas(100)).float(),
          "timesteps": ddim_timesteps(100, 5), "num_classes": 4}
    per_batch = torch.cat([ddim_sample(model, feats[i:i + 8], **kw) for i in range(0, 40, 8)])
    calls = []
    original = model.folded_step
    model.folded_step = lambda t: calls.append(t) or original(t)
    monkeypatch.setattr(inference, "STEP_BATCH_ROWS", 8)  # 5 batches of 8 rows
    assert torch.equal(predict_scores(model, feats, **kw), per_batch)
    assert sorted(calls) == sorted(int(t) for t in kw["timesteps"])
    calls.clear()
    stochastic_vote(model, feats, samples=4, rule="argmax", **kw)  # 20 batches of 2 rows
    assert len(calls) == 5


def test_repeats_condition_once_and_match_repeated_rows():
    """ddim_sample(features, repeats=S) runs S trajectories per image from y_start, the
    same ones as giving each image's row S times (the features-only part once per image)."""
    torch.manual_seed(1)
    model = _trained_looking(DiffusionClassifier(spec(timesteps=100)))
    feats = torch.randn(5, 12)
    y_start = torch.randn(5 * 3, 4)
    abar = alphas_cumprod(cosine_betas(100)).float()
    kw = {"abar": abar, "timesteps": ddim_timesteps(100, 10), "num_classes": 4,
          "y_start": y_start}
    calls = []
    original = model.condition
    model.condition = lambda f: calls.append(f.shape[0]) or original(f)  # count rows
    once = ddim_sample(model, feats, repeats=3, **kw)
    rows = ddim_sample(model, feats.repeat_interleave(3, dim=0), **kw)
    assert calls == [5, 15]
    torch.testing.assert_close(once, rows, rtol=1e-5, atol=1e-5)
    assert once.shape == (15, 4)


def test_small_training_steps_take_one_thread_and_count_the_projected_guidance():
    """stages.train sizes a step by the network it trains (model_spec: guidance projected
    when D > guidance_dim): digits steps run on one thread, CIFAR-scale ones keep theirs."""
    from pipeline.config import Params
    from stages.train import SMALL_STEP_FLOPS, _one_thread_for_small_steps

    digits = Params(train=TrainConfig(batch_size=32))  # params.yaml's digits default
    torch.set_num_threads(2)
    _one_thread_for_small_steps(digits, dim=64, num_classes=10)
    assert torch.get_num_threads() == 1
    cifar = Params(train=TrainConfig(batch_size=256))
    torch.set_num_threads(2)
    _one_thread_for_small_steps(cifar, dim=768, num_classes=10)
    assert torch.get_num_threads() == 2
    # 768-d at batch 32: 2.0 MFLOP per sample with the 64-d guidance (2.6 M unprojected).
    spec = model_spec(TrainConfig(batch_size=32), num_classes=10, dim=768)
    assert spec.guidance_dim == 64 and 32 * spec.flops_per_sample() < SMALL_STEP_FLOPS
