"""Federated MedMerge: everything the Flower adapters in client/ and server/ delegate to.

No Flower imports here, so every role, check and file format is testable with plain tensors:

- configuration: `FederationConfig` (the run config) and `NodeSettings` (one node's role, data
  and checkpoint, from its node config in deployment or its partition id in simulation);
- the three roles as plain functions: `institution_backbone`, `coordinator_merge`,
  `site_train` / `site_evaluate`;
- reply screening (`screen_replies`): keys, shapes, dtypes, NaN/Inf and update-norm outliers;
- the wire format helpers: fp16 compression, dtype restoration after FedAvg, FedBN key split;
- `FederationRun`: the run folder with atomic per-phase and per-round checkpoints, so a
  restarted ServerApp with the same run config resumes after its last completed round.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from medmerge_core.data.base import BatchLoader, TaskData
from medmerge_core.errors import InputError
from medmerge_core.inmerge import InMergeConfig, conv_weight_keys, inmerge_state_dict
from medmerge_core.io import append_jsonl, atomic_torch_save, atomic_write_json, read_jsonl
from medmerge_core.merge import NORM_TYPES, MergedModel
from medmerge_core.models import (
    StateDict,
    adapt_stem,
    backbone_keys,
    build_model,
    load_source,
    stem_conv_name,
)
from medmerge_core.train import Runtime, StageConfig, evaluate, fit

log = logging.getLogger(__name__)

ROLES: tuple[str, ...] = ("institution", "coordinator", "site")
DP_MODES: tuple[str, ...] = ("none", "server", "client")
# Settings that may change between a run and its resumption without invalidating it.
RESUMABLE_CHANGES: frozenset[str] = frozenset({"rounds", "timeout", "device", "output_dir"})


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FederationConfig:
    """The run config (`[tool.flwr.app.config]` plus `-c` overrides), typed and checked.

    Keys are the field names with '-' for '_'. Tuples are comma-separated strings.
    """

    run_name: str = "federation"
    output_dir: str = "~/medmerge-federation"
    arch: str = "resnet18"
    image_size: int = 32
    seed: int = 0
    device: str = "auto"
    batch_size: int = 32
    # Simulation: the role of each partition id and what data each one holds.
    sim_roles: tuple[str, ...] = ("institution",) * 2 + ("coordinator",) + ("site",) * 3
    sim_institution_data: tuple[str, ...] = ("synthetic:related_a", "synthetic:related_b")
    sim_target_data: str = "synthetic:target"
    synthetic_n_train: int = 400
    synthetic_n_val: int = 160
    synthetic_n_test: int = 200
    # Deployment: how many nodes to wait for before starting (0: every one already there).
    wait_nodes: int = 0
    # Phase 1 (institutions pretrain when they have data and no checkpoint yet).
    pretrain_epochs: int = 2
    pretrain_lr: float = 1e-3
    # Phase 2 (the MedMerge probe at the coordinator).
    merge_epochs: int = 2
    merge_lr: float = 1e-2
    merge_granularity: str = "kernel"
    # Phase 3 (federated fine-tuning at the sites).
    rounds: int = 3
    local_epochs: int = 1
    ft_lr: float = 1e-4
    weight_decay: float = 0.01
    fedbn: bool = False
    inmerge: bool = True
    inmerge_p: float = 0.3
    inmerge_tau: float = 0.3
    inmerge_alpha: float = 0.8
    inmerge_skip_layers: int = 10
    min_sites: int = 2
    outlier_factor: float = 10.0
    fp16: bool = False
    dp: str = "none"
    dp_clipping_norm: float = 1.0
    dp_noise_multiplier: float = 0.0
    timeout: float = 1800.0

    def __post_init__(self) -> None:
        bad = [r for r in self.sim_roles if r not in ROLES]
        if bad:
            raise InputError(f"run config sim-roles: unknown role '{bad[0]}'; expected {ROLES}")
        if self.dp not in DP_MODES:
            raise InputError(f"run config dp: expected one of {DP_MODES}, got '{self.dp}'")
        if self.dp == "client" and self.fedbn:
            raise InputError("run config dp='client' cannot be combined with fedbn=true")
        for name in ("rounds", "local_epochs", "merge_epochs", "pretrain_epochs", "wait_nodes"):
            if getattr(self, name) < 0:
                raise InputError(f"run config {name.replace('_', '-')}: must be >= 0")
        if self.min_sites < 1 or self.batch_size < 1:
            raise InputError("run config min-sites and batch-size: must be >= 1")
        if self.outlier_factor <= 1:
            raise InputError("run config outlier-factor: must be > 1")
        self.inmerge_config()  # validates p / tau / alpha / skip-layers

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> FederationConfig:
        """Typed config from Flower's flat run config; unknown keys are errors (typos)."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key, value in run_config.items():
            name = key.replace("-", "_")
            if name not in fields:
                raise InputError(f"run config: unknown key '{key}'")
            default = fields[name].default
            values[name] = _coerce(key, value, default)
        return cls(**values)

    def inmerge_config(self) -> InMergeConfig:
        return InMergeConfig(
            p=self.inmerge_p,
            tau=self.inmerge_tau,
            alpha=self.inmerge_alpha,
            skip_layers=self.inmerge_skip_layers,
        )

    def fingerprint(self) -> dict[str, Any]:
        """What must match for a restarted run to resume (rounds may grow; paths may move)."""
        return {
            k: list(v) if isinstance(v, tuple) else v
            for k, v in dataclasses.asdict(self).items()
            if k not in RESUMABLE_CHANGES
        }

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir).expanduser() / self.run_name


