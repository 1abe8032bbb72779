"""The relabel round of README, Troubleshooting, measured: one pipeline run, `lra report`,
the report's suggested labels as a `noise.kind: file` table (what `lra export --policy
relabel` writes), and a second run on them. Both runs go through the real stage functions
on the accuracy benchmark's feature spaces (bench/spaces.py).

    uv run python -m bench.relabel_round                                   # PMD 70 %, digits spaces, seed 0
    uv run python -m bench.relabel_round --spaces digits64 --seeds 0 1 2

For seed s, both rounds use noise.seed = train.seed = s (bench.accuracy's cells), so
round 1 is that benchmark's cell. Test accuracies are read from evaluate's metrics.json
of each round; nothing is selected on them. Results: bench/results/relabel_round.json
(one entry per space / noise / seed, rewritten when rerun).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from bench.accuracy import NOISES, cell_params, load_results, run_cell, save_results
from bench.label_issues import run_pipeline
from bench.spaces import DIGIT_SPACES, SPACES, build_space
from pipeline.export import apply_policy, read_decisions
from pipeline.tables import Labels, read_labels

RESULTS = Path("bench/results/relabel_round.json")


def relabel_table(issues: Path, lab: Labels) -> tuple[np.ndarray, np.ndarray]:
    """(sample_id, label) of every row after `lra export --policy relabel` (its own
    functions): flagged train labels take the suggested label, the rest stay."""
    rows, label = apply_policy("relabel", lab, read_decisions(issues, lab))
    return lab.sample_id[rows], label


def run_round(space_dir: Path, params: dict, work: Path, *, threads: int) -> dict:
    """Round 1 (pipeline + report), the relabel table, round 2; returns the cell's record."""
    first, second = work / "round1", work / "round2"
    first.mkdir()
    second.mkdir()
    started = time.perf_counter()
    run_pipeline(space_dir, params, first, threads=threads)
    report = json.loads((first / "report/report.json").read_text())
    lab = read_labels(first / "labels/labels.parquet")
    ids, label = relabel_table(first / "report/label_issues.parquet", lab)
    table = work / "relabel.csv"
    table.write_text("sample_id,label\n" + "".join(f"{a},{b}\n" for a, b in zip(ids, label)))
    train = lab.split == "train"  # relabel keeps every row: positions = sample ids
    again = json.loads(json.dumps(params))
    again["noise"] = {**again["noise"], "kind": "file", "file": str(table)}
    m1 = json.loads((first / "evaluate/metrics.json").read_text())
    m2 = run_cell(space_dir, again, second, threads=threads)
    return {"scored_by": report["scored_by"],
            "relabelled_right": float((label[train] == lab.clean[train]).mean()),
            "given_right": float((lab.observed[train] == lab.clean[train]).mean()),
            "round1": {k: m1[k] for k in ("test_accuracy", "val_accuracy", "model")},
            "round2": {k: m2[k] for k in ("test_accuracy", "val_accuracy", "model")},
            "seconds": round(time.perf_counter() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spaces", nargs="+", choices=SPACES, default=list(DIGIT_SPACES))
    parser.add_argument("--noises", nargs="+", choices=tuple(NOISES), default=["pmd70"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--work", type=Path, default=Path(".lra-cache/bench-accuracy"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch / FAISS threads (0: each stage's default)")
    args = parser.parse_args()
    base = yaml.safe_load(args.params.read_text())
    results = load_results(args.out)
    for space in args.spaces:
        space_dir = build_space(space, args.work)
        for noise in args.noises:
            for seed in args.seeds:
                params = cell_params(base, space, noise, seed)
                with tempfile.TemporaryDirectory() as tmp:
                    cell = run_round(space_dir, params, Path(tmp), threads=args.threads)
                name = f"{space}/{noise}/{seed}"
                results["cells"][name] = {"space": space, "noise": noise, "seed": seed,
                                          "params": params, **cell}
                save_results(results, args.out)
                r1, r2 = cell["round1"]["test_accuracy"], cell["round2"]["test_accuracy"]
                print(f"{name}: scored by {cell['scored_by']}, relabelled labels "
                      f"{cell['relabelled_right']:.3f} right; LRA {r1['lra_diffusion']:.4f} "
                      f"-> {r2['lra_diffusion']:.4f}, noisy linear (round 1) "
                      f"{r1['noisy_linear']:.4f} ({cell['seconds']:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
