"""`uv run python -m bench --scale cifar|food101n|1m`: measure every stage on synthetic
embeddings, write bench/results/<scale>.json, refresh the tables in bench/README.md.

Each measurement runs in its own spawned process (bench.measure) so that peak memory is
per stage. The fp32 matrix-multiply limit is measured at the start and at the end of the
run; records use the higher of the two (on a busy machine the fractions are then
conservative). Results are rewritten after every stage, so an interrupted run keeps what
it measured.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub is imported anywhere

import typer

from bench import embed, evaluate, sampling, search, synthetic, train
from bench.limits import describe_machine, matmul_child
from bench.measure import run_isolated
from bench.records import REQUIRED, error_record, record
from bench.scales import SCALES

log = logging.getLogger("bench")
STAGES = ("train", "index", "embed", "evaluate", "sample")
RESULTS = Path(__file__).parent / "results"
DEFAULT_CACHE = Path(tempfile.gettempdir()) / "lra-bench-data"

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def _csv(value: str, what: str, valid: tuple[str, ...] | None = None) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise typer.BadParameter(f"{what}: empty list")
    if valid is not None:
        bad = [v for v in items if v not in valid]
        if bad:
            raise typer.BadParameter(f"{what}: unknown {', '.join(bad)}; valid: {', '.join(valid)}")
    return items


def _without_note(argv: list[str]) -> list[str]:
    """The command line minus --note's text (the note is stored on its own)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--note":
            skip = True
        elif not arg.startswith("--note="):
            out.append(arg)
    return out


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise typer.BadParameter(f"--device {device}: CUDA is not available; use cpu or auto")
    if device != "cpu" and not device.startswith("cuda"):
        raise typer.BadParameter(f"--device {device}: valid: auto, cpu, cuda, cuda:N")
    return device


