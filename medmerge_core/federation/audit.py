"""A node's audit log: one line per message it handles, kept on the node's own disk.

It records what crossed the wire and never the data: the message type and run, the array keys
with their shapes and dtypes, the bytes, the metric names, and a hash of the config received.
A hospital can read it to check that nothing but weights, configs and metrics left the node.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from medmerge_core.federation.config import FederationConfig, NodeSettings
from medmerge_core.io import append_jsonl

DEPLOYED_AUDIT_DIR = "~/.medmerge/audit"  # the hospital's own disk


def audit_file(settings: NodeSettings, cfg: FederationConfig) -> Path:
    """`audit-dir` from the node config, else ~/.medmerge/audit (in simulation, the run
    folder's audit/); one file per run name and node."""
    if settings.audit_dir is None and settings.simulated:
        return cfg.run_dir / "audit" / f"{settings.name}.jsonl"
    root = settings.audit_dir if settings.audit_dir is not None else DEPLOYED_AUDIT_DIR
    return Path(root).expanduser() / cfg.run_name / f"{settings.name}.jsonl"


def config_digest(config: Mapping[str, Any]) -> str:
    """A short hash of a received config (key-sorted JSON), to tell configs apart."""
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def append_audit(path: Path, message_type: str, run_id: int, received: Mapping[str, Any],
                 sent: Mapping[str, Any]) -> None:  # fmt: skip
    """One line: what this node received and what it sent back (summaries, never arrays)."""
    append_jsonl(path, {"time": time.time(), "run_id": run_id, "message_type": message_type,
                        "received": dict(received), "sent": dict(sent)})  # fmt: skip
