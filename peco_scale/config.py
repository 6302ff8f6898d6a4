"""Typed configuration: dataclass defaults -> named preset -> file (JSON/YAML) -> command line.

A run's config is a tree of small dataclasses (one section per component). Command-line
overrides are written ``--section.key value`` (or ``--section.key=value``); values are
parsed as YAML scalars/lists and coerced to the field's declared type, so ``--model.ch_mult
[1,2,4]`` and ``--optim.lr 1e-4`` both work. Unknown keys are an error, never ignored.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any, Mapping

import yaml


class ConfigError(ValueError):
    """A bad config value; the message is one line naming the value and the fix."""


def _field_doc(help_: str) -> dict:
    return {"help": help_}


def field(default: Any, help: str) -> Any:  # noqa: A002 - mirrors argparse wording
    """A dataclass field with a one-line doc; mutable defaults are copied per instance."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=_field_doc(help))
    return dataclasses.field(default=default, metadata=_field_doc(help))


def section(cls: type, help: str) -> Any:  # noqa: A002
    """A nested config section (a dataclass built with its own defaults)."""
    return dataclasses.field(default_factory=cls, metadata=_field_doc(help))


def with_defaults(base: type, name: str, docs: Mapping[str, str] | None = None,
                  new: Mapping[str, tuple[type, Any, str]] | None = None, **defaults: Any) -> type:
    """A subclass of the config section ``base`` named ``name`` whose fields take other defaults
    and keep their docs (a stage's Train/Optim/Data sections); ``docs`` rewords some of them and
    ``new`` adds fields (name -> (type, default, doc)). Assign the result to a module-level
    ``name``: its ``__module__`` is the caller's."""
    docs, new = dict(docs or {}), dict(new or {})
    known = {f.name: f.metadata.get("help", "") for f in dataclasses.fields(base)}
    unknown = sorted((set(defaults) | set(docs)) - set(known))
    if unknown or set(new) & set(known):
        raise TypeError(f"{name}: {base.__name__} has no field {', '.join(unknown)} or already has {set(new) & set(known)}")
    hints, inst = typing.get_type_hints(base), base()
    spec = [(k, hints[k], field(defaults.get(k, getattr(inst, k)), docs.get(k, known[k])))
            for k in known if k in defaults or k in docs]
    spec += [(k, tp, field(value, doc)) for k, (tp, value, doc) in new.items()]
    cls = dataclasses.make_dataclass(name, spec, bases=(base,))
    cls.__doc__ = base.__doc__
    cls.__module__ = sys._getframe(1).f_globals["__name__"]
    return cls


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Convert a parsed YAML/JSON value to the declared field type ``tp``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, args[0], name)
    if origin in (tuple, list):
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, (list, tuple)):
            value = [value]
        (inner, *_) = typing.get_args(tp) or (Any,)
        items = [_coerce(v, inner, name) for v in value]
        return tuple(items) if origin is tuple else items
    if tp is bool:
        if isinstance(value, str):
            low = value.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ConfigError(f"{name}={value!r} is not a boolean; use true or false")
        return bool(value)
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{name}={value!r} must be a number")
        try:
            out = tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}={value!r} must be {'an integer' if tp is int else 'a number'}") from None
        if tp is int and isinstance(value, float) and value != out:
            raise ConfigError(f"{name}={value!r} must be an integer")
        return out
    if tp is str:
        return str(value)
    return value


def _hints(cls: type) -> dict:
    return typing.get_type_hints(cls)


def apply_overrides(cfg: Any, overrides: Mapping[str, Any], source: str) -> None:
    """Set dotted keys (``section.key``) on a dataclass tree in place.

    ``source`` names where the overrides came from, for error messages.
    """
    for dotted, value in overrides.items():
        node, parts = cfg, dotted.split(".")
        for i, part in enumerate(parts):
            names = {f.name for f in dataclasses.fields(node)}
            if part not in names:
                where = ".".join(parts[:i]) or "the top level"
                raise ConfigError(
                    f"unknown config key '{dotted}' (from {source}): '{part}' is not in {where}; "
                    f"valid keys there: {', '.join(sorted(names))}"
                )
            if i == len(parts) - 1:
                tp = _hints(type(node))[part]
                if dataclasses.is_dataclass(getattr(node, part)):
                    if not isinstance(value, Mapping):
                        raise ConfigError(f"config key '{dotted}' (from {source}) is a section; give key: value pairs")
                    apply_overrides(getattr(node, part), value, source)
                else:
                    setattr(node, part, _coerce(value, tp, dotted))
            else:
                node = getattr(node, part)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def load_file(path: str | Path) -> dict[str, Any]:
    """Read a JSON or YAML config file into a flat dotted dict."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' not found; pass --config PATH to an existing .json or .yaml file")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"config file '{path}' is not valid {path.suffix[1:].upper() or 'YAML'}: {exc}".splitlines()[0]) from None
    if not isinstance(data, Mapping):
        raise ConfigError(f"config file '{path}' must hold a mapping of sections, got {type(data).__name__}")
    return flatten(data)


def parse_cli(argv: list[str], aliases: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """Split ``--key value`` / ``--key=value`` pairs into (config overrides, launcher options).

    ``aliases`` maps short flags (``data``) to dotted keys (``data.path``). Flags that are
    not dotted and not aliases are returned as launcher options (``config``, ``local_rank``).
    Values are parsed as YAML so numbers, booleans and lists arrive typed.
    """
    overrides: dict[str, Any] = {}
    options: dict[str, str] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument '{arg}'; options are written --section.key VALUE")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                value = "true"  # a bare flag means true (e.g. --train.compile)
            else:
                i += 1
                value = argv[i]
        i += 1
        key = key.replace("-", "_")
        if key in aliases:
            key = aliases[key]
        if "." in key:
            overrides[key] = yaml.safe_load(value) if value else ""
        else:
            options[key] = value
    return overrides, options


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config tree as plain JSON-able data (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def from_dict(cls: type, data: Mapping[str, Any]) -> Any:
    """Rebuild a config tree saved with :func:`to_dict` (checkpoints, artifacts)."""
    cfg = cls()
    apply_overrides(cfg, flatten(data), "a saved config")
    return cfg


def describe(cls: type, prefix: str = "") -> list[str]:
    """One line per field: ``--section.key (default) help`` for ``--help`` output."""
    lines = []
    inst = cls()
    for f in dataclasses.fields(cls):
        value = getattr(inst, f.name)
        if dataclasses.is_dataclass(value):
            doc = " ".join((type(value).__doc__ or f.metadata.get("help", "")).split())
            lines += [f"{prefix}{f.name}: {doc}", *describe(type(value), f"{prefix}{f.name}.")]
        else:
            lines.append(f"  --{prefix}{f.name} ({value!r})  {f.metadata.get('help', '')}")
    return lines