def _coerce(key: str, value: Any, default: Any) -> Any:
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise InputError(f"run config {key}: expected true or false, got {value!r}")
        return value
    if isinstance(default, tuple):
        if not isinstance(value, str):
            raise InputError(f"run config {key}: expected a comma-separated string")
        return tuple(v.strip() for v in value.split(",") if v.strip())
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"run config {key}: expected an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InputError(f"run config {key}: expected a number, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise InputError(f"run config {key}: expected a string, got {value!r}")
    return value


@dataclass(frozen=True)
class NodeSettings:
    """One node's role and private resources; never sent to the server."""

    role: str
    name: str
    data: str | None = None
    shard: tuple[int, int] | None = None
    checkpoint: str | None = None
    device: str = "auto"
    in_channels: int = 3


def node_settings(node_config: Mapping[str, Any], cfg: FederationConfig) -> NodeSettings:
    """Deployment: keys `role`, `name`, `data`, `shard` ('i/k'), `checkpoint`, `device`,
    `in-channels`. Simulation: `partition-id` picks a role from `sim-roles`; the target data
    is split between the coordinator and the sites, each institution gets its own dataset."""
    if "role" in node_config:
        role = str(node_config["role"])
        if role not in ROLES:
            raise InputError(f"node config role: expected one of {ROLES}, got '{role}'")
        shard = None
        if "shard" in node_config:
            shard = _parse_shard(str(node_config["shard"]))
        return NodeSettings(
            role=role,
            name=str(node_config.get("name", role)),
            data=_opt_str(node_config.get("data")),
            shard=shard,
            checkpoint=_opt_str(node_config.get("checkpoint")),
            device=str(node_config.get("device", cfg.device)),
            in_channels=int(node_config.get("in-channels", 3)),
        )
    if "partition-id" not in node_config:
        raise InputError("node config: needs 'role' (deployment) or 'partition-id' (simulation)")
    pid = int(node_config["partition-id"])
    count = int(node_config.get("num-partitions", len(cfg.sim_roles)))
    if count != len(cfg.sim_roles):
        raise InputError(
            f"run config sim-roles: {len(cfg.sim_roles)} roles for {count} simulated nodes; "
            f"pass --federation-config 'num-supernodes={len(cfg.sim_roles)}'"
        )
    role = cfg.sim_roles[pid]
    if role == "institution":
        index = cfg.sim_roles[:pid].count("institution")
        if index >= len(cfg.sim_institution_data):
            raise InputError(f"run config sim-institution-data: no data for institution {index}")
        return NodeSettings(
            role=role,
            name=f"institution-{index}",
            data=cfg.sim_institution_data[index],
            checkpoint=str(cfg.run_dir / f"institution-{index}.pt"),
            device=cfg.device,
        )
    holders = [i for i, r in enumerate(cfg.sim_roles) if r != "institution"]
    index = holders.index(pid)
    name = "coordinator" if role == "coordinator" else f"site-{index}"
    return NodeSettings(role, name, cfg.sim_target_data, (index, len(holders)), None, cfg.device)


