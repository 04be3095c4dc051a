"""Replies that try to take over, poison or crash a round, as real Flower messages from the
real ClientApp, rewritten on their way back (`InProcessGrid(tamper=...)`).

Each case is rejected with a log line naming the node, and the run finishes: no reply can end
the ServerApp. Where the server cannot refuse a lie (a site that also lies at discovery), its
weight is capped so that it cannot steer the mean on its own.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Message, MetricRecord

from client.client_app import app as client_app
from medmerge_core.federation.rounds import (
    SiteReply,
    capped_weights,
    check_rule,
    combine_updates,
    mean_metrics,
    read_counts,
    read_examples,
    read_metrics,
)
from medmerge_core.io import read_jsonl
from server.server_app import run_federation
from simulations.inprocess import InProcessGrid
from tests.helpers import nodes, one_line_error, run_config

# ---------------------------------------------------------------- the checks, one by one


def test_example_counts_must_be_finite_positive_integers_within_the_discovered_count() -> None:
    assert read_examples(8, 8) == 8 and read_examples(8.0, None) == 8
    for bad in (math.nan, math.inf, -5, 0, 7.5, True, "8", [8]):
        assert isinstance(read_examples(bad, 100), str), bad
    assert "exceeds the 8" in str(read_examples(10**9, 8))


def test_metrics_must_be_plain_finite_numbers_under_plain_names() -> None:
    assert read_metrics({"num-examples": 3, "loss": 1}) == {"loss": 1.0}
    assert math.isnan(read_metrics({"val_auroc": math.nan})["val_auroc"])  # undefined, allowed
    for bad in ({"loss": math.inf}, {"loss": [1.0, 2.0]}, {"../../etc": 1.0}, {"Loss": 1.0},
                {f"m{i}": 1.0 for i in range(65)}, {"loss": True}):  # fmt: skip
        assert isinstance(read_metrics(bad), str), bad


def test_pooled_counts_must_agree_with_the_classes_and_with_each_other() -> None:
    good = {"confusion": [3, 1, 0, 4], "positive": [2, 2, 0, 4], "negative": [0, 4, 4, 0]}
    counts = read_counts(good, 2, 8)
    assert not isinstance(counts, str) and counts["confusion"].shape == (2, 2)
    bad = [
        {**good, "confusion": [3, 1, 0]},  # not k x k
        {**good, "confusion": [3, 1, 0, 5]},  # 9 images, the reply says 8
        {**good, "positive": [2, 2, 0, 5]},  # a class histogram that is not the class's count
        {**good, "negative": [0, -4, 4, 0]},
        {**good, "positive": [2.5, 1.5, 0, 4]},
        {"confusion": good["confusion"]},
    ]
    for record in bad:
        assert isinstance(read_counts(record, 2, 8), str), record
    assert isinstance(read_counts(good, 3, 8), str)  # another model's classes


def test_no_site_weighs_more_than_its_capped_share() -> None:
    weights = capped_weights([10**9, 8, 8], 0.5)
    assert weights[0] / sum(weights) == pytest.approx(0.5) and weights[1] == weights[2] == 8
    weights = capped_weights([100, 30, 10, 10, 10], 0.4)
    assert max(w / sum(weights) for w in weights) <= 0.4 + 1e-12
    assert weights[2:] == [10, 10, 10]  # the uncapped keep their counts
    assert capped_weights([10**9, 8], 0.5) == [1.0, 1.0]  # 2 sites at 0.5: equal weights
    assert capped_weights([5, 3], 1.0) == [5.0, 3.0]


def test_robust_rules_match_their_definitions() -> None:
    rng = np.random.default_rng(0)
    values = rng.normal(size=(5, 3, 4))
    states = [{"w": torch.from_numpy(v)} for v in values]
    median = combine_updates(states, [1.0] * 5, "median", 0.0)["w"].numpy()
    np.testing.assert_allclose(median, np.median(values, axis=0))
    even = combine_updates(states[:4], [1.0] * 4, "median", 0.0)["w"].numpy()
    np.testing.assert_allclose(even, np.median(values[:4], axis=0))
    trimmed = combine_updates(states, [1.0] * 5, "trimmed-mean", 0.2)["w"].numpy()
    np.testing.assert_allclose(trimmed, np.sort(values, axis=0)[1:4].mean(axis=0))
    mean = combine_updates(states, [1, 1, 1, 1, 4], "mean", 0.0)["w"].numpy()
    np.testing.assert_allclose(mean, (values[:4].sum(0) + 4 * values[4]) / 8)
    replies = [SiteReply({}, 1, {"loss": 1.0, "extra": 5.0}), SiteReply({}, 3, {"loss": 2.0})]
    assert mean_metrics(replies, [1.0, 3.0]) == {"loss": 1.75}  # only the shared keys


def test_rules_that_cannot_work_at_the_sites_discovered_are_refused_at_start() -> None:
    assert "needs 3 or more" in one_line_error(check_rule, "median", 0.2, 2, 0.0)
    message = one_line_error(check_rule, "trimmed-mean", 0.2, 4, 0.0)
    assert "trims nothing at 4 sites; it needs 5 sites or more" in message
    assert check_rule("trimmed-mean", 0.2, 5, 0.0) == []
    assert "direction screen needs 3" in check_rule("mean", 0.2, 2, 0.0)[0]
    assert check_rule("mean", 0.2, 2, -1.0) == []  # screen off: nothing to warn about


# ---------------------------------------------------------------- whole runs


def _metrics(reply: Message) -> MetricRecord:
    return next(iter(reply.content.metric_records.values()))


FAULTS = {  # (round, node) -> what the dishonest or broken site does to its train reply
    (1, 4): ("NaN example count", lambda r: _metrics(r).__setitem__("num-examples", math.nan)),
    (1, 5): ("negative count", lambda r: _metrics(r).__setitem__("num-examples", -5)),
    (1, 6): ("1e9 examples", lambda r: _metrics(r).__setitem__("num-examples", 10**9)),
    (1, 7): ("an extra metric key", lambda r: _metrics(r).__setitem__("extra_metric", 1.0)),
    (2, 4): ("fractional count", lambda r: _metrics(r).__setitem__("num-examples", 7.5)),
    (2, 5): ("a list metric", lambda r: _metrics(r).__setitem__("train_loss", [1.0, 2.0])),
    (2, 6): (
        "a second array record",
        lambda r: r.content.__setitem__("more", ArrayRecord({"x": torch.zeros(3)})),
    ),
    (2, 7): ("an infinite metric", lambda r: _metrics(r).__setitem__("train_loss", math.inf)),
    (3, 4): (
        "100 metric keys",
        lambda r: [_metrics(r).__setitem__(f"m{i}", 0.0) for i in range(100)],
    ),
    (3, 5): ("a path as a metric key", lambda r: _metrics(r).__setitem__("../../x", 0.0)),
    (3, 6): ("no metrics at all", lambda r: r.content.__delitem__("metrics")),
}
POOLED_FAULTS = {  # round -> (node, what it does to its evaluation counts)
    1: (4, lambda p: p.__setitem__("confusion", [1, 2, 3])),
    2: (5, lambda p: p.__setitem__("positive", [10**6] * len(p["positive"]))),
    3: (6, lambda p: p.__delitem__("negative")),
}


def test_malformed_replies_are_rejected_and_the_run_finishes(tmp_path, caplog) -> None:
    """Five sites, three rounds; in every round up to four of them send a broken reply (the
    cases the security review found, and more). Each is rejected, or its extra key dropped,
    with a log line naming the node; the honest sites' rounds go on; the model stays finite."""
    rc = run_config(tmp_path, rounds=3, **{"min-sites": 1})
    grid = InProcessGrid(client_app, nodes(tmp_path, sites=5), rc)

    def tamper(node: int, reply: Message) -> Message:
        kind = reply.metadata.message_type
        rnd = int(next(m for m in grid.sent if m.metadata.message_id ==
                       reply.metadata.reply_to_message_id).content["config"].get(
                           "server-round", 0))  # fmt: skip
        if kind == "train" and (rnd, node) in FAULTS:
            FAULTS[rnd, node][1](reply)
        if kind == "evaluate" and rnd in POOLED_FAULTS and POOLED_FAULTS[rnd][0] == node:
            POOLED_FAULTS[rnd][1](reply.content["pooled"])
        return reply

    grid.tamper = tamper
    history = run_federation(grid, rc)
    assert [h["round"] for h in history] == [1, 2, 3]
    rejected = {h["round"]: h["rejected"] for h in history}
    assert rejected == {
        1: ["node 4 (s1)", "node 5 (s2)", "node 6 (s3)"],
        2: ["node 4 (s1)", "node 5 (s2)", "node 6 (s3)", "node 7 (s4)"],
        3: ["node 4 (s1)", "node 5 (s2)", "node 6 (s3)"],
    }
    assert [h["sites"] for h in history] == [2, 1, 2]
    assert "extra_metric" not in history[0] and "train_loss" in history[0]
    assert all(math.isfinite(h["eval_macro_f1"]) for h in history)  # pooled from the others
    for reason in ("must be a positive integer, got nan", "must be a positive integer, got -5",
                   "must be a positive integer, got 7.5", "this site reported at discovery",
                   "needs one ArrayRecord and one MetricRecord", "is list, not a number",
                   "metric 'train_loss' is inf", "metric keys (at most 64)",
                   "is not a plain lower-case name",
                   "evaluation of node 4 (s1) left out: pooled confusion has 3 cells",
                   "evaluation of node 5 (s2) left out: pooled score histograms disagree",
                   "evaluation of node 6 (s3) left out: pooled counts have keys"):  # fmt: skip
        assert reason in caplog.text, reason
    final = torch.load(tmp_path / "federation/final.pt", weights_only=True)["state_dict"]
    assert all(torch.isfinite(v).all() for v in final.values() if v.is_floating_point())