class Run:
    """Collects raw measurements, turns them into records, writes the results file."""

    def __init__(self, *, scale: str, out: Path, meta: dict, kept: list[dict]) -> None:
        self.scale, self.out, self.meta, self.kept = scale, out, meta, kept
        self.matmul: list[dict] = []
        self.raw: dict[str, Any] = {}
        self.errors: list[dict] = []

    @property
    def matmul_fp32(self) -> float:
        return max(m["fp32"] for m in self.matmul)

    def matmul_best(self) -> dict[str, float]:
        keys = {k for m in self.matmul for k in ("fp32", "tf32", "bf16") if k in m}
        return {k: max(m[k] for m in self.matmul if k in m) for k in keys}

    def records(self) -> list[dict]:
        sc = SCALES[self.scale]
        out = [{**{k: None for k in REQUIRED}, "stage": "machine", "scale": self.scale,
                "machine": self.meta["machine"], "run": self.meta["run"]}]
        best = self.matmul_best()
        for precision, flops in sorted(best.items()):
            trials = [t for m in self.matmul for t in m["trials"] if t["precision"] == precision]
            out.append(record("matmul", self.scale, variant=f"torch.mm {precision} "
                              f"({self.matmul[0]['device']})", throughput=flops,
                              throughput_unit="FLOP/s", seconds=None,
                              limit_kind="the limit other records use", trials=trials,
                              measurements=len(self.matmul)))
        mm = self.matmul_fp32
        for raw in self.raw.get("train", []):
            out += train.records(raw, scale=self.scale, matmul_flops=mm)
        if self.raw.get("index"):
            out += search.records(self.raw["index"], scale=self.scale, matmul_flops=mm, k=sc.k)
        if self.raw.get("embed", {}).get("model"):
            out += embed.records(self.raw["embed"], scale=self.scale, n=sc.n, matmul=best)
        if self.raw.get("evaluate"):
            out += evaluate.records(self.raw["evaluate"], scale=self.scale, matmul_flops=mm)
        if self.raw.get("sample"):
            out += sampling.records(self.raw["sample"], scale=self.scale, n=sc.n,
                                    matmul_flops=mm)
        return out + self.errors + self.kept

    def write(self) -> None:
        self.meta["run"]["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.meta["run"]["loadavg_at_write"] = list(os.getloadavg())
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_name(self.out.name + ".tmp")
        tmp.write_text(json.dumps(self.records(), indent=1, default=float) + "\n")
        os.replace(tmp, self.out)


def _step(run: Run, stage: str, variant: str | None, fn: Any, **kwargs: Any) -> Any:
    """One isolated measurement; failures become error records, the run goes on."""
    start = time.perf_counter()
    log.info("%s %s ...", stage, variant or "")
    try:
        result = run_isolated(fn, **kwargs)
    except Exception as exc:  # noqa: BLE001 - reported in the results, run continues
        log.error("%s %s failed: %s", stage, variant or "", exc)
        log.debug("%s", traceback.format_exc())
        run.errors.append(error_record(stage, run.scale, variant, f"{type(exc).__name__}: {exc}"))
        return None
    log.info("%s %s done in %.1f s", stage, variant or "", time.perf_counter() - start)
    return result


@app.command()
def main(
    scale: Annotated[str, typer.Option(help="cifar (45,000 x 768, 10 classes) | food101n "
                                            "(310,000 x 768, 101) | 1m (1,000,000 x 768, 14).")],
    out: Annotated[Path | None, typer.Option(help="Results file (default "
                                                  "bench/results/<scale>.json).")] = None,
    threads: Annotated[int, typer.Option(min=0, help="CPU threads for torch and FAISS "
                                                     "(0: library default = all cores).")] = 0,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda[:N] for torch work (FAISS is "
                                             "CPU-only).")] = "auto",
    stages: Annotated[str, typer.Option(help="Comma list of: train,index,embed,evaluate,sample.")]
    = ",".join(STAGES),
    seconds_budget: Annotated[float, typer.Option(
        min=1, help="Per measurement: exact search, approximate search, evaluation and "
                    "sampling that would take longer run on a sample and are "
                    "extrapolated.")] = 120.0,
    batch: Annotated[str, typer.Option(help="Train batch sizes (comma list: a sweep).")] = "256",
    index: Annotated[str, typer.Option(help="Approximate FAISS factories, ';'-separated; "
                                            "{nlist} = power of two nearest sqrt(N).")]
    = "HNSW32;IVF{nlist},Flat",
    exact_queries: Annotated[int, typer.Option(min=100, help="Query sample for exact search "
                                                             "when N queries exceed the budget "
                                                             "(includes the tuning queries).")] = 3000,
    tune_queries: Annotated[int, typer.Option(min=50, help="Queries that tune efSearch / "
                                                           "nprobe (not used for recall).")] = 1000,
    embed_model: Annotated[str, typer.Option(help="open_clip architecture (random weights).")]
    = "ViT-B-32",
    embed_batch: Annotated[int, typer.Option(min=1)] = 32,
    embed_batches: Annotated[int, typer.Option(min=1, help="Timed batches (model).")] = 3,
    eval_chunk: Annotated[int, typer.Option(min=256, help="lra evaluate --chunk-rows.")] = 4096,
    cache_dir: Annotated[Path, typer.Option(help="Where synthetic arrays are cached (3 GiB "
                                                 "at 1m).")] = DEFAULT_CACHE,
    note: Annotated[str, typer.Option(help="Free text stored with the machine, e.g. "
                                           "'shared machine, noisy'.")] = "",
    merge: Annotated[bool, typer.Option(help="Keep records of stages not run now from an "
                                             "existing results file.")] = False,
    report: Annotated[bool, typer.Option(help="Regenerate bench/README.md tables.")] = True,
) -> None:
    """Benchmark the pipeline's stages at one scale against limits measured in the same run."""
    logging.basicConfig(level=os.environ.get("BENCH_LOG_LEVEL", "INFO"), stream=sys.stderr,
                        format="bench %(asctime)s %(message)s", datefmt="%H:%M:%S")
    if scale not in SCALES:
        raise typer.BadParameter(f"--scale {scale!r}: valid: {', '.join(SCALES)}")
    chosen = _csv(stages, "--stages", STAGES)
    batches = [int(b) for b in _csv(batch, "--batch")]
    if any(b < 2 for b in batches):
        raise typer.BadParameter("--batch: every batch size must be >= 2 (BatchNorm)")
    factories = [f.strip() for f in index.split(";") if f.strip()]
    if tune_queries >= exact_queries:
        raise typer.BadParameter("--tune-queries must be smaller than --exact-queries")
    dev = _resolve_device(device)
    sc = SCALES[scale]
    out = out or RESULTS / f"{scale}.json"
    started = time.perf_counter()

    kept: list[dict] = []
    if merge and out.exists():
        old = json.loads(out.read_text())
        ran = {"index_retrieve" if s == "index" else s for s in chosen}
        old_machine = next((r for r in old if r["stage"] == "machine"), {})
        old_run = old_machine.get("run", {})
        earlier = {"from_run": old_run.get("started"),
                   "from_run_command": old_run.get("command"),
                   "from_run_note": old_machine.get("machine", {}).get("note")}
        kept = [{**earlier, **r} for r in old if r["stage"] not in ran | {"machine", "matmul"}]
    meta = {"machine": {**describe_machine(dev), "note": note},
            "run": {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "command": " ".join(["python -m bench", *_without_note(sys.argv[1:])]),
                    "scale": sc.to_dict(), "stages": chosen, "threads": threads,
                    "device": dev, "seconds_budget": seconds_budget}}
    run = Run(scale=scale, out=out, meta=meta, kept=kept)

    log.info("matmul throughput (%s) ...", dev)
    run.matmul.append(run_isolated(matmul_child, threads=threads, device=dev))
    log.info("fp32 matmul: %.1f GFLOP/s", run.matmul_fp32 / 1e9)

    spec = synthetic.SyntheticSpec(n=sc.n, dim=sc.dim, classes=sc.classes, k=sc.k)
    meta["run"]["synthetic"] = spec.to_dict()
    data_dir = ""
    if {"train", "index", "evaluate"} & set(chosen):
        t0 = time.perf_counter()
        data_dir = str(synthetic.materialise(spec, cache_dir))
        log.info("synthetic data ready in %.1f s: %s", time.perf_counter() - t0, data_dir)

    common = {"threads": threads}
    if "train" in chosen:
        run.raw["train"] = []
        for b in batches:
            res = _step(run, "train", f"batch={b}", train.child, data_dir=data_dir,
                        scale=sc.to_dict(), batch=b, device=dev, **common)
            if res:
                run.raw["train"].append(res)
        run.write()

    if "index" in chosen:
        plan = search.plan(n=sc.n, dim=sc.dim, matmul_flops=run.matmul_fp32,
                           budget_s=seconds_budget, exact_queries=exact_queries,
                           tune_queries=tune_queries)
        truth = search.truth_file(cache_dir, scale)
        raw: dict[str, Any] = {"plan": {k: plan[k] for k in ("n", "dim", "exact_full",
                                                             "exact_estimate_seconds")},
                               "exact": [], "faiss": []}
        exact_devices = ["cpu"] + ([dev] if dev != "cpu" else [])
        for d in exact_devices:
            for method in ("torch_cdist", "torch_mm"):
                res = _step(run, "index_retrieve", f"{method} ({d})", search.torch_child,
                            data_dir=data_dir, queries=plan["exact_rows"], k=sc.k,
                            method=method, device=d,
                            truth_path=truth if (method, d) == ("torch_cdist", "cpu") else None,
                            **common)
                if res:
                    raw["exact"].append(res)
        if not os.path.exists(truth):
            log.error("no exact ground truth: skipping FAISS measurements")
        else:
            for factory in ["Flat", *(search.expand_factory(f, sc.n) for f in factories)]:
                res = _step(run, "index_retrieve", factory, search.faiss_child,
                            data_dir=data_dir, factory=factory, k=sc.k, truth_path=truth,
                            tune=plan["tune"], evaluate=plan["evaluate"],
                            search_rows=plan["exact_rows"] if factory == "Flat" else None,
                            budget_s=seconds_budget, **common)
                if res:
                    raw["faiss"].append(res)
        run.raw["index"] = raw
        run.write()

    if "embed" in chosen:
        model = _step(run, "embed", f"{embed_model} model", embed.model_child, model=embed_model,
                      device=dev, batch=embed_batch, batches=embed_batches, **common)
        pipeline_runs = []
        res = _step(run, "embed", f"{embed_model} pipeline", embed.pipeline_child,
                    model=embed_model, device=dev, batch=embed_batch, images=2 * embed_batch,
                    **common)
        if res:
            pipeline_runs.append(res)
        memory_runs = []
        for images in (2000, 8000):
            res = _step(run, "embed", f"memory check n={images}", embed.pipeline_child,
                        model=embed.TINY, device=dev, batch=embed_batch, images=images, **common)
            if res:
                memory_runs.append(res)
        run.raw["embed"] = {"model": model, "pipeline": pipeline_runs, "memory": memory_runs}
        run.write()

    if "evaluate" in chosen:
        from pipeline.model import ModelSpec

        flops = ModelSpec(num_classes=sc.classes, feature_dim_in=sc.dim, hidden=sc.hidden,
                          timesteps=1000).sampling_flops_per_sample(10)
        # Budget check assumes 30 % of the matmul throughput (small products, DDIM steps).
        per_row = flops / (0.3 * run.matmul_fp32)
        rows = sc.n if sc.n * per_row <= seconds_budget else max(
            eval_chunk, int(seconds_budget / per_row) // eval_chunk * eval_chunk)
        run.raw["evaluate"] = []
        # Two table sizes: the difference of their peaks is what memory grows with N.
        for r in sorted({rows, max(min(eval_chunk, sc.n), rows // 4)}, reverse=True):
            res = _step(run, "evaluate", f"rows={r}", evaluate.child, data_dir=data_dir,
                        scale=sc.to_dict(), rows=r, chunk_rows=eval_chunk, device=dev,
                        stage_threads=threads, **common)
            if res:
                run.raw["evaluate"].append(res)
        run.write()

    if "sample" in chosen:
        rows, samples = sampling.plan(sc, matmul_flops=run.matmul_fp32, budget_s=seconds_budget)
        res = _step(run, "sample", f"S={samples} rows={rows}", sampling.child,
                    scale=sc.to_dict(), rows=rows, samples=samples, device=dev,
                    chunk_rows=eval_chunk, **common)
        if res:
            run.raw["sample"] = res
        run.write()

    log.info("matmul throughput again (end of run) ...")
    run.matmul.append(run_isolated(matmul_child, threads=threads, device=dev))
    meta["run"]["total_seconds"] = time.perf_counter() - started
    run.write()
    log.info("wrote %s (%.0f s)", out, meta["run"]["total_seconds"])
    if report:
        from bench.report import update_readme

        update_readme()
    if run.errors:
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
