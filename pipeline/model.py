"""The conditional MLP that predicts the noise added to a label vector (after CARD;
METHOD.md section 4), working on cached encoder features instead of raw pixels."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F


class ConditionalLinear(nn.Module):
    """Linear(a -> b)(x) * gamma_t, gamma a learned per-timestep vector.

    The gamma table has T + 1 rows initialised uniform in [0, 1), as in CARD.
    """

    def __init__(self, in_features: int, out_features: int, timesteps: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.gamma = nn.Embedding(timesteps + 1, out_features)
        nn.init.uniform_(self.gamma.weight, 0.0, 1.0)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * self.gamma(t)  # (B, out) * (B, out)


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild the network from a checkpoint."""

    num_classes: int
    feature_dim_in: int  # D, width of the cached embedding
    hidden: int  # feature_dim in the paper (512 CIFAR, 1024 others)
    timesteps: int
    projection: str = "linear"  # image-embedding branch: "linear" or "mlp"

    def to_dict(self) -> dict:
        return asdict(self)

    def flops_per_sample(self) -> int:
        """Multiply-adds x 2 of one forward pass (the Linear layers dominate)."""
        return self.condition_flops_per_sample() + self.step_flops_per_sample()

    def condition_flops_per_sample(self) -> int:
        """FLOPs of `DiffusionClassifier.condition`: the features-only part."""
        d, h = self.feature_dim_in, self.hidden
        proj = d * h + (h * h if self.projection == "mlp" else 0)
        return 2 * (proj + d * h)

    def step_flops_per_sample(self) -> int:
        """FLOPs of `DiffusionClassifier.forward_conditioned`: the per-step part."""
        c, h = self.num_classes, self.hidden
        return 2 * (c * h + 2 * h * h + h * c)

    def sampling_flops_per_sample(self, steps: int) -> int:
        """FLOPs of a `steps`-step DDIM trajectory that conditions once per image."""
        return self.condition_flops_per_sample() + steps * self.step_flops_per_sample()


class DiffusionClassifier(nn.Module):
    """eps_theta(y_t, t, f_p(x), x_emb).

    y_t: (B, C) noisy label; t: (B,) int64; features: (B, D) cached embedding, used both as
    the guidance f_p(x) and as the input of the trainable image-embedding branch x_emb.
    Returns predicted noise (B, C).
    """

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        c, d, h, T = spec.num_classes, spec.feature_dim_in, spec.hidden, spec.timesteps
        if spec.projection == "linear":
            self.embed_x = nn.Linear(d, h)
        elif spec.projection == "mlp":
            self.embed_x = nn.Sequential(nn.Linear(d, h), nn.Softplus(), nn.Linear(h, h))
        else:
            raise ValueError(f"unknown projection {spec.projection!r}; valid: linear, mlp")
        self.norm_x = nn.BatchNorm1d(h)
        self.lin1 = ConditionalLinear(c + d, h, T)
        self.norm1 = nn.BatchNorm1d(h)
        self.lin2 = ConditionalLinear(h, h, T)
        self.norm2 = nn.BatchNorm1d(h)
        self.lin3 = ConditionalLinear(h, h, T)
        self.norm3 = nn.BatchNorm1d(h)
        self.out = nn.Linear(h, c)

    def forward(self, y_t: torch.Tensor, t: torch.Tensor, features: torch.Tensor
                ) -> torch.Tensor:
        return self.forward_conditioned(y_t, t, self.condition(features))

    def condition(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The part of the forward pass that depends on the features only: x_emb (B, H)
        and first layer's features term W_f f + b (B, H). A sampler computes it once per
        image instead of once per DDIM step (most of the FLOPs at D = 768)."""
        c = self.spec.num_classes
        x_emb = self.norm_x(self.embed_x(features))  # (B, H)
        # lin1 acts on [y_t, features]: split its weight (H, C + D) by input.
        f_term = F.linear(features, self.lin1.linear.weight[:, c:], self.lin1.linear.bias)
        return x_emb, f_term

    def forward_conditioned(self, y_t: torch.Tensor, t: torch.Tensor,
                            cond: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """forward() given `condition(features)`. Returns predicted noise (B, C)."""
        x_emb, f_term = cond
        c = self.spec.num_classes
        h = (F.linear(y_t, self.lin1.linear.weight[:, :c]) + f_term) * self.lin1.gamma(t)
        h = F.softplus(self.norm1(h)) * x_emb
        h = F.softplus(self.norm2(self.lin2(h, t)))
        h = F.softplus(self.norm3(self.lin3(h, t)))
        return self.out(h)  # (B, C)

    def flops_per_sample(self) -> int:
        """Multiply-adds x 2 of one forward pass (see ModelSpec.flops_per_sample)."""
        return self.spec.flops_per_sample()
