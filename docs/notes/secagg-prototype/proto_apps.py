"""SecAgg+ from a Message-API app (flwr 1.41): prototype, numpy only.

Server: a Message-API ServerApp (@app.main with a Grid) that runs its own plain rounds and,
for other rounds, drives flwr.server.workflow.SecAggPlusWorkflow directly (no DefaultWorkflow)
through a LegacyContext and a tiny legacy-Strategy adapter that only selects nodes and
captures the single unmasked aggregate in aggregate_fit.
Client: a Message-API ClientApp; @app.train() behind a wrapper mod that calls secaggplus_mod
only when the message carries the SecAgg+ config record.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import FitIns, Parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.server import LegacyContext
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid, ServerApp

OUT = os.environ.get("PROTO_OUT", "result.json")
if os.environ.get("PROTO_SAFE_PRG") == "1":  # flwr issue #7522 mitigation, both sides
    import safe_prg

    safe_prg.install()
SHAPES = {"conv.weight": (4, 3, 3, 3), "fc.weight": (5, 4), "fc.bias": (5,)}


def site_update(pid: int, base: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What site `pid` sends back (deterministic, so the server can check the aggregate)."""
    rng = np.random.default_rng(100 + pid)
    return {
        k: (base[k] + 0.05 * (pid + 1) * rng.standard_normal(v.shape)).astype(np.float32)
        for k, v in base.items()
    }


def site_examples(pid: int) -> int:
    return 100 * (pid + 1)


# ----------------------------------------------------------------------------- client

client = ClientApp()


def secagg_if_asked(msg: Message, ctxt: Context, call_next):  # a Mod
    """secaggplus_mod only for messages of the SecAgg+ protocol (plain "train" rounds pass)."""
    if RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, ctxt)
    cfg = msg.content.config_records[RECORD_KEY_CONFIGS]
    drop = os.environ.get("PROTO_DROP_AT_SETUP", "")  # "round:partition"
    pid = int(ctxt.node_config["partition-id"])
    if drop and cfg.get("stage") == "setup" and drop == f"{msg.metadata.group_id}:{pid}":
        raise RuntimeError("dropped at setup (test)")
    return secaggplus_mod(msg, ctxt, call_next)


@client.query("info")
def info(msg: Message, context: Context) -> Message:
    pid = int(context.node_config["partition-id"])
    return Message(RecordDict({"info": ConfigRecord({"partition": pid})}), reply_to=msg)


@client.train(mods=[secagg_if_asked])
def train(msg: Message, context: Context) -> Message:
    pid = int(context.node_config["partition-id"])
    config = msg.content["config"]
    if int(config.get("drop-partition", -1)) == pid:
        raise RuntimeError("site failed during training (test)")
    rec = msg.content["arrays"]  # the project's own content, also under SecAgg+
    base = {k: rec[k].numpy() for k in rec}
    update = site_update(pid, base)
    examples = 1 if config.get("equal-weights", False) else site_examples(pid)
    metrics = {"train_loss": 0.1 * (pid + 1)}
    import importlib

    _m = importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod")
    prg = f"{_m.pseudo_rand_gen.__name__} pid={os.getpid()} env={os.environ.get('PROTO_SAFE_PRG')}"
    if RECORD_KEY_CONFIGS in msg.content.config_records:  # SecAgg+ stage 2: legacy FitRes layout
        send = {k: update[k] - base[k] for k in base} if config.get("deltas", False) else update
        content = RecordDict(
            {
                "fitres.parameters": ArrayRecord({k: Array(v) for k, v in send.items()}),
                "fitres.num_examples": MetricRecord({"num_examples": examples}),
                "fitres.metrics": ConfigRecord({**metrics, "prg": prg}),
                "fitres.status": ConfigRecord({"code": 0, "message": ""}),
                # any other ArrayRecord is emptied by secaggplus_mod before the reply leaves:
                "local-bn": ArrayRecord({"bn.running_var": Array(np.full(3, 7.0 + pid))}),
                "extra-metrics": MetricRecord({"seen": 1.0}),  # ...but Metric/ConfigRecords pass
            }
        )
    else:  # the project's plain reply
        content = RecordDict(
            {
                "arrays": ArrayRecord({k: Array(v) for k, v in update.items()}),
                "metrics": MetricRecord({**metrics, "num-examples": examples}),
            }
        )
    return Message(content, reply_to=msg)


