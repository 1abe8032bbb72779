"""Accuracy over several seeds on the current params (the README's quality table).

    uv run python -m bench.seeds --seeds 0 1 2

For each seed s, noise.seed = train.seed = s (a new noise draw and a new training run);
prepare / embed / index are shared (they do not depend on the seed) and taken from
data/ (run `uv run dvc repro` first). Each seed runs the real stage commands into a
temporary directory; results go to bench/results/seeds.json and a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import yaml

from stages.evaluate import evaluate
from stages.noise import noise
from stages.retrieve import retrieve
from stages.train import train

METHODS = ("lra_diffusion", "knn_vote", "noisy_linear", "clean_linear")


def run_seed(seed: int, params: dict, data: Path, work: Path, threads: int = 0) -> dict:
    cfg = {**params, "noise": {**params["noise"], "seed": seed},
           "train": {**params["train"], "seed": seed}}
    pfile = work / "params.yaml"
    pfile.write_text(yaml.safe_dump(cfg))
    started = time.perf_counter()
    noise(params=pfile, prepared=data / "prepared/samples.parquet",
          embeddings=data / "embeddings/embeddings.parquet", out_dir=work / "labels",
          threads=threads, progress=False)
    retrieve(params=pfile, index=data / "index",
             embeddings=data / "embeddings/embeddings.parquet",
             labels=work / "labels/labels.parquet", out_dir=work / "retrieval", threads=threads,
             progress=False)
    train(params=pfile, embeddings=data / "embeddings/embeddings.parquet",
          labels=work / "labels/labels.parquet", retrieval=work / "retrieval/neighbours.parquet",
          index=data / "index", out_dir=work / "model", device="auto",
          threads=threads, progress=False)
    evaluate(params=pfile, model=work / "model/model.pt",
             embeddings=data / "embeddings/embeddings.parquet",
             labels=work / "labels/labels.parquet",
             retrieval=work / "retrieval/neighbours.parquet", out_dir=work / "evaluate",
             device="auto", chunk_rows=4096, threads=threads, progress=False)
    metrics = json.loads((work / "evaluate/metrics.json").read_text())
    metrics["seconds"] = time.perf_counter() - started
    return metrics


def table(results: list[dict]) -> str:
    lines = ["| method | test accuracy (mean) | std | min | max |", "|---|---|---|---|---|"]
    for m in METHODS:
        values = [r["test_accuracy"][m] for r in results if r["test_accuracy"].get(m) is not None]
        if not values:
            continue
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        lines.append(f"| {m} | {statistics.mean(values):.4f} | {std:.4f} | "
                     f"{min(values):.4f} | {max(values):.4f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--data", type=Path, default=Path("data"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/seeds.json"))
    parser.add_argument("--threads", type=int, default=0, help="torch / FAISS threads")
    args = parser.parse_args()
    params = yaml.safe_load(args.params.read_text())
    results = []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            r = run_seed(seed, params, args.data, Path(tmp), threads=args.threads)
        r["seed"] = seed
        results.append(r)
        print(f"seed {seed}: " + ", ".join(f"{m} {r['test_accuracy'][m]}" for m in METHODS)
              + f" ({r['seconds']:.0f} s)", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"params": params, "runs": results}, indent=2) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
