"""pipeline.config and pipeline.params_io: frozen, validated params; unknown keys, wrong types and bad values
fail with a ConfigError that names the key, the value and the valid choices."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from pipeline.config import (ENCODERS, NOISE_KINDS, READOUTS, SOURCES, DataConfig,
                             EvaluateConfig, IndexConfig, NoiseConfig, Params, ReportConfig,
                             RetrieveConfig, TrainConfig, as_dict)
from pipeline.params_io import load_params, params_from_dict
from pipeline.errors import ConfigError, LraError

REPO = Path(__file__).resolve().parents[1]


def test_defaults_and_empty_mapping():
    p = params_from_dict({})
    assert p == Params()
    assert p.data.source == "digits"
    assert p.retrieve.k == 10
    assert p.train.timesteps == 1000
    assert p.train.ddim_steps == 10
    assert p.index.factory == "Flat"


def test_configs_are_frozen():
    p = params_from_dict({})
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.train.epochs = 3  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.train = TrainConfig()  # type: ignore[misc]


def test_values_are_applied_and_coerced():
    p = params_from_dict({
        "train": {"epochs": 7, "lr": 1, "warmup_epochs": 2, "readout": "argmax"},
        "retrieve": {"k": 3},
        "noise": {"kind": "pmd", "rate": 0, "pmd_type": "II"},
        "data": {"val_fraction": 0.1, "seed": 5},
    })
    assert p.train.epochs == 7 and p.train.warmup_epochs == 2
    # an int given for a float field becomes a float
    assert p.train.lr == 1.0 and isinstance(p.train.lr, float)
    assert isinstance(p.noise.rate, float) and p.noise.rate == 0.0
    assert p.train.readout == "argmax"
    assert p.retrieve.k == 3
    assert p.noise.pmd_type == "II"
    assert p.data.val_fraction == 0.1 and p.data.seed == 5
    # untouched sections keep their defaults
    assert p.embed == Params().embed
    assert p.evaluate == EvaluateConfig()


def test_null_section_means_defaults():
    assert params_from_dict({"train": None}).train == TrainConfig()


def test_unknown_section_lists_valid_sections():
    with pytest.raises(ConfigError) as exc:
        params_from_dict({"trian": {"epochs": 3}})
    msg = str(exc.value)
    assert "trian" in msg
    for name in ("data", "embed", "index", "noise", "retrieve", "train", "evaluate"):
        assert name in msg


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as exc:
        params_from_dict({"train": {"epochs": 3, "epoch": 3}})
    msg = str(exc.value)
    assert "train" in msg and "epoch" in msg
    for f in dataclasses.fields(TrainConfig):
        assert f.name in msg


def test_non_string_keys_are_named_not_a_traceback():
    """YAML reads `1: 2` as an int key; the message sorted and joined the names as str."""
    with pytest.raises(ConfigError, match=r"train: unknown key\(s\) 1, epoch"):
        params_from_dict({"train": {1: 2, "epoch": 3}})
    with pytest.raises(ConfigError, match=r"unknown section\(s\) 5"):
        params_from_dict({5: "x"})


def test_wrong_type_message_reads_as_english():
    with pytest.raises(ConfigError, match="train.epochs: True is not an int"):
        params_from_dict({"train": {"epochs": True}})


def test_section_must_be_mapping():
    with pytest.raises(ConfigError, match="retrieve"):
        params_from_dict({"retrieve": [1, 2]})
    with pytest.raises(ConfigError):
        params_from_dict([1, 2])  # type: ignore[arg-type]


@pytest.mark.parametrize("section, key, value", [
    ("train", "epochs", "ten"),
    ("train", "epochs", 2.5),
    ("train", "epochs", True),  # a bool is not an int here
    ("train", "lr", "fast"),
    ("train", "lr", False),
    ("retrieve", "k", None),  # not nullable
    ("retrieve", "k", "ten"),  # a string is only "auto"
    ("retrieve", "k_choices", "10,x"),
    ("retrieve", "k_choices", "0,10"),
    ("index", "spaces", "raw,whiten"),
    ("index", "spaces", "raw,center,raw"),
    ("index", "spaces", " , "),
    ("data", "val_fraction", [0.1]),
])
def test_wrong_types_are_rejected(section, key, value):
    with pytest.raises(ConfigError) as exc:
        params_from_dict({section: {key: value}})
    assert f"{section}.{key}" in str(exc.value)


def test_index_spaces_keep_their_order():
    assert params_from_dict({}).index.space_names == ("raw", "center", "standardize")
    p = params_from_dict({"index": {"spaces": " standardize, raw "}})
    assert p.index.space_names == ("standardize", "raw")


def test_retrieve_k_auto_and_its_choices():
    p = params_from_dict({"retrieve": {"k": "auto", "k_choices": " 200, 10,10,50 "}})
    assert p.retrieve.auto and p.retrieve.candidate_ks == (10, 50, 200)
    assert not params_from_dict({"retrieve": {"k": 7}}).retrieve.auto
    assert params_from_dict({}).retrieve.candidate_ks == (10, 20, 50, 100, 200)


def test_nullable_fields_accept_null():
    p = params_from_dict({"embed": {"pretrained": None, "cache_dir": None},
                          "data": {"root": None}})
    assert p.embed.pretrained is None and p.data.root is None


@pytest.mark.parametrize("section, key, value", [
    ("data", "val_fraction", 0.0),
    ("data", "val_fraction", 1.0),
    ("data", "test_fraction", -0.1),
    ("noise", "rate", 1.0),
    ("noise", "rate", -0.01),
    ("noise", "pmd_factor", 1.0),
    ("retrieve", "k", 0),
    ("train", "epochs", 0),
    ("train", "batch_size", 1),
    ("train", "lr", 0.0),
    ("train", "timesteps", 1),
    ("train", "grad_clip", 0.0),
    ("train", "ema_decay", 1.0),
    ("train", "eval_every", 0),
    ("train", "feature_dim", 0),
    ("evaluate", "linear_l2", -1e-3),
    ("evaluate", "linear_iters", 0),
    ("evaluate", "linear_max_rows", 0),
    ("evaluate", "stochastic_samples", -1),
])
def test_out_of_range_values_name_key_and_value(section, key, value):
    with pytest.raises(ConfigError) as exc:
        params_from_dict({section: {key: value}})
    msg = str(exc.value)
    assert f"{section}.{key}" in msg
    assert repr(value) in msg


def test_boundary_values_are_accepted():
    p = params_from_dict({"noise": {"rate": 0.0}, "retrieve": {"k": 1},
                          "train": {"batch_size": 2, "timesteps": 2, "ddim_steps": 2,
                                    "epochs": 1, "warmup_epochs": 0, "ema_decay": 0.0}})
    assert p.train.batch_size == 2 and p.retrieve.k == 1


def test_cross_field_rules():
    with pytest.raises(ConfigError, match="val_fraction"):
        DataConfig(val_fraction=0.5, test_fraction=0.5)
    with pytest.raises(ConfigError, match="warmup_epochs"):
        TrainConfig(epochs=5, warmup_epochs=5)
    with pytest.raises(ConfigError, match="ddim_steps"):
        TrainConfig(timesteps=10, ddim_steps=11)
    with pytest.raises(ConfigError, match="data.root"):
        DataConfig(source="cifar10")
    assert DataConfig(source="cifar10", root="/x").root == "/x"
    with pytest.raises(ConfigError, match="noise.file"):
        NoiseConfig(kind="file")
    with pytest.raises(ConfigError, match="index.factory"):
        IndexConfig(factory="  ")
    # the dataclasses validate on construction, not only through params_from_dict
    with pytest.raises(ConfigError, match="retrieve.k"):
        RetrieveConfig(k=0)


@pytest.mark.parametrize("section, key, bad, choices", [
    ("data", "source", "mnist", SOURCES),
    ("embed", "encoder", "resnet", ENCODERS),
    ("noise", "kind", "gaussian", NOISE_KINDS),
    ("train", "readout", "max", READOUTS),
    ("train", "weighting", "none", ("agreement", "uniform")),
    ("train", "projection", "conv", ("linear", "mlp")),
    ("train", "feature_norm", "zscore", ("standardize", "l2", "none")),
    ("noise", "pmd_type", "IV", ("I", "II", "III")),
    ("noise", "hybrid_on_top", "pmd", ("symmetric", "asymmetric")),
])
def test_bad_choice_lists_valid_choices(section, key, bad, choices):
    raw = {section: {key: bad}}
    if section == "data":
        raw[section]["root"] = "/somewhere"
    with pytest.raises(ConfigError) as exc:
        params_from_dict(raw)
    msg = str(exc.value)
    assert f"{section}.{key}" in msg and repr(bad) in msg
    for c in choices:
        assert c in msg


def test_config_error_is_an_lra_error():
    assert issubclass(ConfigError, LraError)


def test_load_params_round_trip(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"train": {"epochs": 4, "warmup_epochs": 1},
                                    "retrieve": {"k": 5}}))
    p = load_params(path)
    assert p.train.epochs == 4 and p.retrieve.k == 5
    assert p.noise == NoiseConfig()


def test_load_params_reads_exponent_floats_like_dvc(tmp_path):
    """`lr: 1e-3` is a float in YAML 1.2 and for DVC (ruamel); PyYAML's 1.1 rules alone
    would read the string '1e-3' and reject it."""
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  lr: 1e-3\n  grad_clip: 5E-1\nevaluate:\n  linear_l2: 1.0e-4\n"
                    "embed:\n  model: ViT-B-32\n")
    p = load_params(path)
    assert p.train.lr == pytest.approx(1e-3) and isinstance(p.train.lr, float)
    assert p.train.grad_clip == pytest.approx(0.5)
    assert p.evaluate.linear_l2 == pytest.approx(1e-4)
    assert p.embed.model == "ViT-B-32"
    # the global safe_load is left alone, and a quoted string is still not a float
    assert yaml.safe_load("x: 1e-3") == {"x": "1e-3"}
    path.write_text("train:\n  lr: '1e-3'\n")
    with pytest.raises(ConfigError, match="train.lr"):
        load_params(path)


@pytest.mark.parametrize("text", ["", "\n# only a comment\n", "{}\n"])
def test_load_params_empty_file_is_refused(tmp_path, text):
    """An empty file used to run every stage on the built-in defaults, silently."""
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="is empty"):
        load_params(path)


def test_cli_empty_params_file_is_a_usage_error(tmp_path):
    from conftest import assert_one_line_error, invoke

    (tmp_path / "params.yaml").write_text("")
    result = invoke(["prepare", "--params", tmp_path / "params.yaml",
                     "--out-dir", tmp_path / "out"])
    assert result.exit_code == 2, result.output
    assert_one_line_error(result.stderr, "prepare", "is empty")
    assert not (tmp_path / "out").exists()


def test_cli_params_file_that_is_not_text_or_not_a_file(tmp_path):
    from conftest import assert_one_line_error, invoke

    latin = tmp_path / "latin.yaml"
    latin.write_bytes("data:\n  root: /donn\xe9es\n".encode("latin-1"))
    result = invoke(["prepare", "--params", latin, "--out-dir", tmp_path / "out"])
    assert result.exit_code == 2, result.output
    assert_one_line_error(result.stderr, "prepare", "is not UTF-8 text", "save it as UTF-8")
    assert not (tmp_path / "out").exists()


def test_cli_file_system_refusal_is_one_line(tmp_path):
    """An output folder below a file: the OS refuses the mkdir; one line, exit 1."""
    from conftest import assert_one_line_error, invoke

    (tmp_path / "file").write_text("")
    result = invoke(["validate", "--params", REPO / "params.yaml",
                     "--out-dir", tmp_path / "file/out"])
    assert result.exit_code == 1, result.output
    assert_one_line_error(result.stderr, "validate", "file/out", "nothing was published")


def test_load_params_missing_and_invalid(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {epochs: [1, \n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError):
        load_params(listy)


def test_repository_params_file_is_valid():
    p = load_params(REPO / "params.yaml")
    assert isinstance(p, Params)
    assert p.data.source in SOURCES


@pytest.mark.parametrize("section,key,value", [
    ("train", "lr", float("inf")), ("train", "grad_clip", float("nan")),
    ("noise", "pmd_factor", float("inf")), ("evaluate", "linear_l2", float("inf"))])
def test_infinite_and_nan_floats_are_refused(section, key, value):
    with pytest.raises(ConfigError, match=f"{section}.{key}: .* is not a finite number"):
        params_from_dict({section: {key: value}})


@pytest.mark.parametrize("text", ["3:zz", "0:1,", "pairs", "0-1"])
def test_asym_map_syntax_is_checked_before_any_stage(text):
    """Even when noise.kind does not use it: `lra validate` fails on the edit, not a
    later run that switches kind."""
    with pytest.raises(ConfigError, match="noise.asym_map"):
        params_from_dict({"noise": {"kind": "symmetric", "asym_map": text}})
    assert params_from_dict({"noise": {"asym_map": " 0:3 , 2:1"}}).noise.asym_map


def test_defaults_are_the_repository_params_file():
    """A params file that leaves a key out runs with the value params.yaml documents."""
    written = yaml.safe_load((REPO / "params.yaml").read_text())
    defaults = as_dict(Params())
    assert {s: {k: defaults[s][k] for k in keys} for s, keys in written.items()} == written
    assert all(set(defaults[s]) == set(keys) for s, keys in written.items())


def test_as_dict():
    d = as_dict(TrainConfig(epochs=3, warmup_epochs=1))
    assert d["epochs"] == 3 and d["warmup_epochs"] == 1
    assert set(d) == {f.name for f in dataclasses.fields(TrainConfig)}
    assert TrainConfig(**d) == TrainConfig(epochs=3, warmup_epochs=1)


def test_report_section_defaults_and_checks():
    assert params_from_dict({}).report == ReportConfig()
    assert ReportConfig().samples == 16 and ReportConfig().min_confidence == 0.0
    p = params_from_dict({"report": {"samples": 32, "min_confidence": 1}})
    assert p.report.samples == 32 and p.report.min_confidence == 1.0
    for bad, needle in (({"samples": 0}, "report.samples"),
                        ({"gallery_items": -1}, "report.gallery_items"),
                        ({"min_confidence": 1.5}, "report.min_confidence"),
                        ({"seed": 1}, "unknown key")):
        with pytest.raises(ConfigError, match=needle):
            params_from_dict({"report": bad})
