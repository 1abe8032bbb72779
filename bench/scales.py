"""The benchmark scales: how many synthetic train embeddings, of what width, how many classes,
and the network width the paper uses at that scale (METHOD.md section 4)."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Scale:
    name: str
    n: int  # train embeddings
    dim: int  # embedding width D (CLIP ViT-L/14: 768)
    classes: int  # C
    hidden: int  # train.feature_dim
    k: int = 10  # retrieve.k

    def to_dict(self) -> dict:
        return asdict(self)


SCALES: dict[str, Scale] = {
    "cifar": Scale("cifar", n=45_000, dim=768, classes=10, hidden=512),
    "food101n": Scale("food101n", n=310_000, dim=768, classes=101, hidden=1024),
    "1m": Scale("1m", n=1_000_000, dim=768, classes=14, hidden=1024),  # Clothing1M-sized
    # A check that the tool runs (a minute or two), not a benchmark.
    "smoke": Scale("smoke", n=5_000, dim=768, classes=10, hidden=512),
}
