"""A MedMNIST study of the MedMerge protocol: what runs (`plan`), with which settings
(`StudySettings`), from which sources (loaded, or pretrained once and cached), resumably.

`simulations.reproduce` is its command line and `simulations.reproduce_report` its report.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from medmerge_core.cifar_resnet import CIFAR10_PREFIX
from medmerge_core.data.base import TaskData
from medmerge_core.data.splits import check_label_budget
from medmerge_core.data.synthetic import make_task
from medmerge_core.errors import InputError
from medmerge_core.experiment.config import ExperimentConfig, ModelConfig
from medmerge_core.experiment.pipelines import (
    REGISTRY,
    default_pipelines,
    pipeline_ids,
    planned_methods,
)
from medmerge_core.experiment.run_folder import ExperimentRun
from medmerge_core.experiment.runner import run_experiment
from medmerge_core.io import atomic_write_json
from medmerge_core.models import load_source
from medmerge_core.pretrain import pretrain_source
from medmerge_core.settings import (
    ProbeSettings,
    StageSettings,
)
from medmerge_core.train import FitOptions, Runtime
from simulations.common import (
    load_medmnist_file,
    subsample_train,
)

PAPER_LP_LR, PAPER_FT_LR, PAPER_EPOCHS = 1e-4, 1e-5, 50


DEFAULT_SOURCES = (
    ("A", "pretrain:synthetic:generic"),
    ("B", "pretrain:pneumoniamnist@A"),
    ("C", "pretrain:synthetic:related_a@A"),
)


PRETRAIN = "pretrain:"


SYNTHETIC = "synthetic:"


STUDIES = ("main", "ablations", "three")


@dataclass(frozen=True)
class RunSpec:
    """One kind of run: which sources are merged, which pipelines, which merge options."""

    group: str
    label: str
    sources: tuple[str, ...]
    pipelines: tuple[str, ...]
    granularity: str = "kernel"
    freeze_bn: bool = False
    ablation: bool = False


def runnable(sources: Sequence[str], *, merges_only: bool = False) -> tuple[str, ...]:
    """The default pipelines that `sources` are enough for (only those over all sources
    with `merges_only`), in run order."""
    return tuple(
        p.id
        for p in REGISTRY.values()
        if p.default and p.min_sources <= len(sources) and not (merges_only and p.per_source)
    )


def plan(studies: Sequence[str]) -> list[RunSpec]:
    """Runs in priority order: the main comparison (every pipeline), then the paper's
    ablations, then 3 sources (the merges; C alone: the per-source baselines)."""
    specs = []
    if "main" in studies:
        specs.append(RunSpec("main", "A + B", ("A", "B"), runnable(("A", "B"))))
    if "ablations" in studies:
        specs += [
            RunSpec(
                "bn_frozen",
                "BN frozen in probe",
                ("A", "B"),
                ("medmerge",),
                freeze_bn=True,
                ablation=True,
            ),
            RunSpec(
                "layer", "layer granularity", ("A", "B"), ("medmerge",), "layer", ablation=True
            ),
            RunSpec(
                "parameter",
                "parameter granularity",
                ("A", "B"),
                ("medmerge",),
                "parameter",
                ablation=True,
            ),
            RunSpec("zeros_a", "A + zeros", ("A", "zeros"), ("medmerge",), ablation=True),
            RunSpec("zeros_b", "B + zeros", ("B", "zeros"), ("medmerge",), ablation=True),
        ]
    if "three" in studies:
        specs += [
            RunSpec("source_c", "C alone", ("C",), runnable(("C",)), ablation=True),
            RunSpec(
                "three",
                "A + B + C",
                ("A", "B", "C"),
                runnable(("A", "B", "C"), merges_only=True),
                ablation=True,
            ),
        ]
    return specs


@dataclass(frozen=True)
class StudySettings:
    """Everything a study depends on; the defaults are the paper's protocol where we can."""

    data_root: Path
    out: Path = Path("runs/reproduce")
    results: Path = Path("RESULTS.md")
    figures: Path = Path("results")
    arch: str = "resnet18"
    image_size: int = 28
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    ablation_seeds: tuple[int, ...] | None = None  # None: the main seeds
    studies: tuple[str, ...] = STUDIES
    # run only these (default: every registered one); finished others are still reported
    pipelines: tuple[str, ...] = field(default_factory=default_pipelines)
    target: str = "breastmnist"
    sources: tuple[tuple[str, str], ...] = DEFAULT_SOURCES  # (name, spec) for A, B, C
    label_budget: float | int | None = None  # of the target's training labels, per seed
    # LP in LP-FT (the probe's BN and head train at its lr), the probe, FT: the paper's protocol.
    lp: StageSettings = field(default_factory=lambda: StageSettings(PAPER_EPOCHS, PAPER_LP_LR))
    merge: ProbeSettings = field(default_factory=ProbeSettings)
    ft: StageSettings = field(default_factory=lambda: StageSettings(PAPER_EPOCHS, PAPER_FT_LR))
    batch_size: int = 32
    source: StageSettings = field(default_factory=lambda: StageSettings(5, 1e-3))  # pretraining
    source_train: int | None = None  # cap on Source B's (PneumoniaMNIST) training images
    synthetic_train: int = 2000  # Sources A and C
    synthetic_val: int = 200
    threads: int = 1
    report_only: bool = False
    progress: bool = True
    argv: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        names = [name for name, _ in self.sources]
        if sorted(names) != ["A", "B", "C"]:
            raise InputError(f"--source: give each of A, B, C once (got {', '.join(names)})")
        for name, spec in self.sources:
            init = pretrain_recipe(spec)[1] if spec.startswith(PRETRAIN) else None
            if init is not None and (init == name or init not in names):
                raise InputError(f"--source {name}={spec}: @{init} must name another source")
        if self.label_budget is not None:
            check_label_budget(self.label_budget, "--label-budget")
        if unknown := set(self.pipelines) - set(pipeline_ids()):
            raise InputError(
                f"--pipelines: unknown {sorted(unknown)}; expected some of {pipeline_ids()}"
            )

    @property
    def tag(self) -> str:
        budget = "" if self.label_budget is None else f"-labels{self.label_budget:g}"
        return f"{self.target}-{self.arch}-{self.image_size}{budget}"

    def source_spec(self, name: str) -> str:
        return dict(self.sources)[name]

    @property
    def run_root(self) -> Path:
        return self.out / self.tag

    def seeds_for(self, spec: RunSpec) -> tuple[int, ...]:
        if spec.ablation and self.ablation_seeds is not None:
            return self.ablation_seeds
        return self.seeds


