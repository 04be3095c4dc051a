"""The run folder of a single-site experiment, for the run that writes it and every later reader.

A run folder holds: config.yaml (resolved), environment.jsonl (the software of each start),
the data's split files, metrics.jsonl (per epoch), results.json (per method, rewritten
atomically after each method), coefficients.npz + coefficient_summary.json + coefficients.png
(the MedMerge probe's report), checkpoints/<method>.pt (best model, with what a user of it
needs: `usage_record`), predictions/<method>.npz (test-set probabilities, labels and image ids),
confusion/<method>.png (single-label tasks), tensorboard/<method>/ (with `tracking:
tensorboard`) and, while a method runs, state/ (one file per stage: the rolling resume
checkpoint, written at most every `checkpoint_minutes`, then the finished stage; deleted once
the method's best model is saved, so nothing is kept twice). File names hold a method id as
`file_stem` writes it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from medmerge_core.data.base import TaskData, preprocessing_record
from medmerge_core.errors import InputError
from medmerge_core.experiment.config import ExperimentConfig, dump_config
from medmerge_core.io import (
    append_jsonl,
    atomic_savez,
    atomic_write_json,
    atomic_write_text,
    load_torch_file,
    read_jsonl,
)
from medmerge_core.metrics import clinical_report
from medmerge_core.models import save_checkpoint
from medmerge_core.provenance import environment
from medmerge_core.report import method_label, plot_confusion_matrix
from medmerge_core.settings import differences
from medmerge_core.train import probabilities, scored

log = logging.getLogger(__name__)

# Config keys that cannot change a finished method's result, so a run may resume under new
# values. Every method starts from the config's seed, so adding or dropping pipelines leaves
# the others' results as they were.
RESUMABLE_KEYS = frozenset({"device", "checkpoint_minutes", "tracking", "pipelines"})


def file_stem(method: str) -> str:
    """A method id as a file name: no ':', which SMB and Windows shares reject."""
    return method.replace(":", "_")


class ExperimentRun:
    """One run folder: where each file lies, whether a config may resume it, what a finished
    method leaves there, and what a later reader (`medmerge evaluate` / `export`, the study
    drivers) finds in it."""

    def __init__(self, path: Path) -> None:
        self.dir = Path(path)

    @classmethod
    def of(cls, config: ExperimentConfig) -> ExperimentRun:
        """The folder `config` runs in (nothing is read)."""
        return cls(Path(config.output_dir) / config.name)

    # -- the layout ------------------------------------------------------------------------

    @property
    def metrics_path(self) -> Path:
        return self.dir / "metrics.jsonl"

    def state_path(self, method: str, stage: str) -> Path:
        return self.dir / "state" / f"{file_stem(method)}.{stage}.pt"

    def checkpoint_path(self, method: str) -> Path:
        return self.dir / "checkpoints" / f"{file_stem(method)}.pt"

    def tensorboard_dir(self, method: str) -> Path:
        return self.dir / "tensorboard" / file_stem(method)

    # -- starting and resuming -------------------------------------------------------------

    @classmethod
    def check(cls, config: ExperimentConfig) -> ExperimentRun:
        """The run folder of `config`, if an existing one was made by the same config (reads
        only)."""
        run = cls.of(config)
        saved = run.dir / "config.yaml"
        resolved = dump_config(config)
        if saved.exists() and saved.read_text(encoding="utf-8") != resolved:
            before = yaml.safe_load(saved.read_text(encoding="utf-8")) or {}
            now = yaml.safe_load(resolved)
            differ = sorted(key for key, _, _ in differences(before, now)) or ["?"]
            differ = [key for key in differ if key not in RESUMABLE_KEYS]
            if not differ:  # only keys that cannot change a result: resume under the new ones
                return run
            raise InputError(
                f"{saved}: this run folder was made by a different config ({', '.join(differ)} "
                "differ); change `name` or delete the folder"
            )
        state = run.dir / "state"
        old_state = sorted(state.glob("*.done.pt")) + sorted(state.glob("*.ckpt.pt"))
        if old_state:
            raise InputError(
                f"{old_state[0]}: this run folder was made by an earlier version, whose stage "
                "files this one cannot resume; change `name` or delete the folder"
            )
        return run

    @classmethod
    def prepare(cls, config: ExperimentConfig, staging: Path | None = None) -> ExperimentRun:
        """Create the run folder, or check that an existing one was made by the same config;
        each start writes the resolved config, appends the software it runs on to
        environment.jsonl and copies in the files staged in `staging` (the data's splits)."""
        run = cls.check(config)
        run.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run.dir / "config.yaml", dump_config(config))
        append_jsonl(run.dir / "environment.jsonl", environment())
        for staged in sorted(staging.iterdir()) if staging is not None else []:
            atomic_write_text(run.dir / staged.name, staged.read_text(encoding="utf-8"))
        return run

    def finished(self, method: str, results: Mapping[str, Any]) -> bool:
        """Whether `method` is done: in results.json, its checkpoint readable (a lost or
        truncated one means training it again)."""
        if method not in results:
            return False
        path = self.checkpoint_path(method)
        try:
            load_torch_file(path, "unreadable checkpoint")
        except InputError:
            log.warning("%s is missing or unreadable: evaluating its method again", path)
            return False
        return True

    # -- what a finished method leaves -----------------------------------------------------

    def usage_record(self, task: TaskData) -> dict[str, Any]:
        """The checkpoint fields a user of a final model needs: its preprocessing, its classes
        and the software that made it (the last environment.jsonl entry)."""
        return {
            "preprocessing": preprocessing_record(task.image_size, task.in_channels),
            "class_names": [str(c) for c in task.class_names],
            "multilabel": bool(task.multilabel),
            "software": self.software(),
        }

    def save_method(
        self,
        results: dict[str, Any],
        method: str,
        *,
        pipeline: str,
        source: str,
        stages: dict[str, Any],
        model: nn.Module,
        arch: str,
        task: TaskData,
        logits: torch.Tensor,
        labels: np.ndarray,
        started: float,
    ) -> None:
        """Everything a finished method leaves, in this order: its test predictions, its best
        model (with the usage record that evaluate and export read), its results.json entry
        (also added to `results`; with the clinical report and confusion figure of a
        single-label task), and last the removal of its stage files from state/."""
        name = file_stem(method)
        test = scored(logits, labels, task.multilabel)
        probs = probabilities(logits, task.multilabel)
        atomic_savez(
            self.dir / "predictions" / f"{name}.npz",
            {
                "probabilities": probs.astype(np.float32),
                "labels": labels,
                "ids": task.test.ids if task.test.ids is not None else np.arange(len(labels)),
            },
        )
        save_checkpoint(
            self.checkpoint_path(method),
            model,
            arch,
            method=method,
            num_classes=task.num_classes,
            in_channels=task.in_channels,
            **self.usage_record(task),
        )
        results[method] = {
            "method": method,
            "pipeline": pipeline,
            "source": source,
            "test": test,
            "stages": stages,
            "seconds": time.perf_counter() - started,
        }
        if not task.multilabel:
            clinical = clinical_report(probs, labels, task.class_names)
            results[method]["clinical"] = clinical
            self._confusion_figure(method, clinical)
        atomic_write_json(self.dir / "results.json", results)
        for stage_file in (self.dir / "state").glob(f"{name}.*.pt"):
            stage_file.unlink()  # the method is done: its best model is in checkpoints/

    def save_derived(
        self, results: dict[str, Any], method: str, pipeline: str, entry: Mapping[str, Any]
    ) -> None:
        """A derived method's results.json entry (it has no model of its own)."""
        results[method] = {"method": method, "pipeline": pipeline, "source": "",
                           "derived": True, **entry}  # fmt: skip
        atomic_write_json(self.dir / "results.json", results)

    def probabilities(self, method: str) -> tuple[np.ndarray, np.ndarray]:
        """The test probabilities and labels that a finished method saved."""
        path = self.dir / "predictions" / f"{file_stem(method)}.npz"
        try:
            with np.load(path) as saved:
                return saved["probabilities"], saved["labels"]
        except (OSError, KeyError, ValueError) as exc:
            raise InputError(f"{path}: unreadable predictions ({exc})") from exc

    def _confusion_figure(self, method: str, clinical: Mapping[str, Any]) -> None:
        """The clinical report's confusion matrix as a PNG (counts and row-normalised);
        skipped with a warning without matplotlib (the `plots` extra), like the other
        figures."""
        path = self.dir / "confusion" / f"{file_stem(method)}.png"
        try:
            plot_confusion_matrix(
                clinical["confusion_matrix"],
                clinical["classes"],
                path,
                title=f"{method_label(method)}: test set",
            )
        except RuntimeError as exc:
            log.warning("no %s: %s", path.name, exc)

    # -- what a later reader finds ---------------------------------------------------------

    @classmethod
    def holding(cls, checkpoint: Path) -> ExperimentRun | None:
        """The run folder a checkpoint file lies in (checkpoints/ beside a config.yaml)."""
        parent = Path(checkpoint).parent
        in_run = parent.name == "checkpoints" and (parent.parent / "config.yaml").is_file()
        return cls(parent.parent) if in_run else None

    def results(self) -> dict[str, Any]:
        """results.json: {method id: its entry}, {} before the first method finished."""
        path = self.dir / "results.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}

    def models(self) -> list[str]:
        """The method id of every saved model, in results.json's order; a checkpoint that
        results.json does not list is named by its file stem."""
        folder = self.dir / "checkpoints"
        stems = sorted(p.stem for p in folder.glob("*.pt")) if folder.is_dir() else []
        try:
            recorded = list(self.results())
        except (OSError, ValueError):
            recorded = []
        ids = [m for m in recorded if file_stem(m) in stems]
        return ids + [s for s in stems if s not in {file_stem(m) for m in ids}]

    def config(self) -> dict[str, Any]:
        """config.yaml as a plain mapping ({} when it is missing)."""
        path = self.dir / "config.yaml"
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else {}
        except yaml.YAMLError as exc:
            raise InputError(f"{path}: invalid YAML ({type(exc).__name__})") from exc
        return data if isinstance(data, dict) else {}

    def classes(self, method: str) -> list[str] | None:
        """A method's class names from its clinical report (recorded before checkpoints had
        them), or None."""
        try:
            clinical = self.results().get(method, {}).get("clinical") or {}
        except (OSError, ValueError, AttributeError):
            return None
        return clinical.get("classes")

    def software(self) -> dict[str, Any] | None:
        """The software of the run's last start (environment.jsonl), or None."""
        entries = read_jsonl(self.dir / "environment.jsonl")
        if not entries:
            return None
        packages = entries[-1].get("packages") or {}
        return {
            "medmerge-federation": packages.get("medmerge-federation"),
            "git_commit": entries[-1].get("git_commit"),
            "torch": packages.get("torch"),
            "torchvision": packages.get("torchvision"),
        }
