"""Every pipeline declared once: a `Pipeline` record in `REGISTRY`.

A record says what the config check, the runner, the report and the study drivers need to know
of a method: its id, its label in tables and figures, whether it runs once per source (`ft:a`,
`ft:b`) or once over all of them, the sources it needs at least, and its function. Adding a
method is one `register` call with its function.

A pipeline's function composes the steps a run offers (`Steps`: the target's model with a
source's backbone, a linear probe, the learnt or uniform merge, fine-tuning; the runner's
`RunContext` takes them) and returns its final model with each stage's summary. It imports no
training code itself, so the config check and the report read the registry without loading the
runner.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from torch import nn

from medmerge_core.errors import InputError


class Steps(Protocol):
    """What a pipeline may ask of its run for one method (`runner.RunContext`)."""

    source_names: Sequence[str]

    def source_model(self, source: str) -> nn.Module:
        """The target's model, its backbone from `source`, on the run's device."""
        ...

    def linear_probe(self, model: nn.Module, method: str) -> dict[str, Any]:
        """Train `model`'s head on features cached once from its frozen backbone."""
        ...

    def uniform_merge(self) -> nn.Module:
        """Every source averaged (1/d each) into a plain model, nothing trained."""
        ...

    def probe_merge(
        self, method: str, held_at: Sequence[float] | None = None, stage: str = "probe"
    ) -> tuple[nn.Module, dict[str, Any] | None]:
        """The probe of the config's `merge:` block, baked into a plain model, and its summary
        (None for a zero budget): per-kernel coefficients learnt, or with `held_at` held at
        those per-source weights while BN and the head train with the same budget."""
        ...

    def evaluate(self, model: nn.Module) -> dict[str, Any]:
        """{"val": metrics, "test": metrics} of `model` as it is (before fine-tuning)."""
        ...

    def finetune(self, model: nn.Module, method: str) -> dict[str, Any]:
        """Fine-tune the whole model (with InMerge when configured)."""
        ...


class Finished(Protocol):
    """What a derived pipeline reads of a run's finished methods (`run_folder.ExperimentRun`)."""

    def probabilities(self, method: str) -> tuple[np.ndarray, np.ndarray]:
        """The test probabilities and labels a finished method saved."""
        ...


PipelineFunction = Callable[[Steps, str, str], tuple[nn.Module, dict[str, Any]]]
# (finished methods' results, their run folder, the sources, a scorer of probabilities) ->
# the derived method's results entry, or None while what it reads is not there.
Scorer = Callable[[np.ndarray, np.ndarray], dict[str, float]]
DeriveFunction = Callable[[Mapping[str, Any], Finished, Sequence[str], Scorer], "dict | None"]


@dataclass(frozen=True)
class Pipeline:
    """One method of the single-site experiment; `run(steps, method id, source)` returns the
    final model and {stage: summary} (the source is "" for a pipeline over all sources).

    A derived pipeline trains nothing: `derive` reads the finished methods of its run (a
    choice among them on validation, or an ensemble of their outputs). Controls are not in
    the default `pipelines:` (`default=False`), so a plain config runs what it always ran.
    """

    id: str
    label: str  # in tables and figures: "LP-FT a"
    per_source: bool  # one method per source ("lp_ft:a"), or one over all sources ("medmerge")
    min_sources: int
    run: PipelineFunction | None = None
    default: bool = True
    derive: DeriveFunction | None = None
    needs: tuple[str, ...] = ()  # pipelines a derived one reads

    def methods(self, sources: Sequence[str]) -> list[tuple[str, str]]:
        """(method id, source) of each method this pipeline runs for `sources`."""
        if self.per_source:
            return [(f"{self.id}:{s}", s) for s in sources]
        return [(self.id, "")]


REGISTRY: dict[str, Pipeline] = {}


def register(pipeline: Pipeline) -> Pipeline:
    """Add a pipeline to the registry (its id must be new and may not hold ':'; it trains
    with `run` or reads other methods with `derive`, not both)."""
    if pipeline.id in REGISTRY or ":" in pipeline.id or not pipeline.id:
        raise ValueError(f"pipeline id '{pipeline.id}': empty, taken, or holds ':'")
    if (pipeline.run is None) == (pipeline.derive is None):
        raise ValueError(f"pipeline '{pipeline.id}': give exactly one of run and derive")
    REGISTRY[pipeline.id] = pipeline
    return pipeline


def pipeline_ids() -> tuple[str, ...]:
    """Every registered pipeline, in run order."""
    return tuple(REGISTRY)


def default_pipelines() -> tuple[str, ...]:
    """The default of `pipelines:`: every registered pipeline but the study's controls."""
    return tuple(p.id for p in REGISTRY.values() if p.default)


def check_pipelines(pipelines: Sequence[str], sources: Mapping[str, Any]) -> None:
    """The config check: every pipeline is registered, and each one over several sources has
    them (a config without any source is refused by the config itself)."""
    for pipeline in pipelines:
        if pipeline not in REGISTRY:
            raise InputError(f"pipelines: unknown '{pipeline}'; expected one of {pipeline_ids()}")
    for pipeline in pipelines:
        if missing := [n for n in REGISTRY[pipeline].needs if n not in pipelines]:
            raise InputError(f"pipelines: '{pipeline}' reads {missing}; list them too")
    short = {p for p in pipelines if REGISTRY[p].min_sources > max(len(sources), 1)}
    if short:
        need = max(REGISTRY[p].min_sources for p in short)
        named = sorted(p for p in short if REGISTRY[p].min_sources == need)
        raise InputError(f"sources: {named} need at least {need} sources")


