"""Generation speed of the built-in synthetic tasks on one core (target: 2,000 images/s at 64x64).

Run: python benchmarks/bench_synthetic.py [--images 2048] [--size 64] [--repeats 5]
The process is pinned to one CPU and every thread pool is set to one thread, so the number is
per core whatever the machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from medmerge_core.data.synthetic import SYNTHETIC_TASKS, make_task

TARGET_IMAGES_PER_S = 2000.0


def images_per_second(name: str, images: int, size: int, repeats: int) -> list[tuple[float, float]]:
    """(CPU-time, wall-clock) throughput of make_task per run (val/test hold one image each).

    CPU time is what one core spends, so it stays meaningful on a shared, busy machine; wall
    time is what a user waits on an idle one.
    """
    rates = []
    for repeat in range(repeats):
        cpu, wall = time.process_time(), time.perf_counter()
        make_task(name, n_train=images, n_val=1, n_test=1, image_size=size, seed=repeat)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        rates.append(((images + 2) / cpu, (images + 2) / wall))
    return rates


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2048, help="training images per run")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--repeats", type=int, default=5, help="runs per task; the median counts")
    args = parser.parse_args()
    torch.set_num_threads(1)
    threadpool_limits(1)  # numpy's BLAS
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    make_task("target", n_train=8, n_val=1, n_test=1, image_size=args.size)  # warm-up

    table = Table(title=f"Synthetic task generation, {args.size}x{args.size}, one core")
    columns = ("task", "images/run", "img/s (CPU time)", "min", "max", "img/s (wall)", "target")
    for column in columns:
        table.add_column(column, justify="left" if column == "task" else "right")
    medians = {}
    for name in SYNTHETIC_TASKS:
        rates = images_per_second(name, args.images, args.size, args.repeats)
        cpu = [r[0] for r in rates]
        medians[name] = statistics.median(cpu)
        table.add_row(
            name,
            str(args.images + 2),
            f"{medians[name]:,.0f}",
            f"{min(cpu):,.0f}",
            f"{max(cpu):,.0f}",
            f"{statistics.median(r[1] for r in rates):,.0f}",
            "[green]meets[/]" if medians[name] >= TARGET_IMAGES_PER_S else "[red]below[/]",
        )
    console = Console()
    console.print(table)
    slowest = min(medians, key=medians.get)
    verdict = "meets" if medians[slowest] >= TARGET_IMAGES_PER_S else "does NOT meet"
    console.print(
        f"Slowest task {slowest}: {medians[slowest]:,.0f} img/s per core = "
        f"{medians[slowest] / TARGET_IMAGES_PER_S:.2f}x the {TARGET_IMAGES_PER_S:,.0f} img/s "
        f"target: {verdict} it (median of {args.repeats}, CPU time; load average "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
