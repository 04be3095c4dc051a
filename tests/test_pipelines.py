"""The pipeline registry: a method is declared once, and the config check, the runner, the report
and the study drivers all read that one declaration."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medmerge_core.errors import InputError
from medmerge_core.experiment import pipelines
from medmerge_core.experiment.config import config_from_dict
from medmerge_core.experiment.pipelines import REGISTRY, Pipeline, planned_methods, register
from medmerge_core.experiment.run_folder import ExperimentRun
from medmerge_core.experiment.runner import run_experiment
from medmerge_core.report import method_label
from simulations import reproduce, study
from tests.test_experiment import make_config


def _as_is(steps: pipelines.Steps, method: str, source: str):
    """A control that trains nothing: the target's model with the source's backbone."""
    return steps.source_model(source), {}


@pytest.fixture
def as_is():
    """One more pipeline, registered through the registry's API only (and removed after)."""
    record = register(Pipeline("as_is", "As is", per_source=True, min_sources=1, run=_as_is))
    yield record
    del REGISTRY[record.id]


def test_the_four_pipelines_are_declared_once() -> None:
    assert pipelines.pipeline_ids() == ("ft", "lp_ft", "average_ft", "medmerge")
    assert [(p.label, p.per_source, p.min_sources) for p in REGISTRY.values()] == [
        ("FT", True, 1),
        ("LP-FT", True, 1),
        ("Avg+FT", False, 2),
        ("MedMerge", False, 2),
    ]
    assert planned_methods(["medmerge", "ft"], ["a", "b"]) == [
        ("medmerge", "medmerge", ""),
        ("ft:a", "ft", "a"),
        ("ft:b", "ft", "b"),
    ]
    assert method_label("lp_ft:a") == "LP-FT a" and method_label("other:x") == "other x"


def test_an_id_is_registered_once_and_holds_no_colon() -> None:
    for taken in ("ft", "x:y", ""):
        with pytest.raises(ValueError, match="pipeline id"):
            register(Pipeline(taken, "X", per_source=True, min_sources=1, run=_as_is))
    assert pipelines.pipeline_ids() == ("ft", "lp_ft", "average_ft", "medmerge")


def test_one_registry_entry_reaches_config_report_runner_and_study(
    as_is, tiny_task, tmp_path
) -> None:
    # the config check: a known pipeline, part of the default, its minimum sources checked
    data = {"format": "synthetic", "task": "target"}
    default = config_from_dict({"name": "t", "data": data, "sources": {"a": "zeros", "b": "zeros"}})
    assert default.pipelines == ["ft", "lp_ft", "average_ft", "medmerge", "as_is"]
    many = register(Pipeline("needs_3", "N3", per_source=False, min_sources=3, run=_as_is))
    try:
        with pytest.raises(InputError, match=r"^sources: \['needs_3'\] need at least 3 sources"):
            make_config(tmp_path, pipelines=["ft", "needs_3"])
    finally:
        del REGISTRY[many.id]
    # the report
    assert method_label("as_is:a") == "As is a"
    # the runner: planned per source, run, and left in the run folder like every method
    config = make_config(tmp_path, pipelines=["as_is"])
    results = run_experiment(config, task=tiny_task, show_progress=False)
    assert list(results) == ["as_is:a", "as_is:b"] and results["as_is:a"]["stages"] == {}
    run = ExperimentRun.of(config)
    assert run.models() == ["as_is:a", "as_is:b"]
    saved = torch.load(run.checkpoint_path("as_is:a"), weights_only=True)
    assert saved["method"] == "as_is:a" and saved["class_names"] == ["low", "high"]
    # the study drivers
    assert "as_is" in study.runnable(("C",)) and "as_is" not in study.runnable(
        ("A", "B"), merges_only=True
    )
    assert study.StudySettings(data_root=Path("d")).pipelines[-1] == "as_is"
    chosen = reproduce.parse_args(["--data-root", "d", "--pipelines", "as_is"])
    assert chosen.pipelines == ("as_is",)
