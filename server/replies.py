"""A site's round reply, unpacked from its Flower records into the core's types.

Kept apart from `strategy` so the rounds there stay about the round: these readers are the
one place the server reads a train or evaluate reply's records (the layout is
`medmerge_core.federation.protocol`'s), and whatever a site sent, they return a `SiteReply`
or one line saying why its format is unusable; never an exception.
"""

from __future__ import annotations

import numpy as np
from flwr.app import RecordDict

from medmerge_core.federation.members import Member
from medmerge_core.federation.protocol import METRICS, POOLED
from medmerge_core.federation.rounds import SiteReply, read_counts, read_report


def read_train_reply(content: RecordDict, member: Member | None) -> SiteReply | str:
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


def read_evaluate_reply(
    content: RecordDict, member: Member | None, num_classes: int
) -> tuple[SiteReply, dict[str, np.ndarray]] | str:
    """An evaluate reply as (its `SiteReply` without weights, its pooled counts: empty when it
    sent none), or why its metrics or counts are unusable."""
    record = content.metric_records.get(METRICS)
    if record is None:
        return "reply has no metrics"
    report = read_report(record, member and member.test_examples)
    if isinstance(report, str):
        return report
    examples, metrics = report
    counts: dict[str, np.ndarray] = {}
    pooled = content.metric_records.get(POOLED)
    if pooled is not None:
        read = read_counts(pooled, num_classes, examples)
        if isinstance(read, str):
            return read
        counts = read
    return SiteReply({}, examples, metrics), counts
