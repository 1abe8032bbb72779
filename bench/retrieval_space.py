"""Which embedding space should retrieval search? The neighbour vote's validation accuracy
under cosine on the raw embeddings (what `lra index` builds), on train-centred ones, and on
train-standardised ones (what the network's input is), for k in 10, 50, 100, 200.

    uv run python -m bench.retrieval_space                          # digits spaces, 3 noises
    uv run python -m bench.retrieval_space --spaces synth10k --seeds 0

No training: per cell, `lra noise` on the accuracy benchmark's params (bench.accuracy's
cells, noise.seed = seed), then an exact search of the validation rows against the train
rows in each space and evaluate's kNN vote (`pipeline.retrieval.knn_vote`), scored
against the validation split's labels (`Labels.selection_truth`). Test rows are never
read. Results: bench/results/retrieval_space.json (rewritten per cell when rerun).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import yaml

from bench.accuracy import NOISES, cell_params, load_results, save_results
from bench.spaces import DIGIT_SPACES, SPACES, build_space
from pipeline.retrieval import knn_vote
from pipeline.tables import read_embeddings, read_labels

RESULTS = Path("bench/results/retrieval_space.json")
KS = (10, 50, 100, 200)
TRANSFORMS = ("raw", "centred", "standardised")


def transformed(x: np.ndarray, train: np.ndarray) -> dict[str, np.ndarray]:
    """x: (N, D) float32 -> each space's L2-normalised (N, D) float32 rows; the centre and
    scale come from the train rows only."""
    mean = x[train].mean(axis=0)
    std = x[train].std(axis=0)
    spaces = {"raw": x, "centred": x - mean, "standardised": (x - mean) / np.maximum(std, 1e-8)}
    return {name: (z / np.linalg.norm(z, axis=1, keepdims=True)).astype(np.float32)
            for name, z in spaces.items()}


def vote_accuracy(z: np.ndarray, observed: np.ndarray, truth: np.ndarray, train: np.ndarray,
                  val: np.ndarray, num_classes: int) -> list[float]:
    """Validation accuracy of the kNN vote over the first k exact cosine neighbours among
    the train rows, for each k of KS. z: (N, D) unit rows; train, val: (n,) positions."""
    sims = z[val] @ z[train].T  # (V, N_train); validation rows are never train rows
    top = np.argpartition(-sims, max(KS) - 1, axis=1)[:, :max(KS)]  # unordered top k
    order = np.take_along_axis(top, np.argsort(-np.take_along_axis(sims, top, axis=1),
                                                axis=1, kind="stable"), axis=1)
    neighbour_labels = observed[train[order]]
    ranked = np.take_along_axis(sims, order, axis=1)
    return [round(float((knn_vote(neighbour_labels[:, :k], ranked[:, :k], num_classes)
                         == truth).mean()), 6) for k in KS]


def run_cell(space_dir: Path, params: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        from stages.noise import noise

        pfile = Path(tmp) / "params.yaml"
        pfile.write_text(yaml.safe_dump(params))
        noise(params=pfile, prepared=space_dir / "prepared/samples.parquet",
              embeddings=space_dir / "embeddings/embeddings.parquet",
              out_dir=Path(tmp) / "labels", progress=False)
        lab = read_labels(Path(tmp) / "labels/labels.parquet")
    emb = read_embeddings(space_dir / "embeddings/embeddings.parquet")
    train, val = np.flatnonzero(emb.split == "train"), np.flatnonzero(emb.split == "val")
    truth = lab.selection_truth(val)
    spaces = transformed(emb.vectors, train)
    return {"ks": list(KS), "validation_rows": len(val),
            **{name: vote_accuracy(spaces[name], lab.observed, truth, train, val,
                                   lab.num_classes) for name in TRANSFORMS}}


def table(results: dict) -> str:
    lines = ["| space | noise | seed | " + " | ".join(f"{t} (k = {'/'.join(map(str, KS))})"
                                                   for t in TRANSFORMS) + " |",
             "|---|---|---|" + "---|" * len(TRANSFORMS)]
    for name in sorted(results["cells"], key=lambda n: (SPACES.index(n.split("/")[0]), n)):
        cell = results["cells"][name]
        lines.append(f"| {name.replace('/', ' | ')} | " + " | ".join(
            "/".join(f"{a:.3f}" for a in cell[t]) for t in TRANSFORMS) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spaces", nargs="+", choices=SPACES, default=list(DIGIT_SPACES))
    parser.add_argument("--noises", nargs="+", choices=tuple(NOISES),
                        default=["sym40", "pair40", "pmd70"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--work", type=Path, default=Path(".lra-cache/bench-accuracy"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--table", action="store_true", help="only print the table")
    args = parser.parse_args()
    results = load_results(args.out)
    if not args.table:
        base = yaml.safe_load(args.params.read_text())
        for space in args.spaces:
            folder = build_space(space, args.work)
            for noise in args.noises:
                for seed in args.seeds:
                    name = f"{space}/{noise}/{seed}"
                    results["cells"][name] = run_cell(folder, cell_params(base, space,
                                                                          noise, seed))
                    save_results(results, args.out)
                    print(name, {t: results["cells"][name][t] for t in TRANSFORMS},
                          flush=True)
    print(table(results))


if __name__ == "__main__":
    main()
