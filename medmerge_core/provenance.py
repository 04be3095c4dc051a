"""What produced a result: software versions, the commit and the hardware, recorded beside it."""

from __future__ import annotations

import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import torch


def environment() -> dict[str, Any]:
    """Versions of what produced a result: Python, the key packages, the platform, the commit."""
    versions = {}
    for package in ("medmerge-federation", "torch", "torchvision", "flwr", "numpy", "scipy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = None  # an installed package, not a checkout
    return {
        "time": time.time(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        # CPU kernels and thread counts change float reductions, so they change results too.
        "cpu": _cpu_name(),
        "threads": torch.get_num_threads(),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "packages": versions,
        "git_commit": commit,
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
