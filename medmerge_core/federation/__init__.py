"""Federated MedMerge: everything the Flower adapters in client/ and server/ delegate to.

No Flower imports here, so every role, check and file format is testable with plain tensors:

- `config`: `FederationConfig` (the run config) and `NodeSettings` (one node's role, data and
  checkpoint, from its node config in deployment or its partition id in simulation);
- `data`: data specs and deterministic, label-stratified shards of a node's data;
- `roles`: `Node`, one node with its role, settings and data; its methods are the roles'
  steps: `backbone` (institution), `merge` (coordinator), `probe_round` / `train` /
  `evaluate` (site, from `site_steps`);
- `site_steps`: `SiteSteps`, the site's steps that `Node` mixes in (local fine-tuning, a
  federated probe round, evaluation, its FedBN norm layers, what of a trained state leaves);
- `merge_rounds`: the federated merge probe (`probe-mode = "federated"`): `ProbePlan`, the
  server's start, keys and bake, and the digest by which sites cache the sources;
- `members`: `Member`, a node as admitted at discovery (role, name, data sizes); duplicate
  names and coordinators refused;
- `identity`: operator-signed node identities and the node's proof of its SuperNode key;
- `protocol`: the wire protocol: every message type, record key and config key by name, and
  the layouts of the replies' `info` (`NodeInfo`, `ModelDescription`, `BackboneInfo`);
- `rounds`: one round's arithmetic at the server: each reply's format checked, screening, the
  weight cap, mean / median / trimmed mean or DP-FedAvg (`aggregate_round`), and the whole
  round as the strategy runs it (`combine_round`, `pool_evaluations`);
- `validation`: reply screening (`screen_replies`): keys, shapes, dtypes, NaN/Inf and
  update-norm outliers; the coordinator's merged model and coefficients;
- `privacy`: DP-FedAvg's clipping and noised mean, and its accountant;
- `secure_sum`: the arithmetic around secure aggregation (SecAgg+): what a site puts into the
  masked sum, what the server does with the unmasked mean (`combine_secure_round`), the mask
  generator;
- `audit`: a node's audit log (hashes of what it sent and received, metric values, failures);
- `site_policy`: a site's own policy (the roles and messages it serves, whether apps need
  approval, privacy floors, limits) and the check of each message against it;
- `site_approvals`: the site's approvals file (pending / approved / rejected / revoked
  digests); `site_digests`: the digests it names (an app's files, a run config);
- `site_enforcement`: the node's side of its policy: its decision on a message (what is first
  seen recorded as pending) and a refusal logged, audited and raised;
- `transport`: `ModelInfo`, the keys that travel (FedBN), fp16 compression and dtype
  restoration after FedAvg;
- `site_state`: `FedBNStore`, a site's private norm layers per round on its own disk;
- `run`: `FederationRun`, the run folder with atomic per-phase and per-round checkpoints, so a
  restarted ServerApp with the same run config resumes after its last completed round.
"""
