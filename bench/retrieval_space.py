"""Which embedding space does retrieval search? Per cell of the accuracy grid, `lra noise`
and `lra retrieve` on the accuracy benchmark's params (bench.accuracy's cells, noise.seed =
seed) and the space's index (raw, train-centred and train-standardised cosine,
`index.spaces`): retrieve's validation neighbour vote in each space for each k of
`retrieve.k_choices`, and the space it chose (`pipeline.retrieval.choose_space`).

    uv run python -m bench.retrieval_space                          # digits spaces, every noise
    uv run python -m bench.retrieval_space --spaces synth10k --seeds 0

No training, and test rows are never read. Results: bench/results/retrieval_space.json
(rewritten per cell when rerun).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import yaml

from bench.accuracy import NOISES, cell_params, load_results, save_results
from bench.spaces import DIGIT_SPACES, SPACES, build_space
from pipeline.config import SPACES as RETRIEVAL_SPACES

RESULTS = Path("bench/results/retrieval_space.json")


def run_cell(space_dir: Path, params: dict) -> dict:
    """noise -> retrieve in a temporary folder; returns retrieve's k_selection record."""
    from stages.noise import noise
    from stages.retrieve import retrieve

    emb = space_dir / "embeddings/embeddings.parquet"
    with tempfile.TemporaryDirectory() as tmp:
        pfile = Path(tmp) / "params.yaml"
        pfile.write_text(yaml.safe_dump(params))
        noise(params=pfile, prepared=space_dir / "prepared/samples.parquet", embeddings=emb,
              out_dir=Path(tmp) / "labels", progress=False)
        retrieve(params=pfile, index=space_dir / "index", embeddings=emb,
                 labels=Path(tmp) / "labels/labels.parquet",
                 out_dir=Path(tmp) / "retrieval", progress=False)
        selection = json.loads((Path(tmp) / "retrieval/retrieval.json").read_text())
    return selection["k_selection"]


def table(results: dict) -> str:
    cells = results["cells"]
    ks = "/".join(str(k) for k in next(iter(cells.values()))["choices"]) if cells else ""
    lines = ["| space | noise | seed | " + " | ".join(f"{t} (k = {ks})"
                                                   for t in RETRIEVAL_SPACES) + " | chosen |",
             "|---|---|---|" + "---|" * (len(RETRIEVAL_SPACES) + 1)]
    for name in sorted(cells, key=lambda n: (SPACES.index(n.split("/")[0]), n)):
        cell = cells[name]
        lines.append(f"| {name.replace('/', ' | ')} | " + " | ".join(
            "/".join(f"{a:.3f}" for a in cell["vote_by_space"][t]) for t in RETRIEVAL_SPACES)
            + f" | {cell['space']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spaces", nargs="+", choices=SPACES, default=list(DIGIT_SPACES))
    parser.add_argument("--noises", nargs="+", choices=tuple(NOISES),
                        default=list(NOISES))
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
                    print(name, results["cells"][name]["space"],
                          results["cells"][name]["vote_by_space"], flush=True)
    print(table(results))


if __name__ == "__main__":
    main()