def _delta(state: dict, base: dict, keys: list[str]) -> torch.Tensor:
    return torch.cat([(state[k].double() - base[k].double()).flatten() for k in keys])


def test_a_site_that_lies_at_discovery_too_cannot_steer_the_mean(tmp_path) -> None:
    """The review's attack: `num-examples = 1e9` with a 5x-norm update, now claimed at discovery
    too, so the count check passes. Its weight is capped at `max-weight-share` (0.5): the
    aggregate is the capped mean, not the attacker's update (which it was before)."""
    rc = run_config(tmp_path, rounds=1, inmerge=False)
    grid = InProcessGrid(client_app, nodes(tmp_path), rc)

    def tamper(node: int, reply: Message) -> Message:
        kind = reply.metadata.message_type
        if node == 4 and kind == "query.info":
            reply.content["info"]["train-examples"] = 10**9
        if node == 4 and kind == "train":
            sent = next(m for m in grid.sent if m.metadata.message_id ==
                        reply.metadata.reply_to_message_id)  # fmt: skip
            base = sent.content["arrays"].to_torch_state_dict()
            state = reply.content["arrays"].to_torch_state_dict()
            amplified = {k: base[k] + 5 * (v - base[k]) for k, v in state.items()}
            reply.content["arrays"] = ArrayRecord(amplified)
            _metrics(reply)["num-examples"] = 10**9
        return reply

    grid.tamper = tamper
    (record,) = run_federation(grid, rc)
    assert record["sites"] == 3 and record["rejected"] == []
    sent = next(m for m in grid.sent if m.metadata.message_type == "train")
    base = sent.content["arrays"].to_torch_state_dict()
    keys = [k for k, v in base.items() if v.is_floating_point()]
    replies = {m.metadata.src_node_id: m for m in grid.received
               if m.metadata.message_type == "train"}  # fmt: skip
    deltas = {n: _delta(m.content["arrays"].to_torch_state_dict(), base, keys)
              for n, m in replies.items()}  # fmt: skip
    final = torch.load(tmp_path / "federation/final.pt", weights_only=True)["state_dict"]
    aggregate = _delta(final, base, keys)
    capped = 0.5 * deltas[4] + 0.25 * deltas[5] + 0.25 * deltas[6]  # 16 : 8 : 8
    torch.testing.assert_close(aggregate, capped, atol=1e-6, rtol=1e-5)
    # Uncapped, the aggregate was the attacker's update; now it is half of it at most.
    assert (aggregate - deltas[4]).norm() > 0.3 * deltas[4].norm()


