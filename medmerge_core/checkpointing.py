"""A stage's record (`FitResult`) and its checkpoint, apart from the loop so `train` stays short.

`StageCheckpoint` (after timm's `CheckpointSaver`) owns the file of one `train.fit` stage: it
loads it, saves it rolling (all the training state, at most every N minutes) and saves it
finished (only the best weights and the record). Every write is atomic (`io.atomic_torch_save`).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medmerge_core.io import atomic_torch_save, load_torch_file

StateDict = dict[str, torch.Tensor]


@dataclass
class FitResult:
    best_epoch: int
    best_val: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)  # per epoch, skipped_steps too
    seconds: float = 0.0  # training time, summed over resumed runs
    skipped_steps: int = 0  # steps skipped for a non-finite loss or gradient (see TrainStep)

    def add(self, record: dict[str, Any], val: dict[str, float]) -> bool:
        """Keep an epoch's record (with its validation metrics `val`); True when it is the best
        so far by validation macro-F1 (the first of equals)."""
        self.history.append(record)
        self.skipped_steps += record["skipped_steps"]
        if self.best_epoch < 0 or val["macro_f1"] > self.best_val["macro_f1"]:
            self.best_epoch, self.best_val = record["epoch"], val
            return True
        return False

    def summary(self) -> dict[str, Any]:
        return {
            "best_epoch": self.best_epoch,
            "val": self.best_val,
            "seconds": self.seconds,
            "skipped_steps": self.skipped_steps,
            # optimiser steps attempted, so a study can put every method's budget side by side
            "steps": sum(record.get("steps", 0) for record in self.history),
        }


def rng_state() -> dict[str, Any]:
    """The global torch RNGs (CPU, and every GPU's when present), for an exact resume."""
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


@dataclass
class Resumed:
    """Where a stage starts: its record so far, its best weights and its first epoch to train
    (`finished`: nothing is left to train, the model already holds its best weights)."""

    result: FitResult
    best_state: StateDict
    start: int = 0
    finished: bool = False


class StageCheckpoint:
    """The resume file of one stage (None: no file, every method does nothing).

    Rolling: the full state (model, optimiser, scaler, RNG, best weights, record; about four
    models' worth), at most every `minutes` of training (0: after every epoch). Finished: the
    best weights and the record only. A stage resumed from a rolling one continues with the same
    RNG, so it ends bit for bit where an uninterrupted one does (CPU).
    """

    def __init__(
        self,
        path: Path | None,
        minutes: float,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
    ) -> None:
        self.path, self.minutes = path, minutes
        self.model, self.optimizer, self.scaler = model, optimizer, scaler
        self.saved_at = time.monotonic()

    def load(self, map_location: Any) -> Resumed:
        """Load the saved state into the model, optimiser, scaler and the global RNGs; without a
        file, a fresh start whose best weights so far are the model's own."""
        if self.path is None or not self.path.exists():
            fresh = FitResult(best_epoch=-1, best_val={})
            resumed = Resumed(fresh, copy.deepcopy(self.model.state_dict()))
        else:
            resumed = self._load(map_location)
        self.saved_at = time.monotonic()  # the interval counts from the start of this attempt
        return resumed

    def _load(self, map_location: Any) -> Resumed:
        assert self.path is not None
        saved = load_torch_file(
            self.path,
            "unreadable training checkpoint",
            "delete it to train this stage again",
            map_location=map_location,
        )
        self.model.load_state_dict(saved["model"])
        result = FitResult(
            saved["best_epoch"],
            saved["best_val"],
            saved["history"],
            saved.get("seconds", 0.0),
            saved.get("skipped_steps", 0),  # absent from checkpoints of earlier versions
        )
        if "rng" in saved:  # absent from checkpoints of earlier versions
            restore_rng(saved["rng"])
        if saved.get("finished", False):
            return Resumed(result, saved["model"], finished=True)
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scaler.load_state_dict(saved["scaler"])
        return Resumed(result, saved["best_state"], saved["epoch"] + 1)

    def save_if_due(self, epoch: int, best_state: StateDict, result: FitResult) -> None:
        """The rolling save after `epoch`, when `minutes` have passed since the last one."""
        due = time.monotonic() - self.saved_at >= 60 * self.minutes
        if self.path is None or not due:
            return
        self.saved_at = time.monotonic()
        rolling = {
            "epoch": epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "best_state": best_state,
        }
        atomic_torch_save({**rolling, **_record(result)}, self.path)

    def save_finished(self, best_state: StateDict, result: FitResult) -> None:
        """The finished stage: a later `load` only puts its best weights back."""
        if self.path is not None:
            finished = {"finished": True, "model": best_state}
            atomic_torch_save({**finished, **_record(result)}, self.path)


def _record(result: FitResult) -> dict[str, Any]:
    """What both a rolling and a finished stage checkpoint keep besides the weights."""
    return {
        "rng": rng_state(),
        "best_epoch": result.best_epoch,
        "best_val": result.best_val,
        "history": result.history,
        "seconds": result.seconds,
        "skipped_steps": result.skipped_steps,
    }
