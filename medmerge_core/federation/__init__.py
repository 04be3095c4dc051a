"""Federated MedMerge: everything the Flower adapters in client/ and server/ delegate to.

No Flower imports here, so every role, check and file format is testable with plain tensors:

- `config`: `FederationConfig` (the run config) and `NodeSettings` (one node's role, data and
  checkpoint, from its node config in deployment or its partition id in simulation);
- `data`: data specs and deterministic, label-stratified shards of a node's data;
- `roles`: the three roles as plain functions: `institution_backbone`, `coordinator_merge`,
  `site_train` / `site_evaluate`;
- `validation`: reply screening (`screen_replies`): keys, shapes, dtypes, NaN/Inf and
  update-norm outliers;
- `transport`: `ModelInfo`, fp16 compression, dtype restoration after FedAvg, FedBN keys,
  InMerge on an aggregate;
- `site_state`: `FedBNStore`, a site's private norm layers per round on its own disk;
- `run`: `FederationRun`, the run folder with atomic per-phase and per-round checkpoints, so a
  restarted ServerApp with the same run config resumes after its last completed round.
"""

from medmerge_core.federation.config import (
    DP_MODES,
    RESUMABLE_CHANGES,
    ROLES,
    FederationConfig,
    NodeSettings,
    node_settings,
)
from medmerge_core.federation.data import load_node_data, parse_data_spec, shard_task
from medmerge_core.federation.roles import (
    coordinator_merge,
    institution_backbone,
    site_evaluate,
    site_train,
)
from medmerge_core.federation.run import FederationRun, render, round_table, state_digest
from medmerge_core.federation.site_state import FedBNStore, site_state_dir
from medmerge_core.federation.transport import (
    ModelInfo,
    apply_inmerge,
    compress,
    model_reference,
    norm_keys,
    restore_dtypes,
    transport_keys,
)
from medmerge_core.federation.validation import (
    check_backbone,
    check_coefficients,
    check_update,
    screen_replies,
    update_norm,
)

__all__ = [
    "DP_MODES",
    "RESUMABLE_CHANGES",
    "ROLES",
    "FedBNStore",
    "FederationConfig",
    "FederationRun",
    "ModelInfo",
    "NodeSettings",
    "apply_inmerge",
    "check_backbone",
    "check_coefficients",
    "check_update",
    "compress",
    "coordinator_merge",
    "institution_backbone",
    "load_node_data",
    "model_reference",
    "node_settings",
    "norm_keys",
    "parse_data_spec",
    "render",
    "restore_dtypes",
    "round_table",
    "screen_replies",
    "shard_task",
    "site_evaluate",
    "site_state_dir",
    "site_train",
    "state_digest",
    "transport_keys",
    "update_norm",
]
