"""Shared fixtures: tiny synthetic tasks and one quick-demo run folder per test session."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medmerge_core.data.base import ArraySplit, TaskData

torch.set_num_threads(min(2, torch.get_num_threads()))


def separable_split(n: int, size: int, seed: int, classes: int = 2) -> ArraySplit:
    """Images whose label sets the brightness of a central square: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    images = rng.integers(0, 60, (n, size, size)).astype(np.uint8)
    lo, hi = size // 4, 3 * size // 4
    images[:, lo:hi, lo:hi] += (labels * (150 // max(classes - 1, 1))).astype(np.uint8)[
        :, None, None
    ]
    return ArraySplit(images, labels.astype(np.int64))


def tiny(size: int) -> TaskData:
    return TaskData(
        "tiny",
        separable_split(64, size, 0),
        separable_split(32, size, 1),
        separable_split(32, size, 2),
        ("low", "high"),
    )


@pytest.fixture
def tiny_task() -> TaskData:
    return tiny(32)


@pytest.fixture
def tiny_task_16px() -> TaskData:
    """The same task at 16x16, for tests whose budget is hundreds of steps."""
    return tiny(16)


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory) -> Path:
    """`medmerge demo --quick` run once per test session; tests that need a
    finished run folder read it, or copy it before writing beside it."""
    from medmerge_core.cli import main

    out = tmp_path_factory.mktemp("quick_demo") / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    return out
