"""Reading params.yaml (or a parsed mapping) into validated `pipeline.config.Params`.

Unknown sections and keys, wrong types (a string where a number belongs, null where none
is allowed, YAML's .inf) and unreadable or empty files raise `ConfigError` with one line
that names the key and the valid choices; the value checks are the sections' own.
"""

from __future__ import annotations

import math
import re
import types
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import Params
from pipeline.errors import ConfigError


def _coerce(section: str, key: str, value: Any, annotation: Any) -> Any:
    """Check `value` against a field annotation (str, int, float, bool, X | None)."""
    if isinstance(annotation, str):
        annotation = eval(annotation, vars(typing) | {"NoneType": type(None)})  # noqa: S307
    allowed = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    if value is None:
        if type(None) in allowed:
            return None
        raise ConfigError(f"{section}.{key}: must not be null")
    for kind in allowed:
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # YAML's .inf / .nan
                raise ConfigError(f"{section}.{key}: {value!r} is not a finite number")
            return float(value)
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        if kind is bool and isinstance(value, bool):
            return value
    names = [getattr(k, "__name__", str(k)) for k in allowed]
    expected = " or ".join(f"{'an' if n[0] in 'aeiou' else 'a'} {n}" for n in names)
    raise ConfigError(f"{section}.{key}: {value!r} is not {expected}")


def _section(name: str, cls: type, raw: Any) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{name}: expected a mapping of keys, got {raw!r}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(map(str, set(raw) - set(known)))
    if unknown:
        raise ConfigError(f"{name}: unknown key(s) {', '.join(unknown)}; "
                          f"valid: {', '.join(known)}")
    values = {k: _coerce(name, k, v, known[k].type) for k, v in raw.items()}
    return cls(**values)


def params_from_dict(raw: dict[str, Any]) -> Params:
    """Build and validate `Params` from a parsed params.yaml mapping."""
    if not isinstance(raw, dict):
        raise ConfigError("params: the file must hold a mapping of sections")
    sections = {f.name: f for f in fields(Params)}
    unknown = sorted(map(str, set(raw) - set(sections)))
    if unknown:
        raise ConfigError(f"params: unknown section(s) {', '.join(unknown)}; "
                          f"valid: {', '.join(sections)}")
    built = {}
    for name, f in sections.items():
        cls = f.default_factory().__class__  # type: ignore[misc]
        built[name] = _section(name, cls, raw.get(name))
    return Params(**built)


class _ParamsLoader(yaml.SafeLoader):
    """SafeLoader that also reads exponent floats without a dot (`1e-3`, `5E2`) as
    floats, as YAML 1.2 and DVC (ruamel) do; PyYAML's YAML 1.1 rules read them as
    strings, so `lr: 1e-3` was rejected while `dvc params diff` showed 0.001."""


_ParamsLoader.add_implicit_resolver(  # adds to the subclass's own copy of the table
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def read_yaml(text: str) -> Any:
    """Parse params-style YAML the way DVC does (1e-3 is a float, as in YAML 1.2)."""
    return yaml.load(text, Loader=_ParamsLoader)  # noqa: S506 (a SafeLoader subclass)


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate a params file. Raises ConfigError on any problem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"params file {path} is not UTF-8 text (byte {exc.start}); "
                          "save it as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"params file {path} cannot be read: {exc.strerror}") from None
    try:
        raw = read_yaml(text)
    except yaml.YAMLError as exc:  # one line: where, and what (str(exc) quotes the source)
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).strip().splitlines()[0]
        raise ConfigError(f"params file {path} is not valid YAML{where}: {problem}") from None
    if not raw:
        # An empty file would run every stage on the built-in defaults, silently.
        raise ConfigError(f"params file {path} is empty; it must hold the params sections "
                          f"({', '.join(f.name for f in fields(Params))}); see params.yaml "
                          "in the repository or `lra preset apply`")
    return params_from_dict(raw)
