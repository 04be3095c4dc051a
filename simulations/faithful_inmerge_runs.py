"""The InMerge study's runs, apart from its report: three fine-tunings a seed, each tested."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from medmerge_core.data.base import BatchLoader
from medmerge_core.data.medmnist import load_medmnist
from medmerge_core.experiment.config import ExperimentConfig, ModelConfig
from medmerge_core.experiment.run_folder import ExperimentRun
from medmerge_core.experiment.runner import run_experiment
from medmerge_core.inmerge import inmerge_
from medmerge_core.io import atomic_write_json
from medmerge_core.models import build_model, load_source
from medmerge_core.saved_model import load_saved_model
from medmerge_core.settings import InMergeSettings, StageSettings
from medmerge_core.train import Runtime, predict
from simulations.faithful import ARCH, SOURCE_A, Protocol, Study
from simulations.robustness import corrupted_tests

VARIANTS = ("baseline", "public", "quantile")
METHOD = "ft:a"  # the one pipeline each run has: FT of source a


def variant_settings(variant: str, epochs: int) -> InMergeSettings | None:
    """The InMerge settings of a variant (`epochs` of normal training before the public phase)."""
    if variant == "baseline":
        return None
    if variant == "public":
        return InMergeSettings(p=0.3, rule="absolute", tau=0.3, alpha=0.8, skip_layers=10,
                               start_epoch=epochs)  # fmt: skip
    return InMergeSettings()


class InMergeStudy:
    """Runs under `out/inmerge-labels<budget>/<variant>-seed<N>`, on S1's target files."""

    def __init__(self, data_root: Path, out: Path, budget: float, epochs: int,
                 phase_epochs: int, ft_lrs: Sequence[float]) -> None:  # fmt: skip
        self.targets = Study("s1", data_root, out, Protocol(budget))
        self.root = out / f"inmerge-labels{budget:g}"
        self.epochs, self.phase_epochs, self.ft_lrs = epochs, phase_epochs, list(ft_lrs)

    def config(self, variant: str, seed: int) -> ExperimentConfig:
        return ExperimentConfig(
            name=f"{variant}-seed{seed}",
            output_dir=str(self.root),
            data={"format": "medmnist", "path": str(self.targets.target_file(seed).resolve())},
            sources={"a": SOURCE_A},
            model=ModelConfig(arch=ARCH, image_size=self.targets.p.image_size),
            pipelines=["ft"],
            seed=seed,
            batch_size=self.targets.p.batch_size,
            ft=StageSettings(self.epochs + self.phase_epochs, self.ft_lrs[0]),
            ft_lr_choices=self.ft_lrs if len(self.ft_lrs) > 1 else [],
            inmerge=variant_settings(variant, self.epochs),
        )

    def run_seed(self, seed: int, console: Console) -> None:
        timing = self.root / f"wall_seconds-seed{seed}.json"
        start = time.perf_counter()
        resumed = any(  # a later run times only what was left
            (ExperimentRun.of(self.config(v, seed)).dir / "metrics.jsonl").exists()
            for v in VARIANTS
        )
        for variant in VARIANTS:
            console.print(f"[bold]InMerge[/] {variant} seed {seed}")
            config = self.config(variant, seed)
            run_experiment(config, show_progress=False)
            conditions(ExperimentRun.of(config).dir, self.targets.p.image_size)
        if not timing.exists():
            atomic_write_json(timing, {"seconds": time.perf_counter() - start, "resumed": resumed})


def conditions(run_dir: Path, image_size: int) -> dict[str, Any]:
    """The fine-tuned model's predicted class on the clean and every corrupted test image, and
    what one InMerge application would merge on its weights; cached in the run folder."""
    cache = run_dir / "conditions.json"
    if cache.exists():
        return json.loads(cache.read_text(encoding="utf-8"))
    saved = load_saved_model(run_dir, METHOD)
    config = ExperimentRun(run_dir).config()
    task = load_medmnist(config["data"]["path"]).resized(image_size)
    runtime = Runtime.detect("auto")
    model = runtime.model(saved.build())
    predicted, labels = {}, None
    for key, split in corrupted_tests(task.test).items():
        logits, truth = predict(model, BatchLoader(split, 64), runtime)  # faster than 256 on CPU
        predicted[key] = "".join(str(int(p)) for p in logits.argmax(1))
        labels = labels or "".join(str(int(t)) for t in truth)
    record = {
        "predicted": predicted,
        "labels": labels,
        "merged": merge_activity(saved.build(), run_dir.name.rsplit("-seed", 1)[0]),
    }
    atomic_write_json(cache, record)
    return record


def merge_activity(model: torch.nn.Module, variant: str) -> str | None:
    """'m of d drawn kernels in L layers' for one application of the variant's rule."""
    settings = variant_settings(variant, 0)
    if settings is None:
        return None
    stats = inmerge_(model.train(), settings, torch.Generator().manual_seed(0))
    return f"{stats.kernels_merged} of {stats.kernels_drawn} drawn kernels in {stats.layers} layers"


def source_activity() -> dict[str, str | None]:
    """What each variant's rule merges on the ImageNet weights before any fine-tuning."""
    model = build_model(ARCH, 2, 1)
    state = {**model.state_dict(), **load_source(SOURCE_A, ARCH, 1)}
    out = {}
    for variant in VARIANTS[1:]:
        model.load_state_dict(state)  # each rule starts from the untouched weights
        out[variant] = merge_activity(model, variant)
    return out
