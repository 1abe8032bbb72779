"""index + retrieve: k nearest neighbours of every train embedding (self excluded), by exact
brute force with torch, by FAISS's exact "Flat", and by approximate FAISS indexes.

Metric: cosine, i.e. every method works on L2-normalised rows, as the pipeline does
(`pipeline.index`). The authors' torch code takes the Euclidean distance of raw features;
on normalised rows that ranks neighbours exactly as cosine does, so all methods answer the
same question and recall is well defined.

Methods (each in its own process, so each has its own peak memory):
  torch_cdist   the authors' approach: torch.cdist(queries, data) + topk(k + 1, smallest)
                per block of min(4096, D) queries (so the distance block is never larger
                than the data; cdist also makes a padded copy of the data per call);
                the baseline of `speedup_vs_exact`.
  torch_mm      the same exact search as one matrix product per block (queries @ data.T)
                + topk(largest): what exact search costs when written well in torch.
  Flat          pipeline.index.build_index(factory="Flat") + neighbours_excluding_self.
  HNSW32, IVF*  approximate: build_index + a sweep of the search parameter (efSearch,
                nprobe) on `tune` queries; the smallest value reaching recall@k >= 0.96 on
                them is then used for the timed search of all N queries, and recall@k is
                reported on the separate `eval` queries. "FACTORY|PARAMS" fixes other
                search parameters during the sweep, e.g.
                "IVF1024,PQ192x4fs,RFlat|k_factor_rf=32" (fast-scan PQ codes, then the
                best 32 k candidates re-ranked on the exact vectors).
Exact searches cost 2 N^2 D FLOP: when the estimate from the measured matmul throughput
exceeds the time budget they run on a random sample of queries and their time is
extrapolated linearly to N queries (`exact_extrapolated_from_queries` says how many).
Ground truth for recall is the torch_cdist answer on those queries.

speedup_vs_exact = torch_cdist seconds (N queries) / (build + search seconds of the
approximate index, N queries). Self-exclusion is by id everywhere (as the pipeline).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from bench.records import record

TARGET_RECALL = 0.95
TUNE_MARGIN = 0.01  # pick a parameter reaching TARGET_RECALL + margin on the tune queries
TARGET_SPEEDUP_AT_1M = 10.0
GRIDS = {"efSearch": [16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512],
         "nprobe": [1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128]}


def auto_nlist(n: int) -> int:
    """Power of two nearest sqrt(N): 256 at 45k, 512 at 310k, 1024 at 1M."""
    return 2 ** round(math.log2(math.sqrt(n)))


def expand_factory(factory: str, n: int) -> str:
    return factory.replace("{nlist}", str(auto_nlist(n)))


def split_spec(spec: str) -> tuple[str, str]:
    """"FACTORY|PARAMS" -> (factory, fixed search params); no "|": (spec, "")."""
    factory, _, fixed = spec.partition("|")
    return factory.strip(), fixed.strip()


def search_param(factory: str) -> str | None:
    if "HNSW" in factory:
        return "efSearch"
    if "IVF" in factory:
        return "nprobe"
    return None


def _ivf_nlist(factory: str) -> int:
    return int(re.search(r"IVF(\d+)", factory).group(1))


def _hnsw_m(factory: str) -> int:
    found = re.search(r"HNSW(\d+)", factory)
    return int(found.group(1)) if found else 32


def index_bytes(factory: str, n: int, d: int) -> int:
    """Estimated in-memory size of build_index's result: vectors + structure + the
    IndexIDMap2 id map (8 B) and its reverse hash map (~48 B per entry)."""
    size = n * d * 4 + n * (8 + 48)
    if "HNSW" in factory:
        m = _hnsw_m(factory)
        size += n * (2 * m * 4 + 8 + 4) + n // m * m * 4 * 2  # level-0 links, offsets, levels
    if "IVF" in factory:
        size += n * 8 + _ivf_nlist(factory) * d * 4
    pq = re.search(r"PQ(\d+)x(\d+)", factory)
    if pq:  # the codes (a refined index also keeps the exact vectors counted above)
        size += n * int(pq.group(1)) * int(pq.group(2)) // 8
    return size


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean |found_i & truth_i| / k over rows; found, truth: (M, k) ids."""
    k = truth.shape[1]
    hits = sum(len(np.intersect1d(f, t, assume_unique=True)) for f, t in zip(found, truth))
    return hits / (k * len(truth))


# --------------------------------------------------------------------------- exact, torch

