"""The federated phases' strategies: Flower's FedAvg over the sites, owning their rounds.

`FederatedRounds.start` runs the rounds as Flower's own `Strategy.start` does, plus what a
hospital federation needs: resume after the last checkpointed round, a checkpoint and a log
line after every round, reply screening, and optional differential privacy (DP-FedAvg with an
accountant whose releases span both phases). `MergeProbeFedAvg` runs the federated merge probe;
`MedMergeFedAvg` the fine-tuning, with InMerge on each aggregate (after the noise), metrics
pooled over the sites' test sets, and a last evaluation of the final model. The science
(screening rules, dtype restoration, DP, InMerge, pooled metrics, the probe) is in
medmerge_core; these classes move it in and out of messages.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result

from medmerge_core.federation.config import FederationConfig
from medmerge_core.federation.members import Member
from medmerge_core.federation.merge_rounds import ProbePlan, sources_digest
from medmerge_core.federation.privacy import epsilon
from medmerge_core.federation.rounds import (
    Noise,
    SiteReply,
    aggregate_round,
    mean_metrics,
    read_counts,
    read_metrics,
    read_report,
)
from medmerge_core.federation.run import FederationRun, round_table, table_text
from medmerge_core.federation.secure_sum import apply_mean, site_weights
from medmerge_core.federation.transport import (
    ModelInfo,
    compress,
    model_reference,
    parameter_keys,
    restore_dtypes,
    transport_keys,
)
from medmerge_core.inmerge import apply_inmerge
from medmerge_core.metrics import pooled_metrics
from medmerge_core.models import StateDict
from server.messages import addressee, exchange
from server.secagg import secure_mean

log = logging.getLogger("flwr")


def _metrics(record: MetricRecord | None, prefix: str) -> dict[str, float]:
    if record is None:
        return {}
    return {prefix + k: float(v) for k, v in record.items() if k != "num-examples"}  # type: ignore[arg-type]


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
    train_type: str = MessageType.TRAIN

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
            self._extra = {"local-init": ArrayRecord({k: state[k] for k in self.norm_keys})}
        result = Result()
        for server_round in range(start + 1, num_rounds + 1):
            if self._over_budget(server_round):
                break
            began = time.perf_counter()
            messages = self.configure_train(
                server_round, self._shared(state), self._config(train_config), grid
            )
            if self.cfg.secagg and self.train_type == MessageType.TRAIN:
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
                **_metrics(train, ""),
                **_metrics(evaluation, "eval_"),
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
        config["server-round"] = server_round
        payload = ArrayRecord(compress(arrays.to_torch_state_dict(), self.cfg.fp16))
        label = "train" if train else "evaluate"
        self._addressed = []
        for node in nodes:
            records = self._node_records(node)
            content = RecordDict({"arrays": payload, "config": config, **records})
            self._addressed.append(Message(content, dst_node_id=node, message_type=kind))
            for name, size in [("arrays", payload.count_bytes())] + [
                (k, r.count_bytes()) for k, r in records.items()
            ]:
                what = "sources" if name.startswith("source-") else label
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
        return self._messages(server_round, arrays, config, grid, MessageType.EVALUATE)

    def _skip(self, server_round: int, reason: str) -> None:
        """Too few sites: the round leaves the global model unchanged, and the run goes on."""
        log.warning("round %d skipped: %s", server_round, reason)
        self._round_log["skipped"] = reason

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Check every reply's format, screen and combine the usable ones
        (`rounds.aggregate_round`), restore dtypes, apply the post-processing (InMerge)."""
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
            reply = self._read_train_reply(msg.content, self.sites.get(node))
            if isinstance(reply, str):
                rejected[name] = reply
            else:
                usable[name] = reply
        sent = self._current if not self.private else {k: self._current[k] for k in self.dp_keys}
        cfg = self.cfg
        outcome = aggregate_round(
            usable,
            sent,
            rule=cfg.aggregation,
            trim_fraction=cfg.trim_fraction,
            max_share=cfg.max_weight_share,
            outlier_factor=cfg.outlier_factor,
            min_cosine=cfg.min_cosine,
            allow_fp16=cfg.fp16,
            min_sites=self.min_train_nodes,
            dp=Noise(self.dp_keys, cfg.dp_clipping_norm, cfg.dp_noise_multiplier, self.noise)
            if self.private
            else None,
        )
        rejected.update(outcome.rejected)
        for name, reason in rejected.items():
            log.warning("round %d: rejected reply from %s: %s", server_round, name, reason)
        self._round_log.update(sites=len(outcome.accepted), rejected=sorted(rejected))
        if outcome.state is None:
            self._skip(server_round, f"{len(outcome.accepted)} usable site replies, min-sites "
                                     f"is {self.min_train_nodes}")  # fmt: skip
            return None, None
        if self.private:
            self.releases += 1
            self._round_log["dp_epsilon"] = epsilon(
                cfg.dp_noise_multiplier, self.releases, cfg.dp_delta
            )
        state = {**self._current, **restore_dtypes(outcome.state, self.meta)}
        return ArrayRecord(self._post_process(state)), MetricRecord(outcome.metrics)

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
            config = {**msg.content["config"], "secagg-keys": keys, "secagg-weight": weights[node]}
            contents[node] = RecordDict({**dict(msg.content), "config": ConfigRecord(config)})
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
        if result.mean is None or len(result.summed) < self.min_train_nodes:
            self._skip(server_round, f"secure aggregation summed {len(result.summed)} site(s), "
                                     f"min-sites is {self.min_train_nodes}")  # fmt: skip
            return None, None
        sent = restore_dtypes(compress({k: self._current[k] for k in keys}, cfg.fp16), self.meta)
        bound = cfg.secagg_clipping_range / min(weights[n] for n in result.summed)
        dp = Noise(self.dp_keys, cfg.dp_clipping_norm, cfg.dp_noise_multiplier, self.noise)
        new = apply_mean(sent, result.mean, keys, len(result.summed), bound,
                         dp if self.private else None)  # fmt: skip
        if isinstance(new, str):
            self._skip(server_round, f"secure aggregate refused: {new}")
            return None, None
        if self.private:
            self.releases += 1
            log_["dp_epsilon"] = epsilon(cfg.dp_noise_multiplier, self.releases, cfg.dp_delta)
        reports = {n: read_metrics(result.metrics.get(n, {})) for n in result.summed}
        usable = {n: m for n, m in reports.items() if not isinstance(m, str)}
        metrics = mean_metrics([SiteReply({}, 1, m) for m in usable.values()],
                               [weights[n] for n in usable])  # fmt: skip
        state = {**self._current, **restore_dtypes(new, self.meta)}
        return ArrayRecord(self._post_process(state)), MetricRecord(metrics)

    def _read_train_reply(self, content: RecordDict, member: Member | None) -> SiteReply | str:
        """A train reply as a `SiteReply`, or why its format is unusable: one ArrayRecord and
        one MetricRecord, a plausible `num-examples` and plain finite metrics. Under DP only
        the keys DP covers may come back (the site keeps its BN statistics)."""
        if len(content.array_records) != 1 or len(content.metric_records) != 1:
            return "reply needs one ArrayRecord and one MetricRecord (num-examples)"
        report = read_report(next(iter(content.metric_records.values())),
                             member and member.train_examples)  # fmt: skip
        if isinstance(report, str):
            return report
        try:
            state = next(iter(content.array_records.values())).to_torch_state_dict()
        except Exception as exc:  # a malformed array must not end the ServerApp
            return f"arrays unreadable ({type(exc).__name__})"
        return SiteReply(state, *report)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """The sites' example-weighted means (loss, local metrics), with accuracy, macro-F1 and
        AUROC pooled over all the sites' test images in place of the means. A reply whose
        metrics or counts are malformed is left out, with a log line naming the site."""
        usable: list[SiteReply] = []
        sums: dict[str, np.ndarray] = {}
        for msg in replies:
            if msg.has_error():
                continue
            node = addressee(msg, self._addressed)
            reply = self._read_evaluate_reply(msg.content, self.sites.get(node))
            if isinstance(reply, str):
                log.warning("round %d: evaluation of %s left out: %s", server_round,
                            self.name(node), reply)  # fmt: skip
                continue
            usable.append(reply[0])
            for key, value in reply[1].items():
                sums[key] = sums[key] + value if key in sums else value
        if not usable:
            return None
        metrics = mean_metrics(usable, [float(r.examples) for r in usable])
        if sums:
            metrics.update(pooled_metrics(sums["confusion"], sums["positive"], sums["negative"]))
        return MetricRecord(metrics)

    def _read_evaluate_reply(
        self, content: RecordDict, member: Member | None
    ) -> tuple[SiteReply, dict[str, np.ndarray]] | str:
        record = content.metric_records.get("metrics")
        if record is None:
            return "reply has no metrics"
        report = read_report(record, member and member.test_examples)
        if isinstance(report, str):
            return report
        examples, metrics = report
        counts: dict[str, np.ndarray] = {}
        pooled = content.metric_records.get("pooled")
        if pooled is not None:
            read = read_counts(pooled, self.info.num_classes, examples)
            if isinstance(read, str):
                return read
            counts = read
        return SiteReply({}, examples, metrics), counts


