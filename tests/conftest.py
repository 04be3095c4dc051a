"""Shared fixtures: tiny synthetic tasks and small models, all generated in the test."""

from __future__ import annotations

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


@pytest.fixture
def tiny_task() -> TaskData:
    return TaskData(
        "tiny",
        separable_split(64, 32, 0),
        separable_split(32, 32, 1),
        separable_split(32, 32, 2),
        ("low", "high"),
    )
