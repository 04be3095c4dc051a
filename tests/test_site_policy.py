"""The site policy, in process: the policy file, the approval lifecycle at the site runtime
(with real app bundles built and installed by Flower), the privacy floors, and a run that goes
on without the site that refused. The same over the network: test_site_policy_network.py."""

from __future__ import annotations

import json
import shutil
import types
from pathlib import Path

import pytest
from flwr.app import Context, Message, RecordDict

from client.client_app import app as client_app
from client.client_app import running_app_digest
from client.site_runtime import app_digest, check_task, guard
from medmerge_core.cli import main as medmerge
from medmerge_core.federation.site_approvals import read_approvals, set_status
from medmerge_core.federation.site_digests import fab_digest, installed_digest, run_config_digest
from medmerge_core.federation.site_enforcement import decide
from medmerge_core.federation.site_policy import PolicyRefusal, check, load_policy
from medmerge_core.io import read_jsonl
from server.server_app import run_federation
from simulations.inprocess import InProcessGrid
from tests.helpers import nodes, one_line_error, run_config

PYPROJECT = """\
[project]
name = "tiny-app"
version = "1.0.0"
dependencies = []

[tool.flwr.app]
publisher = "site-test"

[tool.flwr.app.components]
serverapp = "tiny.server:app"
clientapp = "tiny.client:app"

[tool.flwr.app.config]
rounds = 1
"""


def tiny_app(root: Path) -> Path:
    """A small Flower app folder, as a researcher would send one."""
    (root / "tiny").mkdir(parents=True)
    (root / "pyproject.toml").write_text(PYPROJECT)
    (root / "tiny" / "__init__.py").write_text("")
    (root / "tiny" / "client.py").write_text("app = None  # the researcher's ClientApp\n")
    (root / "tiny" / "server.py").write_text("app = None\n")
    return root


def bundle(root: Path) -> bytes:
    """The bundle `flwr run ROOT` would send (Flower's own build)."""
    from flwr.cli.build import build_fab_from_disk

    return build_fab_from_disk(root)


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


