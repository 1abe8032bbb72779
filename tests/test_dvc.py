"""The DVC pipeline end to end, in a throwaway git + DVC repository holding a copy of
dvc.yaml, pipeline/ and stages/ and a reduced params.yaml (digits).

One repository serves the whole module (`dvc repro` once, ~7 `lra` processes); the
tests use `dvc status` where it answers the question without running anything. Tests
that change the workspace put it back; the experiment tests, which leave the workspace
on the experiment's results, are the last ones. The repository uses the project's own
.gitignore, so its commits hold exactly what a clone of the project holds (dvc.lock and
the uncached metrics and plot files).
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import (ARTIFACTS, FOLDERS, REPO, STAGES, hashes, run, small_params,
                      subprocess_env, temp_leftovers, write_params)

DVC_YAML = yaml.safe_load((REPO / "dvc.yaml").read_text())
# `validate` depends on the whole params.yaml and reruns on any edit of it; it writes
# data/validated.json, which no other stage reads.
DVC_STAGES = ("validate", *STAGES)

# Which stage reads each params.yaml leaf: the spec a params change is checked against.
OWNER = {"data": "prepare", "embed": "embed", "index.factory": "index", "index.spaces": "index",
         "index.search_params": "retrieve", "noise": "noise", "retrieve": "retrieve",
         "train": "train", "evaluate": "evaluate", "report": "report"}


def _declared(entries: list) -> list[str]:
    return [e if isinstance(e, str) else next(iter(e)) for e in entries]


def uncached_outputs() -> list[str]:
    """Every `cache: false` output (metrics, plot files): these live in git."""
    out = []
    for spec in DVC_YAML["stages"].values():
        for kind in ("outs", "metrics", "plots"):
            for entry in spec.get(kind, []):
                if isinstance(entry, dict):
                    (path, opts), = entry.items()
                    if opts and opts.get("cache") is False:
                        out.append(path)
    return out


def stage_outputs(stage: str) -> list[str]:
    """Every path a stage writes: outs, metrics and plots."""
    spec = DVC_YAML["stages"][stage]
    return [p for kind in ("outs", "metrics", "plots") for p in _declared(spec.get(kind, []))]


def output_files(path: str) -> list[str]:
    """A declared output as files: a folder output (data/index) is the files in it."""
    if path not in FOLDERS.values():
        return [path]
    return [f for f in ARTIFACTS.values() if f.startswith(path + "/")]


ALL_OUTPUTS = [f for s in STAGES for p in stage_outputs(s) for f in output_files(p)]


def upstream(stage: str) -> set[str]:
    """Stages whose outputs `stage` lists as deps."""
    deps = set(DVC_YAML["stages"][stage]["deps"])
    return {s for s in STAGES if deps & set(stage_outputs(s))}


def downstream_closure(stages: set[str]) -> set[str]:
    """`stages` and every stage that depends on them, directly or not."""
    out = set(stages)
    while True:
        more = {s for s in STAGES if upstream(s) & out} - out
        if not more:
            return out
        out |= more


def running(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


def leaves(params: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for key, value in params.items():
        if isinstance(value, dict):
            out.update(leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def set_leaf(params: dict, dotted: str, value: object) -> None:
    *path, last = dotted.split(".")
    node = params
    for key in path:
        node = node[key]
    node[last] = value


ALSO_READ = {"evaluate.linear_iters": {"report", "train"},
             "evaluate.linear_max_rows": {"report", "train"},
             "evaluate.linear_l2": {"train"}, "evaluate.linear_l2_decades": {"train"},
             "index.search_params": {"train"}}
"""Leaves a second stage reads: the report's cross-fitted probe fits like evaluate's;
train's retry at another k searches the index as retrieve does, and its retry at k = 1
compares the model with evaluate's noisy linear probe."""


def owner(key: str) -> str:
    return OWNER[key] if key in OWNER else OWNER[key.split(".")[0]]


def readers(key: str) -> set[str]:
    return {owner(key)} | ALSO_READ.get(key, set())


