"""The node's side of its site policy: the decision on one message (an app or run config first
seen recorded as pending) and a refusal logged, audited and raised; kept apart from the rules and
their check (`site_policy`) so those stay plain values in, a `Refusal` out.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from medmerge_core.errors import InputError
from medmerge_core.federation.config import SAFE_NAME, FederationConfig, node_settings
from medmerge_core.federation.site_approvals import read_approvals, record_pending
from medmerge_core.federation.site_digests import run_config_digest
from medmerge_core.federation.site_policy import PolicyRefusal, Refusal, check, load_policy

log = logging.getLogger(__name__)


def decide(
    node_config: Mapping[str, Any],
    run_config: Mapping[str, Any],
    message_type: str,
    app_digest: str | None,
    app_name: str = "",
    secure: bool = False,
) -> Refusal | None:
    """The node's decision on one message: None without `policy` in the node config, else the
    policy's check. An app or run config first seen is recorded as pending. A policy that
    cannot be read refuses (rule "policy"), so a broken file never lets everything through."""
    source = node_config.get("policy")
    if source in (None, ""):
        return None
    try:
        policy = load_policy(str(source))
        approvals = read_approvals(policy.approvals)
    except InputError as exc:
        return Refusal("policy", str(exc))
    refusal = check(policy, approvals, message_type, node_config, run_config, app_digest, secure)
    if refusal is None:
        return None
    try:
        if refusal.rule == "apps.require-approved" and app_digest not in approvals:
            record_pending(policy.approvals, str(app_digest), "app", app_name)
        elif refusal.rule == "apps.require-approved-run-config":
            digest = run_config_digest(run_config)
            if digest not in approvals:
                name = str(run_config.get("run-name", ""))
                record_pending(policy.approvals, digest, "run-config", name, dict(run_config))
    except (OSError, InputError) as exc:  # the refusal stands; the officer sees it in the log
        log.warning("site policy: could not record a pending entry: %s", exc)
    return refusal


def audit_refusal(
    node_config: Mapping[str, Any],
    run_config: Mapping[str, Any],
    message_type: str,
    run_id: int,
    refusal: Refusal,
    enforced_by: str,
    app_digest: str | None,
) -> Path:
    """One line in the node's audit log (`audit.audit_file`) for a refused message: the rule,
    its detail, the app digest and who refused it (the site runtime or the ClientApp). When
    the run config cannot be read, the line goes to <audit-dir>/_site-policy/<name>.jsonl."""
    from medmerge_core.federation.audit import DEPLOYED_AUDIT_DIR, audit_file
    from medmerge_core.io import append_jsonl

    try:
        cfg = FederationConfig.from_run_config(run_config)
        path = audit_file(node_settings(node_config, cfg), cfg)
    except InputError:
        root = Path(str(node_config.get("audit-dir") or DEPLOYED_AUDIT_DIR)).expanduser()
        name = str(node_config.get("name", "node"))
        path = root / "_site-policy" / f"{name if SAFE_NAME.match(name) else 'node'}.jsonl"
    append_jsonl(
        path,
        {
            "time": time.time(),
            "run_id": run_id,
            "message_type": message_type,
            "refused": {
                "rule": refusal.rule,
                "detail": refusal.detail,
                "app_digest": app_digest,
                "by": enforced_by,
            },
        },
    )
    return path


def refuse(
    node_config: dict[str, Any],
    run_config: dict[str, Any],
    message_type: str,
    run_id: int,
    refusal: Refusal,
    by: str,
    app_digest: str | None,
    logger: logging.Logger = log,
) -> PolicyRefusal:
    """Log a refusal, write it to the node's audit log, and return the exception to raise
    (the site runtime and the ClientApp both refuse through here)."""
    name = str(node_config.get("name", "node"))
    logger.warning("%s: %s (%s, run %s)", name, refusal, message_type, run_id)
    try:
        audit_refusal(node_config, run_config, message_type, run_id, refusal, by, app_digest)
    except OSError as exc:  # the refusal stands even when the audit disk fails
        logger.error("%s: could not write the refusal to the audit log: %s", name, exc)
    return PolicyRefusal(refusal)
