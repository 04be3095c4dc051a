"""`flwr run` on a local simulation SuperLink, shared by bench_federation and gpu_check."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# The ServerApp's log line that ends each phase (server/server_app.py), in order.
PHASE_ENDS = {
    "start-up": "nodes: ",
    "collect": "collect: ",
    "merge": "merge: ",
    "fine-tune": "final model: ",
}
PHASES = (*PHASE_ENDS, "shut-down")


def _phases(lines: list[tuple[float, str]], end: float) -> dict[str, float]:
    """Seconds per phase from (seconds since `flwr run`, line) pairs of the run's log."""
    ends, last = {}, 0.0
    for phase, marker in PHASE_ENDS.items():
        at = next((t for t, line in lines if marker in line), None)
        if at is None:
            raise RuntimeError(f"the run's log has no '{marker.strip()}' line")
        ends[phase], last = at - last, at
    return {**ends, "shut-down": end - last}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _toml(value: object) -> str:
    return f'"{value}"' if isinstance(value, str) else str(value)


def simulated(run_config: dict, home: Path, cpus: int) -> tuple[float, dict, dict[str, float]]:
    """The run through Flower's simulation engine; seconds from `flwr run` to the run's end,
    the last round's record and seconds per phase (read off the streamed log)."""
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",  # log lines are timed as they arrive
        "FLWR_HOME": str(home),
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
    }  # the SuperLink runs flower-superexec
    port = _free_port()
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "bench"\n\n[superlink.bench]\naddress = "127.0.0.1:{port}"\n'
        "insecure = true\n"
    )
    link = subprocess.Popen(
        [
            str(BIN / "flower-superlink"),
            "--insecure",
            "--simulation",
            "--port",
            str(port),
            "--fleet-api-address",
            f"127.0.0.1:{_free_port()}",
            "--control-api-address",
            f"127.0.0.1:{_free_port()}",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    flwr = [str(BIN / "flwr")]
    try:
        for _ in range(120):  # the SuperLink is a long-lived service: not timed
            if subprocess.run([*flwr, "ls", "bench"], env=env, capture_output=True).returncode == 0:
                break
            time.sleep(0.5)
        overrides = " ".join(f"{k}={_toml(v)}" for k, v in run_config.items())
        began = time.perf_counter()
        out = subprocess.run(
            [
                *flwr,
                "run",
                str(ROOT),
                "bench",
                "--format",
                "json",
                "-c",
                overrides,
                "--federation-config",
                f"num-supernodes=6 client-resources-num-cpus={cpus}",
            ],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        if "run-id" not in json.loads(out):
            raise RuntimeError(f"flwr run did not start the simulation: {out}")
        run_id = str(json.loads(out)["run-id"])
        stream = subprocess.Popen(
            [*flwr, "log", run_id, "bench", "--stream"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        lines = [(time.perf_counter() - began, line) for line in stream.stdout or ()]
        stream.wait()
        seconds = time.perf_counter() - began
        listing = subprocess.run(
            [*flwr, "ls", "bench", "--run-id", run_id, "--format", "json"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        status = json.loads(listing)["runs"][0]["status"]
        if status != "finished:completed":
            raise RuntimeError(f"simulation run {run_id} ended {status}")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(link.pid, signal.SIGTERM)
        link.wait(timeout=30)
    run_dir = Path(run_config["output-dir"]) / str(run_config["run-name"])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in records if r.get("phase") == "round"]
    return seconds, rounds[-1], _phases(lines, seconds)
