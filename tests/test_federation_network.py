"""A real SuperLink and 4 SuperNodes on 127.0.0.1 with TLS and SuperNode authentication.

Uses the deploy/ scripts exactly as a hospital consortium would (certificates, ECDSA keys,
registration, node config files, start scripts) and runs the whole federation (collect, merge,
one round) over the network with a tiny model. Success is the run's final status in
`flwr ls --format json`, not the exit code of `flwr run`.
"""

from __future__ import annotations

import contextlib
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

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.network


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sh(*args: str, env: dict, timeout: float = 120) -> str:
    done = subprocess.run(
        args, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode != 0:
        raise AssertionError(f"{args}: exit {done.returncode}\n{done.stdout}\n{done.stderr}")
    return done.stdout


def wait_healthy(port: int, ca: Path, deadline: float) -> None:
    context = ssl.create_default_context(cafile=str(ca))
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"https://127.0.0.1:{port}/health", context=context, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise AssertionError("SuperLink did not become healthy")


def test_tls_authenticated_federation_completes(tmp_path) -> None:
    env = {
        **os.environ,
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "FLWR_HOME": str(tmp_path / "flwr"),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "OMP_NUM_THREADS": "1",
    }
    deploy = ROOT / "deploy"
    certs, keys, configs = tmp_path / "certs", tmp_path / "keys", tmp_path / "nodes"
    names = ["hospital-a", "hospital-b", "coordinator", "site-1"]
    sh(str(deploy / "make_certs.sh"), str(certs), env=env)
    sh(str(deploy / "make_node_keys.sh"), str(keys), *names, env=env)
    roles = [
        ["role=institution", "name=hospital-a", "checkpoint=random:1"],
        ["role=institution", "name=hospital-b", "checkpoint=random:2"],
        ["role=coordinator", "name=coordinator", "data=synthetic:target", "shard=0/2"],
        ["role=site", "name=site-1", "data=synthetic:target", "shard=1/2"],
    ]
    for name, pairs in zip(names, roles, strict=True):
        sh(str(deploy / "write_node_config.sh"), str(configs / f"{name}.toml"), *pairs, env=env)

    port = free_port()
    link_args = ["--port", str(port), "--fleet-api-address", f"127.0.0.1:{free_port()}",
                 "--control-api-address", f"127.0.0.1:{free_port()}"]  # fmt: skip
    procs: list[subprocess.Popen] = []
    logs = tmp_path / "logs"
    logs.mkdir()

    def start(cmd: list[str], log_name: str) -> None:
        out = open(logs / log_name, "w")  # noqa: SIM115 - closed with the process
        procs.append(subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                      start_new_session=True, cwd=tmp_path))  # fmt: skip

    try:
        start([str(deploy / "start_superlink.sh"), str(certs), *link_args], "superlink.log")
        wait_healthy(port, certs / "ca.crt", time.monotonic() + 60)
        sh(str(deploy / "write_connection.sh"), "hospitals", f"127.0.0.1:{port}",
           str(certs / "ca.crt"), env=env)  # fmt: skip
        sh(str(deploy / "register_nodes.sh"), "hospitals", str(keys), *names, env=env)
        for name in names:
            start([str(deploy / "start_supernode.sh"), str(configs / f"{name}.toml"),
                   f"127.0.0.1:{port}", str(certs / "ca.crt"), str(keys / name),
                   str(free_port())], f"{name}.log")  # fmt: skip
        overrides = (
            f'output-dir="{tmp_path / "runs"}" arch="shufflenet_v2_x0_5" image-size=16 '
            "synthetic-n-train=16 synthetic-n-val=8 synthetic-n-test=8 rounds=1 min-sites=1 "
            "merge-epochs=1 wait-nodes=4 batch-size=8 timeout=600.0"
        )
        out = sh(str(BIN / "flwr"), "run", str(ROOT), "hospitals", "--format", "json",
                 "-c", overrides, env=env)  # fmt: skip
        run_id = json.loads(out)["run-id"]
        # Returns when the run ends; on a slow machine the status check below reports the rest.
        with contextlib.suppress(subprocess.TimeoutExpired):
            subprocess.run([str(BIN / "flwr"), "log", str(run_id), "hospitals", "--stream"],
                           env=env, capture_output=True, timeout=900, check=False)  # fmt: skip
        listing = json.loads(sh(str(BIN / "flwr"), "ls", "hospitals", "--run-id", str(run_id),
                                "--format", "json", env=env))  # fmt: skip
        status = [r["status"] for r in listing["runs"]]
        assert status == ["finished:completed"], (status, _tail(logs))
        assert (tmp_path / "runs" / "federation" / "final.pt").exists()
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def _tail(logs: Path) -> str:
    return "\n".join(f"== {p.name}\n{p.read_text()[-3000:]}" for p in sorted(logs.iterdir()))
