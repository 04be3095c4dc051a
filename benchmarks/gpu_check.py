"""Every check of the GPU path in one command, sized for the few minutes a lent GPU gives.

    python benchmarks/gpu_check.py --out DIR           # a CUDA machine (H100/H200 class)
    python benchmarks/gpu_check.py --smoke --out DIR   # CPU, tiny sizes: the code paths only

Sections, each independent (one that fails or raises is recorded and the others still run):

1. gpu_tests: `pytest -m gpu tests/test_gpu.py` in a subprocess (every pipeline on CUDA with
   bf16 autocast + channels_last, the bf16 probe's coefficients against fp32, bake == probe).
2. probe_ratio: probe step / FT step on CUDA for ResNet-18 and DenseNet-121 at 224 b64
   (`bench_probe.probe_vs_ft`, interleaved, median of repeats); target <= 1.05.
3. ft_throughput: DenseNet-121 FT at 224 b256 with bf16 autocast + channels_last, images/s of
   bench_probe's FT step (timm: 914 on an RTX 3090; target >= 2,000 on H100/H200) and of the
   training loop's own step (`train.TrainStep`, which checks every loss), and peak memory.
4. demo: `medmerge demo --quick` (`run_demo` with `DemoSettings.quick()`), wall time.
5. federation: the 3-site Flower simulation (`flwr run` on a local simulation SuperLink, as
   bench_federation.py runs it) with `client-resources-num-gpus=0.5`, wall time.

DIR/gpu_check.json is rewritten atomically after every section, so a run stopped at the lent
machine's deadline keeps what it measured. Every section records its figures, its targets and
a status: pass, fail (a target missed), error (it raised; with the traceback's tail), skipped
(with the reason) or smoke. A target is a speed target (judged on CUDA only) or a check (the
demo's six methods finished, the simulation completed: judged in smoke runs too). The whole
run keeps to `--budget-s` (default 420 s, so it ends within 8 minutes with start-up): a section
that would not fit in what is left is skipped with that reason, and subprocesses are stopped
at their limit. `--only SECTION ...` reruns a part.

`--smoke`, and any run without CUDA, runs the same code on the CPU at tiny sizes (32 px, batch
4, one timed step; status smoke: figures recorded, speed targets not judged), hides CUDA from
the tests (they skip, as in CI), and checks the simulation's imports, run config, roles and
binaries without starting it (`--simulate` starts it, with no GPU share: minutes). The tests'
subprocess, mostly imports, then runs beside the other sections. Exit status 1 when a section
failed or raised.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
import tomllib
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from medmerge_core.io import atomic_write_json

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks/ and simulations/ are not installed

SCHEMA = 1
SECTIONS = ("gpu_tests", "probe_ratio", "ft_throughput", "demo", "federation")
PROBE_ARCHS = ("resnet18", "densenet121")
PROBE_TARGET = 1.05  # probe step / FT step, the worse of probe and probe+clamp
FT_TARGET = 2000.0  # DenseNet-121 FT img/s at 224 on H100/H200 (timm: 914 on an RTX 3090)
# The paper's comparison, which the demo runs from its two sources.
DEMO_METHODS = (
    "ft:generic",
    "ft:related",
    "lp_ft:generic",
    "lp_ft:related",
    "average_ft",
    "medmerge",
)
SIM_GPUS = 0.5  # client-resources-num-gpus: two ClientApps share the GPU
SIM_CPUS = 2


@dataclass(frozen=True)
class Plan:
    """Sizes and time limits of one run: the lent GPU's or the CPU smoke run's.

    `needs`: seconds a section is expected to take (it is skipped when less is left);
    `caps`: the most a subprocess section may run before it is stopped."""

    device: str
    probe_size: int
    probe_batch: int
    probe_steps: int
    probe_repeats: int
    ft_size: int
    ft_batch: int
    ft_steps: int
    ft_repeats: int
    simulate: bool
    needs: dict[str, float]
    caps: dict[str, float]


GPU_PLAN = Plan(
    device="cuda",
    probe_size=224,
    probe_batch=64,
    probe_steps=5,
    probe_repeats=5,
    ft_size=224,
    ft_batch=256,
    ft_steps=4,
    ft_repeats=5,
    simulate=True,
    needs={"gpu_tests": 60, "probe_ratio": 40, "ft_throughput": 30, "demo": 45, "federation": 90},
    caps={"gpu_tests": 200, "federation": 240},
)
SMOKE_PLAN = Plan(
    device="cpu",
    probe_size=32,
    probe_batch=4,
    probe_steps=1,
    probe_repeats=1,
    ft_size=32,
    ft_batch=4,
    ft_steps=1,
    ft_repeats=1,
    simulate=False,
    needs={name: 1 for name in SECTIONS},
    caps={"gpu_tests": 120, "federation": 400},  # the simulation only with --simulate
)


@dataclass
class Context:
    out: Path
    plan: Plan
    smoke: bool
    deadline: float  # time.monotonic() at which the budget ends

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def limit(self, section: str) -> float:
        """Seconds a subprocess of `section` may run: its cap, or what is left of the budget."""
        return max(1.0, min(self.plan.caps[section], self.left()))

    @property
    def sync(self) -> Callable[[], None]:
        return torch.cuda.synchronize if self.plan.device == "cuda" else (lambda: None)

    def runtime(self):
        from medmerge_core.train import Runtime

        # CUDA: bf16 autocast (fp16 without bf16) + channels_last; CPU smoke: fp32.
        return Runtime.detect(self.plan.device)


@dataclass
class Section:
    """What a section found. `status` is derived from the targets unless set."""

    figures: dict[str, Any] = field(default_factory=dict)
    targets: list[dict[str, Any]] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # parts not run: why
    status: str | None = None
    reason: str | None = None

    def check(
        self, name: str, value: float | None, op: str, threshold: float, *, speed: bool = False
    ) -> None:
        """A target: `value op threshold` (op '<=', '>=' or '=='); None: not measured. A speed
        target (`speed`) is judged on CUDA only; any other is a check judged in smoke runs too."""
        compare = {"<=": float.__le__, ">=": float.__ge__, "==": float.__eq__}[op]
        ok = None if value is None else bool(compare(float(value), float(threshold)))
        self.targets.append(
            {
                "name": name,
                "kind": "speed" if speed else "check",
                "value": value,
                "target": f"{op} {threshold:g}",
                "pass": ok,
            }
        )

    def record(self, smoke: bool) -> dict[str, Any]:
        """The section's JSON record; in a smoke run speed targets are not judged (pass None)."""
        if smoke:
            for t in self.targets:
                if t["kind"] == "speed":
                    t["pass"] = None
        status, reason = self.status, self.reason
        missed = [t["name"] for t in self.targets if t["pass"] is False]
        unmeasured = [t["name"] for t in self.targets if t["pass"] is None and not smoke]
        if status is None and (missed or unmeasured):
            status = "fail"
            reason = reason or "; ".join(
                part
                for part in (
                    f"missed: {', '.join(missed)}" if missed else "",
                    f"not measured: {', '.join(unmeasured)}" if unmeasured else "",
                )
                if part
            )
        elif status is None and smoke:
            status = "smoke"
            reason = reason or (
                "smoke run on the CPU at tiny sizes: code path checked, speed targets not judged"
            )
        elif status is None:
            status = "pass"
        return {
            "status": status,
            "reason": reason,
            "figures": self.figures,
            "targets": self.targets,
            "skipped": self.skipped,
        }


