"""The ClientApp: one app, three roles; each handler unpacks a message, calls the core, packs.

The role comes from the node config in deployment (`role="site"` ...) and from the partition id
through the run config in simulation (medmerge_core.federation.node_settings). Replies carry
weights, configs and metrics only: images and labels never leave the node.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from medmerge_core.errors import DataUnavailable, InputError
from medmerge_core.federation.audit import append_audit, audit_failure, record_digest
from medmerge_core.federation.config import SAFE_NAME
from medmerge_core.federation.merge_rounds import sources_digest
from medmerge_core.federation.roles import Node
from medmerge_core.federation.transport import ModelInfo, compress, pack_counts
from medmerge_core.models import StateDict

app = ClientApp()
log = logging.getLogger(__name__)
Handler = Callable[[Message, Context], Message]


def _node(context: Context, role: str | None = None) -> Node:
    return Node.from_configs(context.node_config, context.run_config, role)


def _summary(content: RecordDict) -> dict:
    """What a message carries: per array record its keys, shapes, dtypes and a SHA-256 of its
    contents; the bytes; the metric values; a hash of each config. Never the arrays."""
    return {
        "arrays": {name: {"sha256": record_digest(rec),
                          "keys": {key: [list(a.shape), str(a.dtype)] for key, a in rec.items()}}
                   for name, rec in content.array_records.items()},
        "bytes": sum(rec.count_bytes() for rec in content.array_records.values()),
        "metrics": {name: dict(rec) for name, rec in content.metric_records.items()},
        "configs": {name: record_digest(rec) for name, rec in content.config_records.items()},
    }  # fmt: skip


def guarded(handler: Handler) -> Handler:
    """A failure leaves this node as a generic reason ("site-2: data unavailable"); the detail
    (paths, the exception) stays here, in this node's log and audit log."""

    @functools.wraps(handler)
    def run(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except Exception as exc:
            name = str(context.node_config.get("name", ""))
            name = name if SAFE_NAME.match(name) else "node"
            log.exception("%s: %s failed", name, msg.metadata.message_type)
            audit_failure(context.node_config, context.run_config, msg.metadata.message_type,
                          msg.metadata.run_id, exc)  # fmt: skip
            raise SiteFailure(f"{name}: {_public_reason(exc)}") from None

    return run


class SiteFailure(RuntimeError):
    """What the server and `flwr log` see of a failure at a site."""


def _public_reason(exc: Exception) -> str:
    if isinstance(exc, DataUnavailable | OSError):
        return "data unavailable"
    if isinstance(exc, InputError):
        return "refused the message (see the site's log)"
    return f"failed ({type(exc).__name__}; see the site's log)"


def _reply(node: Node, msg: Message, content: RecordDict) -> Message:
    """The reply, after one line in this node's audit log: what came in, what goes out."""
    append_audit(node.audit_path, msg.metadata.message_type, msg.metadata.run_id,
                 _summary(msg.content), _summary(content))  # fmt: skip
    return Message(content, reply_to=msg)


@app.query("info")
@guarded
def info(msg: Message, context: Context) -> Message:
    node = _node(context)
    config = msg.content.config_records.get("config")
    challenge = str(config.get("challenge", "")) if config is not None else ""
    proof = node.identity_proof(challenge) if challenge else {}
    record = ConfigRecord({**node.member().as_config(), **proof})
    return _reply(node, msg, RecordDict({"info": record}))


@app.query("target")
@guarded
def target(msg: Message, context: Context) -> Message:
    node = _node(context, "site")
    return _reply(node, msg, RecordDict({"info": ConfigRecord(node.target_info().as_config())}))


@app.query("backbone")
@guarded
def backbone(msg: Message, context: Context) -> Message:
    node = _node(context, "institution")
    state, meta = node.backbone()
    content = RecordDict(
        {
            "arrays": ArrayRecord(compress(state, node.fp16)),
            "info": ConfigRecord(meta),
        }
    )
    return _reply(node, msg, content)


@app.train("merge")
@guarded
def merge(msg: Message, context: Context) -> Message:
    names = [str(n) for n in msg.content["config"]["names"]]  # type: ignore[union-attr]
    sources = [msg.content[f"source-{i}"].to_torch_state_dict() for i in range(len(names))]
    node = _node(context, "coordinator")
    state, model, learned, metrics = node.merge(sources, names)
    coefficients = {k: torch.from_numpy(v) for k, v in learned.items()}
    content = RecordDict(
        {
            "arrays": ArrayRecord(compress(state, node.fp16)),
            "coefficients": ArrayRecord(coefficients),  # model weights, not data
            "info": ConfigRecord(model.as_config()),
            "metrics": MetricRecord(metrics),
        }
    )
    return _reply(node, msg, content)


def _sources(msg: Message, context: Context) -> tuple[list[StateDict], list[str]]:
    """The federated probe's source backbones: from the message the first time (checked
    against their digest, then kept in this node's run state), from that cache afterwards."""
    config = msg.content["config"]
    names = [str(n) for n in config["names"]]  # type: ignore[union-attr]
    digest = str(config["sources-digest"])  # type: ignore[index]
    if "source-0" in msg.content:
        sources = [msg.content[f"source-{i}"].to_torch_state_dict() for i in range(len(names))]
        if sources_digest(sources) != digest:
            raise InputError(f"probe sources: digest mismatch (expected {digest})")
        for i in range(len(names)):
            context.state[f"probe-source-{i}"] = msg.content[f"source-{i}"]
        context.state["probe-sources"] = ConfigRecord({"digest": digest})
        return sources, names
    cached = context.state.get("probe-sources")
    if cached is None or cached["digest"] != digest:  # type: ignore[index]
        raise InputError(f"probe sources {digest} are not cached here; the server resends them")
    return [context.state[f"probe-source-{i}"].to_torch_state_dict()  # type: ignore[union-attr]
            for i in range(len(names))], names  # fmt: skip


def _received(msg: Message) -> tuple[ArrayRecord, ModelInfo, int, StateDict | None]:
    """(the global model's arrays, its description, the round, the merged model's norm
    layers when the server sent them for FedBN)."""
    config = msg.content["config"]
    initial = msg.content.get("local-init")
    return (
        msg.content["arrays"],  # type: ignore[return-value]
        ModelInfo.from_config(config),  # type: ignore[arg-type]
        int(config["server-round"]),  # type: ignore[index,arg-type]
        None if initial is None else initial.to_torch_state_dict(),  # type: ignore[union-attr]
    )


@app.train()
@guarded
def train(msg: Message, context: Context) -> Message:
    node = _node(context, "site")
    received, model, server_round, initial = _received(msg)
    local_norm = node.local_norm(server_round - 1, initial)
    state, examples, metrics = node.train(
        received.to_torch_state_dict(), model, server_round, local_norm
    )
    content = RecordDict(
        {
            "arrays": ArrayRecord(compress(state, node.fp16)),  # the keys sent, in their order
            "metrics": MetricRecord({**metrics, "num-examples": examples}),
        }
    )
    return _reply(node, msg, content)


@app.train("probe")
@guarded
def probe(msg: Message, context: Context) -> Message:
    node = _node(context, "site")
    sources, names = _sources(msg, context)
    received, model, server_round, initial = _received(msg)
    local_norm = node.local_norm(server_round - 1, initial, phase="probe")
    state, examples, metrics = node.probe_round(
        sources, names, received.to_torch_state_dict(), model, server_round, local_norm
    )
    content = RecordDict(
        {
            "arrays": ArrayRecord(compress(state, node.fp16)),  # the keys sent, in their order
            "metrics": MetricRecord({**metrics, "num-examples": examples}),
        }
    )
    return _reply(node, msg, content)


@app.evaluate()
@guarded
def evaluate(msg: Message, context: Context) -> Message:
    node = _node(context, "site")
    received, model, server_round, initial = _received(msg)
    local_norm = node.local_norm(server_round, initial)
    final = bool(msg.content["config"].get("final", False))  # type: ignore[union-attr]
    examples, metrics, counts = node.evaluate(
        received.to_torch_state_dict(), model, local_norm, final
    )
    content = RecordDict({"metrics": MetricRecord({**metrics, "num-examples": examples})})
    if counts:  # counts of this site's test set, so the server can pool metrics over sites
        content["pooled"] = MetricRecord(pack_counts(counts))
    return _reply(node, msg, content)
