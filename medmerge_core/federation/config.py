"""The run config (`FederationConfig`) and one node's settings (`NodeSettings`).

`FederationConfig` is `[tool.flwr.app.config]` plus `-c` overrides, typed and checked;
`node_settings` turns a node config (deployment) or a partition id (simulation) into a role,
its private data and its checkpoint.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medmerge_core.errors import InputError
from medmerge_core.inmerge import InMergeConfig
from medmerge_core.probe import DEFAULT_COEF_LR, DEFAULT_STEPS, ProbeSettings

ROLES: tuple[str, ...] = ("institution", "coordinator", "site")
DP_MODES: tuple[str, ...] = ("none", "server", "client")
# Settings that may change between a run and its resumption without invalidating it.
RESUMABLE_CHANGES: frozenset[str] = frozenset({"rounds", "timeout", "device", "output_dir"})


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
    # Phase 2 (the MedMerge probe at the coordinator): a budget of merge-steps optimiser steps,
    # or merge-epochs epochs when that is > 0; coefficients at merge-coef-lr without weight
    # decay, BN and head at merge-lr with weight-decay.
    merge_steps: int = DEFAULT_STEPS
    merge_epochs: int = 0
    merge_coef_lr: float = DEFAULT_COEF_LR
    merge_lr: float = 1e-3
    merge_granularity: str = "kernel"
    merge_constraint: str = "none"
    merge_freeze_bn: bool = False
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
        names = ("rounds", "local_epochs", "merge_steps", "merge_epochs", "pretrain_epochs",
                 "wait_nodes")  # fmt: skip
        for name in names:
            if getattr(self, name) < 0:
                raise InputError(f"run config {name.replace('_', '-')}: must be >= 0")
        if self.min_sites < 1 or self.batch_size < 1:
            raise InputError("run config min-sites and batch-size: must be >= 1")
        if self.outlier_factor <= 1:
            raise InputError("run config outlier-factor: must be > 1")
        self.inmerge_config()  # validates p / tau / alpha / skip-layers
        try:
            self.probe_settings()
        except InputError as exc:
            raise InputError(f"run config {exc}") from exc

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

    def probe_settings(self) -> ProbeSettings:
        """The coordinator's probe: merge-epochs epochs when > 0, else merge-steps steps (both
        0: the sources' uniform average, untrained)."""
        by_epochs = self.merge_epochs > 0
        return ProbeSettings(
            granularity=self.merge_granularity,
            freeze_bn=self.merge_freeze_bn,
            constraint=self.merge_constraint,
            coef_lr=self.merge_coef_lr,
            steps=None if by_epochs else self.merge_steps,
            epochs=self.merge_epochs if by_epochs else None,
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
    state_dir: str | None = None  # a site's FedBN layers (default: inside the run folder)


def node_settings(node_config: Mapping[str, Any], cfg: FederationConfig) -> NodeSettings:
    """Deployment: keys `role`, `name`, `data`, `shard` ('i/k'), `checkpoint`, `device`,
    `in-channels`, `state-dir`. Simulation: `partition-id` picks a role from `sim-roles`; the
    target data is split between the coordinator and the sites, each institution gets its own
    dataset."""
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
            state_dir=_opt_str(node_config.get("state-dir")),
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
