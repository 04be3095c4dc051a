"""Secure aggregation (SecAgg+) over the network: TLS, SuperNode authentication, the deploy/
scripts, and sites whose own policy requires it.

Every ClientApp is started by the site runtime (medmerge-clientapp) in its own process, once
per protocol stage, so the protocol's state has to live in the node's run state between
processes, which the in-process tests (tests/test_secagg.py) cannot show. What the server
received at each stage is counted by the ServerApp (`secagg_stages` in metrics.jsonl); what
each site sent is in its own audit log.
"""

from __future__ import annotations

import time

import pytest

from medmerge_core.io import read_jsonl
from tests.consortium import INSTITUTIONS, Consortium, tiny_run

pytestmark = pytest.mark.network

# The app is this checkout (not delivered as a reviewed bundle), so approvals are off here;
# tests/test_site_policy_network.py covers them.
POLICY = "[apps]\nrequire-approved = false\n[privacy]\nrequire-secure-aggregation = true\n"
STAGES = ["setup", "share-keys", "collect-masked-vectors", "unmask"]  # the server's names
SITE_STAGES = ["setup", "share_keys", "collect_masked_vectors", "unmask"]  # Flower's


def test_secure_aggregation_over_tls_and_auth_with_a_site_lost_mid_round(tmp_path) -> None:
    """4 sites, each requiring secure aggregation, client-side DP; site-4's SuperNode is
    SIGKILLed once it has taken the training stage (after the key exchange, within the
    threshold). The round completes with the other 3 summed; no reply at any stage carried an
    array (the masked vectors travel as bytes in the protocol's record); each site's audit log
    has one line per stage it answered, none with an array sent; the masked upload is int64."""
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    sites = {f"site-{i}": ["role=site", "data=synthetic:target", f"shard={i}/5",
                           f"policy={policy}"] for i in (1, 2, 3, 4)}  # fmt: skip
    nodes = {
        **INSTITUTIONS,
        "coordinator": ["role=coordinator", "data=synthetic:target", "shard=0/5"],
        **sites,
    }
    overrides = {"wait-nodes": 7, "secagg": "true", "min-sites": 3, "min-cosine": -1.0,
                 "outlier-factor": "inf", "dp": '"client"', "dp-noise-multiplier": 0.5,
                 "secagg-clipping-range": 1.0}  # fmt: skip
    with Consortium(tmp_path, nodes) as consortium:
        run_id = consortium.start_run(tiny_run(tmp_path, **overrides))
        # Its 3rd train message is the training stage (setup, share-keys, then this one).
        consortium.wait_for_log("site-4", "Receiving: train message", time.monotonic() + 900, 3)
        consortium.kill("site-4")
        status = consortium.final_status(run_id)
        assert status == ["finished:completed"], (status, consortium.tail())
    records = read_jsonl(tmp_path / "runs" / "federation" / "metrics.jsonl")
    (round_1,) = [r for r in records if r["phase"] == "round"]
    assert round_1["sites"] == 3 and len(round_1["rejected"]) == 1, round_1
    assert "site-4" in round_1["rejected"][0]
    stages = round_1["secagg_stages"]
    assert [s["stage"] for s in stages] == STAGES
    assert [(s["replies"], s["errors"]) for s in stages] == [(4, 0), (4, 0), (3, 1), (3, 0)]
    assert all(s["array_entries"] == 0 for s in stages)
    masked = stages[2]["bytes_up"]
    plain_fp32 = round_1["bytes_train_down"] / 4  # the model each site was sent, fp32
    assert masked > 3 * plain_fp32  # 3 sites x 8 bytes per parameter, over the float keys
    for site in sites:
        lines = read_jsonl(tmp_path / "audit" / "federation" / f"{site}.jsonl")
        left = [line for line in lines if line["message_type"].startswith("train (secagg")]
        answered = SITE_STAGES[:2] if site == "site-4" else SITE_STAGES
        assert [line["message_type"] for line in left] == [f"train (secagg {s})" for s in answered]
        assert all(not any(a["keys"] for a in line["sent"]["arrays"].values()) for line in left)
        assert not [line for line in lines if "refused" in line], site
