"""A node's audit log: one line per message it handles, kept on the node's own disk.

It records what crossed the wire and never the data: the message type and run, the array keys
with their shapes and dtypes and a SHA-256 of each array record's contents, the bytes, the
metric values, and a hash of each config; and every failure, with its detail (which stays here:
the server is told only a generic reason). A hospital can read it to check that nothing but
weights, configs and metrics left the node, and match a hash against what the server holds.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from medmerge_core.federation.config import FederationConfig, NodeSettings, node_settings
from medmerge_core.io import append_jsonl

DEPLOYED_AUDIT_DIR = "~/.medmerge/audit"  # the hospital's own disk


def audit_file(settings: NodeSettings, cfg: FederationConfig) -> Path:
    """`audit-dir` from the node config, else ~/.medmerge/audit (in simulation, the run
    folder's audit/); one file per run name and node."""
    if settings.audit_dir is None and settings.simulated:
        return cfg.run_dir / "audit" / f"{settings.name}.jsonl"
    root = settings.audit_dir if settings.audit_dir is not None else DEPLOYED_AUDIT_DIR
    return Path(root).expanduser() / cfg.run_name / f"{settings.name}.jsonl"


def record_digest(record: Mapping[str, Any]) -> str:
    """SHA-256 of a record's contents, key by key: an array by its serialised bytes (`data`),
    any other value as key-sorted JSON."""
    digest = hashlib.sha256()
    for key in sorted(record):
        value = record[key]
        data = getattr(value, "data", None)
        if not isinstance(data, bytes):
            data = json.dumps(value, sort_keys=True, default=str).encode()
        digest.update(key.encode() + b"\0" + len(data).to_bytes(8, "big") + data)
    return digest.hexdigest()


def append_audit(path: Path, message_type: str, run_id: int, received: Mapping[str, Any],
                 sent: Mapping[str, Any]) -> None:  # fmt: skip
    """One line: what this node received and what it sent back (summaries, never arrays)."""
    append_jsonl(path, {"time": time.time(), "run_id": run_id, "message_type": message_type,
                        "received": dict(received), "sent": dict(sent)})  # fmt: skip


def audit_failure(node_config: Mapping[str, Any], run_config: Mapping[str, Any],
                  message_type: str, run_id: int, exc: BaseException) -> None:  # fmt: skip
    """One line for a message this node failed on, with the detail the server is not told; no
    line when the node's own configs are what failed (the node's log has it)."""
    try:
        cfg = FederationConfig.from_run_config(run_config)
        path = audit_file(node_settings(node_config, cfg), cfg)
    except Exception:
        return
    append_jsonl(path, {"time": time.time(), "run_id": run_id, "message_type": message_type,
                        "failed": f"{type(exc).__name__}: {exc}"})  # fmt: skip
