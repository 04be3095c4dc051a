"""The ClientApp: one app, three roles; each handler unpacks a message, calls the core, packs.

The role comes from the node config in deployment (`role="site"` ...) and from the partition id
through the run config in simulation (medmerge_core.federation.node_settings). Replies carry
weights, configs and metrics only: images and labels never leave the node. With `policy=` in
the node config every message is first checked against the site's policy
(medmerge_core.federation.site_policy; docs/site-policy.md): here, as a second line, after the
site runtime (client.site_runtime) checked the delivered bundle before it was installed.
With `secagg = true` the fine-tuning rounds run Flower's SecAgg+ protocol (`secagg_if_asked`;
docs/secure-aggregation.md): the training reply is this site's update, masked before it
leaves.
"""

from __future__ import annotations

import functools
import importlib
import logging
import re
from collections.abc import Callable
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE

from medmerge_core.errors import DataUnavailable, InputError
from medmerge_core.federation import protocol
from medmerge_core.federation.audit import append_audit, audit_failure, record_digest
from medmerge_core.federation.config import SAFE_NAME, FederationConfig
from medmerge_core.federation.merge_rounds import sources_digest
from medmerge_core.federation.roles import Node
from medmerge_core.federation.secure_sum import safe_pseudo_rand_gen, site_delta
from medmerge_core.federation.site_digests import installed_digest
from medmerge_core.federation.site_enforcement import decide, refuse
from medmerge_core.federation.site_policy import PolicyRefusal
from medmerge_core.federation.transport import ModelInfo, compress, pack_counts
from medmerge_core.models import StateDict

app = ClientApp()
log = logging.getLogger(__name__)
Handler = Callable[[Message, Context], Message]
# Where this file runs from when Flower installed it from a bundle: $FLWR_HOME/apps/
# <publisher>.<name>.<version>.<first 8 hex digits of the FAB hash>/client/client_app.py.
APP_ROOT = Path(__file__).resolve().parents[1]
INSTALLED_APP = re.compile(r"^[^/]+\.[^/]+\..+\.[0-9a-f]{8}$")


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
    """The site policy first; a refusal leaves this node naming its rule ("site-2: site policy
    refused the message (rule privacy.require-dp): ..."). A failure leaves it as a generic
    reason ("site-2: data unavailable"); the detail (paths, the exception) stays here, in this
    node's log and audit log."""

    @functools.wraps(handler)
    def run(msg: Message, context: Context) -> Message:
        name = str(context.node_config.get("name", ""))
        name = name if SAFE_NAME.match(name) else "node"
        try:
            _enforce_policy(msg, context)
            return handler(msg, context)
        except PolicyRefusal as exc:
            raise SiteFailure(f"{name}: {exc}") from None
        except SiteFailure:  # an inner guarded handler (a SecAgg+ stage) already reported it
            raise
        except Exception as exc:
            log.exception("%s: %s failed", name, msg.metadata.message_type)
            audit_failure(context.node_config, context.run_config, msg.metadata.message_type,
                          msg.metadata.run_id, exc)  # fmt: skip
            raise SiteFailure(f"{name}: {_public_reason(exc)}") from None

    return run


def running_app_digest(root: Path = APP_ROOT) -> str | None:
    """The digest of the installed bundle this code runs from (as the site runtime computes
    it); None when it runs from a source checkout (in-process tests, debugging), where no app
    was delivered."""
    if root.parent.name != "apps" or not INSTALLED_APP.match(root.name):
        return None
    return installed_digest(root)


def _enforce_policy(msg: Message, context: Context) -> None:
    """The site policy again, inside the app (the site runtime checked the bundle before it
    was installed): for an in-process simulation, and as a second line. A refusal is logged
    and audited here and raised as PolicyRefusal."""
    node_config = dict(context.node_config)
    if not node_config.get("policy"):
        return
    message_type, run_id = msg.metadata.message_type, msg.metadata.run_id
    digest = running_app_digest()
    secure = RECORD_KEY_CONFIGS in msg.content.config_records
    refusal = decide(node_config, dict(context.run_config), message_type, digest, APP_ROOT.name,
                     secure)  # fmt: skip
    if refusal is None:
        return
    raise refuse(node_config, dict(context.run_config), message_type, run_id, refusal,
                 "client-app", digest, log)  # fmt: skip


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


