"""The ClientApp: one app, three roles; each handler unpacks a message, calls the core, packs.

The role comes from the node config in deployment (`role="site"` ...) and from the partition id
through the run config in simulation (medmerge_core.federation.node_settings). Replies carry
weights, configs and metrics only: images and labels never leave the node.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod

from medmerge_core.errors import InputError
from medmerge_core.federation.config import FederationConfig, NodeSettings, node_settings
from medmerge_core.federation.roles import (
    coordinator_merge,
    institution_backbone,
    site_evaluate,
    site_train,
)
from medmerge_core.federation.site_state import FedBNStore, site_state_dir
from medmerge_core.federation.transport import ModelInfo, compress, model_reference
from medmerge_core.models import StateDict
from medmerge_core.train import Runtime

app = ClientApp()
CLIPPING_NORM_KEY = "clipping_norm"  # what DifferentialPrivacyClientSideFixedClipping sends


def _setup(context: Context, role: str | None = None) -> tuple[FederationConfig, NodeSettings]:
    cfg = FederationConfig.from_run_config(context.run_config)
    settings = node_settings(context.node_config, cfg)
    if role is not None and settings.role != role:
        raise InputError(f"node '{settings.name}' has role '{settings.role}', not '{role}'")
    return cfg, settings


def _clip_when_asked(msg: Message, context: Context, call_next):
    """Flower's client-side DP clipping mod, only when the server's DP wrapper asks for it."""
    config = msg.content.config_records.get("config")
    if config is not None and CLIPPING_NORM_KEY in config:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


@app.query("info")
def info(msg: Message, context: Context) -> Message:
    _, settings = _setup(context)
    record = ConfigRecord({"role": settings.role, "name": settings.name})
    return Message(RecordDict({"info": record}), reply_to=msg)


@app.query("backbone")
def backbone(msg: Message, context: Context) -> Message:
    cfg, settings = _setup(context, "institution")
    state, meta = institution_backbone(settings, cfg, Runtime.detect(settings.device))
    content = RecordDict({
        "arrays": ArrayRecord(compress(state, cfg.fp16)), "info": ConfigRecord(meta),
    })  # fmt: skip
    return Message(content, reply_to=msg)


@app.train("merge")
def merge(msg: Message, context: Context) -> Message:
    cfg, settings = _setup(context, "coordinator")
    names = [str(n) for n in msg.content["config"]["names"]]  # type: ignore[union-attr]
    sources = [msg.content[f"source-{i}"].to_torch_state_dict() for i in range(len(names))]
    state, model, learned, metrics = coordinator_merge(
        sources, names, settings, cfg, Runtime.detect(settings.device)
    )
    coefficients = {k: torch.from_numpy(v) for k, v in learned.coefficients.items()}
    content = RecordDict({
        "arrays": ArrayRecord(compress(state, cfg.fp16)),
        "coefficients": ArrayRecord(coefficients),  # model weights, not data
        "info": ConfigRecord(model.as_config()),
        "metrics": MetricRecord(metrics),
    })  # fmt: skip
    return Message(content, reply_to=msg)


def _local_bn(
    msg: Message, cfg: FederationConfig, settings: NodeSettings, up_to: int
) -> StateDict | None:
    """FedBN: this site's own norm layers after round `up_to` or earlier, or the merged
    model's the first time."""
    if not cfg.fedbn:
        return None
    saved = FedBNStore(site_state_dir(settings, cfg)).latest(up_to)
    if saved is not None:
        return saved
    if "local-init" in msg.content:
        return msg.content["local-init"].to_torch_state_dict()  # type: ignore[union-attr]
    return None


@app.train(mods=[_clip_when_asked])
def train(msg: Message, context: Context) -> Message:
    cfg, settings = _setup(context, "site")
    received: ArrayRecord = msg.content["arrays"]  # type: ignore[assignment]
    model = ModelInfo.from_config(msg.content["config"])  # type: ignore[arg-type]
    server_round = int(msg.content["config"]["server-round"])  # type: ignore[index,arg-type]
    state, examples, metrics = site_train(
        received.to_torch_state_dict(), model, settings, cfg, Runtime.detect(settings.device),
        server_round, _local_bn(msg, cfg, settings, server_round - 1),
    )  # fmt: skip
    if cfg.fedbn:
        norm = model_reference(model)[2]
        FedBNStore(site_state_dir(settings, cfg)).save(server_round, {k: state[k] for k in norm})
    reply = {k: state[k] for k in received}  # same keys, same order as sent
    content = RecordDict({
        "arrays": ArrayRecord(compress(reply, cfg.fp16)),
        "metrics": MetricRecord({**metrics, "num-examples": examples}),
    })  # fmt: skip
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    cfg, settings = _setup(context, "site")
    received: ArrayRecord = msg.content["arrays"]  # type: ignore[assignment]
    model = ModelInfo.from_config(msg.content["config"])  # type: ignore[arg-type]
    server_round = int(msg.content["config"]["server-round"])  # type: ignore[index,arg-type]
    examples, metrics = site_evaluate(
        received.to_torch_state_dict(), model, settings, cfg, Runtime.detect(settings.device),
        _local_bn(msg, cfg, settings, server_round),
    )  # fmt: skip
    content = RecordDict({"metrics": MetricRecord({**metrics, "num-examples": examples})})
    return Message(content, reply_to=msg)