def planned_methods(pipelines: Sequence[str], sources: Sequence[str]) -> list[tuple[str, str, str]]:
    """(method id, pipeline, source) in run order: the pipelines as `pipelines` lists them (by
    default the per-source baselines, then the merges), one per source where per source;
    derived pipelines last, after what they read."""
    plan = []
    for pipeline in sorted(pipelines, key=lambda p: REGISTRY[p].derive is not None):
        plan += [(m, pipeline, s) for m, s in REGISTRY[pipeline].methods(sources)]
    return plan


# -- the pipelines ------------------------------------------------------------------------

INTERPOLATION_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)  # of the first source (WiSE-FT-style)


def _ft(steps: Steps, method: str, source: str) -> tuple[nn.Module, dict[str, Any]]:
    model = steps.source_model(source)
    return model, {"ft": steps.finetune(model, method)}


def _lp_ft(steps: Steps, method: str, source: str) -> tuple[nn.Module, dict[str, Any]]:
    model = steps.source_model(source)
    lp = steps.linear_probe(model, method)
    before = steps.evaluate(model)
    return model, {"lp": lp, "before_ft": before, "ft": steps.finetune(model, method)}


def _average_ft(steps: Steps, method: str, _: str) -> tuple[nn.Module, dict[str, Any]]:
    model = steps.uniform_merge()
    return model, {"ft": steps.finetune(model, method)}


def _probed(
    steps: Steps, method: str, held_at: Sequence[float] | None
) -> tuple[nn.Module, dict[str, Any]]:
    model, probe = steps.probe_merge(method, held_at)
    stages = {} if probe is None else {"probe": probe, "before_ft": steps.evaluate(model)}
    return model, {**stages, "ft": steps.finetune(model, method)}


def _medmerge(steps: Steps, method: str, _: str) -> tuple[nn.Module, dict[str, Any]]:
    return _probed(steps, method, None)


def _average_probe(steps: Steps, method: str, _: str) -> tuple[nn.Module, dict[str, Any]]:
    """MedMerge with its coefficients held at 1/d: the same probe of BN and head, the same
    budget, the same fine-tuning; the contrast isolates what learning the coefficients adds."""
    d = len(steps.source_names)
    return _probed(steps, method, [1.0 / d] * d)


def interpolation(w: float, d: int) -> list[float]:
    """w for the first source, the rest shared equally by the others."""
    return [w, *[(1.0 - w) / (d - 1)] * (d - 1)]


def _interpolate(steps: Steps, method: str, _: str) -> tuple[nn.Module, dict[str, Any]]:
    """A fixed weight per model (`INTERPOLATION_WEIGHTS`), BN and head probed at each, the one
    with the best validation macro-F1 kept and fine-tuned (ties: the earlier weight)."""
    d = len(steps.source_names)
    best: tuple[nn.Module, dict[str, Any]] | None = None
    scores = {}
    for w in INTERPOLATION_WEIGHTS:
        model, probe = steps.probe_merge(method, interpolation(w, d), stage=f"probe-w{w:g}")
        if probe is None:
            raise InputError("merge: interpolate chooses its weight after a probe; give it steps")
        scores[f"{w:g}"] = probe["val"]["macro_f1"]
        if best is None or scores[f"{w:g}"] > best[1]["val"]["macro_f1"]:
            best = model, {**probe, "weight": w}
        del model
    assert best is not None
    model, probe = best
    probe = {**probe, "val_by_weight": scores,
             "steps": probe["steps"] * len(INTERPOLATION_WEIGHTS)}  # fmt: skip
    before = steps.evaluate(model)
    return model, {"probe": probe, "before_ft": before, "ft": steps.finetune(model, method)}


def _best_single(
    results: Mapping[str, Any], _: Finished, sources: Sequence[str], __: Scorer
) -> dict[str, Any] | None:
    """The source whose FT scored best on validation (ties: the first), as the hospital
    that had to pick one model would."""
    candidates = [f"ft:{s}" for s in sources]
    if any(m not in results for m in candidates):
        return None
    chosen = max(candidates, key=lambda m: results[m]["stages"]["ft"]["val"]["macro_f1"])
    return {"test": results[chosen]["test"], "chosen": chosen,
            "stages": {"ft": results[chosen]["stages"]["ft"]}}  # fmt: skip


def _ensemble(
    results: Mapping[str, Any], run: Finished, sources: Sequence[str], score: Scorer
) -> dict[str, Any] | None:
    """The mean of the fine-tuned sources' test probabilities: a reference, not a competitor
    (it costs d models at inference)."""
    members = [f"ft:{s}" for s in sources]
    if any(m not in results for m in members):
        return None
    read = [run.probabilities(m) for m in members]
    mean = np.mean([probs for probs, _ in read], axis=0)
    return {"test": score(mean, read[0][1]), "members": members, "stages": {}}


register(Pipeline("ft", "FT", per_source=True, min_sources=1, run=_ft))
register(Pipeline("lp_ft", "LP-FT", per_source=True, min_sources=1, run=_lp_ft))
register(Pipeline("average_ft", "Avg+FT", per_source=False, min_sources=2, run=_average_ft))
register(Pipeline("medmerge", "MedMerge", per_source=False, min_sources=2, run=_medmerge))
register(Pipeline("average_probe", "Avg-probe+FT", per_source=False, min_sources=2,
                  run=_average_probe, default=False))  # fmt: skip
register(Pipeline("interpolate", "Interp+FT", per_source=False, min_sources=2,
                  run=_interpolate, default=False))  # fmt: skip
register(Pipeline("best_single", "Best single FT", per_source=False, min_sources=2,
                  derive=_best_single, needs=("ft",), default=False))  # fmt: skip
register(Pipeline("ensemble", "FT ensemble", per_source=False, min_sources=2,
                  derive=_ensemble, needs=("ft",), default=False))  # fmt: skip