def pretrain_recipe(spec: str) -> tuple[str, str | None]:
    """`pretrain:DATASET[@INIT]` -> (DATASET, INIT or None)."""
    dataset, _, init = spec.removeprefix(PRETRAIN).partition("@")
    if not dataset:
        raise InputError(f"--source {spec}: name a dataset after 'pretrain:'")
    return dataset, init or None


def describe_source(spec: str) -> str:
    """A source spec in words, for the console and RESULTS.md."""
    if spec == "zeros":
        return "all conv weights zero (paper Fig. 4)"
    if spec.startswith(CIFAR10_PREFIX):
        return f"CIFAR-10-trained `{spec}` weights (../shared/weights/cifar10_resnet, MANIFEST.md)"
    if not spec.startswith(PRETRAIN):
        return f"weights from `{spec}`"
    dataset, init = pretrain_recipe(spec)
    what = (
        f"synthetic `{dataset.removeprefix(SYNTHETIC)}` task"
        if dataset.startswith(SYNTHETIC)
        else dataset
    )
    return f"pretrained on {what}, from {'source ' + init if init else 'random init'}"


def source_order(s: StudySettings, needed: set[str]) -> list[str]:
    """The needed sources and the sources they start from, each after its init."""
    order: list[str] = []

    def visit(name: str) -> None:
        spec = s.source_spec(name)
        init = pretrain_recipe(spec)[1] if spec.startswith(PRETRAIN) else None
        if init is not None:
            visit(init)
        if name not in order:
            order.append(name)

    for name in sorted(needed):
        visit(name)
    return order


def pretrain_task(s: StudySettings, dataset: str) -> TaskData:
    if dataset.startswith(SYNTHETIC):
        sizes = {"n_train": s.synthetic_train, "n_val": s.synthetic_val, "n_test": s.synthetic_val}
        return make_task(dataset.removeprefix(SYNTHETIC), image_size=s.image_size, seed=0, **sizes)
    task = load_medmnist_file(s.data_root, dataset).resized(s.image_size)
    return subsample_train(task, s.source_train)


