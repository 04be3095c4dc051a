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

from torch import nn

from medmerge_core.errors import InputError


class Steps(Protocol):
    """What a pipeline may ask of its run for one method (`runner.RunContext`)."""

    def source_model(self, source: str) -> nn.Module:
        """The target's model, its backbone from `source`, on the run's device."""
        ...

    def linear_probe(self, model: nn.Module, method: str) -> dict[str, Any]:
        """Train `model`'s head on features cached once from its frozen backbone."""
        ...

    def learn_merge(self, method: str, *, trained: bool) -> tuple[nn.Module, dict[str, Any] | None]:
        """Every source merged into a plain model: learnt per the config's `merge:` block, or
        the untrained 1/d average; and the probe stage's summary (None when untrained)."""
        ...

    def finetune(self, model: nn.Module, method: str) -> dict[str, Any]:
        """Fine-tune the whole model (with InMerge when configured)."""
        ...


PipelineFunction = Callable[[Steps, str, str], tuple[nn.Module, dict[str, Any]]]


@dataclass(frozen=True)
class Pipeline:
    """One method of the single-site experiment; `run(steps, method id, source)` returns the
    final model and {stage: summary} (the source is "" for a pipeline over all sources)."""

    id: str
    label: str  # in tables and figures: "LP-FT a"
    per_source: bool  # one method per source ("lp_ft:a"), or one over all sources ("medmerge")
    min_sources: int
    run: PipelineFunction

    def methods(self, sources: Sequence[str]) -> list[tuple[str, str]]:
        """(method id, source) of each method this pipeline runs for `sources`."""
        if self.per_source:
            return [(f"{self.id}:{s}", s) for s in sources]
        return [(self.id, "")]


REGISTRY: dict[str, Pipeline] = {}


def register(pipeline: Pipeline) -> Pipeline:
    """Add a pipeline to the registry (its id must be new and may not hold ':')."""
    if pipeline.id in REGISTRY or ":" in pipeline.id or not pipeline.id:
        raise ValueError(f"pipeline id '{pipeline.id}': empty, taken, or holds ':'")
    REGISTRY[pipeline.id] = pipeline
    return pipeline


def pipeline_ids() -> tuple[str, ...]:
    """Every registered pipeline, in run order (the default of `pipelines:`)."""
    return tuple(REGISTRY)


def check_pipelines(pipelines: Sequence[str], sources: Mapping[str, Any]) -> None:
    """The config check: every pipeline is registered, and each one over several sources has
    them (a config without any source is refused by the config itself)."""
    for pipeline in pipelines:
        if pipeline not in REGISTRY:
            raise InputError(f"pipelines: unknown '{pipeline}'; expected one of {pipeline_ids()}")
    short = {p for p in pipelines if REGISTRY[p].min_sources > max(len(sources), 1)}
    if short:
        need = max(REGISTRY[p].min_sources for p in short)
        named = sorted(p for p in short if REGISTRY[p].min_sources == need)
        raise InputError(f"sources: {named} need at least {need} sources")


def planned_methods(pipelines: Sequence[str], sources: Sequence[str]) -> list[tuple[str, str, str]]:
    """(method id, pipeline, source) in run order: the pipelines as `pipelines` lists them (by
    default the per-source baselines, then the merges), one per source where per source."""
    plan = []
    for pipeline in pipelines:
        plan += [(m, pipeline, s) for m, s in REGISTRY[pipeline].methods(sources)]
    return plan


# -- the pipelines ------------------------------------------------------------------------


def _ft(steps: Steps, method: str, source: str) -> tuple[nn.Module, dict[str, Any]]:
    model = steps.source_model(source)
    return model, {"ft": steps.finetune(model, method)}


def _lp_ft(steps: Steps, method: str, source: str) -> tuple[nn.Module, dict[str, Any]]:
    model = steps.source_model(source)
    lp = steps.linear_probe(model, method)
    return model, {"lp": lp, "ft": steps.finetune(model, method)}


def _average_ft(steps: Steps, method: str, _: str) -> tuple[nn.Module, dict[str, Any]]:
    model, _ = steps.learn_merge(method, trained=False)
    return model, {"ft": steps.finetune(model, method)}


def _medmerge(steps: Steps, method: str, _: str) -> tuple[nn.Module, dict[str, Any]]:
    model, probe = steps.learn_merge(method, trained=True)
    stages = {"probe": probe} if probe is not None else {}
    stages["ft"] = steps.finetune(model, method)
    return model, stages


register(Pipeline("ft", "FT", per_source=True, min_sources=1, run=_ft))
register(Pipeline("lp_ft", "LP-FT", per_source=True, min_sources=1, run=_lp_ft))
register(Pipeline("average_ft", "Avg+FT", per_source=False, min_sources=2, run=_average_ft))
register(Pipeline("medmerge", "MedMerge", per_source=False, min_sources=2, run=_medmerge))
