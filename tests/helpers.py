"""Helpers shared by several test modules: assertions, the tiny federation's configs and the
SSH key pairs of the identity tests."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

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


SSH_KEYGEN = shutil.which("ssh-keygen")
CURVES = {256: ec.SECP256R1, 384: ec.SECP384R1, 521: ec.SECP521R1}


def keygen(folder: Path, name: str, kind: str = "ecdsa", bits: int = 384) -> Path:
    """A key pair as deployments make it: `folder/name` (OpenSSH private) + `folder/name.pub`.
    Uses ssh-keygen where installed (the real formats), else cryptography's same formats."""
    path = folder / name
    if SSH_KEYGEN is not None:
        size = ["-b", str(bits)] if kind == "ecdsa" else []
        subprocess.run(
            [SSH_KEYGEN, "-q", "-t", kind, *size, "-N", "", "-C", name, "-f", str(path)],
            check=True,
        )
        return path
    key = (
        Ed25519PrivateKey.generate()
        if kind == "ed25519"
        else ec.generate_private_key(CURVES[bits]())
    )
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    path.with_name(name + ".pub").write_bytes(public + f" {name}\n".encode())
    return path


def pub(path: Path) -> Path:
    return path.with_name(path.name + ".pub")