# --- 1. the tests marked gpu -----------------------------------------------------------------


def junit_cases(path: Path) -> list[dict[str, Any]]:
    """One entry per test case of a pytest --junitxml report: name, outcome, seconds, message."""
    outcomes = {"failure": "failed", "error": "error", "skipped": "skipped"}
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", None
        for child in case:
            if child.tag in outcomes:
                outcome, message = outcomes[child.tag], child.get("message")
                break
        cases.append(
            {
                "name": case.get("name"),
                "outcome": outcome,
                "seconds": float(case.get("time") or 0.0),
                "message": message,
            }
        )
    return cases


@dataclass
class PytestRun:
    """`pytest -m gpu tests/test_gpu.py` running in a subprocess, its output in `log`."""

    process: subprocess.Popen
    report: Path  # --junitxml
    log: Path
    began: float  # time.monotonic()


def start_gpu_tests(ctx: Context) -> PytestRun:
    report, log = ctx.out / "gpu_tests.xml", ctx.out / "gpu_tests.log"
    report.unlink(missing_ok=True)
    env = dict(os.environ)
    if ctx.smoke:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU run: every gpu test skips, as in CI
        env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider"]
    command += [f"--junitxml={report}", "tests/test_gpu.py"]
    with open(log, "w", encoding="utf-8") as output:  # the child keeps its own descriptor
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT
        )
    return PytestRun(process, report, log, time.monotonic())