def task(node_config: dict, rc: dict, message_type: str = "query.info") -> tuple:
    """A pulled task: the message (sent as the ServerApp runtime would send it) and context."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, 0
    message = Message(RecordDict(), dst_node_id=1, message_type=message_type)
    return message, Context(7, 1, node_config, RecordDict(), rc)


def refusals(tmp_path: Path, run_name: str = "federation") -> list[dict]:
    lines = read_jsonl(tmp_path / "audit" / run_name / "site-1.jsonl")
    return [line["refused"] for line in lines if "refused" in line]


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


def test_approval_lifecycle_at_the_site_runtime(tmp_path, capsys) -> None:
    """The site runtime's check of a delivered bundle (client.site_runtime.check_task, on the
    bytes `flwr run` sends): unknown -> refused and recorded pending (the digest `medmerge
    site digest` prints) -> approved: runs -> the approved app modified after approval:
    refused -> revoked: refused again. Every refusal names its rule and is in the audit log."""
    app = tiny_app(tmp_path / "app")
    policy = write_policy(tmp_path / "policy.toml", SITE_POLICY)
    node_config = site_config(tmp_path, policy)
    fab = bundle(app)

    with pytest.raises(PolicyRefusal) as refused:
        check_task(*task(node_config, GOOD), fab, "site-test/tiny-app 1.0.0")
    assert refused.value.refusal.rule == "apps.require-approved"
    assert medmerge(["site", "digest", str(app), "--quiet"]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == fab_digest(fab) == app_digest(app)[0]
    (pending,) = read_approvals(tmp_path / "approvals.json").values()
    assert (pending.digest, pending.status, pending.by) == (printed, "pending", "node")
    assert pending.name == "site-test/tiny-app 1.0.0"

    assert medmerge(["site", "approve", "--policy", str(policy), "--app", str(app),
                     "--note", "reviewed by the DPO"]) == 0  # fmt: skip
    assert check_task(*task(node_config, GOOD), fab, "x") == printed  # it runs

    client = app / "tiny" / "client.py"
    original = client.read_text()
    client.write_text(original + "import os  # added after approval\n")
    with pytest.raises(PolicyRefusal) as refused:
        check_task(*task(node_config, GOOD), bundle(app), "x")
    assert refused.value.refusal.rule == "apps.require-approved"
    assert "not approved (unknown here" in str(refused.value)

    client.write_text(original)  # the approved app again, but withdrawn
    assert check_task(*task(node_config, GOOD), bundle(app), "x") == printed
    assert medmerge(["site", "revoke", "--policy", str(policy), printed]) == 0
    with pytest.raises(PolicyRefusal) as refused:
        check_task(*task(node_config, GOOD), fab, "x")
    assert "(revoked)" in str(refused.value)
    assert medmerge(["site", "revoke", "--policy", str(policy), printed]) == 2  # not approved
    capsys.readouterr()
    assert medmerge(["site", "show", "--policy", str(policy)]) == 0
    shown = capsys.readouterr().out
    assert (
        f"revoked  app        {printed}" in shown and "privacy.min-noise-multiplier: 0.5" in shown
    )

    rules = [r["rule"] for r in refusals(tmp_path)]
    assert rules == ["apps.require-approved"] * 3
    assert all(r["by"] == "site-runtime" for r in refusals(tmp_path))
    saved = json.loads((tmp_path / "approvals.json").read_text())["entries"][printed]
    assert [h["status"] for h in saved["history"]] == ["pending", "approved"]
    assert saved["history"][1]["note"] == "reviewed by the DPO"  # kept with the revocation


def test_site_runtime_refuses_before_installing_and_checks_the_installed_copy(
    tmp_path, monkeypatch
) -> None:
    """`guard` wraps Flower's ClientApp runtime: for a refused bundle Flower's installer is
    never called (nothing delivered is written or imported); for an approved one the copy
    Flower installed is checked too, so an installed app edited on the node's disk (which
    Flower would reuse as it is) is refused, as is a privacy-floor breach."""
    from flwr.cli.install import install_from_fab
    from flwr.common.config import get_project_dir

    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr"))
    policy = write_policy(tmp_path / "policy.toml", SITE_POLICY)
    node_config = site_config(tmp_path, policy)
    fab = bundle(tiny_app(tmp_path / "app"))
    installs: list[bytes] = []

    def run_once(rc: dict) -> None:
        message, context = task(node_config, rc)
        fab_record = types.SimpleNamespace(hash_str=fab_digest_hash(fab))
        run = types.SimpleNamespace(fab_id="site-test/tiny-app", fab_version="1.0.0")
        runtime = types.SimpleNamespace(
            pull_task_input=lambda client: (message, context, run, fab_record),
            install_from_fab=lambda content, **kw: (
                installs.append(content) or install_from_fab(content, **kw)
            ),
        )
        guard(runtime, forget=False)  # one interpreter for every test
        runtime.pull_task_input(None)
        runtime.install_from_fab(fab, skip_prompt=True)

    with pytest.raises(PolicyRefusal, match=r"apps\.require-approved"):
        run_once(GOOD)
    assert installs == [] and not (tmp_path / "flwr").exists()
    set_status(tmp_path / "approvals.json", fab_digest(fab), "approved")
    with pytest.raises(PolicyRefusal, match=r"privacy\.min-noise-multiplier"):
        run_once({**GOOD, "dp-noise-multiplier": 0.1})
    assert installs == []
    run_once(GOOD)
    installed = get_project_dir("site-test/tiny-app", "1.0.0", fab_digest_hash(fab))
    assert installs == [fab] and installed_digest(installed) == fab_digest(fab)
    (installed / "tiny" / "client.py").write_text("import os  # edited on the node's disk\n")
    with pytest.raises(PolicyRefusal, match="is not the checked bundle"):
        run_once(GOOD)
    assert [r["rule"] for r in refusals(tmp_path)][-1] == "apps.require-approved"


def fab_digest_hash(fab: bytes) -> str:
    import hashlib

    return hashlib.sha256(fab).hexdigest()


def test_the_client_app_checks_again_from_an_installed_bundle(tmp_path) -> None:
    """The ClientApp's own check (defence in depth, and what an in-process run has): it digests
    the installed bundle it runs from, as the runtime does; a source checkout has no digest."""
    app = tiny_app(tmp_path / "app")
    installed = tmp_path / "flwr" / "apps" / "site-test.tiny-app.1.0.0.0123abcd"
    shutil.copytree(app, installed)
    (installed / "tiny" / "__pycache__").mkdir()
    (installed / "tiny" / "__pycache__" / "client.cpython-311.pyc").write_bytes(b"\0")
    assert running_app_digest(installed) == app_digest(app)[0]
    assert running_app_digest(app) is None
    assert running_app_digest() is None  # these tests run from the checkout


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


def test_the_wrapper_sits_where_flower_pulls_and_installs_the_bundle() -> None:
    """`guard` replaces two names of Flower's ClientApp runtime; this breaks loudly if a Flower
    upgrade stops calling them, by name, in this order before the app is loaded."""
    import inspect

    from flwr.supernode.runtime import run_clientapp

    source = inspect.getsource(run_clientapp.run_clientapp)
    names = run_clientapp.run_clientapp.__code__.co_names
    assert {"pull_task_input", "install_from_fab"} <= set(names)
    order = [source.index(s) for s in ("pull_task_input(client)", "install_from_fab(fab.content",
                                       "load_client_app_fn(", "client_app(message=")]  # fmt: skip
    assert order == sorted(order), order


def test_after_the_check_the_bundle_runs_its_own_copy_of_the_project(tmp_path) -> None:
    """The runtime imported its check from the site's install; once the bundle is checked (or
    no policy applies) those modules are forgotten, so the bundle imports its own copy, as
    under Flower's own flwr-clientapp. In a fresh interpreter."""
    import subprocess
    import sys

    code = """
import sys, types
from client.site_runtime import guard
from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, 0
task = (Message(RecordDict(), dst_node_id=1, message_type="query.info"),
        Context(7, 1, {"role": "site", "name": "s"}, RecordDict(), {}),
        types.SimpleNamespace(fab_id="a/b", fab_version="1"), None)
runtime = types.SimpleNamespace(pull_task_input=lambda c: task,
                                install_from_fab=lambda content, **kw: "installed")
assert "medmerge_core.federation.site_policy" in sys.modules
guard(runtime)
runtime.pull_task_input(None)
assert runtime.install_from_fab(b"", skip_prompt=True) == "installed"
left = [n for n in sys.modules if n.split(".")[0] in ("medmerge_core", "client")]
assert left == [], left
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    assert done.returncode == 0, done.stderr
