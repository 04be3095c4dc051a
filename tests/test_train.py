"""The training loop: model selection, resumption, NaN losses and the metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medmerge_core.data.base import BatchLoader
from medmerge_core.errors import NonFiniteLossError
from medmerge_core.metrics import classification_metrics
from medmerge_core.models import build_model
from medmerge_core.settings import StageSettings
from medmerge_core.train import FitOptions, Runtime, fit

# The loop is the same for every arch: the smallest one keeps these tests quick.
SMALL_ARCH = "shufflenet_v2_x0_5"


class Interrupt(Exception):
    pass


def test_interrupted_fit_resumes_after_the_last_completed_epoch(tiny_task, tmp_path) -> None:
    runtime = Runtime.detect("cpu")
    train = BatchLoader(tiny_task.train, 32, shuffle=True)
    val = BatchLoader(tiny_task.val, 32)
    ckpt = tmp_path / "fit.ckpt"

    def stop_in_epoch_2(model, epoch):
        if epoch == 2:
            raise Interrupt

    torch.manual_seed(0)
    model = build_model(SMALL_ARCH, 2, 1)
    with pytest.raises(Interrupt):
        fit(
            model,
            train,
            val,
            StageSettings(3, 1e-3),
            runtime,
            before_step=stop_in_epoch_2,
            options=FitOptions(checkpoint=ckpt, checkpoint_minutes=0, show_progress=False),
        )
    saved = torch.load(ckpt, weights_only=True)
    assert saved["epoch"] == 1 and len(saved["history"]) == 2

    seen = []
    torch.manual_seed(0)
    fresh = build_model(SMALL_ARCH, 2, 1)
    result = fit(
        fresh,
        train,
        val,
        StageSettings(3, 1e-3),
        runtime,
        before_step=lambda m, e: seen.append(e),
        options=FitOptions(checkpoint=ckpt, show_progress=False),
    )
    assert set(seen) == {2}  # only the missing epoch ran
    assert [h["epoch"] for h in result.history] == [0, 1, 2]


def test_best_epoch_by_validation_macro_f1_is_restored(tiny_task) -> None:
    runtime = Runtime.detect("cpu")
    torch.manual_seed(0)
    model = build_model(SMALL_ARCH, 2, 1)
    result = fit(
        model,
        BatchLoader(tiny_task.train, 32, shuffle=True),
        BatchLoader(tiny_task.val, 32),
        StageSettings(3, 1e-3),
        runtime,
        options=FitOptions(show_progress=False),
    )
    best = max(result.history, key=lambda h: h["val_macro_f1"])
    assert result.best_epoch == best["epoch"]
    assert result.best_val["macro_f1"] == best["val_macro_f1"]


def test_nan_loss_is_a_clear_error(tiny_task) -> None:
    model = build_model("resnet18", 2, 1)

    def poison(m, epoch):
        with torch.no_grad():
            m.fc.weight.fill_(float("nan"))

    with pytest.raises(NonFiniteLossError, match=r"ft: loss is nan at epoch 0, step 0"):
        fit(
            model,
            BatchLoader(tiny_task.train, 32),
            BatchLoader(tiny_task.val, 32),
            StageSettings(1, 1e-3),
            Runtime.detect("cpu"),
            before_step=poison,
            options=FitOptions(name="ft", show_progress=False),
        )


def test_metrics_multiclass_and_multilabel() -> None:
    logits = np.array([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [0.0, 2.0]])
    m = classification_metrics(logits, np.array([0, 1, 1, 1]))
    assert m["accuracy"] == 0.75
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)
    assert m["auroc"] == pytest.approx(5 / 6)
    multi = classification_metrics(
        np.array([[3.0, -3.0], [-3.0, 3.0], [3.0, 3.0]]),
        np.array([[1.0, 0.0], [0.0, np.nan], [1.0, 1.0]]),
        multilabel=True,
    )
    assert multi["accuracy"] == 1.0 and multi["macro_f1"] == 1.0
    assert multi["auroc_0"] == 1.0 and multi["auroc"] == 1.0


def test_runtime_on_cpu_is_plain_fp32() -> None:
    runtime = Runtime.detect("cpu")
    assert runtime.amp_dtype is None and runtime.memory_format == torch.contiguous_format
