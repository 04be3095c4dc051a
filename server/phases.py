"""The two federated phases, each what it adds to the rounds they share (`server.strategy`).

`FineTuningRounds` is the fine-tuning: InMerge on each aggregate (after the DP noise), metrics
pooled over the sites' test sets after every round, and a last evaluation of the final model.
`ProbeRounds` is the federated merge probe (`probe-mode = "federated"`), which sends the
source backbones to a site once and names them by digest afterwards. Apart from the shared
rounds so that `strategy` stays about one round and how its messages come and go.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid

from medmerge_core.federation import protocol
from medmerge_core.federation.config import FederationConfig
from medmerge_core.federation.members import Member
from medmerge_core.federation.merge_rounds import ProbePlan, sources_digest
from medmerge_core.federation.run import FederationRun
from medmerge_core.federation.transport import (
    ModelInfo,
    compress,
    model_reference,
    parameter_keys,
)
from medmerge_core.inmerge import apply_inmerge
from medmerge_core.models import StateDict
from server.messages import addressee, exchange
from server.strategy import FederatedRounds, metric_fields

log = logging.getLogger("flwr")


class FineTuningRounds(FederatedRounds):
    """Federated fine-tuning of the merged model, with InMerge on each aggregate (after the DP
    noise), evaluation pooled over the sites' test sets after every round, and the final model
    saved and evaluated. The InMerge generator is part of the checkpointed state."""

    def __init__(
        self,
        cfg: FederationConfig,
        info: ModelInfo,
        sites: Mapping[int, Member],
        run: FederationRun,
        releases: int = 0,
    ) -> None:
        meta, self.conv_keys, norm = model_reference(info)
        super().__init__(cfg, info, sites, run, meta, norm, parameter_keys(info), releases)
        self.generator = torch.Generator().manual_seed(cfg.seed)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.generator.set_state(state["generator"])

    def _config(self, extra: ConfigRecord | None) -> ConfigRecord:
        return ConfigRecord({**self.info.as_config(), **(extra or {})})

    def _evaluate_round(
        self,
        grid: Grid,
        server_round: int,
        state: Mapping[str, torch.Tensor],
        config: ConfigRecord | None,
        timeout: float,
    ) -> MetricRecord | None:
        messages = self.configure_evaluate(
            server_round, self._shared(state), self._config(config), grid
        )
        return self.aggregate_evaluate(server_round, exchange(grid, messages, timeout))

    def _finish(
        self,
        grid: Grid,
        state: Mapping[str, torch.Tensor],
        config: ConfigRecord | None,
        num_rounds: int,
        timeout: float,
    ) -> None:
        """final.pt, then evaluated on every site's test set, pooled; under FedBN each site
        scores (and saves on its own disk) final.pt with its own norm layers."""
        self.run.save_final(state, self.info)
        log.info("final model: %s", self.run.dir / "final.pt")
        config = ConfigRecord({**self._config(config), protocol.FINAL: True})
        messages = self.configure_evaluate(num_rounds, self._shared(state), config, grid)
        evaluation = self.aggregate_evaluate(num_rounds, exchange(grid, messages, timeout))
        record = {"phase": "final", "model": "final.pt", **metric_fields(evaluation, "")}
        self.run.log(record)
        log.info("final model, pooled over the sites' test sets: %s", record)

    def _post_process(self, state: StateDict) -> StateDict:
        if self.cfg.inmerge is None:
            return state
        state, changed = apply_inmerge(state, self.conv_keys, self.cfg.inmerge, self.generator)
        self._round_log["inmerge_kernels"] = changed
        return state


class ProbeRounds(FederatedRounds):
    """The federated merge probe (`probe-mode = "federated"`): each round every site trains the
    probe from the aggregate (`Node.probe_round`) and returns its probe state. The source
    backbones go to a site with its first message of the run (and again after it failed, in
    case it lost its cache); later messages name them by digest only."""

    phase = "probe-round"
    checkpoint_name = "probe-checkpoint.pt"
    title = "Federated merge probe"
    train_type = protocol.TRAIN_PROBE

    def __init__(
        self,
        cfg: FederationConfig,
        plan: ProbePlan,
        sites: Mapping[int, Member],
        run: FederationRun,
    ) -> None:
        super().__init__(
            cfg, plan.info, sites, run, plan.initial, plan.norm_keys, plan.parameter_keys
        )
        self.plan = plan
        sent = [compress(s, cfg.fp16) for s in plan.sources]
        self.sources = {protocol.source_key(i): ArrayRecord(s) for i, s in enumerate(sent)}
        self.digest = sources_digest(sent)  # of the tensors as they travel
        self.has_sources: set[int] = set()

    def _config(self, extra: ConfigRecord | None) -> ConfigRecord:
        return ConfigRecord({
            **self.plan.info.as_config(), protocol.NAMES: list(self.plan.names),
            protocol.SOURCES_DIGEST: self.digest, **(extra or {}),
        })  # fmt: skip

    def _node_records(self, node: int) -> dict[str, ArrayRecord]:
        if node in self.has_sources:
            return dict(self._extra)
        return {**self._extra, **self.sources}

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        for msg in replies:
            node = addressee(msg, self._addressed)
            if msg.has_error():
                self.has_sources.discard(node)
            else:
                self.has_sources.add(node)
        return super().aggregate_train(server_round, replies)
