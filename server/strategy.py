"""The fine-tuning strategy: Flower's FedAvg restricted to the sites, plus InMerge per round.

Science (screening rules, dtype restoration, InMerge) is in medmerge_core.federation; this class
only moves it in and out of Flower messages. It works unwrapped or inside Flower's
differential-privacy wrappers, because the arrays it is given are the travelling (floating)
tensors only.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from medmerge_core.federation.config import FederationConfig
from medmerge_core.federation.transport import ModelInfo, compress, model_reference, restore_dtypes
from medmerge_core.federation.validation import screen_replies
from medmerge_core.inmerge import apply_inmerge
from medmerge_core.models import StateDict

log = logging.getLogger("flwr")


def addressee(reply: Message, sent: Iterable[Message]) -> int:
    """The node a reply answers for. When a node goes offline mid-round, the SuperLink makes
    the error reply itself and signs it with its own id, so look up the message it answers."""
    for msg in sent:
        if msg.metadata.message_id == reply.metadata.reply_to_message_id:
            return msg.metadata.dst_node_id
    return reply.metadata.src_node_id


class MedMergeFedAvg(FedAvg):
    """FedAvg over site nodes with reply screening, fp16 transport and InMerge on the aggregate.

    `sites` maps node id -> name (for log lines). The InMerge generator is the strategy's only
    state; `state_dict()` / `load_state_dict()` carry it through the per-round checkpoint so a
    resumed run draws the same partners as an uninterrupted one.
    """

    def __init__(self, cfg: FederationConfig, info: ModelInfo, sites: Mapping[int, str]) -> None:
        super().__init__(min_train_nodes=cfg.min_sites, min_evaluate_nodes=1, min_available_nodes=1)
        self.cfg = cfg
        self.sites = dict(sites)
        self.meta, self.conv_keys, _ = model_reference(info)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.current: StateDict = {}
        self.extra: dict[str, ArrayRecord] = {}
        self.round_log: dict[str, Any] = {}
        self.addressed: list[Message] = []  # this round's messages (ids set when pushed)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.generator.set_state(state["generator"])

    def name(self, node_id: int) -> str:
        return f"node {node_id} ({self.sites.get(node_id, '?')})"

    def _messages(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid, kind: str
    ) -> list[Message]:
        connected = set(grid.get_node_ids())
        nodes = [n for n in self.sites if n in connected]
        if kind == MessageType.TRAIN and len(nodes) < self.min_train_nodes:
            raise RuntimeError(
                f"round {server_round}: {len(nodes)} site(s) connected, min-sites is "
                f"{self.min_train_nodes}"
            )
        config["server-round"] = server_round
        payload = ArrayRecord(compress(arrays.to_torch_state_dict(), self.cfg.fp16))
        content = RecordDict({"arrays": payload, "config": config, **self.extra})
        sent = payload.count_bytes() + sum(r.count_bytes() for r in self.extra.values())
        self.round_log[f"bytes_{kind}_down"] = sent * len(nodes)
        self.addressed = list(self._construct_messages(content, nodes, kind))
        return self.addressed

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.current = arrays.to_torch_state_dict()
        self.round_log = {}
        return self._messages(server_round, arrays, config, grid, MessageType.TRAIN)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self._messages(server_round, arrays, config, grid, MessageType.EVALUATE)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Screen every reply, average the accepted ones, restore dtypes, apply InMerge."""
        by_name: dict[str, Message] = {}
        states: dict[str, StateDict] = {}
        rejected: dict[str, str] = {}
        for msg in replies:
            name = self.name(addressee(msg, self.addressed))
            if msg.has_error():
                rejected[name] = f"error reply: {msg.error.reason}"
                continue
            content = msg.content
            metrics = list(content.metric_records.values())
            if (
                len(content.array_records) != 1
                or len(metrics) != 1
                or ("num-examples" not in metrics[0])
            ):
                rejected[name] = "reply needs one ArrayRecord and one MetricRecord (num-examples)"
                continue
            by_name[name] = msg
            states[name] = next(iter(content.array_records.values())).to_torch_state_dict()
        accepted, bad = screen_replies(
            states, self.current, self.cfg.outlier_factor, allow_fp16=self.cfg.fp16
        )
        rejected.update(bad)
        for name, reason in rejected.items():
            log.warning("round %d: rejected reply from %s: %s", server_round, name, reason)
        self.round_log.update(sites=len(accepted), rejected=sorted(rejected))
        if len(accepted) < self.min_train_nodes:
            raise RuntimeError(
                f"round {server_round}: {len(accepted)} usable site replies, min-sites is "
                f"{self.min_train_nodes} (rejected: {rejected})"
            )
        clean = []
        for name in accepted:
            msg = by_name[name]
            state = restore_dtypes(states[name], self.meta)
            metrics = next(iter(msg.content.metric_records.values()))
            self.round_log["bytes_train_up"] = self.round_log.get("bytes_train_up", 0) + sum(
                r.count_bytes() for r in msg.content.array_records.values()
            )
            content = RecordDict({"arrays": ArrayRecord(state), "metrics": metrics})
            clean.append(Message(content=content, metadata=msg.metadata))  # reply left intact
        arrays, metrics = super().aggregate_train(server_round, clean)
        if arrays is None:
            return None, metrics
        state = restore_dtypes(arrays.to_torch_state_dict(), self.meta)
        if self.cfg.inmerge is not None:
            state, changed = apply_inmerge(state, self.conv_keys, self.cfg.inmerge, self.generator)
            self.round_log["inmerge_kernels"] = changed
        return ArrayRecord(state), metrics
