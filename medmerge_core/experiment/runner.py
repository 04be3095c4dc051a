"""Running an experiment: every planned method of a config, resumably, in its run folder.

`run_experiment` plans the methods from the registry (`pipelines.planned_methods`), runs each
unfinished one through its pipeline's function with a `RunContext` (the steps a pipeline
composes, on this run's task, sources and device) and leaves what it made in the run folder
(`ExperimentRun.save_method`).
"""

from __future__ import annotations

import copy
import dataclasses
import tempfile
import time
from collections.abc import Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medmerge_core.batches import TensorBatches, extract_features
from medmerge_core.data.base import BatchLoader, TaskData
from medmerge_core.experiment.config import ExperimentConfig
from medmerge_core.experiment.pipelines import REGISTRY, planned_methods
from medmerge_core.experiment.run_folder import ExperimentRun
from medmerge_core.experiment.tracking import NoTracker, Tracker, check_tracking, open_tracker
from medmerge_core.inmerge import training_hook
from medmerge_core.models import StateDict, build_model, load_source, split_head
from medmerge_core.probe import UNIFORM, learn_merge
from medmerge_core.settings import ProbeSettings, StageSettings
from medmerge_core.train import FitOptions, Runtime, StepHook, fit, predict, scored, seed_everything


@dataclass
class RunContext:
    """What every pipeline needs, built once per run (the tracker per method); its public
    methods are the steps a pipeline composes (`pipelines.Steps`)."""

    config: ExperimentConfig
    task: TaskData
    sources: dict[str, StateDict]
    runtime: Runtime
    run: ExperimentRun
    show_progress: bool
    tracker: Tracker = field(default_factory=NoTracker)  # the running method's (per method)

    def score_probabilities(self, probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        """Test metrics of probabilities (an ensemble's), scored like any model's logits."""
        clipped = np.clip(probs, 1e-7, 1 - 1e-7)
        logits = np.log(clipped / (1 - clipped)) if self.task.multilabel else np.log(clipped)
        return scored(logits.astype(np.float32), labels, self.task.multilabel)

    def loaders(self) -> tuple[BatchLoader, BatchLoader, BatchLoader]:
        c = self.config
        return (
            BatchLoader(self.task.train, c.batch_size, shuffle=True, seed=c.seed),
            BatchLoader(self.task.val, c.eval_batch_size),
            BatchLoader(self.task.test, c.eval_batch_size),
        )

    def new_model(self) -> nn.Module:
        torch.manual_seed(self.config.seed)  # the same head init for every method of a seed
        return build_model(self.config.model.arch, self.task.num_classes, self.task.in_channels)

    def _fit_options(self, method: str, stage: str) -> FitOptions:
        """How every stage of a run is named, checkpointed, logged, shown and tracked."""
        return FitOptions(
            name=f"{method} {stage}",
            checkpoint=self.run.state_path(method, stage),
            checkpoint_minutes=self.config.checkpoint_minutes,
            metrics_log=self.run.metrics_path,
            show_progress=self.show_progress,
            on_epoch_end=self.tracker.hook(stage),
        )

    def stage(
        self,
        model: nn.Module,
        method: str,
        stage: str,
        settings: StageSettings,
        train: Any,
        val: Any,
        before_step: StepHook | None = None,
    ) -> dict[str, Any]:
        """Run one resumable training stage; a completed stage is loaded, not re-run."""
        return fit(
            model,
            train,
            val,
            settings,
            self.runtime,
            multilabel=self.task.multilabel,
            before_step=before_step,
            options=self._fit_options(method, stage),
        ).summary()

    # -- the steps of a pipeline -----------------------------------------------------------

    def source_model(self, source: str) -> nn.Module:
        model = self.new_model()
        state = model.state_dict()
        state.update(self.sources[source])
        model.load_state_dict(state)
        return self.runtime.model(model)

    def linear_probe(self, model: nn.Module, method: str) -> dict[str, Any]:
        """LP on features cached once from the frozen backbone (no augmentation)."""
        c = self.config
        backbone, head = split_head(model)
        start = time.perf_counter()
        in_order = BatchLoader(self.task.train, c.eval_batch_size)
        train_x, train_y = extract_features(backbone, in_order, self.runtime)
        val_x, val_y = extract_features(backbone, self.loaders()[1], self.runtime)
        feature_seconds = time.perf_counter() - start
        del backbone
        lp = self.stage(
            head,
            method,
            "lp",
            c.lp,
            TensorBatches(train_x, train_y, c.batch_size, shuffle=True, seed=c.seed),
            TensorBatches(val_x, val_y, c.eval_batch_size, shuffle=False),
        )
        lp["seconds"] += feature_seconds
        return lp

    @property
    def source_names(self) -> list[str]:
        return list(self.sources)

    def uniform_merge(self) -> nn.Module:
        return self._merge("uniform", UNIFORM, None, "probe")[0]

    def probe_merge(
        self, method: str, held_at: Sequence[float] | None = None, stage: str = "probe"
    ) -> tuple[nn.Module, dict[str, Any] | None]:
        return self._merge(method, self.config.merge, held_at, stage)

    def _merge(
        self, method: str, settings: ProbeSettings, held_at: Sequence[float] | None, stage: str
    ) -> tuple[nn.Module, dict[str, Any] | None]:
        c = self.config
        train, val, _ = self.loaders()
        learned = learn_merge(
            self.new_model(),
            list(self.sources.values()),
            list(self.sources),
            train,
            val,
            settings,
            c.lp.lr,
            c.lp.weight_decay,
            self.runtime,
            multilabel=self.task.multilabel,
            report_dir=self.run.dir if settings.trains and held_at is None else None,
            held_at=held_at,
            options=self._fit_options(method, stage),
        )
        return learned.model, learned.fit.summary() if learned.fit is not None else None

    def evaluate(self, model: nn.Module) -> dict[str, Any]:
        _, val, test = self.loaders()
        return {
            split: scored(*predict(model, batches, self.runtime), self.task.multilabel)
            for split, batches in (("val", val), ("test", test))
        }

    def finetune(self, model: nn.Module, method: str) -> dict[str, Any]:
        """FT at `ft.lr`; with `ft_lr_choices`, once per rate from the same start (and the same
        seed), keeping the rate whose best epoch scored best on validation (ties: the first)."""
        c = self.config
        train, val, _ = self.loaders()
        if not c.ft_lr_choices:
            hook = None if c.inmerge is None else training_hook(c.inmerge, c.seed)
            return self.stage(model, method, "ft", c.ft, train, val, hook)
        start = copy.deepcopy(model.state_dict())
        best: tuple[dict[str, Any], dict[str, torch.Tensor]] | None = None
        by_rate, seconds, steps = {}, 0.0, 0
        for lr in c.ft_lr_choices:
            model.load_state_dict(start)
            seed_everything(c.seed)
            hook = None if c.inmerge is None else training_hook(c.inmerge, c.seed)
            settings = dataclasses.replace(c.ft, lr=lr)
            summary = self.stage(model, method, f"ft-lr{lr:g}", settings, train, val, hook)
            by_rate[f"{lr:g}"] = summary["val"]["macro_f1"]
            seconds, steps = seconds + summary["seconds"], steps + summary["steps"]
            if best is None or summary["val"]["macro_f1"] > best[0]["val"]["macro_f1"]:
                best = {**summary, "lr": lr}, copy.deepcopy(model.state_dict())
        assert best is not None
        model.load_state_dict(best[1])
        return {**best[0], "val_by_lr": by_rate, "seconds": seconds, "steps_all_rates": steps}


def run_experiment(
    config: ExperimentConfig, *, task: TaskData | None = None, show_progress: bool = True
) -> dict[str, Any]:
    """Run every planned method (skipping ones already finished) and return results.json."""
    # Everything that can be wrong (config, device, data, architecture, sources) is found
    # before the run folder is touched, so a typo never leaves a folder behind.
    ExperimentRun.check(config)
    check_tracking(config.tracking)
    seed_everything(config.seed)
    runtime = Runtime.detect(config.device, config.amp, config.channels_last)
    with tempfile.TemporaryDirectory() as staging:  # the data's split files, until all is well
        if task is None:
            from medmerge_core.data.registry import load_task

            task = load_task(config.data, image_size=config.model.image_size, seed=config.seed,
                             run_dir=Path(staging))  # fmt: skip
        sources = {
            name: load_source(spec, config.model.arch, task.in_channels)
            for name, spec in config.sources.items()
        }
        run = ExperimentRun.prepare(config, Path(staging))
    ctx = RunContext(config, task, sources, runtime, run, show_progress)
    results = run.results()
    for method, pipeline, source in planned_methods(config.pipelines, list(config.sources)):
        derive = REGISTRY[pipeline].derive
        if derive is not None:  # reads the finished methods: cheap, so always brought up to date
            entry = derive(results, run, list(config.sources), ctx.score_probabilities)
            if entry is not None:
                run.save_derived(results, method, pipeline, entry)
            continue
        if run.finished(method, results):
            continue
        seed_everything(config.seed)
        start = time.perf_counter()
        tracked = open_tracker(config.tracking, run.tensorboard_dir(method))
        with closing(tracked) as tracker:
            method_ctx = dataclasses.replace(ctx, tracker=tracker)
            model, stages = REGISTRY[pipeline].run(method_ctx, method, source)
        logits, labels = predict(model, ctx.loaders()[2], runtime)
        run.save_method(
            results,
            method,
            pipeline=pipeline,
            source=source,
            stages=stages,
            model=model,
            arch=config.model.arch,
            task=task,
            logits=logits,
            labels=labels,
            started=start,
        )
    return results
