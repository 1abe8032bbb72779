"""Label-issue detection benchmark: `lra report`'s flag and label_score against cleanlab's
confident learning, on the same embeddings and the same observed labels, scored against
the injected corruptions.

    uv sync --group bench                          # cleanlab (benchmark-only dependency)
    uv run python -m bench.label_issues            # digits64, 5 noise kinds, seed 0
    uv run python -m bench.label_issues --noises pmd70 --seeds 0 1 2
    uv run python -m bench.label_issues --table    # only print the table

Per cell (noise kind, seed; noise.seed = train.seed = seed, the rest of params.yaml as
is): noise -> retrieve -> train -> evaluate -> report through the real stage functions,
then from data/report/label_issues.parquet precision / recall / F1 of `is_label_issue`
and AUROC of `-label_score` against `is_corrupted`. Beside it, cleanlab 2.9:
`cleanlab.filter.find_label_issues(labels, pred_probs)` (default filter_by) and AUROC of
`1 - cleanlab.rank.get_label_quality_scores(labels, pred_probs)`, with out-of-sample
pred_probs from a 5-fold `cross_val_predict` of `LogisticRegression(max_iter=1000)` on
the standardised train rows of the same embeddings.parquet and the observed train labels
of the same labels.parquet. Resumable cell by cell like bench/accuracy.py
(bench/results/label_issues.json; `--redo` reruns finished cells).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from bench.accuracy import NOISES, cell_params, load_results, params_key, save_results
from pipeline.issues import auroc  # the report's own AUROC: one definition

RESULTS = Path("bench/results/label_issues.json")
SPACE = "digits64"
METHODS = ("lra_report", "cleanlab")
CV_FOLDS = 5


def detection_metrics(flag: np.ndarray, issue_score: np.ndarray, corrupted: np.ndarray
                      ) -> dict[str, float | int | None]:
    """Precision, recall, F1 of the boolean `flag` and AUROC of `issue_score` (higher =
    more likely a wrong label) against the boolean `corrupted`; all (n,). Precision is
    None when nothing is flagged, recall when nothing is corrupted, F1 when either is
    None or both are 0."""
    flag = np.asarray(flag, dtype=bool)
    corrupted = np.asarray(corrupted, dtype=bool)
    if flag.shape != corrupted.shape or np.shape(issue_score) != corrupted.shape:
        raise ValueError(f"flag {flag.shape}, issue_score {np.shape(issue_score)} and "
                         f"corrupted {corrupted.shape} must have the same shape")
    tp = int((flag & corrupted).sum())
    flagged, actual = int(flag.sum()), int(corrupted.sum())
    precision = tp / flagged if flagged else None
    recall = tp / actual if actual else None
    f1 = (2 * precision * recall / (precision + recall)
          if precision is not None and recall is not None and precision + recall > 0
          else None)
    return {"precision": precision, "recall": recall, "f1": f1,
            "auroc": auroc(issue_score, corrupted), "flagged": flagged,
            "true_positives": tp, "corrupted": actual}


def _require_cleanlab():
    try:
        import cleanlab.filter
        import cleanlab.rank
    except ImportError:
        sys.exit("bench.label_issues needs cleanlab (a benchmark-only dependency): "
                 "run `uv sync --group bench` first")
    return cleanlab


def run_pipeline(space_dir: Path, params: dict, work: Path, *, threads: int) -> float:
    """noise -> retrieve -> train -> evaluate (bench.accuracy.run_cell) -> report in
    `work`; returns the seconds taken."""
    from bench.accuracy import run_cell
    from stages.report import report

    started = time.perf_counter()
    run_cell(space_dir, params, work, threads=threads)
    report(params=work / "params.yaml", model=work / "model/model.pt",
           embeddings=space_dir / "embeddings/embeddings.parquet",
           labels=work / "labels/labels.parquet",
           retrieval=work / "retrieval/neighbours.parquet",
           predictions=work / "evaluate/predictions.parquet",
           prepared=space_dir / "prepared/samples.parquet",
           metrics=work / "evaluate/metrics.json", train_log=work / "model/train_log.csv",
           noise_summary=work / "labels/noise.json",
           retrieval_summary=work / "retrieval/retrieval.json", out_dir=work / "report",
           device="auto", chunk_rows=4096, threads=threads, progress=False)
    return time.perf_counter() - started


def lra_detection(issues_path: Path) -> tuple[dict, np.ndarray, np.ndarray]:
    """Metrics of label_issues.parquet; also its (sample_id, is_corrupted) for checks."""
    import pyarrow.parquet as pq

    t = pq.read_table(issues_path, columns=["sample_id", "label_score", "is_label_issue",
                                            "is_corrupted"])
    corrupted = t.column("is_corrupted").to_numpy(zero_copy_only=False).astype(bool)
    out = detection_metrics(t.column("is_label_issue").to_numpy(zero_copy_only=False),
                            -t.column("label_score").to_numpy().astype(np.float64),
                            corrupted)
    return out, t.column("sample_id").to_numpy(), corrupted


def cleanlab_detection(embeddings: Path, labels: Path
                       ) -> tuple[dict, np.ndarray, np.ndarray]:
    """cleanlab's find_label_issues / label quality scores from 5-fold out-of-sample
    logistic-regression pred_probs on the standardised train embeddings; also the train
    rows' (sample_id, corrupted)."""
    cleanlab = _require_cleanlab()
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_predict
    from sklearn.preprocessing import StandardScaler

    from pipeline.tables import open_embeddings, read_labels

    emb = open_embeddings(embeddings)
    lab = read_labels(labels)
    if not np.array_equal(emb.sample_id, lab.sample_id):
        raise ValueError("embeddings and labels list different samples")
    train = emb.rows("train")
    x = StandardScaler().fit_transform(emb.read_rows(train).astype(np.float64))  # (n, D)
    observed = lab.observed[train]
    clean = lab.clean[train]
    if (clean < 0).any():
        raise ValueError("some clean train labels are unknown: corruptions not measurable")
    started = time.perf_counter()
    # cv=5 on a classifier: StratifiedKFold without shuffling, and lbfgs: deterministic
    pred_probs = cross_val_predict(LogisticRegression(max_iter=1000), x, observed,
                                   cv=CV_FOLDS, method="predict_proba")  # (n, C)
    flag = cleanlab.filter.find_label_issues(observed, pred_probs)
    quality = cleanlab.rank.get_label_quality_scores(observed, pred_probs)
    out = detection_metrics(flag, 1.0 - quality, clean != observed)
    out["seconds"] = round(time.perf_counter() - started, 1)
    out["oos_accuracy_vs_observed"] = float((pred_probs.argmax(1) == observed).mean())
    out["oos_accuracy_vs_clean"] = float((pred_probs.argmax(1) == clean).mean())
    return out, emb.sample_id[train], clean != observed


