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
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from medmerge_core.coerce import (
    add_arguments,
    from_arguments,
)
from medmerge_core.data.splits import check_label_budget
from medmerge_core.errors import InputError
from medmerge_core.experiment.pipelines import default_pipelines, pipeline_ids
from simulations.common import (
    set_threads,
    update_section,
)
from simulations.reproduce_report import make_figures, print_summary, results_section
from simulations.study import DEFAULT_SOURCES, STUDIES, StudySettings, run_all


def run_study(s: StudySettings, console: Console | None = None) -> Path:
    """Run everything planned, then write the figures and this study's RESULTS.md section."""
    console = console or Console()
    set_threads(s.threads)
    collected = run_all(s, console)
    figures = make_figures(s, collected)
    update_section(s.results, f"reproduce-{s.tag}", results_section(s, collected, figures))
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


def parse_args(argv: Sequence[str] | None = None) -> StudySettings:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(
        p,
        StudySettings,
        skip=("sources", "label_budget", "studies", "pipelines", "argv"),
        help=HELP,
    )
    p.add_argument("--studies", nargs="+", choices=STUDIES, default=list(STUDIES))
    p.add_argument(
        "--pipelines",
        nargs="+",
        choices=pipeline_ids(),
        default=list(default_pipelines()),
        help="run only these pipelines (finished runs of the others are still reported)",
    )
    p.add_argument(
        "--source",
        action="append",
        type=_source_arg,
        default=[],
        metavar="NAME=SPEC",
        help="A, B or C: a weights spec or pretrain:DATASET[@INIT] (default: "
        + ", ".join(f"{n}={v}" for n, v in DEFAULT_SOURCES)
        + ")",
    )
    p.add_argument(
        "--label-budget",
        type=_budget_arg,
        help="fraction (0, 1] or count of the target's training labels, per seed",
    )
    a = p.parse_args(argv)
    return from_arguments(
        StudySettings,
        a,
        studies=tuple(a.studies),
        pipelines=tuple(a.pipelines),
        label_budget=a.label_budget,
        sources=tuple({**dict(DEFAULT_SOURCES), **dict(a.source)}.items()),
        argv=tuple(argv or ()),
    )


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(sys.argv[1:] if argv is None else argv)
    run_study(settings)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
