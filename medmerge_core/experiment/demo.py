"""`medmerge demo`: the paper's comparison end to end on the built-in synthetic data.

Two sources, as in the paper: a generic model and a related model fine-tuned from it on a
related synthetic task (as HAM10K was from ImageNet). Then FT and LP-FT from each, uniform
averaging + FT, and MedMerge run on the small synthetic target. By default the generic model
is a ResNet-18 pretrained on a synthetic task; `DemoSettings.imagenet()` (`medmerge demo
--imagenet`) makes it the real ImageNet EfficientNet-Lite0, at about twice the CPU time.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from medmerge_core.data.synthetic import make_task
from medmerge_core.experiment.config import ExperimentConfig, ModelConfig
from medmerge_core.experiment.pipelines import REGISTRY
from medmerge_core.experiment.run_folder import ExperimentRun
from medmerge_core.experiment.runner import run_experiment
from medmerge_core.models import load_source
from medmerge_core.pretrain import pretrain_source
from medmerge_core.report import detail_table, table1
from medmerge_core.settings import ProbeSettings, StageSettings
from medmerge_core.train import FitOptions, Runtime


@dataclass(frozen=True)
class DemoSettings:
    """Sized so the whole demo finishes in about 4 minutes on a 2-core CPU (README)."""

    arch: str = "resnet18"
    generic: str | None = None  # a source spec, or None: pretrained on the synthetic 'generic'
    image_size: int = 28
    source_train: int = 800
    source: StageSettings = field(default_factory=lambda: StageSettings(3, 1e-3))  # pretraining
    target_train: int | None = None  # the synthetic target's default (a few hundred)
    lp: StageSettings = field(default_factory=lambda: StageSettings(5, 1e-3))
    ft: StageSettings = field(default_factory=lambda: StageSettings(5, 1e-4))
    merge: ProbeSettings = field(default_factory=ProbeSettings)  # the probe's defaults
    batch_size: int = 32
    seed: int = 0

    @classmethod
    def quick(cls) -> DemoSettings:
        """A smoke version for tests: ShuffleNet's 1.4M parameters keep its eight checkpoints
        small (the full demo's ResNet-18 writes 45 MB each)."""
        return cls(
            arch="shufflenet_v2_x0_5",
            image_size=32,
            source_train=128,
            source=StageSettings(1, 1e-3),
            target_train=64,
            lp=StageSettings(1, 1e-3),
            ft=StageSettings(1, 1e-4),
            merge=ProbeSettings(steps=4),
            batch_size=32,
        )

    @classmethod
    def imagenet(cls, quick: bool = False) -> DemoSettings:
        """The real ImageNet EfficientNet-Lite0 as the generic source (no generic pretraining)."""
        base = cls.quick() if quick else cls()
        return dataclasses.replace(base, arch="efficientnet_lite0",
                                   generic="imagenet:efficientnet_lite0")  # fmt: skip


def demo_config(
    out: Path, s: DemoSettings, generic: str, related: Path, device: str = "auto"
) -> ExperimentConfig:
    """The experiment the demo runs on the synthetic target, from its two sources."""
    return ExperimentConfig(
        name="target",
        output_dir=str(out),
        data={"format": "synthetic", "task": "target"}
        | ({"n_train": s.target_train} if s.target_train else {}),
        sources={"generic": generic, "related": str(related.resolve())},
        model=ModelConfig(arch=s.arch, image_size=s.image_size),
        seed=s.seed,
        batch_size=s.batch_size,
        device=device,
        lp=s.lp,
        ft=s.ft,
        merge=s.merge,
    )


def pretrain_demo_sources(
    source_dir: Path,
    s: DemoSettings,
    runtime: Runtime,
    *,
    show_progress: bool = True,
    console: Console | None = None,
) -> tuple[str, Path]:
    """The demo's two sources (resumable): the generic one (`s.generic`, or pretrained from
    random init on a synthetic task), and a related one initialised from it. Returns the
    generic source's spec and the related checkpoint."""
    console = console or Console(quiet=True)
    sizes = {"n_train": s.source_train, "n_val": max(s.source_train // 5, 32), "n_test": 64}
    related_task = make_task("related_a", image_size=s.image_size, seed=s.seed, **sizes)
    related_ckpt = source_dir / "related.pt"
    if s.generic is not None:
        generic = s.generic
        console.print(f"[bold]1/3[/] the generic source: {generic}")
    else:
        generic_task = make_task("generic", image_size=s.image_size, seed=s.seed, **sizes)
        console.print(f"[bold]1/3[/] pretraining the generic source on '{generic_task.name}'")
        metrics = pretrain_source(
            s.arch,
            generic_task,
            source_dir / "generic.pt",
            s.source,
            runtime,
            batch_size=s.batch_size,
            seed=s.seed,
            options=FitOptions(show_progress=show_progress),
        )
        console.print(f"    generic source test accuracy {metrics['accuracy']:.3f}")
        generic = str((source_dir / "generic.pt").resolve())
    console.print(f"[bold]2/3[/] pretraining the related source on '{related_task.name}'")
    related = pretrain_source(
        s.arch,
        related_task,
        related_ckpt,
        s.source,
        runtime,
        init=load_source(generic, s.arch, related_task.in_channels),
        batch_size=s.batch_size,
        seed=s.seed + 1,
        init_spec=s.generic,  # None: recorded as "weights", as before
        options=FitOptions(show_progress=show_progress),
    )
    console.print(f"    related source test accuracy {related['accuracy']:.3f}")
    return generic, related_ckpt


def run_demo(
    out: Path,
    settings: DemoSettings = DemoSettings(),
    *,
    device: str = "auto",
    show_progress: bool = True,
    console: Console | None = None,
) -> dict[str, Any]:
    console = console or Console()
    s = settings
    runtime = Runtime.detect(device)
    generic_ckpt, related_ckpt = pretrain_demo_sources(
        out / "sources", s, runtime, show_progress=show_progress, console=console
    )

    target = make_task("target", image_size=s.image_size, seed=s.seed, n_train=s.target_train)
    config = demo_config(out, s, generic_ckpt, related_ckpt, device)
    *others, last = [REGISTRY[p].label for p in config.pipelines]
    console.print(
        f"[bold]3/3[/] {', '.join(others)} and {last} on '{target.name}' "
        f"({len(target.train)} train / {len(target.val)} val / {len(target.test)} test)"
    )
    results = run_experiment(config, task=target, show_progress=show_progress)
    console.print(table1(target.name, [results], title="Demo: test accuracy / macro-F1"))
    console.print(detail_table([results]))
    run_dir = ExperimentRun.of(config).dir
    if (run_dir / "coefficients.png").exists():
        console.print(f"what the merge learned, kernel by kernel: {run_dir / 'coefficients.png'}")
    console.print(f"run folder: {run_dir}")
    return results