def finish_gpu_tests(ctx: Context, run: PytestRun, section: Section) -> None:
    """Wait for the tests (up to the section's limit from their start) and read the report."""
    limit = ctx.limit("gpu_tests") - (time.monotonic() - run.began)
    try:
        returncode = run.process.wait(timeout=max(1.0, limit))
    except subprocess.TimeoutExpired:
        run.process.kill()
        run.process.wait()
        raise TimeoutError(f"pytest did not finish in time (its log: {run.log})") from None
    cases = junit_cases(run.report) if run.report.is_file() else []
    outcomes = ("passed", "failed", "error", "skipped")
    counts = {k: sum(c["outcome"] == k for c in cases) for k in outcomes}
    section.figures = {"returncode": returncode, **counts, "tests": cases, "log": str(run.log)}
    if returncode not in (0, 5) or counts["failed"] or counts["error"] or not cases:
        section.figures["log_tail"] = run.log.read_text(encoding="utf-8").splitlines()[-15:]
        section.status = "fail"
        section.reason = (
            f"pytest exited {returncode}: {counts['failed']} failed, "
            f"{counts['error']} errors, {len(cases)} collected"
        )
    elif ctx.smoke and counts["skipped"] == len(cases):  # on a CUDA machine: a failure
        first = cases[0]["message"] or "skipped"
        section.status = "skipped"
        section.reason = f"all {len(cases)} gpu tests skipped by pytest ({first})"
    else:
        section.check("gpu tests failed or errored", counts["failed"] + counts["error"], "==", 0)
        section.check("gpu tests passed", counts["passed"], ">=", 1)


def gpu_tests(ctx: Context, section: Section) -> None:
    finish_gpu_tests(ctx, start_gpu_tests(ctx), section)


# --- 2. probe step / FT step ---------------------------------------------------------------


def probe_ratio(ctx: Context, section: Section) -> None:
    from benchmarks.bench_probe import probe_vs_ft

    p, runtime = ctx.plan, ctx.runtime()
    section.figures["settings"] = {
        "input": p.probe_size,
        "batch": p.probe_batch,
        "steps": p.probe_steps,
        "repeats": p.probe_repeats,
        "device": runtime.device.type,
        "amp": str(runtime.amp_dtype),
        "channels_last": runtime.memory_format == torch.channels_last,
    }
    for arch in PROBE_ARCHS:
        times, ratios = probe_vs_ft(
            arch, p.probe_size, p.probe_batch, runtime, p.probe_steps, p.probe_repeats
        )
        section.figures[arch] = {
            "ft_ms": statistics.median(times["ft"]) * 1e3,
            "probe_ms": statistics.median(times["probe"]) * 1e3,
            "probe_clamp_ms": statistics.median(times["probe+clamp"]) * 1e3,
            "probe_over_ft": ratios["probe"],
            "probe_clamp_over_ft": ratios["probe+clamp"],
        }
        section.check(f"{arch} probe/FT", max(ratios.values()), "<=", PROBE_TARGET, speed=True)
        _free_memory()


# --- 3. DenseNet-121 FT throughput -----------------------------------------------------------


