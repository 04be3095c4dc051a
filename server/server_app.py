"""The ServerApp: discover roles, collect backbones, merge at the coordinator, fine-tune.

Flower plumbing only: what is sent where and when. Every phase's output and every round is
checkpointed in the run folder (medmerge_core.federation.FederationRun), so running the same
run config again skips finished phases and resumes after the last completed round.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from medmerge_core.federation.config import FederationConfig
from medmerge_core.federation.run import FederationRun, render, round_table
from medmerge_core.federation.transport import (
    ModelInfo,
    compress,
    model_reference,
    restore_dtypes,
    transport_keys,
)
from medmerge_core.federation.validation import check_backbone, check_coefficients, check_update
from medmerge_core.models import StateDict
from server.strategy import MedMergeFedAvg, addressee

log = logging.getLogger("flwr")
app = ServerApp()

Roles = dict[int, tuple[str, str]]  # node id -> (role, name)


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_federation(grid, context.run_config)


def run_federation(grid: Grid, run_config: dict[str, Any]) -> list[dict[str, Any]]:
    """All three phases; returns the per-round history (also in metrics.jsonl)."""
    cfg = FederationConfig.from_run_config(run_config)
    run = FederationRun(cfg)
    log.info("MedMerge federation: run folder %s", run.dir)
    roles = discover(grid, cfg)
    merged = run.load_merged()
    if merged is None:
        saved = run.load_sources()
        if saved is None:
            saved = collect(grid, cfg, roles)
            run.save_sources(*saved)
        else:
            log.info("collect: reusing %d sources from %s", len(saved[0]), run.dir)
        merged = merge(grid, cfg, roles, *saved, run)
    else:
        log.info("merge: reusing the merged model from %s", run.dir)
    return fine_tune(grid, cfg, run, roles, *merged)


def _send(grid: Grid, messages: list[Message], cfg: FederationConfig) -> list[Message]:
    return list(grid.send_and_receive(messages, timeout=cfg.timeout)) if messages else []


def _failed(phase: str, reply: Message, sent: list[Message], roles: Roles) -> bool:
    if reply.has_error():
        node = addressee(reply, sent)
        log.warning("%s: node %d (%s) failed: %s", phase, node, roles.get(node, ("?", "?"))[1],
                    reply.error.reason)  # fmt: skip
        return True
    return False


def discover(grid: Grid, cfg: FederationConfig) -> Roles:
    """Ask every node its role (the server never sees node configs)."""
    deadline = time.monotonic() + cfg.timeout
    while len(list(grid.get_node_ids())) < cfg.wait_nodes and time.monotonic() < deadline:
        time.sleep(1.0)
    nodes = sorted(grid.get_node_ids())
    messages = [Message(RecordDict(), dst_node_id=n, message_type="query.info") for n in nodes]
    roles: Roles = {}
    for reply in _send(grid, messages, cfg):
        if not _failed("discover", reply, messages, {}):
            info = reply.content["info"]
            roles[reply.metadata.src_node_id] = (str(info["role"]), str(info["name"]))
    log.info("nodes: %s", {n: f"{r} {name}" for n, (r, name) in sorted(roles.items())})
    return roles


def _with_role(roles: Roles, role: str) -> list[int]:
    return [n for n, (r, _) in sorted(roles.items()) if r == role]


def collect(grid: Grid, cfg: FederationConfig, roles: Roles) -> tuple[list[StateDict], list[str]]:
    """Phase 1: every institution returns its (possibly freshly pretrained) backbone."""
    config = ConfigRecord({"arch": cfg.arch})
    messages = [
        Message(RecordDict({"config": config}), dst_node_id=n, message_type="query.backbone")
        for n in _with_role(roles, "institution")
    ]
    sources, names = [], []
    for reply in _send(grid, messages, cfg):
        if _failed("collect", reply, messages, roles):
            continue
        node = reply.metadata.src_node_id
        state = reply.content["arrays"].to_torch_state_dict()
        reason = check_backbone(state, cfg.arch, allow_fp16=cfg.fp16)
        if reason is not None:
            log.warning("collect: rejected backbone from node %d (%s): %s", node,
                        roles[node][1], reason)  # fmt: skip
            continue
        sources.append(state)
        names.append(str(reply.content["info"]["source"]))
    order = sorted(range(len(names)), key=names.__getitem__)  # arrival order is not stable
    sources, names = [sources[i] for i in order], [names[i] for i in order]
    if len(sources) < 2:
        raise RuntimeError(f"collect: {len(sources)} usable backbone(s); MedMerge needs 2 or more")
    log.info("collect: %d sources: %s", len(sources), names)
    return sources, names


def merge(
    grid: Grid,
    cfg: FederationConfig,
    roles: Roles,
    sources: list[StateDict],
    names: list[str],
    run: FederationRun,
) -> tuple[StateDict, ModelInfo]:
    """Phase 2: the coordinator learns the merge on its data and returns the baked model."""
    coordinators = _with_role(roles, "coordinator")
    if not coordinators:
        raise RuntimeError("merge: no node has role 'coordinator'")
    content = RecordDict({
        **{f"source-{i}": ArrayRecord(compress(s, cfg.fp16)) for i, s in enumerate(sources)},
        "config": ConfigRecord({"names": names, "arch": cfg.arch}),
    })  # fmt: skip
    message = Message(content, dst_node_id=coordinators[0], message_type="train.merge")
    (reply,) = _send(grid, [message], cfg) or [None]
    if reply is None or _failed("merge", reply, [message], roles):
        raise RuntimeError("merge: the coordinator did not return a merged model")
    config = reply.content["info"]
    info = ModelInfo.from_config(config)
    state = reply.content["arrays"].to_torch_state_dict()
    meta = model_reference(info)[0]
    coefficients = {
        k: v.numpy() for k, v in reply.content["coefficients"].to_torch_state_dict().items()
    }
    reason = check_update(state, meta, allow_fp16=cfg.fp16) or check_coefficients(
        coefficients, meta, len(names)
    )
    if reason is not None:
        raise RuntimeError(f"merge: unusable merged model from the coordinator: {reason}")
    state = restore_dtypes(state, meta)
    metrics = dict(reply.content["metrics"])
    run.save_merged(state, info, coefficients, names, metrics)
    run.log({"phase": "merge", "sources": names, **metrics})
    log.info("merge: %s", metrics)
    return state, info


def _strategy(cfg: FederationConfig, fedavg: MedMergeFedAvg) -> Strategy:
    """Optionally wrap the strategy in Flower's fixed-clipping DP wrappers."""
    if cfg.dp == "none":
        return fedavg
    from flwr.serverapp.strategy import (
        DifferentialPrivacyClientSideFixedClipping,
        DifferentialPrivacyServerSideFixedClipping,
    )

    wrapper = (
        DifferentialPrivacyServerSideFixedClipping
        if cfg.dp == "server"
        else DifferentialPrivacyClientSideFixedClipping
    )
    return wrapper(fedavg, cfg.dp_noise_multiplier, cfg.dp_clipping_norm, len(fedavg.sites))