def prepare_sources(s: StudySettings, console: Console) -> dict[str, dict[str, Any]]:
    """Load or pretrain (once, cached) the sources the studies use; their specs and metrics."""
    runtime = Runtime.detect("auto")
    source_dir = s.run_root / "sources"
    needed = {name for spec in plan(s.studies) for name in spec.sources} - {"zeros"}
    info: dict[str, dict[str, Any]] = {}
    for index, name in enumerate(source_order(s, needed)):
        spec = s.source_spec(name)
        text = describe_source(spec)
        if not spec.startswith(PRETRAIN):
            info[name] = {"spec": spec, "text": text}
            continue
        path = source_dir / f"{name}.pt"
        record = path.with_suffix(".json")  # what the report needs, kept beside the weights
        if s.report_only and record.exists():  # no need to load and evaluate the weights again
            info[name] = json.loads(record.read_text(encoding="utf-8"))
            continue
        if s.report_only and not path.exists():
            continue
        dataset, init_name = pretrain_recipe(spec)
        task = pretrain_task(s, dataset)
        console.print(f"[bold]source {name}[/]: {text} ({len(task.train)} train)")
        init = None
        if init_name is not None:
            init = load_source(info[init_name]["spec"], s.arch, task.in_channels)
        metrics = pretrain_source(
            s.arch,
            task,
            path,
            s.source,
            runtime,
            init=init,
            batch_size=s.batch_size,
            seed=index,
            init_spec=None if init_name is None else s.source_spec(init_name),
            data_spec={"dataset": dataset, "train": len(task.train)},
            options=FitOptions(show_progress=s.progress),
        )
        info[name] = {
            "spec": str(path.resolve()),
            "text": text,
            "task": task.name,
            "train": len(task.train),
            "test_accuracy": metrics["accuracy"],
            "test_macro_f1": metrics["macro_f1"],
            "chance": 1.0 / task.num_classes,
        }
        atomic_write_json(record, info[name])
    info["zeros"] = {"spec": "zeros", "text": describe_source("zeros")}
    return info


def make_config(
    s: StudySettings, spec: RunSpec, seed: int, sources: Mapping[str, Any]
) -> ExperimentConfig:
    return ExperimentConfig(
        name=f"{spec.group}-seed{seed}",
        output_dir=str(s.run_root),
        data={
            "format": "medmnist",
            "path": str((s.data_root / f"{s.target}.npz").resolve()),
            **({} if s.label_budget is None else {"label_budget": s.label_budget}),
        },
        sources={name: sources[name]["spec"] for name in spec.sources},
        model=ModelConfig(arch=s.arch, image_size=s.image_size),
        pipelines=list(spec.pipelines),
        seed=seed,
        batch_size=s.batch_size,
        device="auto",
        lp=s.lp,
        ft=s.ft,
        merge=dataclasses.replace(s.merge, granularity=spec.granularity, freeze_bn=spec.freeze_bn),
    )


def run_all(s: StudySettings, console: Console) -> dict[str, dict[int, dict[str, Any]]]:
    """Run (or, with report_only, just collect) every planned (study, seed); resumable."""
    sources = prepare_sources(s, console)
    collected: dict[str, dict[int, dict[str, Any]]] = {}
    for spec in plan(s.studies):
        for seed in s.seeds_for(spec):
            run = ExperimentRun(s.run_root / f"{spec.group}-seed{seed}")
            pipelines = tuple(p for p in spec.pipelines if p in s.pipelines)
            if s.report_only or not pipelines or any(n not in sources for n in spec.sources):
                results = run.results()
            else:
                console.print(f"[bold]{spec.group}[/] seed {seed}: {spec.label}")
                config = make_config(
                    s, dataclasses.replace(spec, pipelines=pipelines), seed, sources
                )
                results = run_experiment(config, show_progress=s.progress)
            if results:  # results.json is key-sorted: restore the plan's method order
                order = [
                    m for m, _, _ in planned_methods(spec.pipelines, spec.sources) if m in results
                ]
                collected.setdefault(spec.group, {})[seed] = {m: results[m] for m in order}
    collected["_sources"] = {0: sources}
    return collected
