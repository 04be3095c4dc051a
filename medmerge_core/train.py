"""One training loop for LP, FT and the MedMerge probe, on CPU or GPU.

Device specifics (AMP dtype, channels_last, grad scaling, the CPU bf16 workaround of
`cpu_autocast`) live in a `Runtime` that the loop uses uniformly; the loop never branches on the
device (timm's approach). Split as timm's `train_one_epoch` / `validate` / `CheckpointSaver`,
`fit` composes the one optimiser step (`TrainStep`), `train_one_epoch`, `evaluate` and the stage
checkpoint (`checkpointing.StageCheckpoint`) as its `FitOptions` say. A step whose loss or
gradients are not finite is skipped; `MAX_NONFINITE_STEPS` of them in a row stop the stage.
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medmerge_core import progress as progress_lines
from medmerge_core.checkpointing import FitResult, StageCheckpoint
from medmerge_core.cpu_autocast import cpu_autocast
from medmerge_core.errors import InputError, NonFiniteLossError
from medmerge_core.io import append_jsonl, drop_jsonl
from medmerge_core.metrics import classification_metrics
from medmerge_core.progress import StageProgress
from medmerge_core.settings import CHECKPOINT_MINUTES, StageSettings

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]
StepHook = Callable[[nn.Module, int], None]
AfterStep = Callable[[], None]
# After each epoch: the epoch's record (stage, epoch, train_loss, val_*) and the model in
# training, e.g. to log them to TensorBoard (experiment/tracking.py); it must not change either.
EpochHook = Callable[[dict[str, Any], nn.Module], None]

# A training step whose loss or gradients are not finite is skipped (no optimiser update, the
# norm layers' running statistics put back) and counted, as GradScaler does for fp16 overflow.
# A stage stops with NonFiniteLossError only after this many such steps in a row (or once every
# step of a stage shorter than that was skipped): one bad batch or a transient overflow is
# survived, a diverged run is not trained on for long. 10 is well above the few skips in a row
# that fp16 loss scaling needs at its start (each one halves the scale).
MAX_NONFINITE_STEPS = 10


@dataclass(frozen=True)
class Runtime:
    """Where and how tensors run: device, autocast dtype (None = fp32) and memory format."""

    device: torch.device
    amp_dtype: torch.dtype | None = None
    memory_format: torch.memory_format = torch.contiguous_format

    @classmethod
    def detect(
        cls, device: str = "auto", amp: bool | None = None, channels_last: bool | None = None
    ) -> Runtime:
        """CUDA (with bf16/fp16 AMP and channels_last) when present, else fp32 on CPU."""
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            dev = torch.device(device)
        except RuntimeError:
            raise InputError(
                f"device: unknown '{device}'; expected auto, cpu, cuda or cuda:N"
            ) from None
        if dev.type not in ("cpu", "cuda"):
            raise InputError(f"device: '{device}' is not supported; expected auto, cpu or cuda")
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise InputError(f"device: '{device}' requested but CUDA is not available")
        on_gpu = dev.type == "cuda"
        use_amp = on_gpu if amp is None else amp
        amp_dtype = None
        if use_amp:
            bf16 = on_gpu and torch.cuda.is_bf16_supported()
            amp_dtype = torch.bfloat16 if bf16 or not on_gpu else torch.float16
        use_cl = on_gpu if channels_last is None else channels_last
        fmt = torch.channels_last if use_cl else torch.contiguous_format
        return cls(dev, amp_dtype, fmt)

    def autocast(self) -> AbstractContextManager:
        """Autocast to `amp_dtype` (nothing for fp32). On the CPU, convolutions inside also go
        through `conv2d_without_input_below_stride`, around a oneDNN bf16 weight-gradient bug.
        Wrap the forward only: the backward follows the graph it built."""
        if self.amp_dtype is None:
            return nullcontext()
        if self.device.type == "cpu":
            return cpu_autocast(self.amp_dtype)
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)

    def model(self, model: nn.Module) -> nn.Module:
        """Move to the device; channels_last only for 4-D tensors (conv weights).

        `Module.to(memory_format=...)` would also try 5-D tensors (the probe's per-kernel
        coefficients) and fail, so the format is applied tensor by tensor.
        """
        model = model.to(self.device)
        if self.memory_format != torch.contiguous_format:
            with torch.no_grad():
                for tensor in (*model.parameters(), *model.buffers()):
                    if tensor.ndim == 4:
                        tensor.data = tensor.data.contiguous(memory_format=self.memory_format)
        return model

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=self.memory_format) if x.ndim == 4 else x


EVAL_BATCH_SIZE = 256  # evaluation only: no gradients, so a larger batch than training


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def task_loss(logits: torch.Tensor, labels: torch.Tensor, multilabel: bool) -> torch.Tensor:
    """Cross-entropy, or BCE over observed entries for multi-label (NaN labels are ignored)."""
    logits = logits.float()
    if not multilabel:
        return nn.functional.cross_entropy(logits, labels.long())
    observed = ~torch.isnan(labels)
    target = torch.nan_to_num(labels.float())
    loss = nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return (loss * observed).sum() / observed.sum().clamp_min(1)


@torch.no_grad()
def predict(model: nn.Module, batches: Batches, runtime: Runtime) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels over a loader, in eval mode."""
    was_training = model.training
    model.eval()
    logits, labels = [], []
    for x, y in batches:
        with runtime.autocast():
            out = model(runtime.inputs(x))
        logits.append(out.float().cpu())
        labels.append(y)
    model.train(was_training)
    return torch.cat(logits).numpy(), torch.cat(labels).numpy()