def torch_child(*, data_dir: str, queries: list[int] | None, k: int, method: str,
                device: str, truth_path: str | None = None) -> dict[str, Any]:
    """Exact top-(k+1) search of `queries` rows (None: all) against all rows; self dropped
    by id. Writes (query rows, ids) to truth_path when given."""
    import faiss
    import torch

    from bench import synthetic
    from bench.measure import MemoryProbe, Timer

    probe = MemoryProbe(device)
    emb = synthetic.load(data_dir, ("embeddings",))["embeddings"]
    n, d = emb.shape
    rows = np.arange(n) if queries is None else np.asarray(queries, dtype=np.int64)
    block = min(4096, d)  # (block, N) distances: never larger than the data matrix
    out = np.empty((len(rows), k), dtype=np.int64)
    with Timer(device) as timer:
        faiss.normalize_L2(emb)  # in place: the authors would hold the raw matrix instead
        data = torch.from_numpy(emb).to(device)  # (N, D)
        for start in range(0, len(rows), block):
            r = torch.from_numpy(rows[start:start + block]).to(device)
            q = data[r]  # (b, D)
            if method == "torch_cdist":
                _, ind = torch.cdist(q, data).topk(k + 1, dim=1, largest=False)  # (b, k+1)
            else:
                _, ind = (q @ data.T).topk(k + 1, dim=1, largest=True)
            is_self = ind == r[:, None]
            order = torch.argsort(is_self.to(torch.int8), dim=1, stable=True)[:, :k]
            out[start:start + len(r)] = ind.gather(1, order).cpu().numpy()
    mem = probe.report()
    if truth_path:
        np.savez(truth_path, rows=rows, ids=out)
    return {"method": method, "device": device, "n": n, "dim": d, "queries": len(rows),
            "block_rows": block, "seconds": timer.seconds, **mem,
            "array_bytes": n * d * 4 + out.nbytes}


# --------------------------------------------------------------------------- FAISS

