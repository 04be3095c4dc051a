"""FT, LP-FT, uniform-average + FT and MedMerge pipelines, driven by one config.

A run folder holds: config.yaml (resolved), metrics.jsonl (per epoch), results.json (per
method, rewritten atomically after each method), coefficients.npz + coefficient_summary.json +
coefficients.png (MedMerge), checkpoints/<method>.pt (best model), predictions/<method>.npz
(test-set probabilities, labels and image ids), confusion/<method>.png (single-label tasks),
tensorboard/<method>/ (with `tracking: tensorboard`) and, while a method runs, state/ (one file
per stage: the rolling resume checkpoint, written at most every `checkpoint_minutes`, then the
finished stage; deleted once the method's best model is saved, so nothing is kept twice).
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from medmerge_core.config import ExperimentConfig, differences, dump_config
from medmerge_core.data.base import BatchLoader, TaskData
from medmerge_core.errors import InputError
from medmerge_core.inmerge import training_hook
from medmerge_core.io import (
    append_jsonl,
    atomic_savez,
    atomic_write_json,
    atomic_write_text,
    load_torch_file,
)
from medmerge_core.metrics import clinical_report
from medmerge_core.models import StateDict, build_model, load_source, save_checkpoint, split_head
from medmerge_core.probe import UNIFORM, learn_merge
from medmerge_core.provenance import environment
from medmerge_core.saved_model import usage_record
from medmerge_core.settings import ProbeSettings, StageSettings
from medmerge_core.tracking import NoTracker, Tracker, check_tracking, open_tracker
from medmerge_core.train import (
    Runtime,
    StepHook,
    TensorBatches,
    extract_features,
    fit,
    predict,
    probabilities,
    scored,
    seed_everything,
)

log = logging.getLogger(__name__)


@dataclass
class RunContext:
    """What every pipeline needs; built once per run."""

    config: ExperimentConfig
    task: TaskData
    sources: dict[str, StateDict]
    runtime: Runtime
    run_dir: Path
    show_progress: bool
    tracker: Tracker = field(default_factory=NoTracker)  # the running method's (per method)

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

    def state_path(self, method: str, stage: str) -> Path:
        return self.run_dir / "state" / f"{file_stem(method)}.{stage}.pt"

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
            name=f"{method} {stage}",
            before_step=before_step,
            checkpoint=self.state_path(method, stage),
            checkpoint_minutes=self.config.checkpoint_minutes,
            metrics_log=self.run_dir / "metrics.jsonl",
            show_progress=self.show_progress,
            on_epoch_end=self.tracker.hook(stage),
        ).summary()

    def learn_merge(
        self, method: str, settings: ProbeSettings
    ) -> tuple[nn.Module, dict[str, Any] | None]:
        """The merge of every source (trained per `settings`), baked into a plain model, and
        the probe stage's summary (None for an untrained merge)."""
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
            checkpoint=self.state_path(method, "probe"),
            checkpoint_minutes=c.checkpoint_minutes,
            metrics_log=self.run_dir / "metrics.jsonl",
            report_dir=self.run_dir if settings.trains else None,
            show_progress=self.show_progress,
            name=f"{method} probe",
            on_epoch_end=self.tracker.hook("probe"),
        )
        return learned.model, learned.fit.summary() if learned.fit is not None else None

    def finetune(self, model: nn.Module, method: str) -> dict[str, Any]:
        c = self.config
        train, val, _ = self.loaders()
        settings = c.ft
        hook = None if c.inmerge is None else training_hook(c.inmerge, c.seed)
        return self.stage(model, method, "ft", settings, train, val, hook)


def _ft(ctx: RunContext, method: str, source: str) -> tuple[nn.Module, dict[str, Any]]:
    model = ctx.runtime.model(_with_backbone(ctx.new_model(), ctx.sources[source]))
    return model, {"ft": ctx.finetune(model, method)}


