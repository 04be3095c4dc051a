"""Issue 4 part 4: does InMerge fine-tuning make ResNet-18 more robust to image corruptions?

    python -m simulations.robustness --data-root ../shared/data/medmnist --seeds 0 1 2 \
        --init runs/reproduce/resnet18-28/sources/A.pt --out runs/robustness

For each dataset (real PneumoniaMNIST and BreastMNIST) and seed, the same model is fine-tuned
twice by the core's FT pipeline: a baseline, and with the `inmerge:` option (InMerge before
every training step). Both are then tested on the clean test set and on corrupted copies of
it (4 corruptions x 3 severities, medmerge_core.corruptions; one fixed corruption seed, so
every model sees the same corrupted images). Results go to RESULTS.md between the
`robustness` markers, whatever they show.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from medmerge_core.coerce import add_arguments, from_arguments
from medmerge_core.corruptions import CORRUPTIONS, SEVERITIES, corrupt
from medmerge_core.data.base import ArraySplit, BatchLoader, TaskData
from medmerge_core.experiment.config import ExperimentConfig, ModelConfig
from medmerge_core.experiment.run_folder import ExperimentRun
from medmerge_core.experiment.runner import run_experiment
from medmerge_core.inmerge import inmerge_
from medmerge_core.io import atomic_write_json, load_torch_file
from medmerge_core.models import build_model, load_source
from medmerge_core.settings import InMergeSettings, StageSettings
from medmerge_core.train import Runtime, evaluate
from simulations.common import (
    load_medmnist_file,
    markdown_table,
    mean_std,
    paired_difference,
    reproduce_block,
    set_threads,
    subsample_train,
    update_section,
)

DATASETS = ("pneumoniamnist", "breastmnist")
VARIANTS = ("baseline", "inmerge")
CORRUPTION_SEED = 1234


@dataclass(frozen=True)
class RobustnessSettings:
    data_root: Path
    out: Path = Path("runs/robustness")
    results: Path = Path("RESULTS.md")
    datasets: tuple[str, ...] = DATASETS
    seeds: tuple[int, ...] = (0, 1, 2)
    arch: str = "resnet18"
    image_size: int = 28
    init: str = "random:0"  # a source spec: checkpoint path, random:SEED, torchvision:...
    epochs: int = 10
    lr: float = 1e-4
    batch_size: int = 32
    max_train: int | None = None  # cap on training images per dataset (seeded subset)
    inmerge: InMergeSettings = field(default_factory=InMergeSettings)  # --p, --tau, ...
    threads: int = 1
    report_only: bool = False
    progress: bool = True
    argv: tuple[str, ...] = field(default=(), compare=False)

    @property
    def run_root(self) -> Path:
        return self.out / f"{self.arch}-{self.image_size}"


def corrupted_tests(test: ArraySplit) -> dict[str, ArraySplit]:
    """The clean test split and its 12 corrupted copies, keyed 'clean' or 'name/severity'."""
    splits = {"clean": test}
    for name in CORRUPTIONS:
        for severity in SEVERITIES:
            images = corrupt(test.images, name, severity, seed=CORRUPTION_SEED)
            splits[f"{name}/{severity}"] = ArraySplit(images, test.labels)
    return splits


def _fine_tuned(run_dir: Path) -> dict[str, Any]:
    path = ExperimentRun(run_dir).checkpoint_path("ft:init")
    return load_torch_file(path, "unreadable fine-tuned model")


def evaluate_conditions(
    run_dir: Path, s: RobustnessSettings, task: TaskData, tests: Mapping[str, ArraySplit]
) -> dict[str, dict[str, float]]:
    """Test metrics of a run's fine-tuned model on every condition; cached in the run folder."""
    cache = run_dir / "robustness.json"
    if cache.exists():
        saved = json.loads(cache.read_text(encoding="utf-8"))
        if set(saved) == set(tests):
            return saved
    saved_model = _fine_tuned(run_dir)
    model = build_model(s.arch, task.num_classes, task.in_channels)
    model.load_state_dict(saved_model["state_dict"])
    runtime = Runtime.detect("auto")
    model = runtime.model(model)
    metrics = {
        key: evaluate(model, BatchLoader(split, 256), runtime, task.multilabel)
        for key, split in tests.items()
    }
    atomic_write_json(cache, metrics)
    return metrics


def _absolute(spec: str) -> str:
    """A checkpoint path made absolute (run folders are compared by config); other specs kept."""
    if spec in ("zeros", "random") or spec.startswith(("random:", "torchvision:")):
        return spec
    return str(Path(spec).expanduser().resolve())