@app.query(protocol.action(protocol.QUERY_INFO))
@guarded
def info(msg: Message, context: Context) -> Message:
    node = _node(context)
    config = msg.content.config_records.get(protocol.CONFIG)
    challenge = str(config.get(protocol.CHALLENGE, "")) if config is not None else ""
    token, proof = node.identity_proof(challenge) if challenge else (None, None)
    record = ConfigRecord(node.member().info(token, proof).as_config())
    return _reply(node, msg, RecordDict({protocol.INFO: record}))


@app.query(protocol.action(protocol.QUERY_TARGET))
@guarded
def target(msg: Message, context: Context) -> Message:
    node = _node(context, "site")
    record = ConfigRecord(node.target_info().as_config())
    return _reply(node, msg, RecordDict({protocol.INFO: record}))


@app.query(protocol.action(protocol.QUERY_BACKBONE))
@guarded
def backbone(msg: Message, context: Context) -> Message:
    node = _node(context, "institution")
    state, meta = node.backbone()
    content = RecordDict(
        {
            protocol.ARRAYS: ArrayRecord(compress(state, node.fp16)),
            protocol.INFO: ConfigRecord(meta.as_config()),
        }
    )
    return _reply(node, msg, content)


@app.train(protocol.action(protocol.TRAIN_MERGE))
@guarded
def merge(msg: Message, context: Context) -> Message:
    config = msg.content[protocol.CONFIG]
    names = [str(n) for n in config[protocol.NAMES]]  # type: ignore[union-attr]
    sources = [msg.content[protocol.source_key(i)].to_torch_state_dict()  # type: ignore[union-attr]
               for i in range(len(names))]  # fmt: skip
    node = _node(context, "coordinator")
    state, model, learned, metrics = node.merge(sources, names)
    coefficients = {k: torch.from_numpy(v) for k, v in learned.items()}
    content = RecordDict(
        {
            protocol.ARRAYS: ArrayRecord(compress(state, node.fp16)),
            protocol.COEFFICIENTS: ArrayRecord(coefficients),  # model weights, not data
            protocol.INFO: ConfigRecord(model.as_config()),
            protocol.METRICS: MetricRecord(metrics),
        }
    )
    return _reply(node, msg, content)


def _sources(msg: Message, context: Context) -> tuple[list[StateDict], list[str]]:
    """The federated probe's source backbones: from the message the first time (checked
    against their digest, then kept in this node's run state), from that cache afterwards."""
    config = msg.content[protocol.CONFIG]
    names = [str(n) for n in config[protocol.NAMES]]  # type: ignore[union-attr]
    digest = str(config[protocol.SOURCES_DIGEST])  # type: ignore[index]
    if protocol.source_key(0) in msg.content:
        sources = [msg.content[protocol.source_key(i)].to_torch_state_dict()  # type: ignore[union-attr]
                   for i in range(len(names))]  # fmt: skip
        if sources_digest(sources) != digest:
            raise InputError(f"probe sources: digest mismatch (expected {digest})")
        for i in range(len(names)):
            context.state[protocol.probe_source_key(i)] = msg.content[protocol.source_key(i)]
        context.state[protocol.PROBE_SOURCES] = ConfigRecord({protocol.DIGEST: digest})
        return sources, names
    cached = context.state.get(protocol.PROBE_SOURCES)
    if cached is None or cached[protocol.DIGEST] != digest:  # type: ignore[index]
        raise InputError(f"probe sources {digest} are not cached here; the server resends them")
    return [context.state[protocol.probe_source_key(i)].to_torch_state_dict()  # type: ignore[union-attr]
            for i in range(len(names))], names  # fmt: skip


def _received(msg: Message) -> tuple[ArrayRecord, ModelInfo, int, StateDict | None]:
    """(the global model's arrays, its description, the round, the merged model's norm
    layers when the server sent them for FedBN)."""
    config = msg.content[protocol.CONFIG]
    initial = msg.content.get(protocol.LOCAL_INIT)
    return (
        msg.content[protocol.ARRAYS],  # type: ignore[return-value]
        ModelInfo.from_config(config),  # type: ignore[arg-type]
        int(config[protocol.SERVER_ROUND]),  # type: ignore[index,arg-type]
        None if initial is None else initial.to_torch_state_dict(),  # type: ignore[union-attr]
    )


def use_safe_prg() -> None:
    """The site's side of the mask generator (`secure_sum.safe_pseudo_rand_gen`); the server
    installs the same one (server.secagg). Through importlib: the package re-exports the mod
    function under the module's name, so a plain import would patch nothing."""
    module = importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod")
    module.pseudo_rand_gen = safe_pseudo_rand_gen  # type: ignore[attr-defined]


