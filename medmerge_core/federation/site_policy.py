"""A site's own policy: what its node serves, which apps may run there, its privacy floors.

The hospital writes a TOML file and names it in its node config (`policy="/abs/policy.toml"`);
the node checks every message against it before anything of the delivered app runs (the
site runtime, `client.site_runtime`, before the bundle is even installed; the ClientApp again,
as a second line). Decisions on apps are kept in an approvals file (pending / approved /
rejected / revoked, as in Fed-BioMed), written by `medmerge site ...` and, for an app first
seen, by the node itself as `pending`.

No Flower here: plain values in, a `Refusal` naming the rule out (docs/site-policy.md). The
approvals file is `site_approvals`, the digests it names `site_digests`, and the node's side
(deciding, recording pending entries, auditing a refusal) `site_enforcement`.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medmerge_core.errors import InputError
from medmerge_core.federation.config import ROLES, FederationConfig, node_settings
from medmerge_core.federation.protocol import MESSAGE_TYPES, UPDATE_MESSAGES
from medmerge_core.federation.site_approvals import Approval
from medmerge_core.federation.site_digests import run_config_digest

DP_FLOORS: tuple[str, ...] = ("no", "any", "client")  # privacy.require-dp
# The run-config key a secure-aggregation floor needs (FederationConfig.secagg). The message
# types a policy may name are the protocol's (`MESSAGE_TYPES`); under
# privacy.require-secure-aggregation its `UPDATE_MESSAGES` are answered only inside SecAgg+.
SECAGG_KEY = "secagg"


class PolicyRefusal(InputError):
    """A message this site's policy refuses; `refusal` names the rule."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(str(refusal))
        self.refusal = refusal


@dataclass(frozen=True)
class Refusal:
    rule: str  # the policy key that refused, e.g. "privacy.min-noise-multiplier"
    detail: str

    def __str__(self) -> str:
        return f"site policy refused the message (rule {self.rule}): {self.detail}"


@dataclass(frozen=True)
class SitePolicy:
    """A parsed policy file; None in a field means "no rule"."""

    path: Path
    approvals: Path
    roles: tuple[str, ...] | None = None
    messages: tuple[str, ...] | None = None
    require_approved_app: bool = True
    require_approved_run_config: bool = False
    require_dp: str = "no"
    max_clipping_norm: float | None = None
    min_noise_multiplier: float | None = None
    max_epsilon: float | None = None
    allow_pooled_counts: bool = True
    require_secure_aggregation: bool = False
    min_sites: int | None = None
    max_rounds: int | None = None
    max_local_epochs: int | None = None
    data: tuple[str, ...] | None = None

    def describe(self) -> list[str]:
        """What this node would accept, one line per rule (for `medmerge site show`)."""
        lines = [
            f"policy {self.path}",
            f"approvals {self.approvals}",
            f"serve.roles: {', '.join(self.roles or ('any',))}",
            f"serve.messages: {', '.join(self.messages or ('any',))}",
            f"apps.require-approved: {self.require_approved_app}",
            f"apps.require-approved-run-config: {self.require_approved_run_config}",
            f"privacy.require-dp: {self.require_dp}",
        ]
        for key, value in (
            ("privacy.max-clipping-norm", self.max_clipping_norm),
            ("privacy.min-noise-multiplier", self.min_noise_multiplier),
            ("privacy.max-epsilon", self.max_epsilon),
        ):
            if value is not None:
                lines.append(f"{key}: {value}")
        lines.append(f"privacy.allow-pooled-counts: {self.allow_pooled_counts}")
        lines.append(f"privacy.require-secure-aggregation: {self.require_secure_aggregation}")
        for key, value in (
            ("privacy.min-sites", self.min_sites),
            ("limits.max-rounds", self.max_rounds),
            ("limits.max-local-epochs", self.max_local_epochs),
        ):
            if value is not None:
                lines.append(f"{key}: {value}")
        if self.data is not None:
            lines.append(f"limits.data: {', '.join(self.data)}")
        return lines


# ---------------------------------------------------------------------------- the policy file

_KEYS: dict[str, tuple[str, ...]] = {
    "": ("approvals", "serve", "apps", "privacy", "limits"),
    "serve": ("roles", "messages"),
    "apps": ("require-approved", "require-approved-run-config"),
    "privacy": (
        "require-dp",
        "max-clipping-norm",
        "min-noise-multiplier",
        "max-epsilon",
        "allow-pooled-counts",
        "require-secure-aggregation",
        "min-sites",
    ),
    "limits": ("max-rounds", "max-local-epochs", "data"),
}


def load_policy(path: str | Path) -> SitePolicy:
    """Read and check a policy file; every bad value is a one-line InputError naming its key."""
    path = Path(path).expanduser()
    if not path.is_absolute():
        raise InputError(f"node config policy: '{path}' must be an absolute path")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"node config policy: {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(
            f"node config policy: {path} is unreadable ({type(exc).__name__})"
        ) from exc
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"{path}: not valid TOML ({' '.join(str(exc).split())})") from exc
    return parse_policy(raw, path)


