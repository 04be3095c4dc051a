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
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from medmerge_core.io import atomic_write_json

# benchmarks/ and simulations/ are not installed
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.gpu_check_federation import federation
from benchmarks.gpu_check_plan import GPU_PLAN, SCHEMA, SECTIONS, SMOKE_PLAN, Context, Section
from benchmarks.gpu_check_sections import (
    _free_memory,
    demo,
    finish_gpu_tests,
    ft_throughput,
    gpu_tests,
    probe_ratio,
    start_gpu_tests,
)


def _raise(exc: BaseException) -> None:
    raise exc


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