def secagg_if_asked(msg: Message, context: Context, call_next: Handler) -> Message:
    """A mod: Flower's `secaggplus_mod` for the messages of the SecAgg+ protocol (they carry
    its config record), behind the site policy; a plain message goes straight to the handler.
    Each stage's reply, as it leaves (masked, its arrays emptied), gets an audit line "train
    (secagg <stage>)"; the training stage's handler also audits the update before masking."""
    if RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, context)
    use_safe_prg()
    stage = str(msg.content.config_records[RECORD_KEY_CONFIGS].get("stage", "?"))
    received = _summary(msg.content)

    def secure(msg: Message, context: Context) -> Message:
        reply = secaggplus_mod(msg, context, call_next)
        node = _node(context)
        append_audit(node.audit_path, f"train (secagg {stage})", msg.metadata.run_id, received,
                     _summary(reply.content))  # fmt: skip
        return reply

    return guarded(secure)(msg, context)


def _secure_content(
    msg: Message, context: Context, state: StateDict, metrics: dict[str, float]
) -> RecordDict:
    """The SecAgg+ training reply, in the legacy layout `secaggplus_mod` reads: this site's
    checked update on the keys the server names (`site_delta`), its weight, its metrics. The
    mod masks the update and empties every array record before the reply leaves."""
    config = msg.content[protocol.CONFIG]
    keys = [str(k) for k in config[protocol.SECAGG_KEYS]]  # type: ignore[union-attr]
    weight = float(config[protocol.SECAGG_WEIGHT])  # type: ignore[arg-type,index]
    if not 0 < weight <= 1 or not set(keys) <= set(state):
        raise InputError("secagg-weight / secagg-keys: not a weight in (0, 1] and sent keys")
    secagg_state = context.state.config_records.get(RECORD_KEY_STATE, {})
    limit = FederationConfig.from_run_config(context.run_config).secagg_clipping_range
    limit = float(secagg_state.get("clipping_range", limit))  # what the masking will clip to
    scale = weight / float(secagg_state.get("max_weight", 1.0))  # what the mod multiplies by
    sent = msg.content[protocol.ARRAYS].to_torch_state_dict()  # type: ignore[union-attr]
    delta = site_delta(state, sent, keys, scale, limit)
    return RecordDict({
        protocol.FITRES_PARAMETERS: ArrayRecord({k: torch.from_numpy(v) for k, v in delta.items()}),
        protocol.FITRES_NUM_EXAMPLES: MetricRecord({protocol.LEGACY_NUM_EXAMPLES: weight}),
        protocol.FITRES_METRICS: ConfigRecord(dict(metrics)),
        protocol.FITRES_STATUS: ConfigRecord({"code": 0, "message": ""}),
    })  # fmt: skip


@app.train(mods=[secagg_if_asked])
@guarded
def train(msg: Message, context: Context) -> Message:
    node = _node(context, "site")
    received, model, server_round, initial = _received(msg)
    local_norm = node.local_norm(server_round - 1, initial)
    state, examples, metrics = node.train(
        received.to_torch_state_dict(), model, server_round, local_norm
    )
    if RECORD_KEY_CONFIGS in msg.content.config_records:  # SecAgg+: masked by the mod
        return _reply(node, msg, _secure_content(msg, context, state, metrics))
    content = RecordDict(
        {
            protocol.ARRAYS: ArrayRecord(compress(state, node.fp16)),  # the keys sent, in order
            protocol.METRICS: MetricRecord({**metrics, protocol.NUM_EXAMPLES: examples}),
        }
    )
    return _reply(node, msg, content)


@app.train(protocol.action(protocol.TRAIN_PROBE))
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
            protocol.ARRAYS: ArrayRecord(compress(state, node.fp16)),  # the keys sent, in order
            protocol.METRICS: MetricRecord({**metrics, protocol.NUM_EXAMPLES: examples}),
        }
    )
    return _reply(node, msg, content)


@app.evaluate()
@guarded
def evaluate(msg: Message, context: Context) -> Message:
    node = _node(context, "site")
    received, model, server_round, initial = _received(msg)
    local_norm = node.local_norm(server_round, initial)
    final = bool(msg.content[protocol.CONFIG].get(protocol.FINAL, False))  # type: ignore[union-attr]
    examples, metrics, counts = node.evaluate(
        received.to_torch_state_dict(), model, local_norm, final
    )
    content = RecordDict(
        {protocol.METRICS: MetricRecord({**metrics, protocol.NUM_EXAMPLES: examples})}
    )
    if counts:  # counts of this site's test set, so the server can pool metrics over sites
        content[protocol.POOLED] = MetricRecord(pack_counts(counts))
    return _reply(node, msg, content)