def ft_throughput(ctx: Context, section: Section) -> None:
    from benchmarks.bench_probe import interleaved, make_step
    from medmerge_core import train
    from medmerge_core.models import build_model

    p, runtime = ctx.plan, ctx.runtime()
    torch.manual_seed(0)
    model = runtime.model(build_model("densenet121", 2, 3)).train()
    x, y = torch.randn(p.ft_batch, 3, p.ft_size, p.ft_size), torch.randint(0, 2, (p.ft_batch,))
    steps = {"bench step": make_step(model, runtime, x, y)}
    train_step = getattr(train, "TrainStep", None)  # the loop's own step (checks each loss)
    if train_step is not None:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        step = train_step(model, optimizer, runtime.grad_scaler(), runtime, name="ft")
        xs, ys = runtime.inputs(x), y.to(runtime.device)
        steps["fit step"] = lambda: step(xs, ys, 0, 0)
    else:
        section.skipped["fit_step"] = "medmerge_core.train has no TrainStep"
    times = interleaved(steps, p.ft_steps, p.ft_repeats, ctx.sync)
    section.figures["settings"] = {
        "arch": "densenet121",
        "input": p.ft_size,
        "batch": p.ft_batch,
        "steps": p.ft_steps,
        "repeats": p.ft_repeats,
        "device": runtime.device.type,
        "amp": str(runtime.amp_dtype),
        "channels_last": runtime.memory_format == torch.channels_last,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "data": "one batch already on the device (loading not timed)",
    }
    for name, fn in steps.items():
        key = name.replace(" ", "_")
        seconds = statistics.median(times[name])
        section.figures[key] = {"ms_per_step": seconds * 1e3, "images_per_s": p.ft_batch / seconds}
        if runtime.device.type == "cuda":
            ctx.sync()
            torch.cuda.reset_peak_memory_stats()
            fn()
            ctx.sync()
            section.figures[key]["peak_memory_mib"] = torch.cuda.max_memory_allocated() / 2**20
    if runtime.device.type != "cuda":
        section.skipped["peak_memory_mib"] = "CUDA only (torch.cuda.max_memory_allocated)"
    section.figures["timm_rtx3090_images_per_s"] = 914
    section.check(
        "DenseNet-121 FT img/s (bench step)",
        section.figures["bench_step"]["images_per_s"],
        ">=",
        FT_TARGET,
        speed=True,
    )
    del model, steps
    _free_memory()


# --- 4. the demo -------------------------------------------------------------------------------


def demo(ctx: Context, section: Section) -> None:
    from medmerge_core.experiment.demo import DemoSettings, run_demo

    out = ctx.out / "demo"
    shutil.rmtree(out, ignore_errors=True)  # a finished demo folder would resume in no time
    began = time.perf_counter()
    results = run_demo(
        out,
        DemoSettings.quick(),
        device=ctx.plan.device,
        show_progress=False,
        console=Console(quiet=True),
    )
    wall = time.perf_counter() - began
    accuracy = {m: r["test"]["accuracy"] for m, r in results.items()}
    section.figures = {
        "command": "medmerge demo --quick",
        "device": ctx.plan.device,
        "wall_s": wall,
        "test_accuracy": accuracy,
        "run_dir": str(out),
    }
    missing = [m for m in DEMO_METHODS if m not in results]
    section.figures["missing_methods"] = missing
    section.check("the paper's methods missing", len(missing), "==", 0)
    section.check(
        "non-finite test accuracies", sum(not math.isfinite(a) for a in accuracy.values()), "==", 0
    )


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
    from medmerge_core.federation.config import FederationConfig
    from medmerge_core.federation.roles import Node

    overrides = federation_overrides(ctx)
    with open(ROOT / "pyproject.toml", "rb") as handle:
        defaults = tomllib.load(handle)["tool"]["flwr"]["app"]["config"]
    run_config = {**defaults, **overrides}  # what the ServerApp and ClientApps will read
    cfg = FederationConfig.from_run_config(run_config)
    roles = [Node.from_configs(node, run_config).settings.role for node in bench.SIM_NODES]
    binaries = {name: (bench.BIN / name).is_file() for name in ("flwr", "flower-superlink")}
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
        raise FileNotFoundError(f"{', '.join(missing)} not found in {bench.BIN}")
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
    simulate(bench, overrides, home, federation_config, ctx.limit("federation"), figures, on_gpu)
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
    """`flwr run` against a local simulation SuperLink, as bench_federation.simulated does,
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


def _raise(exc: BaseException) -> None:
    raise exc


def _device_free_mib() -> float | None:
    """Free memory on the GPU, all processes counted (None without CUDA)."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.mem_get_info()[0] / 2**20


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


