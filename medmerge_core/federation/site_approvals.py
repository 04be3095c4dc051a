"""A site's approvals file: the decisions (pending / approved / rejected / revoked) a person
there took on app and run-config digests, kept apart from the policy that reads them.

Written by `medmerge site ...` and, for a digest first seen, by the node itself as pending;
one writer at a time, each write atomic (docs/site-policy.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import getpass
import json
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medmerge_core.errors import InputError

STATUSES: tuple[str, ...] = ("pending", "approved", "rejected", "revoked")
KINDS: tuple[str, ...] = ("app", "run-config")
APPROVALS_FORMAT = "medmerge-site-approvals/1"


@dataclass(frozen=True)
class Approval:
    digest: str
    kind: str  # "app" or "run-config"
    status: str  # pending, approved, rejected, revoked
    name: str = ""  # what it is (the FAB's id and version; a run name)
    updated: str = ""  # when the status was last set (UTC)
    by: str = ""  # who set it ("node" for a pending entry the node recorded)
    note: str = ""
    detail: Mapping[str, Any] | None = None  # for a pending run config: the config itself
    history: tuple[Mapping[str, Any], ...] = ()  # the earlier statuses, oldest first

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            k: getattr(self, k) for k in ("kind", "status", "name", "updated", "by", "note")
        }
        if self.detail is not None:
            out["detail"] = dict(self.detail)
        out["history"] = [dict(h) for h in self.history]
        return out


def read_approvals(path: Path) -> dict[str, Approval]:
    """The site's decisions, by digest; no file yet: none."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise InputError(f"approvals {path}: unreadable ({type(exc).__name__})") from exc
    if not isinstance(raw, dict) or raw.get("format") != APPROVALS_FORMAT:
        raise InputError(f"approvals {path}: not a {APPROVALS_FORMAT} file")
    entries = raw.get("entries", {})
    out = {}
    for digest, entry in entries.items() if isinstance(entries, dict) else ():
        try:
            approval = Approval(digest=digest, **entry)
            approval = dataclasses.replace(approval, history=tuple(approval.history))
        except TypeError as exc:
            raise InputError(f"approvals {path}: entry {digest[:12]}: {exc}") from exc
        if approval.status not in STATUSES or approval.kind not in KINDS:
            raise InputError(f"approvals {path}: entry {digest[:12]}: bad status or kind")
        out[digest] = approval
    return out


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One writer at a time (the officer's CLI, several ClientApps recording a new app)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _write_approvals(path: Path, entries: Mapping[str, Approval]) -> None:
    from medmerge_core.io import atomic_write_json

    body = {
        "format": APPROVALS_FORMAT,
        "entries": {d: a.as_json() for d, a in sorted(entries.items())},
    }
    atomic_write_json(path, body)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def set_status(
    path: Path,
    digest: str,
    status: str,
    kind: str | None = None,
    name: str = "",
    note: str = "",
    by: str | None = None,
) -> Approval:
    """Record a decision on `digest` (atomically, under the approvals lock). `revoke` needs an
    approved entry; `kind` defaults to the entry's own, else "app"."""
    if status not in STATUSES:
        raise InputError(f"status: expected one of {', '.join(STATUSES)}, got '{status}'")
    check_digest(digest)
    with _locked(path):
        entries = read_approvals(path)
        old = entries.get(digest)
        if status == "revoked" and (old is None or old.status != "approved"):
            now = "not recorded" if old is None else old.status
            raise InputError(
                f"revoke {digest[:12]}: only an approved digest can be revoked ({now})"
            )
        kind = kind or (old.kind if old is not None else "app")
        if kind not in KINDS:
            raise InputError(f"kind: expected one of {', '.join(KINDS)}, got '{kind}'")
        entry = Approval(
            digest=digest,
            kind=kind,
            status=status,
            name=name or (old.name if old is not None else ""),
            updated=_now(),
            by=by if by is not None else _user(),
            note=note,
            detail=old.detail if old is not None else None,
            history=() if old is None else (*old.history, _earlier(old)),
        )
        entries[digest] = entry
        _write_approvals(path, entries)
    return entry


def _earlier(entry: Approval) -> dict[str, Any]:
    return {"status": entry.status, "updated": entry.updated, "by": entry.by, "note": entry.note}


def record_pending(
    path: Path, digest: str, kind: str, name: str, detail: Mapping[str, Any] | None = None
) -> None:
    """A digest first seen by the node goes into the approvals file as pending, for a person to
    decide on; an entry already there (any status) is left alone."""
    with _locked(path):
        entries = read_approvals(path)
        if digest in entries:
            return
        entries[digest] = Approval(digest, kind, "pending", name, _now(), "node", "", detail)
        _write_approvals(path, entries)


def check_digest(digest: str) -> None:
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise InputError(f"digest: expected 64 lower-case hex digits, got '{digest[:80]}'")


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())
