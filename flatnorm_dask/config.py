"""Run settings: one schema, validated on load, documented once (in ``configs/default.yaml``).

A run's settings come in layers, each overriding the one before:

1. the schema defaults below (equal to ``configs/default.yaml``, which a test checks);
2. for the ``cluster`` section, dask's config under ``flatnorm.cluster`` (defaults from the packaged
   ``flatnorm.yaml``, overridable by ``~/.config/dask/*.yaml`` or ``DASK_FLATNORM__CLUSTER__*`` variables);
3. the user's YAML file;
4. ``overrides``: dotted keys such as ``{"solve.level": "AMP"}``, e.g. from command-line flags.

Every problem raises :class:`ConfigError`, whose one-line message names the source (file) and the dotted key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from dask import config as dask_config

from .schema import LEVELS, ON_ERROR

__all__ = [
    "ClusterConfig",
    "Config",
    "ConfigError",
    "InputConfig",
    "OutputConfig",
    "SECTIONS",
    "SolveConfig",
    "load_config",
]

#: Dask config defaults of the package (the ``flatnorm.cluster`` namespace).
DASK_DEFAULTS_FILE = Path(__file__).with_name("flatnorm.yaml")


def _register_dask_defaults() -> None:
    # Registered (not set) so that user dask YAML and DASK_* variables still win over them.
    with open(DASK_DEFAULTS_FILE, encoding="utf-8") as f:
        dask_config.update_defaults(yaml.safe_load(f))


_register_dask_defaults()


class ConfigError(ValueError):
    """A bad setting: one line naming the source (a file, ``overrides`` or dask config) and the dotted key."""

    def __init__(self, source: str, key: str | None, problem: str):
        self.source, self.key, self.problem = source, key, problem
        where = f"{source}: {key}" if key else source
        super().__init__(" ".join(f"{where}: {problem}".split()))


def _option(default: Any, kind: str, *, nullable: bool = False, choices: tuple[str, ...] = (),
            minimum: float | None = None, positive: bool = False) -> Any:
    """A dataclass field carrying its validation rule in ``metadata``."""
    rule = {"kind": kind, "nullable": nullable, "choices": choices, "minimum": minimum, "positive": positive}
    return field(default=default, metadata=rule)


@dataclass(frozen=True)
class InputConfig:
    """Where the statistics files are and how to read them (``input`` section)."""

    root: str | None = _option(None, "path", nullable=True)
    pattern: str | None = _option(None, "str", nullable=True)
    manifest: str | None = _option(None, "path", nullable=True)
    camera: str | None = _option("lsstcam", "str", nullable=True)
    on_error: str = _option("raise", "choice", choices=ON_ERROR)
    batch_size: int = _option(1000, "int", minimum=1)
    butler: str | None = _option(None, "path", nullable=True)
    collections: list[str] | None = _option(None, "strlist", nullable=True)
    dataset_type: str = _option("flatStats", "str")
    where: str | None = _option(None, "str", nullable=True)
    instrument: str | None = _option(None, "str", nullable=True)


@dataclass(frozen=True)
class SolveConfig:
    """How the decomposition is fitted (``solve`` section)."""

    level: str = _option("DETECTOR", "choice", choices=LEVELS)
    iterations: int = _option(10, "int", minimum=1)
    tol: float | None = _option(None, "float", nullable=True, positive=True)
    max_iter: int = _option(1000, "int", minimum=1)
    clip_sigma: float | None = _option(None, "float", nullable=True, positive=True)
    clip_rounds: int = _option(5, "int", minimum=1)
    persist_max_mb: int = _option(2048, "int", minimum=0)


@dataclass(frozen=True)
class OutputConfig:
    """What a run writes (``output`` section)."""

    store: str | None = _option(None, "path", nullable=True)
    overwrite: bool = _option(False, "bool")
    scales_yaml: str | None = _option(None, "path", nullable=True)
    butler: str | None = _option(None, "path", nullable=True)
    run: str | None = _option(None, "str", nullable=True)


@dataclass(frozen=True)
class ClusterConfig:
    """Which Dask cluster runs the job (``cluster`` section; defaults also in ``flatnorm.yaml``)."""

    scheduler: str | None = _option(None, "str", nullable=True)
    n_workers: int | None = _option(None, "int", nullable=True, minimum=1)
    threads_per_worker: int | None = _option(None, "int", nullable=True, minimum=1)
    memory_limit: str | int | float | None = _option("auto", "memory", nullable=True)
    wait_timeout: float = _option(600.0, "float", positive=True)


#: Section name -> its dataclass (``dask`` is free-form and not listed).
SECTIONS: dict[str, type] = {
    "input": InputConfig,
    "solve": SolveConfig,
    "output": OutputConfig,
    "cluster": ClusterConfig,
}
_DASK_SECTION = "dask"


@dataclass(frozen=True)
class Config:
    """All settings of a run; build it with :func:`load_config` (which validates), not by hand.

    ``dask`` holds the user's dask config keys, flattened to dotted names
    (``{"distributed.worker.memory.target": 0.7}``); treat it as read-only.
    """

    input: InputConfig = field(default_factory=InputConfig)
    solve: SolveConfig = field(default_factory=SolveConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    dask: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain nested dict (JSON/YAML-ready) that :meth:`from_dict` turns back into an equal Config."""
        out = {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}
        out[_DASK_SECTION] = dict(self.dask)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "config mapping") -> Config:
        """Validate a nested mapping shaped like ``configs/default.yaml`` (e.g. a store's ``config`` attr)."""
        return _build(source, data, None)

    def dask_settings(self) -> dict[str, Any]:
        """Keys to pass to ``dask.config.set`` for the run: the ``dask`` section plus ``flatnorm.cluster.*``."""
        settings = dict(self.dask)
        for name, value in dataclasses.asdict(self.cluster).items():
            settings[f"flatnorm.cluster.{name}"] = value
        return settings


