"""The site runtime (client.site_runtime), in process, on real app bundles built and installed
by Flower: the approval lifecycle of a delivered bundle (unknown, pending, approved, modified
after approval, revoked), the check before Flower installs or imports anything and again on the
installed copy, the ClientApp's own check from an installed bundle, where the wrapper sits in
Flower's ClientApp runtime, and a checked bundle importing its own copy of the project. The
policy file and its rules: test_site_policy.py. The same over the network:
test_site_policy_network.py."""

from __future__ import annotations

import json
import shutil
import types
from pathlib import Path

import pytest
from flwr.app import Context, Message, RecordDict

from client.client_app import running_app_digest
from client.site_runtime import app_digest, check_task, guard
from medmerge_core.cli import main as medmerge
from medmerge_core.federation.site_approvals import read_approvals, set_status
from medmerge_core.federation.site_digests import fab_digest, installed_digest
from medmerge_core.federation.site_policy import PolicyRefusal
from medmerge_core.io import read_jsonl
from tests.test_site_policy import GOOD, SITE_POLICY, site_config, write_policy

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


def task(node_config: dict, rc: dict, message_type: str = "query.info") -> tuple:
    """A pulled task: the message (sent as the ServerApp runtime would send it) and context."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, 0
    message = Message(RecordDict(), dst_node_id=1, message_type=message_type)
    return message, Context(7, 1, node_config, RecordDict(), rc)


def refusals(tmp_path: Path, run_name: str = "federation") -> list[dict]:
    lines = read_jsonl(tmp_path / "audit" / run_name / "site-1.jsonl")
    return [line["refused"] for line in lines if "refused" in line]


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