def _fmt(values: list) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def table(results: dict) -> str:
    """Markdown: one row per noise kind, each metric for both methods (mean ± sd over
    the seeds run)."""
    groups: dict[str, list[dict]] = {}
    for cell in results["cells"].values():
        groups.setdefault(cell["noise"], []).append(cell)
    head = ["noise", "seeds", "corrupted"]
    for metric in ("precision", "recall", "F1", "AUROC"):
        head += [f"{metric} LRA", f"{metric} cleanlab"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for noise in NOISES:
        cells = groups.get(noise)
        if not cells:
            continue
        n = statistics.mean(c["lra_report"]["corrupted"] for c in cells)
        total = statistics.mean(c["train_samples"] for c in cells)
        cols = [noise, str(len(cells)), f"{n:.0f} / {total:.0f}"]
        for metric in ("precision", "recall", "f1", "auroc"):
            for method in METHODS:
                cols.append(_fmt([c[method][metric] for c in cells]))
        lines.append("| " + " | ".join(cols) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--noises", nargs="+", choices=tuple(NOISES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--work", type=Path, default=Path(".lra-cache/bench-label-issues"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch / FAISS threads (0: each stage's default)")
    parser.add_argument("--redo", action="store_true", help="rerun cells already done")
    parser.add_argument("--table", action="store_true", help="only print the table")
    args = parser.parse_args()
    results = load_results(args.out)
    if args.table:
        print(table(results))
        return
    _require_cleanlab()
    from bench.auto_balance import resolve_auto
    from bench.spaces import build_space, space_version

    base = yaml.safe_load(args.params.read_text())
    results["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "processor": platform.processor() or platform.machine()}
    started = time.perf_counter()
    space_dir = build_space(SPACE, args.work)
    emb_path = space_dir / "embeddings/embeddings.parquet"
    for noise in args.noises or tuple(NOISES):
        for seed in args.seeds:
            name = f"{SPACE}/{noise}/{seed}"
            params, _ = resolve_auto(space_dir, cell_params(base, SPACE, noise, seed),
                                     SPACE, space_version(SPACE),
                                     results.setdefault("candidate_imbalance", {}),
                                     threads=args.threads)
            done = results["cells"].get(name)
            # The report reads the whole params file, its own section included.
            if done and params_key(done["params"], ignore=()) == params_key(params, ignore=()) \
                    and not args.redo:
                continue
            with tempfile.TemporaryDirectory() as tmp:
                work = Path(tmp)
                seconds = run_pipeline(space_dir, params, work, threads=args.threads)
                lra, lra_ids, lra_corrupted = lra_detection(
                    work / "report/label_issues.parquet")
                peer, ids, corrupted = cleanlab_detection(
                    emb_path, work / "labels/labels.parquet")
            order = np.argsort(lra_ids)
            if not (np.array_equal(lra_ids[order], np.sort(ids))
                    and np.array_equal(lra_corrupted[order], corrupted[np.argsort(ids)])):
                raise RuntimeError(f"{name}: label_issues.parquet's train rows or "
                                   "is_corrupted differ from labels.parquet's")
            lra["seconds"] = round(seconds, 1)
            results["cells"][name] = {"space": SPACE, "noise": noise, "seed": seed,
                                      "params_key": params_key(params, ignore=()), "params": params,
                                      "train_samples": len(ids), "lra_report": lra,
                                      "cleanlab": peer}
            save_results(results, args.out)
            print(f"{name}: F1 LRA {lra['f1']:.3f} / cleanlab {peer['f1']:.3f}, AUROC LRA "
                  f"{lra['auroc']:.4f} / cleanlab {peer['auroc']:.4f} "
                  f"({seconds:.0f} s + {peer['seconds']:.0f} s)", flush=True)
    wall = time.perf_counter() - started
    results["last_wall_seconds"] = round(wall, 1)
    save_results(results, args.out)
    print(f"wall time {wall:.0f} s")
    print(table(results))


if __name__ == "__main__":
    main()
