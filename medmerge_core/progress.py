"""What a person watching a training stage sees: a rich bar per batch in a terminal, plain
periodic lines in a log file (nohup, a batch scheduler)."""

from __future__ import annotations

import datetime
import time
from collections.abc import Iterable
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def progress_bar(enabled: bool = True, console: Console | None = None) -> Progress:
    """The bar of a `fit` stage, on `console` (default: stdout; a terminal or not decides
    between the bar and plain lines, see `StageProgress`)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        transient=True,
        disable=not enabled,
        console=console,
    )


PLAIN_LINE_SECONDS = 30.0  # in a log file, a progress line at most this often (and per epoch)


def batch_count(batches: Iterable[Any]) -> int | None:
    try:
        return len(batches)  # type: ignore[arg-type]
    except TypeError:
        return None


def _clock(seconds: float | None) -> str:
    return "?" if seconds is None else str(datetime.timedelta(seconds=round(seconds)))


class StageProgress:
    """What a person watching one `fit` stage sees: in a terminal, the bar advances per batch
    (stage, epoch, loss, rate); in a log file (stdout not a terminal: nohup, a batch scheduler)
    a plain line at most every `every` seconds and at the end of each epoch.

    Per batch it only counts and reads the clock (plus a bar update in a terminal), from values
    the loop already has on the host, so it adds no device sync.
    """

    def __init__(
        self,
        progress: Progress,
        name: str,
        epochs: int,
        batches_per_epoch: int | None,
        steps_limit: int | None,
        start_epoch: int,
        every: float | None = None,
    ) -> None:
        self.progress, self.name, self.epochs = progress, name, epochs
        self.every = PLAIN_LINE_SECONDS if every is None else every  # read at call time: tests
        self.per_epoch = batches_per_epoch
        self.steps_limit = steps_limit
        self.mode = (
            "off" if progress.disable else "bar" if progress.console.is_terminal else "lines"
        )
        total = None
        if batches_per_epoch is not None:
            total = epochs * batches_per_epoch
            if steps_limit is not None:
                total = min(total, steps_limit)
        self.total_steps = total
        done = start_epoch * (batches_per_epoch or 0)  # a resumed stage's finished epochs
        self.task = progress.add_task(name, total=total, completed=done, status="")
        self.began = time.perf_counter()
        self.steps_done = 0  # in this call (a resumed run's earlier steps are not timed)
        self.last_line = self.began
        self.epoch, self.step, self.images, self.loss = start_epoch, 0, 0, 0.0
        self.epoch_began, self.trained = self.began, 0.0

    def epoch_steps(self, epoch: int) -> int | None:
        """Optimiser steps in `epoch`: a full epoch, or what is left of a step budget."""
        if self.per_epoch is None:
            return None
        if self.steps_limit is None:
            return self.per_epoch
        return max(0, min(self.per_epoch, self.steps_limit - epoch * self.per_epoch))

    def start_epoch(self, epoch: int) -> None:
        self.epoch, self.step, self.images, self.loss = epoch, 0, 0, 0.0
        self.epoch_began, self.trained = time.perf_counter(), 0.0
        if self.mode == "bar":
            self.progress.update(self.task, description=f"{self.name} {self._epoch_text()}")

    def batch(self, images: int, running_loss: float) -> None:
        if self.mode == "off":
            return
        self.step += 1
        self.steps_done += 1
        self.images += images
        self.loss = running_loss
        now = time.perf_counter()
        self.trained = now - self.epoch_began  # so validation does not count in the rate
        if self.mode == "bar":
            status = f"loss {running_loss:.3f} {self._rate():.0f} img/s"
            self.progress.update(self.task, advance=1, status=status)
        elif now - self.last_line >= self.every:
            self._line()

    def end_epoch(self, val_f1: float) -> None:
        if self.mode == "bar":
            self.progress.update(self.task, status=f"loss {self.loss:.3f} val F1 {val_f1:.3f}")
        elif self.mode == "lines":
            took = time.perf_counter() - self.epoch_began
            self._line(f", val F1 {val_f1:.3f} ({took:.1f} s)")

    def _epoch_text(self) -> str:
        return f"epoch {self.epoch + 1}/{self.epochs}"

    def _rate(self) -> float:
        """Training images per second this epoch (data loading included)."""
        return self.images / max(self.trained, 1e-9)

    def _eta(self) -> float | None:
        """Seconds left in the stage at this call's pace (validation included)."""
        if self.total_steps is None or self.steps_done == 0 or self.per_epoch is None:
            return None
        done = self.epoch * self.per_epoch + self.step
        per_step = (time.perf_counter() - self.began) / self.steps_done
        return max(self.total_steps - done, 0) * per_step

    def _line(self, tail: str = "") -> None:
        self.last_line = time.perf_counter()
        of = self.epoch_steps(self.epoch)
        self.progress.console.print(
            f"{self.name}: {self._epoch_text()} loss {self.loss:.3f}, "
            f"step {self.step}/{'?' if of is None else of}, {self._rate():.0f} img/s, "
            f"ETA {_clock(self._eta())}{tail}",
            highlight=False,
            soft_wrap=True,
        )
