"""Shared fixtures (tiny synthetic tasks, one quick-demo run folder per test session, the
identity tests' key pairs and token) and how the suite shares the machine: the network tests
run first, all on one xdist worker, at normal priority; the others run beside them, one torch
thread per worker, at lower priority."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from medmerge_core.data.base import ArraySplit, TaskData
from medmerge_core.federation.identity import sign_identity
from tests.helpers import keygen, pub

XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")  # set by pytest-xdist in its workers
NETWORK_FILE_SUFFIX = "_network.py"  # where every `network` test lives, and only those
BACKGROUND_NICENESS = 10  # the other tests, beside a consortium whose heartbeats must get through

torch.set_num_threads(1 if XDIST_WORKER else min(2, torch.get_num_threads()))


def in_network_file(path: str) -> bool:
    return path.endswith(NETWORK_FILE_SUFFIX)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Network tests first (stable): they are the longest unit of work, so one worker starts on
    them while the others take the rest."""
    for item in items:
        if (item.get_closest_marker("network") is not None) != in_network_file(item.path.name):
            raise pytest.UsageError(
                f"{item.nodeid}: network tests live in *{NETWORK_FILE_SUFFIX} files, and only they"
            )
    items.sort(key=lambda item: not in_network_file(item.path.name))


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """xdist's loadscope with every network test in one scope, run first: two consortia side by
    side on two cores miss heartbeats. (`--dist loadgroup` would say the same with a marker, but
    under pytest 9.2 xdist 3.8 drops the group.)"""
    from xdist.scheduler import LoadScopeScheduling

    class NetworkTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return "network" if in_network_file(path) else path

    config.option.loadscopereorder = False  # keep the collection order: network first
    return NetworkTogether(config, log)


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Under xdist, a worker drops its priority at its first test that is not a network test,
    so the Flower processes of the consortium beside it come first."""
    background = XDIST_WORKER and item.get_closest_marker("network") is None
    if background and os.getpriority(os.PRIO_PROCESS, 0) < BACKGROUND_NICENESS:
        os.setpriority(os.PRIO_PROCESS, 0, BACKGROUND_NICENESS)


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


# The identity tests' key pairs and a site-1 token signed by the operator, made once per module
# (tests/test_identity.py, tests/test_identity_signing.py).
@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("keys")
    return {
        "operator": keygen(folder, "operator", "ed25519"),
        "rogue_operator": keygen(folder, "rogue", "ed25519"),
        "site-1": keygen(folder, "site-1"),
        "site-2": keygen(folder, "site-2"),
        "ed_node": keygen(folder, "ed_node", "ed25519"),
    }


@pytest.fixture(scope="module")
def token(keys) -> str:
    return sign_identity(keys["operator"], pub(keys["site-1"]), "site-1", "site")
