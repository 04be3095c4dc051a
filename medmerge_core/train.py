"""One training loop for LP, FT and the MedMerge probe, on CPU or GPU.

Device specifics (AMP dtype, channels_last, grad scaling, the CPU bf16 convolution workaround)
live in a `Runtime` that the loop uses uniformly; the loop itself never branches on the device
(timm's approach). Every stage's optimiser step is `TrainStep`, which skips a step whose loss or
gradients are not finite (as GradScaler does for fp16) and stops the stage only after
`MAX_NONFINITE_STEPS` of them in a row.
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair
from torch.overrides import TorchFunctionMode

from medmerge_core import progress as progress_lines
from medmerge_core.errors import InputError, NonFiniteLossError
from medmerge_core.io import append_jsonl, atomic_torch_save, drop_jsonl, load_torch_file
from medmerge_core.metrics import classification_metrics
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


def conv2d_without_input_below_stride(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: Any = 1,
    padding: Any = 0,
    dilation: Any = 1,
    groups: int = 1,
) -> torch.Tensor:
    """`F.conv2d`, with an input smaller than the stride zero-padded explicitly first.

    The same result (the taps it adds read zeros, the output size is unchanged), computed by a
    convolution whose input is at least as large as its stride. On the CPU, oneDNN's bf16
    weight gradient (`jit_bf16:avx512_core_bf16` backward_weights, oneDNN 3.12 in torch 2.14)
    is wrong for a strided convolution whose input is narrower than the stride, e.g. ResNet-18's
    layer4.0.conv1 (3x3, stride 2, padding 1) on the 1x1 maps of 16x16 images: taps that see
    only padding get uninitialised memory (values up to 1e33, or NaN, that vary from call to
    call), which derailed the bf16 probe. Outputs and input gradients are right; fp32 is right.
    """
    height, width = input.shape[-2:]
    sh, sw = _pair(stride)
    if isinstance(padding, str) or (height >= sh and width >= sw):
        return torch.conv2d(input, weight, bias, stride, padding, dilation, groups)
    ph, pw = _pair(padding)
    extra_h, extra_w = max(0, sh - height - 2 * ph), max(0, sw - width - 2 * pw)
    padded = F.pad(input, (pw, pw + extra_w, ph, ph + extra_h))
    return torch.conv2d(padded, weight, bias, stride, 0, dilation, groups)


class _PadInputsBelowStride(TorchFunctionMode):
    """Every `conv2d` inside goes through `conv2d_without_input_below_stride`."""

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        if func is torch.conv2d:  # F.conv2d, as nn.Conv2d calls it
            return conv2d_without_input_below_stride(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


@contextmanager
def _cpu_autocast(dtype: torch.dtype) -> Iterator[None]:
    with torch.autocast("cpu", dtype=dtype), _PadInputsBelowStride():
        yield


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
            return _cpu_autocast(self.amp_dtype)
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
    history: list[dict[str, float]] = field(default_factory=list)  # per epoch, skipped_steps too
    seconds: float = 0.0  # training time, summed over resumed runs
    skipped_steps: int = 0  # steps skipped for a non-finite loss or gradient (see TrainStep)

    def summary(self) -> dict[str, Any]:
        return {
            "best_epoch": self.best_epoch,
            "val": self.best_val,
            "seconds": self.seconds,
            "skipped_steps": self.skipped_steps,
            # optimiser steps attempted, so a study can put every method's budget side by side
            "steps": sum(record.get("steps", 0) for record in self.history),
        }


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
    Progress: see `StageProgress`; `show_progress=False` prints nothing. Each step is a
    `TrainStep`: a step with a non-finite loss or gradient is skipped and counted (per epoch as
    `skipped_steps` in the history, in all as `FitResult.skipped_steps`), and
    `MAX_NONFINITE_STEPS` in a row, or every step of a shorter stage, stop it.

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
            saved["best_epoch"],
            saved["best_val"],
            saved["history"],
            saved.get("seconds", 0.0),
            saved.get("skipped_steps", 0),  # absent from checkpoints of earlier versions
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
    if stage.steps is not None:
        total_steps: int | None = stage.steps - start * steps_per_epoch
    else:
        total_steps = None if batches_per_epoch is None else (epochs - start) * batches_per_epoch
    train_step = TrainStep(
        model, optimizer, scaler, runtime, multilabel=multilabel, name=name,
        after_step=after_step, limit=min(MAX_NONFINITE_STEPS, total_steps or MAX_NONFINITE_STEPS),
    )  # fmt: skip
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
            total, count, skipped, taken = 0.0, 0, train_step.skipped, 0
            for step, (x, y) in enumerate(train_batches):
                if limit is not None and step >= limit:
                    break
                taken += 1
                if before_step is not None:
                    before_step(model, epoch)
                loss = train_step(x, y, epoch, step)
                if loss is not None:
                    total += loss * len(x)
                    count += len(x)
                watch.batch(len(x), total / count if count else math.nan)
            val = evaluate(model, val_batches, runtime, multilabel)
            record = {
                "stage": name,
                "epoch": epoch,
                "train_loss": total / count if count else math.nan,  # nan: every step skipped
                "skipped_steps": train_step.skipped - skipped,
                "steps": taken,
            }
            record.update({f"val_{k}": v for k, v in val.items()})
            result.history.append(record)
            result.skipped_steps += record["skipped_steps"]
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
        "skipped_steps": result.skipped_steps,
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
