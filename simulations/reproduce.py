"""The MedMerge protocol on real MedMNIST images: main comparison, ablations, 3 sources, figures.

    python -m simulations.reproduce --data-root ../shared/data/medmnist \
        --arch cifar_resnet56 --source A=cifar10:resnet56 --source B=pretrain:pneumoniamnist@A \
        --target breastmnist --seeds 0 1 2 3 4 5 6 7 8 9 --studies main --out runs/reproduce

Any MedMNIST .npz under --data-root is a target (gray or RGB, official splits); --label-budget
keeps a seeded, class-stratified fraction or count of its training labels per seed. Each source
A, B, C is `NAME=SPEC`: a spec `load_source` reads (a checkpoint path, `cifar10:resnet56`,
`torchvision:ENUM`, `random`), or `pretrain:DATASET[@INIT]`, pretraining on a MedMNIST flag or
`synthetic:KIND` from another source's weights (from random init without `@INIT`), as the paper's
HAM10K model started from ImageNet.

Sources are pretrained once per architecture and cached (a cached file made with other settings
is refused); every (study, seed) is one resumable run folder of `run_experiment`, so an
interrupted study continues where it stopped.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from medmerge_core.cifar_resnet import CIFAR10_PREFIX
from medmerge_core.config import ExperimentConfig, ModelConfig
from medmerge_core.data.base import TaskData
from medmerge_core.data.splits import check_label_budget
from medmerge_core.data.synthetic import make_task
from medmerge_core.errors import InputError
from medmerge_core.experiment import load_results, run_experiment
from medmerge_core.models import load_source
from medmerge_core.pretrain import pretrain_source
from medmerge_core.report import layer_means_from_npz, method_label, plot_coefficient_heatmap
from medmerge_core.settings import (
    DEFAULT_COEF_LR,
    DEFAULT_STEPS,
    ProbeSettings,
    StageSettings,
    add_arguments,
    from_arguments,
)
from medmerge_core.train import Runtime
from simulations.common import (
    command_line,
    load_medmnist_file,
    mean_std,
    median_range,
    relative,
    set_threads,
    subsample_train,
    update_section,
)
from simulations.stats import paired_comparison

PAPER_LP_LR, PAPER_FT_LR, PAPER_EPOCHS = 1e-4, 1e-5, 50
DEFAULT_SOURCES = (
    ("A", "pretrain:synthetic:generic"),
    ("B", "pretrain:pneumoniamnist@A"),
    ("C", "pretrain:synthetic:related_a@A"),
)
PRETRAIN = "pretrain:"
SYNTHETIC = "synthetic:"
STUDIES = ("main", "ablations", "three")
METRICS_NOTE = (
    "Test metrics: mean ± std (population) over seeds. Times in seconds: median (min-max) over "
    "seeds, because the runs shared a 2-core machine with other jobs at varying load."
)


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


def plan(studies: Sequence[str]) -> list[RunSpec]:
    """Runs in priority order: the main comparison, then the paper's ablations, then 3 sources."""
    specs = []
    if "main" in studies:
        pipelines = ("ft", "lp_ft", "average_ft", "medmerge")
        specs.append(RunSpec("main", "A + B", ("A", "B"), pipelines))
    if "ablations" in studies:
        specs += [
            RunSpec("bn_frozen", "BN frozen in probe", ("A", "B"), ("medmerge",), freeze_bn=True,
                    ablation=True),
            RunSpec("layer", "layer granularity", ("A", "B"), ("medmerge",), "layer",
                    ablation=True),
            RunSpec("parameter", "parameter granularity", ("A", "B"), ("medmerge",), "parameter",
                    ablation=True),
            RunSpec("zeros_a", "A + zeros", ("A", "zeros"), ("medmerge",), ablation=True),
            RunSpec("zeros_b", "B + zeros", ("B", "zeros"), ("medmerge",), ablation=True),
        ]  # fmt: skip
    if "three" in studies:
        specs += [
            RunSpec("source_c", "C alone", ("C",), ("ft", "lp_ft"), ablation=True),
            RunSpec("three", "A + B + C", ("A", "B", "C"), ("average_ft", "medmerge"),
                    ablation=True),
        ]  # fmt: skip
    return specs