def test_duplicate_names_and_coordinators_are_refused_at_discovery(tmp_path, caplog) -> None:
    """s3 calls itself s1: both are refused (the server cannot tell which is genuine) and the
    run goes on with s2; a second node calling itself the coordinator leaves no coordinator,
    and the run stops with a clear error before any merge."""
    rc = run_config(tmp_path, rounds=1, **{"min-sites": 1})

    def rename(node: int, reply: Message) -> Message:
        if node == 6 and reply.metadata.message_type == "query.info":
            reply.content["info"]["name"] = "s1"
        return reply

    (record,) = run_federation(InProcessGrid(client_app, nodes(tmp_path), rc, tamper=rename), rc)
    assert record["sites"] == 1
    assert "name 's1' is claimed by 2 nodes" in caplog.text

    def promote(node: int, reply: Message) -> Message:
        if node == 5 and reply.metadata.message_type == "query.info":
            reply.content["info"]["role"] = "coordinator"
        if node == 6 and reply.metadata.message_type == "query.info":
            reply.content["info"]["role"] = "admin"
        return reply

    rc = run_config(tmp_path / "two", rounds=1)
    with pytest.raises(RuntimeError, match="no node has role 'coordinator'"):
        run_federation(InProcessGrid(client_app, nodes(tmp_path / "two"), rc, tamper=promote), rc)
    assert "role 'coordinator' is claimed by 2 nodes" in caplog.text
    assert "role 'admin' is not one of" in caplog.text


def test_a_coordinator_model_that_is_not_the_merge_it_reports_is_refused(tmp_path) -> None:
    """The server re-bakes the merged convs from the sources it sent and the coefficients the
    coordinator returned; a model with one altered kernel is refused."""
    rc = run_config(tmp_path, rounds=1)

    def alter(node: int, reply: Message) -> Message:
        if node == 3 and reply.metadata.message_type == "train.merge":
            state = reply.content["arrays"].to_torch_state_dict()
            key = next(k for k, v in state.items() if v.ndim == 4)
            state[key] = state[key].clone()
            state[key][0] += 0.1
            reply.content["arrays"] = ArrayRecord(state)
        return reply

    with pytest.raises(RuntimeError, match="not the merge it reports"):
        run_federation(InProcessGrid(client_app, nodes(tmp_path), rc, tamper=alter), rc)
    assert not (tmp_path / "federation" / "merged.pt").exists()


def test_an_honest_coordinator_passes_the_rebake_with_fp16_transport(tmp_path) -> None:
    rc = run_config(tmp_path, rounds=1, fp16=True)
    (record,) = run_federation(InProcessGrid(client_app, nodes(tmp_path), rc), rc)
    assert record["sites"] == 3
    merge = [r for r in read_jsonl(tmp_path / "federation/metrics.jsonl") if r["phase"] == "merge"]
    assert len(merge) == 1