class MedMergeFedAvg(FederatedRounds):
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
        config = ConfigRecord({**self._config(config), "final": True})
        messages = self.configure_evaluate(num_rounds, self._shared(state), config, grid)
        evaluation = self.aggregate_evaluate(num_rounds, exchange(grid, messages, timeout))
        record = {"phase": "final", "model": "final.pt", **_metrics(evaluation, "")}
        self.run.log(record)
        log.info("final model, pooled over the sites' test sets: %s", record)

    def _post_process(self, state: StateDict) -> StateDict:
        if self.cfg.inmerge is None:
            return state
        state, changed = apply_inmerge(state, self.conv_keys, self.cfg.inmerge, self.generator)
        self._round_log["inmerge_kernels"] = changed
        return state


class MergeProbeFedAvg(FederatedRounds):
    """The federated merge probe (`merge-mode = "federated"`): each round every site trains the
    probe from the aggregate (`Node.probe_round`) and returns its probe state. The source
    backbones go to a site with its first message of the run (and again after it failed, in
    case it lost its cache); later messages name them by digest only."""

    phase = "probe-round"
    checkpoint_name = "probe-checkpoint.pt"
    title = "Federated merge probe"
    train_type = "train.probe"

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
        self.sources = {f"source-{i}": ArrayRecord(s) for i, s in enumerate(sent)}
        self.digest = sources_digest(sent)  # of the tensors as they travel
        self.has_sources: set[int] = set()

    def _config(self, extra: ConfigRecord | None) -> ConfigRecord:
        return ConfigRecord({
            **self.plan.info.as_config(), "names": list(self.plan.names),
            "sources-digest": self.digest, **(extra or {}),
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
