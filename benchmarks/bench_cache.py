"""Images/s for one epoch from the warm uint8 memmap cache vs decoding JPEG/PNG every epoch.

Writes N photos-like images (~500x400, half JPEG, half PNG) into a temp folder, builds the
cache once through registry.load_task, then alternates the two epochs R times:
  cache:  iterate base.BatchLoader over the memmapped split (normalisation included);
  decode: decode + resize the files with the same 2 threads, then normalise each batch.
Prints the median of each, the ratio and the targets (>= 10x, >= 2,000 img/s) as a table.

    python benchmarks/bench_cache.py [--n 400] [--size 224] [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medmerge_core.data.base import BatchLoader, normalize_batch
from medmerge_core.data.images import load_image
from medmerge_core.data.registry import load_task

BATCH = 64


def write_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """Smooth random images (compress like photos, unlike white noise)."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        w, h = int(rng.integers(480, 521)), int(rng.integers(380, 421))
        small = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)
        image = image.filter(ImageFilter.GaussianBlur(1))
        suffix = ".jpg" if i % 2 == 0 else ".png"
        path = folder / f"class_{i % 2}" / f"img_{i:04d}{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, quality=90) if suffix == ".jpg" else image.save(path)
        paths.append(path)
    return paths


def timed(epoch) -> tuple[float, float]:
    """(images/s wall clock, CPU ms per image over all threads) for one epoch.

    CPU time per image barely depends on what else the machine runs, so its ratio is a
    check on the wall-clock ratio when the 2 cores are shared.
    """
    wall, cpu = time.perf_counter(), time.process_time()
    seen = epoch()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return seen / wall, 1000 * cpu / seen


def epoch_from_cache(task) -> int:
    return sum(len(x) for x, _ in BatchLoader(task.train, BATCH))


def epoch_decoding(paths: list[Path], size: int, pool: ThreadPoolExecutor) -> int:
    seen = 0
    for i in range(0, len(paths), BATCH):
        arrays = list(pool.map(lambda p: load_image(p, size, "rgb")[0], paths[i : i + BATCH]))
        seen += len(normalize_batch(np.stack(arrays)))
    return seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=400)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    console = Console()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        paths = write_images(folder, args.n)
        spec = {
            "format": "image_folder",
            "root": folder,
            "cache_dir": Path(tmp) / "cache",
            "fractions": [1.0, 0.0, 0.0],
            "workers": args.threads,
        }
        start = time.perf_counter()
        load_task(spec, image_size=args.size)
        build = time.perf_counter() - start
        start = time.perf_counter()
        task = load_task(spec, image_size=args.size)
        reopen = time.perf_counter() - start
        assert task.notes["cache"]["train"] == "hit" and len(task.train) == args.n
        paths = sorted(paths, key=lambda p: p.relative_to(folder).as_posix())
        cached, decoded = [], []
        with ThreadPoolExecutor(args.threads) as pool:
            epoch_from_cache(task)  # fault the memmap pages in once: a warm cache
            for _ in range(args.repeats):
                cached.append(timed(lambda: epoch_from_cache(task)))
                decoded.append(timed(lambda: epoch_decoding(paths, args.size, pool)))
        console.print(report(args, cached, decoded))
        console.print(
            f"one-time cache build: {build:.2f} s ({args.n / build:,.0f} img/s); "
            f"reopening the warm cache: {reopen * 1000:.0f} ms; "
            f"cpu_count={os.cpu_count()}, load average {os.getloadavg()[0]:.1f} "
            "(other processes slow both epochs alike)"
        )


def report(args, cached: list, decoded: list) -> Table:
    rate = [statistics.median(r for r, _ in runs) for runs in (cached, decoded)]
    cpu = [statistics.median(c for _, c in runs) for runs in (cached, decoded)]
    table = Table(
        title=f"{args.n} images ~500x400 -> {args.size}x{args.size}, batch {BATCH}, "
        f"{args.threads} threads, median of {args.repeats}"
    )
    for column in ("epoch", "images/s", "range", "CPU ms/image", "target", "met"):
        table.add_column(column, justify="left" if column == "epoch" else "right")
    for name, runs, r, c, target, ok in (
        ("warm memmap cache", cached, rate[0], cpu[0], ">= 2,000 img/s", rate[0] >= 2000),
        ("decode JPEG/PNG + resize", decoded, rate[1], cpu[1], "", None),
    ):
        spread = f"{min(x for x, _ in runs):,.0f}-{max(x for x, _ in runs):,.0f}"
        table.add_row(name, f"{r:,.0f}", spread, f"{c:.2f}", target, _yes(ok))
    table.add_row(
        "ratio",
        f"{rate[0] / rate[1]:.1f}x",
        "",
        f"{cpu[1] / cpu[0]:.1f}x",
        ">= 10x",
        _yes(rate[0] / rate[1] >= 10),
    )
    return table


def _yes(ok: bool | None) -> str:
    return "" if ok is None else "[green]yes[/green]" if ok else "[red]no[/red]"


if __name__ == "__main__":
    main()
