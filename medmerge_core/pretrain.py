"""Pretraining a source backbone on a task: the demo's sources and an institution's own model."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from medmerge_core.data.base import BatchLoader, TaskData
from medmerge_core.errors import InputError
from medmerge_core.io import load_torch_file
from medmerge_core.models import StateDict, backbone_keys, build_model, save_checkpoint
from medmerge_core.provenance import environment
from medmerge_core.settings import StageSettings, differences
from medmerge_core.train import FitOptions, Runtime, evaluate, fit


def _digest(state: StateDict, keys: list[str]) -> str:
    """A short fingerprint of the init weights the model starts from."""
    sha = hashlib.sha256()
    for key in keys:
        tensor = state[key].detach().cpu().contiguous().reshape(-1)
        sha.update(f"{key}:{tensor.dtype}:{tuple(state[key].shape)};".encode())
        sha.update(tensor.view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()[:16]


def pretrain_settings(
    arch: str,
    task: TaskData,
    stage: StageSettings,
    *,
    init: StateDict | None = None,
    init_keys: list[str] | None = None,
    init_spec: str | None = None,
    data_spec: Mapping[str, Any] | None = None,
    batch_size: int = 64,
    seed: int = 0,
) -> dict[str, Any]:
    """What a pretrained source was made with, in the order a difference is reported.

    Plain JSON values (so a checkpoint loads with weights_only=True and compares exactly)."""
    settings = {
        "arch": arch,
        "data": dict(data_spec) if data_spec is not None else None,
        "task": {
            "name": task.name,
            "classes": list(task.class_names),
            "multilabel": task.multilabel,
            "in_channels": task.in_channels,
            "image_size": task.image_size,
            "sizes": [len(task.train), len(task.val), len(task.test)],
        },
        "init": init_spec if init_spec is not None else ("weights" if init is not None else None),
        "init_sha256": None if init is None else _digest(init, list(init_keys or sorted(init))),
        "epochs": stage.epochs,
        "steps": stage.steps,
        "lr": stage.lr,
        "weight_decay": stage.weight_decay,
        "batch_size": batch_size,
        "seed": seed,
    }
    return json.loads(json.dumps(settings, default=str))


def pretrain_source(
    arch: str,
    task: TaskData,
    out: Path,
    stage: StageSettings,
    runtime: Runtime,
    *,
    init: StateDict | None = None,
    batch_size: int = 64,
    seed: int = 0,
    init_spec: str | None = None,
    data_spec: Mapping[str, Any] | None = None,
    reuse_unrecorded: bool = True,
    options: FitOptions | None = None,
) -> dict[str, float]:
    """Train arch on task (optionally from an init backbone) and save a checkpoint atomically.

    The checkpoint records its settings (`pretrain_settings`). Resumable: an interrupted run
    continues from `out`.ckpt; a finished `out` made with the same settings is reused, one made
    with different settings is an InputError naming the first difference. A file saved before
    settings were recorded is reused when `reuse_unrecorded`, else refused.
    `init_spec` / `data_spec` name the init and the data for the record (the CLI's arguments).
    `options` (default: FitOptions()) say how the stage is shown, checkpointed and logged; its
    name and checkpoint (`out`.ckpt) are the source's own, whatever `options` say.
    Returns the test metrics of the saved model.
    """
    out = Path(out)
    torch.manual_seed(seed)
    model = build_model(arch, task.num_classes, task.in_channels)
    keys = backbone_keys(model)
    if init is not None:
        state = model.state_dict()
        state.update({k: init[k] for k in keys})
        model.load_state_dict(state)
    settings = pretrain_settings(
        arch,
        task,
        stage,
        init=init,
        init_keys=keys,
        init_spec=init_spec,
        data_spec=data_spec,
        batch_size=batch_size,
        seed=seed,
    )
    model = runtime.model(model)
    test = BatchLoader(task.test, 256)
    if out.exists():
        saved = load_torch_file(
            out,
            "unreadable pretrained source",
            "delete it to pretrain again",
            map_location=runtime.device,
        )
        recorded = saved.get("settings") if isinstance(saved, dict) else None
        if recorded is None and not reuse_unrecorded:
            raise InputError(
                f"{out}: exists but records no pretraining settings (saved by an older "
                "version); delete it or pick another --out"
            )
        if recorded is not None:
            differ = differences(recorded, settings)
            if differ:
                key, old, new = differ[0]
                raise InputError(
                    f"{out}: exists, pretrained with different settings ({key}: {old!r} saved, "
                    f"{new!r} now); delete it or pick another --out"
                )
        model.load_state_dict(saved["state_dict"])
        return evaluate(model, test, runtime, task.multilabel)
    name, checkpoint = f"pretrain {task.name}", out.with_suffix(".ckpt")  # the source's own
    fit(
        model,
        BatchLoader(task.train, batch_size, shuffle=True, seed=seed),
        BatchLoader(task.val, 256),
        stage,
        runtime,
        multilabel=task.multilabel,
        options=dataclasses.replace(options or FitOptions(), name=name, checkpoint=checkpoint),
    )
    metrics = evaluate(model, test, runtime, task.multilabel)
    # The environment is recorded, not compared: a source made elsewhere is still reused.
    save_checkpoint(
        out, model, arch, task=task.name, test=metrics, settings=settings, environment=environment()
    )
    out.with_suffix(".ckpt").unlink(missing_ok=True)
    return metrics
