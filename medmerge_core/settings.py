"""Every training setting declared once: one name, one default and one check everywhere.

`StageSettings` (LP, probe, FT, pretraining), `ProbeSettings` and `InMergeSettings` are frozen
dataclasses that check themselves. The one coercer (`coerce`) reads them, and any other
settings dataclass, from the YAML config, Flower's run config and the command line.
`differences` compares two recorded settings, so a resumed run (an experiment's or a
federation's run folder, a pretrained source) names what changed.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import typing
from collections.abc import Mapping
from dataclasses import dataclass
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
    """The MedMerge probe: the `merge:` config block and the federation's probe-* keys.

    The budget is `epochs` epochs when that is > 0, else `steps` optimiser steps (0: no
    training, the sources' uniform average). BN and the head train at the probe's BN/head rate
    (lp.lr in an experiment config, probe-lr in a run config) and its weight decay; the
    coefficients with `coef_lr` and no weight decay.
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