# --- the run -----------------------------------------------------------------------------------


def _environment() -> dict[str, Any]:
    try:
        return environment()
    except Exception as exc:  # the sections still run
        return {"torch": torch.__version__, "cuda": torch.version.cuda, "error": repr(exc)}


def environment() -> dict[str, Any]:
    """The software and the GPU: medmerge's provenance record plus CUDA, cuDNN, the device."""
    from medmerge_core.provenance import environment as provenance

    env = provenance()
    env.update(
        {
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
            "cuda_available": torch.cuda.is_available(),
        }
    )
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(
            {
                "gpu": props.name,
                "gpu_count": torch.cuda.device_count(),
                "capability": f"{props.major}.{props.minor}",
                "gpu_memory_mib": props.total_memory / 2**20,
                "bf16": torch.cuda.is_bf16_supported(),
                "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
                "tf32_cudnn": torch.backends.cudnn.allow_tf32,
            }
        )
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            smi = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            )
            env["driver"] = smi.stdout.strip() or None
    return env


Check = Callable[[Context, Section], None]  # a section: fills its Section, or raises
CHECKS: dict[str, Check] = {
    "gpu_tests": gpu_tests,
    "probe_ratio": probe_ratio,
    "ft_throughput": ft_throughput,
    "demo": demo,
    "federation": federation,
}


def run_section(name: str, ctx: Context, check: Check | None = None) -> dict[str, Any]:
    """One section's record; `check` (default: the section's own) already started when given,
    so the budget is not asked. A section that raises keeps the figures it had filled in."""
    began = time.perf_counter()
    section = Section()
    if check is None and ctx.left() < ctx.plan.needs[name]:
        section.status = "skipped"
        section.reason = (
            f"time budget: {max(ctx.left(), 0):.0f} s left, the section needs about "
            f"{ctx.plan.needs[name]:.0f} s"
        )
        record = section.record(ctx.smoke)
    else:
        try:
            (check or CHECKS[name])(ctx, section)
            record = section.record(ctx.smoke)
        except Exception as exc:  # recorded; the other sections still run
            section.status = "error"
            section.reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:500]
            record = section.record(ctx.smoke)
            record["traceback"] = traceback.format_exc().strip().splitlines()[-12:]
        finally:
            _free_memory()
    record["seconds"] = time.perf_counter() - began
    return record


def print_table(report: dict[str, Any], console: Console) -> None:
    env = report["environment"]
    title = (
        f"GPU check ({report['mode']}: {env.get('gpu') or 'CPU'}, torch {env['torch']}, "
        f"CUDA {env['cuda']}) in {report['wall_s']:.0f} s"
    )
    table = Table(title=title)
    for column in ("section", "status", "figure", "value", "target", "s"):
        table.add_column(column, justify="left" if column in ("section", "figure") else "right")
    colours = {"pass": "green", "fail": "red", "error": "red", "skipped": "yellow"}
    for name, record in report["sections"].items():
        status = f"[{colours.get(record['status'], 'cyan')}]{record['status']}[/]"
        marks = {True: "ok", False: "MISSED", None: "not judged"}
        rows = [
            (t["name"], _short(t["value"]), f"{t['target']} {marks[t['pass']]}")
            for t in record["targets"]
        ]
        if record["reason"] and record["status"] not in ("pass", "smoke"):
            short = record["reason"].split(" (")[0].split(";")[0]  # the JSON has it all
            rows.insert(0, (short[:80], "", ""))
        figures = record["figures"]
        if name == "ft_throughput" and "bench_step" in figures:
            memory = figures["bench_step"].get("peak_memory_mib")
            if memory is not None:
                rows.append(("peak memory MiB (bench step)", f"{memory:,.0f}", ""))
        if name in ("demo", "federation") and "wall_s" in figures:
            rows.append(("wall s", f"{figures['wall_s']:.1f}", ""))
        for i, (figure, value, target) in enumerate(rows or [("", "", "")]):
            first = i == 0
            table.add_row(
                name if first else "",
                status if first else "",
                figure,
                value,
                target,
                f"{record['seconds']:.1f}" if first else "",
            )
    console.print(table)