# --------------------------------------------------------------------------- the repo
@dataclass
class Repo:
    root: Path
    params: dict
    first_repro: str

    def dvc(self, *args: str, check: bool = True):
        return run([sys.executable, "-m", "dvc", *args], self.root, check=check)

    def git(self, *args: str):
        return run(["git", *args], self.root)

    def status(self) -> dict:
        return json.loads(self.dvc("status", "--json").stdout or "{}")

    def write_params(self, params: dict) -> None:
        write_params(self.root / "params.yaml", params)

    def output_hashes(self) -> dict[str, str]:
        return hashes(self.root, ALL_OUTPUTS)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Repo:
    root = tmp_path_factory.mktemp("dvc_repo")
    shutil.copy2(REPO / "dvc.yaml", root / "dvc.yaml")
    for package in ("pipeline", "stages"):
        shutil.copytree(REPO / package, root / package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    params = small_params()
    write_params(root / "params.yaml", params)
    shutil.copy2(REPO / ".gitignore", root / ".gitignore")  # the repository's own
    r = Repo(root, params, "")
    r.git("init", "-q")
    r.git("config", "user.name", "lra tests")
    r.git("config", "user.email", "tests@example.invalid")
    r.git("config", "commit.gpgsign", "false")
    r.dvc("init", "-q")
    r.dvc("config", "core.analytics", "false")
    r.dvc("config", "core.autostage", "false")
    r.git("add", "-A")
    r.git("commit", "-qm", "pipeline")
    r.first_repro = r.dvc("repro").stdout
    r.git("add", "-A")  # dvc.lock and the uncached metrics and plots (un-ignored)
    r.git("commit", "-qm", "baseline run")
    return r


# --------------------------------------------------------------------------- static
@pytest.mark.parametrize("stage", DVC_STAGES)
def test_stage_deps_exist_and_cover_imported_modules(stage):
    """A stage lists its own module and every library module it imports (directly or
    not), so a code change reruns the stages it can affect. errors.py holds exception
    classes only and cannot change an output."""

    def module_file(name: str) -> Path | None:
        for candidate in (REPO / f"{name.replace('.', '/')}.py",
                          REPO / name.replace(".", "/") / "__init__.py"):
            if candidate.is_file():
                return candidate
        return None

    def imported(path: Path) -> set[str]:
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        return {n for n in names if n.split(".")[0] in ("pipeline", "stages")
                and module_file(n) is not None}

    deps = DVC_YAML["stages"][stage]["deps"]
    # Another stage's outputs are absent from a fresh clone; only source deps must exist.
    produced = {path for other in STAGES for path in stage_outputs(other)}
    problems = [f"dep {d} does not exist" for d in deps
                if d not in produced and not (REPO / d).exists()]
    seen, todo = set(), [f"stages.{stage}"]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += imported(module_file(name))
    for name in sorted(seen):
        rel = module_file(name).relative_to(REPO).as_posix()
        if rel in ("pipeline/__init__.py", "stages/__init__.py", "pipeline/errors.py"):
            continue
        if not any(rel == d or rel.startswith(d.rstrip("/") + "/") for d in deps):
            problems.append(f"imports {rel} but does not list it as a dep")
    assert not problems, f"stage {stage}:\n" + "\n".join(problems)


def test_every_params_leaf_is_tracked_by_its_reader_only():
    """Per-leaf params, each tracked by the stage that reads it; no leaf is named `size`
    or `nfiles` (DVC's run-cache ignores those)."""
    tracked = {s: set(DVC_YAML["stages"][s].get("params", [])) for s in STAGES}
    for key in leaves(yaml.safe_load((REPO / "params.yaml").read_text())):
        assert key.split(".")[-1] not in ("size", "nfiles"), key
        assert {s for s in STAGES if key in tracked[s]} == readers(key), key
    for stage, keys in tracked.items():
        for key in keys:
            assert "." in key, f"{stage} tracks a whole section: {key}"


def test_committed_lock_matches_the_committed_code_and_params():
    """dvc.lock records the md5 of every source file and the value of every param the
    last `dvc repro` used. A code or params edit committed without rerunning the
    pipeline leaves it stale: a fresh clone's `dvc status` then reports changed stages,
    and the committed metrics no longer come from the committed code."""
    import hashlib

    lock = yaml.safe_load((REPO / "dvc.lock").read_text())["stages"]
    produced = {path for other in STAGES for path in stage_outputs(other)}
    flat = dict(leaves(yaml.safe_load((REPO / "params.yaml").read_text())))
    stale = []
    for stage in DVC_STAGES:
        for dep in lock[stage]["deps"]:
            path = REPO / dep["path"]
            if dep["path"] in produced or not path.is_file():
                continue  # an upstream output (absent from a clone), or a folder
            if hashlib.md5(path.read_bytes()).hexdigest() != dep["md5"]:
                stale.append(f"{stage}: {dep['path']} changed since the locked run")
        for key, value in lock[stage].get("params", {}).get("params.yaml", {}).items():
            if flat.get(key, "<absent>") != value:
                stale.append(f"{stage}: {key} = {flat.get(key, '<absent>')!r}, "
                             f"locked {value!r}")
    assert not stale, "rerun `uv run dvc repro` and commit dvc.lock:\n" + "\n".join(stale)


# --------------------------------------------------------------------------- dvc repro
def test_repro_runs_every_stage_once_after_its_upstream(repo):
    ran = running(repo.first_repro)
    assert sorted(ran) == sorted(DVC_STAGES), repo.first_repro
    assert ran[0] == "validate", ran
    for stage in STAGES:
        for up in upstream(stage):
            assert ran.index(up) < ran.index(stage), (up, stage)
    for path in ALL_OUTPUTS:
        assert (repo.root / path).is_file(), path
    assert temp_leftovers(repo.root / "data") == []


def test_metrics_show_and_keys(repo):
    metrics = json.loads((repo.root / "data/evaluate/metrics.json").read_text())
    for method in ("lra_diffusion", "knn_vote", "noisy_linear", "clean_linear"):
        assert 0.0 <= metrics["test_accuracy"][method] <= 1.0
    assert metrics["noise"]["observed_rate"] == pytest.approx(0.4, abs=0.03)
    shown = repo.dvc("metrics", "show").stdout
    assert "data/evaluate/metrics.json" in shown
    for name in ("test_accuracy.lra_diffusion", "test_accuracy.knn_vote",
                 "test_accuracy.noisy_linear", "test_accuracy.clean_linear",
                 "noise.observed_rate", "best_val_accuracy"):
        assert name in shown, name


def test_nothing_changed_runs_nothing(repo):
    lock = (repo.root / "dvc.lock").read_bytes()
    before = repo.output_hashes()
    out = repo.dvc("repro").stdout
    assert running(out) == [], out
    assert repo.output_hashes() == before
    assert (repo.root / "dvc.lock").read_bytes() == lock


def test_params_change_invalidates_only_the_stages_reading_it(repo):
    """Change every params leaf at once: `dvc status` names, per stage, the changed keys
    it tracks. Each key must be reported by its reader only; what reruns is then that
    stage and everything downstream of it."""
    changed = small_params()
    for key, value in leaves(repo.params).items():
        if isinstance(value, bool):
            new = not value
        elif isinstance(value, (int, float)):
            new = value + 1
        else:
            new = f"{value or ''}changed"
        set_leaf(changed, key, new)
    repo.write_params(changed)
    try:
        status = repo.status()
    finally:
        repo.write_params(repo.params)
    reported: dict[str, set[str]] = {}
    assert "validate" in status  # the whole file is its dep
    for stage, entries in status.items():
        if stage == "validate":
            continue
        for entry in entries:
            keys = entry.get("changed deps", {}).get("params.yaml", {})
            for key in keys:
                reported.setdefault(key, set()).add(stage)
    assert reported == {key: readers(key) for key in leaves(repo.params)}
    assert downstream_closure({owner("noise.rate")}) == {"noise", "retrieve", "train",
                                                          "evaluate", "report"}
    assert downstream_closure({owner("train.lr")}) == {"train", "evaluate", "report"}
    assert downstream_closure({owner("report.samples")}) == {"report"}
    assert downstream_closure({owner("retrieve.k")}).isdisjoint({"prepare", "embed", "index"})


def test_dry_run_after_retrieve_k_change_skips_upstream(repo):
    params = small_params(retrieve={"k": 5})
    repo.write_params(params)
    try:
        out = repo.dvc("repro", "--dry").stdout
    finally:
        repo.write_params(repo.params)
    assert running(out) == ["validate", "retrieve"], out
    for stage in ("prepare", "embed", "index", "noise"):
        assert f"Stage '{stage}' didn't change" in out


def test_forced_rerun_writes_byte_identical_outputs(repo, pipeline_run):
    """Two independent runs with the same params (DVC's `lra` processes here, the
    in-process run of conftest) agree byte for byte on every output; forcing the
    training stage again changes nothing, so DVC has nothing left to rerun."""
    before = repo.output_hashes()
    assert before == hashes(pipeline_run.root, ALL_OUTPUTS)
    lock = (repo.root / "dvc.lock").read_bytes()
    out = repo.dvc("repro", "--force", "--single-item", "train").stdout
    assert running(out) == ["train"], out
    assert repo.output_hashes() == before
    assert (repo.root / "dvc.lock").read_bytes() == lock
    assert repo.status() == {}


def test_plots_show_renders_declared_plots(repo, tmp_path):
    repo.dvc("plots", "show", "-o", str(tmp_path / "plots"))
    html = (tmp_path / "plots" / "index.html").read_text()
    for title in ("validation accuracy", "training loss", "test confusion matrix"):
        assert title in html
    assert "val_accuracy_ema" in html and '"actual"' in html


def test_only_the_declared_plots_are_drawn(repo):
    """No default plots of the plot files themselves (train_log.csv against a row
    index, the confusion rows as a line): only the top-level definitions."""
    shown = json.loads(repo.dvc("plots", "show", "--json").stdout)["data"]
    assert set(shown) == {"validation accuracy", "training loss", "test confusion matrix"}


def test_metrics_and_plot_files_are_in_git_the_rest_is_ignored(repo):
    """In the repository (and so in every clone) the uncached metrics and plot files
    are committed, and the DVC-cached outputs and dvc_plots/ are git-ignored; the temp
    repository, built with the same .gitignore, committed exactly the uncached ones."""
    uncached = uncached_outputs()
    assert set(uncached) >= {"data/evaluate/metrics.json", "data/model/train.json",
                             "data/model/train_log.csv", "data/evaluate/confusion.csv"}
    cached = [p for p in ALL_OUTPUTS if p not in uncached]
    committed = set(repo.git("ls-files", "data").stdout.split())
    assert committed == set(uncached)
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    ignored = run(["git", "check-ignore", *ALL_OUTPUTS, "dvc_plots/index.html"], REPO,
                  check=False).stdout.split()
    assert set(ignored) == set(cached) | {"dvc_plots/index.html"}
    tracked = set(run(["git", "ls-files", "data"], REPO).stdout.split())
    assert set(uncached) <= tracked


def _assert_outputs_kept(repo, before: dict[str, str]) -> None:
    missing = [p for p in ALL_OUTPUTS if not (repo.root / p).is_file()]
    assert missing == [], f"outputs lost: {missing}"
    assert repo.output_hashes() == before
    assert temp_leftovers(repo.root / "data") == []


def test_failed_repro_keeps_the_last_good_outputs(repo):
    """A params change that makes train fail: DVC would delete train's outputs before
    running it; `persist: true` keeps them (the stage replaces them atomically itself)."""
    before = repo.output_hashes()
    repo.write_params(small_params(train={"warmup_epochs": 1000}))  # >= epochs: invalid
    try:
        proc = repo.dvc("repro", check=False)
    finally:
        repo.write_params(repo.params)
    assert proc.returncode != 0
    assert "warmup_epochs" in proc.stdout + proc.stderr
    _assert_outputs_kept(repo, before)
    assert repo.status() == {}


def test_interrupted_repro_keeps_the_last_good_outputs(repo, tmp_path):
    """Ctrl-C (SIGINT to the process group, as a terminal sends it) in the middle of
    training: every output is the last good one, and the pipeline is up to date again
    once params.yaml is put back."""
    before = repo.output_hashes()
    repo.write_params(small_params(train={"seed": 1, "epochs": 20000}))  # a long train
    log = tmp_path / "repro.log"
    try:
        with open(log, "w") as f:
            proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro"], cwd=repo.root,
                                    env=subprocess_env(), stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True, text=True)
            try:
                deadline = time.monotonic() + 300
                while "Running stage 'train'" not in log.read_text():
                    assert proc.poll() is None, log.read_text()
                    assert time.monotonic() < deadline, log.read_text()
                    time.sleep(0.2)
                time.sleep(3)  # into training (torch imported, epochs running)
                assert proc.poll() is None, "train ended before the interrupt:\n" + \
                    log.read_text()
                os.killpg(proc.pid, signal.SIGINT)
                proc.wait(timeout=120)
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
    finally:
        repo.write_params(repo.params)
    assert proc.returncode != 0, log.read_text()
    _assert_outputs_kept(repo, before)
    # validate ran (and passed) on the interrupted run's params, so it alone is stale
    # once params.yaml is put back; it only validates, so nothing else is.
    assert set(repo.status()) <= {"validate"}