def _opt_str(value: Any) -> str | None:
    return None if value in (None, "") else str(value)


def _parse_shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(v) for v in text.split("/"))
    except ValueError as exc:
        raise InputError(f"node config shard: expected 'i/k', got '{text}'") from exc
    if not 0 <= index < count:
        raise InputError(f"node config shard: need 0 <= i < k, got '{text}'")
    return index, count


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def parse_data_spec(text: str, cfg: FederationConfig) -> dict[str, Any]:
    """'synthetic:TASK', a MedMNIST '.npz' path, or a .yaml/.json file holding a data mapping."""
    if text.startswith("synthetic:"):
        return {
            "format": "synthetic",
            "task": text.removeprefix("synthetic:"),
            "n_train": cfg.synthetic_n_train,
            "n_val": cfg.synthetic_n_val,
            "n_test": cfg.synthetic_n_test,
        }
    path = Path(text).expanduser()
    if path.suffix == ".npz":
        return {"format": "medmnist", "path": str(path)}
    if path.suffix in (".yaml", ".yml", ".json"):
        if not path.is_file():
            raise InputError(f"node config data: file not found: {path}")
        import yaml

        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
        if not isinstance(spec, dict):
            raise InputError(f"{path}: expected a mapping with a 'format' key")
        return spec
    raise InputError(
        f"node config data: expected 'synthetic:TASK', a .npz or a .yaml, got '{text}'"
    )


def shard_task(task: TaskData, index: int, count: int, seed: int) -> TaskData:
    """Shard `index` of `count` of every split: disjoint, label-stratified, deterministic."""
    splits = {}
    for name, split in task.splits().items():
        order = np.random.default_rng((seed, count, len(split))).permutation(len(split))
        if split.labels.ndim == 1:
            order = order[np.argsort(split.labels[order], kind="stable")]
        splits[name] = split.subset(np.sort(order[index::count]))
    return dataclasses.replace(task, **splits)


def load_node_data(settings: NodeSettings, cfg: FederationConfig) -> TaskData:
    if settings.data is None:
        raise InputError(f"node '{settings.name}': node config has no 'data'")
    from medmerge_core.data.registry import load_task

    task = load_task(parse_data_spec(settings.data, cfg), image_size=cfg.image_size, seed=cfg.seed)
    if settings.shard is not None:
        task = shard_task(task, *settings.shard, seed=cfg.seed)
    if min(len(task.train), len(task.val), len(task.test)) == 0:
        raise InputError(f"node '{settings.name}': a split of its data is empty after sharding")
    return task