@dataclass(frozen=True)
class Settings:
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
    target: str = "breastmnist"
    sources: tuple[tuple[str, str], ...] = DEFAULT_SOURCES  # (name, spec) for A, B, C
    label_budget: float | int | None = None  # of the target's training labels, per seed
    lp_epochs: int = PAPER_EPOCHS  # LP in LP-FT; the probe's BN and head share the LP lr
    probe_steps: int = DEFAULT_STEPS
    coef_lr: float = DEFAULT_COEF_LR
    lp_lr: float = PAPER_LP_LR
    ft_epochs: int = PAPER_EPOCHS
    ft_lr: float = PAPER_FT_LR
    batch_size: int = 32
    source_epochs: int = 5
    source_lr: float = 1e-3
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


def source_order(s: Settings, needed: set[str]) -> list[str]:
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


def pretrain_task(s: Settings, dataset: str) -> TaskData:
    if dataset.startswith(SYNTHETIC):
        sizes = {"n_train": s.synthetic_train, "n_val": s.synthetic_val,
                 "n_test": s.synthetic_val}  # fmt: skip
        return make_task(dataset.removeprefix(SYNTHETIC), image_size=s.image_size, seed=0, **sizes)
    task = load_medmnist_file(s.data_root, dataset).resized(s.image_size)
    return subsample_train(task, s.source_train)


def prepare_sources(s: Settings, console: Console) -> dict[str, dict[str, Any]]:
    """Load or pretrain (once, cached) the sources the studies use; their specs and metrics."""
    runtime = Runtime.detect("auto")
    source_dir = s.run_root / "sources"
    stage = StageSettings(s.source_epochs, s.source_lr)
    needed = {name for spec in plan(s.studies) for name in spec.sources} - {"zeros"}
    info: dict[str, dict[str, Any]] = {}
    for index, name in enumerate(source_order(s, needed)):
        spec = s.source_spec(name)
        text = describe_source(spec)
        if not spec.startswith(PRETRAIN):
            info[name] = {"spec": spec, "text": text}
            continue
        path = source_dir / f"{name}.pt"
        if s.report_only and not path.exists():
            continue
        dataset, init_name = pretrain_recipe(spec)
        task = pretrain_task(s, dataset)
        console.print(f"[bold]source {name}[/]: {text} ({len(task.train)} train)")
        init = None
        if init_name is not None:
            init = load_source(info[init_name]["spec"], s.arch, task.in_channels)
        start = time.perf_counter()
        metrics = pretrain_source(
            s.arch, task, path, stage, runtime, init=init, batch_size=s.batch_size,
            seed=index, show_progress=s.progress,
            init_spec=None if init_name is None else s.source_spec(init_name),
            data_spec={"dataset": dataset, "train": len(task.train)},
        )  # fmt: skip
        info[name] = {
            "spec": str(path.resolve()),
            "text": text,
            "task": task.name,
            "train": len(task.train),
            "test_accuracy": metrics["accuracy"],
            "test_macro_f1": metrics["macro_f1"],
            "chance": 1.0 / task.num_classes,
            "seconds": time.perf_counter() - start,
        }
    info["zeros"] = {"spec": "zeros", "text": describe_source("zeros")}
    return info


def make_config(
    s: Settings, spec: RunSpec, seed: int, sources: Mapping[str, Any]
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
        lp=StageSettings(epochs=s.lp_epochs, lr=s.lp_lr),
        ft=StageSettings(epochs=s.ft_epochs, lr=s.ft_lr),
        merge=ProbeSettings(
            granularity=spec.granularity,
            freeze_bn=spec.freeze_bn,
            coef_lr=s.coef_lr,
            steps=s.probe_steps,
        ),
    )


def method_ids(spec: RunSpec) -> list[str]:
    """Method ids in run order, as experiment.planned_methods names them."""
    ids = []
    for pipeline in spec.pipelines:
        per_source = pipeline in ("ft", "lp_ft")
        ids += [f"{pipeline}:{n}" for n in spec.sources] if per_source else [pipeline]
    return ids


def run_all(s: Settings, console: Console) -> dict[str, dict[int, dict[str, Any]]]:
    """Run (or, with report_only, just collect) every planned (study, seed); resumable."""
    sources = prepare_sources(s, console)
    collected: dict[str, dict[int, dict[str, Any]]] = {}
    for spec in plan(s.studies):
        for seed in s.seeds_for(spec):
            run_dir = s.run_root / f"{spec.group}-seed{seed}"
            if s.report_only or any(n not in sources for n in spec.sources):
                results = load_results(run_dir)
            else:
                console.print(f"[bold]{spec.group}[/] seed {seed}: {spec.label}")
                config = make_config(s, spec, seed, sources)
                results = run_experiment(config, show_progress=s.progress)
            if results:  # results.json is key-sorted: restore the plan's method order
                order = [m for m in method_ids(spec) if m in results]
                collected.setdefault(spec.group, {})[seed] = {m: results[m] for m in order}
    collected["_sources"] = {0: sources}
    return collected


