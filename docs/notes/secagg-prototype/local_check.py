"""One SecAgg+ round through InProcessGrid (no Ray): aggregate vs expected weighted mean."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import numpy as np
import proto_apps as P
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

TaskIdentity.run_id = 1
TaskIdentity.node_id = 0
TaskIdentity.task_id = 1
from inprocess_grid import InProcessGrid  # noqa: E402 (after the task identity is set)

nodes = [11, 22, 33]
grid = InProcessGrid(P.client, nodes, {n: {"partition-id": i} for i, n in enumerate(nodes)})
rng = np.random.default_rng(0)
base = {k: rng.standard_normal(s).astype(np.float32) for k, s in P.SHAPES.items()}
payload = ArrayRecord({k: Array(v) for k, v in base.items()})
drop = int(os.environ.get("DROP", "-1"))
contents = {
    n: RecordDict({"arrays": payload, "config": ConfigRecord({"drop-partition": drop})})
    for n in nodes
}
strat, spy, ok = P.secagg_round(
    grid,
    1,
    contents,
    num_shares=3,
    reconstruction_threshold=2,
    max_weight=float(os.environ.get("MAXW", "1000")),
)
for s in spy.seen:
    print({k: v for k, v in s.items() if k != "masked"})
pids = [i for i in range(3) if i != drop]
w = np.array([P.site_examples(p) for p in pids], dtype=float)
err = max(
    float(
        np.abs(
            a
            - sum(wi * P.site_update(p, base)[k] for wi, p in zip(w, pids, strict=False)) / w.sum()
        ).max()
    )
    for k, a in zip(base, strat.aggregate, strict=False)
)
print(
    "prg:",
    P.__dict__.get("safe_prg") is not None or os.environ.get("PROTO_SAFE_PRG"),
    "ok",
    ok,
    "max_err",
    err,
)
