"""Helpers shared by several test modules: assertions and the tiny federation's configs."""

from __future__ import annotations

from pathlib import Path

import pytest

from medmerge_core.errors import InputError


def one_line_error(call, *args, **kwargs) -> str:
    """The InputError message of call(*args, **kwargs), asserted to be a single line."""
    with pytest.raises(InputError) as err:
        call(*args, **kwargs)
    message = str(err.value)
    assert "\n" not in message
    return message


ARCH = "shufflenet_v2_x0_5"  # 1.4M parameters: the smallest torchvision CNN with a Linear head


def run_config(tmp_path, **overrides) -> dict:
    base = {
        "output-dir": str(tmp_path),
        "arch": ARCH,
        "image-size": 16,
        "synthetic-n-train": 32,
        "synthetic-n-val": 16,
        "synthetic-n-test": 16,
        "rounds": 2,
        "probe-epochs": 1,
        "min-sites": 2,
        "batch-size": 16,
    }
    return {**base, **overrides}


def nodes(root: Path, sites: int = 3) -> list[dict]:
    """Deployment-style node configs; each node's own disk (FedBN layers, audit log) is under
    `root`, as a hospital's would be under its home folder."""
    shards = sites + 1
    disk = {"state-dir": str(root / "site-state"), "audit-dir": str(root / "audit")}
    return [
        {"role": "institution", "checkpoint": "random:1", "name": "hospital-a", **disk},
        {"role": "institution", "checkpoint": "random:2", "name": "hospital-b", **disk},
        {"role": "coordinator", "data": "synthetic:target", "shard": f"0/{shards}", **disk},
        *[
            {
                "role": "site",
                "data": "synthetic:target",
                "shard": f"{i}/{shards}",
                "name": f"s{i}",
                **disk,
            }
            for i in range(1, shards)
        ],
    ]
