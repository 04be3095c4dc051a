"""What the study drivers share: MedMNIST loading, subsets, mean ± std and RESULTS.md sections.

RESULTS.md holds one section per study between `<!-- key:start -->` and `<!-- key:end -->`
markers. A driver rewrites only its own section, under a file lock and with an atomic
replace, so two drivers (or two architectures of one driver) can update the file safely.
"""

from __future__ import annotations

import fcntl
import math
import os
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medmerge_core.data.base import TaskData
from medmerge_core.data.medmnist import load_medmnist
from medmerge_core.errors import InputError
from medmerge_core.io import atomic_write_text

RESULTS_HEADER = (
    "# Results\n\n"
    "Every number below was produced by a driver in `simulations/`; each section is rewritten\n"
    "by its driver (between its markers) and names the command that reproduces it.\n"
)


def load_medmnist_file(root: Path, flag: str) -> TaskData:
    """The official MedMNIST .npz `root/<flag>.npz` as a TaskData (official splits), read by the
    core's loader (its class names, checks and errors)."""
    path = Path(root) / f"{flag}.npz"
    if not path.is_file():
        raise InputError(f"--data-root: {path} not found (expected the MedMNIST .npz file)")
    return load_medmnist(str(path))


def subsample_train(task: TaskData, limit: int | None, seed: int = 0) -> TaskData:
    """The task with at most `limit` training images (a fixed seeded random subset)."""
    if limit is None or limit >= len(task.train):
        return task
    index = np.sort(np.random.default_rng(seed).permutation(len(task.train))[:limit])
    return TaskData(
        task.name,
        task.train.subset(index),
        task.val,
        task.test,
        task.class_names,
        task.multilabel,
        dict(task.notes, train_subset=limit),
    )


def set_threads(threads: int) -> None:
    """One intra-op thread by default: on a shared 2-core machine OpenMP spinning made
    2 threads ~4x slower per step than 1 (measured)."""
    torch.set_num_threads(max(1, threads))


def mean_std(values: Sequence[float], digits: int = 3) -> str:
    """'m ± s' over the finite values (population std, as the core's tables), or 'n/a'."""
    finite = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not finite:
        return "n/a"
    if len(finite) == 1:
        return f"{finite[0]:.{digits}f}"
    return f"{np.mean(finite):.{digits}f} ± {np.std(finite):.{digits}f}"


def paired_difference(first: Sequence[float], second: Sequence[float]) -> str:
    """first - second, paired by seed: 'm ± s (paired by seed; k/n seeds higher)'."""
    diff = [a - b for a, b in zip(first, second, strict=True)]
    return f"{mean_std(diff)} (paired by seed; {sum(d > 0 for d in diff)}/{len(diff)} seeds higher)"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def median_range(values: Sequence[float], digits: int = 1) -> str:
    """'median (min-max)': for wall times, which a shared machine's load skews one way."""
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    low, high = min(values), max(values)
    return f"{np.median(values):.{digits}f} ({low:.{digits}f}-{high:.{digits}f})"


def seed_minutes(seeds: Mapping[str, Mapping[str, Any]]) -> str:
    """The wall time per seed as 'median (min-max) minutes (median, min-max)', leaving out the
    seeds whose run resumed after an interruption: they timed only what was left."""
    walls = [s["seconds"] / 60 for s in seeds.values() if not s.get("resumed")]
    resumed = ", ".join(seed for seed, s in seeds.items() if s.get("resumed"))
    left_out = f"; left out, resumed after an interruption: seed {resumed}" if resumed else ""
    return f"{median_range(walls)} minutes (median, min-max{left_out})"


def command_text(module: str, argv: Sequence[str]) -> str:
    """The command that reproduces a report, as it was typed (without --report-only, which
    only re-renders)."""
    return shlex.join(["python", "-m", module, *(a for a in argv if a != "--report-only")])


def reproduce_block(module: str, argv: Sequence[str]) -> list[str]:
    """The markdown lines that end a RESULTS.md section."""
    return ["Reproduce:", "", "```", command_text(module, argv), "```"]


def update_section(path: Path, key: str, body: str) -> None:
    """Replace (or append) the section `key` of a markdown file, atomically and under a lock."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
    block = f"{start}\n{body.rstrip()}\n{end}\n"
    # Lock the folder itself, so no lock file is left behind in the repository.
    lock = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        text = path.read_text(encoding="utf-8") if path.exists() else RESULTS_HEADER
        if start in text and end in text:
            before, rest = text.split(start, 1)
            after = rest.split(end, 1)[1].lstrip("\n")
            text = before + block + ("\n" + after if after else "")
        else:
            text = text.rstrip() + "\n\n" + block
        atomic_write_text(path, text)
    finally:
        fcntl.flock(lock, fcntl.LOCK_UN)
        os.close(lock)


def relative(path: Path, start: Path) -> str:
    """A link from the directory of `start` to `path`, for markdown."""
    return Path(os.path.relpath(Path(path).resolve(), Path(start).resolve().parent)).as_posix()
