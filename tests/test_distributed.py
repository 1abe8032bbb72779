"""Several processes (pipeline.distributed): `lra embed` and `lra train` on 2 CPU ranks
with the gloo backend give the single-process output -- byte-identical Parquet for embed,
the same weights up to floating-point summation order for train.

The ranks are forked from the test process (modules already imported: a fresh torch
import costs 10-20 s on this shared machine) with the environment torchrun would set;
one test goes through the real launcher (`lra embed --nproc 2` relaunches under torchrun).
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn
from typer.testing import CliRunner

import stages.cli  # noqa: F401  (registers every command on the app)
from pipeline import distributed
from pipeline.artifacts import write_table
from pipeline.distributed import DistContext, GlobalBatchNorm1d, convert_batchnorm, shard_range
from pipeline.errors import ConfigError
from pipeline.images import encode_png
from pipeline.sources import make_table
from pipeline.neighbours import write_retrieval
from pipeline.tables import UNKNOWN, table_stamp, write_embeddings, write_labels
from stages.app import app

REPO = Path(__file__).resolve().parents[1]
WORLD = 2


# --------------------------------------------------------------------------- launching
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(fn: Callable, rank: int, world: int, port: int, env: dict, args: tuple) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port), "LRA_DIST_TIMEOUT": "120"})
    os.environ.update(env.get(rank, {}))
    torch.set_num_threads(1)
    try:
        fn(rank, *args)
    except BaseException:  # noqa: BLE001 - reported through the exit code
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()


def run_ranks(fn: Callable, *args, world: int = WORLD, env: dict | None = None,
              timeout: float = 150) -> None:
    """Run fn(rank, *args) in `world` forked processes that see torchrun's variables."""
    ctx = multiprocessing.get_context("fork")
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(fn, r, world, port, env or {}, args))
             for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
        p.join()
    assert not alive, f"rank(s) still running after {timeout} s"
    codes = [p.exitcode for p in procs]
    assert codes == [0] * world, f"exit codes {codes}"


def _invoke(rank: int, args: list[str]) -> None:
    """A stage command as one rank (CliRunner: the stage's exit-code mapping applies)."""
    res = CliRunner().invoke(app, args)
    if res.exit_code != 0:
        print(f"rank {rank}: exit {res.exit_code}\n{res.output}", file=sys.stderr)
        if res.exc_info and not isinstance(res.exception, SystemExit):
            traceback.print_exception(*res.exc_info)
        raise SystemExit(1)


def assert_close(got: torch.Tensor, want: torch.Tensor, *, rtol: float = 0.0,
                 atol: float = 0.0, msg: str = "") -> None:
    """torch.allclose with a useful message (torch.testing.assert_close's first call
    costs about 10 s of lazy imports here, in every forked rank)."""
    assert got.shape == want.shape, f"{msg}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    if not torch.allclose(got, want, rtol=rtol, atol=atol):
        diff = (got.double() - want.double()).abs().max().item()
        raise AssertionError(f"{msg}: max abs difference {diff:.3g} (rtol {rtol}, atol {atol})")


# --------------------------------------------------------------------------- helpers
def test_shard_range_matches_tensor_split():
    for n in (0, 1, 5, 64, 67):
        for world in (1, 2, 3, 8):
            sizes = [len(p) for p in torch.tensor_split(torch.arange(n), world)]
            ranges = [shard_range(n, r, world) for r in range(world)]
            assert [b - a for a, b in ranges] == sizes
            assert ranges[0][0] == 0 and ranges[-1][1] == n
            assert all(ranges[i][1] == ranges[i + 1][0] for i in range(world - 1))
    with pytest.raises(ValueError):
        shard_range(4, 2, 2)


