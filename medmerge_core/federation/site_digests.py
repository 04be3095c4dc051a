"""The digests a site's approvals name: an app's code (from its bundle, a FAB, or its installed
folder) and a run config; on their own because `medmerge site digest`, the site runtime and the
ClientApp compute them without reading a policy.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from medmerge_core.errors import InputError


def is_bundle_file(path: str) -> bool:
    """Whether a file of an app folder is part of its code: everything but Flower's manifest
    and the byte code Python writes beside the sources when they are imported."""
    parts = path.split("/")
    return parts[0] != ".info" and "__pycache__" not in parts and not path.endswith(".pyc")


def files_digest(files: Mapping[str, bytes]) -> str:
    """The app digest: SHA-256 over every bundle file's path and SHA-256, in path order. The
    same files give the same digest whether they come zipped (a FAB) or installed (a folder)."""
    digest = hashlib.sha256()
    for name in sorted(n for n in files if is_bundle_file(n)):
        digest.update(f"{name}\0{hashlib.sha256(files[name]).hexdigest()}\n".encode())
    return digest.hexdigest()


def fab_files(fab: bytes) -> dict[str, bytes]:
    """The files of a Flower app bundle (a zip), by path."""
    try:
        with zipfile.ZipFile(io.BytesIO(fab)) as archive:
            return {i.filename: archive.read(i) for i in archive.infolist() if not i.is_dir()}
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise InputError(f"app bundle: not a Flower app bundle (FAB) ({exc})") from exc


def fab_digest(fab: bytes) -> str:
    return files_digest(fab_files(fab))


def folder_files(root: Path) -> dict[str, bytes]:
    """The files of an installed app folder (as Flower unpacked a FAB), by relative path."""
    files = {}
    for path in sorted(root.rglob("*")):
        name = path.relative_to(root).as_posix()
        if path.is_file() and is_bundle_file(name):
            files[name] = path.read_bytes()
    return files


def installed_digest(root: Path) -> str:
    return files_digest(folder_files(root))


def run_config_digest(run_config: Mapping[str, Any]) -> str:
    """SHA-256 of the run config as key-sorted JSON (what a run-config approval names)."""
    text = json.dumps(dict(run_config), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()