# ----------------------------------------------------------------------------- reporting


def _metric(runs: Sequence[Mapping[str, Any]], method: str, key: str) -> list[float]:
    return [r[method]["test"][key] for r in runs if method in r]


def _stage_seconds(runs: Sequence[Mapping[str, Any]], method: str, stage: str) -> list[float]:
    return [r[method]["stages"][stage]["seconds"] for r in runs
            if method in r and stage in r[method]["stages"]]  # fmt: skip


def probe_cost(runs: Sequence[Mapping[str, Any]]) -> list[float]:
    """Per seed: MedMerge probe seconds / mean LP seconds of the LP-FT runs."""
    ratios = []
    for r in runs:
        lps = [v["stages"]["lp"]["seconds"] for k, v in r.items() if k.startswith("lp_ft:")]
        if "medmerge" in r and lps:
            ratios.append(r["medmerge"]["stages"]["probe"]["seconds"] / float(np.mean(lps)))
    return ratios


def method_rows(runs: Sequence[Mapping[str, Any]], prefix: str = "") -> list[list[str]]:
    """Markdown rows: method, n, accuracy, macro-F1, AUROC, wall, LP/probe, FT, probe val F1."""
    methods = list(dict.fromkeys(m for r in runs for m in r))
    rows = []
    for method in methods:
        first = "probe" if method == "medmerge" else "lp"
        probe_f1 = [r[method]["stages"]["probe"]["val"]["macro_f1"] for r in runs
                    if method in r and "probe" in r[method]["stages"]]  # fmt: skip
        rows.append([
            f"{prefix}{method_label(method)}",
            str(sum(method in r for r in runs)),
            mean_std(_metric(runs, method, "accuracy")),
            mean_std(_metric(runs, method, "macro_f1")),
            mean_std(_metric(runs, method, "auroc")),
            median_range([r[method]["seconds"] for r in runs if method in r]),
            median_range(_stage_seconds(runs, method, first)),
            median_range(_stage_seconds(runs, method, "ft")),
            mean_std(probe_f1) if probe_f1 else "",
        ])  # fmt: skip
    return rows


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _layer_means(run_dir: Path, index: int) -> np.ndarray | None:
    path = run_dir / "coefficients.npz"
    return layer_means_from_npz(path, index) if path.exists() else None


def make_figures(s: Settings, collected: Mapping[str, Any]) -> dict[str, Path]:
    """Fig. 2 / Fig. 4 style heatmaps of the mean learnt coefficient per conv layer."""
    figures: dict[str, Path] = {}

    def rows(group: str, index: int) -> list[np.ndarray]:
        found = [_layer_means(s.run_root / f"{group}-seed{seed}", index)
                 for seed in sorted(collected.get(group, {}))]  # fmt: skip
        return [m for m in found if m is not None]

    def plot(
        key: str, data: dict[str, np.ndarray], source: str, title: str, uniform: float = 0.5
    ) -> None:
        data = {k: v for k, v in data.items() if v is not None}
        if data:
            path = s.figures / f"{s.tag}_{key}.png"
            figures[key] = plot_coefficient_heatmap(
                data, source, path, title=title, uniform=uniform
            )

    def mean(arrays: list[np.ndarray]) -> np.ndarray | None:
        return np.mean(arrays, axis=0) if arrays else None

    main = rows("main", 1)
    fig2 = {f"seed {seed}": _layer_means(s.run_root / f"main-seed{seed}", 1)
            for seed in sorted(collected.get("main", {}))}  # fmt: skip
    if len(main) > 1:
        fig2[f"mean ({len(main)} seeds)"] = mean(main)
    plot("fig2_main", fig2, "B", "Fig. 2 style: mean w of source B (vs A) per layer")
    plot(
        "fig2_ablations",
        {
            "kernel, BN trainable": mean(main),
            "kernel, BN frozen": mean(rows("bn_frozen", 1)),
            "layer": mean(rows("layer", 1)),
            "parameter": mean(rows("parameter", 1)),
        },
        "B",
        "Ablations: mean w of source B per layer",
    )
    plot(
        "fig4_zeros",
        {"A + zeros": mean(rows("zeros_a", 0)), "B + zeros": mean(rows("zeros_b", 0))},
        "non-zero",
        "Fig. 4 style: mean w of the non-zero source",
    )
    plot(
        "three_sources",
        {f"source {n}": mean(rows("three", i)) for i, n in enumerate("ABC")},
        "source",
        "Three sources: mean coefficient per layer",
        uniform=1 / 3,
    )
    return figures


