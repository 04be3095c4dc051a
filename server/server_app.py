"""The ServerApp: discover the roles, collect the backbones, learn the merge (at the coordinator
or federated over the sites), fine-tune.

Each phase's output is saved in the run folder (`FederationRun`) and the strategy checkpoints
every round, so running the same run config again skips finished phases and resumes."""

from __future__ import annotations

import logging
import time
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.serverapp import Grid, ServerApp

from medmerge_core.errors import InputError
from medmerge_core.federation import protocol
from medmerge_core.federation.config import FederationConfig
from medmerge_core.federation.identity import new_challenge
from medmerge_core.federation.members import Member, admit, read_member
from medmerge_core.federation.merge_rounds import ProbePlan
from medmerge_core.federation.rounds import check_rule, read_metrics
from medmerge_core.federation.run import FederationRun
from medmerge_core.federation.transport import ModelInfo, compress
from medmerge_core.federation.validation import accept_merged, check_backbone
from medmerge_core.models import StateDict
from server.messages import addressee, ask, usable
from server.phases import FineTuningRounds, ProbeRounds

log = logging.getLogger("flwr")
app = ServerApp()

Roles = dict[int, Member]  # node id -> the member it was admitted as


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_federation(grid, context.run_config)


def run_federation(grid: Grid, run_config: dict[str, Any]) -> list[dict[str, Any]]:
    """All three phases; returns the per-round history (also in metrics.jsonl)."""
    cfg = FederationConfig.from_run_config(run_config)
    run = FederationRun(cfg)
    log.info("MedMerge federation: run folder %s", run.dir)
    roles = discover(grid, cfg)
    sites = _sites(roles)
    for warning in check_rule(cfg.aggregation, cfg.trim_fraction, len(sites), cfg.min_cosine):
        log.warning("%s", warning)
    merged = run.load_merged()
    if merged is None:
        saved = run.load_sources()
        if saved is None:
            saved = collect(grid, cfg, roles)
            run.save_sources(*saved)
        learn = merge if cfg.probe_mode == "coordinator" else merge_federated
        merged = learn(grid, cfg, roles, *saved, run)
    state, info, releases = merged
    strategy = FineTuningRounds(cfg, info, sites, run, releases)
    strategy.start(grid, ArrayRecord(state), cfg.rounds, cfg.timeout)
    return strategy.history


def discover(grid: Grid, cfg: FederationConfig) -> Roles:
    """Ask every node who it is (the server never sees node configs) and admit it as a
    `Member`: with `operator-key`, from the identity the operator signed for its SuperNode key
    (proved against a fresh challenge); a malformed reply, a forged identity, a name two nodes
    claim or a second coordinator is refused with a log line naming the node."""
    deadline = time.monotonic() + cfg.timeout
    while len(list(grid.get_node_ids())) < cfg.wait_nodes and time.monotonic() < deadline:
        time.sleep(1.0)
    nodes = sorted(grid.get_node_ids())
    challenge = new_challenge() if cfg.operator_key else ""
    content = RecordDict({protocol.CONFIG: ConfigRecord({protocol.CHALLENGE: challenge})})
    sent, replies = ask(grid, nodes, protocol.QUERY_INFO, content, cfg.timeout)
    claims: dict[int, Member] = {}
    for reply in replies:
        if not usable("discover", reply, sent, {}):
            continue
        node = addressee(reply, sent)
        try:
            claims[node] = read_member(reply.content[protocol.INFO], cfg.operator_key, challenge)
        except (InputError, KeyError, TypeError, ValueError) as exc:
            log.warning("discover: node %d refused: %s", node, exc)
    roles, refused = admit(claims)
    for node, reason in refused.items():
        log.warning("discover: node %d refused: %s", node, reason)
    log.info("nodes: %s", {n: f"{m.role} {m.name}" for n, m in sorted(roles.items())})
    return roles


def _with_role(roles: Roles, role: str) -> list[int]:
    return [n for n, m in sorted(roles.items()) if m.role == role]


def _sites(roles: Roles) -> dict[int, Member]:
    return {n: roles[n] for n in _with_role(roles, "site")}


def collect(grid: Grid, cfg: FederationConfig, roles: Roles) -> tuple[list[StateDict], list[str]]:
    """Phase 1: every institution returns its (possibly freshly pretrained) backbone."""
    content = RecordDict({protocol.CONFIG: ConfigRecord({protocol.ARCH: cfg.arch})})
    institutions = _with_role(roles, "institution")
    sent, replies = ask(grid, institutions, protocol.QUERY_BACKBONE, content, cfg.timeout)
    found: list[tuple[str, StateDict]] = []
    for reply in (r for r in replies if usable("collect", r, sent, roles)):
        node = addressee(reply, sent)
        try:
            state = reply.content[protocol.ARRAYS].to_torch_state_dict()
        except (KeyError, TypeError) as exc:
            log.warning("collect: rejected reply from node %d: no arrays (%r)", node, exc)
            continue
        reason = check_backbone(state, cfg.arch, allow_fp16=cfg.fp16)
        if reason is None:
            found.append((roles[node].name, state))  # the admitted name, not a claimed one
        else:
            log.warning("collect: rejected backbone from node %d: %s", node, reason)
    if len(found) < 2:
        raise RuntimeError(f"collect: {len(found)} usable backbone(s); MedMerge needs 2 or more")
    found.sort(key=lambda pair: pair[0])  # arrival order is not stable
    log.info("collect: %d sources: %s", len(found), [name for name, _ in found])
    return [state for _, state in found], [name for name, _ in found]