def _lp_ft(ctx: RunContext, method: str, source: str) -> tuple[nn.Module, dict[str, Any]]:
    """LP on features cached once from the frozen backbone (no augmentation), then FT."""
    c = ctx.config
    model = ctx.runtime.model(_with_backbone(ctx.new_model(), ctx.sources[source]))
    backbone, head = split_head(model)
    start = time.perf_counter()
    in_order = BatchLoader(ctx.task.train, c.eval_batch_size)
    train_x, train_y = extract_features(backbone, in_order, ctx.runtime)
    val_x, val_y = extract_features(backbone, ctx.loaders()[1], ctx.runtime)
    feature_seconds = time.perf_counter() - start
    del backbone
    lp = ctx.stage(
        head,
        method,
        "lp",
        c.lp,
        TensorBatches(train_x, train_y, c.batch_size, shuffle=True, seed=c.seed),
        TensorBatches(val_x, val_y, c.eval_batch_size, shuffle=False),
    )
    lp["seconds"] += feature_seconds
    return model, {"lp": lp, "ft": ctx.finetune(model, method)}


def _average_ft(ctx: RunContext, method: str, _: str) -> tuple[nn.Module, dict[str, Any]]:
    model, _ = ctx.learn_merge(method, UNIFORM)
    return model, {"ft": ctx.finetune(model, method)}


def _medmerge(ctx: RunContext, method: str, _: str) -> tuple[nn.Module, dict[str, Any]]:
    model, probe = ctx.learn_merge(method, ctx.config.merge)
    stages = {"probe": probe} if probe is not None else {}
    stages["ft"] = ctx.finetune(model, method)
    return model, stages


def _with_backbone(model: nn.Module, backbone: StateDict) -> nn.Module:
    state = model.state_dict()
    state.update(backbone)
    model.load_state_dict(state)
    return model


Pipeline = Callable[[RunContext, str, str], tuple[nn.Module, dict[str, Any]]]
PIPELINE_FUNCTIONS: dict[str, Pipeline] = {
    "ft": _ft,
    "lp_ft": _lp_ft,
    "average_ft": _average_ft,
    "medmerge": _medmerge,
}


def planned_methods(pipelines: Sequence[str], sources: Sequence[str]) -> list[tuple[str, str, str]]:
    """(method id, pipeline, source) in run order: per-source baselines, then merges."""
    plan = []
    for pipeline in pipelines:
        if pipeline in ("ft", "lp_ft"):
            plan += [(f"{pipeline}:{s}", pipeline, s) for s in sources]
        else:
            plan.append((pipeline, pipeline, ""))
    return plan


def file_stem(method: str) -> str:
    """A method id as a file name: no ':', which SMB and Windows shares reject."""
    return method.replace(":", "_")


# Config keys that cannot change a finished method's result, so a run may resume under new
# values. Every method starts from the config's seed, so adding or dropping pipelines leaves
# the others' results as they were.
RESUMABLE_KEYS = frozenset({"device", "checkpoint_minutes", "tracking", "pipelines"})


def check_run_dir(config: ExperimentConfig) -> Path:
    """The run folder, if an existing one was made by the same config (reads only)."""
    run_dir = Path(config.output_dir) / config.name
    saved = run_dir / "config.yaml"
    resolved = dump_config(config)
    if saved.exists() and saved.read_text(encoding="utf-8") != resolved:
        before = yaml.safe_load(saved.read_text(encoding="utf-8")) or {}
        now = yaml.safe_load(resolved)
        differ = sorted(key for key, _, _ in differences(before, now)) or ["?"]
        differ = [key for key in differ if key not in RESUMABLE_KEYS]
        if not differ:  # only keys that cannot change a result: resume under the new ones
            return run_dir
        raise InputError(
            f"{saved}: this run folder was made by a different config ({', '.join(differ)} "
            "differ); change `name` or delete the folder"
        )
    old_state = sorted((run_dir / "state").glob("*.done.pt")) + sorted(
        (run_dir / "state").glob("*.ckpt.pt")
    )
    if old_state:
        raise InputError(
            f"{old_state[0]}: this run folder was made by an earlier version, whose stage files "
            "this one cannot resume; change `name` or delete the folder"
        )
    return run_dir


