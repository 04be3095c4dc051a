"""The site policy over the network: TLS, SuperNode authentication, the deploy/ scripts.

Each hospital names its own policy in its node config (write_node_config.sh policy=...), and
start_supernode.sh makes Flower start every ClientApp through the site runtime
(medmerge-clientapp), which checks the delivered bundle before installing it. The app is a
copy of this project in a temporary folder, so it can be modified as an attacker would.
One consortium serves the whole approval lifecycle and a privacy-floor refusal; every
hospital enforces the same policy, so a refused run ends at discovery (no node admitted), and
only the approved run trains; the approved run and two refused ones run side by side.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from medmerge_core.federation.site_approvals import read_approvals
from medmerge_core.io import read_jsonl
from tests.consortium import (
    BIN,
    DEPLOY,
    INSTITUTIONS,
    ROOT,
    Consortium,
    sh,
    tiny_run,
)

pytestmark = pytest.mark.network

POLICY = """\
[serve]
roles = ["institution", "site"]
[privacy]
require-dp = "client"
min-noise-multiplier = 0.5
[limits]
max-rounds = 4
"""
# The bundle's own check switched off, as a modified bundle could do: the site runtime, which
# checks before any of the bundle is imported, refuses it anyway.
ATTACK = "\n_enforce_policy = lambda msg, context: None  # the bundle skips its own check\n"


def copy_app(dst: Path) -> Path:
    """The project as a researcher would send it: its pyproject and packages, nothing else."""
    dst.mkdir()
    for name in ("pyproject.toml", ".gitignore"):
        shutil.copy(ROOT / name, dst / name)
    for name in ("client", "server", "medmerge_core"):
        shutil.copytree(ROOT / name, dst / name, ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def test_approval_lifecycle_and_privacy_floor_over_tls_and_auth(tmp_path) -> None:
    """unapproved: refused (and pending) -> approved: the run completes (the federated probe
    under DP and the final evaluation; rounds = 0 keeps it short) -> a run config below the
    privacy floor: refused -> the approved app modified after approval (its own check removed):
    refused -> the approval revoked: refused. Each refusal is made by the site runtime before
    the bundle is loaded, names its rule in the error reply the ServerApp logs, and is in each
    node's audit log."""
    started = time.monotonic()
    app = copy_app(tmp_path / "app")
    names = ["hospital-a", "hospital-b", "site-1"]
    policies = {}
    for name in names:  # each hospital writes its own policy; approvals go beside it
        policies[name] = tmp_path / "policy" / name / "policy.toml"
        policies[name].parent.mkdir(parents=True)
        policies[name].write_text(POLICY)
    nodes = {
        **{n: [*pairs, f"policy={policies[n]}"] for n, pairs in INSTITUTIONS.items()},
        "site-1": ["role=site", "data=synthetic:target", f"policy={policies['site-1']}"],
    }
    digest = sh(
        str(BIN / "medmerge"), "site", "digest", str(app), "--quiet", env=dict(os.environ)
    ).strip()
    timings = {}

    with Consortium(tmp_path, nodes) as consortium:

        def submit(name: str, source: Path = app, **extra: object) -> int:
            settings = {"run-name": f'"{name}"', "wait-nodes": 3, "dp": '"client"',
                        "dp-noise-multiplier": 0.5, "probe-mode": '"federated"',
                        "probe-rounds": 1, "rounds": 0, **extra}  # fmt: skip
            overrides = tiny_run(tmp_path, **settings)
            overrides += f' operator-key="{consortium.operator_key}"'
            out = consortium.flwr("run", str(source), "hospitals", "--format", "json", "-c",
                                  overrides)  # fmt: skip
            return int(json.loads(out)["run-id"])

        def finish(run_id: int) -> tuple[list[str], str]:
            """The run's final status and the ServerApp's log."""
            status = consortium.final_status(run_id)
            return status, consortium.flwr("log", str(run_id), "hospitals", "--show")

        def site_cli(command: str, *args: str) -> None:
            for name in names:  # every hospital decides for itself
                sh(str(BIN / "medmerge"), "site", command, "--policy", str(policies[name]),
                   *args, env=consortium.env)  # fmt: skip

        def refused(run_name: str) -> list[dict]:
            found = []
            for name in names:
                lines = read_jsonl(tmp_path / "audit" / run_name / f"{name}.jsonl")
                found += [line["refused"] for line in lines if "refused" in line]
            return found

        # 1. Not approved: every node refuses discovery; the node records the app as pending.
        t0 = time.monotonic()
        status, log = finish(submit("unapproved"))
        timings["unapproved"] = round(time.monotonic() - t0)
        assert status == ["finished:failed"], (status, consortium.tail())
        assert log.count("rule apps.require-approved") >= 3, log[-3000:]
        assert {(r["rule"], r["by"], r["app_digest"]) for r in refused("unapproved")} == {
            ("apps.require-approved", "site-runtime", digest)
        }
        for name in names:
            entry = read_approvals(policies[name].parent / "approvals.json")[digest]
            assert (entry.status, entry.by, entry.kind) == ("pending", "node", "app")

        # 2. Approved at every hospital, three runs side by side: the approved app runs to
        # completion; the approved app with a run config below the privacy floor is refused;
        # a copy modified after approval, with its own check removed, is refused.
        site_cli("approve", digest, "--note", "reviewed")
        t0 = time.monotonic()
        modified = tmp_path / "app-modified"
        shutil.copytree(app, modified)
        client = modified / "client" / "client_app.py"
        client.write_text(client.read_text() + ATTACK)
        runs = {"approved": submit("approved"),
                "floor": submit("floor", **{"dp-noise-multiplier": 0.1}),
                "modified": submit("modified", modified)}  # fmt: skip
        results = {name: finish(run_id) for name, run_id in runs.items()}
        timings["approved, floor, modified"] = round(time.monotonic() - t0)

        status, log = results["approved"]
        assert status == ["finished:completed"], (status, consortium.tail())
        assert refused("approved") == []
        assert (tmp_path / "runs" / "approved" / "final.pt").exists()
        site_log = read_jsonl(tmp_path / "audit" / "approved" / "site-1.jsonl")
        served = {line["message_type"] for line in site_log}
        assert {"query.info", "query.target", "train.probe", "evaluate"} <= served, served

        status, log = results["floor"]
        assert status == ["finished:failed"], (status, consortium.tail())
        assert "rule privacy.min-noise-multiplier" in log, log[-3000:]
        assert {r["rule"] for r in refused("floor")} == {"privacy.min-noise-multiplier"}

        status, log = results["modified"]
        assert status == ["finished:failed"], (status, consortium.tail())
        assert log.count("rule apps.require-approved") >= 3, log[-3000:]
        found = refused("modified")
        assert len(found) == 3 and all(r["by"] == "site-runtime" for r in found), found
        assert {r["rule"] for r in found} == {"apps.require-approved"}
        assert digest not in {r["app_digest"] for r in found}

        # 3. The approved app again, its approval revoked.
        site_cli("revoke", digest)
        t0 = time.monotonic()
        status, log = finish(submit("revoked"))
        timings["revoked"] = round(time.monotonic() - t0)
        assert status == ["finished:failed"], (status, consortium.tail())
        assert "(revoked)" in log, log[-3000:]
        assert {(r["rule"], r["app_digest"]) for r in refused("revoked")} == {
            ("apps.require-approved", digest)
        }
    print(f"site policy network test: {time.monotonic() - started:.0f} s, runs {timings}")


