"""A real SuperLink and its SuperNodes on loopback with TLS and SuperNode authentication.

Uses the deploy/ scripts exactly as a hospital consortium would (certificates, one ECDSA key
per hospital, registration, node config files, the start scripts with their state folder and
log files) and runs the whole federation (collect, merge, rounds) over the network with a tiny
model, also through a SuperLink crash and a ServerApp crash. Success is the run's final status
in `flwr ls --format json`, not the exit code of `flwr run`.

Two loopback addresses stand for the SuperLink host's two sides: 127.0.0.2 is its "public"
address, where only the Fleet API (for SuperNodes) listens, and 127.0.0.1 is the host itself,
where the Control and ServerAppIo APIs listen. Only 127.0.0.0/8 addresses are ever used.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from medmerge_core.federation.privacy import epsilon
from medmerge_core.io import read_jsonl
from tests.consortium import (
    BIN,
    DEPLOY,
    HOST,
    INSTITUTIONS,
    PUBLIC,
    Consortium,
    descendants,
    descendants_running,
    flwr_env,
    http_status,
    listening_sockets,
    run_all,
    sh,
    start_superlink,
    stop_group,
    tiny_run,
)

pytestmark = pytest.mark.network


def test_tls_authenticated_probe_and_rounds_complete_with_a_supernode_killed_mid_round(
    tmp_path,
) -> None:
    """Over the wire: TLS, authentication, the audit log, the federated merge probe (each site
    keeps the sources in its run state between messages) and DP clipped at the site, with the
    releases of both phases accounted. Then site-3's SuperNode is SIGKILLed once it has taken
    its round-1 training message: the SuperLink sees its heartbeats stop, answers for it with
    an error, and the ServerApp finishes round 1 with the other two sites, then round 2.
    (One consortium for both scenarios: each costs minutes of ClientApp processes.)"""
    nodes = {
        **INSTITUTIONS,
        **{f"site-{i + 1}": ["role=site", "data=synthetic:target", f"shard={i}/3"]
           for i in range(3)},
    }  # fmt: skip
    with Consortium(tmp_path, nodes) as consortium:
        overrides = {"wait-nodes": 5, "rounds": 2, "dp": '"client"', "dp-noise-multiplier": 0.5,
                     "probe-mode": '"federated"', "probe-rounds": 2}  # fmt: skip
        run_id = consortium.start_run(tiny_run(tmp_path, **overrides))
        # The probe's messages are "train.probe": the first "train" one is round 1's.
        consortium.wait_for_log("site-3", "Receiving: train message", time.monotonic() + 900)
        consortium.kill("site-3")
        status = consortium.final_status(run_id)
        assert status == ["finished:completed"], (status, consortium.tail())
    assert (tmp_path / "runs" / "federation" / "final.pt").exists()
    records = read_jsonl(tmp_path / "runs" / "federation" / "metrics.jsonl")
    probe = [(r["round"], r["sites"]) for r in records if r["phase"] == "probe-round"]
    assert probe == [(1, 3), (2, 3)]
    rounds = [r for r in records if r["phase"] == "round"]
    assert [(r["round"], r["sites"]) for r in rounds] == [(1, 2), (2, 2)]
    (rejected,) = rounds[0]["rejected"]
    assert "site-3" in rejected
    assert rounds[1]["rejected"] == []
    # 2 probe releases, then one per round
    assert [r["dp_epsilon"] for r in rounds] == [epsilon(0.5, 3, 1e-5), epsilon(0.5, 4, 1e-5)]
    logs = {p.stem: read_jsonl(p) for p in (tmp_path / "audit" / "federation").glob("*.jsonl")}
    assert set(logs) == set(nodes) and all(logs.values())  # each SuperNode logged on its disk
    assert all(line["message_type"] for lines in logs.values() for line in lines)
    for site in ("site-1", "site-2", "site-3"):  # the sources came once; round 2 used the cache
        probes = [line for line in logs[site] if line["message_type"] == "train.probe"]
        assert ["source-0" in line["received"]["arrays"] for line in probes] == [True, False]


def test_a_superlink_and_a_serverapp_killed_mid_run_lose_no_round(tmp_path) -> None:
    """The SuperLink (its script, medmerge-superlink and the Fleet gateway) is SIGKILLed while
    site-1 trains round 1 and restarted on the same state folder: the SuperNodes reconnect by
    themselves as the same nodes (no registration again, the same node ids, never restarted),
    and the same run carries on, with site-1's round-1 reply that crossed the restart. Then the
    run's ServerApp is SIGKILLed in round 2: the operator stops the run and submits the same
    run config again, which resumes after round 1. (When the restart outlasts the ServerApp's
    60 s lease, Flower fails the run at once and the resubmission resumes it instead.) Every
    round is in metrics.jsonl once."""
    started = time.monotonic()
    nodes = {**INSTITUTIONS, "site-1": ["role=site", "data=synthetic:target"]}
    metrics = tmp_path / "runs" / "federation" / "metrics.jsonl"

    def phases() -> list[tuple[str, int | None]]:
        records = read_jsonl(metrics) if metrics.exists() else []
        return [(r["phase"], r.get("round")) for r in records]

    def health(*args: str) -> subprocess.CompletedProcess:
        check = [str(DEPLOY / "health_check.sh"), "superlink", str(tmp_path / "certs"), *args]
        return subprocess.run(check, capture_output=True, text=True, timeout=60)

    with Consortium(tmp_path, nodes) as consortium:
        config = tiny_run(tmp_path, rounds=2, **{"wait-nodes": 3, "probe-mode": '"federated"',
                                                 "probe-rounds": 1})  # fmt: skip
        first = consortium.start_run(config)
        consortium.wait_for_log("site-1", "Receiving: train message", time.monotonic() + 600)
        registered = consortium.node_ids()
        assert sorted(registered.values()) == ["online"] * 3, registered
        supernodes = {n: consortium.procs[n].pid for n in nodes}

        fleet, control = consortium.ports
        state = str(tmp_path / "state")
        consortium.kill("superlink")
        down = health(state, str(control), f"{PUBLIC}:{fleet}")
        assert down.returncode == 1 and "FAIL SuperLink answers" in down.stdout, down.stdout
        assert "ok   SuperExec runs" in down.stdout, down.stdout  # it waits for the SuperLink
        time.sleep(3)  # a crash, then a supervisor's restart
        consortium.restart_superlink()
        up = health(state, str(control), f"{PUBLIC}:{fleet}")
        assert up.returncode == 0 and "FAIL" not in up.stdout, up.stdout
        # The keys are in the database: registering them again changes nothing.
        again = sh(str(DEPLOY / "register_nodes.sh"), "hospitals", str(tmp_path / "keys"), *nodes,
                   env=consortium.env)  # fmt: skip
        assert again.count("already registered") == 3, again
        assert set(consortium.node_ids()) == set(registered)
        # A running ServerApp holds a 60 s lease: when the restart took longer than its last
        # heartbeat left (a loaded machine), Flower has failed the run and the operator
        # resubmits it; otherwise the same run carries on.
        status = consortium.status(first)
        assert status in ("running", "finished:failed"), status
        if status == "running":
            # The same run finishes round 1 with site-1's reply, and starts round 2.
            consortium.wait_for_log("site-1", "Receiving: train message",
                                    time.monotonic() + 600, 2)  # fmt: skip
            assert ("round", 1) in phases(), (phases(), consortium.tail())
            (serverapp,) = consortium.serverapps()
            os.kill(serverapp, signal.SIGKILL)
            consortium.flwr("stop", str(first), "hospitals")
            assert consortium.status(first) == "finished:stopped"
            # That ServerApp rode through the SuperLink's restart: it retried, then went on.
            first_log = consortium.flwr("log", str(first), "hospitals", "--show")
            assert "Connection successful after" in first_log, first_log[-3000:]

        second = consortium.start_run(config)  # the same run config: it resumes
        assert consortium.final_status(second) == ["finished:completed"], consortium.tail()
        after = consortium.node_ids()
        assert set(after) == set(registered) and sorted(after.values()) == ["online"] * 3, after
        assert {n: consortium.procs[n].pid for n in nodes} == supernodes
        assert all(consortium.procs[n].poll() is None for n in nodes)
        logs = {n: (tmp_path / "logs" / f"{n}.log").read_text() for n in nodes}
    assert phases() == [("probe-round", 1), ("merge", None), ("round", 1), ("round", 2),
                        ("final", None)]  # fmt: skip
    (round_1,) = [r for r in read_jsonl(metrics) if r["phase"] == "round" and r["round"] == 1]
    assert round_1["sites"] == 1 and round_1["rejected"] == [], round_1
    # Reconnected without re-registration: never refused. (Whether a SuperNode logs a retry
    # depends on whether it called the Fleet API during the few seconds of the outage.) Message
    # ids are hex and can hold "401" (one CI run's did: "ID: 40145e2f..."), so they go first.
    for name, text in logs.items():
        status_text = re.sub(r"\(ID: [0-9a-f]+\)", "(ID)", text)
        assert " 401" not in status_text and "Unauthorized" not in status_text, (
            name,
            text[-3000:],
        )
    assert (tmp_path / "runs" / "federation" / "final.pt").exists()
    print(f"restart test: {time.monotonic() - started:.0f} s")


def test_an_outsider_with_the_ca_certificate_reaches_only_the_fleet_api(tmp_path) -> None:
    """The security review's attack, replayed: a machine holding only the public CA
    certificate tries to list runs, read a run's logs and register its own SuperNode key,
    against the SuperLink's public address (127.0.0.2) on the Fleet port (only Fleet calls
    are forwarded: 404) and on the control port number (nothing listens: refused). The
    operator on the SuperLink host (127.0.0.1) does the same with success."""
    started = time.monotonic()
    env = flwr_env(tmp_path, "operator")
    proc, fleet, control = start_superlink(tmp_path, env, tmp_path / "superlink.log")
    pids: set[int] = set()
    try:
        pids = descendants(proc.pid)  # the script, medmerge-superlink, gateway, superexec
        assert descendants_running(proc.pid, b"medmerge-superlink"), pids  # the lock wait
        ca = tmp_path / "outsider" / "ca.crt"  # all the outsider holds
        ca.parent.mkdir()
        ca.write_bytes((tmp_path / "certs" / "ca.crt").read_bytes())
        sh(str(DEPLOY / "make_node_keys.sh"), str(tmp_path / "keys"), "intruder", env=env)
        outsider = flwr_env(tmp_path, "outsider")
        for name, port in (("public-fleet", fleet), ("public-control", control)):
            sh(str(DEPLOY / "write_connection.sh"), name, f"{PUBLIC}:{port}", str(ca), env=outsider)
        sh(
            str(DEPLOY / "write_connection.sh"),
            "operator",
            f"{HOST}:{control}",
            str(tmp_path / "certs" / "ca.crt"),
            env=env,
        )

        # Where things listen: the Control/ServerAppIo port on 127.0.0.1 only, the Fleet
        # gateway on 127.0.0.2 only, and nothing else in the SuperLink's process tree.
        assert listening_sockets(pids) == {(HOST, control), (PUBLIC, fleet)}
        everywhere = listening_sockets()
        assert {a for a, p in everywhere if p == control} == {HOST}, everywhere
        assert {a for a, p in everywhere if p == fleet} == {PUBLIC}, everywhere
        with pytest.raises(ConnectionRefusedError), socket.create_connection((PUBLIC, control), 5):
            pass

        key = str(tmp_path / "keys" / "intruder.pub")
        attempts = {
            (conn, what): args
            for conn in ("public-fleet", "public-control")
            for what, args in {
                "ls": ["ls", conn, "--format", "json"],
                "log": ["log", "1", conn, "--show"],
                "register": ["supernode", "register", key, conn, "--name", "intruder"],
            }.items()
        }
        outside = run_all({k: v for k, v in attempts.items()}, outsider)
        inside = run_all(
            {
                "ls": ["ls", "operator", "--format", "json"],
                "log": ["log", "1", "operator", "--show"],
            },
            env,
        )
        for (conn, what), (code, out) in outside.items():
            # failed: a non-zero exit, or (with --format json) exit 0 and "success": false
            assert code != 0 or json.loads(out)["success"] is False, (conn, what, out)
            assert "registered successfully" not in out and "Run ID not found" not in out
            if conn == "public-fleet":  # refused by the gateway, not by TLS or a timeout
                assert "404" in out, (conn, what, out)

        # The operator, on the host: the Control API answers (so `flwr log 1` fails above
        # for the address, not because run 1 does not exist) and no SuperNode got registered.
        code, out = inside["ls"]
        assert code == 0 and json.loads(out)["runs"] == [], out
        assert "Run ID not found" in inside["log"][1], inside["log"]
        nodes = json.loads(
            sh(str(BIN / "flwr"), "supernode", "list", "operator", "--format", "json", env=env)
        )
        assert nodes["nodes"] == [], nodes

        # The gateway forwards literal Fleet calls only: no Control or Runtime API, no docs,
        # no dot segments, percent-encoding or query strings (a Fleet call reaches the
        # SuperLink, whose SuperNode authentication refuses it: 401).
        for method, path in [
            ("POST", "/v1/control/list-runs"),
            ("POST", "/v1/control/register-node"),
            ("POST", "/v1/runtime/get-nodes"),
            ("GET", "/docs"),
            ("GET", "/openapi.json"),
            ("POST", "/v1/fleet/../control/list-runs"),
            ("POST", "/v1/fleet/%2e%2e/control/list-runs"),
            ("POST", "/v1/fleet/%2E%2E%2Fcontrol%2Flist-runs"),
            ("POST", "//v1/control/list-runs"),
            ("POST", "/v1/fleet/get-run?x=/v1/control/list-runs"),
        ]:
            assert http_status(PUBLIC, fleet, ca, method, path) == (404, b"Not Found"), path
        assert http_status(PUBLIC, fleet, ca, "POST", "/v1/fleet/send-node-heartbeat")[0] == 401
    finally:
        stop_group(proc, tuple(pids - {proc.pid}))
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids - {proc.pid})
    assert time.monotonic() - started < 60  # the brief: keep this test fast
