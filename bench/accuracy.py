"""Accuracy benchmark: LRA-diffusion against kNN vote and the linear probes on several
feature spaces and noise kinds, every method on the same features and labels, through
the pipeline's own stages (noise -> retrieve -> train -> evaluate).

    uv run python -m bench.accuracy            # the full grid: 5 spaces x 5 noises x 3 seeds
    uv run python -m bench.accuracy --quick    # the digits spaces, seed 0 (15 cells)
    uv run python -m bench.accuracy --spaces rgb3072 --noises pmd70 --seeds 0 1 2
    uv run python -m bench.accuracy --quick --jobs 1   # one cell at a time
    uv run python -m bench.accuracy --quick --retrieve-k auto \
        --out bench/results/accuracy_k_auto.json         # k chosen on validation
    uv run python -m bench.accuracy --pick-by-val bench/results/accuracy_k_auto.json
    uv run python -m bench.accuracy --spaces digits64lt --set train.class_balance=inverse \
        --out bench/results/accuracy_longtail_inverse.json  # class-balanced loss

Cells run `--jobs` at a time (default: one per usable CPU, each on one thread). The
digits cells train on one thread anyway (their steps are too small to split,
stages/train.py), so on 2 cores two cells at once take about half the wall time.

Resumable cell by cell: each finished cell is written to bench/results/accuracy.json at
once, and a rerun skips the cells already there with the same params and the same
space version (bench/spaces.py; `--redo` reruns them). The feature spaces are built once
under `--work`. For seed s, noise.seed = train.seed = s. Model selection uses the
validation split only; the test accuracies are read from evaluate's metrics.json and
never feed back into anything.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import yaml

from bench.auto_balance import fill_cache, noise_and_retrieve, resolve_auto
from bench.spawned import run_spawned
from bench.spaces import ALL_SPACES, DIGIT_SPACES, SPACES, build_space, space_version

NOISES = {
    "sym40": {"kind": "symmetric", "rate": 0.4},
    "pair40": {"kind": "pairflip", "rate": 0.4},
    "pmd35": {"kind": "pmd", "pmd_type": "I", "pmd_factor": 1.43},
    "pmd70": {"kind": "pmd", "pmd_type": "I", "pmd_factor": 3.40},
    "hybrid": {"kind": "hybrid", "pmd_type": "I", "pmd_factor": 1.43,
               "hybrid_on_top": "symmetric", "rate": 0.3},
}
METHODS = ("lra_diffusion", "knn_vote", "noisy_linear", "clean_linear")

# Training settings per space on top of params.yaml's train section (the digits default).
# The synthetic spaces use the paper's CIFAR settings (batch 256, width 512) with fewer
# epochs, so that the full grid fits in 3 hours on a 2-core CPU.
_SYNTH_20K_OR_LESS = {"batch_size": 256, "epochs": 60, "warmup_epochs": 3, "eval_every": 5}
TRAIN_OVERRIDES = {
    "synth10k": _SYNTH_20K_OR_LESS,
    "synth45k": {"batch_size": 256, "epochs": 30, "warmup_epochs": 2, "eval_every": 3},
    "synth100c": _SYNTH_20K_OR_LESS,
}
RESULTS = Path("bench/results/accuracy.json")


def cell_params(base: dict, space: str, noise: str, seed: int) -> dict:
    """The params.yaml of one cell."""
    train = {**base["train"], **TRAIN_OVERRIDES.get(space, {}), "seed": seed}
    noise_cfg = {**base["noise"], **NOISES[noise], "seed": seed}
    return {**base, "noise": noise_cfg, "train": train}


# params.yaml sections no stage of a cell reads (the report runs after evaluate): a change
# there must not make finished cells look stale.
UNUSED_SECTIONS = ("report",)


# Params added after cells were run, at the value that reproduces the older runs bit
# for bit: (section, key) -> that value. A cell's key leaves them out at that value, so
# adding one does not make every finished cell look stale; any other value does.
ADDED_AT_OLD_BEHAVIOUR = {("train", "class_balance"): "none"}


def params_key(params: dict, *, ignore: tuple[str, ...] = UNUSED_SECTIONS) -> str:
    """Digest of the params a cell's stages read (all but the `ignore` sections, and the
    ADDED_AT_OLD_BEHAVIOUR keys at their old-behaviour value)."""
    used = {k: dict(v) if isinstance(v, dict) else v
            for k, v in params.items() if k not in ignore}
    for (section, key), value in ADDED_AT_OLD_BEHAVIOUR.items():
        if isinstance(used.get(section), dict) and used[section].get(key, value) == value:
            used[section].pop(key, None)
    return hashlib.sha256(json.dumps(used, sort_keys=True).encode()).hexdigest()[:16]


def is_current(done: dict | None, params: dict, version: str) -> bool:
    """Whether a finished cell ran with these params on this version of its space."""
    return (done is not None and done.get("space_version") == version
            and params_key(done["params"]) == params_key(params))


def run_cell(space_dir: Path, params: dict, work: Path, *, threads: int) -> dict:
    """noise -> retrieve -> train -> evaluate in `work`; returns evaluate's metrics."""
    from stages.evaluate import evaluate
    from stages.train import train

    pfile = work / "params.yaml"
    pfile.write_text(yaml.safe_dump(params))
    emb = space_dir / "embeddings/embeddings.parquet"
    started = time.perf_counter()
    noise_and_retrieve(space_dir, pfile, work, threads=threads)
    train(params=pfile, embeddings=emb, labels=work / "labels/labels.parquet",
          retrieval=work / "retrieval/neighbours.parquet",
          index=space_dir / "index", out_dir=work / "model", device="auto",
          threads=threads, progress=False)
    evaluate(params=pfile, model=work / "model/model.pt", embeddings=emb,
             labels=work / "labels/labels.parquet",
             retrieval=work / "retrieval/neighbours.parquet", out_dir=work / "evaluate",
             device="auto", chunk_rows=4096, threads=threads, progress=False)
    metrics = json.loads((work / "evaluate/metrics.json").read_text())
    metrics["train"] = json.loads((work / "model/train.json").read_text())
    metrics["retrieval"] = json.loads((work / "retrieval/retrieval.json").read_text())
    metrics["seconds"] = round(time.perf_counter() - started, 1)
    return metrics