def merge(grid: Grid, cfg: FederationConfig, roles: Roles, sources: list[StateDict],
          names: list[str], run: FederationRun) -> tuple[StateDict, ModelInfo, int]:  # fmt: skip
    """Phase 2: the coordinator learns the merge on its data and returns the baked model."""
    coordinators = _with_role(roles, "coordinator")
    if not coordinators:
        raise RuntimeError("merge: no node has role 'coordinator'")
    content = RecordDict({
        **{protocol.source_key(i): ArrayRecord(compress(s, cfg.fp16))
           for i, s in enumerate(sources)},
        protocol.CONFIG: ConfigRecord({protocol.NAMES: names, protocol.ARCH: cfg.arch}),
    })  # fmt: skip
    sent, replies = ask(grid, coordinators[:1], protocol.TRAIN_MERGE, content, cfg.timeout)
    if not replies or not usable("merge", replies[0], sent, roles):
        raise RuntimeError("merge: the coordinator did not return a merged model")
    try:
        reply = replies[0].content
        info = ModelInfo.from_config(reply.config_records[protocol.INFO])
        raw = reply.array_records[protocol.ARRAYS].to_torch_state_dict()
        learned = reply.array_records[protocol.COEFFICIENTS].to_torch_state_dict()
    except (KeyError, TypeError, ValueError) as exc:
        raise RuntimeError(f"merge: malformed reply from the coordinator ({exc!r})") from None
    coefficients = {k: v.numpy() for k, v in learned.items()}
    state = accept_merged(raw, coefficients, info, len(names), allow_fp16=cfg.fp16)
    sent = tuple(compress(s, cfg.fp16) for s in sources)  # what the coordinator merged
    reason = ProbePlan(sent, tuple(names), info, cfg.probe, cfg.seed).check_baked(
        raw, coefficients, cfg.fp16
    )
    if reason is not None:
        raise RuntimeError(f"merge: the coordinator's model is not the merge it reports: {reason}")
    metrics = read_metrics(reply.metric_records.get(protocol.METRICS, {}))
    if isinstance(metrics, str):
        log.warning("merge: the coordinator's metrics are left out: %s", metrics)
        metrics = {}
    run.save_merged(state, info, coefficients, names, metrics)
    run.log({"phase": "merge", "sources": names, **metrics})
    log.info("merge: %s", metrics)
    return state, info, 0


def merge_federated(
    grid: Grid,
    cfg: FederationConfig,
    roles: Roles,
    sources: list[StateDict],
    names: list[str],
    run: FederationRun,
) -> tuple[StateDict, ModelInfo, int]:
    """Phase 2, federated: every site trains the probe each round (`ProbeRounds`), the
    server bakes the last aggregate once. Returns (merged model, its description, DP releases)."""
    sites = _sites(roles)
    if not sites:
        raise RuntimeError("merge: probe-mode 'federated' needs nodes with role 'site'")
    if _with_role(roles, "coordinator"):
        log.info("probe-mode 'federated': the coordinator node takes no part")
    info = target_info(grid, cfg, roles, list(sites))
    plan = ProbePlan(tuple(sources), tuple(names), info, cfg.probe, cfg.seed)
    strategy = ProbeRounds(cfg, plan, sites, run)
    result = strategy.start(grid, ArrayRecord(plan.initial), cfg.probe_rounds, cfg.timeout)
    state, coefficients = plan.bake(result.arrays.to_torch_state_dict())
    last = strategy.history[-1] if strategy.history else {}
    sent = {k: v for k, v in plan.initial.items() if k in strategy.keys}
    floats = {k: v for k, v in state.items() if v.is_floating_point()}
    metrics = {
        **{k: v for k, v in last.items() if k == "train_loss" or k.startswith("val_")},
        "probe_mbytes": ArrayRecord(compress(sent, cfg.fp16)).count_bytes() / 2**20,
        "model_mbytes": ArrayRecord(compress(floats, cfg.fp16)).count_bytes() / 2**20,
    }
    run.save_merged(state, info, coefficients, names, metrics, strategy.releases)
    run.log({"phase": "merge", "mode": "federated", "sources": names, **metrics})
    log.info("merge: federated over %d rounds: %s", cfg.probe_rounds, metrics)
    return state, info, strategy.releases


def target_info(grid: Grid, cfg: FederationConfig, roles: Roles, sites: list[int]) -> ModelInfo:
    """The model the sites' target data needs: every site that answers must agree."""
    sent, replies = ask(grid, sites, protocol.QUERY_TARGET, RecordDict(), cfg.timeout)
    found = {}
    for reply in (r for r in replies if usable("merge", r, sent, roles)):
        node = addressee(reply, sent)
        try:
            found[node] = ModelInfo.from_config(reply.content[protocol.INFO])
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("merge: node %d described no usable target (%r)", node, exc)
    if not found:
        raise RuntimeError("merge: no site described its target data")
    if len(set(found.values())) > 1:
        raise RuntimeError(f"merge: the sites' target data disagree: {found}")
    return next(iter(found.values()))