def test_single_process_defaults(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    ctx = distributed.env_context()
    assert ctx == DistContext() and ctx.is_main and not ctx.enabled
    assert distributed.current() == DistContext()
    assert not distributed.launched()
    assert distributed.broadcast_object({"a": 1}, ctx) == {"a": 1}
    assert distributed.all_gather_objects(np.arange(3), ctx)[0].tolist() == [0, 1, 2]
    assert distributed.round_robin(list(range(5)), ctx) == [0, 1, 2, 3, 4]
    assert distributed.rank_device("cuda", ctx) == "cuda"
    distributed.barrier(ctx)
    with distributed.session() as same:  # no torchrun variables: no process group
        assert same == DistContext()
        assert not torch.distributed.is_initialized()


def test_env_context(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    ctx = distributed.env_context()
    assert (ctx.rank, ctx.world_size, ctx.local_rank) == (3, 4, 1)
    assert not ctx.is_main and ctx.enabled
    assert distributed.round_robin(list(range(10)), ctx) == [3, 7]
    assert distributed.rank_device("cpu", ctx) == "cpu"
    assert distributed.rank_device("cuda:2", ctx) == "cuda:2"  # explicit: kept
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ConfigError, match="RANK=4"):
        distributed.env_context()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(ConfigError, match="not an integer"):
        distributed.env_context()


def test_global_batchnorm_is_batchnorm_without_process_group():
    import copy

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Softplus(), nn.BatchNorm1d(6))
    ref = copy.deepcopy(model)
    keys = list(model.state_dict())
    weight = model[1].weight
    converted = convert_batchnorm(model)
    assert isinstance(converted[1], GlobalBatchNorm1d)
    assert isinstance(converted[3], GlobalBatchNorm1d)
    assert converted[1].weight is weight  # parameters shared, not copied
    assert list(converted.state_dict()) == keys
    x = torch.randn(10, 4)
    # no process group: plain BatchNorm1d, bit for bit, in both modes
    assert torch.equal(converted(x), ref(x))
    for a, b in zip(converted.state_dict().values(), ref.state_dict().values()):
        assert torch.equal(a, b)
    converted.eval()
    ref.eval()
    assert torch.equal(converted(x), ref(x))


# --------------------------------------------------------------------------- BatchNorm
def _bn_rank(rank: int, out_dir: str) -> None:
    """Each rank normalises its share of one global batch; the result, the running
    statistics and the gradients must be those of BatchNorm1d on the whole batch."""
    with distributed.session() as ctx:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(11, 5, generator=gen, dtype=torch.float64) * 3 + 1  # 11: uneven split
        g = torch.randn(11, 5, generator=gen, dtype=torch.float64)
        ref = nn.BatchNorm1d(5).double()
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5, generator=gen)
            ref.bias.uniform_(-1, 1, generator=gen)
        ours = convert_batchnorm(nn.Sequential(nn.BatchNorm1d(5).double()))[0]
        ours.load_state_dict(ref.state_dict())
        assert isinstance(ours, GlobalBatchNorm1d)

        xr = x.clone().requires_grad_(True)
        yr = ref(xr)  # one training-mode forward: running statistics updated once
        (yr * g).sum().backward()
        lo, hi = shard_range(11, ctx.rank, ctx.world_size)
        xo = x[lo:hi].clone().requires_grad_(True)
        yo = ours(xo)
        (yo * g[lo:hi]).sum().backward()
        for p in (ours.weight, ours.bias):  # what DDP does: sum of the ranks' gradients
            torch.distributed.all_reduce(p.grad)

        tol = {"rtol": 1e-10, "atol": 1e-10}  # float64: only summation order differs
        assert_close(yo, yr[lo:hi].detach(), **tol, msg="output")
        assert_close(xo.grad, xr.grad[lo:hi], **tol, msg="input gradient")
        assert_close(ours.weight.grad, ref.weight.grad, **tol, msg="weight gradient")
        assert_close(ours.bias.grad, ref.bias.grad, **tol, msg="bias gradient")
        for name in ("running_mean", "running_var"):
            assert_close(getattr(ours, name), getattr(ref, name), **tol, msg=name)
        assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == 1
        ours.eval()
        ref.eval()
        assert_close(ours(x), ref(x), **tol, msg="eval output")
        Path(out_dir, f"bn-ok-{ctx.rank}").touch()


