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

from medmerge_core.federation.privacy import epsilon
from medmerge_core.io import read_jsonl

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


class Consortium:
    """A SuperLink and one SuperNode per hospital, set up with the deploy/ scripts exactly as a
    hospital consortium would (certificates, ECDSA keys, registration, node configs)."""

    def __init__(self, tmp_path: Path, nodes: dict[str, list[str]]) -> None:
        self.tmp = tmp_path
        self.env = {
            **os.environ,
            "PATH": f"{BIN}:{os.environ['PATH']}",
            "FLWR_HOME": str(tmp_path / "flwr"),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "OMP_NUM_THREADS": "1",
        }
        self.nodes = nodes
        self.logs = tmp_path / "logs"
        self.logs.mkdir()
        self.procs: dict[str, subprocess.Popen] = {}

    def _start(self, name: str, cmd: list[str]) -> None:
        out = open(self.logs / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        self.procs[name] = subprocess.Popen(
            cmd,
            env=self.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=self.tmp,
        )

    def __enter__(self) -> Consortium:
        deploy, env, tmp = ROOT / "deploy", self.env, self.tmp
        certs, keys, configs = tmp / "certs", tmp / "keys", tmp / "nodes"
        names = list(self.nodes)
        sh(str(deploy / "make_certs.sh"), str(certs), env=env)
        sh(str(deploy / "make_node_keys.sh"), str(keys), *names, env=env)
        for name, pairs in self.nodes.items():
            sh(
                str(deploy / "write_node_config.sh"),
                str(configs / f"{name}.toml"),
                f"name={name}",
                f"audit-dir={tmp / 'audit'}",  # the node's own disk, not the tester's home
                *pairs,
                env=env,
            )
        port = free_port()
        self._start(
            "superlink",
            [
                str(deploy / "start_superlink.sh"),
                str(certs),
                "--port",
                str(port),
                "--fleet-api-address",
                f"127.0.0.1:{free_port()}",
                "--control-api-address",
                f"127.0.0.1:{free_port()}",
            ],
        )
        try:
            wait_healthy(port, certs / "ca.crt", time.monotonic() + 60)
            sh(
                str(deploy / "write_connection.sh"),
                "hospitals",
                f"127.0.0.1:{port}",
                str(certs / "ca.crt"),
                env=env,
            )
            sh(str(deploy / "register_nodes.sh"), "hospitals", str(keys), *names, env=env)
            for name in names:
                self._start(
                    name,
                    [
                        str(deploy / "start_supernode.sh"),
                        str(configs / f"{name}.toml"),
                        f"127.0.0.1:{port}",
                        str(certs / "ca.crt"),
                        str(keys / name),
                        str(free_port()),
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
        """SIGKILL a SuperNode and its ClientApp processes: no goodbye to the SuperLink."""
        os.killpg(self.procs[name].pid, signal.SIGKILL)
        self.procs[name].wait(timeout=15)

    def flwr(self, *args: str, timeout: float = 120) -> str:
        return sh(str(BIN / "flwr"), *args, env=self.env, timeout=timeout)

    def start_run(self, overrides: str) -> int:
        out = self.flwr("run", str(ROOT), "hospitals", "--format", "json", "-c", overrides)
        return int(json.loads(out)["run-id"])

    def wait_for_log(self, name: str, text: str, deadline: float) -> None:
        while text not in (self.logs / f"{name}.log").read_text():
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