def inmerge_activity(
    s: RobustnessSettings, task: TaskData, state: Mapping[str, torch.Tensor]
) -> str:
    """How many kernels one InMerge application merges on given weights (a sanity check that
    the option does something: random kernels are rarely similar enough)."""
    model = build_model(s.arch, task.num_classes, task.in_channels)
    full = model.state_dict()
    full.update(state)
    model.load_state_dict(full)
    stats = inmerge_(model.train(), s.inmerge, torch.Generator().manual_seed(0))
    return f"{stats.kernels_merged} of {stats.kernels_drawn} drawn kernels in {stats.layers} layers"


def make_config(s: RobustnessSettings, dataset: str, variant: str, seed: int) -> ExperimentConfig:
    inmerge = s.inmerge if variant == "inmerge" else None
    return ExperimentConfig(
        name=f"{dataset}-{variant}-seed{seed}",
        output_dir=str(s.run_root),
        data={"format": "medmnist", "path": str((s.data_root / f"{dataset}.npz").resolve())},
        sources={"init": _absolute(s.init)},
        model=ModelConfig(arch=s.arch, image_size=s.image_size),
        pipelines=["ft"],
        seed=seed,
        batch_size=s.batch_size,
        device="auto",
        ft=StageSettings(epochs=s.epochs, lr=s.lr),
        inmerge=inmerge,
    )