# --------------------------------------------------------------------------------------------
# Roles
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelInfo:
    """What the server and the sites need to rebuild the merged model (sent as config)."""

    arch: str
    num_classes: int
    in_channels: int

    def build(self) -> nn.Module:
        return build_model(self.arch, self.num_classes, self.in_channels)

    def as_config(self) -> dict[str, Any]:
        return {"arch": self.arch, "num-classes": self.num_classes, "in-channels": self.in_channels}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ModelInfo:
        return cls(str(config["arch"]), int(config["num-classes"]), int(config["in-channels"]))


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
        stage = StageConfig(cfg.pretrain_epochs, cfg.pretrain_lr, cfg.weight_decay)
        metrics = pretrain_source(
            cfg.arch, task, Path(ckpt).expanduser(), stage, runtime,
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
) -> tuple[StateDict, ModelInfo, list[dict[str, Any]], dict[str, float]]:
    """Learn the MedMerge coefficients on local target data and bake a plain model.

    Returns (merged state dict, model info, per-layer coefficient summary, metrics).
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
    merged = runtime.model(
        MergedModel(model, adapted, list(names), granularity=cfg.merge_granularity)  # type: ignore[arg-type]
    )
    result = (
        fit(
            merged,
            BatchLoader(task.train, cfg.batch_size, shuffle=True, seed=cfg.seed),
            BatchLoader(task.val, 256),
            StageConfig(cfg.merge_epochs, cfg.merge_lr, cfg.weight_decay),
            runtime,
            multilabel=task.multilabel,
            name="merge probe",
            show_progress=False,
        )
        if cfg.merge_epochs > 0
        else None
    )
    baked = merged.bake()
    test = evaluate(baked, BatchLoader(task.test, 256), runtime, task.multilabel)
    metrics = {f"test_{k}": float(v) for k, v in test.items()}
    if result is not None:
        metrics.update({f"val_{k}": float(v) for k, v in result.best_val.items()})
    state = {k: v.detach().cpu() for k, v in baked.state_dict().items()}
    info = ModelInfo(cfg.arch, task.num_classes, task.in_channels)
    return state, info, merged.layer_summary(), metrics


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
        StageConfig(cfg.local_epochs, cfg.ft_lr, cfg.weight_decay),
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


# --------------------------------------------------------------------------------------------
# Wire format: FedBN split, fp16, dtypes
# --------------------------------------------------------------------------------------------


def norm_keys(model: nn.Module) -> list[str]:
    """State-dict keys of every normalisation layer (affine params and running stats)."""
    keys = []
    for name, module in model.named_modules():
        if isinstance(module, NORM_TYPES):
            keys += [f"{name}.{k}" for k in module.state_dict()]
    return keys


def transport_keys(meta: Mapping[str, torch.Tensor], norm: Sequence[str], fedbn: bool) -> list[str]:
    """Keys that travel each round: floating tensors only, and no norm layers under FedBN.

    Integer buffers (BN's num_batches_tracked) stay put: averaging a step count is meaningless,
    FedAvg would turn it into float64, and Flower's DP clipping cannot scale integer arrays.
    """
    local = set(norm) if fedbn else set()
    return [k for k, v in meta.items() if v.dtype.is_floating_point and k not in local]


def split_keys(
    state: Mapping[str, torch.Tensor], local: Sequence[str]
) -> tuple[StateDict, StateDict]:
    """(shared, local) parts of a state dict: FedBN keeps the local part at the site."""
    local_set = set(local)
    shared = {k: v for k, v in state.items() if k not in local_set}
    return shared, {k: v for k, v in state.items() if k in local_set}


def compress(state: Mapping[str, torch.Tensor], fp16: bool) -> StateDict:
    """fp32/fp64 tensors to fp16 when asked (half the bytes); integers untouched."""
    if not fp16:
        return dict(state)
    return {k: v.half() if v.is_floating_point() else v for k, v in state.items()}


def restore_dtypes(
    state: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]
) -> StateDict:
    """Cast to the model's own dtypes: fp16 back to fp32, FedAvg's float64 counts to int64."""
    out = {}
    for key, value in state.items():
        dtype = reference[key].dtype
        if not dtype.is_floating_point and value.is_floating_point():
            value = value.round()
        out[key] = value.to(dtype)
    return out


def apply_inmerge(
    state: Mapping[str, torch.Tensor],
    conv_keys: Sequence[str],
    config: InMergeConfig,
    generator: torch.Generator,
) -> tuple[StateDict, int]:
    """InMerge on an aggregate; returns (new state, kernels changed) for the round log."""
    merged = inmerge_state_dict(state, conv_keys, config, generator)
    changed = sum(
        int((merged[k] != state[k]).flatten(1).any(1).sum()) for k in conv_keys if k in state
    )
    return merged, changed


# --------------------------------------------------------------------------------------------
# Reply screening
# --------------------------------------------------------------------------------------------


def check_update(
    state: Mapping[str, torch.Tensor],
    reference: Mapping[str, torch.Tensor],
    allow_fp16: bool = False,
) -> str | None:
    """Why a reply's weights are unusable (keys, shapes, dtypes, NaN/Inf), or None if fine."""
    missing = [k for k in reference if k not in state]
    extra = [k for k in state if k not in reference]
    if missing or extra:
        key = (missing or extra)[0]
        what = "missing" if missing else "unexpected"
        return f"{len(missing)} keys missing, {len(extra)} unexpected ({what} '{key}')"
    for key, ref in reference.items():
        value = state[key]
        if tuple(value.shape) != tuple(ref.shape):
            return f"'{key}' has shape {tuple(value.shape)}, expected {tuple(ref.shape)}"
        ok = value.dtype == ref.dtype or (
            allow_fp16 and ref.is_floating_point() and value.dtype == torch.float16
        )
        if not ok:
            return f"'{key}' has dtype {value.dtype}, expected {ref.dtype}"
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return f"'{key}' contains NaN or Inf"
    return None


def check_backbone(
    state: Mapping[str, torch.Tensor], arch: str, allow_fp16: bool = False
) -> str | None:
    """check_update for an institution's backbone (1- or 3-channel stem, no head)."""
    with torch.device("meta"):
        probe = build_model(arch, 2, 3)
    stem = stem_conv_name(probe) + ".weight"
    channels = int(state[stem].shape[1]) if stem in state and state[stem].ndim == 4 else 3
    if channels not in (1, 3):
        return f"'{stem}' has {channels} input channels; expected 1 or 3"
    with torch.device("meta"):
        model = build_model(arch, 2, channels)
    keys = set(backbone_keys(model))
    reference = {k: v for k, v in model.state_dict().items() if k in keys}
    return check_update(state, reference, allow_fp16)


def update_norm(state: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of (state - base) over the floating-point tensors, computed in float64."""
    total = 0.0
    for key, value in state.items():
        if value.is_floating_point():
            diff = value.double() - base[key].double()
            total += float(diff.square().sum())
    return math.sqrt(total)


def screen_replies(
    replies: Mapping[str, Mapping[str, torch.Tensor]],
    reference: Mapping[str, torch.Tensor],
    outlier_factor: float,
    allow_fp16: bool = False,
) -> tuple[list[str], dict[str, str]]:
    """(accepted node names, {rejected node: reason}).

    A reply is rejected for bad keys / shapes / dtypes / NaN / Inf, or when its update norm
    (against `reference`, the weights the node was sent) exceeds `outlier_factor` times the
    median norm of the *other* well-formed replies. With one reply the outlier test is skipped.
    """
    rejected: dict[str, str] = {}
    norms: dict[str, float] = {}
    for node, state in replies.items():
        reason = check_update(state, reference, allow_fp16)
        if reason is None:
            norms[node] = update_norm(state, reference)
        else:
            rejected[node] = reason
    for node, norm in norms.items():
        others = [v for k, v in norms.items() if k != node]
        if not others:
            continue
        median = float(np.median(others))
        if median > 0 and norm > outlier_factor * median:
            rejected[node] = (
                f"update norm {norm:.3g} is {norm / median:.1f}x the median of the others "
                f"({median:.3g}; limit {outlier_factor:g}x)"
            )
    accepted = [n for n in replies if n not in rejected]
    return accepted, rejected


# --------------------------------------------------------------------------------------------
# The run folder: phase outputs, per-round checkpoint, metrics
# --------------------------------------------------------------------------------------------


class FederationRun:
    """Files of one federated run; every write is atomic, so a crash never loses a round.

    config.json (fingerprint), sources.pt (phase 1), merged.pt + coefficient_summary.json
    (phase 2), checkpoint.pt (global model, round, strategy state, history; after every
    round), metrics.jsonl (one line per phase / round), final.pt (the final model).
    """

    def __init__(self, cfg: FederationConfig) -> None:
        self.cfg = cfg
        self.dir = cfg.run_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        saved = self.dir / "config.json"
        fingerprint = cfg.fingerprint()
        if saved.exists():
            old = json.loads(saved.read_text(encoding="utf-8"))
            if old != fingerprint:
                keys = set(old) | set(fingerprint)
                diff = sorted(k for k in keys if old.get(k) != fingerprint.get(k))
                raise InputError(
                    f"{saved}: this run folder was made by a different run config "
                    f"(differs in {', '.join(diff)}); change run-name or delete the folder"
                )
        else:
            atomic_write_json(saved, fingerprint)

    @property
    def metrics_path(self) -> Path:
        return self.dir / "metrics.jsonl"

    def load_sources(self) -> tuple[list[StateDict], list[str]] | None:
        path = self.dir / "sources.pt"
        if not path.exists():
            return None
        saved = torch.load(path, map_location="cpu", weights_only=True)
        return saved["sources"], saved["names"]

    def save_sources(self, sources: Sequence[StateDict], names: Sequence[str]) -> None:
        atomic_torch_save({"sources": list(sources), "names": list(names)}, self.dir / "sources.pt")

    def load_merged(self) -> tuple[StateDict, ModelInfo] | None:
        path = self.dir / "merged.pt"
        if not path.exists():
            return None
        saved = torch.load(path, map_location="cpu", weights_only=True)
        return saved["state_dict"], ModelInfo(**saved["info"])

    def save_merged(
        self, state: StateDict, info: ModelInfo, summary: list[dict[str, Any]],
        metrics: Mapping[str, float],
    ) -> None:  # fmt: skip
        atomic_write_json(self.dir / "coefficient_summary.json", summary)
        atomic_torch_save(
            {"state_dict": state, "info": dataclasses.asdict(info), "arch": info.arch,
             "metrics": dict(metrics)},
            self.dir / "merged.pt",
        )  # fmt: skip

    def load_checkpoint(self) -> dict[str, Any] | None:
        """{'round', 'state_dict', 'strategy', 'history'} of the last completed round."""
        path = self.dir / "checkpoint.pt"
        if not path.exists():
            return None
        return torch.load(path, map_location="cpu", weights_only=True)

    def save_round(
        self,
        server_round: int,
        state: Mapping[str, torch.Tensor],
        strategy_state: Mapping[str, Any],
        history: Sequence[Mapping[str, Any]],
    ) -> None:
        atomic_torch_save(
            {"round": server_round, "state_dict": dict(state), "strategy": dict(strategy_state),
             "history": [dict(h) for h in history]},
            self.dir / "checkpoint.pt",
        )  # fmt: skip

    def save_final(self, state: Mapping[str, torch.Tensor], info: ModelInfo) -> None:
        atomic_torch_save(
            {"arch": info.arch, "state_dict": dict(state), **info.as_config()},
            self.dir / "final.pt",
        )

    def log(self, record: Mapping[str, Any]) -> None:
        append_jsonl(self.metrics_path, dict(record))

    def records(self) -> list[dict[str, Any]]:
        return read_jsonl(self.metrics_path)


def round_table(history: Sequence[Mapping[str, Any]]) -> Table:
    """Per-round metrics as a rich table (the console view of metrics.jsonl)."""
    table = Table(title="Federated fine-tuning")
    columns = [
        ("round", "round", "{}"), ("sites", "sites", "{}"), ("rejected", "rejected", "{}"),
        ("train loss", "train_loss", "{:.4f}"), ("test acc", "eval_accuracy", "{:.4f}"),
        ("test macro-F1", "eval_macro_f1", "{:.4f}"), ("test AUROC", "eval_auroc", "{:.4f}"),
        ("InMerge kernels", "inmerge_kernels", "{}"), ("MB sent", "mbytes", "{:.1f}"),
        ("seconds", "seconds", "{:.1f}"),
    ]  # fmt: skip
    for title, _, _ in columns:
        table.add_column(title, justify="right")
    for row in history:
        cells = []
        for _, key, fmt in columns:
            value = row.get(key)
            cells.append("-" if value is None else fmt.format(value))
        table.add_row(*cells)
    return table


def render(table: Table, width: int = 120) -> str:
    """A rich table as plain text, for log files and `flwr log`."""
    buffer = io.StringIO()
    Console(file=buffer, width=width, force_terminal=False, color_system=None).print(table)
    return buffer.getvalue()


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """A short content hash of a state dict (resume and reproducibility checks)."""
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def model_reference(info: ModelInfo) -> tuple[StateDict, list[str], list[str]]:
    """(meta state dict: keys, shapes, dtypes; conv keys in InMerge order; norm-layer keys)."""
    with torch.device("meta"):
        model = info.build()
    return dict(model.state_dict()), conv_weight_keys(model), norm_keys(model)