def load_config(path: str | os.PathLike | None = None, overrides: Mapping[str, object] | None = None) -> Config:
    """Read, merge and validate a run's settings.

    Parameters
    ----------
    path : path-like, optional
        YAML file with any of the sections of ``configs/default.yaml``; defaults only when omitted.
    overrides : mapping, optional
        Dotted keys that win over the file, e.g. ``{"solve.level": "AMP", "input.root": "/data"}``;
        ``"dask.<key>"`` sets a dask config key.  Setting one of ``input.pattern`` / ``input.manifest``
        drops the other from the file, and ``solve.iterations`` without ``solve.tol`` drops the file's
        ``tol``, so that a flag always means what it says.

    Returns
    -------
    Config

    Raises
    ------
    ConfigError
        Unreadable file, YAML syntax error (with its line), unknown section or option (with the closest
        valid name), wrong type, value out of range, or conflicting options.
    """
    data: Any = {}
    source = "defaults"
    if path is not None:
        source = os.fspath(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as err:
            raise ConfigError(source, None, f"cannot read config file: {err.strerror or err}") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(source, None, _yaml_problem(err)) from None
        if data is None:  # an empty file (or only comments): all defaults
            data = {}
    return _build(source, data, overrides)


def _yaml_problem(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err)
    context, context_mark = getattr(err, "context", None), getattr(err, "context_mark", None)
    if context and context_mark is not None and mark is not None and context_mark.line != mark.line:
        # e.g. an unclosed [ is only noticed at the end of the file: say where it started
        problem += f" ({context} started on line {context_mark.line + 1})"
    if mark is not None:
        return f"line {mark.line + 1}, column {mark.column + 1}: YAML syntax error: {problem}"
    return f"YAML syntax error: {problem}"


def _build(source: str, data: Any, overrides: Mapping[str, object] | None) -> Config:
    """Layer defaults, dask's ``flatnorm.cluster``, ``data`` (from ``source``) and ``overrides``; validate."""
    values: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    origin: dict[str, str] = {}  # dotted key -> where its current value came from
    dask_keys: dict[str, Any] = {}

    def put(section: str, option: str, value: Any, where: str, prefix: str = "") -> None:
        key = f"{section}.{option}"
        if option not in _rules(section):
            hint = _suggest(section, option).replace("did you mean ", f"did you mean {prefix}")
            raise ConfigError(where, prefix + key, f"unknown option{hint}")
        values[section][option] = _check(value, _rules(section)[option], prefix + key, where)
        origin[key] = where

    # Layer 2: dask config (packaged flatnorm.yaml, user dask YAML, DASK_FLATNORM__CLUSTER__* variables).
    dask_source = "dask config (DASK_FLATNORM__* environment or dask YAML)"
    cluster = dask_config.get("flatnorm.cluster", default=None) or {}
    if not isinstance(cluster, Mapping):
        raise ConfigError(dask_source, "flatnorm.cluster", f"must be a mapping, got {_kind(cluster)}")
    for option, value in cluster.items():
        # dask treats - and _ alike
        put("cluster", str(option).replace("-", "_"), value, dask_source, prefix="flatnorm.")

    # Layer 3: the file (or mapping).
    if not isinstance(data, Mapping):
        raise ConfigError(source, None, f"a config must be a mapping of sections, got {_kind(data)}")
    for section, body in data.items():
        section = str(section)
        if section == _DASK_SECTION:
            dask_keys.update(_dask_section(body, source))
            continue
        if section not in SECTIONS:
            raise ConfigError(source, section, f"unknown section{_closest(section, [*SECTIONS, _DASK_SECTION])}")
        if body is None:  # "solve:" with nothing under it
            continue
        if not isinstance(body, Mapping):
            raise ConfigError(source, section, f"a section must be a mapping of options, got {_kind(body)}")
        for option, value in body.items():
            put(section, str(option), value, source)
    _check_exclusive(values, origin)

    # Layer 4: overrides; a flag replaces what the file says about the same choice.
    given: set[str] = set()
    for key, value in (overrides or {}).items():
        key = str(key)
        section, _, option = key.partition(".")
        if section == _DASK_SECTION and option:
            dask_keys.update(_dask_section({option: value}, "overrides"))
            continue
        if section not in SECTIONS or not option:
            raise ConfigError("overrides", key,
                              f"unknown option{_closest(key, [f'{s}.{o}' for s in SECTIONS for o in _rules(s)])}")
        put(section, option, value, "overrides")
        given.add(key)
    for chosen, dropped in _FLAG_WINS:
        if chosen in given and dropped not in given and _get(values, chosen) is not None:
            section, option = dropped.split(".")
            values[section].pop(option, None)  # back to its default (None)
            origin.pop(dropped, None)
    _check_exclusive(values, origin)
    _check_complete(values, origin)

    return Config(**{name: SECTIONS[name](**values[name]) for name in SECTIONS}, dask=dask_keys)


# The two ways of finding inputs: files below a directory (pattern or manifest), or a butler registry.
_FILE_KEYS = ("input.root", "input.pattern", "input.manifest")
_BUTLER_KEYS = ("input.butler", "input.collections", "input.where")

#: (set by an override, reset to its default unless also overridden): a flag replaces the file's choice.
_FLAG_WINS = (("input.pattern", "input.manifest"), ("input.manifest", "input.pattern"),
              ("solve.iterations", "solve.tol"),
              *(("input.butler", key) for key in _FILE_KEYS),
              *((key, other) for key in _FILE_KEYS for other in _BUTLER_KEYS))


def _get(values: dict[str, dict[str, Any]], key: str) -> Any:
    section, option = key.split(".")
    return values[section].get(option)


def _check_exclusive(values: dict[str, dict[str, Any]], origin: dict[str, str]) -> None:
    inp = values["input"]
    if inp.get("pattern") is not None and inp.get("manifest") is not None:
        raise ConfigError(origin["input.manifest"], "input.manifest",
                          f"cannot be combined with input.pattern (set in {origin['input.pattern']}); "
                          f"give one way of finding the files")
    if inp.get("butler") is not None:
        for key in _FILE_KEYS:
            if _get(values, key) is not None:
                raise ConfigError(origin[key], key, f"cannot be combined with input.butler (set in "
                                  f"{origin['input.butler']}); give one way of finding the files")


def _check_complete(values: dict[str, dict[str, Any]], origin: dict[str, str]) -> None:
    """Options that need one another, checked once every layer is applied."""
    inp, out = values["input"], values["output"]
    if inp.get("butler") is not None and not inp.get("collections"):
        raise ConfigError(origin["input.butler"], "input.collections",
                          "required with input.butler: the collections to search (--collections)")
    if inp.get("butler") is None:
        for key in ("input.collections", "input.where"):
            if _get(values, key) is not None:
                raise ConfigError(origin[key], key, "only applies to a butler repository (input.butler)")
    if (out.get("butler") is None) != (out.get("run") is None):
        given, missing = ("output.butler", "output.run") if out.get("butler") is not None else \
            ("output.run", "output.butler")
        raise ConfigError(origin[given], missing, f"required with {given}: output.butler is the repository "
                          "and output.run the new RUN collection the scales are put into")
    if out.get("butler") is not None and inp.get("butler") is None and inp.get("instrument") is None:
        raise ConfigError(origin["output.butler"], "input.instrument",
                          "required with output.butler when the inputs are files, not a butler: the "
                          "instrument of the output data ids (e.g. LSSTCam)")


def _dask_section(body: Any, source: str) -> dict[str, Any]:
    """Flatten a ``dask`` section to dotted leaf keys, so ``dask.config.set`` merges instead of replacing."""
    if body is None:
        return {}
    if not isinstance(body, Mapping):
        raise ConfigError(source, _DASK_SECTION, f"must be a mapping of dask config keys, got {_kind(body)}")
    flat: dict[str, Any] = {}

    def walk(node: Mapping, prefix: str) -> None:
        for key, value in node.items():
            dotted = f"{prefix}.{key}" if prefix else str(key)
            if isinstance(value, Mapping) and value:
                walk(value, dotted)
            else:
                flat[dotted] = value

    walk(body, "")
    for dotted in flat:
        if dotted.split(".")[0] == "flatnorm":
            raise ConfigError(source, f"{_DASK_SECTION}.{dotted}",
                              "flatnorm's own settings belong in their sections (e.g. cluster:), not under dask:")
    return flat


def _rules(section: str) -> dict[str, dict[str, Any]]:
    return {f.name: dict(f.metadata) for f in dataclasses.fields(SECTIONS[section])}


def _suggest(section: str, option: str) -> str:
    """Hint for an unknown option: the same name in another section, else the closest name in this one."""
    for other in SECTIONS:
        if other != section and option in _rules(other):
            return f"; did you mean {other}.{option}?"
    hint = difflib.get_close_matches(option, list(_rules(section)), n=1, cutoff=0.6)
    if hint:
        return f"; did you mean {section}.{hint[0]}?"
    return f" (valid: {', '.join(_rules(section))})"


def _closest(name: str, valid: list[str]) -> str:
    hint = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    return f"; did you mean {hint[0]}?" if hint else f" (valid: {', '.join(valid)})"


def _kind(value: Any) -> str:
    return {type(None): "null", bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "a mapping"}.get(type(value), type(value).__name__)


def _check(value: Any, rule: Mapping[str, Any], key: str, where: str) -> Any:
    """Validate and normalise one value against its rule; raise ConfigError naming ``key`` and ``where``."""
    kind = rule["kind"]
    if value is None:
        if rule["nullable"]:
            return None
        raise ConfigError(where, key, "must not be null")
    if kind in ("str", "path"):
        if kind == "path" and isinstance(value, os.PathLike):
            value = os.fspath(value)
        if not isinstance(value, str) or not value:
            raise ConfigError(where, key, f"expected a non-empty string, got {_kind(value)} {value!r}")
        return os.path.expanduser(value) if kind == "path" else value
    if kind == "strlist":
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not all(isinstance(v, str) for v in items):
            raise ConfigError(where, key, f"expected a list of names (or one comma-separated string), got "
                              f"{_kind(value)} {value!r}")
        items = [v.strip() for v in items if v.strip()]
        if not items:
            raise ConfigError(where, key, f"expected at least one name, got {value!r}")
        return items
    if kind == "choice":
        if isinstance(value, str):
            for choice in rule["choices"]:
                if value.lower() == choice.lower():
                    return choice  # canonical spelling: DETECTOR/AMP upper, raise/mask lower
        raise ConfigError(where, key, f"must be one of {', '.join(rule['choices'])}, got {value!r}")
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(where, key, f"expected true or false, got {_kind(value)} {value!r}")
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(where, key, f"expected an integer, got {_kind(value)} {value!r}")
        if rule["minimum"] is not None and value < rule["minimum"]:
            raise ConfigError(where, key, f"must be >= {rule['minimum']}, got {value}")
        return int(value)
    if kind == "float":
        number = _number(value)
        if number is None or not math.isfinite(number):
            raise ConfigError(where, key, f"expected a finite number, got {_kind(value)} {value!r}")
        if rule["positive"] and not number > 0:
            raise ConfigError(where, key, f"must be > 0, got {value!r}")
        return number
    if kind == "memory":
        return _memory(value, key, where)
    raise AssertionError(f"no rule for kind {kind!r}")  # a schema bug, not a user error


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        # PyYAML reads 1e-10 (no dot) as a string: accept it as the number it plainly is.
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _memory(value: Any, key: str, where: str) -> str | int | float:
    """Like distributed's ``memory_limit``: "auto", a size such as "4GiB", bytes, or a fraction in (0, 1]."""
    if isinstance(value, str):
        if value.lower() == "auto":
            return "auto"
        from dask.utils import parse_bytes

        try:
            if parse_bytes(value) > 0:
                return value
        except ValueError:
            pass
        raise ConfigError(where, key, f"expected 'auto' or a size such as '4GiB', got {value!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 and math.isfinite(value):
        if isinstance(value, float) and value > 1:
            raise ConfigError(where, key, f"a float is a fraction of the machine's memory in (0, 1], got {value}")
        return value
    raise ConfigError(where, key, f"expected 'auto', a size such as '4GiB' or a positive number, got {value!r}")