def evaluate(
    model: nn.Module, batches: Batches, runtime: Runtime, multilabel: bool = False
) -> dict[str, float]:
    return scored(*predict(model, batches, runtime), multilabel)


def scored(logits: np.ndarray, labels: np.ndarray, multilabel: bool = False) -> dict[str, float]:
    """Classification metrics and the task loss of predicted logits."""
    metrics = classification_metrics(logits, labels, multilabel)
    metrics["loss"] = float(
        task_loss(torch.from_numpy(logits), torch.from_numpy(labels), multilabel)
    )
    return metrics


def probabilities(logits: np.ndarray, multilabel: bool = False) -> np.ndarray:
    """Softmax over classes, or a sigmoid per label for multi-label tasks."""
    x = torch.from_numpy(logits)
    return (torch.sigmoid(x) if multilabel else torch.softmax(x, dim=1)).numpy()


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


class TrainStep:
    """The one optimiser step of every stage (LP, FT, the probe; CPU or GPU, AMP or not).

    Forward under the runtime's autocast, the task loss in fp32, backward through the grad
    scaler (fp16 only), gradients unscaled and checked, one AdamW step, then `after_step`.
    A step whose loss or gradients are not finite is skipped: no optimiser update, no
    `after_step`, and the running statistics of the norm layers in training mode are put back
    as they were before its forward. It is counted (`skipped`); `MAX_NONFINITE_STEPS` of them
    in a row (`limit`, which `fit` lowers to a shorter stage's step count) raise a one-line
    NonFiniteLossError naming the stage and the first step of the run.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
        runtime: Runtime,
        *,
        multilabel: bool = False,
        name: str = "train",
        after_step: AfterStep | None = None,
        limit: int = MAX_NONFINITE_STEPS,
    ) -> None:
        self.model, self.optimizer, self.scaler, self.runtime = model, optimizer, scaler, runtime
        self.multilabel, self.name, self.after_step = multilabel, name, after_step
        self.limit = max(1, limit)
        self.skipped = 0  # in total
        self.in_a_row = 0
        self.first = ""  # what went wrong where, at the first step of the current run

    def __call__(self, x: torch.Tensor, y: torch.Tensor, epoch: int, step: int) -> float | None:
        """Train on one batch: its loss, or None when the step was skipped."""
        norms = self._norm_statistics()
        saved = [b.clone() for b in norms]
        with self.runtime.autocast():
            logits = self.model(self.runtime.inputs(x))
        loss = task_loss(logits, y.to(self.runtime.device), self.multilabel)
        self.optimizer.zero_grad(set_to_none=True)
        problem = None
        if not torch.isfinite(loss):
            problem = f"loss is {loss.item()}"
        else:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)  # a no-op without fp16 scaling
            if not self._finite_gradients():
                problem = f"loss is {loss.item():.4g} but its gradients are not finite"
                self.scaler.update()  # fp16: a lower scale next time, as after any overflow
        if problem is not None:
            self._skip(norms, saved, problem, epoch, step)
            return None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.after_step is not None:
            self.after_step()
        self.in_a_row = 0
        return float(loss.detach())

    def _norm_statistics(self) -> list[torch.Tensor]:
        """Running statistics that this forward will update (norm layers in training mode)."""
        return [
            buffer
            for module in self.model.modules()
            if isinstance(module, nn.modules.batchnorm._NormBase) and module.training
            for buffer in module.buffers(recurse=False)
        ]

    def _finite_gradients(self) -> bool:
        grads = [
            p.grad for group in self.optimizer.param_groups for p in group["params"]
            if p.grad is not None
        ]  # fmt: skip
        if not grads:
            return True
        # The largest magnitude: NaN if any is NaN, and no overflow of finite values.
        return bool(torch.isfinite(torch.nn.utils.get_total_norm(grads, norm_type=math.inf)))

    def _skip(
        self, norms: list[torch.Tensor], saved: list[torch.Tensor], problem: str, epoch: int,
        step: int,
    ) -> None:  # fmt: skip
        with torch.no_grad():
            for buffer, before in zip(norms, saved, strict=True):
                buffer.copy_(before)
        self.optimizer.zero_grad(set_to_none=True)
        self.skipped += 1
        self.in_a_row += 1
        if self.in_a_row == 1:
            self.first = f"{problem} at epoch {epoch}, step {step}"
        if self.in_a_row >= self.limit:
            raise NonFiniteLossError(
                f"{self.name}: {self.first}; {self.in_a_row} steps in a row were not finite "
                f"and skipped (the limit is {self.limit}); check the inputs or lower the "
                "learning rate"
            )


@dataclass(frozen=True)
class FitOptions:
    """How `fit` names, resumes (`StageCheckpoint`), logs and shows a stage, and what it calls
    after each epoch (`on_epoch_end(record, model)`): nothing here changes what it learns."""

    name: str = "train"
    checkpoint: Path | None = None
    checkpoint_minutes: float = CHECKPOINT_MINUTES
    metrics_log: Path | None = None
    show_progress: bool = True
    on_epoch_end: EpochHook | None = None


def train_one_epoch(
    model: nn.Module,
    batches: Batches,
    train_step: TrainStep,
    epoch: int,
    *,
    limit: int | None = None,
    before_step: StepHook | None = None,
    watch: StageProgress | None = None,
) -> dict[str, Any]:
    """One epoch of `train_step` (at most `limit` steps): its train_loss (mean over the steps
    taken and not skipped; nan when every one was), skipped_steps and steps."""
    model.train()
    set_epoch = getattr(batches, "set_epoch", None)
    if set_epoch is not None:
        set_epoch(epoch)  # the same batch order whether or not this run resumed
    total, count, skipped, taken = 0.0, 0, train_step.skipped, 0
    for step, (x, y) in enumerate(batches):
        if limit is not None and step >= limit:
            break
        taken += 1
        if before_step is not None:
            before_step(model, epoch)
        loss = train_step(x, y, epoch, step)
        if loss is not None:
            total += loss * len(x)
            count += len(x)
        if watch is not None:
            watch.batch(len(x), total / count if count else math.nan)
    train_loss = total / count if count else math.nan
    return {"train_loss": train_loss, "skipped_steps": train_step.skipped - skipped, "steps": taken}


def fit(
    model: nn.Module,
    train_batches: Batches,
    val_batches: Batches,
    stage: StageSettings,
    runtime: Runtime,
    *,
    multilabel: bool = False,
    param_groups: Sequence[dict[str, Any]] | None = None,
    before_step: StepHook | None = None,
    after_step: AfterStep | None = None,
    options: FitOptions = FitOptions(),
) -> FitResult:
    """Train with AdamW; keep the best epoch by validation macro-F1 (`options`: FitOptions).

    `param_groups` gives AdamW's groups (e.g. the probe's coefficients with their own learning
    rate and no decay); by default, every parameter that requires grad with the stage's
    settings. `before_step(model, epoch)` runs before each forward (InMerge), `after_step()`
    after each optimiser step (a projection of the coefficients), so the loop never branches on
    what is attached. Each epoch is `train_one_epoch` then `evaluate` on `val_batches`. Skipped
    steps (`TrainStep`) are counted per epoch (`skipped_steps` in the history) and in all
    (`FitResult.skipped_steps`). Progress: see `StageProgress`.

    The model ends holding its best weights. With `options.checkpoint`, a later call resumes
    after the last saved epoch with the same batch order and RNG, so an interrupted stage ends
    bit for bit where an uninterrupted one does (CPU), having lost at most
    `checkpoint_minutes` of work; a finished stage is just loaded (`StageCheckpoint`).
    """
    o = options
    chosen = [{"params": trainable_parameters(model)}] if param_groups is None else param_groups
    groups = [g for g in chosen if g["params"]]
    if not groups:
        raise InputError(f"{o.name}: nothing to train (no parameter requires grad)")
    optimizer = torch.optim.AdamW(groups, lr=stage.lr, weight_decay=stage.weight_decay)
    scaler = runtime.grad_scaler()
    saver = StageCheckpoint(o.checkpoint, o.checkpoint_minutes, model, optimizer, scaler)
    resumed = saver.load(runtime.device)
    result, best_state, start = resumed.result, resumed.best_state, resumed.start
    if resumed.finished:
        return result
    if o.metrics_log is not None:  # epochs of an interrupted attempt that will run again
        drop_jsonl(
            o.metrics_log, lambda r: r.get("stage") == o.name and r.get("epoch", -1) >= start
        )
    batches_per_epoch = progress_lines.batch_count(train_batches)
    steps_per_epoch = len(train_batches) if stage.steps is not None else 0  # type: ignore[arg-type]
    epochs = stage.num_epochs(steps_per_epoch)
    if stage.steps is not None:
        total_steps: int | None = stage.steps - start * steps_per_epoch
    else:
        total_steps = None if batches_per_epoch is None else (epochs - start) * batches_per_epoch
    train_step = TrainStep(
        model, optimizer, scaler, runtime, multilabel=multilabel, name=o.name,
        after_step=after_step, limit=min(MAX_NONFINITE_STEPS, total_steps or MAX_NONFINITE_STEPS),
    )  # fmt: skip
    with progress_lines.progress_bar(o.show_progress) as progress:
        watch = StageProgress(progress, o.name, epochs, batches_per_epoch, stage.steps, start)
        for epoch in range(start, epochs):
            began = time.perf_counter()
            watch.start_epoch(epoch)
            limit = None if stage.steps is None else stage.steps - epoch * steps_per_epoch
            trained = train_one_epoch(model, train_batches, train_step, epoch, limit=limit,
                                      before_step=before_step, watch=watch)  # fmt: skip
            val = evaluate(model, val_batches, runtime, multilabel)
            record = {"stage": o.name, "epoch": epoch, **trained}
            record.update({f"val_{k}": v for k, v in val.items()})
            if result.add(record, val):
                best_state = copy.deepcopy(model.state_dict())
            result.seconds += time.perf_counter() - began
            if o.metrics_log is not None:
                append_jsonl(o.metrics_log, record)
            if o.on_epoch_end is not None:
                o.on_epoch_end(dict(record), model)
            if epoch + 1 < epochs:
                saver.save_if_due(epoch, best_state, result)
            watch.end_epoch(val["macro_f1"])
    model.load_state_dict(best_state)
    saver.save_finished(best_state, result)
    return result
