"""Atomic writes: a crash mid-write never destroys what was saved before."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np

from medmerge_core.errors import InputError


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (thread safe)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except PermissionError as exc:  # name the file being written, not the hidden temp file
        raise PermissionError(exc.errno, exc.strerror, str(path)) from exc
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp creates 0600; end with what open(path, "w") gives, so teammates can read it.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_torch_save(obj: Any, path: Path) -> None:
    import torch  # here, not at the top: a site policy's audit line should not pay for torch

    atomic_write(path, lambda f: torch.save(obj, f))


def load_torch_file(path: Path, problem: str, hint: str = "", map_location: Any = "cpu") -> Any:
    """torch.load with weights_only=True; a truncated or foreign file becomes a one-line
    InputError naming it: '<path>: <problem> (<error>)[; <hint>]'."""
    import torch

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        detail = " ".join(f"{type(exc).__name__}: {exc}".split())
        raise InputError(f"{path}: {problem} ({detail}){'; ' + hint if hint else ''}") from exc


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=_jsonable) + "\n")


def atomic_savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    atomic_write(path, lambda f: np.savez_compressed(f, **arrays))


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """One JSON object per line; a torn last line is skipped by read_jsonl."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, default=_jsonable) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def drop_jsonl(path: Path, unwanted: Callable[[dict[str, Any]], bool]) -> None:
    """Rewrite a JSON-lines file atomically without the records `unwanted` picks (if any)."""
    records = read_jsonl(path)
    kept = [r for r in records if not unwanted(r)]
    if len(kept) != len(records):
        atomic_write_text(path, "".join(json.dumps(r, default=_jsonable) + "\n" for r in kept))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