def test_untracked_mistyped_key_fails_the_repro(repo):
    """`train.epochz` is tracked by no stage: only `validate` reruns, and it fails the
    repro with one line naming the key; every output stays as it was."""
    before = repo.output_hashes()
    repo.write_params(small_params(train={"epochz": 20}))
    try:
        proc = repo.dvc("repro", check=False)
    finally:
        repo.write_params(repo.params)
    assert proc.returncode != 0, proc.stdout
    assert running(proc.stdout) == ["validate"], proc.stdout
    assert "lra validate: error: train: unknown key(s) epochz" in proc.stderr + proc.stdout
    assert repo.output_hashes() == before
    repo.dvc("repro", "validate")  # back to the committed state
    assert repo.status() == {}



# Last: these leave the workspace on the experiment's results.
def test_exp_run_reruns_noise_and_downstream_and_changes_metrics(repo):
    out = repo.dvc("exp", "run", "-S", "noise.rate=0.6").stdout
    assert sorted(running(out)) == sorted(["validate", "noise", "retrieve", "train",
                                           "evaluate", "report"]), out
    for stage in ("prepare", "embed", "index"):
        assert f"Stage '{stage}' didn't change" in out
    metrics = json.loads((repo.root / "data/evaluate/metrics.json").read_text())
    assert metrics["noise"]["observed_rate"] == pytest.approx(0.6, abs=0.03)
    diff = json.loads(repo.dvc("metrics", "diff", "--json").stdout)
    rate = diff["data/evaluate/metrics.json"]["noise.observed_rate"]
    assert rate["old"] == pytest.approx(0.4, abs=0.03)
    assert rate["new"] == pytest.approx(0.6, abs=0.03)
    # More noise, worse labels: the noisy-label linear probe loses accuracy.
    probe = diff["data/evaluate/metrics.json"]["test_accuracy.noisy_linear"]
    assert probe["new"] < probe["old"]