def coefficient_spread(s: Settings, collected: Mapping[str, Any]) -> str:
    """How far the learnt merge coefficients moved from their init (the heatmaps' 0..1 colour
    scale hides small moves, so say it in numbers)."""
    moves = []
    for group, by_seed in collected.items():
        for seed in by_seed if not group.startswith("_") else ():
            path = s.run_root / f"{group}-seed{seed}" / "coefficients.npz"
            if path.exists():
                with np.load(path) as data:
                    mean = data["layer_mean"]
                    moves.append((group, float(np.abs(mean - 1.0 / mean.shape[1]).max())))
    if not moves:
        return ""
    per_study: dict[str, float] = {}
    for group, move in moves:
        per_study[group] = max(per_study.get(group, 0.0), move)
    return (
        "Largest move of a layer's mean coefficient from its initial value (1/number of "
        "sources), per study (max over layers and seeds): "
        + ", ".join(f"{g} {v:.4f}" for g, v in per_study.items())
        + ". Values near 0 mean the probe left the merge close to uniform averaging."
    )


def findings(collected: Mapping[str, Any]) -> list[list[str]]:
    """Table rows: MedMerge against every other method of its seed (and 3 sources against 2),
    paired by seed, with a bootstrap CI, a Wilcoxon p-value and a verdict (simulations.stats)."""
    rows = []

    def compare(label: str, ours: Mapping[int, Any], theirs: Mapping[int, Any], method: str,
                ours_method: str = "medmerge") -> None:  # fmt: skip
        seeds = [k for k in sorted(ours) if ours_method in ours[k] and method in theirs.get(k, {})]
        if len(seeds) < 2:
            return
        for key, name in (("macro_f1", "macro-F1"), ("accuracy", "accuracy")):
            mine = [ours[k][ours_method]["test"][key] for k in seeds]
            other = [theirs[k][method]["test"][key] for k in seeds]
            result = paired_comparison(mine, other)
            p_value = result.p_value
            rows.append([
                label, name, f"{result.mean_difference:+.3f}",
                f"[{result.ci_low:+.3f}, {result.ci_high:+.3f}]",
                f"{p_value:.3f}" if p_value >= 0.001 else f"{p_value:.1e}",
                f"{result.wins}/{result.n}",
                {"A better": "**MedMerge better**", "B better": "**MedMerge worse**"}.get(
                    result.verdict, result.verdict),
            ])  # fmt: skip

    main = collected.get("main", {})
    others = dict.fromkeys(m for r in main.values() for m in r if m != "medmerge")
    for method in others:
        compare(f"MedMerge − {method_label(method)}", main, main, method)
    three = collected.get("three", {})
    compare("MedMerge A + B + C − MedMerge A + B", three, main, "medmerge")
    compare("MedMerge A + B + C − Avg+FT A + B + C", three, three, "average_ft")
    return rows


