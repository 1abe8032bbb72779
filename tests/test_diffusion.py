"""pipeline.diffusion: cosine schedule, DDIM sub-sequence, antithetic timesteps, forward
process, deterministic DDIM sampling and the readout rules."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.diffusion import (alphas_cumprod, antithetic_timesteps, cosine_betas,
                                ddim_sample, ddim_timesteps, q_sample, readout)


def close(actual, expected, *, atol=1e-6, rtol=1e-5):
    """torch.testing.assert_close costs ~5 s of imports on first use; compare in NumPy."""
    np.testing.assert_allclose(torch.as_tensor(actual).numpy(),
                               torch.as_tensor(expected).numpy(), atol=atol, rtol=rtol)


def closed_form_abar(t: float, T: int, s: float = 0.008) -> float:
    f = lambda u: math.cos((u / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    return f(t) / f(0)


class OracleEps(nn.Module):
    """Predicts exactly the noise that separates y_t from a known y0 (= the features)."""

    def __init__(self, abar: torch.Tensor) -> None:
        super().__init__()
        self.abar = abar
        self.calls: list[torch.Tensor] = []

    def forward(self, y: torch.Tensor, t: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        self.calls.append(t.clone())
        a = self.abar[t].unsqueeze(1)
        return (y - a.sqrt() * features) / (1 - a).sqrt()


class ConstantEps(nn.Module):
    def __init__(self, eps: torch.Tensor) -> None:
        super().__init__()
        self.eps = eps
        self.calls: list[torch.Tensor] = []

    def forward(self, y, t, features):
        self.calls.append(t.clone())
        return self.eps.expand_as(y)


# --------------------------------------------------------------------------- schedule
def test_cosine_betas_shape_monotone_and_clipped():
    betas = cosine_betas(1000)
    assert betas.shape == (1000,) and betas.dtype == torch.float64
    assert (betas > 0).all()
    assert (betas[1:] >= betas[:-1]).all()
    assert betas.max().item() == pytest.approx(0.999)
    assert betas[-1].item() == pytest.approx(0.999)  # unclipped it would be ~1
    assert (betas[:-1] < 0.999).all()
    assert cosine_betas(1000, max_beta=0.5).max().item() == pytest.approx(0.5)


def test_alphas_cumprod_matches_closed_form():
    T = 1000
    abar = alphas_cumprod(cosine_betas(T))
    assert abar.shape == (T,)
    assert (abar[1:] < abar[:-1]).all()
    assert abar[0].item() > 0.9999
    assert abar[0].item() < 1.0
    assert abar[-1].item() < 1e-6
    # abar[t] is the product over steps 0..t, i.e. the closed form at t + 1
    for t in (0, 1, 99, 250, 500, 750, 900, 990):
        assert abar[t].item() == pytest.approx(closed_form_abar(t + 1, T), rel=1e-9, abs=1e-12)
    assert abar[499].item() == pytest.approx(0.5, abs=0.02)  # cosine: about half at T/2


def test_small_T_schedule():
    betas = cosine_betas(4)
    abar = alphas_cumprod(betas)
    for t in range(3):
        assert abar[t].item() == pytest.approx(closed_form_abar(t + 1, 4), rel=1e-9)


# --------------------------------------------------------------------------- timesteps
def test_ddim_timesteps_paper_sequence():
    steps = ddim_timesteps(1000, 10)
    assert steps.dtype == np.int64
    assert steps.tolist() == [1, 101, 201, 301, 401, 501, 601, 701, 801, 901]
    assert ddim_timesteps(1000, 1).tolist() == [1]
    assert ddim_timesteps(100, 4).tolist() == [1, 26, 51, 76]
    assert (ddim_timesteps(50, 50) < 50).all()


def test_antithetic_pairs():
    gen = torch.Generator().manual_seed(0)
    t = antithetic_timesteps(64, 1000, generator=gen)
    assert t.shape == (64,) and t.dtype == torch.int64
    assert ((t >= 0) & (t < 1000)).all()
    assert (t[:32] + t[32:] == 999).all()
    assert len(set(t[:32].tolist())) > 20  # actually random
    odd = antithetic_timesteps(7, 10, generator=torch.Generator().manual_seed(1))
    assert odd.shape == (7,)
    assert (odd[:3] + odd[4:] == 9).all()


def test_antithetic_is_deterministic_per_generator():
    a = antithetic_timesteps(20, 100, generator=torch.Generator().manual_seed(3))
    b = antithetic_timesteps(20, 100, generator=torch.Generator().manual_seed(3))
    c = antithetic_timesteps(20, 100, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


# --------------------------------------------------------------------------- forward process
def test_q_sample_formula():
    abar = alphas_cumprod(cosine_betas(1000)).float()
    y0 = torch.eye(4)[[0, 1, 2, 3]]
    eps = torch.randn(4, 4, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0, 300, 600, 999])
    yt = q_sample(y0, t, eps, abar)
    for i in range(4):
        a = abar[t[i]]
        close(yt[i], a.sqrt() * y0[i] + (1 - a).sqrt() * eps[i])
    close(yt[0], y0[0], atol=0.02, rtol=0)  # almost clean at t=0
    close(yt[3], eps[3], atol=1e-3, rtol=0)  # almost pure noise at T-1


# --------------------------------------------------------------------------- DDIM
@pytest.mark.parametrize("start", ["mean", "random"])
def test_ddim_with_true_eps_recovers_y0(start):
    abar = alphas_cumprod(cosine_betas(1000)).float()
    gen = torch.Generator().manual_seed(0)
    y0 = torch.randn(6, 5, generator=gen)  # any target, not only one-hot
    y_start = None if start == "mean" else torch.randn(6, 5, generator=gen)
    model = OracleEps(abar)
    out = ddim_sample(model, y0, abar=abar, timesteps=ddim_timesteps(1000, 10),
                      num_classes=5, y_start=y_start)
    assert out.shape == (6, 5) and out.dtype == torch.float32
    close(out, y0, atol=1e-4, rtol=1e-4)
    # called once per step, from the largest timestep down, with a (N,) long batch
    assert [int(c[0]) for c in model.calls] == [901, 801, 701, 601, 501, 401, 301, 201,
                                                101, 1]
    assert all(c.dtype == torch.long and c.shape == (6,) for c in model.calls)


def test_ddim_update_rule_by_hand():
    """Two steps with a constant eps: the eta = 0 update gives a closed form."""
    abar = torch.tensor([0.99, 0.9, 0.7, 0.5, 0.3, 0.2])
    e = torch.tensor([[0.5, -1.0, 2.0]])
    s = torch.tensor([[1.0, 2.0, -3.0]])
    model = ConstantEps(e)
    out = ddim_sample(model, torch.zeros(1, 4), abar=abar, timesteps=np.array([1, 4]),
                      num_classes=3, y_start=s)
    a4, a1 = abar[4], abar[1]
    y0_hat = (s - (1 - a4).sqrt() * e) / a4.sqrt()
    y1 = a1.sqrt() * y0_hat + (1 - a1).sqrt() * e
    expected = (y1 - (1 - a1).sqrt() * e) / a1.sqrt()  # last step lands on y0_hat
    close(out, expected)
    close(out, y0_hat)
    assert [int(c[0]) for c in model.calls] == [4, 1]


def test_ddim_mean_start_is_zero_vector():
    abar = torch.tensor([0.9, 0.5, 0.1])
    model = ConstantEps(torch.zeros(1, 2))
    out = ddim_sample(model, torch.ones(3, 4), abar=abar, timesteps=np.array([1, 2]),
                      num_classes=2)
    close(out, torch.zeros(3, 2))


# --------------------------------------------------------------------------- readout
def test_readout_rules_differ_on_crafted_scores():
    scores = torch.tensor([[1.6, 0.9, 0.0],    # argmax 0, nearest to 1: 1
                           [0.2, 1.05, 0.4],   # both 1
                           [-3.0, 0.1, 0.5]])  # both 2
    assert readout(scores, "argmax").tolist() == [0, 1, 2]
    assert readout(scores, "nearest_one").tolist() == [1, 1, 2]
    assert readout(scores, "argmax").dtype == torch.int64
    with pytest.raises(ValueError, match="nearest_one"):
        readout(scores, "auto")
