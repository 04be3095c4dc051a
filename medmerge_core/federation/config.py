"""The run config (`FederationConfig`) and one node's settings (`NodeSettings`).

`FederationConfig` is `[tool.flwr.app.config]` plus `-c` overrides, typed and checked;
`node_settings` turns a node config (deployment) or a partition id (simulation) into a role,
its private data and its checkpoint.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medmerge_core.coerce import from_flat
from medmerge_core.errors import InputError
from medmerge_core.settings import InMergeSettings, ProbeSettings, StageSettings

ROLES: tuple[str, ...] = ("institution", "coordinator", "site")
DP_MODES: tuple[str, ...] = ("none", "server", "client")
AGGREGATIONS: tuple[str, ...] = ("mean", "median", "trimmed-mean")
PROBE_MODES: tuple[str, ...] = ("coordinator", "federated")
# Settings that may change between a run and its resumption without invalidating it.
RESUMABLE_CHANGES: frozenset[str] = frozenset(
    {
        "rounds",
        "timeout",
        "device",
        "output_dir",
        "dp_max_epsilon",
        "node_threads",
        "secagg_timeout",
    }
)
# Names that become a folder or file name (run-name, a node's name): one safe path component.
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# The probe's settings were merge-* keys: "merge" now names only the arithmetic.
PROBE_KEYS_ONCE_MERGE = ("steps", "epochs", "coef-lr", "granularity", "constraint", "freeze-bn",
                         "lr", "weight-decay", "mode", "rounds")  # fmt: skip
# Run-config keys that were renamed: a one-line pointer instead of "unknown key".
RENAMED_KEYS = {
    "local-epochs": "renamed ft-epochs",
    "weight-decay": "now per phase: pretrain-weight-decay, probe-weight-decay, ft-weight-decay",
    **{f"merge-{key}": f"renamed probe-{key}" for key in PROBE_KEYS_ONCE_MERGE},
}


@dataclass(frozen=True)
class FederationConfig:
    """The run config (`[tool.flwr.app.config]` plus `-c` overrides), typed and checked.

    Flat dashed keys (`coerce.from_flat`): a field `batch_size` is `batch-size`; a block's
    fields are `<block>-<field>` (`ft-lr`, `probe-coef-lr`, `inmerge-tau`); `inmerge` alone is
    its on/off switch. Tuples are comma-separated strings.
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
    # Sharded training data (node config `shard = "i/k"`, and every simulated target holder):
    # 0 splits each class evenly; alpha > 0 skews the labels, Dirichlet(alpha) per class.
    label_skew: float = 0.0
    # Deployment: how many nodes to wait for before starting (0: every one already there).
    wait_nodes: int = 0
    # CPU threads for a node's work that the others wait on (the coordinator's probe, an
    # institution's pretraining); 0: the cores its process may use, shared in simulation among
    # the nodes of its role (federation.roles.solo_threads).
    node_threads: int = 0
    # Phase 1: institutions pretrain when they have data and no checkpoint yet.
    pretrain: StageSettings = field(default_factory=lambda: StageSettings(epochs=2, lr=1e-3))
    # Phase 2: the MedMerge probe at the coordinator; BN and head at probe-lr, probe-weight-decay
    # (the probe's BN/head rate: lp.lr in an experiment config, probe-lr in a run config).
    probe: ProbeSettings = field(default_factory=ProbeSettings)
    probe_lr: float = 1e-3
    probe_weight_decay: float = 0.01
    # Who learns the merge: "coordinator" (one node, on its own target data) or "federated"
    # (every site, the probe's budget spread over `probe-rounds` rounds, each round averaged by
    # the server with the fine-tuning's screening, robust aggregation and DP;
    # federation.merge_rounds).
    probe_mode: str = "coordinator"
    probe_rounds: int = 5
    # Phase 3: federated fine-tuning at the sites, `ft` per round, InMerge on each aggregate.
    rounds: int = 3
    ft: StageSettings = field(default_factory=lambda: StageSettings(epochs=1, lr=1e-4))
    fedbn: bool = False
    inmerge: InMergeSettings | None = field(default_factory=InMergeSettings)  # on each aggregate
    # Site-side InMerge before every local training step (off unless `inmerge-local = true`).
    inmerge_local: InMergeSettings | None = None
    min_sites: int = 2
    outlier_factor: float = 10.0
    # No site's example count weighs more than this share of a round's total (mean only).
    max_weight_share: float = 0.5
    min_cosine: float = 0.0  # reject an update pointing away from the others' median update
    aggregation: str = "mean"  # mean (FedAvg), median (FedMedian), trimmed-mean (FedTrimmedAvg)
    trim_fraction: float = 0.2  # trimmed-mean: the share cut at each end
    fp16: bool = False
    # DP-FedAvg (federation.privacy): clip each site's parameter update, noise the sum.
    dp: str = "none"  # none, server (the server clips), client (each site clips its own update)
    dp_clipping_norm: float = 1.0
    dp_noise_multiplier: float = 0.0
    dp_delta: float = 1e-5  # the delta at which the run reports its epsilon
    # Stop (with the last model within budget) before a round would take epsilon past this;
    # 0: no budget.
    dp_max_epsilon: float = 0.0
    # Under DP, replies carry only what the mechanism covers; true also sends the sites' exact
    # train/validation/test metrics and pooled-evaluation counts (not covered by epsilon).
    dp_release_metrics: bool = False
    # The consortium operator's Ed25519 public key ("ssh-ed25519 AAAA..."): when set, a node's
    # role and name come from an identity the operator signed for its SuperNode key
    # (federation.identity), never from what the node says. Empty: self-declared (simulation).
    operator_key: str = ""
    timeout: float = 1800.0
    # Secure aggregation of the fine-tuning rounds (Flower's SecAgg+; server/secagg.py,
    # docs/secure-aggregation.md): the server gets only the weighted mean of the sites'
    # updates. Shares and threshold are fractions (of the sites, of the shares); the clipping
    # range bounds each coordinate of a site's weighted update; the timeout is per protocol
    # stage (0: `timeout`).
    secagg: bool = False
    secagg_num_shares: float = 1.0
    secagg_threshold: float = 0.6
    secagg_clipping_range: float = 8.0
    secagg_timeout: float = 0.0

    def __post_init__(self) -> None:
        check_name("run-name", self.run_name)
        bad = [r for r in self.sim_roles if r not in ROLES]
        if bad:
            raise InputError(f"sim-roles: unknown role '{bad[0]}'; expected {ROLES}")
        if self.dp not in DP_MODES:
            raise InputError(f"dp: expected one of {DP_MODES}, got '{self.dp}'")
        if self.dp != "none":
            if self.aggregation != "mean":
                raise InputError(
                    f"aggregation: '{self.aggregation}' with dp='{self.dp}'; DP needs 'mean' "
                    "(its noise is calibrated to a sum of clipped updates)"
                )
            if not self.dp_clipping_norm > 0 or self.dp_noise_multiplier < 0:
                raise InputError("dp-clipping-norm: must be > 0 (and dp-noise-multiplier >= 0)")
            if not 0 < self.dp_delta < 1:
                raise InputError(f"dp-delta: must be in (0, 1), got {self.dp_delta}")
        if self.dp_max_epsilon < 0:
            raise InputError(
                f"dp-max-epsilon: must be >= 0 (0: no budget), got {self.dp_max_epsilon}"
            )
        if not 0 < self.max_weight_share <= 1:
            raise InputError(f"max-weight-share: must be in (0, 1], got {self.max_weight_share}")
        if self.label_skew < 0:
            raise InputError(f"label-skew: must be >= 0 (0: stratified), got {self.label_skew}")
        if self.probe_mode not in PROBE_MODES:
            raise InputError(f"probe-mode: expected one of {PROBE_MODES}, got '{self.probe_mode}'")
        if self.probe_rounds < 1:
            raise InputError(f"probe-rounds: must be >= 1, got {self.probe_rounds}")
        for name in ("rounds", "wait_nodes", "node_threads"):
            if getattr(self, name) < 0:
                raise InputError(f"{name.replace('_', '-')}: must be >= 0")
        if self.min_sites < 1 or self.batch_size < 1:
            raise InputError("min-sites and batch-size: must be >= 1")
        if self.outlier_factor <= 1:
            raise InputError("outlier-factor: must be > 1")
        if not -1.0 <= self.min_cosine <= 1.0:
            raise InputError(f"min-cosine: must be in [-1, 1], got {self.min_cosine}")
        if self.aggregation not in AGGREGATIONS:
            raise InputError(f"aggregation: unknown '{self.aggregation}'; expected {AGGREGATIONS}")
        if not 0.0 <= self.trim_fraction < 0.5:
            raise InputError(f"trim-fraction: must be in [0, 0.5), got {self.trim_fraction}")
        if not self.probe_lr > 0 or self.probe_weight_decay < 0:
            raise InputError("probe-lr: must be > 0 (and probe-weight-decay >= 0)")
        self._check_secagg()

    def _check_secagg(self) -> None:
        """What SecAgg+ can be combined with: anything that needs a site's own update at the
        server (server-side DP clipping, robust rules, per-update screening), the federated
        probe's rounds (not masked) and fewer than 3 sites are refused."""
        if not 0 < self.secagg_num_shares <= 1 or not 0 < self.secagg_threshold <= 1:
            raise InputError("secagg-num-shares and secagg-threshold: must be in (0, 1]")
        if not self.secagg_clipping_range > 0 or self.secagg_timeout < 0:
            raise InputError("secagg-clipping-range: must be > 0 (and secagg-timeout >= 0)")
        if not self.secagg:
            return
        need = "per-update values the server never sees under secagg = true"
        if self.aggregation != "mean":
            raise InputError(f"aggregation: '{self.aggregation}' needs {need}; use 'mean'")
        if self.dp == "server":
            raise InputError(f'dp: "server" clips each update at the server, {need}; use "client"')
        if self.min_cosine > -1.0:
            raise InputError(f"min-cosine: the direction screen needs {need}; set -1 (off)")
        if self.outlier_factor != float("inf"):
            raise InputError(f"outlier-factor: the norm screen needs {need}; set inf (off)")
        if self.probe_mode != "coordinator":
            raise InputError(
                'probe-mode: "federated" probe rounds are not secure-aggregated; use '
                '"coordinator" with secagg = true'
            )
        if self.min_sites < 3:
            raise InputError(
                f"min-sites: {self.min_sites} with secagg = true; SecAgg+ needs 3 or more (with 2 "
                "each site can subtract its own update from the mean, and none may drop out)"
            )
        if self.dp == "client" and self.secagg_clipping_range < self.dp_clipping_norm:
            raise InputError(
                f"secagg-clipping-range: {self.secagg_clipping_range} < dp-clipping-norm "
                f"{self.dp_clipping_norm}; a clipped update's coordinates can reach the norm"
            )

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> FederationConfig:
        """Typed config from Flower's flat run config; unknown keys are errors (typos)."""
        return from_flat(cls, run_config, "run config", renamed=RENAMED_KEYS)

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
    state_dir: str | None = None  # a site's FedBN layers (site_state.site_state_dir)
    audit_dir: str | None = None  # the node's audit log (audit.audit_file)
    simulated: bool = False  # from a partition id: every node shares one disk
    identity: str | None = None  # the operator-signed identity token file (federation.identity)
    identity_key: str | None = None  # the SuperNode's private key, to prove the identity

    def __post_init__(self) -> None:
        check_name("node config name", self.name)


