"""One training loop for LP, FT and the MedMerge probe, on CPU or GPU.

Device specifics (AMP dtype, channels_last, grad scaling) live in a `Runtime` that the loop
uses uniformly; the loop itself never branches on the device (timm's approach).
"""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medmerge_core import progress as progress_lines
from medmerge_core.errors import InputError, NonFiniteLossError
from medmerge_core.io import append_jsonl, atomic_torch_save, drop_jsonl, load_torch_file
from medmerge_core.metrics import classification_metrics
from medmerge_core.settings import CHECKPOINT_MINUTES, StageSettings

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]
StepHook = Callable[[nn.Module, int], None]
AfterStep = Callable[[], None]
# After each epoch: the epoch's record (stage, epoch, train_loss, val_*) and the model in
# training, e.g. to log them to TensorBoard (tracking.py); it must not change either.
EpochHook = Callable[[dict[str, Any], nn.Module], None]


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
        if self.amp_dtype is None:
            return nullcontext()
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


@dataclass
class FitResult:
    best_epoch: int
    best_val: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0  # training time, summed over resumed runs

    def summary(self) -> dict[str, Any]:
        return {"best_epoch": self.best_epoch, "val": self.best_val, "seconds": self.seconds}


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


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def fit(
    model: nn.Module,
    train_batches: Batches,
    val_batches: Batches,
    stage: StageSettings,
    runtime: Runtime,
    *,
    multilabel: bool = False,
    name: str = "train",
    param_groups: Sequence[dict[str, Any]] | None = None,
    before_step: StepHook | None = None,
    after_step: AfterStep | None = None,
    checkpoint: Path | None = None,
    checkpoint_minutes: float = CHECKPOINT_MINUTES,
    metrics_log: Path | None = None,
    show_progress: bool = True,
    on_epoch_end: EpochHook | None = None,
) -> FitResult:
    """Train with AdamW; keep the best epoch by validation macro-F1.

    `param_groups` gives AdamW's groups (e.g. the probe's coefficients with their own learning
    rate and no decay); by default, every parameter that requires grad with the stage's
    settings. `before_step(model, epoch)` runs before each forward (InMerge), `after_step()`
    after each optimiser step (a projection of the coefficients), `on_epoch_end(record, model)`
    after each epoch's validation (tracking), so the loop never branches on what is attached.
    Progress: see `StageProgress`; `show_progress=False` prints nothing.

    The model ends holding its best weights. With `checkpoint`, the full state (model,
    optimiser, scaler, RNG, best weights, history; about four models' worth) is written
    atomically after an epoch once `checkpoint_minutes` of training have passed since the last
    one (0: after every epoch); a later call resumes after the last saved epoch with the same
    batch order and RNG, so an interrupted stage ends bit for bit where an uninterrupted one
    does (CPU), having lost at most that much work. A finished stage leaves only its best
    weights and history there, and a later call just loads them.
    """
    groups = (
        list(param_groups)
        if param_groups is not None
        else [{"params": trainable_parameters(model)}]
    )
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise InputError(f"{name}: nothing to train (no parameter requires grad)")
    optimizer = torch.optim.AdamW(groups, lr=stage.lr, weight_decay=stage.weight_decay)
    scaler = runtime.grad_scaler()
    result = FitResult(best_epoch=-1, best_val={})
    start = 0
    if checkpoint is not None and checkpoint.exists():
        saved = load_torch_file(
            checkpoint,
            "unreadable training checkpoint",
            "delete it to train this stage again",
            map_location=runtime.device,
        )
        model.load_state_dict(saved["model"])
        result = FitResult(
            saved["best_epoch"], saved["best_val"], saved["history"], saved.get("seconds", 0.0)
        )
        if "rng" in saved:  # absent from checkpoints of earlier versions
            restore_rng(saved["rng"])
        if saved.get("finished", False):
            return result
        optimizer.load_state_dict(saved["optimizer"])
        scaler.load_state_dict(saved["scaler"])
        best_state = saved["best_state"]
        start = saved["epoch"] + 1
    else:
        best_state = copy.deepcopy(model.state_dict())

    if metrics_log is not None:  # epochs of an interrupted attempt that will run again
        drop_jsonl(metrics_log, lambda r: r.get("stage") == name and r.get("epoch", -1) >= start)
    saved_at = time.monotonic()
    batches_per_epoch = progress_lines.batch_count(train_batches)
    steps_per_epoch = len(train_batches) if stage.steps is not None else 0  # type: ignore[arg-type]
    epochs = stage.num_epochs(steps_per_epoch)
    set_epoch = getattr(train_batches, "set_epoch", None)
    with progress_lines.progress_bar(show_progress) as progress:
        watch = progress_lines.StageProgress(
            progress, name, epochs, batches_per_epoch, stage.steps, start
        )
        for epoch in range(start, epochs):
            began = time.perf_counter()
            watch.start_epoch(epoch)
            model.train()
            if set_epoch is not None:
                set_epoch(epoch)  # the same batch order whether or not this run resumed
            limit = None if stage.steps is None else stage.steps - epoch * steps_per_epoch
            total, count = 0.0, 0
            for step, (x, y) in enumerate(train_batches):
                if limit is not None and step >= limit:
                    break
                if before_step is not None:
                    before_step(model, epoch)
                with runtime.autocast():
                    logits = model(runtime.inputs(x))
                loss = task_loss(logits, y.to(runtime.device), multilabel)
                if not torch.isfinite(loss):
                    raise NonFiniteLossError(
                        f"{name}: loss is {loss.item()} at epoch {epoch}, step {step}; "
                        "check the inputs or lower the learning rate"
                    )
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                if after_step is not None:
                    after_step()
                total += float(loss.detach()) * len(x)
                count += len(x)
                watch.batch(len(x), total / count)
            val = evaluate(model, val_batches, runtime, multilabel)
            record = {"stage": name, "epoch": epoch, "train_loss": total / max(count, 1)}
            record.update({f"val_{k}": v for k, v in val.items()})
            result.history.append(record)
            if result.best_epoch < 0 or val["macro_f1"] > result.best_val["macro_f1"]:
                result.best_epoch, result.best_val = epoch, val
                best_state = copy.deepcopy(model.state_dict())
            result.seconds += time.perf_counter() - began
            if metrics_log is not None:
                append_jsonl(metrics_log, record)
            if on_epoch_end is not None:
                on_epoch_end(dict(record), model)
            due = time.monotonic() - saved_at >= 60 * checkpoint_minutes
            if checkpoint is not None and epoch + 1 < epochs and due:
                saved_at = time.monotonic()
                rolling = {
                    "epoch": epoch,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict(),
                    "best_state": best_state,
                }
                atomic_torch_save({**rolling, **_progress(result)}, checkpoint)
            watch.end_epoch(val["macro_f1"])
    model.load_state_dict(best_state)
    if checkpoint is not None:
        atomic_torch_save({"finished": True, "model": best_state, **_progress(result)}, checkpoint)
    return result