def faiss_child(*, data_dir: str, factory: str, k: int, truth_path: str,
                tune: list[int], evaluate: list[int], search_rows: list[int] | None,
                budget_s: float) -> dict[str, Any]:
    """Build `factory` with pipeline.index.build_index, tune its search parameter on `tune`
    rows (approximate indexes), then time neighbours_excluding_self over `search_rows`
    (None: all N; a sample is also taken when the tuned throughput predicts more than
    budget_s seconds). Recall@k against the exact truth on `evaluate` rows."""
    from bench import synthetic
    from bench.measure import MemoryProbe, Timer
    from pipeline.index import apply_search_params, build_index
    from pipeline.retrieval import neighbours_excluding_self

    probe = MemoryProbe()
    spec, (factory, fixed) = factory, split_spec(factory)
    emb = synthetic.load(data_dir, ("embeddings",))["embeddings"]
    n, d = emb.shape
    ids = np.arange(n, dtype=np.int64)
    saved = np.load(truth_path)
    truth_rows, truth_ids = saved["rows"], saved["ids"]  # (Q,), (Q, k)
    where = np.full(n, -1, dtype=np.int64)
    where[truth_rows] = np.arange(len(truth_rows))

    with Timer() as build:
        index = build_index(emb, ids, factory=factory, in_place=True)  # as `lra index`

    param = search_param(factory)
    sweep, chosen = [], None
    if param is not None:
        tune_rows = np.asarray(tune, dtype=np.int64)
        tq = emb[tune_rows]
        for value in GRIDS[param]:
            if param == "nprobe" and value > _ivf_nlist(factory):
                break
            apply_search_params(index, ",".join(filter(None, [fixed, f"{param}={value}"])))
            with Timer() as t:
                found, _ = neighbours_excluding_self(index, tq, tune_rows, k=k)
            rec = recall_at_k(found, truth_ids[where[tune_rows]])
            sweep.append({param: value, "recall_at_k": rec, "queries_per_s": len(tq) / t.seconds})
            if rec >= TARGET_RECALL + TUNE_MARGIN:
                break
        chosen = sweep[-1][param]
        apply_search_params(index, ",".join(filter(None, [fixed, f"{param}={chosen}"])))

    eval_rows = np.asarray(evaluate, dtype=np.int64)
    rows = np.arange(n) if search_rows is None else np.asarray(search_rows, dtype=np.int64)
    if sweep and search_rows is None:
        predicted = n / sweep[-1]["queries_per_s"]
        if predicted > budget_s:  # sample: the eval rows first, then others up to the budget
            m = max(len(eval_rows), int(budget_s * sweep[-1]["queries_per_s"]))
            rest = np.setdiff1d(np.arange(n), eval_rows)[: max(0, m - len(eval_rows))]
            rows = np.concatenate([eval_rows, rest])
    queries = emb if len(rows) == n else emb[rows]
    with Timer() as search:
        found, _ = neighbours_excluding_self(index, queries, rows, k=k)
    mem = probe.report()
    pos = np.full(n, -1, dtype=np.int64)
    pos[rows] = np.arange(len(rows))
    rec = recall_at_k(found[pos[eval_rows]], truth_ids[where[eval_rows]])
    return {"factory": spec, "n": n, "dim": d, "build_seconds": build.seconds,
            "search_seconds": search.seconds, "queries": len(rows), "param": param,
            "chosen": chosen, "sweep": sweep, "recall_at_k": rec, "recall_queries": len(eval_rows),
            **mem, "array_bytes": n * d * 4 + index_bytes(factory, n, d) + found.nbytes * 3 // 2}


# --------------------------------------------------------------------------- records

def records(raw: dict[str, Any], *, scale: str, matmul_flops: float, k: int) -> list[dict]:
    """raw: {"exact": [torch results], "faiss": [faiss results], "plan": {...}}."""
    plan = raw["plan"]
    n, d = plan["n"], plan["dim"]
    exact_bound = matmul_flops / (2.0 * n * d)  # queries/s if the product ran at matmul speed
    out, baseline = [], None
    for res in raw["exact"]:
        scale_up = n / res["queries"]
        seconds = res["seconds"] * scale_up
        if res["method"] == "torch_cdist" and res["device"] == "cpu":
            baseline = seconds
        out.append(record(
            "index_retrieve", scale, variant=f"{res['method']} ({res['device']})",
            seconds=seconds, peak_memory_bytes=res["peak_memory_bytes"],
            throughput=n / seconds, throughput_unit="queries/s", limit=exact_bound,
            limit_kind="fp32 matmul FLOP/s / (2 N D) (exact search)",
            array_bytes=res["array_bytes"], recall_at_k=1.0 if res["method"] == "torch_cdist" else None,
            k=k, speedup_vs_exact=None, measured_seconds=res["seconds"],
            exact_extrapolated_from_queries=res["queries"] if res["queries"] < n else None,
            block_rows=res["block_rows"], device=res["device"],
            process_peak_rss_bytes=res["process_peak_rss_bytes"],
            peak_device_memory_bytes=res.get("peak_device_memory_bytes")))
    for res in raw["faiss"]:
        queries = res["queries"]
        search_s = res["search_seconds"] * n / queries
        seconds = res["build_seconds"] + search_s
        exact = res["param"] is None
        target = None
        if not exact:
            target = {"recall_at_k": TARGET_RECALL}
            if n >= 1_000_000:
                target["speedup_vs_exact"] = TARGET_SPEEDUP_AT_1M
        limit = exact_bound if exact else (n / baseline if baseline else None)
        out.append(record(
            "index_retrieve", scale,
            variant=res["factory"] + (f" {res['param']}={res['chosen']}" if res["param"] else ""),
            seconds=seconds, peak_memory_bytes=res["peak_memory_bytes"],
            throughput=n / seconds, throughput_unit="queries/s", limit=limit,
            limit_kind=("fp32 matmul FLOP/s / (2 N D) (exact search)" if exact
                        else "torch_cdist exact queries/s (fraction = speedup)"),
            array_bytes=res["array_bytes"], target=target,
            recall_at_k=res["recall_at_k"], k=k, recall_queries=res["recall_queries"],
            speedup_vs_exact=(baseline / seconds) if baseline else None,
            search_speedup_vs_exact=(baseline / search_s) if baseline else None,
            build_seconds=res["build_seconds"], search_seconds=search_s,
            measured_search_seconds=res["search_seconds"],
            exact_extrapolated_from_queries=queries if (exact and queries < n) else None,
            extrapolated_from_queries=queries if queries < n else None,
            tuning=res["sweep"], process_peak_rss_bytes=res["process_peak_rss_bytes"]))
    fastest = min([r["seconds"] for r in out if r["limit_kind"].endswith("(exact search)")],
                  default=None)
    for r in out:
        if r.get("speedup_vs_exact") is not None and fastest:
            r["speedup_vs_fastest_exact"] = fastest / r["seconds"]
    return out


def plan(*, n: int, dim: int, matmul_flops: float, budget_s: float, exact_queries: int,
         tune_queries: int, seed: int = 1) -> dict[str, Any]:
    """Which rows are exact-searched, tuned on and evaluated on. Exact search runs on all
    N queries when 2 N^2 D / matmul throughput fits the budget, else on a sample."""
    perm = np.random.default_rng(seed).permutation(n)
    estimate = 2.0 * n * n * dim / matmul_flops
    full = estimate <= budget_s
    tune = perm[:tune_queries]
    evaluate = perm[tune_queries:] if full else perm[tune_queries:exact_queries]
    exact_rows = None if full else np.sort(perm[:exact_queries])
    return {"n": n, "dim": dim, "exact_estimate_seconds": estimate, "exact_full": full,
            "exact_rows": None if exact_rows is None else exact_rows.tolist(),
            "tune": np.sort(tune).tolist(), "evaluate": np.sort(evaluate).tolist()}


def truth_file(work_dir: str | Path, scale: str) -> str:
    return str(Path(work_dir) / f"exact-{scale}.npz")
