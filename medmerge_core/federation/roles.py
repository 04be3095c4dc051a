"""The three roles as plain functions: institution, coordinator, site."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medmerge_core.data.base import BatchLoader, TaskData
from medmerge_core.errors import InputError
from medmerge_core.federation.config import FederationConfig, NodeSettings
from medmerge_core.federation.data import load_node_data
from medmerge_core.federation.transport import ModelInfo, restore_dtypes
from medmerge_core.models import StateDict, adapt_stem, build_model, load_source, stem_conv_name
from medmerge_core.probe import LearnedMerge, learn_merge
from medmerge_core.train import Runtime, evaluate, fit

log = logging.getLogger(__name__)


def institution_backbone(
    settings: NodeSettings, cfg: FederationConfig, runtime: Runtime
) -> tuple[StateDict, dict[str, Any]]:
    """The node's backbone: from its checkpoint or source spec, else pretrained on its data."""
    from medmerge_core.pretrain import pretrain_source

    ckpt = settings.checkpoint
    is_spec = ckpt is not None and (
        ckpt in ("zeros", "random") or ckpt.split(":")[0] in ("random", "torchvision")
    )
    if ckpt is not None and (is_spec or Path(ckpt).expanduser().exists()):
        in_channels = settings.in_channels
        if settings.data is not None and not is_spec:
            in_channels = load_node_data(settings, cfg).in_channels
        state = load_source(ckpt, cfg.arch, in_channels)
    elif settings.data is not None:
        if ckpt is None:
            raise InputError(
                f"institution '{settings.name}': set node config checkpoint=PATH "
                "(where the backbone pretrained on its data is saved)"
            )
        task = load_node_data(settings, cfg)
        metrics = pretrain_source(
            cfg.arch, task, Path(ckpt).expanduser(), cfg.pretrain, runtime,
            batch_size=cfg.batch_size, seed=cfg.seed, show_progress=False,
        )  # fmt: skip
        log.info("institution %s pretrained: %s", settings.name, metrics)
        state = load_source(ckpt, cfg.arch, task.in_channels)
    else:
        raise InputError(f"institution '{settings.name}': node config needs checkpoint or data")
    return {k: v.detach().cpu() for k, v in state.items()}, {"source": settings.name}


def coordinator_merge(
    sources: Sequence[StateDict],
    names: Sequence[str],
    settings: NodeSettings,
    cfg: FederationConfig,
    runtime: Runtime,
) -> tuple[StateDict, ModelInfo, LearnedMerge, dict[str, float]]:
    """Learn the MedMerge coefficients on local target data and bake a plain model, with the
    experiment's own probe (`learn_merge`).

    Returns (merged state dict, model info, the learned merge, metrics).
    """
    task = load_node_data(settings, cfg)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.arch, task.num_classes, task.in_channels)
    stem = stem_conv_name(model) + ".weight"
    adapted = [
        {k: (adapt_stem(v, task.in_channels) if k == stem else v).float()
         if v.is_floating_point() else v for k, v in s.items()}
        for s in sources
    ]  # fmt: skip
    learned = learn_merge(
        model,
        adapted,
        list(names),
        BatchLoader(task.train, cfg.batch_size, shuffle=True, seed=cfg.seed),
        BatchLoader(task.val, 256),
        cfg.merge,
        cfg.merge_lr,
        cfg.merge_weight_decay,
        runtime,
        multilabel=task.multilabel,
        name="merge probe",
        show_progress=False,
    )
    test = evaluate(learned.model, BatchLoader(task.test, 256), runtime, task.multilabel)
    metrics = {f"test_{k}": float(v) for k, v in test.items()}
    if learned.fit is not None:
        metrics.update({f"val_{k}": float(v) for k, v in learned.fit.best_val.items()})
    state = {k: v.detach().cpu() for k, v in learned.model.state_dict().items()}
    info = ModelInfo(cfg.arch, task.num_classes, task.in_channels)
    return state, info, learned, metrics


def _site_model(
    state: Mapping[str, torch.Tensor],
    info: ModelInfo,
    task: TaskData,
    local_bn: Mapping[str, torch.Tensor] | None,
    runtime: Runtime,
) -> nn.Module:
    if (task.num_classes, task.in_channels) != (info.num_classes, info.in_channels):
        raise InputError(
            f"site data has {task.num_classes} classes / {task.in_channels} channels, the merged "
            f"model {info.num_classes} / {info.in_channels}"
        )
    model = info.build()
    full = model.state_dict()
    full.update(state)
    if local_bn:
        full.update(local_bn)
    model.load_state_dict(restore_dtypes(full, model.state_dict()))
    return runtime.model(model)


def site_train(
    state: Mapping[str, torch.Tensor],
    info: ModelInfo,
    settings: NodeSettings,
    cfg: FederationConfig,
    runtime: Runtime,
    server_round: int,
    local_bn: Mapping[str, torch.Tensor] | None = None,
) -> tuple[StateDict, int, dict[str, float]]:
    """Fine-tune the global model locally; returns (new state, examples, metrics)."""
    task = load_node_data(settings, cfg)
    model = _site_model(state, info, task, local_bn, runtime)
    seed = cfg.seed * 1_000_003 + server_round * 101 + (settings.shard or (0, 1))[0]
    torch.manual_seed(seed)
    result = fit(
        model,
        BatchLoader(task.train, cfg.batch_size, shuffle=True, seed=seed),
        BatchLoader(task.val, 256),
        cfg.ft,
        runtime,
        multilabel=task.multilabel,
        name=f"round {server_round}",
        show_progress=False,
    )
    last = result.history[-1] if result.history else {}
    metrics = {k: float(v) for k, v in last.items() if isinstance(v, int | float)}
    metrics.pop("epoch", None)
    out = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return out, len(task.train), metrics


def site_evaluate(
    state: Mapping[str, torch.Tensor],
    info: ModelInfo,
    settings: NodeSettings,
    cfg: FederationConfig,
    runtime: Runtime,
    local_bn: Mapping[str, torch.Tensor] | None = None,
) -> tuple[int, dict[str, float]]:
    """Test metrics of the global model (with this site's BN under FedBN) on local data."""
    task = load_node_data(settings, cfg)
    model = _site_model(state, info, task, local_bn, runtime)
    test = evaluate(model, BatchLoader(task.test, 256), runtime, task.multilabel)
    return len(task.test), {k: float(v) for k, v in test.items()}
