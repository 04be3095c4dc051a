"""The site policy, in process: the policy file, every rule (the privacy floors, the limits,
roles, messages and run-config approval), and a run that goes on without the site that refused.
The site runtime's check of real app bundles: test_site_runtime.py. The same over the network:
test_site_policy_network.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from client.client_app import app as client_app
from medmerge_core.cli import main as medmerge
from medmerge_core.federation.site_approvals import read_approvals, set_status
from medmerge_core.federation.site_digests import run_config_digest
from medmerge_core.federation.site_enforcement import decide
from medmerge_core.federation.site_policy import check, load_policy
from medmerge_core.io import read_jsonl
from server.server_app import run_federation
from simulations.inprocess import InProcessGrid
from tests.helpers import nodes, one_line_error, run_config


def write_policy(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


SITE_POLICY = """\
[serve]
roles = ["site"]
[privacy]
require-dp = "client"
max-clipping-norm = 1.0
min-noise-multiplier = 0.5
min-sites = 2
[limits]
max-rounds = 4
max-local-epochs = 2
data = ["synthetic:target"]
"""

# A run config this policy accepts (DP at the client, enough noise, few rounds).
GOOD = {"dp": "client", "dp-noise-multiplier": 0.5, "dp-clipping-norm": 1.0, "rounds": 2,
        "min-sites": 2, "ft-epochs": 1}  # fmt: skip


def site_config(tmp_path: Path, policy: Path) -> dict:
    return {"role": "site", "name": "site-1", "data": "synthetic:target",
            "audit-dir": str(tmp_path / "audit"), "policy": str(policy)}  # fmt: skip


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("colour = 1\n", "'colour'"),
        ("[serve]\nrole = ['site']\n", "'serve.role'"),
        ("[serve]\nroles = ['hospital']\n", "serve.roles"),
        ("[serve]\nroles = 'site'\n", "serve.roles"),
        ("[serve]\nmessages = ['train', 'query.weights']\n", "serve.messages"),
        ("[apps]\nrequire-approved = 'yes'\n", "apps.require-approved"),
        ("[privacy]\nrequire-dp = true\n", "privacy.require-dp"),
        ("[privacy]\nrequire-dp = 'always'\n", "privacy.require-dp"),
        ("[privacy]\nmin-noise-multiplier = 0.5\n", "privacy.min-noise-multiplier"),
        ("[privacy]\nrequire-dp = 'any'\nmax-clipping-norm = 0\n", "privacy.max-clipping-norm"),
        ("[privacy]\nrequire-dp = 'any'\nmax-clipping-norm = nan\n", "privacy.max-clipping-norm"),
        ("[privacy]\nmin-sites = 2.5\n", "privacy.min-sites"),
        ("[privacy]\nmin-sites = true\n", "privacy.min-sites"),
        ("[privacy]\nallow-pooled-counts = 0\n", "privacy.allow-pooled-counts"),
        ("[limits]\nmax-rounds = -1\n", "limits.max-rounds"),
        ("[limits]\ndata = []\n", "limits.data"),
        ("privacy = 3\n", "'privacy'"),
        ("approvals = 3\n", "approvals"),
        ("[privacy\n", "not valid TOML"),
    ],
)
def test_a_bad_policy_value_is_one_line_naming_the_key(tmp_path, text, named) -> None:
    policy = write_policy(tmp_path / "policy.toml", text)
    message = one_line_error(load_policy, policy)
    assert named in message and str(policy) in message, message


def test_a_missing_or_relative_policy_is_refused_in_one_line_and_fails_closed(tmp_path) -> None:
    """A node whose policy cannot be read refuses everything (rule "policy"): a typo in the
    node config never lets every app through."""
    assert "does not exist" in one_line_error(load_policy, tmp_path / "none.toml")
    assert "absolute" in one_line_error(load_policy, Path("policy.toml"))
    broken = write_policy(tmp_path / "policy.toml", "[privacy]\nmin-sites = 0\n")
    refusal = decide(site_config(tmp_path, broken), GOOD, "query.info", None)
    assert refusal is not None and refusal.rule == "policy" and "privacy.min-sites" in str(refusal)
    # the CLI and write_node_config.sh report the same line, exit 2
    assert medmerge(["site", "show", "--policy", str(broken)]) == 2


@pytest.mark.parametrize(
    ("change", "rule"),
    [
        ({"dp": "none"}, "privacy.require-dp"),
        ({"dp": "server"}, "privacy.require-dp"),
        ({"dp-clipping-norm": 2.0}, "privacy.max-clipping-norm"),
        ({"dp-noise-multiplier": 0.3}, "privacy.min-noise-multiplier"),
        ({"min-sites": 1}, "privacy.min-sites"),
        ({"rounds": 5}, "limits.max-rounds"),
        ({"probe-mode": "federated", "probe-rounds": 3}, "limits.max-rounds"),  # 2 + 3 > 4
        ({"ft-epochs": 3}, "limits.max-local-epochs"),
        ({"pretrain-epochs": 3}, "limits.max-local-epochs"),
        ({"sim-target-data": "synthetic:other"}, "limits.data"),  # what the run names
        ({"rounds": "many"}, "run-config"),
    ],
)
def test_a_run_config_below_a_floor_or_over_a_limit_is_refused(tmp_path, change, rule) -> None:
    policy = load_policy(write_policy(tmp_path / "policy.toml", SITE_POLICY))
    simulated = {"partition-id": 3, "num-partitions": 6}  # a site; the run names its data
    assert check(policy, {}, "train", simulated, GOOD, None) is None  # the floor itself passes
    refusal = check(policy, {}, "train", simulated, {**GOOD, **change}, None)
    assert refusal is not None and refusal.rule == rule, refusal


def test_roles_messages_pooled_counts_epsilon_and_secure_aggregation(tmp_path) -> None:
    """The rules that are not floors on one number. A policy that requires secure aggregation
    refuses a run without `secagg = true` (its plain train messages: tests/test_secagg.py)."""
    site = {"role": "site", "name": "s", "data": "synthetic:target"}
    path = tmp_path / "policy.toml"
    cases = [
        ("[serve]\nroles = ['institution']\n", site, {}, "serve.roles"),
        ("[serve]\nmessages = ['query.info', 'evaluate']\n", site, {}, "serve.messages"),
        ("[privacy]\nallow-pooled-counts = false\n", site, {}, "privacy.allow-pooled-counts"),
        ("[privacy]\nallow-pooled-counts = false\n", site,
         {"dp": "client", "dp-release-metrics": True}, "privacy.allow-pooled-counts"),
        ("[privacy]\nrequire-dp = 'any'\nmax-epsilon = 8.0\n", site, {"dp": "server"},
         "privacy.max-epsilon"),
        ("[privacy]\nrequire-dp = 'any'\nmax-epsilon = 8.0\n", site,
         {"dp": "server", "dp-max-epsilon": 9.0}, "privacy.max-epsilon"),
        ("[privacy]\nrequire-secure-aggregation = true\n", site, {"dp": "client"},
         "privacy.require-secure-aggregation"),
        ("[apps]\nrequire-approved-run-config = true\n", site, {},
         "apps.require-approved-run-config"),
    ]  # fmt: skip
    for text, node_config, rc, rule in cases:
        policy = load_policy(write_policy(path, text))
        refusal = check(policy, {}, "train", node_config, rc, None)
        assert refusal is not None and refusal.rule == rule, (text, rc, refusal)
    accepted = [
        ("[privacy]\nallow-pooled-counts = false\n", {"dp": "client"}),
        ("[privacy]\nrequire-dp = 'any'\nmax-epsilon = 8.0\n",
         {"dp": "server", "dp-max-epsilon": 8.0}),
        ("[serve]\nmessages = ['query.info', 'evaluate']\n", {}),
    ]  # fmt: skip
    for text, rc in accepted:
        policy = load_policy(write_policy(path, text))
        msg_type = "evaluate" if "messages" in text else "train"
        assert check(policy, {}, msg_type, site, rc, None) is None, (text, rc)
    # A run config approved by its digest runs; the node records an unknown one as pending,
    # with the config itself for the officer to read.
    path.write_text("[apps]\nrequire-approved-run-config = true\n")
    rc = {"rounds": 1, "run-name": "study-1"}
    assert decide({**site, "policy": str(path)}, rc, "train", None).rule.endswith("run-config")
    (entry,) = read_approvals(tmp_path / "approvals.json").values()
    assert (entry.digest, entry.kind, entry.status) == (
        run_config_digest(rc),
        "run-config",
        "pending",
    )
    assert entry.detail == rc and entry.name == "study-1"
    set_status(tmp_path / "approvals.json", entry.digest, "approved")
    assert decide({**site, "policy": str(path)}, rc, "train", None) is None
    assert decide({**site, "policy": str(path)}, {**rc, "rounds": 2}, "train", None) is not None


def test_a_refusing_site_is_left_out_and_the_run_goes_on(tmp_path) -> None:
    """In process, the real ServerApp against four nodes' ClientApps: site s3's policy asks for
    DP that the run does not use, so s3 refuses discovery with an error naming the rule (logged
    and in its audit log) and is not admitted; the run completes with s1 and s2."""
    policy = write_policy(tmp_path / "policy.toml", SITE_POLICY)
    configs = nodes(tmp_path, sites=3)
    configs[-1] = {**configs[-1], "policy": str(policy)}
    rc = run_config(tmp_path, rounds=1)
    grid = InProcessGrid(client_app, configs, rc)
    history = run_federation(grid, rc)
    assert [(h["round"], h["sites"]) for h in history] == [(1, 2)]
    refused = [m for m in grid.received if m.has_error()]
    assert len(refused) == 1 and refused[0].metadata.src_node_id == len(configs)
    reason = refused[0].error.reason
    assert "s3: site policy refused the message (rule privacy.require-dp)" in reason, reason
    lines = read_jsonl(tmp_path / "audit" / "federation" / "s3.jsonl")
    assert [line["refused"]["rule"] for line in lines] == ["privacy.require-dp"]
    assert lines[0]["message_type"] == "query.info" and lines[0]["refused"]["by"] == "client-app"
    served = {m.metadata.message_type for m in grid.sent if m.metadata.dst_node_id == len(configs)}
    assert served == {"query.info"}  # never asked again, never sent a model