def check_name(field_name: str, value: str) -> None:
    """A name that becomes a path must be one safe component: no '/', '..' or absolute path."""
    if not SAFE_NAME.match(value):
        raise InputError(
            f"{field_name}: '{value[:80]}' is not a safe name (letters, digits, '.', '_', '-'; "
            "starting with a letter or digit; at most 64 characters)"
        )


def node_settings(node_config: Mapping[str, Any], cfg: FederationConfig) -> NodeSettings:
    """Deployment: keys `role`, `name`, `data`, `shard` ('i/k'), `checkpoint`, `device`,
    `in-channels`, `state-dir`, `audit-dir`, `identity`, `identity-key`. Simulation:
    `partition-id` picks a role from `sim-roles`; the target data is split between the
    coordinator and the sites, each institution gets its own dataset."""
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
            audit_dir=_opt_str(node_config.get("audit-dir")),
            identity=_opt_str(node_config.get("identity")),
            identity_key=_opt_str(node_config.get("identity-key")),
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
            simulated=True,
        )
    holders = [i for i, r in enumerate(cfg.sim_roles) if r != "institution"]
    index = holders.index(pid)
    name = "coordinator" if role == "coordinator" else f"site-{index}"
    return NodeSettings(
        role, name, cfg.sim_target_data, (index, len(holders)), None, cfg.device, simulated=True
    )


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
