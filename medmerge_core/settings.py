"""Every training setting declared once, and the one coercer that reads settings.

`StageSettings` (LP, probe, FT, pretraining), `ProbeSettings` and `InMergeSettings` are frozen
dataclasses that check themselves. The same coercer reads any settings dataclass from a nested
mapping (`build`: the YAML config), from a flat mapping with dashed keys (`from_flat`: Flower's
run config, `merge-coef-lr`), and from the command line (`add_arguments` / `from_arguments`:
the study drivers). A setting therefore has one name, one default and one check everywhere.
`differences` compares two recorded settings, so a resumed run (an experiment's or a
federation's run folder, a pretrained source) names what changed.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import numbers
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from medmerge_core.errors import InputError

Granularity = Literal["kernel", "layer", "parameter"]
Constraint = Literal["none", "clamp", "softmax"]
GRANULARITIES: tuple[str, ...] = typing.get_args(Granularity)
CONSTRAINTS: tuple[str, ...] = typing.get_args(Constraint)
CHECKPOINT_MINUTES = 10.0  # default interval of a training stage's rolling resume checkpoint
InMergeRule = Literal["quantile", "absolute"]
INMERGE_RULES: tuple[str, ...] = typing.get_args(InMergeRule)
# Chosen on validation data (RESULTS.md, "Probe settings sweep"): with Adam the coefficients
# move at most about coef_lr per step, so the budget and the rate together set how far the
# merge can go.
DEFAULT_COEF_LR = 1e-2
DEFAULT_STEPS = 300


@dataclass(frozen=True)
class StageSettings:
    """Optimiser settings for one stage (LP, probe, FT or pretraining): AdamW as in the paper.

    The budget is `epochs`, or `steps` optimiser steps when given (a data-scarce target has few
    steps per epoch): validation still runs after every full epoch and after the last step.
    """

    epochs: int = 10
    lr: float = 1e-4
    weight_decay: float = 0.01
    steps: int | None = None

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise InputError(f"epochs: must be >= 0, got {self.epochs}")
        if self.steps is not None and self.steps < 0:
            raise InputError(f"steps: must be >= 0, got {self.steps}")
        if not self.lr > 0:
            raise InputError(f"lr: must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise InputError(f"weight_decay: must be >= 0, got {self.weight_decay}")

    def num_epochs(self, steps_per_epoch: int) -> int:
        if self.steps is None:
            return self.epochs
        return math.ceil(self.steps / max(steps_per_epoch, 1))


@dataclass(frozen=True)
class ProbeSettings:
    """The MedMerge probe: the `merge:` config block and the federation's merge-* keys.

    The budget is `epochs` epochs when that is > 0, else `steps` optimiser steps (0: no
    training, the sources' uniform average). BN and the head train with the LP learning rate
    and weight decay; the coefficients with `coef_lr` and no weight decay.
    """

    granularity: Granularity = "kernel"
    freeze_bn: bool = False
    constraint: Constraint = "none"
    coef_lr: float = DEFAULT_COEF_LR
    steps: int = DEFAULT_STEPS
    epochs: int = 0

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise InputError(
                f"granularity: unknown '{self.granularity}'; expected one of {GRANULARITIES}"
            )
        if self.constraint not in CONSTRAINTS:
            raise InputError(
                f"constraint: unknown '{self.constraint}'; expected one of {CONSTRAINTS}"
            )
        if not self.coef_lr > 0:
            raise InputError(f"coef_lr: must be > 0, got {self.coef_lr}")
        for key in ("steps", "epochs"):
            value = getattr(self, key)
            if value < 0:
                raise InputError(f"{key}: must be >= 0, got {value}")
        if self.epochs > 0 and self.steps != DEFAULT_STEPS:
            raise InputError("steps: give the probe budget as steps or as epochs, not both")

    def stage(self, lr: float, weight_decay: float) -> StageSettings:
        """The probe's stage: its budget, with BN and head at (lr, weight_decay)."""
        if self.epochs > 0:
            return StageSettings(self.epochs, lr, weight_decay)
        return StageSettings(0, lr, weight_decay, steps=self.steps)

    @property
    def trains(self) -> bool:
        return (self.epochs if self.epochs > 0 else self.steps) != 0

    def per_round(self, rounds: int) -> ProbeSettings:
        """The budget of one of `rounds` federated probe rounds: this budget spread over them
        (rounded up), so that every site trains about as long as one coordinator would."""
        if self.epochs > 0:
            return dataclasses.replace(self, epochs=math.ceil(self.epochs / rounds))
        return dataclasses.replace(self, steps=math.ceil(self.steps / rounds))


@dataclass(frozen=True)
class InMergeSettings:
    """InMerge hyper-parameters (p, alpha and the absolute rule's tau from the paper).

    p: probability that a kernel draws a partner. rule: when a drawn pair is similar enough:
    "quantile" (default) when its cosine is above the q-quantile of the layer's own pairwise
    cosines (every kernel with its drawn partner), so a layer merges about (1 - q) of its drawn
    kernels whatever its scale; "absolute" (the paper) when the cosine is above tau. Freshly
    initialised or briefly trained deep kernels have cosines within about +-0.1, so the paper's
    tau = 0.3 rarely merges anything there. alpha: weight kept by the kernel itself.
    Which layers are "deep": deep_fraction, the deepest fraction of the network's main-path convs
    (`inmerge.deep_layers`; 0.5 is ResNet-18's last two stages, 0.25 VGG-16's last 3 of 13), the
    same depth on every architecture; or, when set, skip_layers, the paper's L_s: the number of
    leading Conv2d modules never merged, shortcut and transition convs included.
    start_epoch: first training epoch in which the training loop applies InMerge; the merge
    functions ignore it.
    """

    p: float = 0.3
    rule: InMergeRule = "quantile"
    q: float = 0.9
    tau: float = 0.3
    alpha: float = 0.8
    deep_fraction: float = 0.5
    skip_layers: int | None = None
    start_epoch: int = 0

    @property
    def layers_text(self) -> str:
        """Which layers are merged, in words (for reports)."""
        if self.skip_layers is not None:
            return f"every conv after the first {self.skip_layers} (skip_layers)"
        return f"the deepest {self.deep_fraction:g} of the main-path convs (deep_fraction)"

    def __post_init__(self) -> None:
        # Normalised to plain float/int so numpy scalars from YAML or sweeps behave the same.
        if self.rule not in INMERGE_RULES:
            raise InputError(f"rule: unknown '{self.rule}'; expected one of {INMERGE_RULES}")
        for name, low, high in (("p", 0.0, 1.0), ("q", 0.0, 1.0), ("tau", -1.0, 1.0),
                                ("alpha", 0.0, 1.0), ("deep_fraction", 0.0, 1.0)):  # fmt: skip
            value = getattr(self, name)
            ok = (
                isinstance(value, numbers.Real)
                and not isinstance(value, bool)
                and math.isfinite(value)
                and low <= value <= high
            )
            if not ok:
                raise InputError(f"{name}: must be in [{low:g}, {high:g}], got {value!r}")
            object.__setattr__(self, name, float(value))
        for name in ("skip_layers", "start_epoch"):
            value = getattr(self, name)
            if value is None and name == "skip_layers":
                continue
            integer = isinstance(value, numbers.Integral) and not isinstance(value, bool)
            if not integer or value < 0:
                raise InputError(f"{name}: must be an integer >= 0, got {value!r}")
            object.__setattr__(self, name, int(value))


# ----------------------------------------------------------------------------- the coercer


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
    """A settings dataclass from a flat mapping with dashed keys (`merge-coef-lr = 0.01`).

    Errors name the dashed key as typed: `run config merge-constraint: unknown 'x'; ...`."""
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
    """'merge.constraint: ...' -> 'merge-constraint: ...' (the key the user typed)."""
    where, sep, problem = message.partition(": ")
    by_path = {".".join(path): key for key, path in keys.items()}
    return f"{by_path[where]}{sep}{problem}" if where in by_path else message


def differences(
    saved: Mapping[str, Any], now: Mapping[str, Any], prefix: str = ""
) -> list[tuple[str, Any, Any]]:
    """(dotted key, saved value, current value) of every setting that differs, in `now`'s
    order; nested mappings are compared key by key."""
    out: list[tuple[str, Any, Any]] = []
    for key in [*now, *(k for k in saved if k not in now)]:
        old, new = saved.get(key), now.get(key)
        if isinstance(old, Mapping) and isinstance(new, Mapping):
            out += differences(old, new, f"{prefix}{key}.")
        elif old != new:
            out.append((f"{prefix}{key}", old, new))
    return out


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