def test_global_batchnorm_two_ranks(tmp_path):
    run_ranks(_bn_rank, str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bn-ok-0", "bn-ok-1"]


# --------------------------------------------------------------------------- embed
@pytest.fixture(scope="module")
def embed_inputs(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("embed")
    rng = np.random.default_rng(0)
    n = 45
    table = make_table(split=np.array(["train", "val", "test"])[np.arange(n) % 3],
                       label=np.arange(n) % 3, clean_label=np.arange(n) % 3,
                       image=[encode_png(rng.integers(0, 256, (8, 8), dtype=np.uint8))
                              for _ in range(n)])
    prepared = base / "samples.parquet"
    write_table(table, prepared, metadata={"source": "test", "class_names": ["a", "b", "c"],
                                           "num_classes": 3, "labels_are_clean": True,
                                           "image_root": None}, fingerprint=True)
    params = base / "params.yaml"
    params.write_text(yaml.safe_dump({"embed": {"encoder": "pixels"}}))
    single = base / "single" / "embeddings.parquet"
    res = CliRunner().invoke(app, ["embed", "--params", str(params), "--prepared",
                                   str(prepared), "--out-dir", str(single.parent),
                                   "--device", "cpu",
                                   "--no-progress", "--cache-dir", str(base / "cache1")])
    assert res.exit_code == 0, res.output
    return {"params": params, "prepared": prepared, "single": single}


def _embed_args(inputs: dict[str, Path], out: Path, cache: Path | None) -> list[str]:
    args = ["embed", "--params", str(inputs["params"]), "--prepared", str(inputs["prepared"]),
            "--out-dir", str(out.parent), "--device", "cpu", "--no-progress", "--batch-size", "4",
            "--chunk-rows", "8"]
    return args + (["--cache-dir", str(cache)] if cache is not None else [])


def test_embed_two_ranks_is_byte_identical(embed_inputs, tmp_path):
    out = tmp_path / "out" / "embeddings.parquet"
    cache = tmp_path / "cache"
    run_ranks(_invoke, _embed_args(embed_inputs, out, cache))
    assert out.read_bytes() == embed_inputs["single"].read_bytes()
    assert [p.name for p in out.parent.iterdir()] == ["embeddings.parquet"]  # rank 0 only
    assert list(cache.glob("embed/*/rows-*.npy")) == []  # cleared after success


def test_embed_two_ranks_without_shared_cache(embed_inputs, tmp_path):
    """Each rank has its own cache folder (no shared filesystem): rank 0 receives the
    chunks it cannot see over the process group. A chunk left over from an earlier,
    killed run in rank 1's folder is reused there."""
    out = tmp_path / "embeddings.parquet"
    env = {r: {"LRA_CACHE_DIR": str(tmp_path / f"cache-rank{r}")} for r in range(WORLD)}
    run_ranks(_invoke, _embed_args(embed_inputs, out, None) + ["--keep-cache"], env=env)
    assert out.read_bytes() == embed_inputs["single"].read_bytes()
    chunks = {r: sorted(p.name for p in (tmp_path / f"cache-rank{r}").glob("embed/*/rows-*"))
              for r in range(WORLD)}
    assert len(chunks[0]) == 6  # 45 rows in chunks of 8: its own 3 + 3 received
    assert len(chunks[1]) == 3  # the odd chunks (round robin)


def test_embed_under_torchrun(embed_inputs, tmp_path):
    """The real launcher, as docs/distributed.md shows it:
    torchrun --standalone --nproc-per-node 2 -m stages embed ..."""
    out = tmp_path / "embeddings.parquet"
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", LRA_DIST_TIMEOUT="120")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", "-m", "stages",
                           *_embed_args(embed_inputs, out, tmp_path / "cache")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on 2 processes" in proc.stderr
    assert out.read_bytes() == embed_inputs["single"].read_bytes()


@pytest.mark.parametrize("command", ["embed", "train"])
def test_nproc_relaunches_under_torchrun(command, embed_inputs, train_inputs, tmp_path,
                                         monkeypatch):
    """`lra <stage> --nproc 2` (what `LRA_NPROC=2 dvc repro` does) re-runs the same
    command line under torchrun and exits with its exit code."""
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    seen = []

    def fake_run(cmd, check):
        seen.append(cmd)
        return subprocess.CompletedProcess(cmd, 3)

    monkeypatch.setattr(distributed.subprocess, "run", fake_run)
    monkeypatch.setenv("LRA_NPROC", "2")
    args = (_embed_args(embed_inputs, tmp_path / "e.parquet", tmp_path / "c")
            if command == "embed" else _train_args(train_inputs, tmp_path / "m"))
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 3  # torchrun's
    (cmd,) = seen
    assert cmd[:6] == [sys.executable, "-m", "torch.distributed.run", "--standalone",
                       "--nproc-per-node=2", "-m"]
    assert cmd[6:8] == ["stages", command]
    # the options are passed on (the stage's own defaults filled in)
    rerun = cmd[7:]
    for opt in args[1:]:
        assert opt in rerun
    assert not (tmp_path / "e.parquet").exists() and not (tmp_path / "m").exists()


# --------------------------------------------------------------------------- train
# init: card (random gamma rows) makes every weight matter from the first step, so the
# comparison below is tight. With the identity init, the conditional layers' biases are
# cancelled by BatchNorm while gamma is still 1: Adam turns their rounding-noise
# gradients into steps of up to lr, as for embed_x.bias (CANCELLED), and the scores then
# differ by ~3e-4. The DDP arithmetic under test does not depend on the init.
TRAIN_PARAMS = {"train": {"seed": 3, "epochs": 2, "batch_size": 30, "lr": 0.001,
                          "warmup_epochs": 1, "feature_dim": 16, "timesteps": 50,
                          "ddim_steps": 5, "eval_every": 1, "ema_decay": 0.9,
                          "init": "card"}}


@pytest.fixture(scope="module")
def train_inputs(tmp_path_factory) -> dict[str, Path]:
    """Synthetic tables: 3 Gaussian classes in 6-d, 30 % symmetric noise, candidates from
    the 5 nearest train neighbours (own label first)."""
    base = tmp_path_factory.mktemp("train")
    rng = np.random.default_rng(0)
    n, d, c, k = 150, 6, 3, 5
    clean = np.arange(n) % c
    x = (rng.normal(size=(n, d)) + 3 * np.eye(c, d)[clean]).astype(np.float32)
    split = np.where(np.arange(n) < 90, "train", "val").astype(object)
    observed = clean.copy()
    flip = (rng.random(n) < 0.3) & (split == "train")
    observed[flip] = (clean[flip] + rng.integers(1, c, flip.sum())) % c
    train = np.flatnonzero(split == "train")
    dist = ((x[:, None] - x[None, train]) ** 2).sum(-1)
    dist[train, np.arange(len(train))] = np.inf  # never its own neighbour
    nb = train[np.argsort(dist, axis=1, kind="stable")[:, :k]]  # (N, k) sample ids
    nb_labels = observed[nb]
    cand = np.concatenate([observed[:, None], nb_labels], axis=1)
    is_train = split == "train"
    cand[~is_train] = UNKNOWN
    ids = np.arange(n)
    emb = base / "embeddings.parquet"
    write_embeddings(emb, sample_id=ids, split=split, vectors=x,
                     provenance={"encoder": "synthetic", "model": None})
    labels = base / "labels.parquet"
    write_labels(labels, sample_id=ids, split=split, clean=clean, observed=observed,
                 metadata={"num_classes": c})
    retrieval = base / "neighbours.parquet"
    write_retrieval(retrieval, sample_id=ids, split=split, neighbour_ids=nb,
                    distances=np.take_along_axis(dist, np.argsort(dist, axis=1)[:, :k],
                                                 axis=1).astype(np.float32),
                    neighbour_labels=nb_labels, candidates=cand,
                    distribution=np.stack([(nb_labels == j).mean(1) for j in range(c)],
                                          axis=1).astype(np.float32),
                    agreement=(nb_labels == observed[:, None]).mean(1).astype(np.float32),
                    is_train=is_train, metadata={"k": k, "built_from": {
                        "embeddings": table_stamp(emb), "labels": table_stamp(labels)}})
    params = base / "params.yaml"
    params.write_text(yaml.safe_dump(TRAIN_PARAMS))
    return {"params": params, "embeddings": emb, "labels": labels, "retrieval": retrieval}


def _train_args(inputs: dict[str, Path], out_dir: Path) -> list[str]:
    return ["train", "--params", str(inputs["params"]), "--embeddings",
            str(inputs["embeddings"]), "--labels", str(inputs["labels"]), "--retrieval",
            str(inputs["retrieval"]), "--out-dir", str(out_dir), "--device", "cpu",
            "--no-progress"]


def _train_rank(rank: int, inputs: dict[str, Path], out: str) -> None:
    """train_diffusion itself on one rank (validation at the last epoch only)."""
    import dataclasses

    from pipeline.params_io import load_params
    from pipeline.training import train_diffusion

    with distributed.session() as ctx:
        data = _train_data(inputs)
        cfg = dataclasses.replace(load_params(inputs["params"]).train, eval_every=100)
        result = train_diffusion(data, cfg, progress=False)
        if ctx.is_main:
            torch.save({"state": result.state_dict, "history": result.history,
                        "best": result.best}, out)
        else:
            assert result.state_dict == {} and result.best["epoch"] == -1
            assert all(r["val_accuracy"] is None for r in result.history)


def _train_data(inputs: dict[str, Path]):
    from pipeline.neighbours import read_retrieval
    from pipeline.tables import read_embeddings, read_labels
    from pipeline.training import TrainData

    emb, lab = read_embeddings(inputs["embeddings"]), read_labels(inputs["labels"])
    ret = read_retrieval(inputs["retrieval"])
    tr, va = emb.rows("train"), emb.rows("val")
    x = torch.from_numpy(emb.vectors.copy())
    return TrainData(features=x[tr], candidates=torch.from_numpy(ret.candidates[tr]),
                     val_features=x[va], val_labels=torch.from_numpy(lab.clean[va]),
                     num_classes=lab.num_classes)


TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}
"""Two ranks vs one process: the same random draws and the same objective, summed in
another order (BatchNorm statistics from per-rank partial sums, gradients all-reduced),
so the weights agree to float32 rounding carried through a few Adam steps: measured max
abs difference 2e-7 after 6 steps. embed_x.bias is the exception: the BatchNorm after
it cancels it, so its true gradient is 0, what reaches Adam is rounding noise (different
in the two runs), and Adam turns noise into steps of up to lr (measured 4e-4 here);
norm_x.running_mean tracks that bias. Both are checked only through what the network
computes (the validation scores), where they cancel."""
CANCELLED = ("embed_x.bias", "norm_x.running_mean")
SCORE_TOLERANCE = {"rtol": 1e-5, "atol": 2e-5}
"""Validation scores: the weights' rounding differences carried through 5 DDIM steps of
the network (measured max abs difference 8e-6 on scores of magnitude ~1)."""


def _assert_same_weights(single: dict, ddp: dict) -> None:
    assert single.keys() == ddp.keys()
    for key in single:
        if key in CANCELLED:
            continue
        assert_close(ddp[key].float(), single[key].float(), **TOLERANCE, msg=key)


def test_train_two_ranks_matches_single_process(train_inputs, tmp_path):
    import dataclasses

    from pipeline.params_io import load_params
    from pipeline.training import train_diffusion

    cfg = dataclasses.replace(load_params(train_inputs["params"]).train, eval_every=100)
    torch.set_num_threads(1)
    single = train_diffusion(_train_data(train_inputs), cfg, progress=False)
    out = tmp_path / "ddp.pt"
    run_ranks(_train_rank, train_inputs, str(out))
    ddp = torch.load(out, weights_only=True)
    assert ddp["best"]["epoch"] == single.best["epoch"]
    assert ddp["best"]["weights"] == single.best["weights"]
    _assert_same_weights(single.state_dict, ddp["state"])
    for a, b in zip(single.history, ddp["history"]):
        assert a["epoch"] == b["epoch"] and a["lr"] == b["lr"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)  # the global loss
        assert b["val_accuracy"] == a["val_accuracy"]


def test_train_stage_two_ranks(train_inputs, tmp_path):
    """The stage under 2 ranks: rank 0 writes the same checkpoint (up to rounding) as a
    single process, the same selection, log and metrics."""
    from pipeline.checkpoint import load_checkpoint
    from pipeline.diffusion import alphas_cumprod, cosine_betas, ddim_timesteps
    from pipeline.inference import predict_scores

    torch.set_num_threads(1)
    one, two = tmp_path / "one", tmp_path / "two"
    res = CliRunner().invoke(app, _train_args(train_inputs, one))
    assert res.exit_code == 0, res.output
    run_ranks(_invoke, _train_args(train_inputs, two))
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    m1, p1 = load_checkpoint(one / "model.pt")
    m2, p2 = load_checkpoint(two / "model.pt")
    assert p1["info"]["epoch"] == p2["info"]["epoch"]
    assert p1["info"]["weights"] == p2["info"]["weights"]
    assert p1["readout"] == p2["readout"]
    _assert_same_weights(p1["state_dict"], p2["state_dict"])
    # what the network computes (the cancelled parameters included)
    data = _train_data(train_inputs)
    abar = alphas_cumprod(cosine_betas(50)).float()
    s1 = predict_scores(m1, data.val_features, abar=abar, timesteps=ddim_timesteps(50, 5),
                        num_classes=3)
    s2 = predict_scores(m2, data.val_features, abar=abar, timesteps=ddim_timesteps(50, 5),
                        num_classes=3)
    assert_close(s2, s1, **SCORE_TOLERANCE, msg="validation scores")
    _assert_close_logs(one / "train_log.csv", two / "train_log.csv")


def test_train_stage_retry_at_another_k_two_ranks(train_inputs, tmp_path):
    """The retry at another k under 2 ranks: rank 0 decides, every rank trains the
    second run on the same re-searched candidates, and rank 0 writes what a single
    process writes. The recorded vote (1.0 at k = 20) forces the retry."""
    from pipeline.artifacts import read_table
    from pipeline.checkpoint import load_checkpoint
    from pipeline.index import index_ref, load_index_with_info

    torch.set_num_threads(1)
    index_dir = tmp_path / "index"
    res = CliRunner().invoke(app, ["index", "--params", str(train_inputs["params"]),
                                   "--embeddings", str(train_inputs["embeddings"]),
                                   "--out-dir", str(index_dir), "--no-progress"])
    assert res.exit_code == 0, res.output
    _, info = load_index_with_info(index_dir, "raw")
    index_stamp = index_ref(index_dir, info).stamp()
    table, meta = read_table(train_inputs["retrieval"], "retrieval table")
    meta = {k: v for k, v in meta.items() if k != "fingerprint"}
    meta["built_from"] = {**meta["built_from"], "index": index_stamp}
    meta["k_selection"] = {"validation_rows": 60, "choices": [5, 20],
                           "validation_vote_accuracy": [0.0, 1.0]}
    retrieval = tmp_path / "neighbours.parquet"
    write_table(table, retrieval, metadata=meta, fingerprint=True)
    inputs = {**train_inputs, "retrieval": retrieval}
    one, two = tmp_path / "one", tmp_path / "two"
    args = lambda out: [*_train_args(inputs, out), "--index", str(index_dir)]  # noqa: E731
    res = CliRunner().invoke(app, args(one))
    assert res.exit_code == 0, res.output
    run_ranks(_invoke, args(two))
    _, p1 = load_checkpoint(one / "model.pt")
    _, p2 = load_checkpoint(two / "model.pt")
    assert p1["info"]["k_retry"]["retry_k"] == 20 and p1["info"]["k_retry"]["first_k"] == 5
    assert p2["info"]["k_retry"] == p1["info"]["k_retry"]
    assert p1["info"]["k"] == p2["info"]["k"] == p1["info"]["k_retry"]["kept_k"]
    _assert_same_weights(p1["state_dict"], p2["state_dict"])
    _assert_close_logs(one / "train_log.csv", two / "train_log.csv")


def _assert_close_logs(a: Path, b: Path) -> None:
    """Same columns and epochs; the same validation accuracies; losses to rounding."""
    ra = [line.split(",") for line in a.read_text().splitlines()]
    rb = [line.split(",") for line in b.read_text().splitlines()]
    assert ra[0] == rb[0] and len(ra) == len(rb)
    for x, y in zip(ra[1:], rb[1:]):
        for u, v in zip(x, y):
            assert (u == v) or float(u) == pytest.approx(float(v), rel=1e-5)