def _progress(result: FitResult) -> dict[str, Any]:
    """What both a rolling and a finished stage checkpoint keep besides the weights."""
    return {
        "rng": rng_state(),
        "best_epoch": result.best_epoch,
        "best_val": result.best_val,
        "history": result.history,
        "seconds": result.seconds,
    }


class TensorBatches:
    """Seeded shuffled batches over in-memory tensors (cached LP features)."""

    def __init__(
        self, x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool, seed: int = 0
    ) -> None:
        self.x, self.y, self.batch_size, self.shuffle, self.seed = x, y, batch_size, shuffle, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.x)
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(n, generator=gen)
        else:
            order = torch.arange(n)
        self.epoch += 1
        for start in range(0, n, self.batch_size):
            index = order[start : start + self.batch_size]
            yield self.x[index], self.y[index]

    def __len__(self) -> int:
        return (len(self.x) + self.batch_size - 1) // self.batch_size


@torch.no_grad()
def extract_features(
    backbone: nn.Module, batches: Batches, runtime: Runtime
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features of a frozen backbone (eval mode), computed once for cached LP."""
    backbone.eval()
    feats, labels = [], []
    for x, y in batches:
        with runtime.autocast():
            feats.append(backbone(runtime.inputs(x)).float())
        labels.append(y)
    return torch.cat(feats), torch.cat(labels).to(runtime.device)
