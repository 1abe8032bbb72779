"""Typed, validated parameters: one frozen dataclass per params.yaml section.

`pipeline.params_io.load_params` reads params.yaml into `Params` once, at the CLI
boundary; everything below it receives these objects, never raw dicts. Out-of-range
values raise `ConfigError` here (each section's `__post_init__`), unknown keys and wrong
types there, with a message that names the key, the bad value and the valid choices.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import ConfigError

SOURCES = ("digits", "imagefolder", "manifest", "cifar10", "cifar100", "food101n",
           "clothing1m", "webvision", "animal10n")
ENCODERS = ("pixels", "open_clip")
NOISE_KINDS = ("none", "symmetric", "asymmetric", "pairflip", "pmd", "hybrid", "file")
PMD_TYPES = ("I", "II", "III")
WEIGHTINGS = ("agreement", "uniform")
CLASS_BALANCES = ("auto", "none", "inverse")
PROJECTIONS = ("linear", "mlp")
FEATURE_NORMS = ("standardize", "center", "l2", "none")
READOUTS = ("auto", "nearest_one", "argmax")
INITS = ("identity", "card")


def _choice(section: str, key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{section}.{key}: unknown value {value!r}; valid: {', '.join(choices)}")


def _check(ok: bool, section: str, key: str, value: Any, rule: str) -> None:
    if not ok:
        raise ConfigError(f"{section}.{key}: {value!r} is not valid; it must be {rule}")


@dataclass(frozen=True)
class DataConfig:
    """Where the images and labels come from and how they are split.

    `val_fraction` / `test_fraction` apply to sources without an official split
    (digits, imagefolder or manifest without a split column); official protocols win.
    `val_fraction` also sizes the noisy-label val split carved out of train for the
    real-noise sources without a clean one (food101n, webvision, animal10n).
    `food101_root`: the Food-101 directory whose meta/test.txt is food101n's test split
    (null: `food-101` next to data.root). `ilsvrc12_root`: ILSVRC2012 val images in
    <wnid>/ folders, webvision's "test_ilsvrc12" split (null: that split is left out).
    Each is read only by its source.
    """

    source: str = "digits"
    root: str | None = None
    seed: int = 0
    val_fraction: float = 0.2
    test_fraction: float = 0.2
    food101_root: str | None = None
    ilsvrc12_root: str | None = None

    def __post_init__(self) -> None:
        _choice("data", "source", self.source, SOURCES)
        _check(0 < self.val_fraction < 1, "data", "val_fraction", self.val_fraction, "in (0, 1)")
        _check(0 < self.test_fraction < 1, "data", "test_fraction", self.test_fraction, "in (0, 1)")
        _check(self.val_fraction + self.test_fraction < 1, "data", "val_fraction",
               self.val_fraction, "such that val_fraction + test_fraction < 1")
        if self.source != "digits" and not self.root:
            raise ConfigError(f"data.root: source {self.source!r} reads a dataset on disk; "
                              "set data.root to its directory (or manifest file)")


@dataclass(frozen=True)
class EmbedConfig:
    """The frozen encoder f_p. `pixels`: standardised pixel vectors. `open_clip`: any
    open_clip model; `pretrained` is a tag (`openai`), a local checkpoint file, or
    `local-dir:` / `hf-hub:` forms; null means random weights (tests only)."""

    encoder: str = "pixels"
    model: str = "ViT-L-14-quickgelu"
    pretrained: str | None = "openai"
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        _choice("embed", "encoder", self.encoder, ENCODERS)


SPACES = ("raw", "center", "standardize")
"""Retrieval spaces, named after `train.feature_norm`'s normalisers: cosine on the
embeddings as they are, minus the train mean, or per coordinate minus the train mean and
over the train std. Which one retrieves the cleanest labels depends on the encoder: raw on
pixels and CLIP-like embeddings, standardised on a projection whose few large
coordinates drown the rest (bench/README.md, "retrieval space")."""


@dataclass(frozen=True)
class IndexConfig:
    """FAISS indexes over the train split: an `index_factory` string (inner product on
    L2-normalised vectors), optional search-time parameters such as "efSearch=128", and
    the retrieval spaces to index (comma-separated, of `SPACES`): retrieve
    searches the one whose validation vote is best (`pipeline.retrieval.choose_space`)."""

    factory: str = "Flat"
    search_params: str = ""
    spaces: str = "raw,center,standardize"

    def __post_init__(self) -> None:
        _check(bool(self.factory.strip()), "index", "factory", self.factory,
               "a FAISS index_factory string such as Flat, HNSW32 or IVF1024,Flat")
        self.space_names  # noqa: B018 - validates spaces

    @property
    def space_names(self) -> tuple[str, ...]:
        """spaces parsed, in the given order (the first is preferred on a tie)."""
        names = [part.strip() for part in self.spaces.split(",") if part.strip()]
        if not names or len(set(names)) != len(names) or not set(names) <= set(SPACES):
            raise ConfigError(f"index.spaces: {self.spaces!r} is not valid; it must be "
                              f"distinct comma-separated names of {', '.join(SPACES)}, "
                              "e.g. 'raw,center,standardize'")
        return tuple(names)


NAMED_MAPS = ("pair", "cifar10", "cifar100")  # noise.asym_map's named maps (pipeline.noise)
_ASYM_MAP = re.compile("|".join(NAMED_MAPS) + r"|\d+\s*:\s*\d+(\s*,\s*\d+\s*:\s*\d+)*")


@dataclass(frozen=True)
class NoiseConfig:
    """Label noise injected into the train split (val and test stay clean).

    kind: none | symmetric | asymmetric | pairflip | pmd | hybrid | file.
    `rate` is the flip rate for symmetric / asymmetric / pairflip, and for hybrid the
    rate of the noise (`hybrid_on_top`) applied on top of PMD labels.
    `file`: the observed labels for kind file; for kind hybrid, when given, the PMD step's
    labels (e.g. the authors' released noise_label/cifar10-1-0.35.npy) instead of PMD
    from this project's linear probe.
    `asym_map`: pair (c -> c+1 mod C) | cifar10 | cifar100 | explicit "src:dst,src:dst".
    """

    kind: str = "symmetric"
    rate: float = 0.4
    seed: int = 0
    asym_map: str = "pair"
    pmd_type: str = "I"
    pmd_factor: float = 1.43
    hybrid_on_top: str = "symmetric"
    file: str | None = None

    def __post_init__(self) -> None:
        _choice("noise", "kind", self.kind, NOISE_KINDS)
        _check(0 <= self.rate < 1, "noise", "rate", self.rate, "in [0, 1)")
        _choice("noise", "pmd_type", self.pmd_type, PMD_TYPES)
        _check(self.pmd_factor > 1, "noise", "pmd_factor", self.pmd_factor, "> 1")
        _choice("noise", "hybrid_on_top", self.hybrid_on_top, ("symmetric", "asymmetric"))
        # The syntax only: the classes are checked against the dataset by the noise stage.
        if not _ASYM_MAP.fullmatch(self.asym_map.strip()):
            raise ConfigError(f"noise.asym_map: {self.asym_map!r} is not one of "
                              f"{', '.join(NAMED_MAPS)} or 'src:dst,src:dst' with integer "
                              "classes")
        if self.kind == "file" and not self.file:
            raise ConfigError("noise.file: noise.kind is 'file' but no file is given")


K_AUTO = "auto"


@dataclass(frozen=True)
class RetrieveConfig:
    """Label retrieval: k nearest training neighbours (self excluded by id).

    k: an integer, or "auto": the k of `k_choices` whose neighbour vote is most accurate
    on the validation split (ties: the smallest), see `pipeline.retrieval.choose_k`.
    k_choices: comma-separated ks whose neighbour votes retrieve scores on the validation
    split (retrieval.json's k_selection). With an integer k, train trains once more at
    the best of them when that vote beats the model there (`pipeline.retrieval.retry_k`);
    k_choices equal to k alone turns the retry off.
    """

    k: int | str = 10
    k_choices: str = "10,20,50,100,200"

    def __post_init__(self) -> None:
        if isinstance(self.k, str):
            if self.k != K_AUTO:
                raise ConfigError(f"retrieve.k: unknown value {self.k!r}; valid: an integer "
                                  f">= 1, or {K_AUTO}")
        else:
            _check(self.k >= 1, "retrieve", "k", self.k, f">= 1 or {K_AUTO!r}")
        self.candidate_ks  # noqa: B018 - validates k_choices

    @property
    def auto(self) -> bool:
        return self.k == K_AUTO

    @property
    def candidate_ks(self) -> tuple[int, ...]:
        """k_choices parsed: ascending, distinct, each >= 1."""
        try:
            ks = sorted({int(part) for part in self.k_choices.split(",") if part.strip()})
        except ValueError:
            ks = []
        if not ks or ks[0] < 1:
            raise ConfigError(f"retrieve.k_choices: {self.k_choices!r} is not valid; it must "
                              "be comma-separated integers >= 1, e.g. '10,20,50,100,200'")
        return tuple(ks)


@dataclass(frozen=True)
class TrainConfig:
    """The diffusion classifier and its optimisation (METHOD.md sections 2-5)."""

    seed: int = 0
    epochs: int = 200
    batch_size: int = 32  # params.yaml's digits default; the CIFAR presets set 200-256
    lr: float = 1e-3
    warmup_epochs: int = 5
    feature_dim: int = 512
    timesteps: int = 1000
    grad_clip: float = 1.0
    ema_decay: float = 0.995
    weighting: str = "agreement"
    # "inverse": each drawn target's loss weight is also divided by its class's share of
    # the train rows' candidate labels (`pipeline.training.class_balance_weights`);
    # "auto": inverse when those labels are imbalanced (CLASS_BALANCE_AUTO_RATIO), else
    # "none", the paper's loss.
    class_balance: str = "auto"
    projection: str = "linear"
    feature_norm: str = "standardize"
    ddim_steps: int = 10
    readout: str = "auto"
    eval_every: int = 5
    guidance_dim: int = 64
    init: str = "identity"

    def __post_init__(self) -> None:
        _choice("train", "init", self.init, INITS)
        _check(self.guidance_dim >= 0, "train", "guidance_dim", self.guidance_dim,
               ">= 0 (0: no projection)")
        for key in ("epochs", "batch_size", "feature_dim", "ddim_steps", "eval_every"):
            _check(getattr(self, key) >= 1, "train", key, getattr(self, key), ">= 1")
        _check(self.batch_size >= 2, "train", "batch_size", self.batch_size, ">= 2 (BatchNorm)")
        _check(self.lr > 0, "train", "lr", self.lr, "> 0")
        _check(0 <= self.warmup_epochs < self.epochs, "train", "warmup_epochs",
               self.warmup_epochs, "in [0, epochs)")
        _check(self.timesteps >= 2, "train", "timesteps", self.timesteps, ">= 2")
        _check(self.ddim_steps <= self.timesteps, "train", "ddim_steps", self.ddim_steps,
               "<= timesteps")
        _check(self.grad_clip > 0, "train", "grad_clip", self.grad_clip, "> 0")
        _check(0 <= self.ema_decay < 1, "train", "ema_decay", self.ema_decay, "in [0, 1)")
        _choice("train", "weighting", self.weighting, WEIGHTINGS)
        _choice("train", "class_balance", self.class_balance, CLASS_BALANCES)
        _choice("train", "projection", self.projection, PROJECTIONS)
        _choice("train", "feature_norm", self.feature_norm, FEATURE_NORMS)
        _choice("train", "readout", self.readout, READOUTS)


@dataclass(frozen=True)
class EvaluateConfig:
    """Evaluation and baselines. `linear_l2`: the smallest L2 penalty of the linear
    probes; `linear_l2_decades`: how many strengths are tried (linear_l2 x 10^j, j <
    decades), each probe keeping the one best on validation (1: no selection);
    `linear_max_rows`: the probes are fitted on at most this many train rows (a fixed
    random subset beyond it), so evaluation's memory does not grow with the dataset;
    `stochastic_samples`: extra DDIM samples from y_T ~ N(0, I) per image for a vote
    confidence (0 turns it off)."""

    linear_l2: float = 1e-4
    linear_l2_decades: int = 4
    linear_iters: int = 200
    linear_max_rows: int = 100_000
    stochastic_samples: int = 0

    def __post_init__(self) -> None:
        _check(self.linear_l2 >= 0, "evaluate", "linear_l2", self.linear_l2, ">= 0")
        _check(self.linear_iters >= 1, "evaluate", "linear_iters", self.linear_iters, ">= 1")
        _check(self.linear_l2_decades >= 1, "evaluate", "linear_l2_decades",
               self.linear_l2_decades, ">= 1")
        _check(self.linear_max_rows >= 1, "evaluate", "linear_max_rows", self.linear_max_rows,
               ">= 1")
        _check(self.stochastic_samples >= 0, "evaluate", "stochastic_samples",
               self.stochastic_samples, ">= 0")


@dataclass(frozen=True)
class ReportConfig:
    """What a user takes home (`lra report`): the label issues table and the HTML report.

    `samples`: S stochastic DDIM trajectories per image from y_T ~ N(0, I), run as one
    batch, for the vote and its confidence. Measured on the digits default (train + val,
    1,438 images, one thread of a busy 2-core VM; F1 of the flag against the injected
    corruptions): S = 4: F1 0.964, 1.9 s; 8: 0.972, 3.1 s; 16: 0.978, 5.2 s; 32: 0.981,
    9.6 s. 16 is the default: most of the gain at half the cost of 32.
    `min_confidence`: a label is flagged only when the vote share is at least this (0:
    whenever both the vote and the mean-start prediction reject it). `gallery_items`:
    suspected issues shown in index.html, each with its first `gallery_neighbours`
    retrieved neighbours."""

    samples: int = 16
    min_confidence: float = 0.0
    gallery_items: int = 24
    gallery_neighbours: int = 10

    def __post_init__(self) -> None:
        _check(self.samples >= 1, "report", "samples", self.samples, ">= 1")
        _check(0 <= self.min_confidence <= 1, "report", "min_confidence",
               self.min_confidence, "in [0, 1]")
        _check(self.gallery_items >= 0, "report", "gallery_items", self.gallery_items, ">= 0")
        _check(self.gallery_neighbours >= 0, "report", "gallery_neighbours",
               self.gallery_neighbours, ">= 0")


@dataclass(frozen=True)
class Params:
    data: DataConfig = field(default_factory=DataConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    retrieve: RetrieveConfig = field(default_factory=RetrieveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    report: ReportConfig = field(default_factory=ReportConfig)


def as_dict(cfg: Any) -> dict[str, Any]:
    """A plain dict of a config dataclass (for checkpoints and provenance)."""
    return dataclasses.asdict(cfg)
