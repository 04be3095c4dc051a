"""gpu_check's section 5, apart: it drives Flower's simulation engine in subprocesses."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
import tomllib
from pathlib import Path
from typing import Any

import torch

from benchmarks.gpu_check_plan import ROOT, SIM_CPUS, SIM_GPUS, Context, Section

# --- 5. the Flower simulation --------------------------------------------------------------


def federation_overrides(ctx: Context) -> dict[str, Any]:
    """`-c` of the run: bench_federation's small sizes (2 rounds, 200 images) over the
    pyproject's default simulation (3 sites)."""
    return {
        "output-dir": str(ctx.out / "federation" / "runs"),
        "run-name": "gpu-check",
        "rounds": 2,
        "synthetic-n-train": 200,
        "synthetic-n-val": 80,
        "synthetic-n-test": 120,
        "device": "auto",
    }


def federation(ctx: Context, section: Section) -> None:
    from benchmarks import bench_federation as bench
    from benchmarks import flower_simulation as sim
    from medmerge_core.federation.config import FederationConfig
    from medmerge_core.federation.roles import Node

    overrides = federation_overrides(ctx)
    with open(ROOT / "pyproject.toml", "rb") as handle:
        defaults = tomllib.load(handle)["tool"]["flwr"]["app"]["config"]
    run_config = {**defaults, **overrides}  # what the ServerApp and ClientApps will read
    cfg = FederationConfig.from_run_config(run_config)
    roles = [Node.from_configs(node, run_config).settings.role for node in bench.SIM_NODES]
    binaries = {name: (sim.BIN / name).is_file() for name in ("flwr", "flower-superlink")}
    gpus = SIM_GPUS if ctx.plan.device == "cuda" else 0.0  # Ray would wait for a GPU forever
    federation_config = (
        f"num-supernodes={len(bench.SIM_NODES)} client-resources-num-cpus={SIM_CPUS} "
        f"client-resources-num-gpus={gpus}"
    )
    section.figures.update(
        {
            "roles": roles,
            "sites": roles.count("site"),
            "rounds": cfg.rounds,
            "run_config": overrides,
            "federation_config": federation_config,
            "binaries": binaries,
        }
    )
    missing = [name for name, found in binaries.items() if not found]
    if missing:
        raise FileNotFoundError(f"{', '.join(missing)} not found in {sim.BIN}")
    if not ctx.plan.simulate:
        section.status = "skipped"
        section.reason = (
            "smoke run: the simulation takes minutes on the CPU (--simulate runs it); its "
            "imports, run config, roles and binaries were checked"
        )
        return
    home = ctx.out / "federation"
    shutil.rmtree(home, ignore_errors=True)  # a finished run folder would resume in no time
    figures = section.figures
    on_gpu = ctx.plan.device == "cuda"
    simulate(sim, overrides, home, federation_config, ctx.limit("federation"), figures, on_gpu)
    run_dir = Path(overrides["output-dir"]) / overrides["run-name"]
    from medmerge_core.io import read_jsonl

    rounds = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("phase") == "round"]
    figures["rounds_logged"] = len(rounds)
    figures["last_round"] = {
        k: v
        for k, v in (rounds[-1] if rounds else {}).items()
        if k.startswith("eval_") or k in ("round", "seconds", "mbytes")
    }
    section.check("run finished:completed", figures["status"] == "finished:completed", "==", 1)
    section.check("rounds logged", len(rounds), "==", cfg.rounds)
    if figures.get("gpu_memory_used_mib") is not None:
        section.check(
            "GPU memory the ClientApps used (MiB)", figures["gpu_memory_used_mib"], ">=", 1
        )


def simulate(
    bench: Any,
    overrides: dict[str, Any],
    home: Path,
    federation_config: str,
    limit: float,
    figures: dict[str, Any],
    on_gpu: bool,
) -> None:
    """`flwr run` against a local simulation SuperLink, as flower_simulation.simulated does,
    with a GPU share per ClientApp and a deadline; the run's log goes to home/run.log.
    Fills `figures` as it goes: the SuperLink's start-up, seconds from `flwr run` to the run's
    end, its status, and on CUDA the device memory in use while it ran (sampled from this
    process: the evidence that the ClientApps ran on the GPU)."""
    deadline = time.monotonic() + limit
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "FLWR_HOME": str(home),
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PATH": f"{bench.BIN}{os.pathsep}{os.environ['PATH']}",
    }  # the SuperLink runs flower-superexec
    home.mkdir(parents=True, exist_ok=True)
    port = bench._free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "check"\n\n[superlink.check]\naddress = "127.0.0.1:{port}"\n'
        "insecure = true\n"
    )
    flwr = [str(bench.BIN / "flwr")]
    figures.update({"log": str(home / "run.log"), "superlink_log": str(home / "superlink.log")})

    def flwr_call(*args: str) -> subprocess.CompletedProcess:
        timeout = max(1.0, min(60.0, deadline - time.monotonic()))
        return subprocess.run(
            [*flwr, *args], env=env, capture_output=True, text=True, timeout=timeout
        )

    with open(home / "superlink.log", "w", encoding="utf-8") as link_log:
        link = subprocess.Popen(
            [
                str(bench.BIN / "flower-superlink"),
                "--insecure",
                "--simulation",
                "--port",
                str(port),
                "--fleet-api-address",
                f"127.0.0.1:{bench._free_port()}",
                "--control-api-address",
                f"127.0.0.1:{bench._free_port()}",
            ],
            env=env,
            stdout=link_log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        began = time.perf_counter()
        while flwr_call("ls", "check").returncode:
            if link.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the SuperLink did not come up (see {home / 'superlink.log'})")
            time.sleep(0.5)
        figures["superlink_start_s"] = time.perf_counter() - began
        baseline = lowest = _device_free_mib() if on_gpu else None
        began = time.perf_counter()
        config = " ".join(f"{k}={bench._toml(v)}" for k, v in overrides.items())
        started = flwr_call("run", str(ROOT), "check", "--format", "json", "-c", config,
                            "--federation-config", federation_config)  # fmt: skip
        reply = json.loads(started.stdout or "{}")
        if "run-id" not in reply:
            raise RuntimeError(f"flwr run did not start the simulation: {reply or started.stderr}")
        run_id = str(reply["run-id"])
        with open(home / "run.log", "w", encoding="utf-8") as run_log:
            stream = subprocess.Popen(
                [*flwr, "log", run_id, "check", "--stream"],
                env=env,
                stdout=run_log,
                stderr=subprocess.STDOUT,
            )
        while stream.poll() is None:
            if time.monotonic() > deadline:
                stream.kill()
                stream.wait()
                with contextlib.suppress(subprocess.SubprocessError):
                    flwr_call("stop", run_id, "check")
                raise TimeoutError(f"the simulation did not finish within {limit:.0f} s")
            free = _device_free_mib() if on_gpu else None
            lowest = None if free is None or lowest is None else min(lowest, free)
            time.sleep(1.0)
        figures["wall_s"] = time.perf_counter() - began
        listing = json.loads(
            flwr_call("ls", "check", "--run-id", run_id, "--format", "json").stdout
        )
        figures["status"] = (listing.get("runs") or [{}])[0].get("status")
        if baseline is not None and lowest is not None:
            figures["gpu_memory_used_mib"] = baseline - lowest
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(link.pid, signal.SIGTERM)
        try:
            link.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(link.pid, signal.SIGKILL)
            link.wait()


def _device_free_mib() -> float | None:
    """Free memory on the GPU, all processes counted (None without CUDA)."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.mem_get_info()[0] / 2**20