def render(s: Settings, collected: Mapping[str, Any], figures: Mapping[str, Path]) -> str:
    """The RESULTS.md section: substitution, protocol, tables, figures and the command."""
    sources = collected["_sources"][0]
    runs = {g: [collected[g][k] for k in sorted(collected[g])] for g in collected if g[0] != "_"}
    budget_text = ""
    if s.label_budget is not None:
        budget_text = (
            f"; a class-stratified label budget of {s.label_budget:g} of the training labels, "
            "drawn per seed"
        )
    deviations = []
    if s.lp_lr != PAPER_LP_LR or s.ft_lr != PAPER_FT_LR:
        deviations.append(
            f"learning rates LP/probe {s.lp_lr:g}, FT {s.ft_lr:g} instead of the paper's "
            f"{PAPER_LP_LR:g} / {PAPER_FT_LR:g} (set by --lp-lr / --ft-lr: with so few epochs "
            "the paper's rates barely move a new head)"
        )
    if s.lp_epochs != PAPER_EPOCHS or s.ft_epochs != PAPER_EPOCHS:
        deviations.append(
            f"{s.lp_epochs} LP epochs and {s.ft_epochs} FT epochs instead of 50 (CPU budget)"
        )
    if len(s.seeds) < 5:
        deviations.append(f"{len(s.seeds)} main seed(s) instead of the issue's 5 (CPU budget)")
    skipped = [study for study in STUDIES if study not in s.studies]
    if skipped:
        deviations.append(f"studies not run in this invocation: {', '.join(skipped)}")
    out = [
        f"## MedMerge reproduction at MedMNIST scale ({s.arch}, {s.image_size}x{s.image_size})",
        "",
        "**Substitution.** The paper's datasets (ISIC-2019, APTOS, RSNA at 224x224) and ImageNet "
        "weights are not available here (no internet). This study runs the paper's protocol at "
        f"MedMNIST scale on real images: target **{s.target}** (28x28 originals"
        f"{', resized to ' + str(s.image_size) if s.image_size != 28 else ''}; official "
        f"splits{budget_text}). Source A stands in for ImageNet. The numbers are not comparable "
        "with the paper's Table 1.",
        "",
        "Sources (pretrained ones are made once and cached under the run folder):",
        "",
        markdown_table(
            ["source", "what", "its training images", "its test accuracy", "chance (1/classes)"],
            [
                [
                    n,
                    v["text"],
                    str(v.get("train", "n/a")),
                    f"{v['test_accuracy']:.3f}" if "test_accuracy" in v else "n/a",
                    f"{v['chance']:.3f}" if "chance" in v else "n/a",
                ]
                for n, v in sources.items()
                if n != "zeros"
            ],
        ),
        "",
        f"Source pretraining: {s.source_epochs} epochs, AdamW lr {s.source_lr:g}, batch "
        f"{s.batch_size}.",
        "",
        f"Protocol: AdamW, LP {s.lp_epochs} epochs at lr {s.lp_lr:g}, MedMerge probe "
        f"{s.probe_steps} steps (coefficients at lr {s.coef_lr:g} without weight decay, BN and "
        f"head at the LP lr), FT "
        f"{s.ft_epochs} epochs at lr {s.ft_lr:g}, weight decay 0.01, batch {s.batch_size}, no "
        "augmentation, best epoch of every stage chosen on validation macro-F1, CPU fp32. A seed "
        "sets the head init and batch order; sources and splits are fixed.",
        "",
        "Seeds finished per study (planned: main "
        f"{list(s.seeds)}, others {list(s.ablation_seeds or s.seeds)}; an unfinished study "
        "resumes when the command below is run again): "
        + ("; ".join(f"{g} {sorted(collected[g])}" for g in runs) or "none")
        + ".",
        "",
        "Deviations from the paper: " + ("; ".join(deviations) if deviations else "none") + ".",
        "",
        "Reproduce:",
        "",
        "```",
        command_line("simulations.reproduce", [a for a in s.argv if a != "--report-only"]),
        "```",
    ]
    header = ["method", "n", "test accuracy", "test macro-F1", "test AUROC", "wall s / run",
              "LP or probe s", "FT s", "probe val F1"]  # fmt: skip
    if runs.get("main"):
        ratios = probe_cost(runs["main"])
        out += [
            "",
            f"### Main comparison on {s.target}",
            "",
            METRICS_NOTE,
            "",
            markdown_table(header, method_rows(runs["main"])),
            "",
            f"Cost of the MedMerge probe ({s.probe_steps} steps) relative to LP in LP-FT "
            f"({s.lp_epochs} epochs; LP trains the head on features cached once, the probe runs "
            f"the whole merged network every step): "
            f"**{median_range(ratios)}x** (median (min-max) over seeds; per seed: "
            f"{', '.join(f'{r:.1f}' for r in ratios)}).",
        ]
    summary = findings(collected)
    if summary:
        out += [
            "",
            "### What the numbers show (test metrics, paired by seed)",
            "",
            "Difference = MedMerge − other, one value per seed; 95% percentile bootstrap CI of "
            "the mean difference; two-sided Wilcoxon signed-rank p. A verdict needs both the CI "
            "to exclude 0 and p < 0.05; otherwise the difference is within the noise of "
            f"{len(s.seeds)} seeds (`simulations/stats.py`).",
            "",
            markdown_table(
                ["comparison", "metric", "mean diff", "95% CI", "Wilcoxon p", "seeds higher",
                 "verdict"], summary),
        ]  # fmt: skip
    ablation_rows = []
    for spec in plan(s.studies):
        if spec.ablation and runs.get(spec.group):
            ablation_rows += method_rows(runs[spec.group], prefix=f"{spec.label}: ")
    if ablation_rows:
        out += [
            "",
            "### Ablations and three sources",
            "",
            "Kernel granularity with BN trainable is the main table's MedMerge row. "
            + METRICS_NOTE,
            "",
            markdown_table(header, ablation_rows),
        ]
    if figures:
        spread = coefficient_spread(s, collected)
        out += ["", "### Figures", "", spread, ""] if spread else ["", "### Figures", ""]
        out += [f"![{key}]({relative(path, s.results)})" for key, path in figures.items()]
    every = [
        [group, str(seed), method_label(m), f"{r['test']['accuracy']:.3f}",
         f"{r['test']['macro_f1']:.3f}", f"{r['seconds']:.1f}"]
        for group in runs for seed, results in sorted(collected[group].items())
        for m, r in results.items()
    ]  # fmt: skip
    if every:
        out += [
            "",
            "<details><summary>Every run (wall time per run)</summary>",
            "",
            markdown_table(["study", "seed", "method", "accuracy", "macro-F1", "wall s"], every),
            "",
            "</details>",
        ]
    return "\n".join(out) + "\n"