def _metrics(record: MetricRecord | None, prefix: str) -> dict[str, float]:
    if record is None:
        return {}
    return {prefix + k: float(v) for k, v in record.items() if k != "num-examples"}  # type: ignore[arg-type]


def fine_tune(
    grid: Grid,
    cfg: FederationConfig,
    run: FederationRun,
    roles: Roles,
    state: StateDict,
    info: ModelInfo,
) -> list[dict[str, Any]]:
    """Phase 3: R rounds among the sites; checkpoint after each; resume after the last one."""
    meta, _, norm = model_reference(info)
    keys = transport_keys(meta, norm, cfg.fedbn)
    sites = {n: roles[n][1] for n in _with_role(roles, "site")}
    fedavg = MedMergeFedAvg(cfg, info, sites)
    strategy = _strategy(cfg, fedavg)
    history: list[dict[str, Any]] = []
    start = 0
    saved = run.load_checkpoint()
    if saved is not None:
        state, start, history = saved["state_dict"], int(saved["round"]), saved["history"]
        fedavg.load_state_dict(saved["strategy"])
        log.info("resuming after round %d of %d from %s", start, cfg.rounds, run.dir)
    if cfg.fedbn:  # each site starts its private BN from the merged model's
        fedavg.extra = {"local-init": ArrayRecord({k: state[k] for k in norm})}
    for server_round in range(start + 1, cfg.rounds + 1):
        began = time.perf_counter()
        shared = ArrayRecord({k: state[k] for k in keys})
        config = ConfigRecord(info.as_config())
        replies = _send(grid, list(strategy.configure_train(server_round, shared, config, grid)),
                        cfg)  # fmt: skip
        arrays, train = strategy.aggregate_train(server_round, replies)
        if arrays is None:
            log.warning("round %d: no aggregate; the global model is unchanged", server_round)
        else:
            state = {**state, **restore_dtypes(arrays.to_torch_state_dict(), meta)}
        shared = ArrayRecord({k: state[k] for k in keys})
        config = ConfigRecord(info.as_config())
        replies = _send(grid, list(strategy.configure_evaluate(server_round, shared, config, grid)),
                        cfg)  # fmt: skip
        evaluation = strategy.aggregate_evaluate(server_round, replies)
        sent = sum(v for k, v in fedavg.round_log.items() if k.startswith("bytes_"))
        record = {
            "phase": "round", "round": server_round, **fedavg.round_log,
            **_metrics(train, ""), **_metrics(evaluation, "eval_"),
            "mbytes": sent / 2**20, "seconds": time.perf_counter() - began,
        }  # fmt: skip
        history.append(record)
        run.save_round(server_round, state, fedavg.state_dict(), history)
        run.log(record)
        log.info("\n%s", render(round_table(history)))
    run.save_final(state, info)
    log.info("final model: %s", run.dir / "final.pt")
    return history
