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
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedMedian, FedTrimmedAvg, Result

from medmerge_core.federation.config import FederationConfig
from medmerge_core.federation.merge_rounds import ProbePlan, sources_digest
from medmerge_core.federation.privacy import epsilon, private_mean
from medmerge_core.federation.run import FederationRun, round_table, table_text
from medmerge_core.federation.transport import (
    ModelInfo,
    compress,
    model_reference,
    parameter_keys,
    restore_dtypes,
    transport_keys,
    unpack_counts,
)
from medmerge_core.federation.validation import screen_replies
from medmerge_core.inmerge import apply_inmerge
from medmerge_core.metrics import pooled_metrics
from medmerge_core.models import StateDict
from server.messages import addressee, exchange

log = logging.getLogger("flwr")


def _metrics(record: MetricRecord | None, prefix: str) -> dict[str, float]:
    if record is None:
        return {}
    return {prefix + k: float(v) for k, v in record.items() if k != "num-examples"}  # type: ignore[arg-type]


def _pooled(replies: Iterable[Message]) -> dict[str, float]:
    """Accuracy, macro-F1 and AUROC of the union of the sites' test sets, from the confusion
    counts and score histograms each site sends (`metrics.pooling_counts`)."""
    sums: dict[str, np.ndarray] = {}
    for msg in replies:
        record = msg.content.metric_records.get("pooled")
        if record is None:
            continue
        for key, value in unpack_counts(record).items():
            sums[key] = sums[key] + value if key in sums else value
    if not sums:
        return {}
    return pooled_metrics(sums["confusion"], sums["positive"], sums["negative"])


def _aggregator(cfg: FederationConfig) -> FedAvg:
    """Flower's own aggregation rule for the screened replies: FedAvg's example-weighted mean,
    FedMedian's coordinate-wise median or FedTrimmedAvg's trimmed mean."""
    if cfg.aggregation == "median":
        return FedMedian(min_train_nodes=1)
    if cfg.aggregation == "trimmed-mean":
        return FedTrimmedAvg(min_train_nodes=1, beta=cfg.trim_fraction)
    return FedAvg(min_train_nodes=1)


