"""The one coercer that reads any settings dataclass: from a nested mapping (`build`: the YAML
config), a flat mapping with dashed keys (`from_flat`: Flower's run config, `probe-coef-lr`) and
the command line (`add_arguments` / `from_arguments`: the study drivers); generic over the
dataclass, so it lives apart from the settings it reads (`settings`).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from medmerge_core.errors import InputError


def _nested(hint: Any) -> tuple[type | None, bool]:
    """(the settings dataclass inside a field's hint or None, whether the field is optional)."""
    options = typing.get_args(hint) if _is_union(hint) else (hint,)
    classes = [o for o in options if dataclasses.is_dataclass(o)]
    return (classes[0] if classes else None), type(None) in options


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def check(value: Any, hint: Any, where: str, default: Any = None,
          renamed: Mapping[str, str] | None = None) -> Any:  # fmt: skip
    """Convert/validate one value against a type hint; raise InputError naming `where`.

    A nested settings block starts from `default` (the field's default), so a partial block
    changes only the keys it names.
    """
    if _is_union(hint):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return check(value, option, where, default, renamed)
            except InputError as exc:
                errors.append(str(exc))
        raise InputError(errors[0])
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise InputError(f"{where}: expected a mapping, got {type(value).__name__}")
        base = dataclasses.asdict(default) if dataclasses.is_dataclass(default) else {}
        return build(hint, {**base, **value}, where + ".", renamed)  # type: ignore[arg-type]
    if origin in (list, tuple):
        if isinstance(value, str) and origin is tuple:  # a flat run config: "a, b, c"
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise InputError(f"{where}: expected a list, got {type(value).__name__}")
        item = typing.get_args(hint)[0]
        items = [check(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise InputError(f"{where}: expected a mapping, got {type(value).__name__}")
        _, item = typing.get_args(hint)
        return {str(k): check(v, item, f"{where}.{k}") for k, v in value.items()}
    if hint is Any:
        return value
    if origin is Literal:  # the class's own check names the allowed values
        return value
    if hint is Path and isinstance(value, str) and value:
        return Path(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise InputError(
            f"{where}: expected {hint.__name__}, got {type(value).__name__} ({value!r})"
        )
    return value


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def build(cls: type, data: Mapping[str, Any], prefix: str = "",
          renamed: Mapping[str, str] | None = None) -> Any:  # fmt: skip
    """A settings dataclass from a nested mapping; every error is one line naming its key.

    `renamed` maps dotted keys that changed meaning to a pointer at what replaced them."""
    renamed = renamed or {}
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if f"{prefix}{key}" in renamed:
            raise InputError(f"{prefix}{key}: {renamed[prefix + key]}")
        if key not in fields:
            close = difflib.get_close_matches(str(key), sorted(fields), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise InputError(f"{prefix}{key}: unknown key{hint}")
    kwargs = {
        k: check(v, hints[k], prefix + k, _default(fields[k]), renamed) for k, v in data.items()
    }
    for name, field in fields.items():
        if name not in kwargs and _default(field) is dataclasses.MISSING:
            raise InputError(f"{prefix}{name}: missing")
    try:
        return cls(**kwargs)
    except InputError as exc:  # a section's own check names its key; add the section
        message = str(exc)
        if prefix and not message.startswith(prefix.rstrip(".")):
            raise InputError(prefix + message) from exc
        raise


def _dashed(name: str) -> str:
    return name.replace("_", "-")


def flat_keys(cls: type) -> dict[str, tuple[str, ...]]:
    """Dashed flat key -> field path. A nested block's fields are `<block>-<field>`; an optional
    block's own key is a true/false switch (`inmerge = false`)."""
    keys: dict[str, tuple[str, ...]] = {}
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        inner, optional = _nested(hints[field.name])
        if inner is None or optional:
            keys[_dashed(field.name)] = (field.name,)
        if inner is not None:
            for sub in dataclasses.fields(inner):
                keys[f"{_dashed(field.name)}-{_dashed(sub.name)}"] = (field.name, sub.name)
    return keys


def from_flat(cls: type, flat: Mapping[str, Any], where: str = "run config",
              renamed: Mapping[str, str] | None = None) -> Any:  # fmt: skip
    """A settings dataclass from a flat mapping with dashed keys (`probe-coef-lr = 0.01`).

    Errors name the dashed key as typed: `run config probe-constraint: unknown 'x'; ...`."""
    keys = flat_keys(cls)
    hints = typing.get_type_hints(cls)
    defaults = {f.name: _default(f) for f in dataclasses.fields(cls)}
    nested: dict[str, Any] = {}
    switches: dict[str, bool] = {}
    for key, value in flat.items():
        if renamed and key in renamed:
            raise InputError(f"{where} {key}: {renamed[key]}")
        if key not in keys:
            close = difflib.get_close_matches(key, sorted(keys), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise InputError(f"{where}: unknown key '{key}'{hint}")
        path = keys[key]
        inner, _ = _nested(hints[path[0]])
        if len(path) == 1 and inner is not None:  # an optional block's switch
            if not isinstance(value, bool):
                raise InputError(f"{where} {key}: expected true or false, got {value!r}")
            switches[path[0]] = value
        elif len(path) == 1:
            nested[path[0]] = value
        else:
            nested.setdefault(path[0], {})[path[1]] = value
    for name, on in switches.items():
        if not on:
            nested[name] = None
        elif name not in nested:
            nested[name] = {}
    for name, block in nested.items():
        inner, _ = _nested(hints[name])
        if inner is not None and block is not None and defaults[name] is None:
            defaults[name] = inner()
    try:
        data = {k: check(v, hints[k], k, defaults[k]) for k, v in nested.items()}
        return cls(**data)
    except InputError as exc:
        raise InputError(f"{where} {_flat_message(str(exc), keys)}") from exc


def _flat_message(message: str, keys: Mapping[str, tuple[str, ...]]) -> str:
    """'probe.constraint: ...' -> 'probe-constraint: ...' (the key the user typed)."""
    where, sep, problem = message.partition(": ")
    by_path = {".".join(path): key for key, path in keys.items()}
    return f"{by_path[where]}{sep}{problem}" if where in by_path else message


# ----------------------------------------------------------------------------- argparse


def add_arguments(parser: argparse.ArgumentParser, cls: type, *, skip: Sequence[str] = (),
                  help: Mapping[str, str] | None = None,
                  prefixes: Mapping[str, str] | None = None) -> None:  # fmt: skip
    """One option per field: `--field-name`, typed from the hint, defaulting to the field's
    default; a nested settings block gives `--<block>-<field>` (or `prefixes[block]` instead of
    `<block>-`). Booleans are switches (`--x` / `--no-x`), tuples take several values."""
    for option, dest, hint, default in _options(cls, skip, prefixes or {}):
        text = (help or {}).get(dest)
        required = default is dataclasses.MISSING
        value = None if required else default
        if _non_none(hint) is bool:
            parser.add_argument(option, dest=dest, action=argparse.BooleanOptionalAction,
                                default=value, help=text)  # fmt: skip
        elif typing.get_origin(_non_none(hint)) is tuple:
            item = typing.get_args(_non_none(hint))[0]
            parser.add_argument(option, dest=dest, type=item, nargs="+", required=required,
                                default=value, help=text)  # fmt: skip
        elif typing.get_origin(_non_none(hint)) is Literal:
            parser.add_argument(option, dest=dest, choices=typing.get_args(_non_none(hint)),
                                required=required, default=value, help=text)  # fmt: skip
        else:
            parser.add_argument(option, dest=dest, type=_non_none(hint), required=required,
                                default=value, help=text)  # fmt: skip


def _options(
    cls: type, skip: Sequence[str], prefixes: Mapping[str, str]
) -> list[tuple[str, str, Any, Any]]:
    """(option, dest, hint, default) per command-line option of `cls`."""
    out = []
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if field.name in skip or not field.init:
            continue
        inner, _ = _nested(hints[field.name])
        if inner is None:
            out.append((f"--{_dashed(field.name)}", field.name, hints[field.name], _default(field)))
            continue
        prefix = prefixes.get(field.name, f"{_dashed(field.name)}-")
        block = _default(field)
        inner_hints = typing.get_type_hints(inner)
        for sub in dataclasses.fields(inner):
            dest = f"{field.name}.{sub.name}"
            out.append((f"--{prefix}{_dashed(sub.name)}", dest, inner_hints[sub.name],
                        getattr(block, sub.name)))  # fmt: skip
    return out


def from_arguments(cls: type, namespace: argparse.Namespace, **extra: Any) -> Any:
    """The dataclass from the options `add_arguments` added, plus `extra` fields."""
    values: dict[str, Any] = {}
    blocks: dict[str, dict[str, Any]] = {}
    for dest, value in vars(namespace).items():
        if isinstance(value, list):
            value = tuple(value)
        block, dot, name = dest.partition(".")
        if dot:
            blocks.setdefault(block, {})[name] = value
        elif dest in {f.name for f in dataclasses.fields(cls)}:
            values[dest] = value
    hints = typing.get_type_hints(cls)
    for block, fields in blocks.items():
        inner, _ = _nested(hints[block])
        values[block] = inner(**fields)
    return cls(**{**values, **extra})


def _non_none(hint: Any) -> Any:
    if _is_union(hint):
        options = [o for o in typing.get_args(hint) if o is not type(None)]
        return options[0]
    return hint
