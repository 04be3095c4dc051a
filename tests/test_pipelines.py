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
from medmerge_core.models import build_model
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


DEFAULT = ("ft", "lp_ft", "average_ft", "medmerge")
CONTROLS = ("average_probe", "interpolate", "best_single", "ensemble")


def test_the_pipelines_are_declared_once_and_the_controls_are_opt_in() -> None:
    assert pipelines.pipeline_ids() == DEFAULT + CONTROLS
    assert pipelines.default_pipelines() == DEFAULT
    assert [(p.label, p.per_source, p.min_sources, p.default) for p in REGISTRY.values()] == [
        ("FT", True, 1, True),
        ("LP-FT", True, 1, True),
        ("Avg+FT", False, 2, True),
        ("MedMerge", False, 2, True),
        ("Avg-probe+FT", False, 2, False),
        ("Interp+FT", False, 2, False),
        ("Best single FT", False, 2, False),
        ("FT ensemble", False, 2, False),
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
    with pytest.raises(ValueError, match="exactly one of run and derive"):
        register(Pipeline("neither", "X", per_source=True, min_sources=1))
    assert pipelines.pipeline_ids() == DEFAULT + CONTROLS


def test_one_registry_entry_reaches_config_report_runner_and_study(
    as_is, tiny_task, tmp_path
) -> None:
    # the config check: a known pipeline, part of the default, its minimum sources checked
    data = {"format": "synthetic", "task": "target"}
    default = config_from_dict({"name": "t", "data": data, "sources": {"a": "zeros", "b": "zeros"}})
    assert default.pipelines == [*DEFAULT, "as_is"]
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


def test_a_held_probe_trains_bn_and_head_but_never_its_coefficients() -> None:
    from medmerge_core.probe import probe_model
    from medmerge_core.settings import ProbeSettings

    sources = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        state = build_model("resnet18", 2, 1).state_dict()
        sources.append({k: v for k, v in state.items() if not k.startswith("fc.")})
    torch.manual_seed(0)
    merged = probe_model(build_model("resnet18", 2, 1), sources, ["a", "b"], ProbeSettings(),
                         held_at=[0.25, 0.75])  # fmt: skip
    groups = merged.parameter_groups(coef_lr=1.0, lr=1e-2, weight_decay=0.0)
    assert len(groups) == 1  # no coefficient group: nothing of the merge can move
    optimizer = torch.optim.AdamW(groups, lr=1e-2)
    before = {k: v.clone() for k, v in merged.coefficient_map().items()}
    bn_before = merged.model.bn1.weight.detach().clone()
    x, y = torch.randn(16, 1, 32, 32), torch.randint(0, 2, (16,))
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(merged(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = merged.coefficient_map()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.allclose(after["conv1.weight"], torch.tensor(0.25))
    assert not torch.equal(bn_before, merged.model.bn1.weight)
    baked = merged.bake().state_dict()
    expected = 0.25 * sources[0]["conv1.weight"] + 0.75 * sources[1]["conv1.weight"]
    assert torch.allclose(baked["conv1.weight"], expected, atol=1e-6)
    with pytest.raises(InputError, match="one per source, sum 1"):
        probe_model(build_model("resnet18", 2, 1), sources, ["a", "b"], ProbeSettings(),
                    held_at=[0.5, 0.6])  # fmt: skip


def test_the_controls_run_choose_on_validation_and_report_before_ft(tiny_task, tmp_path) -> None:
    config = make_config(tmp_path, pipelines=["ft", *CONTROLS], ft_lr_choices=[1e-4, 1e-3])
    results = run_experiment(config, task=tiny_task, show_progress=False)
    assert list(results)[-2:] == ["best_single", "ensemble"]  # derived ones after their inputs
    # FT's rate is the one whose best epoch scored best on validation
    for method in ("ft:a", "ft:b", "average_probe", "interpolate"):
        ft = results[method]["stages"]["ft"]
        assert set(ft["val_by_lr"]) == {"0.0001", "0.001"}
        assert ft["val_by_lr"][f"{ft['lr']:g}"] == max(ft["val_by_lr"].values())
        assert ft["steps_all_rates"] == 2 * ft["steps"] > 0
    # the held probes: the same budget as MedMerge's, metrics before FT
    for method in ("average_probe", "interpolate"):
        stages = results[method]["stages"]
        assert set(stages["before_ft"]) == {"val", "test"}
        assert "macro_f1" in stages["before_ft"]["test"]
    interp = results["interpolate"]["stages"]["probe"]
    assert list(interp["val_by_weight"]) == ["0", "0.25", "0.5", "0.75", "1"]
    assert interp["val_by_weight"][f"{interp['weight']:g}"] == max(interp["val_by_weight"].values())
    assert interp["steps"] == 5 * results["average_probe"]["stages"]["probe"]["steps"]
    assert results["average_probe"]["stages"]["probe"]["steps"] == 3  # merge.steps
    # best single: the FT source with the best validation score, its test metrics as they were
    best = results["best_single"]
    val = {m: results[m]["stages"]["ft"]["val"]["macro_f1"] for m in ("ft:a", "ft:b")}
    assert best["chosen"] == max(val, key=val.get) and best["derived"] is True
    assert best["test"] == results[best["chosen"]]["test"]
    # the ensemble: the mean of the two fine-tuned models' test probabilities
    run = ExperimentRun.of(config)
    (pa, labels), (pb, _) = run.probabilities("ft:a"), run.probabilities("ft:b")
    mean = (pa + pb) / 2
    expected = float((mean.argmax(1) == labels).mean())
    assert results["ensemble"]["test"]["accuracy"] == pytest.approx(expected)
    assert run.models() == ["ft:a", "ft:b", "average_probe", "interpolate"]  # no model derived


def test_a_derived_pipeline_needs_what_it_reads(tmp_path) -> None:
    with pytest.raises(InputError, match=r"^pipelines: 'ensemble' reads \['ft'\]; list them too"):
        make_config(tmp_path, pipelines=["medmerge", "ensemble"])
    with pytest.raises(InputError, match=r"^ft_lr_choices: expected distinct rates > 0"):
        make_config(tmp_path, ft_lr_choices=[1e-4, 1e-4])
