"""The rounds both federated phases share: Flower's FedAvg over the sites, owning its rounds.

`FederatedRounds.start` runs the rounds as Flower's own `Strategy.start` does, plus what a
hospital federation needs: resume after the last checkpointed round, a checkpoint and a log
line after every round, reply screening, and optional differential privacy (DP-FedAvg with an
accountant whose releases span both phases). The phases themselves (`FineTuningRounds`, the
fine-tuning; `ProbeRounds`, the federated merge probe) are in `server.phases`. The
science (screening, DP, aggregation, dtype restoration, pooled metrics) is in medmerge_core
(`rounds.combine_round`, `secure_sum.combine_secure_round`, `rounds.pool_evaluations`); this
class builds the messages (`Message(...)`, Flower's public API), unpacks the replies
(`server.replies`), calls the core and logs what it returns.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result

from medmerge_core.federation import protocol
from medmerge_core.federation.config import FederationConfig
from medmerge_core.federation.members import Member
from medmerge_core.federation.privacy import epsilon
from medmerge_core.federation.rounds import (
    Noise,
    RoundResult,
    RoundSettings,
    SiteReply,
    combine_round,
    pool_evaluations,
)
from medmerge_core.federation.run import FederationRun, round_table, table_text
from medmerge_core.federation.secure_sum import combine_secure_round, site_weights
from medmerge_core.federation.transport import (
    ModelInfo,
    compress,
    restore_dtypes,
    transport_keys,
)
from medmerge_core.models import StateDict
from server.messages import addressee, exchange
from server.replies import read_evaluate_reply, read_train_reply
from server.secagg import secure_mean

log = logging.getLogger("flwr")


def metric_fields(record: MetricRecord | None, prefix: str) -> dict[str, float]:
    """A metric record as metrics.jsonl fields (`prefix` + key), without the example count."""
    if record is None:
        return {}
    return {prefix + k: float(v) for k, v in record.items() if k != protocol.NUM_EXAMPLES}  # type: ignore[arg-type]


class FederatedRounds(FedAvg):
    """The rounds both federated phases share: FedAvg over the site nodes with reply screening,
    fp16 transport, robust aggregation, DP-FedAvg, a checkpoint and a log line per round.

    `meta` gives the keys, shapes and dtypes of the state the server holds, `keys` the ones
    that travel and `dp_keys` the ones DP clips and noises (under DP the only ones a site sends
    back). The DP-noise generator is seeded from the operating system's CSPRNG, never from the
    run config every node holds, so no participant can regenerate the noise; its state and the
    count of DP releases are the strategy's state (`state_dict`, in the server's private
    checkpoint), so a resumed run draws the same noise and accounts every release; `releases`
    starts a phase after an earlier phase's.
    """

    phase = "round"  # the metrics.jsonl phase of a round
    checkpoint_name = "checkpoint.pt"
    title = "Federated fine-tuning"
    train_type: str = protocol.TRAIN

    def __init__(
        self,
        cfg: FederationConfig,
        info: ModelInfo,
        sites: Mapping[int, Member],
        run: FederationRun,
        meta: Mapping[str, torch.Tensor],
        norm_keys: Sequence[str],
        parameters: Sequence[str],
        releases: int = 0,
    ) -> None:
        super().__init__(min_train_nodes=cfg.min_sites, min_evaluate_nodes=1, min_available_nodes=1)
        self.cfg = cfg
        self.info = info
        self.sites = dict(sites)
        self.run = run
        self.meta = dict(meta)
        self.norm_keys = list(norm_keys)
        self.keys = transport_keys(self.meta, self.norm_keys, cfg.fedbn)
        params = set(parameters)
        self.dp_keys = [k for k in self.keys if k in params]  # what DP clips and noises
        self.private = cfg.dp != "none"
        self.noise = torch.Generator().manual_seed(secrets.randbits(63))
        self.releases = releases  # rounds whose aggregate carried DP noise (all phases)
        self.history: list[dict[str, Any]] = []
        self._current: StateDict = {}
        self._extra: dict[str, ArrayRecord] = {}
        self._round_log: dict[str, Any] = {}
        self._addressed: list[Message] = []  # this round's messages (ids set when pushed)

    def state_dict(self) -> dict[str, Any]:
        return {"noise": self.noise.get_state(), "releases": self.releases}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.noise.set_state(state["noise"])
        self.releases = int(state["releases"])

    def name(self, node_id: int) -> str:
        member = self.sites.get(node_id)
        return f"node {node_id} ({member.name if member else '?'})"

    # ------------------------------------------------------------------ the rounds

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Any = None,
    ) -> Result:
        """Rounds 1..num_rounds from `initial_arrays`, or after the phase's last checkpoint."""
        state = initial_arrays.to_torch_state_dict()
        start = 0
        saved = self.run.load_checkpoint(self.checkpoint_name)
        if saved is not None:
            state, start, self.history = saved["state_dict"], int(saved["round"]), saved["history"]
            self.load_state_dict(saved["strategy"])
            log.info("%s: resuming after round %d of %d from %s", self.title, start, num_rounds,
                     self.run.dir)  # fmt: skip
        if self.cfg.fedbn:  # each site starts its private norm layers from the server's start
            self._extra = {protocol.LOCAL_INIT: ArrayRecord({k: state[k] for k in self.norm_keys})}
        result = Result()
        for server_round in range(start + 1, num_rounds + 1):
            if self._over_budget(server_round):
                break
            began = time.perf_counter()
            messages = self.configure_train(
                server_round, self._shared(state), self._config(train_config), grid
            )
            if self.cfg.secagg and self.train_type == protocol.TRAIN:
                arrays, train = self._secure_round(grid, server_round, list(messages), timeout)
            else:
                replies = exchange(grid, messages, timeout)
                arrays, train = self.aggregate_train(server_round, replies)
            if arrays is None:
                log.warning("round %d: no aggregate; the global model is unchanged", server_round)
            else:
                state = {**state, **restore_dtypes(arrays.to_torch_state_dict(), self.meta)}
            evaluation = self._evaluate_round(grid, server_round, state, evaluate_config, timeout)
            sent = sum(v for k, v in self._round_log.items() if k.startswith("bytes_"))
            record = {
                "phase": self.phase,
                "round": server_round,
                **self._round_log,
                **metric_fields(train, ""),
                **metric_fields(evaluation, "eval_"),
                "mbytes": sent / 2**20,
                "seconds": time.perf_counter() - began,
            }
            self.history.append(record)
            self.run.save_round(
                self.checkpoint_name, server_round, state, self.state_dict(), self.history
            )
            self.run.log(record)
            log.info("\n%s", table_text(round_table(self.history, self.title)))
            result.train_metrics_clientapp[server_round] = train or MetricRecord()
            result.evaluate_metrics_clientapp[server_round] = evaluation or MetricRecord()
        self._finish(grid, state, evaluate_config, num_rounds, timeout)
        result.arrays = ArrayRecord(state)
        return result

    def _over_budget(self, server_round: int) -> bool:
        """True (with a log line and a metrics.jsonl record) when this round's DP release would
        take epsilon past `dp-max-epsilon`: the run stops with the last model within budget."""
        cfg = self.cfg
        if not self.private or cfg.dp_max_epsilon <= 0:
            return False
        spent = epsilon(cfg.dp_noise_multiplier, self.releases, cfg.dp_delta)
        upcoming = epsilon(cfg.dp_noise_multiplier, self.releases + 1, cfg.dp_delta)
        if upcoming <= cfg.dp_max_epsilon:
            return False
        log.warning("%s: DP budget: round %d would take epsilon from %.3g to %.3g, past "
                    "dp-max-epsilon %g; stopping with the model of round %d", self.title,
                    server_round, spent, upcoming, cfg.dp_max_epsilon,
                    server_round - 1)  # fmt: skip
        self.run.log({"phase": "dp-budget", "stage": self.phase, "round": server_round,
                      "dp_epsilon": spent, "dp_epsilon_next": upcoming,
                      "dp_max_epsilon": cfg.dp_max_epsilon})  # fmt: skip
        return True

    def _evaluate_round(
        self,
        grid: Grid,
        server_round: int,
        state: Mapping[str, torch.Tensor],
        config: ConfigRecord | None,
        timeout: float,
    ) -> MetricRecord | None:
        """The sites' evaluation of the new global model (None: this phase has none)."""
        return None

    def _finish(
        self,
        grid: Grid,
        state: Mapping[str, torch.Tensor],
        config: ConfigRecord | None,
        num_rounds: int,
        timeout: float,
    ) -> None:
        """What the phase does with its final state (nothing, unless overridden)."""

    def _shared(self, state: Mapping[str, torch.Tensor]) -> ArrayRecord:
        return ArrayRecord({k: state[k] for k in self.keys})

    def _config(self, extra: ConfigRecord | None) -> ConfigRecord:
        return ConfigRecord(dict(extra or {}))

    def _node_records(self, node: int) -> dict[str, ArrayRecord]:
        """Records sent to `node` besides the global arrays and the config."""
        return dict(self._extra)

    def _post_process(self, state: StateDict) -> StateDict:
        """What runs on each aggregate, after any DP noise (post-processing)."""
        return state

    # ------------------------------------------------------------------ one round

    def _messages(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid, kind: str
    ) -> list[Message]:
        connected = set(grid.get_node_ids())
        nodes = [n for n in self.sites if n in connected]
        train = kind == self.train_type
        if train and len(nodes) < self.min_train_nodes:
            self._skip(server_round, f"{len(nodes)} site(s) connected, min-sites is "
                                     f"{self.min_train_nodes}")  # fmt: skip
            return []
        config[protocol.SERVER_ROUND] = server_round
        payload = ArrayRecord(compress(arrays.to_torch_state_dict(), self.cfg.fp16))
        label = "train" if train else "evaluate"
        self._addressed = []
        for node in nodes:
            records = self._node_records(node)
            content = RecordDict({protocol.ARRAYS: payload, protocol.CONFIG: config, **records})
            self._addressed.append(Message(content, dst_node_id=node, message_type=kind))
            for name, size in [(protocol.ARRAYS, payload.count_bytes())] + [
                (k, r.count_bytes()) for k, r in records.items()
            ]:
                what = "sources" if name.startswith(protocol.SOURCE_PREFIX) else label
                key = f"bytes_{what}_down"
                self._round_log[key] = self._round_log.get(key, 0) + size
        return self._addressed

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._current = arrays.to_torch_state_dict()
        self._round_log = {}
        return self._messages(server_round, arrays, config, grid, self.train_type)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self._messages(server_round, arrays, config, grid, protocol.EVALUATE)

    def _skip(self, server_round: int, reason: str) -> None:
        """Too few sites: the round leaves the global model unchanged, and the run goes on."""
        log.warning("round %d skipped: %s", server_round, reason)
        self._round_log["skipped"] = reason

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Read every reply's format (`server.replies`), count its bytes, and hand the usable
        ones to the core (`rounds.combine_round`: screening, DP, aggregation, dtypes); then
        log, and apply the post-processing (InMerge)."""
        usable: dict[str, SiteReply] = {}
        rejected: dict[str, str] = {}
        for msg in replies:
            node = addressee(msg, self._addressed)
            name = self.name(node)
            if msg.has_error():
                rejected[name] = f"error reply: {msg.error.reason}"
                continue
            self._round_log["bytes_train_up"] = self._round_log.get("bytes_train_up", 0) + sum(
                r.count_bytes() for r in msg.content.array_records.values()
            )  # what came over the wire, accepted or not
            reply = read_train_reply(msg.content, self.sites.get(node))
            if isinstance(reply, str):
                rejected[name] = reply
            else:
                usable[name] = reply
        result = combine_round(usable, rejected, self._current, self.meta,
                               self._round_settings(), self.releases)  # fmt: skip
        for name, reason in result.rejected.items():
            log.warning("round %d: rejected reply from %s: %s", server_round, name, reason)
        return self._finish_round(server_round, result)

    def _round_settings(self) -> RoundSettings:
        """This round's screening, aggregation and DP settings for the core."""
        cfg = self.cfg
        dp = Noise(self.dp_keys, cfg.dp_clipping_norm, cfg.dp_noise_multiplier, self.noise)
        return RoundSettings.from_config(cfg, self.min_train_nodes, dp if self.private else None)

    def _finish_round(
        self, server_round: int, result: RoundResult
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The core's round result into this round's log, the release count and records."""
        self._round_log.update(result.log)
        self.releases = result.releases
        if result.state is None:
            self._skip(server_round, str(result.skipped))
            return None, None
        return ArrayRecord(self._post_process(result.state)), MetricRecord(result.metrics)

    def _secure_round(
        self, grid: Grid, server_round: int, messages: list[Message], timeout: float
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """One round under SecAgg+ (`secagg = true`; server.secagg): each site is told which
        keys to send as deltas and its weight; the server gets their weighted mean only, adds
        the DP noise to the sum, applies it to what it sent, and runs InMerge on the result.
        Per-update screening cannot run; the sites check their own updates."""
        if not messages:  # too few sites connected (configure_train logged the skip)
            return None, None
        cfg = self.cfg
        keys = self.dp_keys if self.private else self.keys
        nodes = [m.metadata.dst_node_id for m in messages]
        examples = [(self.sites[n].train_examples or 1) if n in self.sites else 1 for n in nodes]
        weights = dict(zip(nodes, site_weights(examples, cfg.max_weight_share, self.private),
                           strict=True))  # fmt: skip
        contents = {}
        for msg, node in zip(messages, nodes, strict=True):
            config = {
                **msg.content[protocol.CONFIG],
                protocol.SECAGG_KEYS: keys,
                protocol.SECAGG_WEIGHT: weights[node],
            }
            contents[node] = RecordDict(
                {**dict(msg.content), protocol.CONFIG: ConfigRecord(config)}
            )
        result = secure_mean(grid, server_round, contents, num_shares=cfg.secagg_num_shares,
                             threshold=cfg.secagg_threshold,
                             clipping_range=cfg.secagg_clipping_range,
                             timeout=cfg.secagg_timeout or timeout)  # fmt: skip
        log_ = self._round_log
        log_["bytes_train_up"] = sum(s["bytes_up"] for s in result.seen)
        log_["bytes_secagg_down"] = sum(s["bytes_down"] for s in result.seen
                                        if s["stage"] != "collect-masked-vectors")  # fmt: skip
        log_.update(secagg_stages=result.seen, sites=len(result.summed),
                    rejected=[self.name(n) for n in nodes if n not in result.summed])  # fmt: skip
        summed = {n: weights[n] for n in result.summed}
        return self._finish_round(server_round, combine_secure_round(
            self._current, self.meta, keys, result.mean, summed, result.metrics,
            self._round_settings(), cfg.secagg_clipping_range, self.releases))  # fmt: skip

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """The sites' example-weighted means (loss, local metrics), with accuracy, macro-F1 and
        AUROC pooled over all the sites' test images in place of the means
        (`rounds.pool_evaluations`). A reply whose metrics or counts are malformed is left
        out, with a log line naming the site."""
        reports: list[tuple[SiteReply, dict[str, np.ndarray]]] = []
        for msg in replies:
            if msg.has_error():
                continue
            node = addressee(msg, self._addressed)
            reply = read_evaluate_reply(msg.content, self.sites.get(node), self.info.num_classes)
            if isinstance(reply, str):
                log.warning("round %d: evaluation of %s left out: %s", server_round,
                            self.name(node), reply)  # fmt: skip
                continue
            reports.append(reply)
        metrics = pool_evaluations(reports)
        return None if metrics is None else MetricRecord(metrics)