# ----------------------------------------------------------------------------- server


class SelectAndCapture(Strategy):
    """Legacy Strategy adapter: picks `nodes`, captures the unmasked aggregate."""

    def __init__(self, grid: Grid, nodes: list[int]) -> None:
        self.grid, self.nodes = grid, nodes
        self.aggregate: list[np.ndarray] | None = None
        self.examples: dict[int, int] = {}
        self.metrics: dict[int, dict] = {}
        self.failures = 0

    def initialize_parameters(self, client_manager):
        return None

    def configure_fit(self, server_round, parameters, client_manager):
        empty = FitIns(Parameters(tensors=[], tensor_type=""), {})
        return [(GridClientProxy(n, self.grid, 0), empty) for n in self.nodes]

    def aggregate_fit(self, server_round, results, failures):
        self.failures = len(failures)
        if results:  # every FitRes carries the same aggregated parameters
            self.aggregate = parameters_to_ndarrays(results[0][1].parameters)
            self.examples = {p.node_id: int(r.num_examples) for p, r in results}
            self.metrics = {p.node_id: dict(r.metrics) for p, r in results}
        return None, {}

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


class MessageSecAgg(SecAggPlusWorkflow):
    """SecAgg+ whose stage-2 message is the app's own RecordDict per node (not a FitIns)."""

    def __init__(self, contents: dict[int, RecordDict], **kwargs) -> None:
        super().__init__(**kwargs)
        self.contents = contents

    def setup_stage(self, grid, context, state) -> bool:
        ok = super().setup_stage(grid, context, state)
        # stage 2 adds the SecAgg+ config record to this dict: one RecordDict per node
        state.nid_to_fitins = {n: RecordDict(dict(self.contents[n])) for n in state.nid_to_fitins}
        return ok


class SpyGrid:
    """Wraps the Grid and records what every reply carries (what the server holds)."""

    def __init__(self, grid: Grid) -> None:
        self.grid, self.seen = grid, []

    def send_and_receive(self, messages, *, timeout=None):
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        for r in replies:
            if r.has_error():
                self.seen.append({"error": r.error.reason[:80]})
                continue
            c = r.content
            self.seen.append(
                {
                    "arrays": {k: len(v) for k, v in c.array_records.items()},
                    "metrics": sorted(c.metric_records),
                    "configs": sorted(c.config_records),
                    "masked": [
                        np.load(__import__("io").BytesIO(b)).astype(np.int64)
                        for b in c.config_records.get(RECORD_KEY_CONFIGS, {}).get(
                            "masked_params", []
                        )
                    ],
                }
            )
        return replies

    def __getattr__(self, name):
        return getattr(self.grid, name)


def secagg_round(
    grid: Grid, server_round: int, contents: dict[int, RecordDict], **protocol
) -> tuple[SelectAndCapture, SpyGrid, bool]:
    spy = SpyGrid(grid)
    strategy = SelectAndCapture(grid, sorted(contents))
    ctx = LegacyContext(
        Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
        strategy=strategy,
    )
    ctx.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
        {WorkflowKey.CURRENT_ROUND: server_round}
    )
    ctx.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()  # unused: contents replace it
    MessageSecAgg(contents, **protocol)(spy, ctx)
    return strategy, spy, strategy.aggregate is not None


server = ServerApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    while len(list(grid.get_node_ids())) < 3:
        time.sleep(0.5)
    nodes = sorted(grid.get_node_ids())
    msgs = [Message(RecordDict(), dst_node_id=n, message_type="query.info") for n in nodes]
    part = {
        r.metadata.src_node_id: int(r.content["info"]["partition"])
        for r in grid.send_and_receive(msgs)
    }
    rng = np.random.default_rng(0)
    base = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    keys = list(base)
    report: dict = {
        "safe_prg": os.environ.get("PROTO_SAFE_PRG") == "1",
        "nodes": {str(n): p for n, p in part.items()},
        "rounds": [],
    }

    def contents(config: dict) -> dict[int, RecordDict]:
        payload = ArrayRecord({k: Array(v) for k, v in base.items()})
        return {
            n: RecordDict({"arrays": payload, "config": ConfigRecord(dict(config))}) for n in nodes
        }

    def expected(pids, equal=False, deltas=False):
        w = np.array([1.0 if equal else site_examples(p) for p in pids])
        out = {}
        for k in keys:
            vals = [
                site_update(p, base)[k].astype(np.float64) - (base[k] if deltas else 0)
                for p in pids
            ]
            out[k] = sum(wi * v for wi, v in zip(w, vals, strict=False)) / w.sum()
        return out

    # Round 1: the project's own round (plain FedAvg over visible replies)
    t = time.perf_counter()
    plain = [Message(c, dst_node_id=n, message_type="train") for n, c in contents({}).items()]
    replies = list(grid.send_and_receive(plain))
    w = {r.metadata.src_node_id: float(r.content["metrics"]["num-examples"]) for r in replies}
    agg = {
        k: sum(
            w[r.metadata.src_node_id] * r.content["arrays"][k].numpy().astype(np.float64)
            for r in replies
        )
        / sum(w.values())
        for k in keys
    }
    exp = expected([part[n] for n in nodes])
    report["rounds"].append(
        {
            "round": 1,
            "mode": "plain",
            "seconds": time.perf_counter() - t,
            "max_err": max(float(np.abs(agg[k] - exp[k]).max()) for k in keys),
        }
    )

    cases = [
        (2, "secagg, weighted by examples (max_weight=1000)", {}, {"max_weight": 1000.0}),
        (
            3,
            "secagg, site partition 1 fails in training (stage 2)",
            {"drop-partition": 1},
            {"max_weight": 1000.0},
        ),
        (
            4,
            "secagg, equal weights, deltas, clipping_range=1 (DP-style)",
            {"equal-weights": True, "deltas": True},
            {"max_weight": 1.0, "clipping_range": 1.0},
        ),
        (5, "secagg, a site drops at setup (stage 0)", {}, {"max_weight": 1000.0}),
        (6, "secagg again after the halted round", {}, {"max_weight": 1000.0}),
    ]
    for server_round, label, config, protocol in cases:
        t = time.perf_counter()
        strat, spy, ok = secagg_round(
            grid,
            server_round,
            contents(config),
            num_shares=3,
            reconstruction_threshold=2,
            timeout=60,
            **protocol,
        )
        row = {
            "round": server_round,
            "mode": label,
            "completed": ok,
            "seconds": time.perf_counter() - t,
            "exchanges": len(spy.seen) // 1,
            "replies": [{k: v for k, v in s.items() if k != "masked"} for s in spy.seen],
        }
        if ok:
            pids = sorted(part[n] for n in strat.examples)
            row["summed_sites"] = pids
            row["client_prg"] = sorted({str(m.get("prg")) for m in strat.metrics.values()})
            import flwr.server.workflow.secure_aggregation.secaggplus_workflow as _w

            row["server_prg"] = f"{_w.pseudo_rand_gen.__name__} pid={os.getpid()}"
            row["examples_seen_by_server"] = {str(part[n]): e for n, e in strat.examples.items()}
            exp = expected(
                pids, equal=config.get("equal-weights", False), deltas=config.get("deltas", False)
            )
            agg = dict(zip(keys, strat.aggregate, strict=False))
            row["max_err"] = max(float(np.abs(agg[k] - exp[k]).max()) for k in keys)
            row["shapes_dtypes"] = {k: [list(a.shape), str(a.dtype)] for k, a in agg.items()}
            if config.get("equal-weights"):
                row["sum_err"] = max(
                    float(np.abs(agg[k] * len(pids) - exp[k] * len(pids)).max()) for k in keys
                )
            # masked vectors vs the sites' true (quantized-scale) updates: uncorrelated
            masked = [s["masked"] for s in spy.seen if s.get("masked")]
            row["masked_vectors"] = len(masked)
            if masked:
                flat = np.concatenate([m.ravel() for m in masked[0][1:]]).astype(np.float64)
                true = np.concatenate([site_update(pids[0], base)[k].ravel() for k in keys])
                row["corr_masked_vs_a_site_update"] = float(np.corrcoef(flat, true)[0, 1])
        report["rounds"].append(row)

    # Round 7: the project's own round again (mixing works)
    replies = list(
        grid.send_and_receive(
            [Message(c, dst_node_id=n, message_type="train") for n, c in contents({}).items()]
        )
    )
    report["rounds"].append(
        {"round": 7, "mode": "plain again", "ok": all(not r.has_error() for r in replies)}
    )
    with open(OUT, "w") as fh:
        json.dump(report, fh, indent=1, default=str)
