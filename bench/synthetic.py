"""Synthetic CLIP-like embeddings with labels, label noise and retrieved-label candidates.

Why not i.i.d. Gaussian vectors: in 768 dimensions they are all nearly equidistant, so
"nearest neighbour" is almost meaningless and approximate indexes (HNSW, IVF) look far worse
than on real image embeddings, which are strongly clustered and have a low intrinsic
dimension. The generator below imitates that structure:

    x = m + a * c[class] + b * s[class, mode] + U (lambda * z) + e * w

    m              one shared direction (CLIP image embeddings all have a large common
                   component: random pairs have cosine ~0.5)
    c[class]       a random unit direction per class,                        a = 0.22
    s[class, mode] `modes` random unit directions per class (sub-clusters),  b = 0.2
    U (lambda * z) within-cluster variation in an `intrinsic_dim`-dimensional subspace
                   (U: (D, r) orthonormal, shared), power-law spectrum lambda_i ~ i^-1/2,
                   z ~ N(0, I_r), total scale 0.6
    e * w          isotropic noise in all D dimensions, w ~ N(0, I_D / D),   e = 0.4

The scales were chosen (45,000 x 768, 10 classes, cosine on L2-normalised rows) so that
the structure resembles CLIP ViT-L/14 features of CIFAR-10: random pairs have cosine ~0.63,
nearest neighbours ~0.81; 95 % of the 10 exact neighbours share the query's class (CLIP
k-NN on CIFAR-10 is ~95 % accurate); a 10-NN vote over 40 % noisy labels recovers the clean
label ~98 % of the time; HNSW32 reaches recall@10 ~0.99 at efSearch 64 on 20,000 vectors.
With a = b = 0.15 the classes overlap (purity 0.57); with a = b = 0.8 they never do.
Even overlapping classes stay linearly separable in 768 dimensions (a clean linear probe
scores 100 % at a = 0.07), so `blend` adds a Bayes error instead: that fraction of rows
sit between their own sub-cluster and another class's. blend = 0.5: clean linear probe
96.8 % at a fixed L2 of 1e-4, 10-NN purity 0.63 (10,000 rows); the accuracy benchmark
uses 0.8, where the validation-selected probe stays under 97 % at 10,000 and 45,000 rows
(0.65 gave 97.1 % and 97.4 %; bench/spaces.py lists the calibration).

Labels: clean label = class (uniform); observed label = clean label flipped to one of the
other C - 1 classes with probability `noise_rate` (symmetric noise, METHOD.md section 8).
Retrieved-label candidates for the train benchmark (k + 1 per row: own observed label,
then k observed labels of random members of the same sub-cluster) stand in for retrieval:
training speed does not depend on where the candidates come from, and exact k-NN at 1M
rows would cost hours on a CPU.

Everything is float32, generated in row chunks (no float64 (N, D) temporaries), and
deterministic for a given (n, dim, classes, k, seed). `materialise` writes the arrays once
to a cache directory as .npy; the benchmark's child processes `load` them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

VERSION = 1  # bump when the generator changes: cached files are keyed on it
CHUNK_ROWS = 65_536
ARRAYS = ("embeddings", "clean", "observed", "candidates")


@dataclass(frozen=True)
class SyntheticSpec:
    n: int
    dim: int
    classes: int
    k: int = 10
    modes: int = 8  # sub-clusters per class
    intrinsic_dim: int = 64
    noise_rate: float = 0.4
    seed: int = 0
    class_scale: float = 0.22  # a
    mode_scale: float = 0.2  # b
    within_scale: float = 0.6
    iso_scale: float = 0.4  # e
    blend: float = 0.0  # fraction of rows whose centre blends in another class's (overlap)

    def key(self) -> str:
        text = json.dumps({**asdict(self), "version": VERSION}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def to_dict(self) -> dict:
        return {**asdict(self), "version": VERSION,
                "generator": "class + sub-cluster centres, power-law low-rank within-cluster "
                             "variation, isotropic noise (bench/synthetic.py)"}


def _unit_rows(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    v = rng.standard_normal((n, dim), dtype=np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def generate(spec: SyntheticSpec) -> dict[str, np.ndarray]:
    """embeddings (N, D) float32 (not normalised), clean (N,) int64, observed (N,) int64,
    candidates (N, k + 1) int64 (own observed label first)."""
    rng = np.random.default_rng(spec.seed)
    n, d, c, r = spec.n, spec.dim, spec.classes, min(spec.intrinsic_dim, spec.dim)
    shared = _unit_rows(rng, 1, d)[0]  # (D,)
    class_dir = _unit_rows(rng, c, d)  # (C, D)
    mode_dir = _unit_rows(rng, c * spec.modes, d)  # (C * modes, D)
    centres = (shared + spec.class_scale * np.repeat(class_dir, spec.modes, axis=0)
               + spec.mode_scale * mode_dir).astype(np.float32)  # (C * modes, D)
    basis, _ = np.linalg.qr(rng.standard_normal((d, r)))  # (D, r) orthonormal
    spectrum = np.arange(1, r + 1, dtype=np.float64) ** -0.5
    spectrum *= spec.within_scale / np.sqrt((spectrum ** 2).sum())  # E|U lambda z|^2 = 0.6^2
    lowrank = (basis * spectrum).T.astype(np.float32)  # (r, D)

    clean = rng.integers(0, c, n, dtype=np.int64)
    mode = clean * spec.modes + rng.integers(0, spec.modes, n, dtype=np.int64)
    # Class overlap: a `blend` fraction of rows sit at lam * own centre + (1 - lam) * the
    # centre of a random sub-cluster of another class, lam ~ U(0.5, 1): near lam = 0.5
    # the class is ambiguous, which no classifier can undo (a Bayes error).
    # (Drawn only when blend > 0, so blend = 0 reproduces the earlier generator exactly.)
    other, lam = mode, np.ones((n, 1), dtype=np.float32)
    if spec.blend > 0:
        other = ((clean + rng.integers(1, c, n)) % c) * spec.modes + rng.integers(
            0, spec.modes, n)
        lam = np.where(rng.random(n) < spec.blend, rng.uniform(0.5, 1.0, n), 1.0).astype(
            np.float32)[:, None]
    emb = np.empty((n, d), dtype=np.float32)
    iso = np.float32(spec.iso_scale / np.sqrt(d))
    for start in range(0, n, CHUNK_ROWS):
        stop = min(n, start + CHUNK_ROWS)
        z = rng.standard_normal((stop - start, r), dtype=np.float32)
        block = rng.standard_normal((stop - start, d), dtype=np.float32)
        block *= iso
        block += z @ lowrank
        rows = slice(start, stop)
        block += lam[rows] * centres[mode[rows]] + (1 - lam[rows]) * centres[other[rows]]
        emb[start:stop] = block

    flip = rng.random(n) < spec.noise_rate
    shift = rng.integers(1, c, n, dtype=np.int64) if c > 1 else np.zeros(n, dtype=np.int64)
    observed = np.where(flip, (clean + shift) % c, clean)

    # Candidates: own observed label + observed labels of k random rows of the same mode.
    order = np.argsort(mode, kind="stable")
    counts = np.bincount(mode, minlength=c * spec.modes)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    pick = starts[mode][:, None] + (rng.random((n, spec.k)) * counts[mode][:, None]).astype(
        np.int64)  # (N, k) positions in `order`
    candidates = np.concatenate([observed[:, None], observed[order[pick]]], axis=1)
    return {"embeddings": emb, "clean": clean, "observed": observed,
            "candidates": np.ascontiguousarray(candidates)}


def _dir(cache_dir: str | Path, spec: SyntheticSpec) -> Path:
    return Path(cache_dir) / f"synthetic-n{spec.n}-d{spec.dim}-c{spec.classes}-{spec.key()}"


def materialise(spec: SyntheticSpec, cache_dir: str | Path) -> Path:
    """Generate the arrays once into `cache_dir` (reused when present). Returns the folder."""
    folder = _dir(cache_dir, spec)
    if all((folder / f"{name}.npy").exists() for name in ARRAYS):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    log.info("generating synthetic embeddings %d x %d (%d classes) into %s",
             spec.n, spec.dim, spec.classes, folder)
    arrays = generate(spec)
    for name, arr in arrays.items():
        tmp = folder / f"{name}.npy.tmp"
        with open(tmp, "wb") as fh:
            np.save(fh, arr)
        os.replace(tmp, folder / f"{name}.npy")
    (folder / "spec.json").write_text(json.dumps(spec.to_dict(), indent=2))
    return folder


def load(folder: str | Path, names: tuple[str, ...] = ARRAYS, *, rows: int | None = None
         ) -> dict[str, np.ndarray]:
    """Read cached arrays fully into memory (the first `rows` rows when given)."""
    out = {}
    for name in names:
        arr = np.load(Path(folder) / f"{name}.npy", mmap_mode="r")
        out[name] = np.array(arr[:rows] if rows is not None else arr)  # a private copy
    return out