def parse_policy(raw: Mapping[str, Any], path: Path) -> SitePolicy:
    """The checked policy from a TOML mapping (`path`: where it came from, for messages and for
    the default approvals file beside it)."""
    where = str(path)
    for key, value in raw.items():
        if key not in _KEYS[""]:
            raise InputError(f"{where}: unknown key '{key}' (expected {', '.join(_KEYS[''])})")
        if key != "approvals" and not isinstance(value, dict):
            raise InputError(f"{where}: '{key}' must be a table ([{key}])")
    for table in ("serve", "apps", "privacy", "limits"):
        for key in raw.get(table, {}):
            if key not in _KEYS[table]:
                expected = ", ".join(_KEYS[table])
                raise InputError(f"{where}: unknown key '{table}.{key}' (expected {expected})")
    serve, apps = raw.get("serve", {}), raw.get("apps", {})
    privacy, limits = raw.get("privacy", {}), raw.get("limits", {})

    def get(
        table: Mapping[str, Any],
        name: str,
        key: str,
        kind: type | tuple[type, ...],
        default: Any = None,
    ) -> Any:
        if key not in table:
            return default
        value = table[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # TOML's true is a Python int too: it is a number only where a bool is wanted.
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            names = {bool: "true or false", str: "a string", list: "a list", int: "a whole number"}
            want = names.get(kind, "a number")  # type: ignore[call-overload]
            raise InputError(f"{where}: {name}.{key} must be {want}, got {value!r}")
        return value

    def names(
        table: Mapping[str, Any], name: str, key: str, allowed: tuple[str, ...] | None
    ) -> tuple[str, ...] | None:
        value = get(table, name, key, list)
        if value is None:
            return None
        if not value or not all(isinstance(v, str) and v for v in value):
            raise InputError(f"{where}: {name}.{key} must be a non-empty list of strings")
        for v in value:
            if allowed is not None and v not in allowed:
                raise InputError(
                    f"{where}: {name}.{key}: unknown '{v}' (expected {', '.join(allowed)})"
                )
        return tuple(value)

    def positive(
        table: Mapping[str, Any], name: str, key: str, integer: bool, zero: bool = False
    ) -> Any:
        value = get(table, name, key, int if integer else (int, float))
        if value is None:
            return None
        if not (value >= 0 if zero else value > 0) or value != value:  # NaN too
            bound = ">= 0" if zero else "> 0"
            raise InputError(f"{where}: {name}.{key} must be {bound}, got {value!r}")
        return value if integer else float(value)

    approvals_value = raw.get("approvals", "approvals.json")
    if not isinstance(approvals_value, str) or not approvals_value:
        raise InputError(f"{where}: approvals must be a file path, got {approvals_value!r}")
    approvals = Path(approvals_value).expanduser()
    if not approvals.is_absolute():
        approvals = path.parent / approvals
    require_dp = get(privacy, "privacy", "require-dp", str, "no")
    if require_dp not in DP_FLOORS:
        raise InputError(
            f"{where}: privacy.require-dp must be one of {', '.join(DP_FLOORS)}, got {require_dp!r}"
        )
    policy = SitePolicy(
        path=path,
        approvals=approvals,
        roles=names(serve, "serve", "roles", ROLES),
        messages=names(serve, "serve", "messages", MESSAGE_TYPES),
        require_approved_app=get(apps, "apps", "require-approved", bool, True),
        require_approved_run_config=get(apps, "apps", "require-approved-run-config", bool, False),
        require_dp=require_dp,
        max_clipping_norm=positive(privacy, "privacy", "max-clipping-norm", False),
        min_noise_multiplier=positive(privacy, "privacy", "min-noise-multiplier", False, True),
        max_epsilon=positive(privacy, "privacy", "max-epsilon", False),
        allow_pooled_counts=get(privacy, "privacy", "allow-pooled-counts", bool, True),
        require_secure_aggregation=get(
            privacy, "privacy", "require-secure-aggregation", bool, False
        ),
        min_sites=positive(privacy, "privacy", "min-sites", True),
        max_rounds=positive(limits, "limits", "max-rounds", True),
        max_local_epochs=positive(limits, "limits", "max-local-epochs", True),
        data=names(limits, "limits", "data", None),
    )
    if policy.require_dp == "no":
        for key in ("max-clipping-norm", "min-noise-multiplier", "max-epsilon"):
            if key in privacy:
                raise InputError(
                    f'{where}: privacy.{key} needs privacy.require-dp = "any" or "client"'
                )
    return policy


# ---------------------------------------------------------------------------- the check


def check(
    policy: SitePolicy,
    approvals: Mapping[str, Approval],
    message_type: str,
    node_config: Mapping[str, Any],
    run_config: Mapping[str, Any],
    app_digest: str | None,
    secure: bool = False,
) -> Refusal | None:
    """The first rule of `policy` that this message breaks, or None. `app_digest`: the digest
    of the delivered app's files (None only for an app that was not delivered, i.e. the site's
    own source checkout, which in-process tests and debugging run); `secure`: whether the
    message belongs to the SecAgg+ protocol (carries its config record)."""
    if policy.messages is not None and message_type not in policy.messages:
        return Refusal("serve.messages", f"this node does not serve '{message_type}' messages")
    if policy.require_approved_app and app_digest is not None:
        entry = approvals.get(app_digest)
        if entry is None or entry.kind != "app" or entry.status != "approved":
            state = "unknown here; recorded as pending" if entry is None else entry.status
            return Refusal(
                "apps.require-approved", f"app {app_digest[:16]} is not approved ({state})"
            )
    if policy.require_approved_run_config:
        digest = run_config_digest(run_config)
        entry = approvals.get(digest)
        if entry is None or entry.kind != "run-config" or entry.status != "approved":
            state = "unknown here; recorded as pending" if entry is None else entry.status
            return Refusal(
                "apps.require-approved-run-config",
                f"run config {digest[:16]} is not approved ({state})",
            )
    if policy.require_secure_aggregation and run_config.get(SECAGG_KEY) is not True:
        return Refusal(
            "privacy.require-secure-aggregation", f"the run does not set {SECAGG_KEY} = true"
        )
    if policy.require_secure_aggregation and message_type in UPDATE_MESSAGES and not secure:
        return Refusal(
            "privacy.require-secure-aggregation",
            f"a plain '{message_type}' message; this site sends its update only masked by SecAgg+",
        )
    try:
        cfg = FederationConfig.from_run_config(run_config)
        settings = node_settings(node_config, cfg)
    except InputError as exc:
        return Refusal("run-config", f"unreadable here: {exc}")
    if policy.roles is not None and settings.role not in policy.roles:
        return Refusal("serve.roles", f"this node does not serve as '{settings.role}'")
    return _floors(policy, cfg) or _limits(policy, cfg, settings.data)


def _floors(policy: SitePolicy, cfg: FederationConfig) -> Refusal | None:
    if policy.require_dp == "any" and cfg.dp == "none":
        return Refusal("privacy.require-dp", 'the run has dp = "none"; this site requires DP')
    if policy.require_dp == "client" and cfg.dp != "client":
        return Refusal(
            "privacy.require-dp", f'the run has dp = "{cfg.dp}"; this site requires dp = "client"'
        )
    if policy.max_clipping_norm is not None and cfg.dp_clipping_norm > policy.max_clipping_norm:
        return Refusal(
            "privacy.max-clipping-norm",
            f"dp-clipping-norm {cfg.dp_clipping_norm} > {policy.max_clipping_norm}",
        )
    if policy.min_noise_multiplier is not None and (
        cfg.dp_noise_multiplier < policy.min_noise_multiplier
    ):
        return Refusal(
            "privacy.min-noise-multiplier",
            f"dp-noise-multiplier {cfg.dp_noise_multiplier} < {policy.min_noise_multiplier}",
        )
    if policy.max_epsilon is not None and not 0 < cfg.dp_max_epsilon <= policy.max_epsilon:
        return Refusal(
            "privacy.max-epsilon",
            f"dp-max-epsilon {cfg.dp_max_epsilon} (0: no budget) is not in "
            f"(0, {policy.max_epsilon}]",
        )
    if not policy.allow_pooled_counts and (cfg.dp == "none" or cfg.dp_release_metrics):
        return Refusal(
            "privacy.allow-pooled-counts",
            'the run would send exact metrics and pooled-evaluation counts (dp = "none" or '
            "dp-release-metrics = true)",
        )
    if policy.min_sites is not None and cfg.min_sites < policy.min_sites:
        return Refusal("privacy.min-sites", f"min-sites {cfg.min_sites} < {policy.min_sites}")
    return None


def _limits(policy: SitePolicy, cfg: FederationConfig, data: str | None) -> Refusal | None:
    rounds = cfg.rounds + (cfg.probe_rounds if cfg.probe_mode == "federated" else 0)
    if policy.max_rounds is not None and rounds > policy.max_rounds:
        what = "rounds + probe-rounds" if cfg.probe_mode == "federated" else "rounds"
        return Refusal("limits.max-rounds", f"{what} {rounds} > {policy.max_rounds}")
    if policy.max_local_epochs is not None:
        for key, epochs in (
            ("ft-epochs", cfg.ft.epochs),
            ("pretrain-epochs", cfg.pretrain.epochs),
            ("probe-epochs", cfg.probe.epochs),
        ):
            if epochs > policy.max_local_epochs:
                return Refusal(
                    "limits.max-local-epochs", f"{key} {epochs} > {policy.max_local_epochs}"
                )
    if policy.data is not None and data is not None and data not in policy.data:
        return Refusal("limits.data", "this node's data spec is not one the policy lists")
    return None