def _short(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3f}"
    return str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="writes OUT/gpu_check.json")
    parser.add_argument(
        "--smoke", action="store_true", help="CPU, tiny sizes (automatic without CUDA)"
    )
    parser.add_argument(
        "--simulate",
        action="store_true",
        help="also run the Flower simulation in a smoke run (CPU: minutes, no GPU share)",
    )
    parser.add_argument("--budget-s", type=float, default=420.0, help="whole run (default 420)")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=SECTIONS,
        default=list(SECTIONS),
        help="run only these sections (the others are recorded as skipped)",
    )
    args = parser.parse_args(argv)
    smoke = args.smoke or not torch.cuda.is_available()
    threads = torch.get_num_threads()
    if smoke:  # code paths, not speed: one thread cannot be slowed by a busy machine's others
        torch.set_num_threads(1)
    try:
        report = run_all(args, smoke)
    finally:
        torch.set_num_threads(threads)
    return 1 if report["summary"]["fail"] or report["summary"]["error"] else 0


def run_all(args: argparse.Namespace, smoke: bool) -> dict[str, Any]:
    began, console = time.perf_counter(), Console()
    plan = SMOKE_PLAN if smoke else GPU_PLAN
    if args.simulate:
        plan = dataclasses.replace(plan, simulate=True)
    ctx = Context(args.out, plan, smoke, time.monotonic() + args.budget_s)
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "mode": "smoke" if smoke else "gpu",
        "mode_reason": "--smoke" if args.smoke else "CUDA is not available" if smoke else None,
        "budget_s": args.budget_s,
        "wall_s": 0.0,
        "environment": _environment(),
        "sections": {},
        "summary": {},
    }
    path = args.out / "gpu_check.json"
    order, deferred, began_tests = list(SECTIONS), {}, time.perf_counter()
    if smoke and "gpu_tests" in args.only:
        # The CPU run checks code paths, not timings: the tests' subprocess (mostly imports)
        # runs beside the other sections and is read last. On a GPU everything runs in turn.
        try:
            pending = start_gpu_tests(ctx)
            deferred["gpu_tests"] = lambda ctx, section: finish_gpu_tests(ctx, pending, section)
        except Exception as exc:  # recorded when the section is read
            deferred["gpu_tests"] = lambda ctx, section, exc=exc: _raise(exc)
        order.remove("gpu_tests")
        order.append("gpu_tests")
    for name in SECTIONS:
        report["sections"][name] = {"status": "pending"}  # a stopped run shows what is left
    atomic_write_json(path, report)
    for name in order:
        console.print(f"[bold]{name}[/] ...")
        if name in deferred:
            record = run_section(name, ctx, deferred[name])
            record["seconds"] = time.perf_counter() - began_tests
        elif name in args.only:
            record = run_section(name, ctx)
        else:
            record = Section(status="skipped", reason="not selected (--only)").record(smoke)
            record["seconds"] = 0.0
        report["sections"][name] = record
        report["wall_s"] = time.perf_counter() - began
        report["summary"] = {
            s: sum(r["status"] == s for r in report["sections"].values())
            for s in ("pass", "fail", "error", "skipped", "smoke", "pending")
        }
        atomic_write_json(path, report)  # after every section: a stopped run keeps its figures
    print_table(report, console)
    console.print(f"written: {path}")
    return report


if __name__ == "__main__":
    sys.exit(main())
