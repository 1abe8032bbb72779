"""Presets: every preset merges into the default params and validates; apply writes it."""

from pathlib import Path

import pytest
import yaml
from conftest import assert_one_line_error
from typer.testing import CliRunner

from pipeline.params_io import params_from_dict
from pipeline.errors import ConfigError
from pipeline.presets import apply_preset, deep_merge, load_preset, preset_names
from stages.cli import app

ROOT = Path(__file__).resolve().parents[1]
DEFAULTS = yaml.safe_load((ROOT / "params.yaml").read_text())


def test_the_papers_experiments_are_all_there():
    names = set(preset_names())
    for dataset in ("cifar10", "cifar100"):
        for noise in ("pmd35", "pmd70", "pmd35-u30", "pmd35-u60", "pmd35-a30"):
            assert f"{dataset}-{noise}" in names
    assert {"food101n", "webvision", "clothing1m", "animal10n"} <= names


@pytest.mark.parametrize("name", preset_names())
def test_preset_validates_and_sets_the_papers_settings(name):
    params = params_from_dict(apply_preset(DEFAULTS, name, root="/datasets/x"))
    assert params.data.root == "/datasets/x"
    assert params.embed.encoder == "open_clip"
    assert params.embed.model == "ViT-L-14-quickgelu" and params.embed.pretrained == "openai"
    expected_k = {"webvision": 50, "clothing1m": 20}.get(name, 10)
    assert params.retrieve.k == expected_k
    if name.startswith("cifar"):
        assert params.train.feature_dim == 512 and params.train.warmup_epochs == 5
    else:
        assert params.noise.kind == "none"  # real-noise datasets keep their own labels


def test_cifar10_reported_numbers_match_method_md():
    assert load_preset("cifar10-pmd35")["reported"]["lra_diffusion"] == 96.54
    assert load_preset("cifar10-pmd35-u60")["reported"]["lra_diffusion"] == 87.21
    assert load_preset("food101n")["reported"]["lra_diffusion"] == 93.42


def test_hybrid_asymmetric_uses_the_dataset_map():
    p = params_from_dict(apply_preset(DEFAULTS, "cifar100-pmd35-a30", root="r"))
    assert (p.noise.kind, p.noise.hybrid_on_top, p.noise.asym_map, p.noise.rate) == (
        "hybrid", "asymmetric", "cifar100", 0.3)


def test_deep_merge_keeps_untouched_keys():
    merged = deep_merge({"a": {"x": 1, "y": 2}, "b": 3}, {"a": {"y": 5}})
    assert merged == {"a": {"x": 1, "y": 5}, "b": 3}


def test_unknown_preset_is_a_config_error():
    with pytest.raises(ConfigError, match="valid: .*cifar10-pmd35"):
        load_preset("cifar11")


def test_cli_apply_writes_a_valid_params_file(tmp_path):
    target = tmp_path / "params.yaml"
    target.write_text((ROOT / "params.yaml").read_text())
    food = tmp_path / "food"
    food.mkdir()
    result = CliRunner().invoke(app, ["preset", "apply", "food101n", "--root", str(food),
                                      "--params", str(target)])
    assert result.exit_code == 0, result.output
    written = params_from_dict(yaml.safe_load(target.read_text()))
    assert written.data.source == "food101n" and written.data.root == str(food)
    assert written.train.feature_dim == 1024


@pytest.mark.parametrize("name", preset_names())
def test_cli_apply_keeps_every_comment(tmp_path, name):
    """Only the values change: every comment line and every trailing comment stays."""
    original = (ROOT / "params.yaml").read_text()
    target = tmp_path / "params.yaml"
    target.write_text(original)
    result = CliRunner().invoke(app, ["preset", "apply", name, "--root", str(tmp_path),
                                      "--params", str(target)])
    assert result.exit_code == 0, result.output
    text = target.read_text()

    def comments(t: str) -> list[str]:
        return [line[line.index("#"):].strip() for line in t.splitlines() if "#" in line]

    assert comments(text) == comments(original)
    merged = apply_preset(yaml.safe_load(original), name, root=str(tmp_path))
    assert yaml.safe_load(text) == merged


def test_cli_apply_refuses_a_root_that_does_not_exist(tmp_path):
    target = tmp_path / "params.yaml"
    target.write_text((ROOT / "params.yaml").read_text())
    before = target.read_bytes()
    result = CliRunner().invoke(app, ["preset", "apply", "food101n", "--root", "/nonexistent",
                                      "--params", str(target)])
    assert result.exit_code == 2, result.output
    assert_one_line_error(result.stderr, "preset", "/nonexistent", "no such file")
    assert target.read_bytes() == before


def test_cli_apply_unknown_preset_exits_2_and_leaves_file(tmp_path):
    target = tmp_path / "params.yaml"
    target.write_text("data:\n  source: digits\n")
    result = CliRunner().invoke(app, ["preset", "apply", "nope", "--params", str(target)])
    assert result.exit_code == 2
    assert target.read_text() == "data:\n  source: digits\n"


def test_noise_file_replaces_the_pmd_step(tmp_path):
    """--noise-file: pmd presets read the released labels (kind file); hybrid presets
    keep their second noise and take the file as the PMD step."""
    from pipeline.presets import apply_preset

    pmd = apply_preset({}, "cifar10-pmd35", root=str(tmp_path),
                       noise_file="noise_label/cifar10-1-0.35.npy")
    assert pmd["noise"]["kind"] == "file"
    assert pmd["noise"]["file"] == "noise_label/cifar10-1-0.35.npy"
    hybrid = apply_preset({}, "cifar10-pmd35-u30", root=str(tmp_path), noise_file="labels.npy")
    assert (hybrid["noise"]["kind"], hybrid["noise"]["file"]) == ("hybrid", "labels.npy")
    with pytest.raises(ConfigError, match="noise-file"):
        apply_preset({}, "food101n", root=str(tmp_path), noise_file="labels.npy")


def test_hybrid_with_a_noise_file_takes_it_as_the_pmd_step(tmp_path):
    import numpy as np

    from pipeline.config import NoiseConfig
    from pipeline.noise import make_noisy_labels, needs_probe

    clean = np.arange(200) % 10
    pmd_step = (clean + 1) % 10  # every label changed by the "file"
    np.save(tmp_path / "pmd.npy", pmd_step)
    cfg = NoiseConfig(kind="hybrid", rate=0.3, file=str(tmp_path / "pmd.npy"))
    assert not needs_probe(cfg)
    out = make_noisy_labels(clean, num_classes=10, cfg=cfg, sample_ids=np.arange(200))
    assert (out != pmd_step).sum() == 60  # exactly 30 % of the file's labels flipped again


def test_preset_list_says_which_noise_the_paper_used():
    from conftest import invoke

    result = invoke(["preset", "list"])
    assert result.exit_code == 0
    line = next(x for x in result.stdout.splitlines() if x.startswith("cifar10-pmd35 "))
    assert "noise_label/cifar10-1-0.35.npy" in line


def test_preset_list_shows_every_preset_with_the_papers_numbers():
    result = CliRunner().invoke(app, ["preset", "list"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines] == list(preset_names())
    for name, line in zip(preset_names(), lines):
        reported = load_preset(name)["reported"].get("lra_diffusion")
        assert (f"{reported:.2f} %" if reported is not None else "n/a") in line, line
    webvision = lines[list(preset_names()).index("webvision")]
    assert "84.16 %" in webvision and "82.56 % on ILSVRC12 val" in webvision