def print_summary(collected: Mapping[str, Any], console: Console) -> None:
    table = Table(title="Test accuracy / macro-F1 (mean ± std)")
    for column in ("study", "method", "n", "accuracy", "macro-F1"):
        table.add_column(column)
    for group, by_seed in collected.items():
        if group.startswith("_"):
            continue
        for row in method_rows(list(by_seed.values())):
            table.add_row(group, row[0], row[1], row[2], row[3])
    console.print(table)


def run_study(s: Settings, console: Console | None = None) -> Path:
    """Run everything planned, then write the figures and this study's RESULTS.md section."""
    console = console or Console()
    set_threads(s.threads)
    collected = run_all(s, console)
    figures = make_figures(s, collected)
    update_section(s.results, f"reproduce-{s.tag}", render(s, collected, figures))
    print_summary(collected, console)
    console.print(f"wrote {s.results} and {len(figures)} figure(s) under {s.figures}")
    return s.results


def _source_arg(text: str) -> tuple[str, str]:
    name, sep, spec = text.partition("=")
    if not sep or name not in ("A", "B", "C") or not spec:
        raise argparse.ArgumentTypeError(f"{text!r}: expected A=SPEC, B=SPEC or C=SPEC")
    return name, spec


def _budget_arg(text: str) -> float | int:
    try:
        return check_label_budget(text, "--label-budget")
    except InputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


HELP = {
    "data_root": "folder with the MedMNIST .npz files",
    "out": "run folders (resumable)",
    "arch": "resnet18, cifar_resnet56, densenet121, ...",
    "target": "MedMNIST flag under --data-root",
    "ablation_seeds": "default: --seeds",
    "lp_lr": "paper: 1e-4",
    "ft_lr": "paper: 1e-5",
    "source_train": "cap on the training images of a MedMNIST pretraining source",
    "report_only": "collect finished runs only",
}


def parse_args(argv: Sequence[str] | None = None) -> Settings:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(p, Settings, skip=("sources", "label_budget", "studies", "argv"), help=HELP)
    p.add_argument("--studies", nargs="+", choices=STUDIES, default=list(STUDIES))
    p.add_argument(
        "--source", action="append", type=_source_arg, default=[], metavar="NAME=SPEC",
        help="A, B or C: a weights spec or pretrain:DATASET[@INIT] (default: "
        + ", ".join(f"{n}={v}" for n, v in DEFAULT_SOURCES) + ")",
    )  # fmt: skip
    p.add_argument(
        "--label-budget", type=_budget_arg,
        help="fraction (0, 1] or count of the target's training labels, per seed",
    )  # fmt: skip
    a = p.parse_args(argv)
    return from_arguments(
        Settings, a, studies=tuple(a.studies), label_budget=a.label_budget,
        sources=tuple({**dict(DEFAULT_SOURCES), **dict(a.source)}.items()),
        argv=tuple(argv or ()),
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(sys.argv[1:] if argv is None else argv)
    run_study(settings)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
