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

import contextlib
import http.client
import ipaddress
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path

import pytest

from medmerge_core.federation.privacy import epsilon
from medmerge_core.io import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
BIN = Path(sys.executable).parent
HOST = "127.0.0.1"  # the SuperLink host itself: Control and ServerAppIo APIs
PUBLIC = "127.0.0.2"  # the SuperLink's "public" address: the Fleet API only
pytestmark = pytest.mark.network


def free_port(*taken: int) -> int:
    """A port that is free on both loopback addresses and not in `taken`."""
    while True:
        with socket.socket() as s:
            s.bind((HOST, 0))
            port = s.getsockname()[1]
        with socket.socket() as s:
            try:
                s.bind((PUBLIC, port))
            except OSError:
                continue
        if port not in taken:
            return port


def flwr_env(tmp_path: Path, home: str) -> dict:
    return {
        **os.environ,
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "FLWR_HOME": str(tmp_path / home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "OMP_NUM_THREADS": "1",
    }


def sh(*args: str, env: dict, timeout: float = 120) -> str:
    done = subprocess.run(
        args, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode != 0:
        raise AssertionError(f"{args}: exit {done.returncode}\n{done.stdout}\n{done.stderr}")
    return done.stdout


def wait_healthy(host: str, port: int, ca: Path, deadline: float) -> None:
    context = ssl.create_default_context(cafile=str(ca))
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"https://{host}:{port}/health", context=context, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"SuperLink did not become healthy on {host}:{port}")


def start_superlink(
    tmp_path: Path, env: dict, log: Path, ports: tuple[int, int] | None = None
) -> tuple[subprocess.Popen, int, int]:
    """deploy/start_superlink.sh with TLS (SAN 127.0.0.2 added) and its state in
    tmp_path/state, on a free Fleet port on 127.0.0.2 and a free control port on 127.0.0.1
    (or on `ports`, to restart it); it logs to `log` (LOG_FILE). Returns (process, fleet,
    control port)."""
    certs = tmp_path / "certs"
    sh(str(DEPLOY / "make_certs.sh"), str(certs), f"IP:{PUBLIC}", env=env)  # idempotent
    fleet, control = ports or (free_port(), 0)
    control = control or free_port(fleet)
    with open(log.with_suffix(".stdout"), "a") as out:  # only what comes before LOG_FILE
        proc = subprocess.Popen(
            [
                str(DEPLOY / "start_superlink.sh"),
                str(certs),
                f"{PUBLIC}:{fleet}",
                str(tmp_path / "state"),
                str(control),
            ],
            env={**env, "LOG_FILE": str(log)},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=tmp_path,
        )
    try:
        deadline = time.monotonic() + 60
        wait_healthy(HOST, control, certs / "ca.crt", deadline)
        wait_healthy(PUBLIC, fleet, certs / "ca.crt", deadline)  # through the Fleet gateway
    except BaseException:
        stop_group(proc)
        raise
    return proc, fleet, control


def stop_group(proc: subprocess.Popen, others: tuple[int, ...] = ()) -> None:
    """SIGTERM the process group (then SIGKILL), and SIGKILL any of `others` (processes it
    started in their own session, such as flower-superexec) that outlived it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=15)
    deadline = time.monotonic() + 10
    for pid in others:
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def descendants(root: int) -> set[int]:
    """`root` and every process below it, including those that left its session."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        found.add(pid)
        todo += children.get(pid, [])
    return found


def descendants_running(root: int, program: bytes) -> list[int]:
    """PIDs at or below `root` whose command line names `program`."""
    found = []
    for pid in sorted(descendants(root)):
        with contextlib.suppress(OSError):  # a process that has just exited
            if program in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
    return found


def listening_sockets(pids: set[int] | None = None) -> set[tuple[str, int]]:
    """(address, port) of each listening TCP socket in /proc/net/tcp{,6}: those that `pids`
    hold, or all of them."""
    inodes = set()
    for pid in pids or ():
        for fd in Path(f"/proc/{pid}/fd").glob("*"):
            with contextlib.suppress(OSError):
                if (target := os.readlink(fd)).startswith("socket:["):
                    inodes.add(target[8:-1])
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            (ip, port), state, inode = fields[1].split(":"), fields[3], fields[9]
            if state != "0A" or (pids is not None and inode not in inodes):
                continue
            raw = bytes.fromhex(ip)  # host byte order (little-endian), 32 bits at a time
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            addr = ipaddress.ip_address(raw)
            if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
                addr = addr.ipv4_mapped
            found.add((str(addr), int(port, 16)))
    return found


def run_all(commands: dict[str, list[str]], env: dict, timeout: float = 60) -> dict:
    """Run `flwr` commands concurrently; name -> (exit code, stdout + stderr)."""
    procs = {
        name: subprocess.Popen(
            [str(BIN / "flwr"), *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        for name, args in commands.items()
    }
    results, deadline = {}, time.monotonic() + timeout
    for name, proc in procs.items():
        try:
            out, _ = proc.communicate(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            msg = f"flwr {commands[name]} did not finish in {timeout} s\n{out}"
            raise AssertionError(msg) from None
        results[name] = (proc.returncode, out)
    return results


def http_status(host: str, port: int, ca: Path, method: str, path: str) -> tuple[int, bytes]:
    """One raw HTTPS request; http.client sends the path byte for byte (no normalising)."""
    context = ssl.create_default_context(cafile=str(ca))
    conn = http.client.HTTPSConnection(host, port, context=context, timeout=10)
    try:
        conn.request(method, path, body=b"", headers={"content-type": "application/protobuf"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


class Consortium:
    """A SuperLink and one SuperNode per hospital, set up with the deploy/ scripts exactly as a
    hospital consortium would (certificates, ECDSA keys, registration, node configs)."""

    def __init__(self, tmp_path: Path, nodes: dict[str, list[str]]) -> None:
        self.tmp = tmp_path
        self.env = flwr_env(tmp_path, "flwr")
        self.nodes = nodes
        self.logs = tmp_path / "logs"
        self.logs.mkdir()
        self.procs: dict[str, subprocess.Popen] = {}
        self.operator_key = ""  # set on entry: every run admits nodes by signed identity

    def _start(self, name: str, cmd: list[str]) -> None:
        """Start a deploy script that logs to logs/NAME.log itself (LOG_FILE)."""
        with open(self.logs / f"{name}.stdout", "a") as out:  # what comes before LOG_FILE
            self.procs[name] = subprocess.Popen(
                cmd,
                env={**self.env, "LOG_FILE": str(self.logs / f"{name}.log")},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=self.tmp,
            )

    def __enter__(self) -> Consortium:
        env, tmp = self.env, self.tmp
        certs, keys, configs = tmp / "certs", tmp / "keys", tmp / "nodes"
        names = list(self.nodes)
        for name in names:  # each hospital makes its own key and sends only the public one
            sent = sh(str(DEPLOY / "make_node_keys.sh"), str(keys), name, env=env).strip()
            assert sent == str(keys / f"{name}.pub"), sent
        # The operator signs each hospital's identity for its SuperNode key; the run config
        # carries the operator's public key, so roles and names come from these tokens.
        operator = tmp / "operator"
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "operator", "-f", str(operator),
           env=env)  # fmt: skip
        self.operator_key = operator.with_suffix(".pub").read_text().strip()
        for name, pairs in self.nodes.items():
            role = next(p for p in pairs if p.startswith("role=")).removeprefix("role=")
            token = tmp / "tokens" / f"{name}.token"
            sh(str(BIN / "medmerge"), "identity", "sign", "--operator-key", str(operator),
               "--node-key", str(keys / f"{name}.pub"), "--name", name, "--role", role,
               "--out", str(token), env=env)  # fmt: skip
            sh(
                str(DEPLOY / "write_node_config.sh"),
                str(configs / f"{name}.toml"),
                f"name={name}",
                f"audit-dir={tmp / 'audit'}",  # the node's own disk, not the tester's home
                f"identity={token}",
                f"identity-key={keys / name}",
                *pairs,
                env=env,
            )
        # The Fleet API on the "public" 127.0.0.2; Control and ServerAppIo on 127.0.0.1.
        self.procs["superlink"], fleet, control = start_superlink(
            tmp, env, self.logs / "superlink.log"
        )
        self.ports = (fleet, control)
        try:
            # The SuperExec, its own service, starts the ServerApps.
            self._start(
                "superexec",
                [str(DEPLOY / "start_superexec.sh"), str(certs), str(tmp / "state"), str(control)],
            )
            sh(
                str(DEPLOY / "write_connection.sh"),
                "hospitals",
                f"{HOST}:{control}",  # the operator, on the SuperLink host
                str(certs / "ca.crt"),
                env=env,
            )
            sh(str(DEPLOY / "register_nodes.sh"), "hospitals", str(keys), *names, env=env)
            for name in names:
                self._start(
                    name,
                    [
                        str(DEPLOY / "start_supernode.sh"),
                        str(configs / f"{name}.toml"),
                        f"{PUBLIC}:{fleet}",  # SuperNodes reach only the Fleet API
                        str(certs / "ca.crt"),
                        str(keys / name),
                        str(free_port(fleet, control)),
                    ],
                )
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)

    def kill(self, name: str) -> None:
        """SIGKILL a process group (a SuperNode and its ClientApps; the SuperLink script, the
        SuperLink and its Fleet gateway): no goodbye to anyone."""
        os.killpg(self.procs[name].pid, signal.SIGKILL)
        self.procs[name].wait(timeout=15)

    def restart_superlink(self) -> None:
        """start_superlink.sh again, on the same state folder and ports."""
        self.procs["superlink"], *_ = start_superlink(
            self.tmp, self.env, self.logs / "superlink.log", self.ports
        )

    def serverapps(self) -> list[int]:
        """PIDs of the flwr-serverapp processes the SuperExec started."""
        return descendants_running(self.procs["superexec"].pid, b"flwr-serverapp")

    def node_ids(self) -> dict[str, str]:
        listing = json.loads(self.flwr("supernode", "list", "hospitals", "--format", "json"))
        return {n["node-id"]: n["status"] for n in listing["nodes"]}

    def status(self, run_id: int) -> str:
        listing = json.loads(
            self.flwr("ls", "hospitals", "--run-id", str(run_id), "--format", "json")
        )
        return listing["runs"][0]["status"]

    def flwr(self, *args: str, timeout: float = 120) -> str:
        return sh(str(BIN / "flwr"), *args, env=self.env, timeout=timeout)

    def start_run(self, overrides: str) -> int:
        overrides += f' operator-key="{self.operator_key}"'
        out = self.flwr("run", str(ROOT), "hospitals", "--format", "json", "-c", overrides)
        return int(json.loads(out)["run-id"])

    def wait_for_log(self, name: str, text: str, deadline: float, count: int = 1) -> None:
        log = self.logs / f"{name}.log"
        while (log.read_text() if log.exists() else "").count(text) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"'{text}' never appeared in {name}'s log\n{self.tail()}")
            time.sleep(0.2)

    def final_status(self, run_id: int) -> list[str]:
        """Waits for the run to end; its status from `flwr ls`, not an exit code."""
        # Returns when the run ends; on a slow machine the status check reports the rest.
        with contextlib.suppress(subprocess.TimeoutExpired):
            subprocess.run(
                [str(BIN / "flwr"), "log", str(run_id), "hospitals", "--stream"],
                env=self.env,
                capture_output=True,
                timeout=900,
                check=False,
            )
        listing = json.loads(
            self.flwr("ls", "hospitals", "--run-id", str(run_id), "--format", "json")
        )
        return [r["status"] for r in listing["runs"]]

    def tail(self) -> str:
        return "\n".join(
            f"== {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.logs.iterdir())
        )


def tiny_run(tmp_path: Path, **extra: object) -> str:
    settings = {
        "output-dir": f'"{tmp_path / "runs"}"',
        "arch": '"shufflenet_v2_x0_5"',
        "image-size": 16,
        "synthetic-n-train": 16,
        "synthetic-n-val": 8,
        "synthetic-n-test": 8,
        "rounds": 1,
        "min-sites": 1,
        "merge-epochs": 1,
        "batch-size": 8,
        "timeout": 600.0,
        **extra,
    }
    return " ".join(f"{k}={v}" for k, v in settings.items())


INSTITUTIONS = {
    "hospital-a": ["role=institution", "checkpoint=random:1"],
    "hospital-b": ["role=institution", "checkpoint=random:2"],
}


def test_tls_authenticated_federated_probe_and_fine_tuning_complete(tmp_path) -> None:
    """Over the wire: TLS, authentication, the audit log, the federated merge probe (the site
    keeps the sources in its run state between messages) and DP clipped at the site, with
    the releases of both phases accounted."""
    nodes = {
        **INSTITUTIONS,
        "site-1": ["role=site", "data=synthetic:target", "shard=0/2"],
        "site-2": ["role=site", "data=synthetic:target", "shard=1/2"],
    }
    with Consortium(tmp_path, nodes) as consortium:
        overrides = {"wait-nodes": 4, "dp": '"client"', "dp-noise-multiplier": 0.5,
                     "merge-mode": '"federated"', "merge-rounds": 2}  # fmt: skip
        run_id = consortium.start_run(tiny_run(tmp_path, **overrides))
        status = consortium.final_status(run_id)
        assert status == ["finished:completed"], (status, consortium.tail())
    assert (tmp_path / "runs" / "federation" / "final.pt").exists()
    records = read_jsonl(tmp_path / "runs" / "federation" / "metrics.jsonl")
    probe = [(r["round"], r["sites"]) for r in records if r["phase"] == "probe-round"]
    assert probe == [(1, 2), (2, 2)]
    (round_1,) = [r for r in records if r["phase"] == "round"]
    assert round_1["dp_epsilon"] == epsilon(0.5, 3, 1e-5)  # 2 probe releases, then 1
    logs = {p.stem: read_jsonl(p) for p in (tmp_path / "audit" / "federation").glob("*.jsonl")}
    assert set(logs) == set(nodes) and all(logs.values())  # each SuperNode logged on its disk
    assert all(line["message_type"] for lines in logs.values() for line in lines)
    for site in ("site-1", "site-2"):  # the sources came once; round 2 used the cached copy
        probes = [line for line in logs[site] if line["message_type"] == "train.probe"]
        assert ["source-0" in line["received"]["arrays"] for line in probes] == [True, False]


def test_a_supernode_killed_mid_round_leaves_the_round_to_the_others(tmp_path) -> None:
    """site-2's SuperNode is SIGKILLed once it has taken its round-1 training message: the
    SuperLink sees its heartbeats stop, answers for it with an error, and the ServerApp
    finishes round 1 with site-1 alone, then round 2."""
    nodes = {
        **INSTITUTIONS,
        "coordinator": ["role=coordinator", "data=synthetic:target", "shard=0/3"],
        "site-1": ["role=site", "data=synthetic:target", "shard=1/3"],
        "site-2": ["role=site", "data=synthetic:target", "shard=2/3"],
    }
    with Consortium(tmp_path, nodes) as consortium:
        run_id = consortium.start_run(tiny_run(tmp_path, rounds=2, **{"wait-nodes": 5}))
        consortium.wait_for_log("site-2", "Receiving: train message", time.monotonic() + 600)
        consortium.kill("site-2")
        status = consortium.final_status(run_id)
        assert status == ["finished:completed"], (status, consortium.tail())
    rounds = [
        r for r in read_jsonl(tmp_path / "runs/federation/metrics.jsonl") if r["phase"] == "round"
    ]
    assert [(r["round"], r["sites"]) for r in rounds] == [(1, 1), (2, 1)]
    (rejected,) = rounds[0]["rejected"]
    assert "site-2" in rejected
    assert rounds[1]["rejected"] == []
    assert (tmp_path / "runs" / "federation" / "final.pt").exists()


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
        config = tiny_run(tmp_path, rounds=2, **{"wait-nodes": 3, "merge-mode": '"federated"',
                                                 "merge-rounds": 1})  # fmt: skip
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
    # depends on whether it called the Fleet API during the few seconds of the outage.)
    for name, text in logs.items():
        assert " 401" not in text, (name, text[-3000:])
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


def test_write_connection_replaces_its_section(tmp_path) -> None:
    """Running write_connection.sh again with the same NAME replaces [superlink.NAME]
    (a duplicate table would make config.toml unreadable for `flwr`); the rest stays."""
    env = flwr_env(tmp_path, "flwr")
    ca = tmp_path / "ca.crt"
    ca.write_text("not read here\n")
    write = str(DEPLOY / "write_connection.sh")
    sh(write, "hospitals", f"{HOST}:9093", str(ca), env=env)
    sh(write, "backup", f"{HOST}:9193", str(ca), env=env)
    sh(write, "hospitals", f"{HOST}:19093", str(ca), env=env)
    sh(write, "hospitals", f"{HOST}:29093", str(ca), env=env)
    config = tmp_path / "flwr" / "config.toml"
    text = config.read_text()
    assert text.count("[superlink.hospitals]") == 1 and "\n\n\n" not in text, text
    assert tomllib.loads(text)["superlink"] == {
        "default": "hospitals",
        "backup": {"address": f"{HOST}:9193", "root-certificates": str(ca)},
        "hospitals": {"address": f"{HOST}:29093", "root-certificates": str(ca)},
    }
    listed = sh(str(BIN / "flwr"), "config", "list", env=env)  # flwr itself parses it
    assert "hospitals (default)" in listed and "backup" in listed, listed
    for bad in (["a b", f"{HOST}:1", str(ca)], ["x", f"{HOST}:1", str(tmp_path / "none")]):
        done = subprocess.run([write, *bad], env=env, capture_output=True, text=True)
        assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert config.read_text() == text  # a refused call leaves the file as it was


def test_start_superlink_refuses_bad_arguments_in_one_line(tmp_path) -> None:
    """Usage errors are one line, exit 2, and nothing starts: above all, no extra argument
    may move the SuperLink off 127.0.0.1 or turn TLS off."""
    env = flwr_env(tmp_path, "flwr")
    certs = tmp_path / "certs"
    certs.mkdir()
    for name in ("ca.crt", "server.pem", "server.key"):
        (certs / name).write_text("")
    script = str(DEPLOY / "start_superlink.sh")
    state = str(tmp_path / "state")
    for args in (
        [],
        [str(certs)],
        [str(certs), f"{PUBLIC}:9092"],  # no STATE_DIR: the state would be lost
        [str(tmp_path / "none"), f"{PUBLIC}:9092", state],
        [str(certs), "9092", state],
        [str(certs), f"{PUBLIC}:99999", state],
        [str(certs), f"{PUBLIC}:9092", "9093"],  # the old argument order
        [str(certs), f"{PUBLIC}:9092", state, "9092"],
        [str(certs), f"{PUBLIC}:9092", state, "--host", "0.0.0.0"],
        [str(certs), f"{PUBLIC}:9092", state, "9093", "--hos=0.0.0.0"],
        [str(certs), f"{PUBLIC}:9092", state, "--port", "9000"],
        [str(certs), f"{PUBLIC}:9092", state, "--insecure"],
        [str(certs), f"{PUBLIC}:9092", state, "--control-api-address", "0.0.0.0:9093"],
        [str(certs), f"{PUBLIC}:9092", state, "--allow-runtime-dependency-installation"],
        [str(certs), f"{PUBLIC}:9092", state, "--database", ":flwr-in-memory:"],
        [str(certs), f"{PUBLIC}:9092", state, "--isolation=subprocess"],
    ):
        done = subprocess.run([script, *args], env=env, capture_output=True, text=True, timeout=30)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert done.stderr.count("\n") == 1 and done.stdout == "", (args, done.stderr)
    assert not (tmp_path / "state").exists()  # refused before anything was made


def test_write_node_config_refuses_a_bad_pair_in_one_line_and_writes_nothing(tmp_path) -> None:
    """What a hospital can get wrong in its node config is caught when it is written: the
    role, the name, a quote, a relative path, data or a checkpoint that is not there."""
    data = tmp_path / "site1.npz"
    data.write_bytes(b"")
    script = str(DEPLOY / "write_node_config.sh")
    good = ["role=site", "name=site-1", f"data={data}"]
    out = tmp_path / "nodes" / "site-1.toml"
    for pairs in (
        ["role=hospital", "name=site-1", f"data={data}"],
        ["name=site-1", f"data={data}"],
        ["role=site", f"data={data}"],
        ["role=site", "name=../site-1", f"data={data}"],
        ["role=site", 'name=site"1', f"data={data}"],
        ["role=site", "name=site-1"],  # a site needs data
        ["role=site", "name=site-1", "data=site1.npz"],
        ["role=site", "name=site-1", f"data={tmp_path / 'none.npz'}"],
        ["role=site", "name=site-1", f"data={tmp_path}"],
        ["role=institution", "name=a"],
        ["role=institution", "name=a", f"checkpoint={tmp_path / 'none.pt'}"],
        ["role=institution", "name=a", "checkpoint=a.pt", "data=synthetic:related_a"],
        [*good, "state-dir=state"],
        [*good, "audit-dir=audit"],
        [*good, "identity=tokens/site-1.token", f"identity-key={tmp_path}/k"],
        [*good, f"identity={tmp_path}/t"],  # and no identity-key to prove it
        [*good, "shard=2/2"],
        [*good, "device=gpu"],
        [*good, "in-channels=three"],
        [*good, "role=site"],
        [*good, "colour=red"],
    ):
        done = subprocess.run([script, str(out), *pairs], capture_output=True, text=True)
        assert done.returncode == 2, (pairs, done.stdout, done.stderr)
        assert done.stderr.count("\n") == 1 and done.stdout == "", (pairs, done.stderr)
        assert not out.parent.exists(), pairs
    for pairs in (  # specs need no file; an institution with data pretrains into checkpoint
        ["role=site", "name=site-1", "data=synthetic:target", "shard=0/2"],
        ["role=institution", "name=a", "checkpoint=random:1"],
        ["role=institution", "name=a", "checkpoint=torchvision:DEFAULT"],
        ["role=institution", "name=a", f"checkpoint={tmp_path}/a.pt", "data=synthetic:related_a"],
        [*good, f"identity={tmp_path}/t", f"identity-key={tmp_path}/k", "device=cuda:1"],
    ):
        sh(script, str(out), *pairs, env=os.environ.copy())
        text = out.read_text()
        assert all(f'{p.split("=", 1)[0]}="{p.split("=", 1)[1]}"' in text for p in pairs), text
        sh(script, str(out), *pairs, env=os.environ.copy())
        assert out.read_text() == text  # idempotent


def test_each_hospital_makes_its_own_key_once(tmp_path) -> None:
    """make_node_keys.sh KEY_DIR NAME prints the public key to send; a second run keeps the
    key; a key that is not ECDSA P-384 is refused. make_certs.sh keeps its CA the same way."""
    env = os.environ.copy()
    keys = tmp_path / "keys"
    sent = sh(str(DEPLOY / "make_node_keys.sh"), str(keys), "site-1", env=env).strip()
    assert sent == str(keys / "site-1.pub") and (keys / "site-1").stat().st_mode & 0o077 == 0
    key = (keys / "site-1").read_bytes()
    assert sh(str(DEPLOY / "make_node_keys.sh"), str(keys), "site-1", env=env).strip() == sent
    assert (keys / "site-1").read_bytes() == key
    sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / "ed"), env=env)
    done = subprocess.run([str(DEPLOY / "make_node_keys.sh"), str(keys), "ed"],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 2 and "not an ECDSA P-384 key" in done.stderr, done.stderr
    certs = tmp_path / "certs"
    sh(str(DEPLOY / "make_certs.sh"), str(certs), f"IP:{PUBLIC}", env=env)
    made = {p.name: p.read_bytes() for p in certs.iterdir()}
    sh(str(DEPLOY / "make_certs.sh"), str(certs), f"IP:{PUBLIC}", env=env)
    assert {p.name: p.read_bytes() for p in certs.iterdir()} == made
    sh(str(DEPLOY / "make_certs.sh"), str(certs), f"IP:{PUBLIC}", "DNS:superlink", env=env)
    assert (certs / "ca.crt").read_bytes() == made["ca.crt"]  # the same CA, a new server cert
    assert (certs / "server.pem").read_bytes() != made["server.pem"]


def test_a_second_supernode_or_superexec_on_the_same_key_or_state_is_refused(tmp_path) -> None:
    """Two SuperNodes with one key would take each other's messages, and two SuperExecs would
    both start ServerApps: the start scripts hold a lock and refuse a second start in one line.
    Nothing listens on the SuperLink address here; both retry until they are stopped."""
    env = flwr_env(tmp_path, "flwr")
    sh(str(DEPLOY / "make_certs.sh"), str(tmp_path / "certs"), env=env)
    sh(str(DEPLOY / "make_node_keys.sh"), str(tmp_path / "keys"), "site-1", env=env)
    config = tmp_path / "site-1.toml"
    sh(str(DEPLOY / "write_node_config.sh"), str(config), "role=site", "name=site-1",
       "data=synthetic:target", env=env)  # fmt: skip
    closed = free_port()
    node = [str(DEPLOY / "start_supernode.sh"), str(config), f"{HOST}:{closed}",
            str(tmp_path / "certs" / "ca.crt"), str(tmp_path / "keys" / "site-1")]  # fmt: skip
    exe = [str(DEPLOY / "start_superexec.sh"), str(tmp_path / "certs"), str(tmp_path / "state"),
           str(closed)]  # fmt: skip
    first = {
        "supernode": [*node, str(free_port(closed))],
        "superexec": exe,
    }
    procs = {}
    try:
        for name, cmd in first.items():
            log = tmp_path / f"{name}.log"
            procs[name] = subprocess.Popen(cmd, env={**env, "LOG_FILE": str(log)},
                                           start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + 60
        for name in procs:  # each has written its first line (and holds its lock)
            log = tmp_path / f"{name}.log"
            while not (log.exists() and "Connection attempt failed" in log.read_text()):
                assert time.monotonic() < deadline and procs[name].poll() is None, name
                time.sleep(0.2)
        for cmd, text in (([*node, str(free_port(closed))], "another SuperNode is running"),
                          (exe, "another SuperExec is running")):  # fmt: skip
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=30)
            assert done.returncode == 2 and text in done.stderr, done.stderr
            assert done.stderr.count("\n") == 1
    finally:
        for proc in procs.values():
            stop_group(proc)
