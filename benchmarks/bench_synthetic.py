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


def images_per_second(name: str, images: int, size: int, repeats: int) -> list[float]:
    """Throughput of make_task over `repeats` runs (val/test hold one image each)."""
    rates = []
    for repeat in range(repeats):
        start = time.perf_counter()
        make_task(name, n_train=images, n_val=1, n_test=1, image_size=size, seed=repeat)
        rates.append((images + 2) / (time.perf_counter() - start))
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
    for column in ("task", "images/run", "median img/s", "min img/s", "max img/s", "target"):
        table.add_column(column, justify="left" if column == "task" else "right")
    medians = {}
    for name in SYNTHETIC_TASKS:
        rates = images_per_second(name, args.images, args.size, args.repeats)
        medians[name] = statistics.median(rates)
        ok = medians[name] >= TARGET_IMAGES_PER_S
        table.add_row(
            name,
            str(args.images + 2),
            f"{medians[name]:,.0f}",
            f"{min(rates):,.0f}",
            f"{max(rates):,.0f}",
            "[green]meets[/]" if ok else "[red]below[/]",
        )
    console = Console()
    console.print(table)
    slowest = min(medians, key=medians.get)
    verdict = "meets" if medians[slowest] >= TARGET_IMAGES_PER_S else "does NOT meet"
    console.print(
        f"Slowest task {slowest}: {medians[slowest]:,.0f} img/s = "
        f"{medians[slowest] / TARGET_IMAGES_PER_S:.2f}x the {TARGET_IMAGES_PER_S:,.0f} img/s "
        f"target: {verdict} it (median of {args.repeats})."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
