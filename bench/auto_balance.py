"""train.class_balance "auto", resolved before a benchmark cell trains.

`lra train` turns "auto" into "none" or "inverse" from the retrieved candidate labels'
class imbalance (pipeline.training.resolve_class_balance). A cell whose "auto" resolves
to "none" trains exactly what a cell run at "none" trained, so the benchmarks key a
cell by the resolved value: finished cells of either value stay current, and only the
cells whose labels are imbalanced run again. Resolving costs the cell's noise and
retrieve stages (seconds to a minute); the imbalance is cached in the results file, keyed
by the space, its version and every param those stages read.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Callable

import yaml

from bench.spawned import run_spawned


def noise_and_retrieve(space_dir: Path, params_file: Path, work: Path, *, threads: int
                       ) -> None:
    """A cell's first two stages: labels/ and retrieval/ under `work`."""
    from stages.noise import noise
    from stages.retrieve import retrieve

    emb = space_dir / "embeddings/embeddings.parquet"
    noise(params=params_file, prepared=space_dir / "prepared/samples.parquet", embeddings=emb,
          out_dir=work / "labels")
    retrieve(params=params_file, index=space_dir / "index", embeddings=emb,
             labels=work / "labels/labels.parquet", out_dir=work / "retrieval",
             threads=threads)


def imbalance_key(params: dict, space: str, version: str) -> str:
    """Digest of what the candidate labels depend on: the space and its version, and
    every params section but train's and report's."""
    used = {k: v for k, v in params.items() if k not in ("train", "report")}
    text = json.dumps({"params": used, "space": space, "space_version": version},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def candidate_imbalance(space_dir: Path, params: dict, *, threads: int) -> float:
    """class_imbalance of the cell's train rows' candidate labels (run in a temporary
    folder; nothing is kept)."""
    import torch

    from pipeline.neighbours import read_retrieval
    from pipeline.tables import read_labels
    from pipeline.training import class_imbalance

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "params.yaml").write_text(yaml.safe_dump(params))
        noise_and_retrieve(space_dir, work / "params.yaml", work, threads=threads)
        table = read_retrieval(work / "retrieval/neighbours.parquet")
        num_classes = read_labels(work / "labels/labels.parquet").num_classes
        # Inside the folder's lifetime: the table's arrays may view its file's pages.
        train = torch.from_numpy(table.candidates[table.split == "train"].copy())
        return class_imbalance(train, num_classes)


def resolve_auto(space_dir: Path, params: dict, space: str, version: str, cache: dict, *,
                 threads: int) -> tuple[dict, float | None]:
    """(params with train.class_balance "auto" replaced by what `lra train` applies, the
    candidate imbalance it was resolved on); params unchanged and None when not "auto".
    cache: imbalance_key -> imbalance, filled in here."""
    from pipeline.training import resolve_class_balance

    if params["train"].get("class_balance") != "auto":
        return params, None
    key = imbalance_key(params, space, version)
    if key not in cache:
        cache[key] = candidate_imbalance(space_dir, params, threads=threads)
    imbalance = cache[key]
    balance = resolve_class_balance("auto", imbalance)
    return {**params, "train": {**params["train"], "class_balance": balance}}, imbalance


def fill_cache(cells: list[tuple[Path, dict, str, str]], cache: dict, *, jobs: int,
               threads: int, on_each: Callable[[], None] = lambda: None) -> None:
    """Compute the imbalance of every (space_dir, params, space, version) cell at
    class_balance "auto" that `cache` lacks, `jobs` cells at a time (each in its own
    spawned process, like the cells themselves), so that resolve_auto finds them all.
    on_each: called after each one is added (e.g. to save the cache)."""
    missing: dict[str, tuple[Path, dict]] = {}
    for space_dir, params, space, version in cells:
        key = imbalance_key(params, space, version)
        if params["train"].get("class_balance") == "auto" and key not in cache:
            missing.setdefault(key, (space_dir, params))

    def add(key: str, imbalance: float) -> None:
        cache[key] = imbalance
        on_each()

    run_spawned("bench.auto_balance", "candidate_imbalance",
                [(key, (space_dir, params), {"threads": threads})
                 for key, (space_dir, params) in missing.items()], jobs=jobs, on_result=add)