def _run_cell_in_tmp(space_dir: Path, params: dict, threads: int) -> dict:
    """run_cell in a fresh temporary folder (a worker process's entry point)."""
    with tempfile.TemporaryDirectory() as tmp:
        return run_cell(space_dir, params, Path(tmp), threads=threads)


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def job_threads(jobs: int, threads: int) -> int:
    """Threads per cell: `threads` when given, else the stages' defaults for one job
    (0) and the usable CPUs shared out between several."""
    if threads or jobs == 1:
        return threads
    return max(1, usable_cpus() // jobs)


# Seconds per cell, one job on the 2-core VM (bench/README.md's table, 2026-12-02): only
# used to start the longest cells first, so that no long cell is left running alone at
# the end of a parallel grid while the other CPUs idle.
CELL_SECONDS = {"digits64": 110, "rgb3072": 210, "proj768": 125, "synth10k": 105,
                "synth45k": 400, "synth100c": 130, "digits64lt": 32}


def longest_first(names: list[str]) -> list[str]:
    """Cell names ("space/noise/seed") by expected run time, longest first; ties keep
    their order (a stable sort), so the order is deterministic."""
    return sorted(names, key=lambda name: -CELL_SECONDS.get(name.split("/")[0], 0))


def load_results(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {"cells": {}}


def save_results(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _fmt(values: list[float]) -> str:
    if not values:
        return "-"
    mean = 100 * statistics.mean(values)
    if len(values) == 1:
        return f"{mean:.1f}"
    return f"{mean:.1f} ± {100 * statistics.stdev(values):.1f}"


def cell_k(cell: dict) -> int | str:
    """The k a cell's model was trained at: train's (after a retry at another k), else
    the one retrieve chose (retrieve.k = auto), else the params' (cells run before
    train.json and retrieval.json recorded it), else "?"."""
    for record in (cell["metrics"].get("train", {}), cell["metrics"].get("retrieval", {})):
        if record.get("k") is not None:
            return record["k"]
    return cell.get("params", {}).get("retrieve", {}).get("k", "?")


def cell_ks(cells: list[dict]) -> str:
    """'10' when every seed used the same k, else the ks in seed order ('50/50/20')."""
    ks = [cell_k(c) for c in sorted(cells, key=lambda c: c["seed"])]
    return str(ks[0]) if len(set(ks)) == 1 else "/".join(str(k) for k in ks)


def table(results: dict) -> str:
    """Markdown: one row per (space, noise), test accuracy mean ± sd over the seeds run
    on the current version of the space (cells on an older one are left out)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for cell in results["cells"].values():
        if cell.get("space_version") != space_version(cell["space"]):
            continue
        groups.setdefault((cell["space"], cell["noise"]), []).append(cell)
    lines = ["| space | noise | rate | seeds | k | LRA-diffusion | kNN vote | noisy linear | "
             "clean linear | LRA - best baseline | below baseline (val) | s / cell |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for space in ALL_SPACES:
        for noise in NOISES:
            cells = groups.get((space, noise))
            if not cells:
                continue
            acc = {m: [c["metrics"]["test_accuracy"][m] for c in cells] for m in METHODS}
            rate = statistics.mean(c["metrics"]["noise"]["observed_rate"] for c in cells)
            gap = 100 * (statistics.mean(acc["lra_diffusion"])
                         - max(statistics.mean(acc["knn_vote"]),
                               statistics.mean(acc["noisy_linear"])))
            flagged = sum(bool(c["metrics"]["model"].get("below_baseline")) for c in cells)
            secs = statistics.mean(c["metrics"]["seconds"] for c in cells)
            cols = [_fmt(acc[m]) for m in METHODS]
            lines.append(f"| {space} | {noise} | {rate:.3f} | {len(cells)} | {cell_ks(cells)} | "
                         f"{' | '.join(cols)} | {gap:+.1f} | {flagged}/{len(cells)} | "
                         f"{secs:.0f} |")
    return "\n".join(lines)


def validation_pick(first: dict, second: dict) -> str:
    """Markdown: per (space, noise), LRA-diffusion's mean test accuracy in two result files
    of the same grid (e.g. k = 10 and k = auto) and when each cell keeps the run with the
    higher LRA validation accuracy (ties: the first), over the cells both files hold."""
    groups: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    for name, cell in second["cells"].items():
        other = first["cells"].get(name)
        if other is None:
            continue
        runs = [(c["metrics"]["val_accuracy"]["lra_diffusion"],
                 c["metrics"]["test_accuracy"]["lra_diffusion"]) for c in (other, cell)]
        kept = runs[1][1] if runs[1][0] > runs[0][0] else runs[0][1]
        groups.setdefault((cell["space"], cell["noise"]), []).append(
            (runs[0][1], runs[1][1], kept))
    lines = ["| space | noise | seeds | first | second | kept by validation |",
             "|---|---|---|---|---|---|"]
    for space in ALL_SPACES:
        for noise in NOISES:
            rows = groups.get((space, noise))
            if rows:
                cols = [f"{100 * statistics.mean(r[i] for r in rows):.1f}" for i in range(3)]
                lines.append(f"| {space} | {noise} | {len(rows)} | {' | '.join(cols)} |")
    return "\n".join(lines)


def with_override(base: dict, item: str, parser: argparse.ArgumentParser) -> dict:
    """base with one `--set SECTION.KEY=VALUE` applied (VALUE read as YAML)."""
    dotted, sep, text = item.partition("=")
    section, dot, key = dotted.partition(".")
    if not sep or not dot or not isinstance(base.get(section), dict) \
            or key not in base[section]:
        parser.error(f"--set {item}: expected SECTION.KEY=VALUE with a key params.yaml has")
    return {**base, section: {**base[section], key: yaml.safe_load(text)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="the digits spaces, seed 0 (within 20 minutes on 2 cores)")
    parser.add_argument("--spaces", nargs="+", choices=ALL_SPACES,
                        help=f"default: the grid, {', '.join(SPACES)}")
    parser.add_argument("--noises", nargs="+", choices=tuple(NOISES))
    parser.add_argument("--seeds", nargs="+", type=int)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--work", type=Path, default=Path(".lra-cache/bench-accuracy"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--retrieve-k", default=None,
                        help="retrieve.k for every cell instead of params.yaml's (an integer "
                             "or auto); give it its own --out")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.KEY=VALUE",
                        help="a params.yaml value for every cell (repeatable; the value is "
                             "read as YAML), e.g. train.class_balance=inverse; give it its "
                             "own --out")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch / FAISS threads per cell (0: each stage's default with "
                             "one job, the CPUs shared out between jobs with several)")
    parser.add_argument("--jobs", type=int, default=0,
                        help="cells run at once, each in its own process (0: one per "
                             "usable CPU)")
    parser.add_argument("--redo", action="store_true", help="rerun cells already done")
    parser.add_argument("--table", action="store_true", help="only print the table")
    parser.add_argument("--pick-by-val", type=Path, default=None, metavar="OTHER_JSON",
                        help="only print LRA-diffusion's test accuracy in --out, in OTHER_JSON, "
                             "and keeping per cell the run with the higher validation accuracy")
    args = parser.parse_args()
    results = load_results(args.out)
    if args.pick_by_val is not None:
        print(validation_pick(results, load_results(args.pick_by_val)))
        return
    if args.table:
        print(table(results))
        return
    spaces = args.spaces or (DIGIT_SPACES if args.quick else SPACES)
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    noises = args.noises or tuple(NOISES)
    base = yaml.safe_load(args.params.read_text())
    if args.retrieve_k is not None:
        k = args.retrieve_k
        base["retrieve"] = {**base["retrieve"], "k": int(k) if k.isdigit() else k}
    for item in args.overrides:
        base = with_override(base, item, parser)
    results["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "processor": platform.processor() or platform.machine()}
    jobs = args.jobs or usable_cpus()
    threads = job_threads(jobs, args.threads)
    todo = []  # (name, space, noise, seed, space_dir, params)
    started = time.perf_counter()
    space_dirs = {space: build_space(space, args.work) for space in spaces}
    cells = [(name, space, noise, seed, cell_params(base, space, noise, seed))
             for space in spaces for noise in noises for seed in seeds
             for name in [f"{space}/{noise}/{seed}"]]
    imbalances = results.setdefault("candidate_imbalance", {})  # bench.auto_balance
    fill_cache([(space_dirs[c[1]], c[4], c[1], space_version(c[1])) for c in cells],
               imbalances, jobs=jobs, threads=threads,
               on_each=lambda: save_results(results, args.out))
    for name, space, noise, seed, params in cells:
        params, _ = resolve_auto(space_dirs[space], params, space, space_version(space),
                                 imbalances, threads=threads)
        done = results["cells"].get(name)
        if is_current(done, params, space_version(space)) and not args.redo:
            continue
        todo.append((name, space, noise, seed, space_dirs[space], params))

    def finished(item: tuple, metrics: dict) -> None:
        name, space, noise, seed, _, params = item
        metrics["jobs"], metrics["threads"] = jobs, threads
        results["cells"][name] = {"space": space, "noise": noise, "seed": seed,
                                  "space_version": space_version(space),
                                  "params_key": params_key(params),
                                  "params": params, "metrics": metrics}
        save_results(results, args.out)  # at once: an interrupted grid resumes from here
        acc = metrics["test_accuracy"]
        print(f"{name}: " + ", ".join(f"{m} {acc[m]:.4f}" for m in METHODS)
              + f" ({metrics['seconds']:.0f} s)", flush=True)

    if jobs > 1:  # the longest cells first, so that the last to finish is a short one
        by_name = {item[0]: item for item in todo}
        todo = [by_name[name] for name in longest_first(list(by_name))]
    run_spawned("bench.accuracy", "_run_cell_in_tmp",
                [(item, (item[4], item[5], threads), {}) for item in todo], jobs=jobs,
                on_result=finished)
    print(f"wall time {time.perf_counter() - started:.0f} s")
    print(table(results))


if __name__ == "__main__":
    main()
