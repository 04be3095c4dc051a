"""Learning the merge: the one code path that builds the MedMerge probe, trains it and bakes it.

The experiment's MedMerge and Avg+FT pipelines and the demo call `learn_merge`; the federation's
coordinator and every site of a federated probe build the probe with `seeded_probe` and train it
with `train_probe`, the very step `learn_merge` runs. Every probe writes the same report
(`write_merge_report`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from medmerge_core.checkpointing import FitResult
from medmerge_core.coefficients import coefficient_summary
from medmerge_core.errors import InputError
from medmerge_core.io import atomic_savez, atomic_write_json
from medmerge_core.merge import MergedModel
from medmerge_core.models import StateDict, build_model
from medmerge_core.settings import ProbeSettings
from medmerge_core.train import Batches, FitOptions, Runtime, fit

log = logging.getLogger(__name__)

UNIFORM = ProbeSettings(steps=0)  # Avg+FT: the merge at its 1/d initialisation, untrained
PROBE_OPTIONS = FitOptions(name="medmerge probe")  # a probe's stage, unless its caller names it


@dataclass
class LearnedMerge:
    model: nn.Module  # the baked plain model, on the runtime's device
    fit: FitResult | None  # None when the budget is zero
    coefficients: dict[str, np.ndarray]  # [d, ...] per merged key


def probe_model(
    model: nn.Module,
    sources: Sequence[StateDict],
    names: Sequence[str],
    settings: ProbeSettings,
    held_at: Sequence[float] | None = None,
) -> MergedModel:
    """The probe around `model` (whose head is new), at the merge's initialisation; with
    `held_at` (one weight per source, summing to 1) its coefficients stay there."""
    held = {}
    if held_at is not None:  # the constraint cannot matter: the coefficients never move
        if len(held_at) != len(sources) or abs(sum(held_at) - 1.0) > 1e-6:
            raise InputError(f"merge weights {list(held_at)}: expected one per source, sum 1")
        held = {"init": list(held_at[:-1]), "learn_coefficients": False}
    return MergedModel(
        model,
        sources,
        names,
        granularity=settings.granularity,
        freeze_bn=settings.freeze_bn,
        constraint=settings.constraint if held_at is None else "none",
        **held,
    )


def seeded_probe(
    arch: str,
    num_classes: int,
    in_channels: int,
    sources: Sequence[StateDict],
    names: Sequence[str],
    settings: ProbeSettings,
    seed: int,
) -> MergedModel:
    """The probe as every party of a merge builds it: the target model with its head drawn
    after `torch.manual_seed(seed)`, as the coordinator's. A federated probe's server and sites
    therefore agree on its start without sending it."""
    torch.manual_seed(seed)
    return probe_model(build_model(arch, num_classes, in_channels), sources, names, settings)


def train_probe(
    merged: MergedModel,
    train: Batches,
    val: Batches,
    settings: ProbeSettings,
    lr: float,
    weight_decay: float,
    runtime: Runtime,
    *,
    multilabel: bool = False,
    options: FitOptions = PROBE_OPTIONS,
) -> tuple[MergedModel, FitResult | None]:
    """Train the probe for its budget (the best epoch on validation macro-F1): the one training
    step of the coordinator's probe and of every site's federated probe round.

    BN and head train at (lr, weight_decay): `lr` is the probe's BN/head rate (lp.lr in an
    experiment config, probe-lr in a run config). The coefficients train at `settings.coef_lr`
    without decay. Returns the probe on the runtime's device, and None for a zero budget.
    """
    if not settings.trains:  # an untrained merge is baked where the sources are
        return merged, None
    merged = runtime.model(merged)
    result = fit(
        merged,
        train,
        val,
        settings.stage(lr, weight_decay),
        runtime,
        multilabel=multilabel,
        param_groups=merged.parameter_groups(settings.coef_lr, lr, weight_decay),
        after_step=merged.project_,
        options=options,
    )
    return merged, result


def learn_merge(
    model: nn.Module,
    sources: Sequence[StateDict],
    names: Sequence[str],
    train: Batches,
    val: Batches,
    settings: ProbeSettings,
    lr: float,
    weight_decay: float,
    runtime: Runtime,
    *,
    multilabel: bool = False,
    report_dir: Path | None = None,
    held_at: Sequence[float] | None = None,
    options: FitOptions = PROBE_OPTIONS,
) -> LearnedMerge:
    """Build the probe around `model` (a new head), train it (`train_probe`, with `options`:
    checkpoint, metrics log, epoch hook, ...), write its report, bake it.
    Resumable through a checkpoint like any `fit` stage; `on_epoch_end` gets the probe (a
    `MergedModel`, whose current coefficients a tracker can read) after each epoch. With
    `held_at` the coefficients stay at those per-source weights and only BN and the head train.
    """
    merged, result = train_probe(
        probe_model(model, sources, names, settings, held_at),
        train,
        val,
        settings,
        lr,
        weight_decay,
        runtime,
        multilabel=multilabel,
        options=options,
    )
    coefficients = merged.coefficient_arrays()
    if report_dir is not None:
        write_merge_report(report_dir, coefficients, names)
    return LearnedMerge(runtime.model(merged.bake()), result, coefficients)


def write_merge_report(
    run_dir: Path, coefficients: Mapping[str, np.ndarray], source_names: Sequence[str]
) -> None:
    """coefficients.npz (every coefficient + per-layer means), coefficient_summary.json
    (per-kernel movement per layer, see coefficients.coefficient_summary) and coefficients.png."""
    from medmerge_core.report import plot_merge_coefficients

    summary = coefficient_summary(coefficients)
    arrays = {f"coef/{k}": np.asarray(v) for k, v in coefficients.items()}
    arrays["layers"] = np.array([row["layer"] for row in summary])
    arrays["sources"] = np.array(list(source_names))
    arrays["layer_mean"] = np.array([row["mean"] for row in summary], dtype=np.float32)
    arrays["layer_std"] = np.array([row["std"] for row in summary], dtype=np.float32)
    atomic_savez(run_dir / "coefficients.npz", arrays)
    atomic_write_json(
        run_dir / "coefficient_summary.json", {"sources": list(source_names), "layers": summary}
    )
    try:
        plot_merge_coefficients(coefficients, source_names, run_dir / "coefficients.png")
    except RuntimeError as exc:  # matplotlib (the `plots` extra) is not installed
        log.warning("no coefficients.png: %s", exc)