def prepare_run_dir(config: ExperimentConfig) -> Path:
    """Create the run folder, or check that an existing one was made by the same config; each
    start appends the software it runs on to environment.jsonl."""
    run_dir = check_run_dir(config)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", dump_config(config))
    append_jsonl(run_dir / "environment.jsonl", environment())
    return run_dir


def _readable(path: Path) -> bool:
    try:
        load_torch_file(path, "unreadable checkpoint")
    except InputError:
        log.warning("%s is missing or unreadable: evaluating its method again", path)
        return False
    return True


def load_results(run_dir: Path) -> dict[str, Any]:
    import json

    path = run_dir / "results.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def run_experiment(
    config: ExperimentConfig, *, task: TaskData | None = None, show_progress: bool = True
) -> dict[str, Any]:
    """Run every planned method (skipping ones already finished) and return results.json."""
    # Everything that can be wrong (config, device, data, architecture, sources) is found
    # before the run folder is touched, so a typo never leaves a folder behind.
    check_run_dir(config)
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
        run_dir = prepare_run_dir(config)
        for staged in sorted(Path(staging).iterdir()):
            atomic_write_text(run_dir / staged.name, staged.read_text(encoding="utf-8"))
    ctx = RunContext(config, task, sources, runtime, run_dir, show_progress)
    results = load_results(run_dir)
    for method, pipeline, source in planned_methods(config.pipelines, list(config.sources)):
        if method in results and _readable(run_dir / "checkpoints" / f"{file_stem(method)}.pt"):
            continue  # finished; a lost or truncated checkpoint is trained again
        seed_everything(config.seed)
        start = time.perf_counter()
        file_name = file_stem(method)
        tracked = open_tracker(config.tracking, run_dir / "tensorboard" / file_name)
        with closing(tracked) as tracker:
            method_ctx = dataclasses.replace(ctx, tracker=tracker)
            model, stages = PIPELINE_FUNCTIONS[pipeline](method_ctx, method, source)
        logits, labels = predict(model, ctx.loaders()[2], runtime)
        test = scored(logits, labels, task.multilabel)
        probs = probabilities(logits, task.multilabel)
        atomic_savez(
            run_dir / "predictions" / f"{file_name}.npz",
            {
                "probabilities": probs.astype(np.float32),
                "labels": labels,
                "ids": task.test.ids if task.test.ids is not None else np.arange(len(labels)),
            },
        )
        save_checkpoint(
            run_dir / "checkpoints" / f"{file_name}.pt",
            model,
            config.model.arch,
            method=method,
            num_classes=task.num_classes,
            in_channels=task.in_channels,
            **usage_record(task, run_dir),  # preprocessing, classes: what evaluate/export read
        )
        results[method] = {
            "method": method,
            "pipeline": pipeline,
            "source": source,
            "test": test,
            "stages": stages,
            "seconds": time.perf_counter() - start,
        }
        if not task.multilabel:
            clinical = clinical_report(probs, labels, task.class_names)
            results[method]["clinical"] = clinical
            write_confusion_figure(run_dir / "confusion" / f"{file_name}.png", clinical, method)
        atomic_write_json(run_dir / "results.json", results)
        for stage_file in (run_dir / "state").glob(f"{file_name}.*.pt"):
            stage_file.unlink()  # the method is done: its best model is in checkpoints/
    return results


def write_confusion_figure(path: Path, clinical: dict[str, Any], method: str) -> None:
    """The clinical report's confusion matrix as a PNG (counts and row-normalised); skipped
    with a warning without matplotlib (the `plots` extra), like the other figures."""
    from medmerge_core.report import method_label, plot_confusion_matrix

    try:
        plot_confusion_matrix(
            clinical["confusion_matrix"],
            clinical["classes"],
            path,
            title=f"{method_label(method)}: test set",
        )
    except RuntimeError as exc:
        log.warning("no %s: %s", path.name, exc)