class FederatedRounds(FedAvg):
    """The rounds both federated phases share: FedAvg over the site nodes with reply screening,
    fp16 transport, robust aggregation, DP-FedAvg, a checkpoint and a log line per round.

    `meta` gives the keys, shapes and dtypes of the state the server holds, `keys` the ones
    that travel and `dp_keys` the ones DP clips and noises. The DP-noise generator and the count
    of DP releases are the strategy's state (`state_dict`), so a resumed run draws the same
    noise and accounts every release; `releases` starts a phase after an earlier phase's.
    """

    phase = "round"  # the metrics.jsonl phase of a round
    checkpoint_name = "checkpoint.pt"
    title = "Federated fine-tuning"
    train_type: str = MessageType.TRAIN

    def __init__(
        self,
        cfg: FederationConfig,
        sites: Mapping[int, str],
        run: FederationRun,
        meta: Mapping[str, torch.Tensor],
        norm_keys: Sequence[str],
        parameters: Sequence[str],
        noise_seed: int,
        releases: int = 0,
    ) -> None:
        super().__init__(min_train_nodes=cfg.min_sites, min_evaluate_nodes=1, min_available_nodes=1)
        self.cfg = cfg
        self.sites = dict(sites)
        self.run = run
        self.meta = dict(meta)
        self.norm_keys = list(norm_keys)
        self.keys = transport_keys(self.meta, self.norm_keys, cfg.fedbn)
        params = set(parameters)
        self.dp_keys = [k for k in self.keys if k in params]  # what DP clips and noises
        self.noise = torch.Generator().manual_seed(noise_seed)
        self.releases = releases  # rounds whose aggregate carried DP noise (all phases)
        self._aggregator = _aggregator(cfg)
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
        return f"node {node_id} ({self.sites.get(node_id, '?')})"

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
            began = time.perf_counter()
            messages = self.configure_train(
                server_round, self._shared(state), self._config(train_config), grid
            )
            arrays, train = self.aggregate_train(server_round, exchange(grid, messages, timeout))
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
            self._addressed += self._construct_messages(content, [node], kind)
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
        """Screen every reply, average the accepted ones, restore dtypes, apply InMerge."""
        by_name: dict[str, Message] = {}
        states: dict[str, StateDict] = {}
        rejected: dict[str, str] = {}
        for msg in replies:
            name = self.name(addressee(msg, self._addressed))
            if msg.has_error():
                rejected[name] = f"error reply: {msg.error.reason}"
                continue
            content = msg.content
            self._round_log["bytes_train_up"] = self._round_log.get("bytes_train_up", 0) + sum(
                r.count_bytes() for r in content.array_records.values()
            )  # what came over the wire, accepted or not
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
        private = self.cfg.dp != "none"
        accepted, bad = screen_replies(  # under DP clipping bounds each site, not screening
            states,
            self._current,
            math.inf if private else self.cfg.outlier_factor,
            self.cfg.fp16,
            None if private else self.cfg.min_cosine,
        )
        rejected.update(bad)
        for name, reason in rejected.items():
            log.warning("round %d: rejected reply from %s: %s", server_round, name, reason)
        self._round_log.update(sites=len(accepted), rejected=sorted(rejected))
        if len(accepted) < self.min_train_nodes:
            self._skip(server_round, f"{len(accepted)} usable site replies, min-sites is "
                                     f"{self.min_train_nodes}")  # fmt: skip
            return None, None
        clean = []
        for name in accepted:
            msg = by_name[name]
            state = restore_dtypes(states[name], self.meta)
            metrics = next(iter(msg.content.metric_records.values()))
            content = RecordDict({"arrays": ArrayRecord(state), "metrics": metrics})
            clean.append(Message(content=content, metadata=msg.metadata))  # reply left intact
        if private:
            state = private_mean(
                [m.content["arrays"].to_torch_state_dict() for m in clean],  # type: ignore[union-attr]
                self._current,
                self.dp_keys,
                self.cfg.dp_clipping_norm,
                self.cfg.dp_noise_multiplier,
                self.noise,
            )
            metrics = self.train_metrics_aggr_fn([m.content for m in clean], self.weighted_by_key)
            self.releases += 1
            self._round_log["dp_epsilon"] = epsilon(
                self.cfg.dp_noise_multiplier, self.releases, self.cfg.dp_delta
            )
        else:
            arrays, metrics = self._aggregator.aggregate_train(server_round, clean)
            if arrays is None:
                return None, metrics
            state = restore_dtypes(arrays.to_torch_state_dict(), self.meta)
        return ArrayRecord(self._post_process(state)), metrics  # after the noise

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """The sites' example-weighted means (loss, local metrics), with accuracy, macro-F1 and
        AUROC pooled over all the sites' test images in place of the means."""
        replies = [m for m in replies if not m.has_error() and "metrics" in m.content]
        if not replies:
            return None
        local = [RecordDict({"metrics": m.content["metrics"]}) for m in replies]
        metrics = self.evaluate_metrics_aggr_fn(local, self.weighted_by_key)
        return MetricRecord({**dict(metrics), **_pooled(replies)})


class MedMergeFedAvg(FederatedRounds):
    """Federated fine-tuning of the merged model, with InMerge on each aggregate (after the DP
    noise), evaluation pooled over the sites' test sets after every round, and the final model
    saved and evaluated. The InMerge generator is part of the checkpointed state."""

    def __init__(
        self,
        cfg: FederationConfig,
        info: ModelInfo,
        sites: Mapping[int, str],
        run: FederationRun,
        releases: int = 0,
    ) -> None:
        meta, self.conv_keys, norm = model_reference(info)
        super().__init__(cfg, sites, run, meta, norm, parameter_keys(info), cfg.seed + 1, releases)
        self.info = info
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
        sites: Mapping[int, str],
        run: FederationRun,
    ) -> None:
        noise_seed = cfg.seed + 2  # noise independent of fine-tuning's (seed + 1)
        super().__init__(
            cfg, sites, run, plan.initial, plan.norm_keys, plan.parameter_keys, noise_seed
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
