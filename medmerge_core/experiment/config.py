"""The YAML experiment config: typed dataclasses, checked key by key with one-line errors.

`pipelines:` is checked against the registry (`pipelines.REGISTRY`), whose every pipeline is
the default."""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from medmerge_core.coerce import build
from medmerge_core.errors import InputError
from medmerge_core.experiment.pipelines import check_pipelines, default_pipelines
from medmerge_core.experiment.tracking import TRACKING_KINDS, TrackingKind
from medmerge_core.settings import (
    CHECKPOINT_MINUTES,
    InMergeSettings,
    ProbeSettings,
    StageSettings,
)

# Keys that changed meaning: a one-line pointer instead of a silent new behaviour.
RENAMED = {
    "merge.lr": "no longer a key: the coefficients train at merge.coef_lr (no weight decay), "
    "BN and head at lp.lr",
}


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "resnet18"
    image_size: int = 64


@dataclass(frozen=True)
class ExperimentConfig:
    name: str
    data: dict[str, Any]
    sources: dict[str, str]
    model: ModelConfig = field(default_factory=ModelConfig)
    pipelines: list[str] = field(default_factory=lambda: list(default_pipelines()))
    seed: int = 0
    output_dir: str = "runs"
    batch_size: int = 32
    eval_batch_size: int = 128
    device: str = "auto"
    amp: bool | None = None
    channels_last: bool | None = None
    lp: StageSettings = field(default_factory=lambda: StageSettings(epochs=10, lr=1e-4))
    ft: StageSettings = field(default_factory=lambda: StageSettings(epochs=10, lr=1e-5))
    merge: ProbeSettings = field(default_factory=ProbeSettings)  # BN + head: the LP settings
    # FT once per rate, keeping the best on validation (empty: ft.lr alone)
    ft_lr_choices: list[float] = field(default_factory=list)
    inmerge: InMergeSettings | None = None
    checkpoint_minutes: float = CHECKPOINT_MINUTES  # resume checkpoint interval; 0: each epoch
    tracking: TrackingKind = "none"  # tensorboard: event files per method (the tracking extra)

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name):
            raise InputError(f"name: '{self.name}' may use only letters, digits, '_', '.', '-'")
        check_pipelines(self.pipelines, self.sources)
        if not self.sources:
            raise InputError("sources: at least one source is required")
        from medmerge_core.data.registry import validate_spec

        validate_spec(self.data, where="data")
        rates = self.ft_lr_choices
        if any(not lr > 0 for lr in rates) or len(set(rates)) < len(rates):
            raise InputError(f"ft_lr_choices: expected distinct rates > 0, got {rates}")
        for key in ("batch_size", "eval_batch_size"):
            if getattr(self, key) < 1:
                raise InputError(f"{key}: must be >= 1")
        if not self.checkpoint_minutes >= 0:
            raise InputError(f"checkpoint_minutes: must be >= 0, got {self.checkpoint_minutes}")
        if self.tracking not in TRACKING_KINDS:
            raise InputError(
                f"tracking: unknown '{self.tracking}'; expected one of {TRACKING_KINDS}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _substitute(value: Any, variables: dict[str, str]) -> Any:
    """Replace ${name} in strings (e.g. ${data_root} from the command line)."""
    if isinstance(value, str):

        def repl(match: re.Match[str]) -> str:
            key = match.group(1)
            if key not in variables:
                raise InputError(f"${{{key}}}: not set (pass --set {key}=...)")
            return variables[key]

        return re.sub(r"\$\{(\w+)\}", repl, value)
    if isinstance(value, dict):
        return {k: _substitute(v, variables) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, variables) for v in value]
    return value


class _SetError(InputError):
    """An error in a `--set KEY=VALUE` override: reported as is, not prefixed with the file."""


def _placeholders(value: Any) -> set[str]:
    """The NAMEs of every ${NAME} in the strings of a raw config."""
    if isinstance(value, str):
        return set(re.findall(r"\$\{(\w+)\}", value))
    if isinstance(value, dict):
        return set().union(*(_placeholders(v) for v in value.values()))
    if isinstance(value, list):
        return set().union(*(_placeholders(v) for v in value))
    return set()


def _split_settings(
    data: dict[str, Any], settings: dict[str, str]
) -> tuple[dict[str, str], dict[str, str]]:
    """(variables, overrides): a NAME used as ${NAME} in the config (or in another setting's
    value) fills the placeholder; any other key is a dotted config key to override."""
    used = _placeholders(data) | _placeholders(list(settings.values()))
    variables = {k: v for k, v in settings.items() if k in used}
    overrides = {k: v for k, v in settings.items() if k not in used}
    return variables, overrides


def _apply_overrides(data: dict[str, Any], overrides: dict[str, str]) -> dict[str, Any]:
    """A copy of the raw mapping with each dotted key set to its value read as YAML."""
    data = copy.deepcopy(data)
    for key, text in overrides.items():
        parts = key.split(".")
        if not key or not all(parts):
            raise _SetError(f"--set {key}={text}: expected KEY=VALUE with a config key")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise _SetError(
                f"--set {key}={text}: invalid YAML value ({_yaml_problem(exc)})"
            ) from exc
        node = data
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(parts[: depth + 1])
                raise _SetError(f"--set {key}={text}: {where} is not a mapping")
            node = child
        node[parts[-1]] = value
    return data


def _name_override(exc: InputError, overrides: dict[str, str]) -> InputError:
    """Report an error about an overridden key as `--set KEY=VALUE: problem`."""
    message = str(exc)
    where, _, problem = message.partition(": ")
    for key, text in overrides.items():
        if where == key:
            return _SetError(f"--set {key}={text}: {problem}")
        # inside the value set (ft={epochz: 1}) or a section it created (seed.x=1)
        if where.startswith((f"{key}.", f"{key}[")) or key.startswith(f"{where}."):
            return _SetError(f"--set {key}={text}: {message}")
    return exc


def config_from_dict(
    data: dict[str, Any], variables: dict[str, str] | None = None
) -> ExperimentConfig:
    """Validate a raw config. `variables` are the command line's `--set` pairs: a NAME used as
    ${NAME} in the config fills it; a (dotted) key such as `ft.epochs` overrides that field,
    its value read as YAML; an unknown key is reported like one in the file."""
    if not isinstance(data, dict):
        raise InputError("config: top level must be a mapping")
    variables, overrides = _split_settings(data, dict(variables or {}))
    data = _apply_overrides(data, overrides)
    try:
        return build(ExperimentConfig, _substitute(data, variables), renamed=RENAMED)
    except _SetError:
        raise
    except InputError as exc:
        named = _name_override(exc, overrides)
        if named is exc:
            raise
        raise named from exc


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's own words for what is wrong, on one line."""
    text = getattr(exc, "problem", None) or getattr(exc, "context", None) or str(exc)
    return " ".join(str(text).split())


def load_config(path: Path, variables: dict[str, str] | None = None) -> ExperimentConfig:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"config not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise InputError(f"{path}{where}: invalid YAML ({_yaml_problem(exc)})") from exc
    try:
        return config_from_dict(data or {}, variables)
    except _SetError:
        raise
    except InputError as exc:
        raise InputError(f"{path}: {exc}") from exc


def dump_config(config: ExperimentConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