def run_all(
    s: RobustnessSettings,
    console: Console,
    on_dataset: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """{dataset: {variant: [per-seed {condition: metrics}], "_activity": ...}}; resumable."""
    collected: dict[str, dict[str, Any]] = {}
    for dataset in s.datasets:
        full = load_medmnist_file(s.data_root, dataset).resized(s.image_size)
        task = subsample_train(full, s.max_train)
        tests = corrupted_tests(task.test)
        activity = {"start": inmerge_activity(s, task, load_source(_absolute(s.init), s.arch, 1))}
        for seed in s.seeds:
            for variant in VARIANTS:
                config = make_config(s, dataset, variant, seed)
                run_dir = s.run_root / config.name
                if s.report_only and not all(
                    "ft:init" in ExperimentRun.of(make_config(s, dataset, v, seed)).results()
                    for v in VARIANTS
                ):
                    continue  # report only seeds where both variants finished
                console.print(f"[bold]{dataset}[/] {variant} seed {seed}")
                results = run_experiment(config, task=task, show_progress=s.progress)
                metrics = evaluate_conditions(run_dir, s, task, tests)
                metrics["_train"] = {
                    "seconds": results["ft:init"]["seconds"],
                    "train_images": len(task.train),
                }
                collected.setdefault(dataset, {}).setdefault(variant, []).append(metrics)
                if variant == "inmerge" and "end" not in activity:
                    activity["end"] = inmerge_activity(s, task, _fine_tuned(run_dir)["state_dict"])
                    activity["end_seed"] = str(seed)
        if dataset not in collected:
            continue
        collected[dataset]["_activity"] = activity
        if on_dataset is not None:  # partial results survive an interruption
            on_dataset(collected)
    return collected


def _values(runs: Sequence[Mapping[str, Any]], key: str, metric: str) -> list[float]:
    return [r[key][metric] for r in runs]


def _corrupted_mean(run: Mapping[str, Any], metric: str) -> float:
    return float(np.mean([v[metric] for k, v in run.items() if "/" in k]))


def departure_sentence(s: RobustnessSettings) -> str:
    """One sentence: how this proxy study departs from the InMerge paper."""
    init = Path(s.init).name if "/" in s.init else s.init
    images = f"at most {s.max_train} training images" if s.max_train else "the training images"
    return (
        "**A proxy study, not a reproduction.** The InMerge paper reports several CNN "
        "architectures on four datasets (ChestXRay14 and MedMNIST among them); this study "
        f"fine-tunes one {s.arch} at {s.image_size}x{s.image_size} from `{init}` for "
        f"{s.epochs} epoch(s) on {images} of each of "
        f"{' and '.join(s.datasets)}, and measures robustness on the synthetic corruptions "
        "below."
    )


def results_section(s: RobustnessSettings, collected: Mapping[str, Any]) -> str:
    """The RESULTS.md section: setup, one table per dataset, and what the numbers show."""
    out = [
        "## Proxy study: InMerge robustness (issue 4, part 4)",
        "",
        departure_sentence(s),
        "",
        f"{s.arch} at {s.image_size}x{s.image_size} on real MedMNIST images (official splits), "
        f"fine-tuned from `{Path(s.init).name if '/' in s.init else s.init}` by the core FT "
        f"pipeline: AdamW lr {s.lr:g}, {s.epochs} epochs, batch {s.batch_size}, no "
        "augmentation, best epoch on validation macro-F1, CPU fp32. InMerge: p "
        f"{s.inmerge.p:g}, tau {s.inmerge.tau:g}, alpha {s.inmerge.alpha:g}, layers: "
        f"{s.inmerge.layers_text}, from epoch {s.inmerge.start_epoch}, before every training "
        "step. A seed sets the head init, batch order "
        "and InMerge draws; seeds finished (both variants; planned "
        f"{list(s.seeds)}): "
        + ", ".join(f"{d} {len(runs['baseline'])}" for d, runs in collected.items())
        + ". Training images per dataset: "
        + ", ".join(
            f"{d} {runs['baseline'][0]['_train']['train_images']}" for d, runs in collected.items()
        )
        + (f" (a fixed random subset of at most {s.max_train})" if s.max_train else "")
        + ".",
        "",
        "Corruptions (medmerge_core/corruptions.py, severities 1-3 = ImageNet-C levels 1/3/5 "
        "where scale free): Gaussian noise sigma 0.08/0.18/0.38, Gaussian blur sigma "
        "2/4/6% of the side, contrast x0.4/0.2/0.05, JPEG quality 25/15/7. Mean ± std over seeds.",
        "",
        *reproduce_block("simulations.robustness", s.argv),
    ]
    summary = []
    for dataset, runs in collected.items():
        base, inm = runs.get("baseline", []), runs.get("inmerge", [])
        activity = runs["_activity"]
        order = ["clean", *(f"{n}/{v}" for n in CORRUPTIONS for v in SEVERITIES)]
        conditions = [k for k in order if k in base[0]]  # robustness.json is key-sorted
        rows = []
        for key in [*conditions, "mean corrupted"]:
            cells = []
            for metric in ("accuracy", "auroc"):
                for runs_ in (base, inm):
                    values = (
                        [_corrupted_mean(r, metric) for r in runs_]
                        if key == "mean corrupted"
                        else _values(runs_, key, metric)
                    )
                    cells.append(mean_std(values))
            label = f"**{key}**" if key == "mean corrupted" else key
            rows.append([label, *cells])
        wall = [r["_train"]["seconds"] for r in base], [r["_train"]["seconds"] for r in inm]
        out += [
            "",
            f"### {dataset} ({len(base)} seeds)",
            "",
            markdown_table(
                [
                    "test set",
                    "accuracy baseline",
                    "accuracy InMerge",
                    "AUROC baseline",
                    "AUROC InMerge",
                ],
                rows,
            ),
            "",
            f"Fine-tuning wall time per run: baseline {mean_std(wall[0], 1)} s, InMerge "
            f"{mean_std(wall[1], 1)} s (per seed: "
            + ", ".join(f"{b:.0f}/{i:.0f}" for b, i in zip(*wall, strict=False))
            + " s baseline/InMerge; runs made at different loads of a shared machine, so these "
            "times do not measure InMerge's cost: benchmarks/bench_inmerge.py does, side by "
            "side). "
            "One InMerge application (seeded) merges "
            f"{activity['start']} at the initial weights, and {activity.get('end', 'n/a')} at "
            f"the end of fine-tuning (seed {activity.get('end_seed', '-')}).",
        ]
        for metric in ("accuracy", "auroc"):
            for key, name in (("clean", "clean"), (None, "mean corrupted")):
                a = [r[key][metric] if key else _corrupted_mean(r, metric) for r in base]
                b = [r[key][metric] if key else _corrupted_mean(r, metric) for r in inm]
                summary.append(
                    f"- {dataset}, {name} {metric}: InMerge − baseline = {paired_difference(b, a)}."
                )
    out += ["", "### What the numbers show", "", *summary]
    return "\n".join(out) + "\n"


def print_summary(collected: Mapping[str, Any], console: Console) -> None:
    table = Table(title="InMerge vs baseline: test AUROC (mean ± std)")
    for column in ("dataset", "variant", "clean", "mean corrupted"):
        table.add_column(column)
    for dataset, runs in collected.items():
        for variant in VARIANTS:
            seeds = runs[variant]
            table.add_row(
                dataset,
                variant,
                mean_std(_values(seeds, "clean", "auroc")),
                mean_std([_corrupted_mean(r, "auroc") for r in seeds]),
            )
    console.print(table)


def run_study(s: RobustnessSettings, console: Console | None = None) -> Path:
    console = console or Console()
    set_threads(s.threads)
    collected = run_all(
        s, console, lambda done: update_section(s.results, "robustness", results_section(s, done))
    )
    print_summary(collected, console)
    console.print(f"wrote the robustness section of {s.results}")
    return s.results


HELP = {
    "data_root": "folder with the MedMNIST .npz files",
    "init": "checkpoint path or random:SEED",
    "max_train": "cap on training images per dataset",
    "report_only": "report finished runs only",
}


def parse_args(argv: Sequence[str]) -> RobustnessSettings:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(
        p, RobustnessSettings, skip=("datasets", "argv"), help=HELP, prefixes={"inmerge": ""}
    )
    p.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    a = p.parse_args(argv)
    return from_arguments(RobustnessSettings, a, datasets=tuple(a.datasets), argv=tuple(argv))


def main(argv: Sequence[str] | None = None) -> int:
    run_study(parse_args(sys.argv[1:] if argv is None else argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