def test_node_config_and_supernode_check_the_policy_in_one_line(tmp_path) -> None:
    """write_node_config.sh policy=... needs an absolute path to a policy that parses, and
    start_supernode.sh checks it again before it starts (the file may have changed since): a
    bad one is one line naming the key, exit 2, and nothing is written or started."""
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    script = str(DEPLOY / "write_node_config.sh")
    out = tmp_path / "nodes" / "site-1.toml"
    good = tmp_path / "policy.toml"
    good.write_text(POLICY)
    bad = tmp_path / "bad.toml"
    bad.write_text("[privacy]\nmin-noise-multiplier = 0.5\n")  # needs require-dp
    base = ["role=site", "name=site-1", "data=synthetic:target"]
    for policy, text in (("policy.toml", "absolute"), (str(tmp_path / "none.toml"), "exist"),
                         (str(bad), "privacy.min-noise-multiplier")):  # fmt: skip
        done = subprocess.run([script, str(out), *base, f"policy={policy}"], env=env,
                              capture_output=True, text=True)  # fmt: skip
        assert done.returncode == 2 and text in done.stderr, done.stderr
        assert done.stderr.count("\n") == 1 and not out.parent.exists(), done.stderr
    sh(script, str(out), *base, f"policy={good}", env=env)
    assert f'policy="{good}"' in out.read_text()

    good.write_text("[limits]\nmax-rounds = 0\n")  # broken after the config was written
    sh(str(DEPLOY / "make_node_keys.sh"), str(tmp_path / "keys"), "site-1", env=env)
    (tmp_path / "ca.crt").write_text("not read before the policy check\n")
    done = subprocess.run(
        [str(DEPLOY / "start_supernode.sh"), str(out), "127.0.0.1:1", str(tmp_path / "ca.crt"),
         str(tmp_path / "keys" / "site-1"), "9094"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2 and "limits.max-rounds" in done.stderr, done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
