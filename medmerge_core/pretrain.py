"""Pretraining a source backbone on a task: the demo's sources and an institution's own model."""

from __future__ import annotations

from pathlib import Path

import torch

from medmerge_core.data.base import BatchLoader, TaskData
from medmerge_core.io import load_torch_file
from medmerge_core.models import StateDict, backbone_keys, build_model, save_checkpoint
from medmerge_core.train import Runtime, StageConfig, evaluate, fit


def pretrain_source(
    arch: str,
    task: TaskData,
    out: Path,
    stage: StageConfig,
    runtime: Runtime,
    *,
    init: StateDict | None = None,
    batch_size: int = 64,
    seed: int = 0,
    show_progress: bool = True,
) -> dict[str, float]:
    """Train arch on task (optionally from an init backbone) and save a checkpoint atomically.

    Resumable: an interrupted run continues from `out`.ckpt; a finished `out` is not redone.
    Returns the test metrics of the saved model.
    """
    torch.manual_seed(seed)
    model = build_model(arch, task.num_classes, task.in_channels)
    if init is not None:
        state = model.state_dict()
        state.update({k: init[k] for k in backbone_keys(model)})
        model.load_state_dict(state)
    model = runtime.model(model)
    test = BatchLoader(task.test, 256)
    if out.exists():
        saved = load_torch_file(
            out, "unreadable pretrained source", "delete it to pretrain again",
            map_location=runtime.device,
        )  # fmt: skip
        model.load_state_dict(saved["state_dict"])
        return evaluate(model, test, runtime, task.multilabel)
    fit(
        model,
        BatchLoader(task.train, batch_size, shuffle=True, seed=seed),
        BatchLoader(task.val, 256),
        stage,
        runtime,
        multilabel=task.multilabel,
        name=f"pretrain {task.name}",
        checkpoint=out.with_suffix(".ckpt"),
        show_progress=show_progress,
    )
    metrics = evaluate(model, test, runtime, task.multilabel)
    save_checkpoint(out, model, arch, task=task.name, test=metrics)
    out.with_suffix(".ckpt").unlink(missing_ok=True)
    return metrics
