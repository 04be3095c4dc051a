"""The ClientApp: one app, three roles; each handler unpacks a message, calls the core, packs.

The role comes from the node config in deployment (`role="site"` ...) and from the partition id
through the run config in simulation (medmerge_core.federation.node_settings). Replies carry
weights, configs and metrics only: images and labels never leave the node.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from medmerge_core.errors import InputError
from medmerge_core.federation.audit import append_audit, config_digest
from medmerge_core.federation.merge_rounds import sources_digest
from medmerge_core.federation.roles import Node
from medmerge_core.federation.transport import ModelInfo, compress, pack_counts
from medmerge_core.models import StateDict

app = ClientApp()


def _node(context: Context, role: str | None = None) -> Node:
    return Node.from_configs(context.node_config, context.run_config, role)


def _summary(content: RecordDict) -> dict:
    """What a message carries, without its values: array keys, shapes, dtypes, bytes, metric
    names and a hash of each config."""
    return {
        "arrays": {name: {key: [list(array.shape), str(array.dtype)] for key, array in rec.items()}
                   for name, rec in content.array_records.items()},
        "bytes": sum(rec.count_bytes() for rec in content.array_records.values()),
        "metrics": {name: sorted(rec) for name, rec in content.metric_records.items()},
        "configs": {name: config_digest(dict(rec)) for name, rec in content.config_records.items()},
    }  # fmt: skip


def _reply(node: Node, msg: Message, content: RecordDict) -> Message:
    """The reply, after one line in this node's audit log: what came in, what goes out."""
    append_audit(node.audit_path, msg.metadata.message_type, msg.metadata.run_id,
                 _summary(msg.content), _summary(content))  # fmt: skip
    return Message(content, reply_to=msg)


@app.query("info")
def info(msg: Message, context: Context) -> Message:
    node = _node(context)
    record = ConfigRecord({"role": node.settings.role, "name": node.name})
    return _reply(node, msg, RecordDict({"info": record}))


@app.query("target")
def target(msg: Message, context: Context) -> Message:
    node = _node(context, "site")
    return _reply(node, msg, RecordDict({"info": ConfigRecord(node.target_info().as_config())}))


@app.query("backbone")
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
def train(msg: Message, context: Context) -> Message:
    node = _node(context, "site")
    received, model, server_round, initial = _received(msg)
    local_norm = node.local_norm(server_round - 1, initial)
    state, examples, metrics = node.train(
        received.to_torch_state_dict(), model, server_round, local_norm
    )
    reply = {k: state[k] for k in received}  # same keys, same order as sent
    content = RecordDict(
        {
            "arrays": ArrayRecord(compress(reply, node.fp16)),
            "metrics": MetricRecord({**metrics, "num-examples": examples}),
        }
    )
    return _reply(node, msg, content)


@app.train("probe")
def probe(msg: Message, context: Context) -> Message:
    node = _node(context, "site")
    sources, names = _sources(msg, context)
    received, model, server_round, initial = _received(msg)
    local_norm = node.local_norm(server_round - 1, initial, phase="probe")
    state, examples, metrics = node.probe_round(
        sources, names, received.to_torch_state_dict(), model, server_round, local_norm
    )
    reply = {k: state[k] for k in received}  # same keys, same order as sent
    content = RecordDict(
        {
            "arrays": ArrayRecord(compress(reply, node.fp16)),
            "metrics": MetricRecord({**metrics, "num-examples": examples}),
        }
    )
    return _reply(node, msg, content)


@app.evaluate()
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
