"""One secure-aggregated round: Flower's SecAgg+ workflow driven from the project's own rounds.

Flower 1.41's SecAgg+ (`SecAggPlusWorkflow`) only runs against a legacy context and a legacy
`Strategy`; the Message-API strategies have none. So each secure round wraps a fresh
`LegacyContext` around a small `Strategy` adapter that only names the nodes and keeps the one
result the workflow produces, the unmasked weighted mean; the workflow's setup stage is told
to send each node the project's own train content (arrays, config, FedBN's `local-init`), not
a legacy `FitIns`. Everything else about the round (who takes part, weights, DP noise,
InMerge, the checkpoint) stays in `server.strategy`. Design: docs/notes/secagg-design.md.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import FitIns, Parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.server import LegacyContext
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from medmerge_core.federation.secure_sum import safe_pseudo_rand_gen

log = logging.getLogger("flwr")
STAGES: tuple[str, ...] = ("setup", "share-keys", "collect-masked-vectors", "unmask")


def use_safe_prg() -> None:
    """The server's side of the mask generator (`secure_sum.safe_pseudo_rand_gen`); the sites
    install theirs in client.client_app. Through importlib: the package re-exports the
    workflow class under the module's name."""
    module = importlib.import_module("flwr.server.workflow.secure_aggregation.secaggplus_workflow")
    module.pseudo_rand_gen = safe_pseudo_rand_gen  # type: ignore[attr-defined]


@dataclass
class SecureResult:
    """What the server holds after a secure round: the mean update (None: the protocol halted
    or nobody was summed), who was summed, each one's plaintext metrics and weight, and per
    stage what came back (`seen`: replies, errors, array entries, bytes)."""

    mean: list[np.ndarray] | None = None
    summed: list[int] = field(default_factory=list)
    metrics: dict[int, dict[str, Any]] = field(default_factory=dict)
    weights: dict[int, float] = field(default_factory=dict)
    failures: int = 0
    seen: list[dict[str, Any]] = field(default_factory=list)


class _Nodes(Strategy):
    """The legacy `Strategy` the workflow needs: picks the given nodes, keeps the aggregate.
    (The FitIns is empty: `_ContentWorkflow` replaces it with the project's content.)"""

    def __init__(self, grid: Grid, nodes: list[int], result: SecureResult) -> None:
        self.grid, self.nodes, self.result = grid, nodes, result

    def initialize_parameters(self, client_manager: Any) -> None:
        return None

    def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> list:
        empty = FitIns(Parameters(tensors=[], tensor_type=""), {})
        return [(GridClientProxy(n, self.grid, 0), empty) for n in self.nodes]

    def aggregate_fit(self, server_round: int, results: list, failures: list) -> tuple:
        self.result.failures = len(failures)
        if results:  # every FitRes carries the same unmasked aggregate
            self.result.mean = parameters_to_ndarrays(results[0][1].parameters)
            self.result.summed = sorted(proxy.node_id for proxy, _ in results)
            self.result.metrics = {p.node_id: dict(r.metrics) for p, r in results}
            self.result.weights = {p.node_id: float(r.num_examples) for p, r in results}
        return None, {}

    def configure_evaluate(self, server_round: int, parameters: Any, client_manager: Any) -> list:
        return []

    def aggregate_evaluate(self, server_round: int, results: list, failures: list) -> tuple:
        return None, {}

    def evaluate(self, server_round: int, parameters: Any) -> None:
        return None


class _ContentWorkflow(SecAggPlusWorkflow):
    """SecAgg+ whose stage-2 message to each node is the project's own train content."""

    def __init__(self, contents: Mapping[int, RecordDict], **protocol: Any) -> None:
        super().__init__(**protocol)
        self.contents = contents

    def setup_stage(self, grid: Grid, context: Any, state: Any) -> bool:
        ok = super().setup_stage(grid, context, state)
        # One RecordDict per node: stage 2 adds its SecAgg+ record to it.
        state.nid_to_fitins = {n: RecordDict(dict(self.contents[n])) for n in state.nid_to_fitins}
        return bool(ok)


def _size(content: RecordDict) -> int:
    """Bytes of a message's records (Flower's `count_bytes` refuses the protocol's values)."""

    def one(value: Any) -> int:
        if isinstance(value, list):
            return sum(one(v) for v in value)
        return len(value) if isinstance(value, bytes | str) else 8

    arrays = sum(r.count_bytes() for r in content.array_records.values())
    others = [*content.config_records.values(), *content.metric_records.values()]
    return arrays + sum(len(k) + one(v) for r in others for k, v in r.items())


class _Watched:
    """The grid as the workflow sees it, noting per stage what the server received."""

    def __init__(self, grid: Grid, seen: list[dict[str, Any]]) -> None:
        self._grid, self._seen = grid, seen

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None):
        messages = list(messages)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        good = [r.content for r in replies if not r.has_error()]
        self._seen.append({
            "stage": STAGES[min(len(self._seen), len(STAGES) - 1)],
            "replies": len(good),
            "errors": len(replies) - len(good),
            "array_entries": sum(len(rec) for c in good for rec in c.array_records.values()),
            "bytes_down": sum(_size(m.content) for m in messages),
            "bytes_up": sum(_size(c) for c in good),
        })  # fmt: skip
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def secure_mean(
    grid: Grid,
    server_round: int,
    contents: Mapping[int, RecordDict],
    *,
    num_shares: float,
    threshold: float,
    clipping_range: float,
    timeout: float,
) -> SecureResult:
    """One SecAgg+ round over the nodes of `contents` (node -> its train content, each with
    its own `config` record): the weighted mean Σ wᵢδᵢ / Σ wᵢ of what they sent, each site's
    weight wᵢ <= 1 being the `num_examples` it reported. A halted protocol (a site lost before
    its key shares were sent, too few left for the threshold) returns no mean."""
    use_safe_prg()
    result = SecureResult()
    strategy = _Nodes(grid, sorted(contents), result)
    context = LegacyContext(
        Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
        strategy=strategy,
    )
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
        {WorkflowKey.CURRENT_ROUND: server_round}
    )
    context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()  # read, then unused
    workflow = _ContentWorkflow(
        contents,
        num_shares=num_shares,
        reconstruction_threshold=threshold,
        max_weight=1.0,
        clipping_range=clipping_range,
        timeout=timeout,
    )
    try:
        workflow(_Watched(grid, result.seen), context)  # type: ignore[arg-type]
    except (KeyError, ValueError, RuntimeError) as exc:  # flwr 1.41 raises on some dropouts
        log.warning("round %d: secure aggregation failed: %r", server_round, exc)
        result.mean = None
    return result


def is_secure(content: RecordDict) -> bool:
    """Whether a message belongs to the SecAgg+ protocol."""
    return RECORD_KEY_CONFIGS in content.config_records
