"""A consortium on loopback for the network tests: a SuperLink and one SuperNode per hospital
started with the deploy/ scripts, the processes and sockets they run, and a tiny run config."""

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
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
BIN = Path(sys.executable).parent
HOST = "127.0.0.1"  # the SuperLink host itself: Control and ServerAppIo APIs
PUBLIC = "127.0.0.2"  # the SuperLink's "public" address: the Fleet API only


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
        # Few state-dict entries: Flower sends each array as its own object (one HTTP request),
        # 116 for this ResNet-20 against 338 for shufflenet_v2_x0_5.
        "arch": '"cifar_resnet20"',
        "image-size": 16,
        "synthetic-n-train": 16,
        "synthetic-n-val": 8,
        "synthetic-n-test": 8,
        "rounds": 1,
        "min-sites": 1,
        "probe-epochs": 1,
        "batch-size": 8,
        "timeout": 600.0,
        **extra,
    }
    return " ".join(f"{k}={v}" for k, v in settings.items())


INSTITUTIONS = {
    "hospital-a": ["role=institution", "checkpoint=random:1"],
    "hospital-b": ["role=institution", "checkpoint=random:2"],
}
