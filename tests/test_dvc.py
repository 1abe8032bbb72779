"""The DVC pipeline end to end, in a throwaway git + DVC repository holding a copy of
dvc.yaml, pipeline/ and stages/ and a reduced params.yaml (digits).

One repository serves the whole module (`dvc repro` once, ~7 `lra` processes); the
tests use `dvc status` where it answers the question without running anything. Tests
that change the workspace put it back; the experiment test, which leaves the workspace
on the experiment's results, is the last one.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import REPO, STAGES, hashes, run, small_params, temp_leftovers, write_params

DVC_YAML = yaml.safe_load((REPO / "dvc.yaml").read_text())

# Which stage reads each params.yaml leaf: the spec a params change is checked against.
OWNER = {"data": "prepare", "embed": "embed", "index.factory": "index",
         "index.search_params": "retrieve", "noise": "noise", "retrieve": "retrieve",
         "train": "train", "evaluate": "evaluate", "report": "report"}


def _declared(entries: list) -> list[str]:
    return [e if isinstance(e, str) else next(iter(e)) for e in entries]


def stage_outputs(stage: str) -> list[str]:
    """Every path a stage writes: outs, metrics and plots."""
    spec = DVC_YAML["stages"][stage]
    return [p for kind in ("outs", "metrics", "plots") for p in _declared(spec.get(kind, []))]


ALL_OUTPUTS = [p for s in STAGES for p in stage_outputs(s)]


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


def owner(key: str) -> str:
    return OWNER[key] if key in OWNER else OWNER[key.split(".")[0]]


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
    (root / ".gitignore").write_text("__pycache__/\n/dvc_plots/\n")
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
    r.git("add", "-A")  # dvc.lock, .gitignore files, the uncached metrics and plots
    r.git("commit", "-qm", "baseline run")
    return r


# --------------------------------------------------------------------------- static
@pytest.mark.parametrize("stage", STAGES)
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
        assert {s for s in STAGES if key in tracked[s]} == {owner(key)}, key
    for stage, keys in tracked.items():
        for key in keys:
            assert "." in key, f"{stage} tracks a whole section: {key}"


# --------------------------------------------------------------------------- dvc repro
def test_repro_runs_every_stage_once_after_its_upstream(repo):
    ran = running(repo.first_repro)
    assert sorted(ran) == sorted(STAGES), repo.first_repro
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
    for stage, entries in status.items():
        for entry in entries:
            keys = entry.get("changed deps", {}).get("params.yaml", {})
            for key in keys:
                reported.setdefault(key, set()).add(stage)
    assert reported == {key: {owner(key)} for key in leaves(repo.params)}
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
    assert running(out) == ["retrieve"], out
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


# Last: leaves the workspace on the experiment's results.
def test_exp_run_reruns_noise_and_downstream_and_changes_metrics(repo):
    out = repo.dvc("exp", "run", "-S", "noise.rate=0.6").stdout
    assert sorted(running(out)) == sorted(["noise", "retrieve", "train", "evaluate",
                                           "report"]), out
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