def test_readme_experiment_commands_compare_with_the_committed_baseline(repo):
    """After the experiment above (the README's `dvc exp run -S noise.rate=0.6 && dvc
    metrics diff`): the baseline comes from the commit, so every metric has a HEAD value
    (no `-`), `dvc exp show` loads every revision (no `!`), `dvc params diff` shows
    the change."""
    text = repo.dvc("metrics", "diff", "--all").stdout
    assert "noise.observed_rate" in text and "test_accuracy.lra_diffusion" in text
    diff = json.loads(repo.dvc("metrics", "diff", "--all", "--json").stdout)
    assert set(diff) == {p for p in uncached_outputs() if p.endswith(".json")}
    for path, entries in diff.items():
        for name, entry in entries.items():
            if name.startswith("test_accuracy.") or name.endswith("_rate"):
                assert entry["old"] is not None and entry["new"] is not None, (path, name)
    shown = repo.dvc("exp", "show", "--no-pager", "--md")
    assert "!" not in shown.stdout, shown.stdout
    assert "failed to load" not in shown.stderr, shown.stderr
    revisions = []
    todo = json.loads(repo.dvc("exp", "show", "--json").stdout)
    while todo:
        rev = todo.pop()
        revisions.append(rev)
        todo += [r for e in rev.get("experiments") or [] for r in e.get("revs", [])]
    assert len(revisions) >= 3  # workspace, the baseline commit, the experiment
    for rev in revisions:
        assert rev.get("error") is None and rev["data"].get("error") is None, rev
        metrics = rev["data"]["metrics"]
        assert set(metrics) == {p for p in uncached_outputs() if p.endswith(".json")}, rev
        assert all(m.get("error") is None and m.get("data") for m in metrics.values()), rev
    params = json.loads(repo.dvc("params", "diff", "--json").stdout)
    rate = params["params.yaml"]["noise.rate"]
    assert (rate["old"], rate["new"]) == (0.4, 0.6)
