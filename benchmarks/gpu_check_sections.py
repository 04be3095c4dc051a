"""gpu_check's sections 1-4, run in this process or a pytest child, apart from the run loop."""

from __future__ import annotations

import gc
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from benchmarks.gpu_check_plan import (
    DEMO_METHODS,
    FT_TARGET,
    PROBE_ARCHS,
    PROBE_TARGET,
    ROOT,
    Context,
    Section,
)

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


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
