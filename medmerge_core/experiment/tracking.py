"""Optional experiment tracking (the `tracking` extra): TensorBoard event files per method.

A tracker reaches training only through `fit`'s `on_epoch_end` hook, so the loop never
branches on whether anything is tracked, and the package is checked before a run folder is
created (`check_tracking`), so asking for it without installing it leaves nothing behind.
"""

from __future__ import annotations

import numbers
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
from torch import nn

from medmerge_core.errors import InputError
from medmerge_core.merge import MergedModel
from medmerge_core.train import EpochHook

TrackingKind = Literal["none", "tensorboard"]
TRACKING_KINDS: tuple[str, ...] = typing.get_args(TrackingKind)
INSTALL_HINT = "pip install -e '.[tracking]'"


class Tracker(Protocol):
    def hook(self, stage: str) -> EpochHook | None:
        """The `on_epoch_end` hook for one stage of the method (None: nothing to call)."""
        ...

    def close(self) -> None: ...


class NoTracker:
    """`tracking: none`: no hook at all, so `fit` runs exactly as untracked."""

    def hook(self, stage: str) -> EpochHook | None:
        return None

    def close(self) -> None:
        pass


def summary_writer_class() -> type:
    """torch's SummaryWriter, or a one-line InputError saying how to install tensorboard."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise InputError(f"tracking: tensorboard is not installed; {INSTALL_HINT}") from None
    return SummaryWriter


def check_tracking(kind: str) -> None:
    """Fail on a tracker whose package is missing, before anything is written (the value
    itself is checked where it is declared, in ExperimentConfig)."""
    if kind == "tensorboard":
        summary_writer_class()


def source_coefficients(
    coefficients: Mapping[str, np.ndarray], source_names: Sequence[str]
) -> dict[str, np.ndarray]:
    """Each source's coefficient of every kernel (all merged weights), flattened."""
    weights = [np.asarray(v) for k, v in coefficients.items() if k.endswith(".weight")]
    return {
        name: np.concatenate([w[i].ravel() for w in weights]) for i, name in enumerate(source_names)
    }


class TensorBoardTracker:
    """One method's event files: per stage and epoch the train loss and every validation
    metric (`<stage>/train_loss`, `<stage>/val_macro_f1`, ...), and for the MedMerge probe a
    histogram of each source's current coefficients (`<stage>/coefficients/<source>`)."""

    def __init__(self, log_dir: Path) -> None:
        self.writer = summary_writer_class()(log_dir=str(log_dir))

    def hook(self, stage: str) -> EpochHook:
        def on_epoch_end(record: dict[str, Any], model: nn.Module) -> None:
            self.log_epoch(stage, record, model)

        return on_epoch_end

    def log_epoch(self, stage: str, record: Mapping[str, Any], model: nn.Module) -> None:
        epoch = int(record["epoch"])
        for key, value in record.items():
            if key not in ("stage", "epoch") and isinstance(value, numbers.Real):
                self.writer.add_scalar(f"{stage}/{key}", float(value), epoch)
        if isinstance(model, MergedModel):
            arrays = model.coefficient_arrays()
            for name, values in source_coefficients(arrays, model.source_names).items():
                self.writer.add_histogram(f"{stage}/coefficients/{name}", values, epoch)
        self.writer.flush()  # visible in a running TensorBoard after every epoch

    def close(self) -> None:
        self.writer.close()


def open_tracker(kind: str, log_dir: Path) -> Tracker:
    """The tracker for one method, writing under `log_dir` (`check_tracking` first)."""
    check_tracking(kind)
    if kind == "tensorboard":
        return TensorBoardTracker(log_dir)
    return NoTracker()
